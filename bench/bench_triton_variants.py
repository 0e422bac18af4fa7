"""Why the Triton step falls short of the copy bandwidth: the same step under variants that each change
one thing, with each pass's device time (issue 4: "say why", as bench_cuda_variants.py does for CUDA).

    python bench/bench_triton_variants.py                # GPU: 1e8 parameters, LLaMA-shaped list
    python bench/bench_triton_variants.py --size 3e8 --variants base,block4096

The first GPU session (H200, 2026-11-29, bench/results/kernel_breakdown_nvidia_h200.csv) measured the
Triton AMAdamW step's pass 1 at 0.72 of copy bandwidth (0.55 without weight decay: fewer bytes, the
same time), where its pass 2 ran at 0.98 and CUDA's pass 1, the same math, at 0.80-0.91. So pass 1 is
bound by something other than memory. Read off its sm_90 build (bench/triton_occupancy.py), 5 of its
programs share an SM, 80 KiB of loads (60 without weight decay), against 96-168 KiB for the AM
kernels that ran at 0.89-1.00 (bench/README.md, "Pass 1 by the registers"). Counted in its sm_90 SASS
(bench/README.md, "AM-AdamW's pass 1 by its instructions"), it issued ~96 instructions an element (~89
since its whole path lost the mask: NOTE [no mask on the whole path]) where its 12 bytes at the copy
bandwidth leave time for ~95: it may be bound by instruction issue instead, so
the variants that cut instructions run first. The candidates, one variant each, in the order run (a
part stopped at its time limit keeps the first):
  base          as shipped: BLOCK 1024 elements a program, 4 warps, exact division and square root
  iters8        pass 1 in spans of 8 and 4 blocks (triton_backend.PASS1_ITERS; NOTE [pass-1 spans] in
  iters4        amm_kernels/triton_kernels/reduce_kernels.py): each program pays its prologue (the table
                row, then the addresses in it) and its tl.sum reductions once for 8 or 4 blocks, looping
                over them (iters8: ~72.5 instructions an element, 16-18% fewer), at 128 registers (64 KiB an
                SM); pass 2 unchanged
  approx_math   tl.div_rn -> tl.fdiv (div.full.f32) and tl.sqrt_rn -> tl.sqrt (sqrt.approx): the
                cost of NOTE [IEEE division] (am_math.py). For this measurement only: those results
                differ from the reference's rounding, which the product does not allow.
  block4096     BLOCK 4096 (both passes): a quarter of the programs, 128 KiB of pass 1 an SM (96 without
                weight decay), but 255 registers and a 120-byte spill (triton 3.6; 104 with 3.9)
  iters8_staged3  spans of 8 blocks whose loop is software-pipelined over 3 stages (triton_backend.PASS1_STAGES;
                NOTE [pass-1 stages]): the next blocks' loads copied to shared memory (cp.async) while one is
                summed; 168 registers with triton 3.6 (162 with 3.9) and 32 KiB of shared memory a program, so
                3 programs an SM, each with at most 2 blocks outstanding: 96 KiB of AM-AdamW's pass 1
  block2048     BLOCK 2048 (both passes): half the programs, 96 KiB of pass 1 an SM
  warps8        8 warps a program: more threads to cover each program's latency (48 registers: 5
                programs, 80 KiB an SM, as base)
  base_again    base once more, last: how far two runs of the same step differ (a variant's gain must
                exceed that to count; METHOD.md asks for a rerun)
Each variant runs in its own process. They share one Triton cache, so that a variant compiles only the
kernels it changes (BLOCK, ITERS and STAGES are constexprs and num_warps an option: all are in Triton's
cache key), except approx_math, which gets its own: it patches triton.language, which the key does not
see, so a shared cache would hand it the base build. --budget shares a time limit among the variants
(gpu_session.sh's part): each gets --timeout or what is left, whichever is less, and keeps the rows it
printed if stopped. Rows: variant, optimizer, step ms, and per pass ms and fraction of the copy
bandwidth measured in that process. Writes
bench/results/triton_variants_<device>.{csv,json}. Needs a GPU; --quick runs a tiny case on CPU
tensors in Triton's interpreter, which checks the plumbing only (it times NumPy).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

VARIANTS = ("base", "iters8", "iters4", "approx_math", "block4096", "iters8_staged3", "block2048", "warps8",
            "base_again")
OPTIMIZERS = ("AMAdamW", "AMAdamW wd=0", "AMSGD")  # bench_kernel_breakdown.PASS_BYTES keys
OWN_CACHE = ("approx_math",)  # variants whose patch Triton's cache key does not see
MIN_VARIANT_S = 20  # under this much of --budget left, a variant is not started (importing alone takes ~5 s)


def child(variant: str, size: float, steps: int, quick: bool) -> None:
    """One variant in this process: patch, then import the backend, then measure. Prints ROW lines."""
    import triton.language as tl

    if variant == "approx_math":  # before any kernel is compiled; the codegen looks tl.div_rn up then
        tl.div_rn, tl.sqrt_rn = tl.fdiv, tl.sqrt
    import torch
    from torch.profiler import ProfilerActivity, profile

    from amm_kernels import AMSGD, AMAdamW, triton_backend
    from bench_kernel_breakdown import PASS_BYTES, kernel_times, part_of
    from common import copy_bandwidth, time_fn
    from throughput import free, make_params, model_shapes

    if variant.startswith("block"):
        triton_backend.BLOCK = int(variant[len("block"):])
    if variant.startswith("iters"):
        iters, _, stages = variant[len("iters"):].partition("_staged")
        triton_backend.PASS1_ITERS = int(iters)
        triton_backend.PASS1_STAGES = int(stages or 1)
    if variant == "warps8" and triton_backend.LAUNCH:
        triton_backend.LAUNCH = dict(triton_backend.LAUNCH, num_warps=8)
    device = torch.device("cpu" if quick else "cuda")
    shapes = [(int(size),)] if quick else model_shapes(int(size))
    numel = sum(torch.Size(s).numel() for s in shapes)
    copy_gbs = copy_bandwidth(device, 10_000 if quick else 256 << 20)
    factories = {"AMAdamW": lambda p: AMAdamW(p, lr=1e-3, weight_decay=0.01, backend="triton"),
                 "AMAdamW wd=0": lambda p: AMAdamW(p, lr=1e-3, weight_decay=0.0, backend="triton"),
                 "AMSGD": lambda p: AMSGD(p, lr=1e-2, backend="triton")}
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    for name in OPTIMIZERS:
        params = make_params(shapes, device)
        opt = factories[name](params)
        step_ms = time_fn(opt.step, device, warmup=1 if quick else 3, repeats=2 if quick else 20)
        with profile(activities=activities) as prof:
            for _ in range(steps):
                opt.step()
            if device.type == "cuda":
                torch.cuda.synchronize()
        parts: dict[str, float] = {}
        for kname, _, us in kernel_times(prof, device):
            parts[part_of(kname)] = parts.get(part_of(kname), 0.0) + us / 1e3 / steps
        row = dict(variant=variant, optimizer=name, numel=numel, tensors=len(shapes), step_ms=round(step_ms, 4),
                   copy_gbs=round(copy_gbs, 1))
        for part, bpp in PASS_BYTES[name].items():
            ms = parts.get(part, float("nan"))
            row[f"{part}_ms"] = round(ms, 4)
            row[f"{part}_of_copy"] = round(bpp * numel / (ms * 1e-3) / 1e9 / copy_gbs, 3) if ms == ms and ms > 0 else None
        row["finalize_ms"] = round(parts.get("finalize", 0.0), 4)
        print("ROW " + json.dumps(row), flush=True)
        params = opt = None
        free(device)


def main(argv=None) -> int:
    t0 = time.monotonic()  # --budget counts from here: torch's import below is part of it
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=float, default=1e8, help="parameters (default 1e8)")
    ap.add_argument("--variants", default=None,
                    help=f"comma-separated, of {', '.join(VARIANTS)} (default: all; --quick: base,iters4,approx_math)")
    ap.add_argument("--steps", type=int, default=10, help="steps profiled per optimizer")
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds per variant")
    ap.add_argument("--budget", type=float, default=0.0,
                    help="seconds for all the variants (0: no limit); each gets --timeout or what is left")
    ap.add_argument("--quick", action="store_true", help="CPU tensors in the interpreter, 20k parameters: plumbing only")
    ap.add_argument("--out-dir", default=str(HERE / "results"))
    ap.add_argument("--run", default=None, help=argparse.SUPPRESS)  # the child process
    args = ap.parse_args(argv)
    if args.run:
        child(args.run, 2e4 if args.quick else args.size, 2 if args.quick else args.steps, args.quick)
        return 0

    import torch

    from common import device_tag, environment, write_results

    if not args.quick and not torch.cuda.is_available():
        print("bench_triton_variants: no CUDA device (--quick runs the plumbing on CPU)")
        return 1
    device = torch.device("cpu" if args.quick else "cuda")
    env = environment(device)
    variants = (args.variants or ("base,iters4,approx_math" if args.quick else ",".join(VARIANTS))).split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variant {unknown[0]!r}; known: {', '.join(VARIANTS)}")
    rows, failed = [], []
    shared_cache = tempfile.TemporaryDirectory()
    for variant in variants:
        timeout = args.timeout
        if args.budget:
            left = args.budget - (time.monotonic() - t0)
            if left < MIN_VARIANT_S:
                print(f"{variant}: not run, {left:.0f} s of --budget left", flush=True)
                failed.append(variant)
                continue
            timeout = min(timeout, left)
        with (tempfile.TemporaryDirectory() if variant in OWN_CACHE else nullcontext(shared_cache.name)) as cache:
            child_env = dict(os.environ, TRITON_CACHE_DIR=cache)
            if args.quick:
                child_env["TRITON_INTERPRET"] = "1"
            cmd = [sys.executable, str(Path(__file__).resolve()), "--run", variant, "--size", str(args.size),
                   "--steps", str(args.steps)] + (["--quick"] if args.quick else [])
            try:
                proc = subprocess.run(cmd, env=child_env, capture_output=True, text=True, timeout=timeout)
                out, err, code = proc.stdout, proc.stderr, proc.returncode
            except subprocess.TimeoutExpired as exc:
                out, err, code = (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else (exc.stdout or ""), "", "timeout"
        got = [json.loads(line[4:]) for line in out.splitlines() if line.startswith("ROW ")]
        for row in got:
            print(f"{row['variant']:14s} {row['optimizer']:13s} step {row['step_ms']:8.3f} ms  pass1 {row['pass1_ms']:7.3f} ms "
                  f"({row['pass1_of_copy']} of copy)  pass2 {row['pass2_ms']:7.3f} ms ({row['pass2_of_copy']})  "
                  f"finalize {row['finalize_ms']:.3f} ms", flush=True)
        rows += got
        if code != 0 or len(got) < len(OPTIMIZERS):
            failed.append(variant)
            print(f"{variant}: exit {code}, {len(got)} of {len(OPTIMIZERS)} rows; {(err.strip().splitlines() or [''])[-1][:200]}",
                  flush=True)
        if rows:  # after every variant: a run stopped at its time limit keeps what it measured
            csv_path, _ = write_results(f"triton_variants_{device_tag(device)}", rows, env, Path(args.out_dir))
    shared_cache.cleanup()
    if rows:
        print(f"wrote {csv_path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

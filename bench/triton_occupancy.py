"""How much of each Triton AM pass an SM holds at once, read off its sm_90 build (no GPU needed).

Issue 4 asks why a figure falls short. On an H200 (bench/results/kernel_breakdown_nvidia_h200.csv)
the Triton AM-AdamW pass 1 ran at 0.72 of copy bandwidth (0.55 without weight decay), its update at
0.98. This script compiles the AM pass kernels for sm_90 (Triton's bundled ptxas; float32 lists, no
grad scale: the benchmark's case), reads each build's registers and stack with the cuobjdump Triton
carries, and counts by sm_90's limits (65,536 registers, 2,048 threads and 32 blocks an SM;
registers allocated 8 a thread at a time) how many programs share an SM, and so how many elements,
and bytes of the benchmark's cases, are in an SM's programs at once: what it can have in flight.
A count, not a timing (bench/README.md, "Pass 1 by the registers").

    python bench/triton_occupancy.py            # the variants of bench_triton_variants.py but iters8_staged3
    python bench/triton_occupancy.py --triton-dir .ci-triton-gpu   # compiled by the GPU machine's triton
Writes bench/results/triton_occupancy_sm90_triton<version>.{csv,json}. The launches compiled are
recorded from real steps in Triton's interpreter (tests/_triton_gpu_compile.py record), with this
environment's triton: .ci/run installs the GPU machine's (3.6) into .ci-triton-gpu, whose interpreter
cannot run here (NumPy 2.4), so --triton-dir uses it for the compile only.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

REGISTERS, THREADS, BLOCKS = 65536, 2048, 32  # per SM, sm_90
# Bytes a pass moves per element in the benchmark's cases (bench_kernel_breakdown.PASS_BYTES).
CASES = {"amadamw_reduce_kernel": {"AMAdamW": 16, "AMAdamW wd=0": 12}, "amsgd_reduce_kernel": {"AMSGD": 8},
         "amadamw_update_kernel": {"AMAdamW": 28}, "amsgd_update_kernel": {"AMSGD": 20}}
# (BLOCK, num_warps, pass-1 ITERS): as shipped, then bench_triton_variants.py's variants
CONFIGS = ((1024, 4, 1), (1024, 4, 4), (1024, 4, 8), (4096, 4, 1), (1024, 8, 1), (2048, 4, 1))


def recorded_launches() -> list:
    """Every distinct launch of representative steps, as tests/_triton_gpu_compile.py records them."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "launches.json")
        env = dict(os.environ, TRITON_INTERPRET="1")
        rec = subprocess.run([sys.executable, str(ROOT / "tests" / "_triton_gpu_compile.py"), "record", path],
                             env=env, capture_output=True, text=True)
        if rec.returncode == 3:  # CANNOT_RECORD: this triton's interpreter cannot be hooked
            sys.exit(f"triton_occupancy: {rec.stdout.strip()}; give --launches a file recorded elsewhere")
        if rec.returncode != 0:
            raise subprocess.CalledProcessError(rec.returncode, rec.args, rec.stdout, rec.stderr)
        return json.load(open(path))


def benchmark_launch(entries: list, name: str):
    """The launch of `name` the benchmark makes: float32 lists, no grad scale, found_inf, maximize or loss
    mode, one span a block; for pass 2 the launch that commits the groups (the first bucket's)."""
    for module, kernel, signature, constexprs, options in entries:
        flags = ("HAS_GRAD_SCALE", "HAS_FOUND_INF", "MAXIMIZE", "LOSS_MODE")
        if (kernel == name and not any(v for k, v in constexprs.items() if k.endswith("_CODE"))
                and not any(constexprs.get(f) for f in flags) and constexprs.get("ITERS", 1) == 1
                and constexprs.get("COMMIT_GROUPS", True)):
            return module, signature, constexprs, options
    raise SystemExit(f"no recorded launch of {name} in the benchmark's configuration")


def programs_per_sm(registers: int, threads: int) -> int:
    return min(REGISTERS // (-(-registers // 8) * 8 * threads), THREADS // threads, BLOCKS)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default=",".join("x".join(map(str, c)) for c in CONFIGS),
                    help="comma-separated BLOCKxWARPSxITERS (ITERS: pass 1 only)")
    ap.add_argument("--kernels", default=",".join(CASES), help="comma-separated, of " + ", ".join(CASES))
    ap.add_argument("--out-dir", default=str(HERE / "results"))
    ap.add_argument("--triton-dir", default=None, help="compile with the triton installed (pip --target) there")
    ap.add_argument("--launches", default=None, help=argparse.SUPPRESS)  # the compile-only child
    args = ap.parse_args(argv)
    if args.triton_dir and not args.launches:
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "launches.json")
            json.dump(recorded_launches(), open(path, "w"))
            env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.abspath(args.triton_dir), str(ROOT),
                                                               os.environ.get("PYTHONPATH", "")]))
            cmd = [sys.executable, __file__, "--launches", path, "--configs", args.configs, "--kernels",
                   args.kernels, "--out-dir", args.out_dir]
            return subprocess.run(cmd, env=env).returncode

    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from _triton_gpu_compile import _resources as resources  # (registers, stack bytes) by cuobjdump
    from common import environment, write_results

    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.access(cuobjdump, os.X_OK):
        print(f"triton_occupancy: this triton ({triton.__version__}) carries no cuobjdump")
        return 1
    entries = json.load(open(args.launches)) if args.launches else recorded_launches()
    configs = [tuple(int(v) for v in c.split("x")) for c in args.configs.split(",")]
    rows = []
    for name in args.kernels.split(","):
        module, signature, constexprs, options = benchmark_launch(entries, name)
        fn = getattr(importlib.import_module(module), name)
        for block, warps, iters in configs:
            if iters > 1 and "ITERS" not in signature:
                continue  # spans are pass 1's alone
            c = dict(constexprs, BLOCK=block, **({"ITERS": iters} if "ITERS" in signature else {}))
            kernel = triton.compile(ASTSource(fn, signature, c), target=GPUTarget("cuda", 90, 32),
                                    options=dict(options, num_warps=warps))
            regs, stack = resources(kernel.asm["cubin"], cuobjdump)
            programs = programs_per_sm(regs, 32 * warps)
            for case, bpe in CASES[name].items():
                rows.append(dict(kernel=name, case=case, BLOCK=block, num_warps=warps, ITERS=iters, registers=regs,
                                 stack_bytes=stack, programs_per_sm=programs, elements_per_sm=programs * block,
                                 bytes_per_element=bpe, kib_in_flight_per_sm=programs * block * bpe / 1024))
                r = rows[-1]
                print(f"{name:22s} {case:13s} BLOCK {block:5d} warps {warps} ITERS {iters}: {regs:3d} registers, "
                      f"stack {stack:3d} B, {programs:2d} programs/SM, {r['elements_per_sm']:6d} elements = "
                      f"{r['kib_in_flight_per_sm']:6.1f} KiB", flush=True)
    env = dict(environment(torch.device("cpu")), target="sm_90 (compiled here; no GPU)")
    stem = f"triton_occupancy_sm90_triton{triton.__version__}"
    csv_path, _ = write_results(stem, rows, env, Path(args.out_dir))
    print(f"wrote {csv_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Where a step's time goes: the kernels of one optimizer.step(), each with its device time, and for
the AM steps each pass's GB/s against the bytes that pass must move (issue 3: "where a figure falls
short, say why").

    python bench/bench_kernel_breakdown.py                  # GPU: 1e8 parameters, LLaMA-shaped list
    python bench/bench_kernel_breakdown.py --size 3e8 --layout flat
    python bench/bench_kernel_breakdown.py --device cpu --size 1e6   # CPU: the top ops by self time

Per optimizer (AMAdamW and AMSGD on each compiled backend, fused AdamW and SGD): the step's time
(median, device-synchronised), the sum of its kernels' device time over the steps profiled
(torch.profiler), and every kernel's time per step. The difference between the two is launch
overhead and host work. Kernels are sorted into the AM step's parts by name: "sums" / "reduce" is
pass 1, "update" pass 2, "finalize" and "tensor_terms" the finalize, "persistent" the one-launch step; each pass's GB/s
is the bytes it must move (bench/README.md) over its kernels' time. A pass well under the copy
bandwidth measured in the same run names the kernel to look at; a step much longer than its kernels
points at launches. Writes bench/results/kernel_breakdown_<device>.{csv,json}.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from common import RESULTS, copy_bandwidth, device_tag, environment, time_fn, write_results  # noqa: E402
from throughput import cases as throughput_cases, free, make_params, model_shapes  # noqa: E402


# Bytes per float32 parameter that each part must move (reads + writes; bench/README.md).
PASS_BYTES = {
    "AMAdamW": {"pass1": 16, "pass2": 28},        # weight decay 0.01: pass 1 reads x too
    "AMAdamW wd=0": {"pass1": 12, "pass2": 28},
    "AMSGD": {"pass1": 8, "pass2": 20},
}
PARTS = (("persistent", "step"), ("finalize", "finalize"), ("tensor_terms", "finalize"), ("sums", "pass1"),
         ("reduce", "pass1"), ("update", "pass2"))


# torch.optim's record_function ranges: on a GPU they also come back as device-side user annotations that
# span the step's kernels (the first GPU run listed "Optimizer.step#AMAdamW.step" beside its kernels and
# summed the step twice: "kernels 200% of the step"). Not kernels: left out.
ANNOTATIONS = ("Optimizer.step#", "Optimizer.zero_grad#", "ProfilerStep#")

KIND = {"adamw": "AMAdamW", "adamw0": "AMAdamW wd=0", "sgd": "AMSGD"}  # throughput family -> PASS_BYTES


def cases(device):
    """(name, PASS_BYTES key or None for a baseline, factory): throughput.py's AMAdamW and AMSGD on the
    compiled backends and their fused baselines, with the same hyperparameters."""
    out = []
    for name, family, _, factory in throughput_cases(device):
        if family not in KIND or "[torch]" in name or "foreach" in name:
            continue
        out.append((name, KIND[family] if name.startswith("AM") else None, factory))
    return out


def part_of(kernel: str) -> str:
    low = kernel.lower()
    return next((part for key, part in PARTS if key in low), "other")


def kernel_times(prof, device) -> list[tuple[str, int, float]]:
    """(name, calls, total microseconds) of the device kernels (CUDA) or, on the CPU, of the ops by
    self time; the longest first."""
    out = []
    for e in prof.key_averages():
        if e.key.startswith(ANNOTATIONS):
            continue
        if device.type == "cuda":
            if e.device_type != torch.autograd.DeviceType.CUDA:
                continue
            us = getattr(e, "self_device_time_total", None)
            if us is None:
                us = e.self_cuda_time_total
        else:
            us = e.self_cpu_time_total
        if us > 0:
            out.append((e.key, e.count, float(us)))
    return sorted(out, key=lambda t: -t[2])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default=None, help="cuda (default when present) or cpu")
    ap.add_argument("--size", type=float, default=None, help="parameters (default 1e8 on GPU, 1e6 on CPU)")
    ap.add_argument("--layout", choices=("flat", "model"), default="model")
    ap.add_argument("--steps", type=int, default=10, help="steps profiled per optimizer")
    ap.add_argument("--top", type=int, default=6, help="kernels listed per optimizer")
    ap.add_argument("--only", default=None,
                    help="comma-separated substrings: only the optimizers whose names contain one, e.g. '[cuda]' "
                         "(the baselines too only if one matches)")
    ap.add_argument("--quick", action="store_true", help="20k parameters, 2 steps (smoke test)")
    ap.add_argument("--out-dir", default=str(RESULTS))
    args = ap.parse_args(argv)
    if args.quick:
        args.size, args.steps = args.size or 2e4, 2
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    n = int(args.size or (1e8 if device.type == "cuda" else 1e6))
    shapes = [(n,)] if args.layout == "flat" else model_shapes(n)
    numel = sum(torch.Size(s).numel() for s in shapes)
    env = environment(device)
    copy_gbs = copy_bandwidth(device, 10_000 if args.quick else (256 << 20) if device.type == "cuda" else (32 << 20))
    print(f"{env['device']}: {numel / 1e6:.1f}M float32 parameters in {len(shapes)} tensors; copy bandwidth "
          f"{copy_gbs:.1f} GB/s; torch {env['torch']}, triton {env['triton']}", flush=True)
    # CPU too on a GPU: CUDA-only traces have come back without kernel events (tritonbench #401)
    activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA] if device.type == "cuda" else [ProfilerActivity.CPU]
    picked = cases(device)
    if args.only:
        keys = [k.strip() for k in args.only.split(",") if k.strip()]
        picked = [c for c in picked if any(k in c[0] for k in keys)]
        if not picked:
            print(f"bench_kernel_breakdown: no optimizer here matches --only {args.only!r}; available: "
                  f"{', '.join(c[0] for c in cases(device))}")
            return []
    rows = []
    for name, kind, factory in picked:
        try:
            params = make_params(shapes, device)
            opt = factory(params)
            step_ms = time_fn(opt.step, device, warmup=1 if args.quick else 3, repeats=3 if args.quick else 20)
            with profile(activities=activities) as prof:
                for _ in range(args.steps):
                    opt.step()
                if device.type == "cuda":
                    torch.cuda.synchronize()
            kernels = kernel_times(prof, device)
        except Exception as err:  # noqa: BLE001 - one case failing (a Triton CompilationError too) must not end the rest
            print(f"\n{name}: did not run: {type(err).__name__}: {(str(err).splitlines() or [''])[0][:120]}")
            continue
        finally:
            params = opt = None
            free(device)
        kernel_ms = sum(us for _, _, us in kernels) / 1e3 / args.steps
        what = "kernels" if device.type == "cuda" else "ops' self time (CPU: not a device breakdown)"
        print(f"\n{name}: step {step_ms:.3f} ms, {what} {kernel_ms:.3f} ms per step "
              f"({100 * kernel_ms / step_ms:.0f}% of the step)")
        parts: dict[str, float] = {}
        for kname, calls, us in kernels:
            ms = us / 1e3 / args.steps
            part = part_of(kname) if kind else "step"
            parts[part] = parts.get(part, 0.0) + ms
            rows.append(dict(optimizer=name, numel=numel, tensors=len(shapes), step_ms=round(step_ms, 4),
                             kernel=kname[:200], part=part, calls_per_step=round(calls / args.steps, 2),
                             ms_per_step=round(ms, 4)))
        for kname, calls, us in kernels[:args.top]:
            print(f"  {us / 1e3 / args.steps:9.4f} ms  x{calls / args.steps:<6.3g} {part_of(kname) if kind else '':9s} {kname[:110]}")
        if kind:
            for part, bpp in PASS_BYTES[kind].items():
                ms = parts.get(part)
                if ms:
                    gbs = bpp * numel / (ms * 1e-3) / 1e9
                    print(f"  {part}: {ms:.3f} ms, {bpp} B/param -> {gbs:.1f} GB/s = {gbs / copy_gbs:.2f} of copy")
            for part in ("step", "finalize", "other"):
                if parts.get(part):
                    print(f"  {part}: {parts[part]:.3f} ms")
        if rows:  # after every optimizer: a run stopped at its time limit keeps what it measured
            csv_path, _ = write_results(f"kernel_breakdown_{device_tag(device)}", rows, env, Path(args.out_dir),
                                        extra=dict(copy_gbs=copy_gbs, layout=args.layout))
    if rows:
        print(f"\nwrote {csv_path}")
    return rows


if __name__ == "__main__":
    main()

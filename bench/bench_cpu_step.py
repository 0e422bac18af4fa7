"""Times optimizer.step() on the CPU: AMAdamW / AMSGD backend "cpu" against the reference ("torch")
and torch's own optimizers, on a model-shaped list of ~16M float32 parameters, with 2 threads.
With --dtype bfloat16, on a bfloat16 model, where AMAdamW is also timed with state_dtype=float32
(what float32 state costs).

    .venv/bin/python bench/bench_cpu_step.py [--threads 2] [--repeats 30] [--numel 16000000] [--dtype bfloat16]

Prints a table (median ms per step, ratio to torch.optim.AdamW(fused=True) / SGD) and appends rows to
bench/results/cpu_step.csv with the CPU model, torch version and date.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import os
import statistics
import sys
import time

import torch

import amm_kernels
from amm_kernels import AMAdamW, AMSGD

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from common import cpu_model  # noqa: E402  (bench/common.py: the machine, named once)


def model_shapes(target: int) -> list[tuple[int, ...]]:
    """A transformer-like list: per layer 4 (h, h) attention matrices, 2 MLP matrices, biases, norms."""
    h = 256
    shapes: list[tuple[int, ...]] = [(8192, h)]  # embedding
    while sum(torch.Size(s).numel() for s in shapes) < target:
        shapes += [(h, h)] * 4 + [(h,)] * 4 + [(4 * h, h), (4 * h,), (h, 4 * h), (h,), (h,), (h,)]
    return shapes


def make(shapes, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen).to(dtype).requires_grad_() for s in shapes]
    for p in params:
        p.grad = (torch.randn(p.shape, generator=gen) * 1e-2).to(dtype)
    return params


def time_steps(factories: dict, shapes, repeats, warmup=3, clock=time.perf_counter, dtype=torch.float32) -> dict:
    """Seconds of each step of each optimizer, per round. NOTE [interleaved timing]: the optimizers are
    built side by side and timed in rounds (one step of each per round), so a change in machine load
    during the run (this VM's neighbours) shifts every case alike instead of skewing the ratios; the
    ratio of two cases in the same round (paired_ratios) cancels most of what is left."""
    opts = {name: make_opt(make(shapes, dtype=dtype)) for name, make_opt in factories.items()}
    for opt in opts.values():
        for _ in range(warmup):
            opt.step()
    times = {name: [] for name in opts}
    for _ in range(repeats):
        for name, opt in opts.items():
            t0 = clock()
            opt.step()
            times[name].append(clock() - t0)
    return times


def paired_ratios(times: list[float], base: list[float]) -> tuple[float, float, float]:
    """Median and quartiles of the per-round ratios time / baseline time."""
    q1, med, q3 = statistics.quantiles([t / b for t, b in zip(times, base)], n=4)
    return med, q1, q3


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--numel", type=int, default=16_000_000)
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                    help="the parameters' dtype; bfloat16 adds AMAdamW with state_dtype=float32")
    ap.add_argument("--csv", default=os.path.join(HERE, "results", "cpu_step.csv"))
    ap.add_argument("--clock", choices=("wall", "process"), default="wall",
                    help="wall: elapsed time (the default, and what the csv rows are); process: CPU time of the "
                         "process, steadier on a loaded machine but only meaningful with --threads 1 (idle "
                         "OpenMP threads spin and are counted); rows are then not appended to the csv")
    ap.add_argument("--only", default=None,
                    help="comma-separated substrings: time only the cases whose name contains one (plus the "
                         "baselines they are compared to); rows are then not appended to the csv")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    shapes = model_shapes(args.numel)
    numel = sum(torch.Size(s).numel() for s in shapes)
    have_cpu = "cpu" in amm_kernels.available_backends("cpu")
    dtype = getattr(torch, args.dtype)

    cases = []  # (name, family, factory); weight decay 0.01 (both classes' default) unless named
    if have_cpu:
        cases.append(("AMAdamW backend=cpu", "adamw", lambda p: AMAdamW(p, lr=1e-3, backend="cpu")))
        cases.append(("AMAdamW backend=cpu wd=0", "adamw0",
                      lambda p: AMAdamW(p, lr=1e-3, weight_decay=0.0, backend="cpu")))
        # One beta for the model: one scope batch, both passes over all tensors (NOTE [scope batches]).
        cases.append(("AMAdamW backend=cpu global", "adamw",
                      lambda p: AMAdamW(p, lr=1e-3, beta_scope="global", backend="cpu")))
        if dtype != torch.float32:
            cases.append(("AMAdamW backend=cpu f32 state", "adamw",
                          lambda p: AMAdamW(p, lr=1e-3, backend="cpu", state_dtype=torch.float32)))
    cases += [
        ("AMAdamW backend=torch", "adamw", lambda p: AMAdamW(p, lr=1e-3, backend="torch")),
        ("torch AdamW fused", "adamw", lambda p: torch.optim.AdamW(p, lr=1e-3, fused=True)),
        ("torch AdamW fused wd=0", "adamw0", lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.0, fused=True)),
        ("torch AdamW foreach", "adamw", lambda p: torch.optim.AdamW(p, lr=1e-3, foreach=True)),
    ]
    if have_cpu:
        cases.append(("AMSGD backend=cpu", "sgd", lambda p: AMSGD(p, lr=1e-2, backend="cpu")))
    cases += [
        ("AMSGD backend=torch", "sgd", lambda p: AMSGD(p, lr=1e-2, backend="torch")),
        ("torch SGD momentum foreach", "sgd", lambda p: torch.optim.SGD(p, lr=1e-2, momentum=0.9, foreach=True)),
    ]
    baseline = {"adamw": "torch AdamW fused", "adamw0": "torch AdamW fused wd=0", "sgd": "torch SGD momentum foreach"}
    if args.only:
        keys = [k.strip() for k in args.only.split(",") if k.strip()]
        picked = {name for name, _, _ in cases if any(k in name for k in keys)}
        picked |= {baseline[f] for name, f, _ in cases if name in picked}
        cases = [c for c in cases if c[0] in picked]

    clock = time.process_time if args.clock == "process" else time.perf_counter
    times = time_steps({name: factory for name, _, factory in cases}, shapes, args.repeats, clock=clock, dtype=dtype)
    results = {name: statistics.median(ts) * 1e3 for name, ts in times.items()}

    model = cpu_model()
    print(f"\n{numel / 1e6:.1f}M {args.dtype} parameters in {len(shapes)} tensors, {args.threads} threads, "
          f"median of {args.repeats} steps ({args.clock} clock); {model}; torch {torch.__version__}")
    print(f"{'optimizer':30s} {'ms/step':>9s} {'vs baseline':>12s} {'paired (q1-q3)':>20s} {'vs reference':>13s}  "
          "(timed interleaved; paired: median of the per-round ratios)")
    rows = []
    date = datetime.datetime.now().isoformat(timespec="seconds")
    for name, family, _ in cases:
        ms = results[name]
        base = results[baseline[family]]
        ref = results.get("AMSGD backend=torch" if family == "sgd" else "AMAdamW backend=torch", float("nan"))
        med, q1, q3 = paired_ratios(times[name], times[baseline[family]])
        print(f"{name:30s} {ms:9.2f} {ms / base:11.2f}x {med:8.2f}x ({q1:.2f}-{q3:.2f}) {ref / ms:12.2f}x")
        rows.append(dict(date=date, cpu=model, torch=torch.__version__, threads=args.threads, numel=numel,
                         dtype=args.dtype,
                         tensors=len(shapes), optimizer=name, ms_per_step=f"{ms:.3f}",
                         ratio_to_baseline=f"{ms / base:.3f}", baseline=baseline[family],
                         speedup_vs_reference=f"{ref / ms:.3f}", paired_ratio_median=f"{med:.3f}",
                         paired_ratio_q1=f"{q1:.3f}", paired_ratio_q3=f"{q3:.3f}"))
    if args.only or args.clock != "wall":
        return
    os.makedirs(os.path.dirname(args.csv), exist_ok=True)
    old_rows, fields = [], list(rows[0])
    if os.path.exists(args.csv):
        with open(args.csv, newline="") as fh:
            reader = csv.DictReader(fh)
            old_rows = list(reader)
            fields = list(reader.fieldnames or []) + [k for k in rows[0] if k not in (reader.fieldnames or [])]
    with open(args.csv, "w", newline="") as fh:  # earlier rows kept; columns added since are empty there
        writer = csv.DictWriter(fh, fieldnames=fields, restval="")
        writer.writeheader()
        writer.writerows(old_rows + rows)
    print(f"\nrows appended to {args.csv}")


if __name__ == "__main__":
    main()

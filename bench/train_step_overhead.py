"""Full training-step time (forward + backward + clip + optimizer.step + zero_grad) of a small LLaMA-style
transformer with torch.optim.AdamW against AMAdamW (every available backend): what the adaptive beta
costs in a real step, not just in optimizer.step().

    python bench/train_step_overhead.py            # CPU: d=256, 4 layers, batch 8x128
    python bench/train_step_overhead.py --quick    # seconds
    python bench/train_step_overhead.py --d 1024 --layers 12 --batch 16 --ctx 512   # a GPU (TF32 matmuls)

Writes bench/results/train_step_overhead_<device>.{csv,json} (no plot: one number per optimizer).
"""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from common import (add_model_args, bench_parser, decay_groups, device_tag, environment, parse_bench_args, pick_device,  # noqa: E402
                    progress, time_fn, tiny_llama, write_results)

from amm_kernels import AMAdamW, available_backends  # noqa: E402


def optimizers(device):
    out = {"AdamW fused": lambda g: torch.optim.AdamW(g, lr=1e-3, betas=(0.9, 0.95), fused=True)}
    out["AdamW foreach"] = lambda g: torch.optim.AdamW(g, lr=1e-3, betas=(0.9, 0.95), foreach=True)
    for b in available_backends(device):
        out[f"AMAdamW[{b}]"] = lambda g, b=b: AMAdamW(g, lr=1e-3, betas=(0.9, 0.95), backend=b)
    return out


def main(argv=None):
    ap = bench_parser(__doc__)
    add_model_args(ap, d=256, layers=4, ctx=128)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--device", default=None)
    args = parse_bench_args(ap, argv, threads=None, threads_help=None)
    if args.quick:
        args.d, args.layers, args.batch, args.ctx, args.repeats = 32, 1, 2, 16, 2
        args.threads = args.threads or 1
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    if device.type == "cuda":  # fp32 matmuls without TF32: a 150M-parameter step takes ~170 ms and hides the optimizer
        torch.set_float32_matmul_precision("high")  # TF32 matmuls, for every optimizer alike
    env = environment(device)
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(256, (args.batch, args.ctx), generator=gen).to(device)
    y = torch.randint(256, (args.batch, args.ctx), generator=gen).to(device)

    cases = []
    for name, make in optimizers(device).items():
        torch.manual_seed(0)
        model = tiny_llama(args).to(device)
        cases.append((name, model, make(decay_groups(model, 0.1))))

    def train_step(model, opt):
        loss = model.loss(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    def fwd_bwd(model):
        loss = model.loss(x, y)
        loss.backward()
        model.zero_grad(set_to_none=True)

    times = {name: dict(step=[], fb=[]) for name, _, _ in cases}
    if device.type == "cuda":
        for name, model, opt in cases:
            times[name]["step"] = [time_fn(lambda: train_step(model, opt), device, repeats=args.repeats)]
            times[name]["fb"] = [time_fn(lambda: fwd_bwd(model), device, repeats=args.repeats)]
            # after every optimizer: a run stopped at its time limit keeps what it measured
            write_results(f"train_step_overhead_{device_tag(device)}", rows_of(cases, times, device, args), env,
                          args.out_dir)
    else:  # round-robin, so that a load that drifts during the run hits every optimizer alike
        for name, model, opt in cases:
            for _ in range(1 if args.quick else 2):
                train_step(model, opt)
        for _ in progress(range(args.repeats), desc="train step (rounds)"):
            for name, model, opt in cases:
                t0 = time.perf_counter()
                train_step(model, opt)
                t1 = time.perf_counter()
                fwd_bwd(model)
                t2 = time.perf_counter()
                times[name]["step"].append((t1 - t0) * 1e3)
                times[name]["fb"].append((t2 - t1) * 1e3)

    rows = rows_of(cases, times, device, args)
    for r in rows:
        print(f"{r['optimizer']:16s} {r['ms_per_train_step']:9.2f} ms/train step (fwd+bwd alone {r['ms_fwd_bwd']:8.2f}; "
              f"clip+step+zero_grad {r['ms_step_minus_fwd_bwd']:8.2f}) {r['ratio_to_adamw_fused']:6.2f}x", flush=True)
    write_results(f"train_step_overhead_{device_tag(device)}", rows, env, args.out_dir)
    print(f"{env['device']}, {rows[0]['params']} params, {args.batch}x{args.ctx} tokens; load {env['load_before']}")


def rows_of(cases, times, device, args) -> list[dict]:
    """One row per optimizer timed so far; ratios to the first (fused AdamW)."""
    rows, base = [], None
    for name, model, _ in cases:
        if not times[name]["step"]:
            continue
        ms, ms_fb = statistics.median(times[name]["step"]), statistics.median(times[name]["fb"])
        opt_ms = statistics.median(a - b for a, b in zip(times[name]["step"], times[name]["fb"])) if device.type != "cuda" else ms - ms_fb
        base = base if base is not None else ms
        n = sum(p.numel() for p in model.parameters())
        rows.append(dict(optimizer=name, params=n, tensors=len(list(model.parameters())), tokens=args.batch * args.ctx,
                         ms_per_train_step=round(ms, 3), ms_fwd_bwd=round(ms_fb, 3), ms_step_minus_fwd_bwd=round(opt_ms, 3),
                         ratio_to_adamw_fused=round(ms / base, 3), overhead_pct=round(100 * (ms / base - 1), 1)))
    return rows


if __name__ == "__main__":
    main()

"""Paper Fig. 5 in miniature: a small LLaMA-style causal LM (RMSNorm, rotary attention, SwiGLU) on the bytes
of the Python standard library's own .py files (no download). AdamW with and without linear warm-up
against AMAdamW without warm-up, each beta_scope of AMAdamW (global, group, tensor), and AMAdamW (tensor
scope) with warm-up, several seeds; validation loss against step.

    python bench/conv_lm.py                 # CPU: d=128, 2 layers, 2 seeds x 300 steps (a few minutes)
    python bench/conv_lm.py --quick         # seconds
    python bench/conv_lm.py --steps 3000 --seeds 3 --d 512 --layers 8 --batch 32 --ctx 256   # a GPU

All runs share lr (peak), betas = (0.9, 0.95), weight decay 0.1 on matrices (none on norm gains), gradient
clipping at 1, and a cosine decay to 10% of the peak; "warmup" adds a linear warm-up over the first 10% of
the steps. Same seed = same initial weights and the same batches for every optimizer.
Writes bench/results/conv_lm.{csv,json,png}.
"""
from __future__ import annotations

import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from common import (add_model_args, batches, bench_parser, decay_groups, environment, parse_bench_args, pick_device, plt,  # noqa: E402
                    progress, save_figure, stdlib_bytes, tiny_llama, write_results)

from amm_kernels import AMAdamW  # noqa: E402

CONFIGS = {  # name: (optimizer, warmup, beta_scope)
    "AdamW warmup": ("AdamW", True, None),
    "AdamW no-warmup": ("AdamW", False, None),
    "AMAdamW global no-warmup": ("AMAdamW", False, "global"),
    "AMAdamW group no-warmup": ("AMAdamW", False, "group"),
    "AMAdamW tensor no-warmup": ("AMAdamW", False, "tensor"),
    "AMAdamW tensor warmup": ("AMAdamW", True, "tensor"),  # does AMAdamW cost anything where warm-up is used?
}


def lr_at(step, steps, peak, warmup):
    w = max(1, steps // 10) if warmup else 0
    if step < w:
        return peak * (step + 1) / w
    progress_ = (step - w) / max(1, steps - w)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress_)))


def make_optimizer(name, model, args, device):
    kind, _, scope = CONFIGS[name]
    groups = decay_groups(model, args.wd)
    if kind == "AdamW":
        fused = device.type == "cuda"
        return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95), fused=fused or None, foreach=None if fused else True)
    return AMAdamW(groups, lr=args.lr, betas=(0.9, 0.95), beta_scope=scope)


@torch.no_grad()
def evaluate(model, val_batches):
    model.eval()
    loss = statistics.mean(float(model.loss(x, y)) for x, y in val_batches)
    model.train()
    return loss


def train(name, seed, args, train_data, val_batches, device, bar):
    torch.manual_seed(seed)
    model = tiny_llama(args).to(device)
    opt = make_optimizer(name, model, args, device)
    warmup = CONFIGS[name][1]
    gen = torch.Generator().manual_seed(1000 + seed)
    hist = dict(step=[], val_loss=[], train_loss=[], beta=[])
    t0 = time.perf_counter()
    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr, warmup)
        x, y = batches(train_data, args.batch, args.ctx, gen, device)
        loss = model.loss(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if isinstance(opt, AMAdamW):
            hist["beta"].append(float(opt.beta.float().mean()))
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            hist["step"].append(step + 1)
            hist["val_loss"].append(evaluate(model, val_batches))
            hist["train_loss"].append(float(loss.detach()))
        bar.update()
    hist["seconds"] = time.perf_counter() - t0
    return hist


def main(argv=None):
    ap = bench_parser(__doc__)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--wd", type=float, default=0.1)
    add_model_args(ap, d=128, layers=2, ctx=64)
    ap.add_argument("--eval-every", type=int, default=25)
    ap.add_argument("--data-bytes", type=int, default=4_000_000)
    ap.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated subset of: " + ", ".join(CONFIGS))
    ap.add_argument("--device", default=None)
    args = parse_bench_args(ap, argv, threads_help=None)
    if args.quick:
        args.steps, args.seeds, args.d, args.layers, args.batch, args.ctx, args.eval_every = 6, 1, 32, 1, 2, 16, 3
        args.data_bytes = 200_000
    torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    env = environment(device)
    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    data = stdlib_bytes(args.data_bytes)
    split = int(len(data) * 0.9)
    train_data, val_data = data[:split], data[split:]
    vgen = torch.Generator().manual_seed(12345)
    val_batches = [batches(val_data, args.batch * 2, args.ctx, vgen, device) for _ in range(4 if args.quick else 8)]

    runs = {}
    bar = progress(total=len(names) * args.seeds * args.steps, desc="lm (steps)")
    for seed in range(args.seeds):
        for name in names:
            bar.set_postfix_str(f"seed {seed} {name}")
            runs[f"{name}|seed={seed}"] = train(name, seed, args, train_data, val_batches, device, bar)
    bar.close()

    rows = []
    for name in names:
        hs = [runs[f"{name}|seed={s}"] for s in range(args.seeds)]
        final = [h["val_loss"][-1] for h in hs]
        quarter = [h["val_loss"][max(0, len(h["val_loss"]) // 4 - 1)] for h in hs]
        betas = [b for h in hs for b in h["beta"]]
        rows.append(dict(config=name, seeds=args.seeds, steps=args.steps, lr=args.lr, d=args.d, layers=args.layers,
                         batch=args.batch, ctx=args.ctx, params=sum(p.numel() for p in tiny_llama(args).parameters()),
                         val_loss_final_mean=statistics.mean(final), val_loss_final_sd=statistics.pstdev(final),
                         val_loss_quarter_mean=statistics.mean(quarter),
                         val_loss_min_mean=statistics.mean(min(h["val_loss"]) for h in hs),
                         beta_mean=statistics.mean(betas) if betas else float("nan"),
                         seconds_per_run=statistics.mean(h["seconds"] for h in hs)))
    write_results("conv_lm", rows, env, args.out_dir, extra=dict(args=vars(args), runs=runs))
    print(f"\nbyte LM d={args.d} x{args.layers} layers, {rows[0]['params']} params, batch {args.batch}x{args.ctx}, "
          f"{args.steps} steps, peak lr {args.lr:g}, {args.seeds} seeds; {env['device']}; load {env['load_before']}")
    print(f"{'config':28s} {'val loss final':>18s} {'at 1/4':>8s} {'beta mean':>9s} {'s/run':>7s}")
    for r in rows:
        print(f"{r['config']:28s} {r['val_loss_final_mean']:9.4f}+-{r['val_loss_final_sd']:.4f} "
              f"{r['val_loss_quarter_mean']:8.4f} {r['beta_mean']:9.3f} {r['seconds_per_run']:7.1f}")
    plot(runs, names, args, env, Path(args.out_dir) / "conv_lm.png")


def plot(runs, names, args, env, path):
    pyplot = plt()
    fig, (ax, bx) = pyplot.subplots(1, 2, figsize=(13, 4.8))
    colors = dict(zip(CONFIGS, ("tab:blue", "tab:cyan", "red", "tab:orange", "tab:purple", "tab:green")))
    for name in names:
        for s in range(args.seeds):
            h = runs[f"{name}|seed={s}"]
            ax.plot(h["step"], h["val_loss"], color=colors.get(name), lw=1.2, alpha=0.8, label=name if s == 0 else None)
            if h["beta"]:
                bx.plot(h["beta"], color=colors.get(name), lw=0.6, alpha=0.7, label=name if s == 0 else None)
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss (nats/byte)")
    lows = [min(runs[f"{n}|seed={s}"]["val_loss"]) for n in names for s in range(args.seeds)]
    ax.set_ylim(min(lows) - 0.05, min(lows) + 1.5)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    bx.set_xlabel("step")
    bx.set_ylabel("AMAdamW beta (mean over the scope's betas)")
    bx.grid(alpha=0.3)
    bx.legend(fontsize=8)
    save_figure(fig, f"byte-level LM on the Python stdlib: AdamW +/- warm-up vs AMAdamW without warm-up ({args.seeds} seeds)",
                env, path)


if __name__ == "__main__":
    main()

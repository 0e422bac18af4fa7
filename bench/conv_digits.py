"""Paper Fig. 4 in miniature: a small CNN on scikit-learn's bundled digits (8x8 images, 1797 samples, no
download), minibatch SGD with momentum 0.9 (dampening 0.9, the paper's "fair" MGD at the same lr) against
AMSGD with the paper's defaults (beta_max = 0.9, lam = 0.1), with one global beta and with one beta per
parameter tensor. Train loss and test accuracy per epoch, and
AMSGD's beta at every step, for several seeds and learning rates.

    python bench/conv_digits.py            # 3 seeds x 2 lrs x 30 epochs (a minute or two on CPU)
    python bench/conv_digits.py --quick    # seconds

Also runs torch's usual SGD(momentum=0.9) without dampening at lr / 10 (the same effective step) as a
sanity reference. Writes bench/results/conv_digits.{csv,json,png}. Needs scikit-learn.
"""
from __future__ import annotations

import math
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from common import bench_parser, environment, parse_bench_args, plt, progress, save_figure, write_results  # noqa: E402

from amm_kernels import AMSGD  # noqa: E402


def data(seed=0):
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32).view(-1, 1, 8, 8) / 16.0
    y = torch.tensor(y)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_test = len(x) // 5
    test, train = perm[:n_test], perm[n_test:]
    mean, std = x[train].mean(), x[train].std()
    x = (x - mean) / std
    return x[train], y[train], x[test], y[test]


def net():
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 16, 64), nn.ReLU(), nn.Linear(64, 10))


OPTIMIZERS = {
    "MGD (SGD m=0.9, damp=0.9)": lambda p, lr: torch.optim.SGD(p, lr=lr, momentum=0.9, dampening=0.9, weight_decay=5e-4),
    "AMSGD (beta_max=0.9, lam=0.1)": lambda p, lr: AMSGD(p, lr=lr, weight_decay=5e-4),
    # the same with one beta per parameter tensor (the default scope is chosen from measurement: issue 5)
    "AMSGD tensor scope": lambda p, lr: AMSGD(p, lr=lr, weight_decay=5e-4, beta_scope="tensor"),
    "SGD m=0.9 at lr/10": lambda p, lr: torch.optim.SGD(p, lr=lr / 10, momentum=0.9, weight_decay=5e-4),
}


def train_digits(make_opt, lr, seed, epochs, batch, xtr, ytr, xte, yte, trace=lambda opt: None, on_epoch=None):
    """Train net() with make_opt(params, lr); per epoch the mean train loss and the test accuracy, and
    per step whatever trace(opt) returns (None: nothing). A diverged run (non-finite loss) stops,
    its remaining epochs filled with inf. Shared by conv_digits.py and conv_rllc.py."""
    torch.manual_seed(seed)
    model = net()
    opt = make_opt(list(model.parameters()), lr)
    gen = torch.Generator().manual_seed(seed)
    hist = dict(train_loss=[], test_acc=[], trace=[])
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(len(xtr), generator=gen)
        total, count = 0.0, 0
        for i in range(0, len(xtr), batch):
            idx = perm[i : i + batch]
            loss = F.cross_entropy(model(xtr[idx]), ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
            count += len(idx)
            value = trace(opt)
            if value is not None:
                hist["trace"].append(value)
        model.eval()
        with torch.no_grad():
            acc = float((model(xte).argmax(1) == yte).float().mean())
        hist["train_loss"].append(total / count if math.isfinite(total) else float("inf"))
        hist["test_acc"].append(acc)
        if on_epoch is not None:
            on_epoch()
        if not math.isfinite(total):  # diverged: fill the rest
            hist["train_loss"] += [float("inf")] * (epochs - len(hist["train_loss"]))
            hist["test_acc"] += [acc] * (epochs - len(hist["test_acc"]))
            break
    return hist


def train(name, lr, seed, epochs, batch, xtr, ytr, xte, yte, bar):
    hist = train_digits(OPTIMIZERS[name], lr, seed, epochs, batch, xtr, ytr, xte, yte,
                        trace=lambda opt: float(opt.beta.float().mean()) if isinstance(opt, AMSGD) else None, on_epoch=bar.update)
    hist["betas"] = hist.pop("trace")
    return hist


def main(argv=None):
    ap = bench_parser(__doc__)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--lrs", default="0.1,0.5")
    ap.add_argument("--batch", type=int, default=64)
    args = parse_bench_args(ap, argv)
    torch.set_num_threads(args.threads)
    if args.quick:
        args.epochs, args.seeds, args.lrs = 2, 1, "0.1"
    env = environment(torch.device("cpu"))
    lrs = [float(v) for v in args.lrs.split(",")]
    xtr, ytr, xte, yte = data()
    runs = {}
    bar = progress(total=len(lrs) * len(OPTIMIZERS) * args.seeds * args.epochs, desc="digits (epochs)")
    for lr in lrs:
        for name in OPTIMIZERS:
            for seed in range(args.seeds):
                runs[f"lr={lr:g}|{name}|seed={seed}"] = train(name, lr, seed, args.epochs, args.batch, xtr, ytr, xte, yte, bar)
    bar.close()

    rows = []
    for lr in lrs:
        for name in OPTIMIZERS:
            hs = [runs[f"lr={lr:g}|{name}|seed={s}"] for s in range(args.seeds)]
            fin_loss = [h["train_loss"][-1] for h in hs]
            fin_acc = [h["test_acc"][-1] for h in hs]
            half = max(1, args.epochs // 3)
            betas = [b for h in hs for b in h["betas"]]
            rows.append(dict(lr=lr, optimizer=name, seeds=args.seeds, epochs=args.epochs,
                             train_loss_final_mean=statistics.mean(fin_loss),
                             train_loss_final_sd=statistics.pstdev(fin_loss),
                             train_loss_epoch_third_mean=statistics.mean(h["train_loss"][half - 1] for h in hs),
                             test_acc_final_mean=statistics.mean(fin_acc), test_acc_final_sd=statistics.pstdev(fin_acc),
                             test_acc_best_mean=statistics.mean(max(h["test_acc"]) for h in hs),
                             beta_mean=statistics.mean(betas) if betas else float("nan"),
                             beta_frac_at_max=(sum(b >= 0.8999 for b in betas) / len(betas)) if betas else float("nan"),
                             beta_frac_at_zero=(sum(b <= 1e-6 for b in betas) / len(betas)) if betas else float("nan")))
    write_results("conv_digits", rows, env, args.out_dir, extra=dict(runs=runs))
    print(f"\ndigits CNN, {args.seeds} seeds x {args.epochs} epochs, batch {args.batch}; {env['device']}; load {env['load_before']}")
    print(f"{'lr':>5s} {'optimizer':32s} {'train loss':>18s} {'test acc':>16s} {'beta mean':>9s}")
    for r in rows:
        print(f"{r['lr']:5g} {r['optimizer']:32s} {r['train_loss_final_mean']:9.4f}+-{r['train_loss_final_sd']:.4f} "
              f"{r['test_acc_final_mean']:8.4f}+-{r['test_acc_final_sd']:.4f} {r['beta_mean']:9.3f}")
    plot(runs, lrs, args, env, Path(args.out_dir) / "conv_digits.png")


def plot(runs, lrs, args, env, path):
    pyplot = plt()
    fig, axes = pyplot.subplots(len(lrs), 3, figsize=(15, 3.8 * len(lrs)), squeeze=False)
    colors = dict(zip(OPTIMIZERS, ("tab:blue", "red", "tab:purple", "gray")))
    for i, lr in enumerate(lrs):
        for name in OPTIMIZERS:
            for s in range(args.seeds):
                h = runs[f"lr={lr:g}|{name}|seed={s}"]
                ep = range(1, len(h["train_loss"]) + 1)
                kw = dict(color=colors[name], alpha=0.8, lw=1, label=name if s == 0 else None)
                axes[i][0].semilogy(ep, h["train_loss"], **kw)
                axes[i][1].plot(ep, h["test_acc"], **kw)
                if h["betas"]:
                    axes[i][2].plot(h["betas"], color=colors[name], alpha=0.5, lw=0.5)
        axes[i][0].set_ylabel(f"lr={lr:g}\ntrain loss")
        axes[i][1].set_ylabel("test accuracy")
        axes[i][2].set_ylabel("AMSGD beta (mean over the scope's betas)")
        axes[i][1].set_ylim(0.9, 1.0)
        for ax in axes[i]:
            ax.grid(alpha=0.3)
    axes[-1][0].set_xlabel("epoch")
    axes[-1][1].set_xlabel("epoch")
    axes[-1][2].set_xlabel("step")
    axes[0][0].legend(fontsize=8)
    save_figure(fig, f"digits CNN: momentum SGD vs AMSGD ({args.seeds} seeds)", env, path)


if __name__ == "__main__":
    main()

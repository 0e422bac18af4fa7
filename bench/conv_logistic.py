"""Paper Fig. 3: full-batch logistic regression on scikit-learn's bundled datasets (no download): GD, MGD
with beta = 0.9, the best fixed beta of a grid (chosen by final loss) and AM-MGD
(AMSGD(delta_f="loss", lam=0, beta_max=1)), all at the same lr = 1/L (L = the loss's smoothness bound).

    python bench/conv_logistic.py            # 4 datasets x 1000 steps (a minute or two on CPU)
    python bench/conv_logistic.py --quick    # seconds

Binary tasks: breast_cancer (malignant vs benign), digits (even vs odd), wine (class 0 vs rest),
iris (versicolor vs rest); features standardized, a bias column, L2 weight 1e-4 / n so f* is finite.
MGD is AMSGD(adaptive=False, lam=0) = torch.optim.SGD(momentum=beta, dampening=beta), as in the paper.
Writes bench/results/conv_logistic.{csv,json,png}. Needs scikit-learn (pip install scikit-learn).
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from common import bench_parser, environment, parse_bench_args, plt, progress, save_figure, thinned, write_results  # noqa: E402

from amm_kernels import AMSGD  # noqa: E402

BETAS = (0.5, 0.7, 0.8, 0.9, 0.95, 0.97, 0.98, 0.99, 0.995, 0.999)


def datasets():
    from sklearn import datasets as skd

    def binary(loader, positive):
        x, y = loader(return_X_y=True)
        return x, positive(y)

    return {
        "breast_cancer": binary(skd.load_breast_cancer, lambda y: y == 1),
        "digits (even/odd)": binary(skd.load_digits, lambda y: y % 2 == 0),
        "wine (0/rest)": binary(skd.load_wine, lambda y: y == 0),
        "iris (versicolor/rest)": binary(skd.load_iris, lambda y: y == 1),
    }


def problem(x, y):
    x = torch.tensor(x, dtype=torch.float64)
    x = (x - x.mean(0)) / x.std(0).clamp_min(1e-12)
    x = torch.cat([x, torch.ones(len(x), 1, dtype=torch.float64)], 1)
    y = torch.tensor(y, dtype=torch.float64)
    reg = 1e-4 / len(x)
    lmax = float(torch.linalg.eigvalsh(x.T @ x / len(x)).max()) / 4 + reg  # smoothness of the mean logistic loss

    def loss(w):
        return F.binary_cross_entropy_with_logits(x @ w, y) + 0.5 * reg * (w @ w)

    return loss, x.shape[1], lmax


def reference_minimum(loss_fn, dim):
    """f* to plot gaps against: L-BFGS (strong Wolfe) run to convergence in float64."""
    w = torch.zeros(dim, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w], lr=1, max_iter=2000, tolerance_grad=1e-14, tolerance_change=1e-16,
                            history_size=50, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        value = loss_fn(w)
        value.backward()
        return value

    opt.step(closure)
    with torch.no_grad():
        return float(loss_fn(w))


def run(loss_fn, dim, make_opt, steps):
    w = torch.zeros(dim, dtype=torch.float64, requires_grad=True)
    opt = make_opt([w])

    def closure():
        opt.zero_grad()
        value = loss_fn(w)
        value.backward()
        return value

    with torch.no_grad():
        losses, betas = [float(loss_fn(w))], []
    for _ in range(steps):
        value = opt.step(closure)  # the loss at the iterate before the step
        with torch.no_grad():
            losses.append(float(loss_fn(w)))
        betas.append(float(opt.beta) if opt._hyper.adaptive else float("nan"))
    del value
    return losses, betas


def main(argv=None):
    ap = bench_parser(__doc__)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--lr-mult", type=float, default=1.0, help="lr as a multiple of 1/L")
    args = parse_bench_args(ap, argv)
    torch.set_num_threads(args.threads)
    betas = BETAS
    if args.quick:
        args.steps, betas = 30, (0.9, 0.99)
    env = environment(torch.device("cpu"))
    data = datasets()
    if args.quick:
        data = dict(list(data.items())[:2])

    rows, curves = [], {}
    bar = progress(total=len(data) * (len(betas) + 2), desc="logistic")
    for ds, (x, y) in data.items():
        loss_fn, dim, lmax = problem(x, y)
        lr = args.lr_mult / lmax
        results = {}
        specs = [("GD", 0.0)] + [(f"MGD beta={b:g}", b) for b in betas] + [("AM-MGD", None)]
        for name, beta in specs:
            if beta is None:
                make = lambda p: AMSGD(p, lr=lr, lam=0.0, beta_max=1.0, delta_f="loss")  # noqa: E731
            else:
                make = lambda p, beta=beta: AMSGD(p, lr=lr, lam=0.0, beta_max=beta, adaptive=False)  # noqa: E731
            results[name] = run(loss_fn, dim, make, args.steps)
            bar.update()
        fixed = {k: v for k, v in results.items() if k.startswith("MGD")}
        best = min(fixed, key=lambda k: fixed[k][0][-1] if math.isfinite(fixed[k][0][-1]) else float("inf"))
        f_min = min(reference_minimum(loss_fn, dim), min(min(v[0]) for v in results.values()))  # f* for the gaps
        for name, (losses, bs) in results.items():
            curves[f"{ds}|{name}"] = dict(losses=losses, betas=bs)
            finite = [b for b in bs if b == b]
            rows.append(dict(dataset=ds, n=len(x), dim=dim, lr=lr, method=name, final_loss=losses[-1],
                             loss_at_100=losses[min(100, len(losses) - 1)], best_fixed=name == best,
                             mean_beta=sum(finite) / len(finite) if finite else float("nan"), f_star=f_min, gap_final=losses[-1] - f_min))
    bar.close()

    write_results("conv_logistic", rows, env, args.out_dir, extra=dict(steps=args.steps, curves=thinned(curves)))
    print(f"\nlogistic regression, {args.steps} steps, lr = {args.lr_mult:g}/L; {env['device']}; load {env['load_before']}")
    print("final loss - f* (f* from L-BFGS):")
    print(f"{'dataset':24s} {'GD':>10s} {'MGD 0.9':>10s} {'best fixed':>22s} {'AM-MGD':>10s}")
    for ds in data:
        r = {row["method"]: row for row in rows if row["dataset"] == ds}
        best = next(row for row in rows if row["dataset"] == ds and row["best_fixed"])
        print(f"{ds:24s} {r['GD']['gap_final']:10.3e} {r.get('MGD beta=0.9', r['GD'])['gap_final']:10.3e} "
              f"{best['method'][4:]:>11s} {best['gap_final']:10.3e} {r['AM-MGD']['gap_final']:10.3e}")
    plot(curves, list(data), rows, env, args, Path(args.out_dir) / "conv_logistic.png")


def plot(curves, names, rows, env, args, path):
    pyplot = plt()
    fig, axes = pyplot.subplots(2, len(names), figsize=(4.5 * len(names), 7), squeeze=False)
    for j, ds in enumerate(names):
        ax, bx = axes[0][j], axes[1][j]
        best = next(r["method"] for r in rows if r["dataset"] == ds and r["best_fixed"])
        f_min = next(r["f_star"] for r in rows if r["dataset"] == ds)
        for name, style, label in (("GD", dict(color="gray"), "GD"), ("MGD beta=0.9", dict(color="tab:blue", ls="--"), "MGD beta=0.9"),
                                   (best, dict(color="tab:green", ls=":"), f"best fixed ({best[4:]})"),
                                   ("AM-MGD", dict(color="red", lw=2), "AM-MGD")):
            if f"{ds}|{name}" in curves:
                losses = curves[f"{ds}|{name}"]["losses"]
                ax.semilogy([max(v - f_min, 1e-16) for v in losses], label=label, **style)
        ax.legend(fontsize=7)
        ax.set_title(ds)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        bx.plot(curves[f"{ds}|AM-MGD"]["betas"], color="red", lw=0.8)
        bx.set_xlabel("step")
        bx.grid(alpha=0.3)
    axes[0][0].set_ylabel("loss - f*  (f*: L-BFGS to convergence)")
    axes[1][0].set_ylabel("AM-MGD beta")
    save_figure(fig, f"Logistic regression, full batch, lr = {args.lr_mult:g}/L, lam = 0", env, path)


if __name__ == "__main__":
    main()

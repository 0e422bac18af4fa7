"""Paper Fig. 1: an ill-conditioned quadratic, f(x) = 1/2 x^T A x + b^T x, gradient descent with a fixed
momentum beta (a grid) against AM-MGD (AMSGD(delta_f="loss", lam=0, beta_max=1), the paper's deterministic
mode), at several learning rates. Plots f(x_t) - f* against t.

    python bench/conv_quadratic.py            # dim 200, condition number 1e4, 1500 steps, lr 0.5/L..1000/L (minutes on CPU)
    python bench/conv_quadratic.py --quick    # seconds

Fixed beta is AMSGD(adaptive=False, lam=0, beta_max=beta) = torch.optim.SGD(momentum=beta, dampening=beta),
the paper's MGD (d <- beta d + (1 - beta) g), so every method runs at the same lr. Float64 throughout.
Writes bench/results/conv_quadratic.{csv,json,png}.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from common import bench_parser, environment, parse_bench_args, plt, progress, save_figure, thinned, write_results  # noqa: E402

from amm_kernels import AMSGD  # noqa: E402

BETAS = (0.0, 0.5, 0.8, 0.9, 0.95, 0.97, 0.98, 0.99, 0.995)


def make_problem(dim: int, cond: float, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=gen, dtype=torch.float64))
    eig = torch.logspace(0, math.log10(cond), dim, dtype=torch.float64)  # mu = 1, L = cond
    a = (q * eig) @ q.T
    b = torch.randn(dim, generator=gen, dtype=torch.float64)
    x_star = torch.linalg.solve(a, -b)
    f_star = float(0.5 * x_star @ a @ x_star + b @ x_star)
    x0 = torch.randn(dim, generator=gen, dtype=torch.float64) * 3
    return a, b, f_star, x0, float(eig.max())


def run(a, b, f_star, x0, make_opt, steps: int):
    """Gaps f(x_t) - f* for t = 0..steps, and the beta of every step (nan for fixed beta)."""
    x = x0.clone().requires_grad_()
    opt = make_opt([x])

    def closure():
        opt.zero_grad()
        loss = 0.5 * x @ (a @ x) + b @ x
        loss.backward()
        return loss

    gaps, betas = [], []
    with torch.no_grad():
        gaps.append(float(0.5 * x @ (a @ x) + b @ x) - f_star)
    for _ in range(steps):
        opt.step(closure)
        with torch.no_grad():
            gap = float(0.5 * x @ (a @ x) + b @ x) - f_star
        gaps.append(gap if math.isfinite(gap) and gap < 1e30 else float("inf"))
        betas.append(float(opt.beta) if isinstance(opt, AMSGD) and opt._hyper.adaptive else float("nan"))
        if not math.isfinite(gaps[-1]) or gaps[-1] <= 1e-15 * gaps[0]:  # diverged, or converged to rounding
            gaps += [gaps[-1]] * (steps + 1 - len(gaps))
            betas += [betas[-1]] * (steps - len(betas))
            break
    return gaps, betas


def steps_to(gaps, tol):
    for t, g in enumerate(gaps):
        if g <= tol:
            return t
    return -1


def main(argv=None):
    ap = bench_parser(__doc__)
    ap.add_argument("--dim", type=int, default=200)
    ap.add_argument("--cond", type=float, default=1e4)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--lr-mults", default="0.5,1,2,10,100,1000", help="learning rates as multiples of 1/L")
    args = parse_bench_args(ap, argv)
    torch.set_num_threads(args.threads)
    if args.quick:
        args.dim, args.steps, args.lr_mults = 20, 50, "1"
    env = environment(torch.device("cpu"))
    a, b, f_star, x0, lmax = make_problem(args.dim, args.cond)
    mults = [float(m) for m in args.lr_mults.split(",")]
    gap0 = float(0.5 * x0 @ a @ x0 + b @ x0) - f_star
    tol = 1e-6 * gap0

    methods = [("AM-MGD", None)] + [(f"MGD beta={beta:g}", beta) for beta in BETAS]
    rows, curves = [], {}
    bar = progress(total=len(mults) * len(methods), desc="quadratic")
    for m in mults:
        lr = m / lmax
        for name, beta in methods:
            if beta is None:
                make = lambda p: AMSGD(p, lr=lr, lam=0.0, beta_max=1.0, delta_f="loss")  # noqa: E731
            else:
                make = lambda p, beta=beta: AMSGD(p, lr=lr, lam=0.0, beta_max=beta, adaptive=False)  # noqa: E731
            gaps, betas = run(a, b, f_star, x0, make, args.steps)
            curves[f"lr={m:g}/L|{name}"] = dict(gaps=gaps, betas=betas)
            finite_betas = [x for x in betas if x == x]
            rows.append(dict(lr_mult=m, lr=lr, method=name, beta=beta if beta is not None else "adaptive",
                             final_gap=gaps[-1], rel_final_gap=gaps[-1] / gap0, steps_to_tol=steps_to(gaps, tol),
                             mean_beta=sum(finite_betas) / len(finite_betas) if finite_betas else float("nan")))
            bar.update()
    bar.close()

    write_results("conv_quadratic", rows, env, args.out_dir,
                  extra=dict(problem=dict(dim=args.dim, cond=args.cond, steps=args.steps, f_star=f_star, gap0=gap0), curves=thinned(curves)))
    summary(rows, mults, env, args)
    plot(curves, mults, env, args, Path(args.out_dir) / "conv_quadratic.png")


def summary(rows, mults, env, args):
    print(f"\nquadratic dim {args.dim}, condition {args.cond:g}, {args.steps} steps; {env['device']}; load {env['load_before']}")
    for m in mults:
        mine = [r for r in rows if r["lr_mult"] == m]
        am = next(r for r in mine if r["method"] == "AM-MGD")
        fixed = [r for r in mine if r["method"] != "AM-MGD"]
        best = min(fixed, key=lambda r: r["final_gap"] if math.isfinite(r["final_gap"]) else float("inf"))
        print(f"lr={m:g}/L: AM-MGD rel gap {am['rel_final_gap']:.2e} (mean beta {am['mean_beta']:.3f}); "
              f"best fixed {best['method']} {best['rel_final_gap']:.2e}; "
              f"beta=0.9 {next(r for r in fixed if r['beta'] == 0.9)['rel_final_gap']:.2e}")


def plot(curves, mults, env, args, path):
    pyplot = plt()
    fig, axes = pyplot.subplots(2, len(mults), figsize=(5 * len(mults), 8), squeeze=False)
    cmap = pyplot.get_cmap("viridis")
    for j, m in enumerate(mults):
        ax, bx = axes[0][j], axes[1][j]
        for i, beta in enumerate(BETAS):
            g = curves[f"lr={m:g}/L|MGD beta={beta:g}"]["gaps"]
            ax.semilogy([max(v, 1e-300) for v in g], color=cmap(i / len(BETAS)), lw=1, label=f"beta={beta:g}")
        am = curves[f"lr={m:g}/L|AM-MGD"]
        ax.semilogy([max(v, 1e-300) for v in am["gaps"]], color="red", lw=2.2, label="AM-MGD")
        ax.set_title(f"lr = {m:g}/L")
        ax.set_xlabel("step")
        ax.set_ylim(1e-14, None)
        ax.grid(alpha=0.3)
        bx.plot(am["betas"], color="red", lw=0.8)
        bx.set_xlabel("step")
        bx.set_ylabel("AM-MGD beta")
        bx.grid(alpha=0.3)
    axes[0][0].set_ylabel("f(x_t) - f*")
    axes[0][-1].legend(fontsize=7, ncol=2)
    save_figure(fig, f"Ill-conditioned quadratic (dim {args.dim}, cond {args.cond:g}): fixed beta vs AM-MGD", env, path)


if __name__ == "__main__":
    main()

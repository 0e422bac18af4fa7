"""RLLC (SPEC.md section 4; Szegedy et al. 2024) beside momentum SGD, Nesterov and AMSGD on the ill-conditioned
quadratic of conv_quadratic.py and the digits CNN of conv_digits.py, with the learning law recorded at every
step (the paper's Fig. 2 and 3 plot it over time).

    python bench/conv_rllc.py            # both problems, lr grids, 2 seeds (about 7 minutes on 1 CPU thread)
    python bench/conv_rllc.py --quick    # seconds

RLLC configurations from the paper, each with law_init = (1, 0, ..., 0) (= momentum SGD on the first unit):
  M(0.9)+M(0)            law (1, 0) is SGD(momentum=0.9), (0.9, 1) Nesterov, (0, 1) plain SGD
  M(0.9)+M(0.8)+M(0.7)
  J(0.8,2)+M(0)          a Jordan block of size 2 plus the raw gradient
each at law_lr (c2) in --law-lrs (default 0.01, the package default, and 0.1). Baselines:
  SGD-momentum   torch.optim.SGD(momentum=0.9)                 (no dampening: same lr scale as RLLC)
  Nesterov       torch.optim.SGD(momentum=0.9, nesterov=True)
  AMSGD          amm_kernels.AMSGD with its defaults (beta_max 0.9, lam 0.1); it dampens (d <- beta d +
                 (1 - beta) g), so its lr grid is the others' times 10 (the same effective step).
Fair lrs: every method (and every RLLC law_lr) runs over the same small lr grid and the table reports each at
its best lr, chosen by the mean over seeds of log10 final gap (quadratic) or of the final train loss (digits).
No weight decay anywhere (RLLC has none). Writes bench/results/conv_rllc.{csv,json,png}. Digits needs scikit-learn.
"""
from __future__ import annotations

import math
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from common import bench_parser, environment, parse_bench_args, plt, progress, save_figure, thinned, write_results  # noqa: E402
from conv_quadratic import make_problem  # noqa: E402

from amm_kernels import AMSGD  # noqa: E402
from amm_kernels.rllc import RLLC  # noqa: E402

RLLC_MEMORIES = ("M(0.9)+M(0)", "M(0.9)+M(0.8)+M(0.7)", "J(0.8,2)+M(0)")
UNIT_NAMES = {"M(0.9)+M(0)": ["M(0.9)", "M(0)"], "M(0.9)+M(0.8)+M(0.7)": ["M(0.9)", "M(0.8)", "M(0.7)"],
              "J(0.8,2)+M(0)": ["J(0.8) m1", "J(0.8) m2", "M(0)"]}


def methods(law_lrs):
    """(name, lr scale, factory(params, lr)); lr scale multiplies the shared grid (AMSGD dampens: x10)."""
    out = [
        ("SGD-momentum 0.9", 1.0, lambda p, lr: torch.optim.SGD(p, lr=lr, momentum=0.9)),
        ("Nesterov 0.9", 1.0, lambda p, lr: torch.optim.SGD(p, lr=lr, momentum=0.9, nesterov=True)),
        ("AMSGD", 10.0, lambda p, lr: AMSGD(p, lr=lr)),
    ]
    for mem in RLLC_MEMORIES:
        for c2 in law_lrs:
            out.append((f"RLLC {mem} c2={c2:g}", 1.0, lambda p, lr, mem=mem, c2=c2: RLLC(p, lr=lr, law_lr=c2, memory=mem)))
    return out


def law_of(opt):
    return [float(v) for v in opt.law.reshape(-1).tolist()] if isinstance(opt, RLLC) else None


# -- the quadratic --------------------------------------------------------------------------------------------
def run_quadratic(problem, factory, lr, steps):
    a, b, f_star, x0, _ = problem
    x = x0.clone().requires_grad_()
    opt = factory([x], lr)

    def f():
        with torch.no_grad():
            return float(0.5 * x @ (a @ x) + b @ x) - f_star

    gaps, laws = [f()], []
    for _ in range(steps):
        opt.zero_grad()
        (0.5 * x @ (a @ x) + b @ x).backward()
        opt.step()
        gap = f()
        gaps.append(gap if math.isfinite(gap) and gap < 1e30 else float("inf"))
        law = law_of(opt)
        if law is not None:
            laws.append(law)
        if not math.isfinite(gaps[-1]) or gaps[-1] <= 1e-15 * gaps[0]:  # diverged, or converged to rounding
            gaps += [gaps[-1]] * (steps + 1 - len(gaps))
            break
    return dict(gaps=gaps, laws=laws)


# -- the digits CNN -------------------------------------------------------------------------------------------
def run_digits(factory, lr, seed, epochs, batch, xtr, ytr, xte, yte):
    from conv_digits import train_digits

    hist = train_digits(factory, lr, seed, epochs, batch, xtr, ytr, xte, yte, trace=law_of)
    hist["laws"] = hist.pop("trace")
    return hist


def safe_log10(v):
    return math.log10(v) if math.isfinite(v) and v > 0 else (math.inf if not math.isfinite(v) else -300.0)


def law_summary(laws):
    """Mean law over the run and the final law, as strings."""
    if not laws:
        return "", ""
    k = len(laws[0])
    mean = [statistics.mean(l[i] for l in laws) for i in range(k)]
    return " ".join(f"{v:.3f}" for v in mean), " ".join(f"{v:.3f}" for v in laws[-1])


def main(argv=None):
    ap = bench_parser(__doc__)
    ap.add_argument("--problems", default="quadratic,digits")
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--law-lrs", default="0.01,0.1", help="RLLC law_lr (c2) values, each reported as its own row")
    ap.add_argument("--dim", type=int, default=200)
    ap.add_argument("--cond", type=float, default=1e4)
    ap.add_argument("--steps", type=int, default=1000, help="quadratic steps")
    ap.add_argument("--quad-lr-mults", default="0.3,1,2,3,3.7", help="quadratic lr grid, multiples of 1/L")
    ap.add_argument("--epochs", type=int, default=15, help="digits epochs")
    ap.add_argument("--digits-lrs", default="0.01,0.03,0.1,0.3", help="digits lr grid (AMSGD: x10)")
    ap.add_argument("--batch", type=int, default=64)
    args = parse_bench_args(ap, argv)
    torch.set_num_threads(args.threads)
    if args.quick:
        args.seeds, args.law_lrs, args.dim, args.steps, args.quad_lr_mults = 1, "0.01", 20, 30, "1"
        args.epochs, args.digits_lrs = 1, "0.03"
        try:
            import sklearn  # noqa: F401
        except ImportError:
            args.problems = "quadratic"
    problems = args.problems.split(",")
    env = environment(torch.device("cpu"))
    meths = methods([float(v) for v in args.law_lrs.split(",")])
    qgrid = [float(v) for v in args.quad_lr_mults.split(",")]
    dgrid = [float(v) for v in args.digits_lrs.split(",")]
    seeds = list(range(args.seeds))
    runs, rows = {}, []

    total = len(meths) * len(seeds) * (len(qgrid) * ("quadratic" in problems) + len(dgrid) * args.epochs * ("digits" in problems))
    bar = progress(total=total, desc="rllc bench")

    if "quadratic" in problems:
        probs = {s: make_problem(args.dim, args.cond, seed=s) for s in seeds}
        for name, scale, factory in meths:
            per_lr = {}
            for m in qgrid:
                res = []
                for s in seeds:
                    a, b, f_star, x0, lmax = probs[s]
                    bar.set_postfix_str(f"quadratic {name} {m:g}/L")
                    r = run_quadratic(probs[s], factory, scale * m / lmax, args.steps)
                    gap0 = r["gaps"][0]
                    r["rel"] = [g / gap0 for g in r["gaps"]]
                    runs[f"quadratic|{name}|lr={scale * m:g}/L|seed={s}"] = dict(rel_gaps=r["rel"], laws=r["laws"])
                    res.append(r)
                    bar.update()
                per_lr[m] = res
            for m, res in per_lr.items():
                finals = [r["rel"][-1] for r in res]
                score = statistics.mean(safe_log10(v) for v in finals)
                mean_law, final_law = law_summary(res[0]["laws"])
                rows.append(dict(problem="quadratic", method=name, lr=f"{scale * m:g}/L", lr_value=scale * m / probs[0][4],
                                 seeds=len(seeds), score=score, metric="mean log10 rel gap",
                                 final_mean=statistics.mean(finals) if all(map(math.isfinite, finals)) else float("inf"),
                                 final_per_seed=" ".join(f"{v:.3g}" for v in finals),
                                 test_acc_mean=float("nan"), test_acc_sd=float("nan"),
                                 law_mean_seed0=mean_law, law_final_seed0=final_law, best=False))
            mark_best(rows, "quadratic", name)

    if "digits" in problems:
        from conv_digits import data

        xtr, ytr, xte, yte = data()
        for name, scale, factory in meths:
            for lr in dgrid:
                hs = []
                for s in seeds:
                    bar.set_postfix_str(f"digits {name} lr={scale * lr:g}")
                    h = run_digits(factory, scale * lr, s, args.epochs, args.batch, xtr, ytr, xte, yte)
                    runs[f"digits|{name}|lr={scale * lr:g}|seed={s}"] = h
                    hs.append(h)
                    bar.update(args.epochs)
                finals = [h["train_loss"][-1] for h in hs]
                accs = [h["test_acc"][-1] for h in hs]
                mean_law, final_law = law_summary(hs[0]["laws"])
                fin = statistics.mean(finals) if all(map(math.isfinite, finals)) else float("inf")
                rows.append(dict(problem="digits", method=name, lr=f"{scale * lr:g}", lr_value=scale * lr, seeds=len(seeds),
                                 score=fin, metric="mean final train loss", final_mean=fin,
                                 final_per_seed=" ".join(f"{v:.4g}" for v in finals),
                                 test_acc_mean=statistics.mean(accs), test_acc_sd=statistics.pstdev(accs),
                                 law_mean_seed0=mean_law, law_final_seed0=final_law, best=False))
            mark_best(rows, "digits", name)
    bar.close()

    nonempty = {key: {k: v for k, v in r.items() if not (isinstance(v, list) and not v)} for key, r in runs.items()}
    write_results("conv_rllc", rows, env, args.out_dir,
                  extra=dict(settings=vars(args), runs=thinned(nonempty)))
    print_table(rows, env, args)
    plot(rows, runs, problems, meths, args, env, Path(args.out_dir) / "conv_rllc.png")
    return rows


def mark_best(rows, problem, name):
    mine = [r for r in rows if r["problem"] == problem and r["method"] == name]
    best = min(mine, key=lambda r: r["score"] if math.isfinite(r["score"]) else math.inf)
    best["best"] = True


def print_table(rows, env, args):
    print(f"\nRLLC bench, {args.seeds} seeds; {env['device']}; load {env['load_before']}")
    for problem in ("quadratic", "digits"):
        best = [r for r in rows if r["problem"] == problem and r["best"]]
        if not best:
            continue
        print(f"\n{problem}: best lr per method ({best[0]['metric']})")
        for r in best:
            acc = f" test acc {r['test_acc_mean']:.4f}+-{r['test_acc_sd']:.4f}" if problem == "digits" else ""
            print(f"  {r['method']:34s} lr {r['lr']:>7s}  final {r['final_mean']:.3g} ({r['final_per_seed']}){acc}  "
                  f"law mean [{r['law_mean_seed0']}] final [{r['law_final_seed0']}]")


def plot(rows, runs, problems, meths, args, env, path):
    pyplot = plt()
    problems = [p for p in ("quadratic", "digits") if p in problems]
    fig, axes = pyplot.subplots(len(problems), 2 + len(RLLC_MEMORIES), figsize=(5.2 * (2 + len(RLLC_MEMORIES)), 4.2 * len(problems)),
                                squeeze=False)
    names = [m[0] for m in meths]
    cmap = pyplot.get_cmap("tab10")
    color = {n: cmap(i % 10) for i, n in enumerate(names)}
    for i, problem in enumerate(problems):
        best = {r["method"]: r for r in rows if r["problem"] == problem and r["best"]}
        ax = axes[i][0]
        for n in names:
            r = best[n]
            key = f"{problem}|{n}|lr={r['lr']}" + ("" if problem == "digits" else "")
            style = "-" if n.startswith("RLLC") else "--"
            if problem == "quadratic":
                curves = [runs[f"{key}|seed={s}"]["rel_gaps"] for s in range(args.seeds)]
                ax.semilogy([max(v, 1e-300) for v in curves[0]], style, color=color[n], lw=1.2, label=f"{n} ({r['lr']})")
            else:
                curves = [runs[f"{key}|seed={s}"]["train_loss"] for s in range(args.seeds)]
                mean = [statistics.mean(c[e] for c in curves) for e in range(len(curves[0]))]
                ax.semilogy(range(1, len(mean) + 1), mean, style, color=color[n], lw=1.2, label=f"{n} ({r['lr']})")
        ax.set_title(f"{problem}: each method at its best lr" + (" (seed 0)" if problem == "quadratic" else " (mean of seeds)"))
        ax.set_xlabel("step" if problem == "quadratic" else "epoch")
        ax.set_ylabel("(f - f*) / (f0 - f*)" if problem == "quadratic" else "train loss")
        if problem == "quadratic":
            ax.set_ylim(1e-16, 10)
        ax.legend(fontsize=6)
        # the law over time, one panel per memory, each RLLC row at its best lr, seed 0
        for j, mem in enumerate(RLLC_MEMORIES):
            lx = axes[i][1 + j]
            for n in names:
                if not n.startswith(f"RLLC {mem} "):
                    continue
                r = best[n]
                laws = runs[f"{problem}|{n}|lr={r['lr']}|seed=0"]["laws"]
                c2 = n.split("c2=")[1]
                for u, unit in enumerate(UNIT_NAMES[mem]):
                    lx.plot([l[u] for l in laws], color=cmap(u), lw=1, ls="-" if c2 == args.law_lrs.split(",")[0] else ":",
                            label=f"{unit}, c2={c2}")
            lx.set_title(f"{problem}: law of {mem} (best lr, seed 0)", fontsize=9)
            lx.set_xlabel("step")
            lx.axhline(0, color="k", lw=0.5)
            lx.legend(fontsize=6)
        # sensitivity to the lr grid
        sx = axes[i][-1]
        for n in names:
            pts = [(r["lr_value"], r["final_mean"]) for r in rows if r["problem"] == problem and r["method"] == n]
            pts = [(x, y if math.isfinite(y) else 1e3) for x, y in pts]
            sx.loglog(*zip(*pts), "o-" if n.startswith("RLLC") else "s--", color=color[n], ms=3, lw=1)
        sx.set_title(f"{problem}: final {'rel gap' if problem == 'quadratic' else 'train loss'} vs lr (1e3 = diverged)", fontsize=9)
        sx.set_xlabel("lr")
        for a in axes[i]:
            a.grid(alpha=0.3)
    save_figure(fig, f"RLLC vs momentum SGD / Nesterov / AMSGD ({args.seeds} seeds)", env, path, dpi=100)


if __name__ == "__main__":
    main()

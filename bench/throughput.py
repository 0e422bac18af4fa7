"""Throughput of optimizer.step(): AMAdamW / AMSGD (every available backend) beside torch.optim.AdamW and
SGD(momentum) (foreach and fused), on one flat tensor and on a LLaMA-shaped list of ~200-300 tensors.

    python bench/throughput.py            # CPU: sizes 1e5..16M (a few minutes); GPU: 1e5..1e9 or memory
    python bench/throughput.py --max-size 1e11   # on to the largest size that fits in memory
    python bench/throughput.py --quick    # tiny sizes, seconds

Reports ms/step, effective GB/s, the fraction of the device's copy bandwidth (a large float32 copy,
bytes read + written over time, measured in the same run) and the ratio to torch AdamW (fused where it
runs). Writes bench/results/throughput_<device>.{csv,json,png}.

Bytes a step must move per float32 parameter (the floor any implementation pays; reads + writes):
  AdamW          28 = read g, m, v, x (16) + write m, v, x (12)                 (one pass)
  SGD momentum   20 = read g, buf, x (12) + write buf, x (8)                     (one pass)
  AMAdamW        40 = pass 1 (the global sums) reads g, d, v (12) + pass 2 as AdamW (28);
                 44 with weight decay: pass 1 also reads x (the <d - g, x> and mu x terms)
  AMSGD          28 = pass 1 reads g, d (8) + pass 2 reads g, d, x, writes d, x (20)  (no weight decay)
  RLLC (k units) 4 (4 + 3k) = pass 1 (Gram M^T M and M^T g) reads g, M (4 + 4k) + pass 2 reads g, M, x and
                 writes M, x (12 + 8k): 40 for the default memory M(0.9)+M(0) (k = 2), 52 for k = 3
A scope's sums must finish before its update, so the AM step is two passes; with one global beta
both run over the whole model. The CPU step with per-tensor betas (AMAdamW's default) runs scope
batch by scope batch, and its pass 2 reads what pass 1 read from cache (NOTE [scope batches] in
csrc/cpu/step_driver_cpu.cpp): it can beat these floors, which the GB/s column still counts.
"""
from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from common import RESULTS, copy_bandwidth, device_tag, environment, footer, llama_shapes, plt, progress, time_fn, write_results  # noqa: E402

from amm_kernels import AMSGD, AMAdamW, available_backends  # noqa: E402
from amm_kernels.rllc import RLLC, rllc_backends  # noqa: E402

WD = 0.01  # AdamW and AMAdamW run with weight decay (AMAdamW: 44 B/param) and, as "wd=0" rows, without (40)
# The rows each family's ratio_to_baseline divides by (issue 3's bars: AMAdamW against fused AdamW at the
# same weight decay, AMSGD against fused SGD with momentum); foreach stands in where fused cannot run, but
# for the wd=0 rows (foreach runs at weight decay 0.01 only: no ratio rather than one against another decay).
BASELINES = {"adamw": ("AdamW fused", "AdamW foreach"), "adamw0": ("AdamW fused wd=0",),
             "sgd": ("SGD-momentum fused", "SGD-momentum foreach"), "rllc": ("SGD-momentum fused", "SGD-momentum foreach")}


def cases(device: torch.device):
    """(name, family, bytes per param, factory). Factories raise if a variant cannot run here."""
    out = []
    for b in available_backends(device):
        out.append((f"AMAdamW[{b}]", "adamw", 44, lambda p, b=b: AMAdamW(p, lr=1e-3, weight_decay=WD, backend=b)))
    out += [
        ("AdamW fused", "adamw", 28, lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=WD, fused=True)),
        ("AdamW foreach", "adamw", 28, lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=WD, foreach=True)),
    ]
    for b in available_backends(device):
        if b != "torch":  # the reference moves the same tensors with or without decay
            out.append((f"AMAdamW[{b}] wd=0", "adamw0", 40, lambda p, b=b: AMAdamW(p, lr=1e-3, weight_decay=0.0, backend=b)))
    out.append(("AdamW fused wd=0", "adamw0", 28, lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.0, fused=True)))
    for b in available_backends(device):
        out.append((f"AMSGD[{b}]", "sgd", 28, lambda p, b=b: AMSGD(p, lr=1e-2, backend=b)))
    out += [
        ("SGD-momentum fused", "sgd", 20, lambda p: torch.optim.SGD(p, lr=1e-2, momentum=0.9, fused=True)),
        ("SGD-momentum foreach", "sgd", 20, lambda p: torch.optim.SGD(p, lr=1e-2, momentum=0.9, foreach=True)),
    ]
    for mem, k in (("M(0.9)+M(0)", 2), ("M(0.9)+M(0.8)+M(0.7)", 3)):
        for b in rllc_backends(device):
            out.append((f"RLLC k={k}[{b}]", "rllc", 4 * (4 + 3 * k), lambda p, b=b, mem=mem: RLLC(p, lr=1e-2, memory=mem, backend=b)))
    return out


def baseline_of(measured: dict, family: str) -> tuple[str, float]:
    """The family's baseline row that ran in the same size and layout, and its time ("", NaN if none)."""
    for name in BASELINES[family]:
        ms = measured.get(name)
        if ms is not None and ms == ms:
            return name, ms
    return "", float("nan")


def model_shapes(target: int, layers: int = 24) -> list[tuple[int, ...]]:
    """LLaMA-style shapes (vocab = 8 d, 24 layers = 219 tensors) with d (a multiple of 8) giving ~target params."""
    best = None
    for d in range(8, 16384, 8):
        shapes = llama_shapes(d, layers, vocab=8 * d)
        n = sum(torch.Size(s).numel() for s in shapes)
        if best is None or abs(n - target) < abs(best[0] - target):
            best = (n, shapes)
        if n > target:
            break
    return best[1]


def make_params(shapes, device, seed=0):
    gen = torch.Generator(device=device).manual_seed(seed)
    params = []
    for s in shapes:
        p = torch.randn(s, device=device, generator=gen).requires_grad_()
        p.grad = torch.randn(s, device=device, generator=gen).mul_(1e-2)
        params.append(p)
    return params


def free(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes, a few repeats (smoke test)")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    ap.add_argument("--sizes", default=None, help="comma-separated parameter counts, e.g. 1e5,1e6")
    ap.add_argument("--max-size", type=float, default=None, help="largest size (default 16M on CPU, 1e9 on GPU; the ladder goes on to 1e11 where memory allows)")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (on a shared machine 1 gives steadier numbers than oversubscribed cores)")
    ap.add_argument("--only", default=None,
                    help="comma-separated substrings: run only the optimizers whose names contain one, e.g. "
                         "'RLLC,fused', and the baselines they are compared to (the results then go to "
                         "throughput_<device>_<stem-suffix>)")
    ap.add_argument("--stem-suffix", default=None, help="appended to the result files' stem (default: 'only' when --only)")
    ap.add_argument("--layouts", default="flat,model", help="comma-separated: flat (one tensor), model (LLaMA-shaped list)")
    ap.add_argument("--out-dir", default=str(RESULTS))
    ap.add_argument("--replot", default=None, metavar="JSON",
                    help="measure nothing: draw the PNG again from a results JSON this script wrote (beside it)")
    args = ap.parse_args(argv)
    if args.replot:
        import json

        data = json.load(open(args.replot))
        png = Path(args.replot).with_suffix(".png")
        plot(data["rows"], data["environment"], data["copy_gbs"], png)
        print(f"wrote {png}")
        return data["rows"]
    layouts = [x.strip() for x in args.layouts.split(",") if x.strip()]
    if not layouts or set(layouts) - {"flat", "model"}:
        ap.error(f"--layouts takes flat and/or model, got {args.layouts!r}")
    if args.quick and not args.threads:
        args.threads = 1
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.sizes:
        sizes = [int(float(s)) for s in args.sizes.split(",")]
    elif args.quick:
        sizes = [20_000]
    else:
        cap = args.max_size or (1e9 if device.type == "cuda" else 16e6)
        if device.type == "cuda":  # ~16 B/param of state + grads, plus temporaries of the reference: keep 4x slack
            cap = min(cap, torch.cuda.mem_get_info(device)[0] / (16 * 4))
        # past 1e9 only with --max-size: the whole ladder to 1e9 takes ~4 min of an H200 (2026-11-29), and a
        # GPU session has 15 min in all; `--max-size 1e11` runs up to the largest size that fits (the cap above)
        ladder = [1e5, 1e6, 4e6, 16e6, 1e8, 3e8, 1e9, 3e9, 1e10, 3e10, 1e11]
        sizes = [int(s) for s in ladder if s <= cap]
    repeats = args.repeats or (2 if args.quick else (50 if device.type == "cuda" else 10))

    env = environment(device)
    copy_numel = 10_000 if args.quick else (256 << 20 if device.type == "cuda" else 32 << 20)
    copy_gbs = copy_bandwidth(device, copy_numel)
    print(f"{env['device']}: copy bandwidth {copy_gbs:.1f} GB/s ({copy_numel * 8 / 1e6:.0f} MB moved per copy); "
          f"load {env['load_before']}", flush=True)

    all_cases = cases(device)
    if args.only:
        keys = [k.strip() for k in args.only.split(",") if k.strip()]
        picked = {c[0] for c in all_cases if any(k in c[0] for k in keys)}
        # and the baselines their ratios divide by
        n_base = 1 if device.type == "cuda" else 2  # fused runs on CUDA: no foreach stand-in needed
        picked |= {b for c in all_cases if c[0] in picked for b in BASELINES[c[1]][:n_base] + BASELINES["adamw"][:n_base]}
        all_cases = [c for c in all_cases if c[0] in picked]
        if not all_cases:
            print(f"throughput: no optimizer here matches --only {args.only!r}; available: "
                  f"{', '.join(c[0] for c in cases(device))}")
            return []
    tag = device_tag(device)
    suffix = args.stem_suffix or ("only" if args.only else "")
    if suffix:
        tag = f"{tag}_{suffix}"
    out = Path(args.out_dir)
    rows = []
    jobs = [(layout, n) for n in sizes for layout in layouts]
    bar = progress(total=len(jobs) * len(all_cases), desc="throughput")
    print_header(env)
    for layout, n in jobs:
        shapes = [(n,)] if layout == "flat" else model_shapes(n, layers=2 if args.quick else 24)
        numel = sum(torch.Size(s).numel() for s in shapes)
        measured = {}
        for name, family, bpp, factory in all_cases:
            bar.set_postfix_str(f"{layout} {numel:.1e} {name}")
            try:
                params = make_params(shapes, device)
                opt = factory(params)
                ms = time_fn(opt.step, device, warmup=1 if args.quick else 3,
                             repeats=repeats if "[torch]" not in name else max(2, repeats // 2))
                status = "ok"
            except torch.OutOfMemoryError:
                ms, status = float("nan"), "oom"
            except Exception as err:  # noqa: BLE001 - a variant that does not run here (triton's CompilationError too)
                ms, status = float("nan"), f"unsupported: {str(err).splitlines()[0][:80]}"
            finally:
                params = opt = None
                free(device)
            measured[name] = ms
            gbs = bpp * numel / (ms * 1e-3) / 1e9 if ms == ms else float("nan")
            rows.append(dict(layout=layout, numel=numel, tensors=len(shapes), optimizer=name, family=family,
                             bytes_per_param=bpp, ms_per_step=round(ms, 4), effective_gbs=round(gbs, 2),
                             frac_of_copy_bw=round(gbs / copy_gbs, 3), copy_gbs=round(copy_gbs, 1), status=status))
            bar.update()
        _, adamw = baseline_of(measured, "adamw")
        for row in rows[-len(all_cases):]:
            row["ratio_to_adamw"] = round(row["ms_per_step"] / adamw, 3) if adamw == adamw else float("nan")
            row["baseline"], base = baseline_of(measured, row["family"])
            row["ratio_to_baseline"] = round(row["ms_per_step"] / base, 3) if base == base else float("nan")
            print_row(row)
        # after every size: a run stopped by a time limit still leaves what it measured
        csv_path, _ = write_results(f"throughput_{tag}", rows, env, out, extra=dict(copy_gbs=copy_gbs))
        png = out / f"throughput_{tag}.png"
        plot(rows, env, copy_gbs, png)  # likewise the PNG
    bar.close()

    print(f"wrote {csv_path} and {png}")
    return rows


def print_header(env):
    print(f"\n{env['device']} | torch {env['torch']} | triton {env['triton']} | load {env['load_before']}")
    print(f"{'layout':6s} {'params':>10s} {'optimizer':22s} {'ms/step':>9s} {'GB/s':>8s} {'of copy':>8s} "
          f"{'vs AdamW':>9s} {'vs baseline':>12s}", flush=True)


def print_row(r):
    print(f"{r['layout']:6s} {r['numel']:10d} {r['optimizer']:22s} {r['ms_per_step']:9.3f} {r['effective_gbs']:8.1f} "
          f"{r['frac_of_copy_bw']:8.2f} {r['ratio_to_adamw']:8.2f}x {r['ratio_to_baseline']:8.2f}x {r['baseline']}"
          f"{'' if r['status'] == 'ok' else '  ' + r['status']}", flush=True)


# Line style and marker by backend (the name's [..] or fused / foreach), colour by optimizer: with ~20
# rows on a GPU, the default ten-colour cycle gave two optimizers one colour (the first H200 plot).
_STYLE = {"cuda": ("-", "o"), "triton": ("-", "s"), "cpu": ("-", "o"), "torch": (":", "x"),
          "fused": ("--", "^"), "foreach": ("-.", "v")}


def _style(name: str) -> tuple[str, str]:
    for key, style in _STYLE.items():
        if f"[{key}]" in name or f" {key}" in name:
            return style
    return "-", "o"


def plot(rows, env, copy_gbs, path):
    pyplot = plt()
    layouts = [x for x in ("flat", "model") if any(r["layout"] == x for r in rows)]
    fig, axes = pyplot.subplots(1, len(layouts), figsize=(6.5 * len(layouts), 5), sharey=True, squeeze=False)
    axes = axes[0]
    names = list(dict.fromkeys(r["optimizer"] for r in rows))
    cmap = pyplot.get_cmap("tab20")
    colors = {name: cmap(i % 20) for i, name in enumerate(names)}
    for ax, layout in zip(axes, layouts):
        for name in names:
            pts = [(r["numel"], r["effective_gbs"]) for r in rows if r["layout"] == layout and r["optimizer"] == name]
            pts = [p for p in pts if p[1] == p[1]]
            if pts:
                style, marker = _style(name)
                ax.plot(*zip(*pts), style, marker=marker, color=colors[name], label=name)
        ax.axhline(copy_gbs, color="k", lw=0.8, ls=":", label=f"copy {copy_gbs:.0f} GB/s")
        ax.set_xscale("log")
        ax.set_xlabel("parameters")
        tensors = max(r["tensors"] for r in rows if r["layout"] == layout)
        ax.set_title("one flat tensor" if layout == "flat" else f"LLaMA-shaped list ({tensors} tensors)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("effective GB/s (bytes the step must move / time)")
    axes[-1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0))  # beside the plots, not over them
    fig.suptitle(f"optimizer.step() throughput\n{footer(env)}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    pyplot.close(fig)


if __name__ == "__main__":
    # nothing measured (--only matched nothing, or every case was out of memory or unsupported) is a
    # failure: the GPU session would otherwise log a part that measured nothing as passed
    sys.exit(0 if any(r["status"] == "ok" for r in main()) else 1)

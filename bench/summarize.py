"""Prints the latest results in bench/results (or --dir) as Markdown tables, for bench/README.md.

    python bench/summarize.py [--dir bench/results]
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

HERE = Path(__file__).resolve().parent


def fmt(v, spec=".3g"):
    try:
        f = float(v)
    except (TypeError, ValueError):
        return str(v)
    if math.isnan(f):
        return "-"
    return format(f, spec)


def header(env):
    return (f"*{env['device']}; torch {env['torch']}, triton {env.get('triton', '?')}; {env['date']}; "
            f"load average (1/5/15 min) {env['load_before']} before, {env.get('load_after', '?')} after.*\n")


def table(cols, rows):
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out) + "\n"


def throughput(path):
    d = json.loads(path.read_text())
    rows = d["rows"]
    print(f"### Throughput: {path.stem}\n")
    print(header(d["environment"]))
    print(f"Copy bandwidth measured in the same run: {d['copy_gbs']:.1f} GB/s.\n")
    for layout in ("flat", "model"):
        at = [r for r in rows if r["layout"] == layout]
        if not at:
            continue
        sizes = sorted({r["numel"] for r in at})
        names = list(dict.fromkeys(r["optimizer"] for r in at))
        tensors = max(r["tensors"] for r in at)
        # ratio_to_baseline (newer runs): each family against its own baseline, named in the row
        key = "ratio_to_baseline" if all("ratio_to_baseline" in r for r in at) else "ratio_to_adamw"
        against = ("x its baseline: AdamW fused (wd=0 rows: AdamW fused wd=0), SGD-momentum fused for AMSGD "
                   "and RLLC" if key == "ratio_to_baseline" else "x AdamW-fused time")
        print(f"{'One flat tensor' if layout == 'flat' else f'LLaMA-shaped list ({tensors} tensors at the largest size)'}: "
              f"ms/step (effective GB/s, fraction of copy bandwidth, {against})\n")
        cells = []
        for name in names:
            line = [name]
            for n in sizes:
                r = next((r for r in at if r["optimizer"] == name and r["numel"] == n), None)
                line.append("-" if r is None or r["status"] != "ok" else
                            f"{fmt(r['ms_per_step'])} ({fmt(r['effective_gbs'], '.1f')}, "
                            f"{fmt(r['frac_of_copy_bw'], '.2f')}, {fmt(r[key], '.2f')}x)")
            cells.append(line)
        print(table(["optimizer"] + [f"{n:.2g}" for n in sizes], cells))


def simple(path, cols, title):
    d = json.loads(path.read_text())
    print(f"### {title}\n")
    print(header(d["environment"]))
    print(table(cols, [[fmt(r.get(c)) if isinstance(r.get(c), float) else r.get(c) for c in cols] for r in d["rows"]]))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default=str(HERE / "results"))
    args = ap.parse_args(argv)
    res = Path(args.dir)
    for p in sorted(res.glob("throughput_*.json")):
        throughput(p)
    for p in sorted(res.glob("train_step_overhead_*.json")):
        simple(p, ["optimizer", "params", "tokens", "ms_per_train_step", "ms_fwd_bwd", "ms_step_minus_fwd_bwd", "ratio_to_adamw_fused"], f"Training step: {p.stem}")
    if (res / "conv_quadratic.json").exists():
        simple(res / "conv_quadratic.json", ["lr_mult", "method", "rel_final_gap", "steps_to_tol", "mean_beta"], "Quadratic (Fig. 1)")
    if (res / "conv_logistic.json").exists():
        simple(res / "conv_logistic.json", ["dataset", "method", "final_loss", "gap_final", "loss_at_100", "best_fixed", "mean_beta"], "Logistic regression (Fig. 3)")
    if (res / "conv_digits.json").exists():
        simple(res / "conv_digits.json", ["lr", "optimizer", "train_loss_final_mean", "train_loss_final_sd", "test_acc_final_mean",
                                          "test_acc_final_sd", "beta_mean", "beta_frac_at_max", "beta_frac_at_zero"], "Digits CNN (Fig. 4)")
    if (res / "conv_lm.json").exists():
        simple(res / "conv_lm.json", ["config", "seeds", "steps", "val_loss_final_mean", "val_loss_final_sd", "val_loss_quarter_mean",
                                      "val_loss_min_mean", "beta_mean", "seconds_per_run"], "Byte-level LM (Fig. 5)")


if __name__ == "__main__":
    main()

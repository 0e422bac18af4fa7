"""The CUDA step's two variants by size: the persistent step (one cooperative launch, tiles kept in
shared memory) against the two-pass step (three launches), to set where "auto" switches between
them (NOTE [step variant] in csrc/cuda/ops_cuda.cpp, kPersistentMaxNumel).

    python bench/bench_cuda_variants.py            # GPU only: sizes 1e4 .. 6.4e7, a few minutes
    python bench/bench_cuda_variants.py --quick    # three sizes

For AMAdamW (weight_decay 0.01: 44 B/param over two passes) and AMSGD (28 B/param), on LLaMA-shaped
lists of 111 tensors (one TensorTable, so the persistent step can run), times each variant
two ways: the eager optimizer.step() (what a training loop pays, Python included) and the replay of
the step captured in a CUDA graph (capturable=True: the GPU time alone, no launch overhead from
Python). Variants: two_pass; persistent with the largest tile cache; persistent with no cache (the
launch-count effect alone). Reports ms, effective GB/s (bytes of the two-pass step over time) and
the fraction of the copy bandwidth measured in the same run; prints the largest size at which the
persistent step is still faster (graph replay), the value to give kPersistentMaxNumel.
Writes bench/results/cuda_variants_<device>.{csv,json}.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from common import RESULTS, copy_bandwidth, device_tag, environment, progress, time_fn, write_results  # noqa: E402
from throughput import free, make_params, model_shapes  # noqa: E402

from amm_kernels import AMSGD, AMAdamW, available_backends  # noqa: E402

VARIANTS = [("two_pass", None), ("persistent", None), ("persistent-nocache", "0")]
OPTIMIZERS = [  # (name, bytes per param of the two-pass step, factory)
    ("AMAdamW", 44, lambda p: AMAdamW(p, lr=torch.tensor(1e-3, device="cuda"), weight_decay=0.01, backend="cuda",
                                      capturable=True)),
    ("AMSGD", 28, lambda p: AMSGD(p, lr=torch.tensor(1e-2, device="cuda"), backend="cuda", capturable=True)),
]


def set_variant(variant: str, cache: str | None):
    os.environ["AMM_CUDA_STEP"] = variant.split("-")[0]
    if cache is None:
        os.environ.pop("AMM_CUDA_PERSISTENT_CACHE", None)
    else:
        os.environ["AMM_CUDA_PERSISTENT_CACHE"] = cache


def graph_of(opt) -> torch.cuda.CUDAGraph:
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            opt.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    return graph


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="three sizes")
    ap.add_argument("--sizes", default=None, help="comma-separated parameter counts")
    ap.add_argument("--out-dir", default=str(RESULTS))
    args = ap.parse_args(argv)
    if not torch.cuda.is_available() or "cuda" not in available_backends("cuda"):
        print("bench_cuda_variants: needs a CUDA device and amm_kernels' CUDA kernels; nothing to measure here")
        return []
    device = torch.device("cuda")
    if args.sizes:
        sizes = [int(float(s)) for s in args.sizes.split(",")]
    else:
        sizes = [1e5, 1e6, 4e6] if args.quick else [3e4, 1e5, 3e5, 1e6, 2e6, 4e6, 8e6, 16e6, 64e6]  # 1e4 gives the same 22728-parameter list as 3e4
    env = environment(device)
    copy_gbs = copy_bandwidth(device, 256 << 20)
    print(f"{env['device']}: copy bandwidth {copy_gbs:.1f} GB/s", flush=True)
    rows = []
    bar = progress(total=len(sizes) * len(OPTIMIZERS) * len(VARIANTS), desc="cuda variants")
    for n in sizes:
        shapes = model_shapes(int(n), layers=12)  # 111 tensors: one TensorTable
        numel = sum(torch.Size(s).numel() for s in shapes)
        for name, bpp, factory in OPTIMIZERS:
            for variant, cache in VARIANTS:
                bar.set_postfix_str(f"{numel:.1e} {name} {variant}")
                set_variant(variant, cache)
                row = dict(numel=numel, tensors=len(shapes), optimizer=name, variant=variant, bytes_per_param=bpp)
                try:
                    params = make_params(shapes, device)
                    opt = factory(params)
                    row["eager_ms"] = round(time_fn(opt.step, device), 4)
                    graph = graph_of(opt)
                    row["graph_ms"] = round(time_fn(graph.replay, device, host_time=False), 4)
                    row["status"] = "ok"
                except (RuntimeError, torch.OutOfMemoryError) as err:
                    row.update(eager_ms=row.get("eager_ms", float("nan")), graph_ms=float("nan"),
                               status=f"failed: {str(err).splitlines()[0][:100]}")
                finally:
                    params = opt = graph = None
                    free(device)
                ms = row["graph_ms"]
                row["graph_gbs"] = round(bpp * numel / (ms * 1e-3) / 1e9, 2) if ms == ms else float("nan")
                row["frac_of_copy_bw"] = round(row["graph_gbs"] / copy_gbs, 3) if ms == ms else float("nan")
                rows.append(row)
                bar.update()
        # after every size: a run stopped at its time limit still leaves what it measured
        threshold = suggested_threshold(rows)
        csv_path, _ = write_results(f"cuda_variants_{device_tag(device)}", rows, env, Path(args.out_dir),
                                    extra=dict(copy_gbs=copy_gbs, suggested_persistent_max_numel=threshold))
    bar.close()
    set_variant("auto", None)
    print(f"{'numel':>10} {'optimizer':>8} {'variant':>19} {'eager ms':>9} {'graph ms':>9} {'GB/s':>8} {'of copy':>7}")
    for r in rows:
        print(f"{r['numel']:>10} {r['optimizer']:>8} {r['variant']:>19} {r['eager_ms']:>9} {r['graph_ms']:>9} "
              f"{r['graph_gbs']:>8} {r['frac_of_copy_bw']:>7}  {r['status'] if r['status'] != 'ok' else ''}")
    print(f"largest size at which the persistent step is faster in graph replay, for both optimizers: {threshold}")
    print(f"wrote {csv_path}")
    return rows


def suggested_threshold(rows) -> int:
    """The largest numel up to which the best persistent variant beats two_pass for every optimizer."""
    best = 0
    for n in sorted({r["numel"] for r in rows}):
        at_n = [r for r in rows if r["numel"] == n and r["status"] == "ok"]
        wins = []
        for name in {r["optimizer"] for r in at_n}:
            two = [r["graph_ms"] for r in at_n if r["optimizer"] == name and r["variant"] == "two_pass"]
            one = [r["graph_ms"] for r in at_n if r["optimizer"] == name and r["variant"] != "two_pass"]
            wins.append(bool(two and one and min(one) < two[0]))
        if wins and all(wins):
            best = n
        else:
            break
    return best


if __name__ == "__main__":
    main()

"""Memory of a step: what each optimizer and backend holds beyond the parameters and gradients, and what
one steady step allocates on top, beside torch's AdamW and SGD in the same run.

    python bench/step_memory.py                    # the CPU; on a GPU machine: --device cuda
    python bench/step_memory.py --dtype bfloat16

A LLaMA-shaped list of tensors (bench/common.llama_shapes: 29.9M parameters in 75 tensors; --quick:
0.17M). For each optimizer: its state's bytes (the storages of the tensors in opt.state), what it held
after two steps beyond the parameters and gradients (state, scope rows, cached tables, workspaces), and
the peak bytes the third step allocated above where it began, with the bytes it left behind (0: nothing
accumulates). All through torch's allocators (`allocated_while` below): on the CPU the profiler's memory
events, which see every allocation of torch's CPU allocator inside ops too (not memory a kernel keeps
off that allocator), with fn run on one torch thread (NOTE [memory events on one thread]); on a GPU the
bytes requested of the caching allocator (not its cache, nor its rounding of blocks). The state's bytes
are those of its tensors on the measured device. tests/test_step_memory.py holds the fast backends to a
bound with the same measurement. Writes bench/results/step_memory_<device>[_<dtype>].{csv,json}.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

# bench/common is imported in main(), not here: it turns on flush-to-zero when imported, and the test
# imports allocated_while from this file


def allocated_while(fn, device: torch.device) -> tuple[int, int]:
    """(peak, net) bytes of torch's allocator on `device` while fn() ran: the most held above where it
    stood when fn began, and where it stood when fn ended (negative: fn freed what was there before)."""
    if device.type == "cuda":
        # the bytes asked of the caching allocator, not the blocks it handed out (rounded up to 512 bytes,
        # and a large block unsplit where up to 1 MiB of it is left over): what the tensors hold
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_stats(device)["requested_bytes.all.current"]
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        stats = torch.cuda.memory_stats(device)
        return stats["requested_bytes.all.peak"] - before, stats["requested_bytes.all.current"] - before
    from torch.profiler import ProfilerActivity, profile

    # NOTE [memory events on one thread]: the profiler's state is per thread, and at::parallel_for's
    # worker threads do not carry it: an allocation made in a chunk that runs there is not seen (a probe:
    # two 4 MiB tensors made in a two-chunk parallel_for showed as one). On one torch thread every chunk
    # runs on the calling thread, so fn runs there: all it allocates is seen, the same allocations but
    # for buffers a kernel sizes by its thread count.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
    finally:
        torch.set_num_threads(threads)
    # NOTE [memory events]: prof.events() keeps as "[memory]" events only those outside any op (an
    # allocation inside an op is folded into the op's totals); the kineto events keep each one, with
    # its size signed (a free is negative) and its time
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    now = peak = 0
    for e in events:
        now += e.nbytes()
        peak = max(peak, now)
    return peak, now


def _optimizers(device: torch.device):
    """(name, backend, factory(params) -> optimizer): torch's baselines, then each of ours on each backend
    this machine runs (the Triton one on a GPU only: its interpreter copies every tensor)."""
    import amm_kernels
    from amm_kernels import AMAdamW, AMSGD, RLLC

    rows = []
    for fused in (True, False):
        kind = "fused" if fused else "foreach"
        rows.append((f"AdamW {kind}", "torch.optim",
                     lambda ps, f=fused: torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.01, fused=f, foreach=not f)))
        rows.append((f"SGD-momentum {kind}", "torch.optim",
                     lambda ps, f=fused: torch.optim.SGD(ps, lr=1e-2, momentum=0.9, fused=f, foreach=not f)))
    backends = [b for b in amm_kernels.available_backends(device.type) if b != "auto"]
    if device.type != "cuda" and "triton" in backends:
        backends.remove("triton")
    for backend in backends:
        rows.append(("AMAdamW", backend, lambda ps, b=backend: AMAdamW(ps, lr=1e-3, weight_decay=0.01, backend=b)))
        rows.append(("AMSGD", backend, lambda ps, b=backend: AMSGD(ps, lr=1e-2, backend=b)))
        rows.append(("RLLC", backend, lambda ps, b=backend: RLLC(ps, lr=1e-2, backend=b)))
    return rows


def measure(name, backend, make, shapes, dtype, device) -> dict:
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(device=device, dtype=dtype)) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen).to(device=device, dtype=dtype)
    holder = {}

    def two_steps():
        holder["opt"] = opt = make(params)
        opt.step()
        opt.step()

    _, held = allocated_while(two_steps, device)
    opt = holder["opt"]
    peak, net = allocated_while(opt.step, device)
    param_bytes = sum(p.numel() * p.element_size() for p in params)
    # each storage once: several entries may share one (this package's per-tensor scope stand-ins do); only
    # those on `device`, where `held` is measured (foreach AdamW keeps its "step" counts on the CPU)
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for st in opt.state.values() for t in st.values()
                if torch.is_tensor(t) and t.device.type == device.type}
    state_bytes = sum(storages.values())
    return dict(optimizer=name, backend=backend, dtype=str(dtype).removeprefix("torch."),
                numel=sum(p.numel() for p in params),
                param_bytes=param_bytes, state_bytes=state_bytes, held_bytes=held, held_beyond_state=held - state_bytes,
                step_peak_bytes=peak, step_peak_per_param_bytes=round(peak / param_bytes, 3), step_net_bytes=net)


def main(argv=None) -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import bench_parser, device_tag, environment, llama_shapes, parse_bench_args, pick_device, write_results

    ap = bench_parser(__doc__)
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda where there is one)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = parse_bench_args(ap, argv, threads=None)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    dtype = getattr(torch, args.dtype)
    shapes = llama_shapes(64, 2, 512) if args.quick else llama_shapes(512, 8, 4096)
    env = environment(device)
    rows, mib = [], 2.0 ** -20
    print(f"{'optimizer':22s}{'backend':>12s}{'state MiB':>10s}{'held-state KiB':>16s}{'step peak MiB':>14s}"
          f"{'peak/params':>13s}{'left':>6s}   ({device}, {args.dtype})", flush=True)
    for name, backend, make in _optimizers(device):
        row = measure(name, backend, make, shapes, dtype, device)
        rows.append(row)
        print(f"{name:22s}{backend:>12s}{row['state_bytes'] * mib:10.2f}{row['held_beyond_state'] / 1024:16.1f}"
              f"{row['step_peak_bytes'] * mib:14.3f}{row['step_peak_per_param_bytes']:13.3f}{row['step_net_bytes']:6d}",
              flush=True)
    stem = f"step_memory_{device_tag(device)}" + ("" if args.dtype == "float32" else f"_{args.dtype}")
    paths = write_results(stem, rows, env, args.out_dir)
    print("wrote", *paths)
    return 0


if __name__ == "__main__":
    sys.exit(main())

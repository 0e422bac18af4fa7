"""Shared helpers for the benchmarks in bench/: what machine this is, the options every script takes, how to
time a step, how to write results (CSV + JSON with the hardware named), plotting, a small LLaMA-style model
and its data.

Every script imports this as ``from common import ...`` (bench/ is put on sys.path by the scripts).
"""
from __future__ import annotations

import argparse
import csv
import datetime
import json
import math
import os
import platform
import statistics
import sys
import sysconfig
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

torch.set_flush_denormal(True)  # iterates that converge to machine precision must not slow to a crawl on subnormals

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
ROOT = HERE.parent
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))


# --------------------------------------------------------------------------------------------------
# The machine
# --------------------------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def load_average() -> str:
    """The 1/5/15-minute load average (what `uptime` prints), so results say what load they ran under."""
    try:
        a, b, c = os.getloadavg()
        return f"{a:.2f} {b:.2f} {c:.2f}"
    except OSError:
        return "unknown"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def device_tag(device: torch.device) -> str:
    """A short file-name-safe tag: 'cpu' or e.g. 'nvidia_h100_80gb_hbm3'."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device).lower()
        return "".join(c if c.isalnum() else "_" for c in name).strip("_")
    return "cpu"


def environment(device: torch.device) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # noqa: BLE001 - triton is optional
        triton_version = "none"
    return dict(
        date=datetime.datetime.now().isoformat(timespec="seconds"),
        device=device_name(device),
        device_type=device.type,
        cpu=cpu_model(),
        torch=torch.__version__,
        triton=triton_version,
        cuda=torch.version.cuda or "none",
        threads=torch.get_num_threads(),
        load_before=load_average(),
        python=platform.python_version(),
        # the kernels' settings in force (AMM_CUDA_CHUNK, AMM_CUDA_TABLE_TENSORS, AMM_CPU_BATCH_BYTES, ...):
        # a row measured under a variant says so in its own file
        settings={k: v for k, v in sorted(os.environ.items()) if k.startswith(("AMM_CUDA_", "AMM_CPU_"))},
    )


def pick_device(name: str | None = None) -> torch.device:
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# --------------------------------------------------------------------------------------------------
# The command line
# --------------------------------------------------------------------------------------------------

THREADS_HELP = "torch CPU threads (1: small problems, shared machine)"


def bench_parser(doc: str) -> argparse.ArgumentParser:
    """A script's parser, its options to be added next: the first line of `doc` (the script's docstring)
    as the description, and --quick (tiny sizes, seconds), the option every script takes first."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    return ap


def parse_bench_args(ap: argparse.ArgumentParser, argv=None, threads: int | None = 1, threads_help: str | None = THREADS_HELP):
    """Adds the options every script takes last, --threads (default `threads`) and --out-dir (default
    bench/results), and parses argv. Setting torch's threads is left to the script."""
    ap.add_argument("--threads", type=int, default=threads, help=threads_help)
    ap.add_argument("--out-dir", default=str(RESULTS))
    return ap.parse_args(argv)


# --------------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------------


def last_level_cache_bytes() -> int | None:
    """The CPU's last-level caches, added up over the distinct ones (a chiplet CPU or a second socket has
    several L3s; Linux sysfs), or None where they cannot be read."""
    caches = {}
    for index in Path("/sys/devices/system/cpu").glob("cpu[0-9]*/cache/index*"):
        try:
            level = int((index / "level").read_text())
            text = (index / "size").read_text().strip().upper()
            shared = (index / "shared_cpu_list").read_text().strip()
            scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
            caches[(level, shared)] = int(text.rstrip("KMG")) * scale
        except (OSError, ValueError):
            continue
    if not caches:
        return None
    top = max(level for level, _ in caches)
    return sum(size for (level, _), size in caches.items() if level == top)


_FLUSH_BUFFERS: dict = {}


def flush_caches(device: torch.device) -> None:
    """Passes a buffer larger than the device's caches through them, so the next call finds none of its
    data there: on a GPU writes 256 MiB (as triton's do_bench clears the L2); on a CPU reads twice the
    last-level cache, at least 64 MiB. Reads, there: a write would leave the cache full of dirty lines,
    whose write-back to memory the timed call would then pay (by count, 32 MB at ~30 GB/s: ~1 ms; two
    runs with a write flush on the 2-vCPU VM here did not show it above the noise)."""
    key = str(device)
    if key not in _FLUSH_BUFFERS:
        if device.type == "cpu":
            nbytes = max(64 << 20, 2 * (last_level_cache_bytes() or 0))
        else:
            nbytes = 256 << 20
        _FLUSH_BUFFERS[key] = torch.zeros(nbytes // 4, dtype=torch.int32, device=device)
    if device.type == "cpu":
        _FLUSH_BUFFERS[key].max()
    else:
        _FLUSH_BUFFERS[key].zero_()


# NOTE [cold caches, host time]: each timed call starts with the caches flushed (flush_caches, not timed),
# as a step in training runs after forward and backward have filled them with other data; on a CPU a
# step of 1M parameters (16-18 MB) otherwise runs from the L3 after a warm-up (a review measured fused
# AdamW 0.48 ms warm, 1.06 ms flushed). On a GPU the device is also synchronised after the flush, so
# the start event is passed when the host starts the call, and a host-bound step's whole host time is
# counted. Until 2026-12-01 the GPU path called triton's do_bench, which queues its L2 clear (256 MiB
# of zeros, ~65 us on an H200) and records the start event behind it without synchronising: up to
# that much of each call's host time fell outside its timing, so host-bound steps (below ~1e7
# parameters on the H200) were timed short by up to ~65 us each, every optimizer alike.
def time_fn(fn, device: torch.device, warmup: int = 3, repeats: int = 20, host_time: bool = True) -> float:
    """Median milliseconds of fn() after warm-up, each call from cold caches (NOTE [cold caches, host
    time]). GPU: CUDA events around each call, the device idle when it starts; at least `repeats` calls
    and 100 ms of them (warm-up: at least `warmup` calls and 25 ms). host_time=False (a CUDA graph's
    replay: its device time) queues the call behind the flush instead, without waiting, so its launch
    from the host is not counted. CPU: time.perf_counter around each call."""
    if device.type == "cuda":
        fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        est_ms = max((time.perf_counter() - t0) * 1e3, 1e-3)
        for _ in range(max(warmup, min(1000, int(25.0 / est_ms)))):
            fn()
        n = max(repeats, min(1000, int(100.0 / est_ms)))
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
        for start, end in events:
            flush_caches(device)
            if host_time:
                torch.cuda.synchronize()
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize()
        return statistics.median(start.elapsed_time(end) for start, end in events)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        flush_caches(device)
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def copy_bandwidth(device: torch.device, numel: int, repeats: int = 10) -> float:
    """GB/s of a large float32 copy (bytes read + bytes written over time): the device's practical peak."""
    src = torch.empty(numel, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    ms = time_fn(lambda: dst.copy_(src), device, warmup=2, repeats=repeats)
    return 2 * 4 * numel / (ms * 1e-3) / 1e9


# --------------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------------


def is_finite_number(value) -> bool:
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def rounded(obj, digits: int = 5):
    """obj with every float rounded to `digits` significant digits (keeps the JSON curves small)."""
    if isinstance(obj, float):
        return float(f"{obj:.{digits}g}") if math.isfinite(obj) else obj
    if isinstance(obj, dict):
        return {k: rounded(v, digits) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [rounded(v, digits) for v in obj]
    return obj


def thinned(curves: dict, points: int = 300) -> dict:
    """Each list in {name: {key: list}} kept at about `points` evenly spaced entries plus the last one,
    with the stride recorded, so the JSON stays small; the PNG is drawn from the full curves."""
    out = {}
    for name, c in curves.items():
        n = max((len(v) for v in c.values() if isinstance(v, list)), default=0)
        stride = max(1, n // points)
        out[name] = {k: (v[::stride] + ([v[-1]] if (len(v) - 1) % stride else []) if isinstance(v, list) else v)
                     for k, v in c.items()}
        out[name]["stride"] = stride
    return out


def write_results(stem: str, rows: list[dict], env: dict, out_dir: Path | str | None = None, extra: dict | None = None):
    """Writes <out_dir>/<stem>.csv (one row per measurement, environment columns included) and
    <out_dir>/<stem>.json ({"environment": ..., "rows": [...], **extra}). Returns the two paths."""
    out = Path(out_dir or RESULTS)
    out.mkdir(parents=True, exist_ok=True)
    env = dict(env, load_after=load_average())
    csv_path, json_path = out / f"{stem}.csv", out / f"{stem}.json"
    keys: list[str] = []
    for row in rows:
        keys += [k for k in row if k not in keys]
    env_keys = ["date", "device", "torch", "triton", "cuda", "load_before", "load_after"]
    # each file written whole, then renamed over the last: scripts rewrite their results as they go,
    # and one stopped mid-write (gpu_session.sh's SIGINT, then SIGKILL) must leave the last good copy
    tmp = csv_path.with_name(csv_path.name + ".tmp")
    with open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=keys + env_keys)
        writer.writeheader()
        for row in rows:
            writer.writerow({**row, **{k: env.get(k, "") for k in env_keys}})
    os.replace(tmp, csv_path)
    tmp = json_path.with_name(json_path.name + ".tmp")
    with open(tmp, "w") as fh:
        json.dump({"environment": env, "rows": rows, **rounded(extra or {})}, fh, default=float)
    os.replace(tmp, json_path)
    return csv_path, json_path


def plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as pyplot

    return pyplot


def footer(env: dict) -> str:
    return f"{env['device']} | torch {env['torch']} | load {env['load_before']} | {env['date']}"


def save_figure(fig, title: str, env: dict, path, dpi: int = 110):
    """Titles fig with `title` above the footer line (machine, torch, load, date), lays it out, writes it
    to `path` and closes it."""
    fig.suptitle(f"{title}\n{footer(env)}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt().close(fig)


def progress(iterable=None, **kw):
    from tqdm.auto import tqdm

    return tqdm(iterable, dynamic_ncols=True, mininterval=0.5, **kw)


# --------------------------------------------------------------------------------------------------
# A small LLaMA-style causal LM (RMSNorm, rotary attention, SwiGLU MLP, untied head) and its data
# --------------------------------------------------------------------------------------------------


def llama_shapes(d_model: int, n_layers: int, vocab: int, ffn: int | None = None) -> list[tuple[int, ...]]:
    """Parameter shapes of a LLaMA-style transformer, in model order (for throughput benchmarks)."""
    ffn = ffn or int(8 * d_model / 3 / 64 + 1) * 64
    shapes: list[tuple[int, ...]] = [(vocab, d_model)]
    for _ in range(n_layers):
        shapes += [(d_model,), (d_model, d_model), (d_model, d_model), (d_model, d_model), (d_model, d_model),
                   (d_model,), (ffn, d_model), (ffn, d_model), (d_model, ffn)]
    shapes += [(d_model,), (vocab, d_model)]
    return shapes


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rotary(x, cos, sin):
    x1, x2 = x[..., ::2], x[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)


class Block(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        ffn = int(8 * d / 3 / 16 + 1) * 16
        self.norm1, self.norm2 = RMSNorm(d), RMSNorm(d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d, bias=False) for _ in range(4))
        self.gate, self.up, self.down = nn.Linear(d, ffn, bias=False), nn.Linear(d, ffn, bias=False), nn.Linear(ffn, d, bias=False)

    def forward(self, x, cos, sin):
        b, t, d = x.shape
        h = self.norm1(x)
        q, k, v = (lin(h).view(b, t, self.heads, d // self.heads).transpose(1, 2) for lin in (self.q, self.k, self.v))
        q, k = rotary(q, cos, sin), rotary(k, cos, sin)
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o(att.transpose(1, 2).reshape(b, t, d))
        h = self.norm2(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


class TinyLlama(nn.Module):
    def __init__(self, vocab: int = 256, d: int = 128, layers: int = 2, heads: int = 4, ctx: int = 128):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.norm = RMSNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        hd = d // heads
        inv = 1.0 / (10000 ** (torch.arange(0, hd, 2).float() / hd))
        ang = torch.outer(torch.arange(ctx).float(), inv)
        self.register_buffer("cos", ang.cos(), persistent=False)
        self.register_buffer("sin", ang.sin(), persistent=False)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)

    def forward(self, idx):
        t = idx.shape[1]
        x = self.embed(idx)
        for blk in self.blocks:
            x = blk(x, self.cos[:t], self.sin[:t])
        return self.head(self.norm(x))

    def loss(self, idx, targets):
        logits = self(idx)
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.reshape(-1))


def add_model_args(ap: argparse.ArgumentParser, d: int, layers: int, ctx: int, heads: int = 4, batch: int = 8):
    """Adds --d, --layers, --heads, --batch, --ctx: the size of a TinyLlama (tiny_llama(args)) and of its batches."""
    ap.add_argument("--d", type=int, default=d)
    ap.add_argument("--layers", type=int, default=layers)
    ap.add_argument("--heads", type=int, default=heads)
    ap.add_argument("--batch", type=int, default=batch)
    ap.add_argument("--ctx", type=int, default=ctx)


def tiny_llama(args) -> TinyLlama:
    """The TinyLlama that the options of add_model_args describe (on the CPU)."""
    return TinyLlama(d=args.d, layers=args.layers, heads=args.heads, ctx=args.ctx)


def decay_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only (LLaMA practice): norms' gains get none."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    return [dict(params=decay, weight_decay=weight_decay), dict(params=no_decay, weight_decay=0.0)]


def stdlib_bytes(limit: int | None = None) -> torch.Tensor:
    """The bytes of the Python standard library's own *.py files, in sorted path order (no download)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted((p for p in root.rglob("*.py") if "site-packages" not in p.parts and "test" not in p.parts),
                   key=lambda p: p.relative_to(root).as_posix())
    chunks, total = [], 0
    for path in files:
        try:
            data = path.read_bytes()
        except OSError:
            continue
        chunks.append(data)
        total += len(data)
        if limit and total >= limit:
            break
    return torch.frombuffer(bytearray(b"".join(chunks)), dtype=torch.uint8).long()


def batches(data: torch.Tensor, batch: int, ctx: int, gen: torch.Generator, device: torch.device):
    ix = torch.randint(len(data) - ctx - 1, (batch,), generator=gen)
    x = torch.stack([data[i : i + ctx] for i in ix.tolist()])
    y = torch.stack([data[i + 1 : i + ctx + 1] for i in ix.tolist()])
    return x.to(device), y.to(device)

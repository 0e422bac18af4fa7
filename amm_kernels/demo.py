"""AMAdamW vs. AdamW on a byte-level language model of Python's own source code.

Run it with::

    python -m amm_kernels.demo            # ~2-3 minutes on 2 idle CPU cores
    python -m amm_kernels.demo --quick    # a few seconds, tiny smoke run

What it shows
-------------
A small GPT-style transformer learns to predict the next byte of Python
source code.  The data needs no download: it is the standard library that
ships with the interpreter running this script (``sysconfig`` tells us where
it lives), read in sorted order so every run sees the same bytes; the tail of
it is held out as a validation split.

The same model (same seed, hence the same initial weights) is trained twice
on the same sequence of batches, with the same learning-rate schedule, weight
decay and gradient clipping:

1. ``torch.optim.AdamW`` -- a fixed momentum coefficient ``beta1``;
2. ``amm_kernels.AMAdamW`` -- AdamW whose momentum coefficient ``beta`` is
   recomputed at every step.

It prints a table of final training loss, validation loss and wall time per
optimizer, and writes a PNG with two panels: the training loss of both runs
against the step, and the ``beta`` that AMAdamW chose at every step.
"""

from __future__ import annotations

import argparse
import math
import os
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from amm_kernels import AMAdamW

OPTIMIZERS = ("AdamW", "AMAdamW")


# --------------------------------------------------------------------------
# Data: the bytes of the Python standard library
# --------------------------------------------------------------------------


def stdlib_source_files() -> list[Path]:
    """All ``*.py`` files of the standard library, in a deterministic order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = (p for p in root.rglob("*.py") if "site-packages" not in p.parts)
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def load_corpus(max_bytes: int) -> torch.Tensor:
    """Concatenate standard-library source files until ``max_bytes`` bytes."""
    chunks, total = [], 0
    for path in stdlib_source_files():
        try:
            source = path.read_bytes()
        except OSError:
            continue
        chunks.append(source + b"\n\n")
        total += len(chunks[-1])
        if total >= max_bytes:
            break
    data = b"".join(chunks)[:max_bytes]
    if len(data) < 1024:
        raise RuntimeError("could not find the Python standard library sources")
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def split_corpus(data: torch.Tensor, val_fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Hold out the last ``val_fraction`` of the bytes for validation."""
    n_val = int(len(data) * val_fraction)
    return data[:-n_val], data[-n_val:]


def random_batch(data, batch_size, context, generator):
    """Random windows of ``context + 1`` bytes -> (inputs, next-byte targets)."""
    starts = torch.randint(len(data) - context - 1, (batch_size,), generator=generator)
    return windows(data, starts.to(data.device), context)


def windows(data, starts, context):
    """The windows ``data[s : s + context + 1]`` for every ``s`` in ``starts``, split into x, y."""
    offsets = starts[:, None] + torch.arange(context + 1, device=data.device)
    chunk = data[offsets].long()
    return chunk[:, :-1], chunk[:, 1:]


def validation_batches(data, batch_size, context, n_batches):
    """A fixed set of non-overlapping validation windows (no randomness)."""
    stride = context + 1
    n_windows = min(n_batches * batch_size, (len(data) - 1) // stride)
    starts = torch.arange(n_windows, device=data.device) * stride
    return [windows(data, s, context) for s in starts.split(batch_size)]


# --------------------------------------------------------------------------
# Model: a small GPT-style byte-level transformer
# --------------------------------------------------------------------------


class Block(nn.Module):
    """Pre-norm transformer block: causal self-attention + MLP."""

    def __init__(self, d_model: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.norm1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.proj = nn.Linear(d_model, d_model, bias=False)
        self.norm2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(
            nn.Linear(d_model, 4 * d_model, bias=False),
            nn.GELU(),
            nn.Linear(4 * d_model, d_model, bias=False),
        )

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.n_heads, -1).unbind(2)
        q, k, v = (z.transpose(1, 2) for z in (q, k, v))  # (b, heads, t, head_dim)
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(attn.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.norm2(x))


class ByteGPT(nn.Module):
    """Embeds bytes, applies ``n_layers`` blocks, predicts the next byte."""

    def __init__(self, context: int, d_model: int, n_layers: int, n_heads: int):
        super().__init__()
        self.tok = nn.Embedding(256, d_model)
        self.pos = nn.Parameter(torch.zeros(context, d_model))
        self.blocks = nn.ModuleList(Block(d_model, n_heads) for _ in range(n_layers))
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, 256, bias=False)
        self.apply(self._init)

    @staticmethod
    def _init(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)

    def forward(self, idx, targets):
        x = self.tok(idx) + self.pos[: idx.shape[1]]
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.norm(x))
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


# --------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------


@dataclass
class RunResult:
    name: str
    losses: list[float]  # training loss at every step
    betas: list[list[float]] | None  # AMAdamW's betas at every step, one per parameter tensor (None for AdamW)
    val_curve: list[tuple[int, float]]  # (step, validation loss)
    seconds: float  # wall time of the training loop (evaluation included)

    @property
    def final_train(self) -> float:
        """Mean training loss over the last 5% of steps (less noisy than one step)."""
        tail = self.losses[-max(1, len(self.losses) // 20) :]
        return sum(tail) / len(tail)

    @property
    def final_val(self) -> float:
        return self.val_curve[-1][1]


def make_optimizer(name: str, model: nn.Module, args) -> torch.optim.Optimizer:
    """Both optimizers get the same lr, betas, eps and weight decay."""
    # Decay the weight matrices of the blocks and the head; embeddings, biases
    # and norm gains are left alone, as is usual for transformers.
    decay, no_decay = [], []
    for pname, param in model.named_parameters():
        is_matrix = param.ndim >= 2 and not pname.startswith(("tok", "pos"))
        (decay if is_matrix else no_decay).append(param)
    groups = [
        {"params": decay, "weight_decay": args.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    common = dict(lr=args.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=args.weight_decay)
    if name == "AdamW":
        return torch.optim.AdamW(groups, **common)
    if name == "AMAdamW":
        return AMAdamW(groups, lam=args.lam, **common)
    raise ValueError(f"unknown optimizer {name!r}")


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak learning rate."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))


@torch.no_grad()
def evaluate(model: nn.Module, batches) -> float:
    model.eval()
    loss = torch.stack([model(x, y) for x, y in batches]).mean().item()
    model.train()
    return loss


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train(name: str, args, train_data, val_batches, device) -> RunResult:
    """Train a freshly initialised model with optimizer ``name``."""
    torch.manual_seed(args.seed)  # same initial weights for every optimizer
    batch_rng = torch.Generator().manual_seed(args.seed)  # same batches too
    model = ByteGPT(args.context, args.d_model, args.layers, args.heads).to(device)
    optimizer = make_optimizer(name, model, args)
    warmup = max(1, args.steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, args.steps, warmup))
    eval_steps = {round(args.steps * k / args.evals) for k in range(1, args.evals + 1)}

    losses, betas, val_curve = [], [], []
    synchronize(device)
    start = time.perf_counter()
    bar = tqdm(range(1, args.steps + 1), desc=f"{name:>8}", unit="step", dynamic_ncols=True)
    for step in bar:
        x, y = random_batch(train_data, args.batch_size, args.context, batch_rng)
        loss = model(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        optimizer.step()
        schedule.step()

        # Keep device tensors; converting them every step would force a sync.
        losses.append(loss.detach())
        if isinstance(optimizer, AMAdamW):
            betas.append(optimizer.beta.reshape(-1))  # a copy, on the device; reading it never syncs
        if step in eval_steps:
            val_curve.append((step, evaluate(model, val_batches)))
        if step % args.log_every == 0 or step == args.steps:
            postfix = {"loss": f"{loss.item():.3f}"}
            if betas:
                postfix["beta"] = f"{betas[-1].mean().item():.3f}"  # mean over the parameter tensors
            if val_curve:
                postfix["val"] = f"{val_curve[-1][1]:.3f}"
            bar.set_postfix(postfix)
    synchronize(device)
    seconds = time.perf_counter() - start
    bar.close()

    return RunResult(
        name=name,
        losses=torch.stack(losses).float().tolist(),
        betas=torch.stack(betas).float().tolist() if betas else None,
        val_curve=val_curve,
        seconds=seconds,
    )


# --------------------------------------------------------------------------
# Report: a table on stdout and a two-panel PNG
# --------------------------------------------------------------------------


def format_table(results: list[RunResult]) -> str:
    header = f"{'optimizer':<10} {'train loss':>10} {'val loss':>10} {'wall time':>10}"
    rows = [header, "-" * len(header)]
    for r in results:
        rows.append(f"{r.name:<10} {r.final_train:>10.4f} {r.final_val:>10.4f} {r.seconds:>9.1f}s")
    rows.append("(wall time includes whatever else the machine ran meanwhile; bench/train_step_overhead.py "
                "measures a step's cost)")
    return "\n".join(rows)


def smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average, so noisy per-batch losses are readable."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot(results: list[RunResult], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_beta) = plt.subplots(1, 2, figsize=(12, 4.5))
    colors = {"AdamW": "tab:blue", "AMAdamW": "tab:orange"}
    for r in results:
        steps = range(1, len(r.losses) + 1)
        window = max(1, len(r.losses) // 50)
        color = colors.get(r.name)
        ax_loss.plot(steps, r.losses, color=color, alpha=0.2, linewidth=0.8)
        ax_loss.plot(steps, smooth(r.losses, window), color=color, label=f"{r.name} (train)")
        vs, vl = zip(*r.val_curve)
        ax_loss.plot(vs, vl, "o--", color=color, markersize=4, label=f"{r.name} (validation)")
    ax_loss.set(xlabel="step", ylabel="cross-entropy (nats / byte)", title="Loss")
    ax_loss.set_ylim(top=min(6.0, max(max(r.losses) for r in results)))
    ax_loss.legend()
    ax_loss.grid(alpha=0.3)

    for r in results:
        if r.betas is not None:  # one beta per parameter tensor (AMAdamW's default beta_scope="tensor")
            steps = range(1, len(r.betas) + 1)
            color = colors.get(r.name)
            ax_beta.fill_between(steps, [min(b) for b in r.betas], [max(b) for b in r.betas], color=color, alpha=0.2,
                                 linewidth=0, label=f"{r.name} beta, min to max over tensors")
            ax_beta.plot(steps, [sum(b) / len(b) for b in r.betas], color=color, linewidth=0.8,
                         label=f"{r.name} beta, mean over tensors")
    ax_beta.axhline(0.9, color=colors["AdamW"], linestyle="--", label="AdamW beta1 = 0.9 (fixed)")
    ax_beta.set(xlabel="step", ylabel="beta", title="AMAdamW momentum coefficients (one per tensor)")
    ax_beta.legend()
    ax_beta.grid(alpha=0.3)

    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------


def default_threads() -> int:
    """torch's default (one thread per physical core), capped at the CPUs we may run on."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(torch.get_num_threads(), usable or 1))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m amm_kernels.demo",
        description="Train a byte-level transformer on the Python standard library "
        "with AdamW and with AMAdamW, and compare them.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--steps", type=int, default=500, help="optimizer steps per run")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path, default=Path("amm_demo.png"), help="PNG to write")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="tiny smoke run (a few seconds)")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--lam", type=float, default=0.1, help="AMAdamW's lam")
    p.add_argument("--clip", type=float, default=1.0, help="gradient-norm clipping")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--context", type=int, default=64, help="bytes per training window")
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--data-mb", type=float, default=4.0, help="MB of stdlib source to use")
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--val-batches", type=int, default=8)
    p.add_argument("--evals", type=int, default=6, help="validation points per run")
    p.add_argument("--log-every", type=int, default=10, help="progress-bar update interval")
    p.add_argument("--threads", type=int, default=default_threads(), help="CPU threads for torch")
    args = p.parse_args(argv)
    if args.quick:
        args.steps = min(args.steps, 30)
        args.batch_size, args.context = 8, 32
        args.d_model, args.layers, args.heads = 32, 1, 2
        args.data_mb, args.val_batches, args.evals = 0.25, 2, 2
    return args


def main(argv=None) -> list[RunResult]:
    args = parse_args(argv)
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True

    train_bytes, val_bytes = split_corpus(load_corpus(int(args.data_mb * 2**20)), args.val_fraction)
    train_data, val_data = train_bytes.to(device), val_bytes.to(device)
    val_batches = validation_batches(val_data, args.batch_size, args.context, args.val_batches)
    n_params = sum(p.numel() for p in ByteGPT(args.context, args.d_model, args.layers, args.heads).parameters())
    print(
        f"data: {len(train_bytes) / 2**20:.2f} MB train / {len(val_bytes) / 2**20:.2f} MB validation "
        f"bytes of Python stdlib source | model: {n_params / 1e6:.2f}M params | "
        f"{args.steps} steps x {args.batch_size} x {args.context} bytes | device: {device}"
        + (f" ({args.threads} threads)" if device.type == "cpu" else "")
    )

    results = [train(name, args, train_data, val_batches, device) for name in OPTIMIZERS]

    print()
    print(format_table(results))
    title = (
        f"byte-level LM on the Python stdlib ({n_params / 1e6:.2f}M params, {args.steps} steps, "
        f"lr {args.lr:g}, weight decay {args.weight_decay:g}, lam {args.lam:g}, seed {args.seed})"
    )
    plot(results, args.out, title)
    print(f"\nplot written to {args.out}")
    return results


if __name__ == "__main__":
    main()

"""A few small optimizer steps through the main GPU code paths, for compute-sanitizer to watch.

Run by bench/gpu_session.sh's part "sanitize", once under each of racecheck (hazards on shared
memory between the threads of a block), synccheck (barriers not every thread reaches) and memcheck
(out-of-bounds and misaligned accesses; run with PyTorch's caching allocator off, so that an overrun
leaves its allocation). The CPU simulator (tests/cuda_sim) runs one schedule with sequentially
consistent memory and cannot show these. Not checked by any tool: races between blocks through
global memory (the persistent step's grid barrier), which only the parity tests on the GPU can show.
Covered: the persistent and the two-pass step (AMM_CUDA_STEP is read at every step), AMSGD (also
adaptive=False), AMAdamW (per-tensor and global beta; bfloat16 with float32 state), RLLC with k = 2
(vector walk) and k = 6 (scalar walk), float32, bfloat16 and float16, a view at an address that is
not 16-byte aligned (the scalar path), an empty tensor and a 1-element one; then the triton backend
(--backends: the part runs racecheck, the slowest tool, on the cuda backend alone).
Not covered: the sharded *_scope_sums ops, found_inf, more tensors than one launch holds. Exits 0 when
every step ran; compute-sanitizer's --error-exitcode makes a finding fail the part.
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from amm_kernels import AMSGD, RLLC, AMAdamW, available_backends  # noqa: E402

# (class, arguments, the AMM_CUDA_STEP values it runs under: RLLC has one step; adaptive=False, no pass 1,
# is the two-pass step's only)
BOTH, TWO_PASS, ANY = ("persistent", "two_pass"), ("two_pass",), ("auto",)
CASES = [
    (AMSGD, {}, BOTH),
    (AMSGD, {"adaptive": False}, TWO_PASS),
    (AMAdamW, {"beta_scope": "tensor"}, BOTH),
    (AMAdamW, {"beta_scope": "global"}, BOTH),
    (AMAdamW, {"state_dtype": torch.float32}, BOTH),
    (RLLC, {}, ANY),
    (RLLC, {"memory": "M(0.9)+M(0.5)+M(0)+M(0.99)+M(0.7)+M(0.3)"}, ANY),  # k = 6: the scalar walk
]
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def make_params(dtype: torch.dtype, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator(device="cuda").manual_seed(seed)
    base = torch.randn(4097 + 3, device="cuda", dtype=dtype, generator=gen)
    return [
        torch.randn(257, 33, device="cuda", dtype=dtype, generator=gen).requires_grad_(),
        base[3:].requires_grad_(),  # starts 3 elements into its buffer: not 16-byte aligned
        torch.randn(1, device="cuda", dtype=dtype, generator=gen).requires_grad_(),
        torch.randn(0, device="cuda", dtype=dtype, generator=gen).requires_grad_(),
        torch.randn(7, 5, device="cuda", dtype=dtype, generator=gen).requires_grad_(),
    ]


def run(backend: str, steps: int, variant: str | None) -> int:
    """The cases that run under `variant` (None: all, once: triton), each dtype; how many ran."""
    count = 0
    for cls, kwargs, variants in CASES:
        if variant is not None and variant not in variants:
            continue
        if variant is not None:
            os.environ["AMM_CUDA_STEP"] = variant
        for dtype in DTYPES:
            if kwargs.get("state_dtype") is not None and dtype == torch.float32:
                continue
            params = make_params(dtype, seed=count)
            opt = cls(params, backend=backend, **kwargs)
            for step in range(steps):
                for p in params:
                    p.grad = torch.randn_like(p)
                opt.step()
            count += 1
    torch.cuda.synchronize()
    return count


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--backends", default="cuda,triton",
                        help="which of cuda and triton to run (racecheck, the slowest tool, runs cuda alone)")
    args = parser.parse_args()
    wanted = set(args.backends.split(","))
    if not torch.cuda.is_available():
        print("sanitize_step: no CUDA device")
        return 1
    backends = [b for b in available_backends("cuda") if b in wanted]
    if "cuda" in backends:
        for variant in ("persistent", "two_pass", "auto"):
            print(f"sanitize_step: backend cuda, AMM_CUDA_STEP={variant}: {run('cuda', args.steps, variant)} runs",
                  flush=True)
    os.environ.pop("AMM_CUDA_STEP", None)
    if "triton" in backends:
        print(f"sanitize_step: backend triton: {run('triton', args.steps, None)} runs", flush=True)
    if "cuda" in wanted and "cuda" not in backends:
        print("sanitize_step: the cuda backend is not available: its kernels were not checked")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

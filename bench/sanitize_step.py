"""A few small optimizer steps through every GPU code path, for compute-sanitizer to watch.

Run by bench/gpu_session.sh's part "sanitize", once under each of racecheck, synccheck and memcheck:
the CPU simulator (tests/cuda_sim) runs one schedule with sequentially consistent memory, so races
between threads and blocks, a barrier not every thread reaches, and misaligned or out-of-bounds
accesses on real hardware are only seen here. Covered: the persistent step and the two-pass step
(AMM_CUDA_STEP is read at every step), AMSGD, AMAdamW (per-tensor and global beta), RLLC, float32
and bfloat16, a view at an address that is not 16-byte aligned (the scalar path), an empty tensor
and a 1-element one; then the triton backend. Exits 0 when every step ran; compute-sanitizer's
--error-exitcode makes a finding fail the part.
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from amm_kernels import AMSGD, RLLC, AMAdamW, available_backends  # noqa: E402

CASES = [(AMSGD, {}), (AMAdamW, {"beta_scope": "tensor"}), (AMAdamW, {"beta_scope": "global"}), (RLLC, {})]


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


def run(backend: str, steps: int) -> int:
    count = 0
    for cls, kwargs in CASES:
        for dtype in (torch.float32, torch.bfloat16):
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
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("sanitize_step: no CUDA device")
        return 1
    backends = available_backends("cuda")
    for variant in ("persistent", "two_pass"):
        os.environ["AMM_CUDA_STEP"] = variant
        if "cuda" in backends:
            print(f"sanitize_step: backend cuda, AMM_CUDA_STEP={variant}: {run('cuda', args.steps)} runs", flush=True)
    os.environ.pop("AMM_CUDA_STEP")
    if "triton" in backends:
        print(f"sanitize_step: backend triton: {run('triton', args.steps)} runs", flush=True)
    if "cuda" not in backends:
        print("sanitize_step: the cuda backend is not available: its kernels were not checked")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""RLLC on the C++/CUDA backends ("cpu", "cuda"): one call of torch.ops.amm_kernels.rllc_step per step.

The op (csrc/OPS.md) does the whole step of SPEC.md section 4 in place, exactly as
amm_kernels/reference/rllc_reference.py: pass 1 (per-chunk double sums of the previous memory's Gram
entries and M^T g), the law update per scope (pinv of the k x k Gram matrix, on the device for CUDA),
pass 2 (memory and parameter), the scope state (step, law), and the GradScaler's found_inf skip.
Memories of more than 8 units run on the reference instead (so would float64 parameters and their
float64 scope state, but they do not come here: backends.resolve refuses them for "cpu" and "cuda",
and "auto" gives them the reference).

Raises ImportError when the extension is not built (through compiled_backend.py).
"""
from __future__ import annotations

import torch

from . import _C  # noqa: F401  (registers the ops; compiled_backend.py imports this module once _C has loaded)
from ._step import StepBatch, with_reduced_found_inf

__all__ = ["rllc_step", "has_rllc_op", "MAX_K"]

MAX_K = 8  # kRllcMaxK in csrc/rllc_math.h
_OPS = torch.ops.amm_kernels
_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def has_rllc_op() -> bool:
    """True when amm_kernels._C was built with the rllc_step op."""
    return hasattr(_OPS, "rllc_step")


if has_rllc_op():
    # The op mutates its inputs and returns nothing, so the fake (meta) implementation does nothing;
    # it lets torch.compile trace a step.
    @torch.library.register_fake("amm_kernels::rllc_step")
    def _rllc_step_fake(params, grads, memory, group_of, scope_of, lr, U, b, step, law, grad_scale, found_inf,
                        law_lr, rcond, scope_sums=None):
        return None

    @torch.library.register_fake("amm_kernels::rllc_scope_sums")
    def _rllc_scope_sums_fake(params, grads, memory, group_of, scope_of, lr, U, b, step, *rest):
        k = len(b)
        return step.new_empty((step.numel(), k * (k + 1) // 2 + k), dtype=torch.float64)


def _fallback(batch: StepBatch, hp) -> bool:
    """True when this step runs on the reference: k > MAX_K, a float64 parameter or scope state,
    or an extension built without the op."""
    return (
        hp.k > MAX_K
        or not has_rllc_op()
        or batch.scopes.step.dtype != torch.float32
        or any(p.dtype not in _KERNEL_DTYPES for p in batch.params)
    )


@torch.no_grad()
def rllc_step(batch: StepBatch, hp) -> None:
    """One RLLC step of `batch` (see amm_kernels.rllc) with hyperparameters `hp` (RLLCHyper)."""
    if _fallback(batch, hp):
        from .reference.rllc_reference import rllc_step as reference_step

        return reference_step(batch, hp)
    state = batch.scopes
    device = state.step.device
    lr = batch.lr
    if lr.dtype != torch.float32:
        lr = lr.float()
    lr = lr.reshape(-1).contiguous()
    grad_scale = None if batch.grad_scale is None else batch.grad_scale.detach().to(device, non_blocking=True)
    found_inf = None if batch.found_inf is None else batch.found_inf.detach().to(device, non_blocking=True)
    U = [float(v) for row in hp.U for v in row]
    args = (batch.params, batch.grads, batch.d, batch.group_of, batch.scope_of, lr, U, [float(v) for v in hp.b],
            state.step, state.law, grad_scale, found_inf, float(hp.law_lr), float(hp.rcond))
    if batch.process_group is None:
        _OPS.rllc_step(*args)
        return
    # Sharded parameters (csrc/OPS.md): this rank's [S, P] Gram and M^T g sums, added up over the group
    # (one all_reduce, no host sync), then the step from the whole model's sums without a second pass 1.
    sums = batch.all_reduce_sums(_OPS.rllc_scope_sums(*args))  # NOTE [sums by scope] in _step.py
    _OPS.rllc_step(*with_reduced_found_inf(args, found_inf, batch), sums)

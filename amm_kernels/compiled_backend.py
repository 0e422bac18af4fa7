"""The C++/CUDA backends ("cpu", "cuda"): one call of a custom op of amm_kernels._C per step.

The ops (csrc/OPS.md) take the StepBatch's lists and the scope state and do the whole step of
SPEC.md in place: pass 1 (per-tensor sums), beta per scope, pass 2 (the update), the scope-state
writes, and the GradScaler's found_inf skip. With sharded parameters (a process_group) the step is
two op calls around one all_reduce of the per-scope sums (_run). This module raises ImportError when the extension is not
built, so backends.py reports the backend as unavailable.
"""
from __future__ import annotations

import torch

try:
    from . import _C  # noqa: F401  (loading the library registers torch.ops.amm_kernels.*)
except ImportError as err:  # pragma: no cover - depends on the build
    raise ImportError(
        f"amm_kernels._C is not built ({err}); reinstall with `pip install --no-build-isolation -e .` "
        "(AMM_KERNELS_STRICT_BUILD=1 shows compiler errors)"
    ) from err

from ._hyper import AMAdamWHyper, AMSGDHyper
from ._step import StepBatch, with_reduced_found_inf

_OPS = torch.ops.amm_kernels


def has_cuda_kernels() -> bool:
    """True when amm_kernels._C was compiled with its CUDA kernels."""
    return bool(getattr(_C, "has_cuda", False))


# The step ops mutate their inputs and return nothing, so their fake (meta) implementations do
# nothing; the scope-sums ops return a new [S, 2] float64 tensor. They let torch.compile trace a step.
@torch.library.register_fake("amm_kernels::amsgd_step")
def _amsgd_step_fake(params, grads, momentum, group_of, scope_of, lr, weight_decay, step, beta, prev_lr,
                     prev_loss, loss, grad_scale, found_inf, lam, beta_max, beta_min, adaptive, maximize,
                     scope_sums=None):
    return None


@torch.library.register_fake("amm_kernels::amadamw_step")
def _amadamw_step_fake(params, grads, exp_avg, exp_avg_sq, group_of, scope_of, lr, weight_decay, step, beta,
                       beta_prod, prev_lr, grad_scale, found_inf, lam, beta_max, beta_min, beta2, eps,
                       adaptive, maximize, scope_sums=None):
    return None


@torch.library.register_fake("amm_kernels::amsgd_scope_sums")
def _amsgd_scope_sums_fake(params, grads, momentum, group_of, scope_of, lr, weight_decay, step, *rest):
    return step.new_empty((step.numel(), 2), dtype=torch.float64)


@torch.library.register_fake("amm_kernels::amadamw_scope_sums")
def _amadamw_scope_sums_fake(params, grads, exp_avg, exp_avg_sq, group_of, scope_of, lr, weight_decay, step, *rest):
    return step.new_empty((step.numel(), 2), dtype=torch.float64)


def _scope_state(batch: StepBatch):
    state = batch.scopes
    if state.step.dtype != torch.float32:
        raise TypeError(f"amm_kernels compiled backends keep the scope state in float32, got {state.step.dtype}")
    return state


def _run(step_op, sums_op, args: tuple, batch: StepBatch, adaptive: bool, found_inf=None) -> None:
    """step_op(*args), or with sharded parameters (a process_group) the step in two halves around one
    all_reduce of the per-scope sums (csrc/cpu/step_driver_cpu.cpp NOTE [sharded sums]): sums_op runs
    pass 1 and returns this rank's [S, 2] float64 sums, which every rank adds up (no host sync), and
    step_op finishes the step from them without a second pass 1."""
    if batch.process_group is None or not adaptive:
        step_op(*args)
        return
    sums = batch.all_reduce_sums(sums_op(*args))  # NOTE [sums by scope] in _step.py
    step_op(*with_reduced_found_inf(args, found_inf, batch), sums)


def _lr(batch: StepBatch) -> torch.Tensor:
    lr = batch.lr
    if lr.dtype != torch.float32:
        lr = lr.float()
    return lr.reshape(-1).contiguous()


def _optional(t: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    return None if t is None else t.detach().to(device, non_blocking=True)


@torch.no_grad()
def amsgd_step(batch: StepBatch, hp: AMSGDHyper) -> None:
    state = _scope_state(batch)
    device = state.step.device
    loss = batch.loss.detach().to(device) if (hp.delta_f == "loss" and batch.loss is not None) else None
    found_inf = _optional(batch.found_inf, device)
    args = (
        batch.params, batch.grads, batch.d, batch.group_of, batch.scope_of, _lr(batch), batch.weight_decay,
        state.step, state.beta, state.prev_lr, state.prev_loss, loss,
        _optional(batch.grad_scale, device), found_inf,
        float(hp.lam), float(hp.beta_max), float(hp.beta_min), bool(hp.adaptive), bool(hp.maximize),
    )
    _run(_OPS.amsgd_step, _OPS.amsgd_scope_sums, args, batch, hp.adaptive, found_inf)


@torch.no_grad()
def amadamw_step(batch: StepBatch, hp: AMAdamWHyper) -> None:
    state = _scope_state(batch)
    device = state.step.device
    found_inf = _optional(batch.found_inf, device)
    args = (
        batch.params, batch.grads, batch.d, batch.v, batch.group_of, batch.scope_of, _lr(batch), batch.weight_decay,
        state.step, state.beta, state.beta_prod, state.prev_lr,
        _optional(batch.grad_scale, device), found_inf,
        float(hp.lam), float(hp.beta_max), float(hp.beta_min), float(hp.beta2), float(hp.eps),
        bool(hp.adaptive), bool(hp.maximize),
    )
    _run(_OPS.amadamw_step, _OPS.amadamw_scope_sums, args, batch, hp.adaptive, found_inf)


# RLLC on "cpu"/"cuda" (csrc/cpu/rllc_cpu.cpp, csrc/cuda/rllc_kernels.cu); imported last: it needs nothing above.
from .rllc_compiled import rllc_step  # noqa: E402,F401

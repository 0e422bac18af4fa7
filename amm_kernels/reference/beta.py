"""Beta from per-tensor sums (SPEC.md sections 1-3), and the scope-state commit. Shared by both optimizers.

Each optimizer reduces every tensor to a numerator term num_t and a denominator term den_t, already
weighted by its group's step sizes (SPEC.md section 3), so that for every scope

    beta_s = clamp(sum_{t in s} num_t / sum_{t in s} den_t, beta_min, beta_max)

with beta_max where the denominator is not > 0, on the scope's first step, and when adaptive=False.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .._step import StepBatch


def compute_dtype(t: Tensor) -> torch.dtype:
    """Arithmetic dtype: float32 for every parameter dtype, except float64 (the high-precision reference)."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def segment_sums(values: Tensor, lengths: list[int]) -> Tensor:
    """Sum consecutive runs of `values` ([T]) of the given lengths, in a fixed order (no atomics)."""
    if all(n == 1 for n in lengths):
        return values
    return torch.stack([run.sum() for run in values.split(lengths)])


def scope_beta(batch: StepBatch, hp, num: Tensor | None, den: Tensor | None, extra_num: Tensor | None = None) -> Tensor:
    """Beta for each present scope (in present_scopes order), as the scope-state dtype.

    num, den: per-tensor terms [T] (None when adaptive=False). They are combined in float64.
    extra_num: a scope-level addition to the numerator (loss mode's (lam + 1) * (prev_loss - loss)).
    """
    state = batch.scopes
    n = len(batch.present_scopes)
    beta_max = torch.full((n,), hp.beta_max, dtype=state.beta.dtype, device=state.beta.device)
    if not hp.adaptive:
        return beta_max
    num_s = segment_sums(num.double(), batch.scope_lengths)
    den_s = segment_sums(den.double(), batch.scope_lengths)
    if batch.process_group is not None:
        # Sharded parameters: num and den are sums over tensors, so adding every rank's partial sums
        # (one small all_reduce, no host sync) gives the whole model's; the loss term is global already.
        # (NOTE [sums by scope] in _step.py: rows by scope index, so ranks may hold different scopes).
        num_s, den_s = batch.all_reduce_scope_sums(torch.stack([num_s, den_s], dim=1)).unbind(1)
    first_step = state.step[batch.index("present_scopes")] == 0
    return beta_from_sums(num_s, den_s, first_step, hp, extra_num).to(state.beta.dtype)


def beta_from_sums(num_s: Tensor, den_s: Tensor, first_step: Tensor, hp, extra_num: Tensor | None = None) -> Tensor:
    """Beta per scope (float64) from its summed numerator and denominator terms (float64) and whether
    it is the scope's first step; extra_num as in scope_beta."""
    if extra_num is not None:
        num_s = num_s + extra_num.double()
    beta = torch.where(den_s > 0, (num_s / den_s).clamp(hp.beta_min, hp.beta_max), hp.beta_max)
    # NOTE [non-finite sums]: an inf/NaN gradient must give a NaN beta (as torch's optimizers give NaN
    # parameters), not the beta_max that the "den not > 0" rule alone would pick for a NaN den.
    beta = torch.where(torch.isfinite(num_s) & torch.isfinite(den_s), beta, float("nan"))
    return torch.where(first_step, hp.beta_max, beta)


def commit(dst: Tensor, new: Tensor, skip: Tensor | None) -> None:
    """dst <- new, unless the GradScaler found an inf (then dst is left exactly as it was)."""
    if skip is None:
        dst.copy_(new)
    else:
        dst.copy_(torch.where(skip, dst, new.to(dst.dtype)))


def commit_scope_state(batch: StepBatch, beta: Tensor, loss: Tensor | None = None, track_beta_prod: bool = False) -> None:
    """After the update: count the step, record beta (and beta_prod), prev_lr and prev_loss."""
    state, skip = batch.scopes, batch.skip
    scopes = batch.index("present_scopes")
    groups = batch.index("present_groups")
    for name, new in (
        ("step", state.step[scopes] + 1),
        ("beta", beta),
        ("beta_prod", state.beta_prod[scopes] * beta if track_beta_prod else None),
        ("prev_lr", batch.lr[groups].to(state.prev_lr.dtype)),
    ):
        if new is None:
            continue
        index = groups if name == "prev_lr" else scopes
        field = getattr(state, name)
        old = field[index]
        field[index] = new if skip is None else torch.where(skip, old, new.to(field.dtype))
    if loss is not None:
        commit(state.prev_loss, loss.detach().reshape(()).to(state.prev_loss.dtype), skip)


def per_tensor(batch: StepBatch, scope_values: Tensor) -> list[Tensor]:
    """Spread per-present-scope values to the tensors of the batch (0-d tensors, one per tensor)."""
    return list(scope_values[batch.index("scope_pos")].unbind())


def present_here(batch: StepBatch) -> tuple[Tensor, Tensor]:
    """[n_scopes] and [n_groups] device bools: the scopes and groups this rank stepped in `batch`."""
    scopes = torch.zeros_like(batch.scopes_anywhere)
    groups = torch.zeros_like(batch.groups_anywhere)
    scopes[batch.index("present_scopes")] = True
    groups[batch.index("present_groups")] = True
    return scopes, groups


def complete_scopes(batch: StepBatch, hp, prev_loss: Tensor | None, track_beta_prod: bool) -> None:
    """NOTE [scopes stepped elsewhere] (_base.py): after a sharded step, the scope state of every scope
    that stepped on some rank but not here, as the ranks that stepped it committed it: the step
    counted, beta from the same all-reduced sums (batch.reduced_sums, [n_scopes, 2] float64: num,
    den), beta_prod; prev_lr of the groups that stepped elsewhere; prev_loss where nothing stepped
    here (loss mode: prev_loss is the loss before this step's commit). On the device, masked: no
    host sync."""
    state, skip = batch.scopes, batch.skip
    here, groups_here = present_here(batch)
    todo = batch.scopes_anywhere & ~here
    group_todo = batch.groups_anywhere & ~groups_here
    if skip is not None:
        todo, group_todo = todo & ~skip, group_todo & ~skip
    extra = None
    if prev_loss is not None:
        extra = (hp.lam + 1) * (prev_loss - batch.loss.detach().to(prev_loss.dtype))
    sums = batch.reduced_sums
    beta = beta_from_sums(sums[:, 0], sums[:, 1], state.step == 0, hp, extra).to(state.beta.dtype)
    if track_beta_prod:
        state.beta_prod.copy_(torch.where(todo, state.beta_prod * beta, state.beta_prod))
    state.beta.copy_(torch.where(todo, beta, state.beta))
    state.step.copy_(torch.where(todo, state.step + 1, state.step))
    state.prev_lr.copy_(torch.where(group_todo, batch.lr.to(state.prev_lr.dtype), state.prev_lr))
    if prev_loss is not None and not batch.present_scopes:  # the ranks that stepped committed theirs
        stepped = batch.scopes_anywhere.any() if skip is None else batch.scopes_anywhere.any() & ~skip
        state.prev_loss.copy_(torch.where(stepped, batch.loss.detach().to(state.prev_loss.dtype), state.prev_loss))

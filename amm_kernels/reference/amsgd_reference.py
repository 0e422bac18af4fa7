"""AM-SGD (SPEC.md section 1), written for reading. The yardstick every AMSGD kernel is tested against.

    g    = grad / grad_scale, negated if maximize, + weight_decay * x  (coupled L2, as torch.optim.SGD)
    pass 1, per tensor:  <g, d>,  B = <d - g, g + lam d>,  D = <d - g, d - g>
    beta, per scope:     ((lam + 1) F - sum_g eta_g B_g) / sum_g eta_g D_g, clamped  (beta.py)
                         F = sum_g eta_prev_g <g, d>_g, or prev_loss - loss in loss mode
    pass 2, per tensor:  d <- ((beta + lam) d + (1 - beta) g) / (1 + lam)   (d <- g on the first step)
                         x <- x - eta d
"""
from __future__ import annotations

import torch

from .._hyper import AMSGDHyper
from .._step import StepBatch, check_fits
from .beta import commit, commit_scope_state, compute_dtype, per_tensor, scope_beta


def effective_grad(batch: StepBatch, i: int, x: torch.Tensor, maximize: bool, weight_decay: float) -> torch.Tensor:
    g = batch.grads[i].to(x.dtype)
    if batch.grad_scale is not None:
        g = g / batch.grad_scale.to(x.dtype)
    if maximize:
        g = -g
    if weight_decay != 0:
        g = g + weight_decay * x
    return g


@torch.no_grad()
def amsgd_step(batch: StepBatch, hp: AMSGDHyper) -> None:
    check_fits(batch.params, batch.grads, [batch.d])  # before anything changes
    state = batch.scopes
    lam = hp.lam
    xs, gs, ds = [], [], []
    num, den = [], []
    # Pass 1: the effective gradient and each tensor's weighted terms of beta's numerator and denominator.
    for i, param in enumerate(batch.params):
        group = batch.group_of[i]
        cd = compute_dtype(param)
        x, d = param.to(cd), batch.d[i].to(cd)
        g = effective_grad(batch, i, x, hp.maximize, batch.weight_decay[group])
        xs.append(x), gs.append(g), ds.append(d)
        if hp.adaptive:
            # NOTE [weighting in float64] in amadamw_reference.py
            eta, eta_prev = batch.lr[group].double(), state.prev_lr[group].double()
            diff = d - g
            b_term = (diff * (g + lam * d)).sum().double()
            d_term = (diff * diff).sum().double()  # NOTE: a sum of squares, never |g|^2 - 2<g,d> + |d|^2
            first_order = (lam + 1) * eta_prev * (g * d).sum().double() if hp.delta_f == "first_order" else 0.0
            num.append(first_order - eta * b_term)
            den.append(eta * d_term)

    extra = None
    if hp.adaptive and hp.delta_f == "loss":
        extra = (lam + 1) * (state.prev_loss - batch.loss.detach().to(state.prev_loss.dtype))
    beta = scope_beta(
        batch, hp, torch.stack(num) if num else None, torch.stack(den) if den else None, extra_num=extra
    )

    # Pass 2: the momentum and parameter update with each tensor's beta.
    skip = batch.skip
    first_step = per_tensor(batch, state.step[batch.index("present_scopes")] == 0)
    for i, (b, first) in enumerate(zip(per_tensor(batch, beta), first_step)):
        x, g, d = xs[i], gs[i], ds[i]
        b = b.to(x.dtype)
        d_new = torch.where(first, g, ((b + lam) * d + (1 - b) * g) / (1 + lam))
        x_new = x - batch.lr[batch.group_of[i]].to(x.dtype) * d_new
        commit(batch.d[i], d_new, skip)
        commit(batch.params[i], x_new, skip)
    commit_scope_state(batch, beta, loss=batch.loss)

"""AM-AdamW (SPEC.md section 2), written for reading. The yardstick every AMAdamW kernel is tested against.

    g    = grad / grad_scale, negated if maximize;  mu = weight_decay (decoupled);  t = scope's step
    v    <- beta2 v + (1 - beta2) g g
    p    = (1 - beta_max beta_prod) (eps + sqrt(v / (1 - beta2^t)))      diagonal preconditioner
    w    = 1 / ((1 + lam p) p)
    pass 1, per tensor:  A = <g, mu x + d / p>,  B = <w (d - g), g + lam p d>,
                         C = <d - g, x>,  D = <w (d - g), d - g>
    beta, per scope:     (sum eta_prev A - sum c (B + mu C)) / sum c D,  c = eta / (1 + mu eta)  (beta.py)
    pass 2, per tensor:  d <- (beta d + lam p d + (1 - beta) g) / (1 + lam p)
                         x <- (1 - eta mu) x - eta d / p
"""
from __future__ import annotations

import torch

from .._hyper import AMAdamWHyper
from .._step import StepBatch, check_fits
from .amsgd_reference import effective_grad
from .beta import commit, commit_scope_state, compute_dtype, per_tensor, scope_beta


@torch.no_grad()
def amadamw_step(batch: StepBatch, hp: AMAdamWHyper) -> None:
    check_fits(batch.params, batch.grads, [batch.d, batch.v])  # before anything changes
    state = batch.scopes
    lam, beta2 = hp.lam, hp.beta2
    scopes = batch.index("present_scopes")
    # Per scope: the bias corrections of this step (t counts this step). NOTE [bias corrections in
    # float64]: 1 - beta2^t cancels (0.999 is not a float32), so both are formed in float64, as
    # torch.optim.AdamW forms them in Python floats, and only then rounded to the compute dtype.
    bias1 = per_tensor(batch, 1 - hp.beta_max * state.beta_prod[scopes].double())
    bias2 = per_tensor(batch, 1 - beta2 ** (state.step[scopes].double() + 1))

    xs, gs, ds, vs, ps = [], [], [], [], []
    num, den = [], []
    # Pass 1: v in registers (not stored yet), the preconditioner p, and each tensor's weighted terms.
    # NOTE [x in pass 1]: x enters beta only through mu x and mu <d - g, x>, so for a group without
    # weight decay (mu = 0) the sums leave x out and the kernels do not read x in pass 1 (12 of
    # AMAdamW's pass-1 bytes per float32 parameter instead of 16). The same beta for a finite x; and a
    # non-finite parameter in a group without decay does not make beta NaN (as AMSGD, whose coupled L2
    # term reads x only where there is decay).
    for i, param in enumerate(batch.params):
        group = batch.group_of[i]
        mu = batch.weight_decay[group]
        cd = compute_dtype(param)
        x, d, v = param.to(cd), batch.d[i].to(cd), batch.v[i].to(cd)
        g = effective_grad(batch, i, x, hp.maximize, weight_decay=0.0)
        v = beta2 * v + (1 - beta2) * g * g
        p = bias1[i].to(cd) * (hp.eps + (v / bias2[i].to(cd)).sqrt())
        xs.append(x), gs.append(g), ds.append(d), vs.append(v), ps.append(p)
        if hp.adaptive:
            # NOTE [weighting in float64]: sums in the arithmetic dtype, weighted by the step sizes in
            # float64, as every backend's finalize (csrc/amm_math.h): eta times a tiny sum would
            # underflow to a float32 subnormal and lose beta's digits.
            eta, eta_prev = batch.lr[group].double(), state.prev_lr[group].double()
            c = eta / (1 + mu * eta)
            w = 1 / ((1 + lam * p) * p)
            diff = d - g
            b_term = (w * diff * (g + lam * p * d)).sum().double()
            d_term = (w * diff * diff).sum().double()
            if mu != 0:
                a_term = (g * (mu * x + d / p)).sum().double()
                c_term = (diff * x).sum().double()
                num.append(eta_prev * a_term - c * (b_term + mu * c_term))
            else:  # NOTE [x in pass 1]
                a_term = (g * (d / p)).sum().double()
                num.append(eta_prev * a_term - c * b_term)
            den.append(c * d_term)

    beta = scope_beta(batch, hp, torch.stack(num) if num else None, torch.stack(den) if den else None)

    # Pass 2: v, d and x with each tensor's beta.
    skip = batch.skip
    for i, b in enumerate(per_tensor(batch, beta)):
        x, g, d, v, p = xs[i], gs[i], ds[i], vs[i], ps[i]
        group = batch.group_of[i]
        eta, mu = batch.lr[group].to(x.dtype), batch.weight_decay[group]
        b = b.to(x.dtype)
        d_new = (b * d + lam * p * d + (1 - b) * g) / (1 + lam * p)
        x_new = (1 - eta * mu) * x - eta * d_new / p
        commit(batch.v[i], v, skip)
        commit(batch.d[i], d_new, skip)
        commit(batch.params[i], x_new, skip)
    commit_scope_state(batch, beta, track_beta_prod=True)

"""RLLC (SPEC.md section 4), written for reading. The yardstick every RLLC kernel is tested against.

Memory M (n x k, one state tensor per parameter holding its k units as rows: memory[a] = column a
of M), learning law L (k numbers per scope), propagator U (k x k) and input b (k):

    g    = grad / grad_scale
    pass 1, per tensor:  the k(k+1)/2 Gram entries <m_a, m_b> (a <= b) of the previous memory, and
                         the k entries <m_a, g>, accumulated in float64 (see NOTE [Gram precision])
    law, per scope:      the tensors' sums combined in a fixed order in float64, then, not on the
                         scope's first step,
                             L <- L + c2 * pinv(M^T M) (M^T g)
                         pinv of the k x k Gram matrix in float64 by a fixed number of Jacobi sweeps
                         (pinv.py: torch.linalg.eigh would sync with the host on CUDA), dropping the
                         eigenvalues below rcond * the largest (minimum-norm least squares)
    pass 2, per tensor:  M <- M U + g b^T        (every unit from the previous memory)
                         theta <- theta - c1 * M L        (c1 = the tensor's group lr, L the new law)

NOTE [Gram precision]: pinv(M^T M) amplifies the rounding of the Gram entries by cond(M^T M), which
is 1e4 already in the J(0.8,2)+M(0) conformance vector. With float32 partial sums (SPEC.md section 5)
the law there is off by 1.4e-4 relative after 4 steps; with the products of the float32 values
(exact in float64) summed in float64 it is off by 2e-7, the float32 memory's own rounding. So the
RLLC sums are float64 whatever the parameter dtype; the arithmetic of the updates stays float32.

Nothing is read back to the host: first steps, non-finite sums and the GradScaler's found_inf are
all handled with torch.where on device tensors.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .._step import StepBatch, check_fits
from .beta import commit, compute_dtype, per_tensor, present_here
from .pinv import gram_pinv_apply

SUM_DTYPE = torch.float64  # the dtype of the Gram and M^T g sums (NOTE [Gram precision])


def gram_pairs(k: int) -> list[tuple[int, int]]:
    """The (a, b) index pairs, a <= b, of the Gram entries pass 1 sums, in their fixed order."""
    return [(a, b) for a in range(k) for b in range(a, k)]


_GRAM_FULL_INDEX: dict = {}


def gram_full_index(k: int, device: torch.device) -> Tensor:
    """For entry (a, b) of a k x k Gram matrix, row-major, its position among the gram_pairs entries.
    Built once per (k, device): indexing with Python sequences would copy an index to the device at
    every step, which waits for it (a host synchronisation inside step())."""
    key = (k, str(device))
    if key not in _GRAM_FULL_INDEX:
        slot = {pair: i for i, pair in enumerate(gram_pairs(k))}
        full = [slot[(min(a, b), max(a, b))] for a in range(k) for b in range(k)]
        _GRAM_FULL_INDEX[key] = torch.tensor(full, dtype=torch.long).to(device)
    return _GRAM_FULL_INDEX[key]


def law_correction(gram_entries: Tensor, mg: Tensor, k: int, rcond: float) -> Tensor:
    """pinv(G) r for each scope: gram_entries [S, k(k+1)/2] (gram_pairs order), mg [S, k], float64.

    Non-finite sums give a NaN correction (so that a NaN gradient gives a NaN law, as torch's own
    optimizers give NaN parameters), without handing NaN to the eigensolver.
    """
    S = mg.shape[0]
    G = gram_entries[:, gram_full_index(k, gram_entries.device)].reshape(S, k, k)  # symmetric: entry (a, b) = (b, a)
    finite = torch.isfinite(G).all(dim=(1, 2)) & torch.isfinite(mg).all(dim=1)  # [S]
    G = torch.where(finite[:, None, None], G, 0.0)
    coeff = gram_pinv_apply(G, mg, rcond)  # Jacobi eigensolver in torch ops: no host sync (pinv.py)
    return torch.where(finite[:, None], coeff, float("nan"))


@torch.no_grad()
def rllc_step(batch: StepBatch, hp) -> None:
    """One RLLC step. batch.d[i] is tensor i's memory, shape (k, *param.shape); batch.scopes holds
    `step` [S] and `law` [S, k]; hp has law_lr, U (k x k), b (k), k and rcond."""
    state, k = batch.scopes, hp.k
    check_fits(batch.params, batch.grads, [batch.d], units=k)  # before anything changes
    pairs = gram_pairs(k)
    xs, gs, ms, sums = [], [], [], []
    # Pass 1: the effective gradient and each tensor's Gram and M^T g sums of the previous memory.
    for i, param in enumerate(batch.params):
        cd = compute_dtype(param)
        x = param.to(cd)
        m = batch.d[i].to(cd)
        g = batch.grads[i].to(cd)
        if batch.grad_scale is not None:
            g = g / batch.grad_scale.to(cd)
        xs.append(x), gs.append(g), ms.append(m)
        md, gd = m.to(SUM_DTYPE), g.to(SUM_DTYPE)  # float32 products are exact in float64
        entries = [(md[a] * md[b]).sum() for a, b in pairs] + [(md[a] * gd).sum() for a in range(k)]
        sums.append(torch.stack(entries))

    # The law, per present scope: sums combined in a fixed order in float64, then the correction.
    per_scope = torch.stack([run.sum(0) for run in torch.stack(sums).split(batch.scope_lengths)])  # [S, P]
    if batch.process_group is not None:
        # Sharded parameters: the Gram entries and M^T g are sums over elements, so adding every rank's
        # (one small all_reduce, no host sync) gives the whole model's (as beta.py does for AMSGD).
        per_scope = batch.all_reduce_scope_sums(per_scope)  # NOTE [sums by scope] in _step.py
    scopes = batch.index("present_scopes")
    law_old = state.law[scopes]  # [S, k], the scope-state dtype
    correction = law_correction(per_scope[:, : len(pairs)], per_scope[:, len(pairs):], k, hp.rcond)
    first_step = state.step[scopes] == 0
    law_new = torch.where(first_step[:, None], law_old.double(), law_old.double() + hp.law_lr * correction)
    law_new = law_new.to(state.law.dtype)

    # Pass 2: the memory update and the parameter step with each tensor's (new) law.
    skip = batch.skip
    for i, law in enumerate(per_tensor(batch, law_new)):
        x, g, m = xs[i], gs[i], ms[i]
        # column a of M U + g b^T: b_a g + sum_c U[c][a] m_c, every term from the previous memory
        # (all k terms, zeros included, so that inf/NaN propagate exactly as in the matrix product)
        m_new = torch.stack([sum((hp.U[c][a] * m[c] for c in range(k)), hp.b[a] * g) for a in range(k)])
        law = law.to(x.dtype)
        direction = sum(law[a] * m_new[a] for a in range(k))
        x_new = x - batch.lr[batch.group_of[i]].to(x.dtype) * direction
        commit(batch.d[i], m_new, skip)
        commit(batch.params[i], x_new, skip)

    for name, new in (("step", state.step[scopes] + 1), ("law", law_new)):
        field = getattr(state, name)
        field[scopes] = new if skip is None else torch.where(skip, field[scopes], new.to(field.dtype))


def complete_scopes(batch: StepBatch, hp) -> None:
    """NOTE [scopes stepped elsewhere] (_base.py): after a sharded step, the law and step count of every
    scope that stepped on some rank but not here, from the same all-reduced sums (batch.reduced_sums,
    [n_scopes, P] float64), as the ranks that stepped it committed them. On the device, masked."""
    state, skip, k = batch.scopes, batch.skip, hp.k
    here, _ = present_here(batch)
    todo = batch.scopes_anywhere & ~here
    if skip is not None:
        todo = todo & ~skip
    sums, n_pairs = batch.reduced_sums, len(gram_pairs(k))
    correction = law_correction(sums[:, :n_pairs], sums[:, n_pairs:], k, hp.rcond)
    law = state.law.double()
    law_new = torch.where((state.step == 0)[:, None], law, law + hp.law_lr * correction).to(state.law.dtype)
    state.law.copy_(torch.where(todo[:, None], law_new, state.law))
    state.step.copy_(torch.where(todo, state.step + 1, state.step))

"""RLLC's step for backend "triton" (SPEC.md section 4): `rllc_step(batch, hp)`, exported by
amm_kernels/triton_backend.py (rllc.py takes a backend whose module has `rllc_step` as RLLC-capable).

Per step, for the whole parameter list at once (one launch per pass and dtype bucket):
    pass 1    rllc_reduce_kernel: per block, the Gram entries and M^T g of the previous memory in
              float64, into the block's own row of a float64 buffer (rllc_reference.py NOTE [Gram
              precision]: float32 partial sums would cost the law 1e-4 relative on cond 1e4 memories)
    combine   rllc_combine_kernel: per present scope, its slots summed in a fixed order (no atomics:
              runs are bit-identical)
    law       torch ops on the device: the k x k Gram matrix, pinv(G) (M^T g) by
              reference.pinv.gram_pinv_apply (a fixed Jacobi iteration: no host sync, unlike
              torch.linalg.eigh on CUDA), L <- L + c2 * correction except on a scope's first step
    pass 2    rllc_update_kernel: M <- M U + g b^T, theta <- theta - lr M L, with the new law
    commit    step and law per present scope, unless found_inf (torch.where on the device)
Nothing is read back to the host. Import this module through amm_kernels.triton_backend: that module
decides, before triton is first imported, whether the kernels run compiled or interpreted.
"""
from __future__ import annotations

import torch

from ._step import StepBatch
from .reference.pinv import gram_pinv_apply
from .reference.rllc_reference import gram_full_index
from .triton_kernels.rllc_kernels import rllc_combine_kernel, rllc_reduce_kernel, rllc_update_kernel
from .triton_kernels import tensor_table
from .triton_kernels.tensor_table import get_table

# float64 elements of the combine kernel's [CHUNK, NP2] tile: CHUNK = TILE / NP2 slots a step. With the
# kernel's 8 warps (tb.KERNEL_OPTIONS) that is 32 a thread, as 4096 were with 4 warps: 160 registers
# (sm_90). 16 warps and 16384 would cap a thread at 128 registers, and it spilled 64-72 bytes.
TILE = 8192


def _combine_chunk(np2: int) -> int:
    """Slots per step of the combine kernel: as many as a TILE holds, at least 64. One program sums all
    its scope's slots (NOTE [finalize tiles] in triton_kernels/finalize_kernel.py): for k = 2 (8
    columns) 1024 slots a step, for k = 8 (64 columns) 128."""
    return max(64, TILE // np2)


def _next_p2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


class _RLLCScratch:
    """Per parameter list (attached to its cached tensor_table.Table) and memory rule: U and b as
    float32 device tensors, the float64 partial sums, the per-scope sums, and the gather index that
    unfolds the Gram entries into k x k matrices. Fixed addresses across steps (CUDA-graph friendly),
    shared with the table's rebased copies (NOTE [shared scratch] in triton_kernels/tensor_table.py)."""

    def __init__(self, table, hp, device):
        k = hp.k
        self.n_pairs = k * (k + 1) // 2
        self.n_sums = self.n_pairs + k
        self.U = torch.tensor(hp.U, dtype=torch.float32).reshape(k, k).to(device)
        self.b = torch.tensor(hp.b, dtype=torch.float32).reshape(k).to(device)
        self.partials = torch.zeros((max(table.n_slots, 1), self.n_sums), dtype=torch.float64, device=device)
        self.sums = torch.zeros((table.present_scopes.numel(), self.n_sums), dtype=torch.float64, device=device)
        self.full_index = gram_full_index(k, device)


def _scratch(table, hp, device) -> _RLLCScratch:
    key = ("rllc", hp.U, hp.b)
    if key not in table.extras:
        if tensor_table.capturing(device):
            raise RuntimeError(
                "backend 'triton' copies a new memory rule's matrices to the GPU, which a CUDA graph capture does "
                "not allow: run at least one step of this optimizer outside the capture first (the usual warm-up)")
        table.extras[key] = _RLLCScratch(table, hp, device)
    return table.extras[key]


@torch.no_grad()
def rllc_step(batch: StepBatch, hp) -> None:
    from . import triton_backend as tb  # fully imported by now (it imports this module at its end)

    with tb.on_params_device(batch):  # NOTE [device guard] in triton_backend.py
        _rllc_step(batch, hp, tb)


def _rllc_step(batch: StepBatch, hp, tb) -> None:
    if (type(rllc_update_kernel).__name__ == "InterpretedFunction") != tb.INTERPRETED:
        raise RuntimeError(
            "amm_kernels.triton_rllc was first imported with a different TRITON_INTERPRET than "
            "amm_kernels.triton_backend, so its kernels are built for the other mode; import it through "
            "amm_kernels.triton_backend (or with the same TRITON_INTERPRET)"
        )

    params, grads, d, _, writeback = tb._flat_tensors(batch)
    k = hp.k
    KP2 = max(2, _next_p2(k))  # tile rows (a 1-row arange is avoided; rows >= k are masked)
    table = get_table(params, grads, d, None, batch, tb.BLOCK, 0, state_units=hp.k)  # n_sums 0: the float64 buffer is ours
    device = params[0].device
    sc = _scratch(table, hp, device)
    state = batch.scopes
    n_scopes = len(batch.present_scopes)
    has_scale = batch.grad_scale is not None
    grad_scale = batch.grad_scale.to(device) if has_scale else sc.partials  # dummy: never read
    has_inf = batch.found_inf is not None
    found_inf = batch.found_inf.to(device) if has_inf else sc.partials

    # pass 1: per-block float64 sums of the previous memory
    for bucket in table.buckets:
        if bucket.n_blocks == 0:
            continue
        _, cg, cd, _ = bucket.codes
        rllc_reduce_kernel[(bucket.n_blocks,)](
            table.meta, bucket.blocks, sc.partials, grad_scale,
            HAS_GRAD_SCALE=has_scale, G_CODE=cg, D_CODE=cd, K=k, KP2=KP2, N_SUMS=sc.n_sums, BLOCK=tb.BLOCK, **tb.LAUNCH)
    rllc_combine_kernel[(n_scopes,)](
        table.slot_start, table.tensor_start, sc.partials, sc.sums,
        N_SUMS=sc.n_sums, NP2=_next_p2(sc.n_sums), CHUNK=_combine_chunk(_next_p2(sc.n_sums)), **tb.COMBINE_LAUNCH)
    sums = sc.sums
    if batch.process_group is not None:  # sharded parameters: the whole model's sums (no host sync)
        sums = batch.all_reduce_scope_sums(sums)  # NOTE [sums by scope] in _step.py
        if has_inf:  # every rank's, summed: one rank's inf skips the step on all
            found_inf = batch.found_inf.to(device)

    # the law per present scope, on the device
    gram = sums[:, sc.full_index].reshape(n_scopes, k, k)
    correction = gram_pinv_apply(gram, sums[:, sc.n_pairs:], hp.rcond)  # NaN for non-finite sums
    scopes = batch.index("present_scopes")
    law_old = state.law[scopes].double()
    first_step = state.step[scopes] == 0
    law_new = torch.where(first_step[:, None], law_old, law_old + hp.law_lr * correction).to(state.law.dtype)
    law32 = law_new.to(torch.float32).contiguous()

    # pass 2: memory and parameters
    for bucket in table.buckets:
        if bucket.n_blocks == 0:
            continue
        cx, cg, cd, _ = bucket.codes
        rllc_update_kernel[(bucket.n_blocks,)](
            table.meta, bucket.blocks, bucket.n_blocks, law32, sc.U, sc.b, batch.lr, grad_scale, found_inf,
            HAS_GRAD_SCALE=has_scale, HAS_FOUND_INF=has_inf, X_CODE=cx, G_CODE=cg, D_CODE=cd, K=k, KP2=KP2,
            BLOCK=tb.BLOCK, **tb.LAUNCH)

    skip = batch.skip
    for name, new in (("step", state.step[scopes] + 1), ("law", law_new)):
        field = getattr(state, name)
        field[scopes] = new if skip is None else torch.where(skip, field[scopes], new.to(field.dtype))

    for dst, src in writeback:
        dst.copy_(src)

"""RLLC's kernels (SPEC.md section 4), driven by amm_kernels/triton_rllc.py.

pass 1   rllc_reduce_kernel: per block of BLOCK elements, the k(k+1)/2 Gram entries <m_a, m_b> (a <= b,
         gram_pairs order) and the k entries <m_a, g> of the previous memory, written to the block's own
         row of a float64 partial-sum buffer (no atomics). The float32 values are multiplied and summed
         in float64, as the reference does (rllc_reference.py NOTE [Gram precision]).
combine  rllc_combine_kernel: one program per present scope sums its slots (contiguous: tensors are
         in scope order, slots in tensor order) in a fixed order, CHUNK rows at a time, in float64.
pass 2   rllc_update_kernel: M <- M U + g b^T and theta <- theta - lr M L in one sweep, with U, b, the
         scope's new law L and lr read through pointers; nothing is stored when found_inf > 0.

The memory of tensor t is its state tensor at meta's d address, k units of numel elements each.
k is a constexpr (KP2 = next power of two >= k for the tiles); the tensors are walked through the
pointer table of tensor_table.py, one launch per dtype bucket. As the AM passes, a block wholly inside a
tensor whose addresses are 16-byte aligned, and whose numel is a multiple of 8 (so that every memory
unit is aligned too), takes the unmasked 16-byte path (NOTE [vector access] in tensor_table.py).
"""
import triton
import triton.language as tl

from .rllc_math import (gram_first_slot, law_direction, memory_input, memory_propagate, rllc_grad, rllc_param,
                        unit_dots)
from .tensor_table import as_ptr, grad_scale_of, load_f32, store_as, whole_block
from .update_kernels import _block, _skip


@triton.jit
def _rllc_whole(row, start, numel, BLOCK: tl.constexpr):
    """The WHOLE path (NOTE [vector access] in tensor_table.py) for a block of an RLLC tensor: besides
    whole_block's test, every memory unit must start on a 16-byte boundary too (unit a is at element
    a * numel), which a numel that is a multiple of 8 guarantees for 4- and 2-byte elements alike."""
    return whole_block(row, start, numel, BLOCK) & ((numel % 8) == 0)


@triton.jit
def _unit_stride(row, numel, WHOLE: tl.constexpr):
    """Elements from one memory unit to the next (the tensor's numel). On the WHOLE path it is loaded
    again and declared a multiple of 8 (_rllc_whole has checked it), so that every unit's row is known
    16-byte aligned: the hint must be on an operation of this function (NOTE [vector access])."""
    if WHOLE:
        stride = tl.multiple_of(tl.load(row + 4), 8)
    else:
        stride = numel
    return stride


@triton.jit
def _unit_tile(d, units, stride, numel, offs, K: tl.constexpr, KP2: tl.constexpr, BLOCK: tl.constexpr,
               WHOLE: tl.constexpr):
    """The block's [KP2, BLOCK] tile of the memory units (rows >= K load nothing, as 0), as float32.
    On the WHOLE path the only mask is the row test, uniform along a row, so each row's loads stay
    16-byte ones."""
    ptrs = d + units[:, None].to(tl.int64) * stride + offs[None, :]
    if WHOLE:
        if KP2 == K:
            tile = tl.load(ptrs)
        else:
            tile = tl.load(ptrs, mask=tl.broadcast_to(units[:, None] < K, (KP2, BLOCK)), other=0.0)
    else:
        unit_lim = tl.where(units < K, numel, 0)  # [KP2]: rows past k load nothing
        tile = tl.load(ptrs, mask=offs[None, :] < unit_lim[:, None], other=0.0)
    return tile.to(tl.float32)


@triton.jit
def _rllc_sums_block(row, offs, numel, slot, partials, grad_scale_ptr, HAS_GRAD_SCALE: tl.constexpr,
                     G_CODE: tl.constexpr, D_CODE: tl.constexpr, K: tl.constexpr, KP2: tl.constexpr,
                     N_SUMS: tl.constexpr, BLOCK: tl.constexpr, WHOLE: tl.constexpr):
    mask = offs < numel
    scale = grad_scale_of(grad_scale_ptr, HAS_GRAD_SCALE)
    grad = load_f32(tl.load(row + 1), offs, mask, G_CODE, WHOLE)
    g = rllc_grad(grad, scale, HAS_GRAD_SCALE)
    if not WHOLE:
        g = tl.where(mask, g, 0.0)
    d = as_ptr(tl.load(row + 2), D_CODE, WHOLE)
    units = tl.arange(0, KP2)
    stride = _unit_stride(row, numel, WHOLE)
    m2 = _unit_tile(d, units, stride, numel, offs, K, KP2, BLOCK, WHOLE).to(tl.float64)
    out = partials + slot * N_SUMS
    for a in tl.static_range(K):
        # unit a again as a row vector (Triton cannot take one row out of a tensor)
        if WHOLE:
            m_a = tl.load(d + a * stride + offs)
        else:
            m_a = tl.load(d + a * stride + offs, mask=mask, other=0.0)
        m_a = m_a.to(tl.float32).to(tl.float64)
        # entries (a, b) for b = a .. K-1, at gram_first_slot(a) + b - a
        tl.store(out + gram_first_slot(a, K) - a + units, unit_dots(m2, m_a), mask=(units >= a) & (units < K))
    N_PAIRS: tl.constexpr = K * (K + 1) // 2
    tl.store(out + N_PAIRS + units, unit_dots(m2, g.to(tl.float64)), mask=units < K)


@triton.jit
def rllc_reduce_kernel(
    meta, blocks, partials, grad_scale_ptr,
    HAS_GRAD_SCALE: tl.constexpr, G_CODE: tl.constexpr, D_CODE: tl.constexpr,
    K: tl.constexpr, KP2: tl.constexpr, N_SUMS: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    t = tl.load(blocks + pid * 2)
    j = tl.load(blocks + pid * 2 + 1)
    row = meta + t * 8  # META_COLS
    numel = tl.load(row + 4)
    start = j * BLOCK
    offs = start + tl.arange(0, BLOCK).to(tl.int64)
    slot = tl.load(row + 7) + j
    if _rllc_whole(row, start, numel, BLOCK):  # NOTE [vector access]
        _rllc_sums_block(row, offs, numel, slot, partials, grad_scale_ptr, HAS_GRAD_SCALE, G_CODE, D_CODE, K, KP2,
                         N_SUMS, BLOCK, True)
    else:
        _rllc_sums_block(row, offs, numel, slot, partials, grad_scale_ptr, HAS_GRAD_SCALE, G_CODE, D_CODE, K, KP2,
                         N_SUMS, BLOCK, False)


@triton.jit
def rllc_combine_kernel(
    slot_start, tensor_start, partials, sums,
    N_SUMS: tl.constexpr, NP2: tl.constexpr, CHUNK: tl.constexpr,
):
    s = tl.program_id(0).to(tl.int64)
    first = tl.load(slot_start + tl.load(tensor_start + s))
    last = tl.load(slot_start + tl.load(tensor_start + s + 1))
    cols = tl.arange(0, NP2)
    col_lim = tl.where(cols < N_SUMS, last, 0)  # [NP2]: columns past N_SUMS load nothing
    acc = tl.zeros([CHUNK, NP2], tl.float64)
    for c in range(first, last, CHUNK):
        rows = c + tl.arange(0, CHUNK).to(tl.int64)
        acc += tl.load(partials + rows[:, None] * N_SUMS + cols[None, :], mask=rows[:, None] < col_lim[None, :],
                       other=0.0)
    tl.store(sums + s * N_SUMS + cols, tl.sum(acc, axis=0), mask=cols < N_SUMS)


@triton.jit
def _rllc_update_block(row, offs, lim, numel, law, u_ptr, b_ptr, lr_ptr, grad_scale_ptr,
                       HAS_GRAD_SCALE: tl.constexpr, X_CODE: tl.constexpr, G_CODE: tl.constexpr,
                       D_CODE: tl.constexpr, K: tl.constexpr, KP2: tl.constexpr, BLOCK: tl.constexpr,
                       WHOLE: tl.constexpr):
    """One block's pass 2, stored where offs < lim (lim 0: the step is skipped; on the WHOLE path the
    caller has made sure that nothing is masked but the rows >= K)."""
    mask = offs < lim
    x_addr = tl.load(row + 0)
    d_addr = tl.load(row + 2)
    x = load_f32(x_addr, offs, mask, X_CODE, WHOLE)
    grad = load_f32(tl.load(row + 1), offs, mask, G_CODE, WHOLE)
    scale = grad_scale_of(grad_scale_ptr, HAS_GRAD_SCALE)
    g = rllc_grad(grad, scale, HAS_GRAD_SCALE)
    units = tl.arange(0, KP2)
    in_k = units < K
    # M U + g b^T from the previous memory: every unit is read before any is stored
    m_new = memory_input(g, tl.load(b_ptr + units, mask=in_k, other=0.0))
    d = as_ptr(d_addr, D_CODE, WHOLE)
    stride = _unit_stride(row, numel, WHOLE)
    for c in tl.static_range(K):
        if WHOLE:
            m_c = tl.load(d + c * stride + offs)
        else:
            m_c = tl.load(d + c * stride + offs, mask=mask, other=0.0)
        m_new = memory_propagate(m_new, m_c.to(tl.float32), tl.load(u_ptr + c * K + units, mask=in_k, other=0.0))
    m_new = tl.where(in_k[:, None], m_new, 0.0)  # rows past k: 0 (not 0 * inf)
    s = tl.load(row + 6)
    direction = law_direction(m_new, tl.load(law + s * K + units, mask=in_k, other=0.0))
    lr = tl.load(lr_ptr + tl.load(row + 5)).to(tl.float32)
    x_new = rllc_param(x, direction, lr)
    rows = units[:, None].to(tl.int64) * stride + offs[None, :]
    if WHOLE:
        # rows >= K do not exist: on the WHOLE path the row test is the only mask (uniform along a row)
        store_as(d_addr, rows, m_new, tl.broadcast_to(units[:, None] < K, (KP2, BLOCK)), D_CODE, True, KP2 != K)
    else:
        unit_lim = tl.where(in_k, lim, 0)  # [KP2]
        store_as(d_addr, rows, m_new, offs[None, :] < unit_lim[:, None], D_CODE)
    store_as(x_addr, offs, x_new, mask, X_CODE, WHOLE)


@triton.jit
def rllc_update_kernel(
    meta, blocks, n_blocks, law, u_ptr, b_ptr, lr_ptr, grad_scale_ptr, found_inf_ptr,
    HAS_GRAD_SCALE: tl.constexpr, HAS_FOUND_INF: tl.constexpr,
    X_CODE: tl.constexpr, G_CODE: tl.constexpr, D_CODE: tl.constexpr,
    K: tl.constexpr, KP2: tl.constexpr, BLOCK: tl.constexpr,
):
    skip = _skip(found_inf_ptr, HAS_FOUND_INF)
    row, start, offs, lim = _block(meta, blocks, n_blocks, BLOCK)
    numel = tl.load(row + 4)
    keep_lim = tl.where(skip == 0, lim, 0)
    if _rllc_whole(row, start, keep_lim, BLOCK):  # NOTE [vector access]; never when skipped (keep_lim 0)
        _rllc_update_block(row, offs, keep_lim, numel, law, u_ptr, b_ptr, lr_ptr, grad_scale_ptr, HAS_GRAD_SCALE,
                           X_CODE, G_CODE, D_CODE, K, KP2, BLOCK, True)
    else:
        _rllc_update_block(row, offs, keep_lim, numel, law, u_ptr, b_ptr, lr_ptr, grad_scale_ptr, HAS_GRAD_SCALE,
                           X_CODE, G_CODE, D_CODE, K, KP2, BLOCK, False)

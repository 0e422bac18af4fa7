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
pointer table of tensor_table.py, one launch per dtype bucket.
"""
import triton
import triton.language as tl

from .rllc_math import (gram_first_slot, law_direction, memory_input, memory_propagate, rllc_grad, rllc_param,
                        unit_dots)
from .tensor_table import as_ptr, store_as
from .update_kernels import _block, _skip


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
    offs = j * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = offs < numel
    slot = tl.load(row + 7) + j
    scale = 1.0
    if HAS_GRAD_SCALE:
        scale = tl.load(grad_scale_ptr).to(tl.float32)
    grad = tl.load(as_ptr(tl.load(row + 1), G_CODE) + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.where(mask, rllc_grad(grad, scale, HAS_GRAD_SCALE), 0.0)
    d = as_ptr(tl.load(row + 2), D_CODE)
    units = tl.arange(0, KP2)
    unit_lim = tl.where(units < K, numel, 0)  # [KP2]: rows past k load nothing
    m2 = tl.load(d + units[:, None].to(tl.int64) * numel + offs[None, :], mask=offs[None, :] < unit_lim[:, None],
                 other=0.0).to(tl.float32).to(tl.float64)
    out = partials + slot * N_SUMS
    for a in tl.static_range(K):
        m_a = tl.load(d + a * numel + offs, mask=mask, other=0.0).to(tl.float32).to(tl.float64)
        # entries (a, b) for b = a .. K-1, at gram_first_slot(a) + b - a
        tl.store(out + gram_first_slot(a, K) - a + units, unit_dots(m2, m_a), mask=(units >= a) & (units < K))
    N_PAIRS: tl.constexpr = K * (K + 1) // 2
    tl.store(out + N_PAIRS + units, unit_dots(m2, g.to(tl.float64)), mask=units < K)


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
def rllc_update_kernel(
    meta, blocks, n_blocks, law, u_ptr, b_ptr, lr_ptr, grad_scale_ptr, found_inf_ptr,
    HAS_GRAD_SCALE: tl.constexpr, HAS_FOUND_INF: tl.constexpr,
    X_CODE: tl.constexpr, G_CODE: tl.constexpr, D_CODE: tl.constexpr,
    K: tl.constexpr, KP2: tl.constexpr, BLOCK: tl.constexpr,
):
    skip = _skip(found_inf_ptr, HAS_FOUND_INF)
    row, _, offs, lim = _block(meta, blocks, n_blocks, BLOCK)
    mask = offs < lim
    numel = tl.load(row + 4)
    x_addr = tl.load(row + 0)
    d_addr = tl.load(row + 2)
    x = tl.load(as_ptr(x_addr, X_CODE) + offs, mask=mask, other=0.0).to(tl.float32)
    grad = tl.load(as_ptr(tl.load(row + 1), G_CODE) + offs, mask=mask, other=0.0).to(tl.float32)
    scale = 1.0
    if HAS_GRAD_SCALE:
        scale = tl.load(grad_scale_ptr).to(tl.float32)
    g = rllc_grad(grad, scale, HAS_GRAD_SCALE)
    units = tl.arange(0, KP2)
    in_k = units < K
    # M U + g b^T from the previous memory: every unit is read before any is stored
    m_new = memory_input(g, tl.load(b_ptr + units, mask=in_k, other=0.0))
    d = as_ptr(d_addr, D_CODE)
    for c in tl.static_range(K):
        m_c = tl.load(d + c * numel + offs, mask=mask, other=0.0).to(tl.float32)
        m_new = memory_propagate(m_new, m_c, tl.load(u_ptr + c * K + units, mask=in_k, other=0.0))
    m_new = tl.where(in_k[:, None], m_new, 0.0)  # rows past k: 0 (not 0 * inf)
    s = tl.load(row + 6)
    direction = law_direction(m_new, tl.load(law + s * K + units, mask=in_k, other=0.0))
    lr = tl.load(lr_ptr + tl.load(row + 5)).to(tl.float32)
    x_new = rllc_param(x, direction, lr)
    keep_lim = tl.where(skip == 0, lim, 0)
    unit_lim = tl.where(in_k, keep_lim, 0)  # [KP2]
    store_as(d_addr, units[:, None].to(tl.int64) * numel + offs[None, :], m_new, offs[None, :] < unit_lim[:, None],
             D_CODE)
    store_as(x_addr, offs, x_new, offs < keep_lim, X_CODE)

"""Pass 1: per block, the float32 sums of beta's terms, written to the block's own slot (no atomics).

Grid: one program per row of a bucket's block table. Slot k of block b holds sum k of SPEC.md
(amm_math.h AmsgdSum / AdamwSum order). AMAdamW's second moment is formed in registers, not stored.
A whole, aligned block takes the unmasked 16-byte path, the rest the masked one (NOTE [vector access]
in tensor_table.py); both run the same block function and sum in the same order.
"""
import triton
import triton.language as tl

from .am_math import adamw_precond, adamw_second_moment, amadamw_terms, amsgd_terms, effective_grad
from .tensor_table import as_ptr, load_f32, whole_block


@triton.jit
def _block_rows(meta, blocks, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    t = tl.load(blocks + pid * 2)
    j = tl.load(blocks + pid * 2 + 1)
    row = meta + t * 8  # META_COLS (a literal: globals in @jit must be constexpr)
    numel = tl.load(row + 4)
    start = j * BLOCK
    offs = start + tl.arange(0, BLOCK).to(tl.int64)
    slot = tl.load(row + 7) + j
    return row, start, offs, numel, slot


@triton.jit
def _load_x_if_decay(row, offs, mask, decay, X_CODE: tl.constexpr, BLOCK: tl.constexpr, WHOLE: tl.constexpr):
    """x as float32 where the tensor's group has weight decay, else 0 without reading it: pass 1 needs
    x only for the decay terms (AMSGD's coupled L2, the reference adds wd * x only then; AMAdamW:
    NOTE [x in pass 1] in amadamw_reference.py). The scalar test is broadcast to a block explicitly:
    Triton's interpreter cannot `&` a block mask with a scalar. On the WHOLE path the mask is that
    broadcast test alone, uniform over the block, so the load stays a 16-byte one."""
    has_decay = tl.zeros((BLOCK,), tl.float32) + decay != 0.0
    ptr = as_ptr(tl.load(row + 0), X_CODE, WHOLE)
    if WHOLE:
        x = tl.load(ptr + offs, mask=has_decay, other=0.0)
    else:
        x = tl.load(ptr + offs, mask=mask & has_decay, other=0.0)
    return x.to(tl.float32)


@triton.jit
def _amsgd_sums_block(row, offs, mask, slot, partials, weight_decay, grad_scale_ptr, lam,
                      HAS_GRAD_SCALE: tl.constexpr, MAXIMIZE: tl.constexpr, X_CODE: tl.constexpr,
                      G_CODE: tl.constexpr, D_CODE: tl.constexpr, BLOCK: tl.constexpr, WHOLE: tl.constexpr):
    wd = tl.load(weight_decay + tl.load(row + 5))
    x = _load_x_if_decay(row, offs, mask, wd, X_CODE, BLOCK, WHOLE)
    grad = load_f32(tl.load(row + 1), offs, mask, G_CODE, WHOLE)
    d = load_f32(tl.load(row + 2), offs, mask, D_CODE, WHOLE)
    scale = 1.0
    if HAS_GRAD_SCALE:
        scale = tl.load(grad_scale_ptr).to(tl.float32)
    g = effective_grad(grad, x, scale, HAS_GRAD_SCALE, MAXIMIZE, wd)
    gd, b, dd = amsgd_terms(g, d, lam)
    out = partials + slot * 3
    tl.store(out + 0, tl.sum(tl.where(mask, gd, 0.0), axis=0))
    tl.store(out + 1, tl.sum(tl.where(mask, b, 0.0), axis=0))
    tl.store(out + 2, tl.sum(tl.where(mask, dd, 0.0), axis=0))


@triton.jit
def amsgd_reduce_kernel(
    meta, blocks, partials, weight_decay, grad_scale_ptr, lam,
    HAS_GRAD_SCALE: tl.constexpr, MAXIMIZE: tl.constexpr,
    X_CODE: tl.constexpr, G_CODE: tl.constexpr, D_CODE: tl.constexpr, BLOCK: tl.constexpr,
):
    row, start, offs, numel, slot = _block_rows(meta, blocks, BLOCK)
    if whole_block(row, start, numel, BLOCK):  # NOTE [vector access]
        _amsgd_sums_block(row, offs, offs < numel, slot, partials, weight_decay, grad_scale_ptr, lam,
                          HAS_GRAD_SCALE, MAXIMIZE, X_CODE, G_CODE, D_CODE, BLOCK, True)
    else:
        _amsgd_sums_block(row, offs, offs < numel, slot, partials, weight_decay, grad_scale_ptr, lam,
                          HAS_GRAD_SCALE, MAXIMIZE, X_CODE, G_CODE, D_CODE, BLOCK, False)


@triton.jit
def _amadamw_sums_block(row, offs, mask, slot, partials, weight_decay, grad_scale_ptr, bias, n_scopes, lam,
                        beta2, one_minus_beta2, eps, HAS_GRAD_SCALE: tl.constexpr, MAXIMIZE: tl.constexpr,
                        X_CODE: tl.constexpr, G_CODE: tl.constexpr, D_CODE: tl.constexpr, V_CODE: tl.constexpr,
                        BLOCK: tl.constexpr, WHOLE: tl.constexpr):
    mu = tl.load(weight_decay + tl.load(row + 5))
    x = _load_x_if_decay(row, offs, mask, mu, X_CODE, BLOCK, WHOLE)
    grad = load_f32(tl.load(row + 1), offs, mask, G_CODE, WHOLE)
    d = load_f32(tl.load(row + 2), offs, mask, D_CODE, WHOLE)
    v = load_f32(tl.load(row + 3), offs, mask, V_CODE, WHOLE)
    s = tl.load(row + 6)
    bias1 = tl.load(bias + s)
    bias2 = tl.load(bias + n_scopes + s)
    scale = 1.0
    if HAS_GRAD_SCALE:
        scale = tl.load(grad_scale_ptr).to(tl.float32)
    g = effective_grad(grad, x, scale, HAS_GRAD_SCALE, MAXIMIZE, 0.0)
    v_new = adamw_second_moment(g, v, beta2, one_minus_beta2)
    p = adamw_precond(v_new, bias1, bias2, eps)
    a, b, c, dd = amadamw_terms(g, d, x, p, lam, mu)
    out = partials + slot * 4
    tl.store(out + 0, tl.sum(tl.where(mask, a, 0.0), axis=0))
    tl.store(out + 1, tl.sum(tl.where(mask, b, 0.0), axis=0))
    tl.store(out + 2, tl.sum(tl.where(mask, c, 0.0), axis=0))
    tl.store(out + 3, tl.sum(tl.where(mask, dd, 0.0), axis=0))


@triton.jit
def amadamw_reduce_kernel(
    meta, blocks, partials, weight_decay, grad_scale_ptr, bias, n_scopes, lam, beta2, one_minus_beta2, eps,
    HAS_GRAD_SCALE: tl.constexpr, MAXIMIZE: tl.constexpr,
    X_CODE: tl.constexpr, G_CODE: tl.constexpr, D_CODE: tl.constexpr, V_CODE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row, start, offs, numel, slot = _block_rows(meta, blocks, BLOCK)
    if whole_block(row, start, numel, BLOCK):  # NOTE [vector access]
        _amadamw_sums_block(row, offs, offs < numel, slot, partials, weight_decay, grad_scale_ptr, bias, n_scopes,
                            lam, beta2, one_minus_beta2, eps, HAS_GRAD_SCALE, MAXIMIZE, X_CODE, G_CODE, D_CODE,
                            V_CODE, BLOCK, True)
    else:
        _amadamw_sums_block(row, offs, offs < numel, slot, partials, weight_decay, grad_scale_ptr, bias, n_scopes,
                            lam, beta2, one_minus_beta2, eps, HAS_GRAD_SCALE, MAXIMIZE, X_CODE, G_CODE, D_CODE,
                            V_CODE, BLOCK, False)

"""Pass 1: per span of ITERS blocks, the float32 sums of beta's terms, written to the span's own slot
(no atomics).

Grid: one program per row of a bucket's span table (Bucket.spans). Slot k of a span holds sum k of
SPEC.md (amm_math.h AmsgdSum / AdamwSum order). AMAdamW's second moment is formed in registers, not
stored. A whole, aligned span takes the unmasked 16-byte path, the rest the masked one (NOTE [vector
access] in tensor_table.py); both run the same block function and sum in the same order: the span's
blocks one after another into per-lane accumulators, then one tl.sum.

NOTE [pass-1 spans]: on an H200 (bench/results/kernel_breakdown_nvidia_h200.csv) AM-AdamW's pass 1
ran at 0.72 of copy bandwidth (16 bytes an element; 0.55 at 12 bytes without weight decay, in the same
time), where the update, with one program per block of the same 1,024 elements, ran at 0.98. Read off
the sm_90 builds (bench/triton_occupancy.py; bench/README.md, "Pass 1 by the registers"): this kernel
takes 92 registers, so 5 programs of 1,024 elements share an SM, 80 KiB of its loads (60 without
weight decay) against 96-168 KiB for the AM kernels that ran at 0.89-1.00; and each program spends a
good part of its short life on its prologue (the table row, then the addresses in it: dependent loads)
and its four block reductions, with no loads in flight. A span of ITERS blocks pays the prologue and
the reductions once for ITERS blocks, looping over them, but takes 128 registers: 4 programs, 64 KiB.
Which effect wins is for a GPU to say (bench/bench_triton_variants.py, variants iters4 and iters8,
beside BLOCK 2048 and 4096, which hold more bytes and pay the prologue less often, but spill at 4096).
ITERS is triton_backend.PASS1_ITERS: 1 by default, the kernel as it was measured.

NOTE [pass-1 stages]: a span's loop may also be software-pipelined (tl.range's num_stages = STAGES,
triton_backend.PASS1_STAGES): Triton then copies the next blocks' loads into shared memory with
cp.async while the current block is summed, so a block's loads are issued ahead of its arithmetic.
It costs registers (read off the sm_90 builds, AM-AdamW at ITERS = 8: 128 plain, 196 with 3 stages on
triton 3.6, 168 on 3.9 before the whole path lost its mask (NOTE [no mask on the whole path]); 127
plain, 168 and 162 since), so fewer programs share an SM (4 -> 3), and at most two blocks a program
are outstanding: by the count of bench/README.md ("Pass 1 by the registers") 96 KiB an SM on both
tritons against the shipped 80 (on 3.6 it was 2 programs, 64 KiB, with the mask). The variant tests
whether loads issued ahead help beyond what the count sees. With STAGES = 1
the loop is the plain one (the same SASS as before STAGES existed, both tritons). Its sums are those
of the plain loop, in the same order. Whether it pays is for a GPU to say (bench/bench_triton_variants.py,
variant iters8_staged3); 1 by default.

NOTE [no mask on the whole path]: a WHOLE span lies inside its tensor, so its terms are summed as they
are; only the masked path zeroes the lanes past the tensor's end (tl.where), as RLLC's pass 1 does.
Triton cannot see that the mask is all true on the WHOLE path: with the tl.where on both paths, every
element's int64 offset was compared with numel and every term selected. Counted in the sm_90 SASS
(float32, no grad scale; the instructions a thread executes on the WHOLE path, the divisions' slow-path
calls left out; 2026-12-01): AM-AdamW 772 -> 710 for 8 elements a thread with triton 3.6 (96.5 -> 88.8
an element; 752 -> 690 with 3.9), AM-SGD 288 -> 241 (272 -> 224). The sums are bit-identical:
tl.where(True, t, 0.0) is t.
"""
import triton
import triton.language as tl

from .am_math import adamw_precond, adamw_second_moment, amadamw_terms, amsgd_terms, effective_grad
from .tensor_table import as_ptr, grad_scale_of, load_f32, whole_block


@triton.jit
def _span_rows(meta, spans, SPAN: tl.constexpr):
    """This program's tensor row, the first element of its span of SPAN elements, the tensor's size and
    the span's slot."""
    pid = tl.program_id(0).to(tl.int64)
    t = tl.load(spans + pid * 2)
    j = tl.load(spans + pid * 2 + 1)
    row = meta + t * 8  # META_COLS (a literal: globals in @jit must be constexpr)
    numel = tl.load(row + 4)
    slot = tl.load(row + 7) + j
    return row, j * SPAN, numel, slot


@triton.jit
def _load_x_if_decay(x_addr, offs, mask, decay, X_CODE: tl.constexpr, BLOCK: tl.constexpr, WHOLE: tl.constexpr):
    """x as float32 where the tensor's group has weight decay, else 0 without reading it: pass 1 needs
    x only for the decay terms (AMSGD's coupled L2, the reference adds wd * x only then; AMAdamW:
    NOTE [x in pass 1] in amadamw_reference.py). The scalar test is broadcast to a block explicitly:
    Triton's interpreter cannot `&` a block mask with a scalar. On the WHOLE path the mask is that
    broadcast test alone, uniform over the block, so the load stays a 16-byte one."""
    has_decay = tl.zeros((BLOCK,), tl.float32) + decay != 0.0
    ptr = as_ptr(x_addr, X_CODE, WHOLE)
    if WHOLE:
        x = tl.load(ptr + offs, mask=has_decay, other=0.0)
    else:
        x = tl.load(ptr + offs, mask=mask & has_decay, other=0.0)
    return x.to(tl.float32)


# ---------------------------------------------------------------------------------------------
# AM-SGD
@triton.jit
def _amsgd_terms_block(x_addr, g_addr, d_addr, start, numel, wd, scale, lam, HAS_GRAD_SCALE: tl.constexpr,
                       MAXIMIZE: tl.constexpr, X_CODE: tl.constexpr, G_CODE: tl.constexpr, D_CODE: tl.constexpr,
                       BLOCK: tl.constexpr, WHOLE: tl.constexpr):
    """The three terms of the block of BLOCK elements from `start`, 0 past the tensor's end."""
    offs = start + tl.arange(0, BLOCK).to(tl.int64)
    mask = offs < numel
    x = _load_x_if_decay(x_addr, offs, mask, wd, X_CODE, BLOCK, WHOLE)
    grad = load_f32(g_addr, offs, mask, G_CODE, WHOLE)
    d = load_f32(d_addr, offs, mask, D_CODE, WHOLE)
    g = effective_grad(grad, x, scale, HAS_GRAD_SCALE, MAXIMIZE, wd)
    gd, b, dd = amsgd_terms(g, d, lam)
    if not WHOLE:  # NOTE [no mask on the whole path]
        gd, b, dd = tl.where(mask, gd, 0.0), tl.where(mask, b, 0.0), tl.where(mask, dd, 0.0)
    return gd, b, dd


@triton.jit
def _amsgd_span(row, start, numel, slot, partials, weight_decay, grad_scale_ptr, lam,
                HAS_GRAD_SCALE: tl.constexpr, MAXIMIZE: tl.constexpr, X_CODE: tl.constexpr, G_CODE: tl.constexpr,
                D_CODE: tl.constexpr, BLOCK: tl.constexpr, ITERS: tl.constexpr, STAGES: tl.constexpr,
                WHOLE: tl.constexpr):
    """NOTE [pass-1 spans]: the span's blocks summed lane by lane, then over the block into the slot.
    The first block starts the sums (no 0 + term), so with ITERS = 1 this is the kernel as measured."""
    xa, ga, da = tl.load(row + 0), tl.load(row + 1), tl.load(row + 2)  # addresses: read once a span
    wd = tl.load(weight_decay + tl.load(row + 5))
    scale = grad_scale_of(grad_scale_ptr, HAS_GRAD_SCALE)
    gd, b, dd = _amsgd_terms_block(xa, ga, da, start, numel, wd, scale, lam, HAS_GRAD_SCALE, MAXIMIZE,
                                   X_CODE, G_CODE, D_CODE, BLOCK, WHOLE)
    for i in tl.range(1, ITERS, num_stages=STAGES):  # NOTE [pass-1 stages]
        gd_i, b_i, dd_i = _amsgd_terms_block(xa, ga, da, start + i * BLOCK, numel, wd, scale, lam, HAS_GRAD_SCALE,
                                             MAXIMIZE, X_CODE, G_CODE, D_CODE, BLOCK, WHOLE)
        gd += gd_i
        b += b_i
        dd += dd_i
    out = partials + slot * 3
    tl.store(out + 0, tl.sum(gd, axis=0))
    tl.store(out + 1, tl.sum(b, axis=0))
    tl.store(out + 2, tl.sum(dd, axis=0))


@triton.jit
def amsgd_reduce_kernel(
    meta, spans, partials, weight_decay, grad_scale_ptr, lam,
    HAS_GRAD_SCALE: tl.constexpr, MAXIMIZE: tl.constexpr,
    X_CODE: tl.constexpr, G_CODE: tl.constexpr, D_CODE: tl.constexpr, BLOCK: tl.constexpr,
    ITERS: tl.constexpr = 1, STAGES: tl.constexpr = 1,
):
    row, start, numel, slot = _span_rows(meta, spans, BLOCK * ITERS)
    if whole_block(row, start, numel, BLOCK * ITERS):  # NOTE [vector access]
        _amsgd_span(row, start, numel, slot, partials, weight_decay, grad_scale_ptr, lam,
                    HAS_GRAD_SCALE, MAXIMIZE, X_CODE, G_CODE, D_CODE, BLOCK, ITERS, STAGES, True)
    else:
        _amsgd_span(row, start, numel, slot, partials, weight_decay, grad_scale_ptr, lam,
                    HAS_GRAD_SCALE, MAXIMIZE, X_CODE, G_CODE, D_CODE, BLOCK, ITERS, STAGES, False)


# ---------------------------------------------------------------------------------------------
# AM-AdamW
@triton.jit
def _amadamw_terms_block(x_addr, g_addr, d_addr, v_addr, start, numel, mu, bias1, bias2, scale, lam, beta2,
                         one_minus_beta2, eps, HAS_GRAD_SCALE: tl.constexpr, MAXIMIZE: tl.constexpr,
                         X_CODE: tl.constexpr, G_CODE: tl.constexpr, D_CODE: tl.constexpr, V_CODE: tl.constexpr,
                         BLOCK: tl.constexpr, WHOLE: tl.constexpr):
    """The four terms of the block of BLOCK elements from `start`, 0 past the tensor's end."""
    offs = start + tl.arange(0, BLOCK).to(tl.int64)
    mask = offs < numel
    x = _load_x_if_decay(x_addr, offs, mask, mu, X_CODE, BLOCK, WHOLE)
    grad = load_f32(g_addr, offs, mask, G_CODE, WHOLE)
    d = load_f32(d_addr, offs, mask, D_CODE, WHOLE)
    v = load_f32(v_addr, offs, mask, V_CODE, WHOLE)
    g = effective_grad(grad, x, scale, HAS_GRAD_SCALE, MAXIMIZE, 0.0)
    v_new = adamw_second_moment(g, v, beta2, one_minus_beta2)
    p = adamw_precond(v_new, bias1, bias2, eps)
    a, b, c, dd = amadamw_terms(g, d, x, p, lam, mu)
    if not WHOLE:  # NOTE [no mask on the whole path]
        a, b, c, dd = tl.where(mask, a, 0.0), tl.where(mask, b, 0.0), tl.where(mask, c, 0.0), tl.where(mask, dd, 0.0)
    return a, b, c, dd


@triton.jit
def _amadamw_span(row, start, numel, slot, partials, weight_decay, grad_scale_ptr, bias, n_scopes, lam,
                  beta2, one_minus_beta2, eps, HAS_GRAD_SCALE: tl.constexpr, MAXIMIZE: tl.constexpr,
                  X_CODE: tl.constexpr, G_CODE: tl.constexpr, D_CODE: tl.constexpr, V_CODE: tl.constexpr,
                  BLOCK: tl.constexpr, ITERS: tl.constexpr, STAGES: tl.constexpr, WHOLE: tl.constexpr):
    """NOTE [pass-1 spans]: the span's blocks summed lane by lane, then over the block into the slot
    (the first block starts the sums, as in _amsgd_span)."""
    xa, ga, da, va = tl.load(row + 0), tl.load(row + 1), tl.load(row + 2), tl.load(row + 3)  # once a span
    mu = tl.load(weight_decay + tl.load(row + 5))
    s = tl.load(row + 6)
    bias1 = tl.load(bias + s)
    bias2 = tl.load(bias + n_scopes + s)
    scale = grad_scale_of(grad_scale_ptr, HAS_GRAD_SCALE)
    a, b, c, dd = _amadamw_terms_block(xa, ga, da, va, start, numel, mu, bias1, bias2, scale, lam, beta2,
                                       one_minus_beta2, eps, HAS_GRAD_SCALE, MAXIMIZE, X_CODE, G_CODE, D_CODE,
                                       V_CODE, BLOCK, WHOLE)
    for i in tl.range(1, ITERS, num_stages=STAGES):  # NOTE [pass-1 stages]
        a_i, b_i, c_i, dd_i = _amadamw_terms_block(xa, ga, da, va, start + i * BLOCK, numel, mu, bias1, bias2,
                                                   scale, lam, beta2, one_minus_beta2, eps, HAS_GRAD_SCALE,
                                                   MAXIMIZE, X_CODE, G_CODE, D_CODE, V_CODE, BLOCK, WHOLE)
        a += a_i
        b += b_i
        c += c_i
        dd += dd_i
    out = partials + slot * 4
    tl.store(out + 0, tl.sum(a, axis=0))
    tl.store(out + 1, tl.sum(b, axis=0))
    tl.store(out + 2, tl.sum(c, axis=0))
    tl.store(out + 3, tl.sum(dd, axis=0))


@triton.jit
def amadamw_reduce_kernel(
    meta, spans, partials, weight_decay, grad_scale_ptr, bias, n_scopes, lam, beta2, one_minus_beta2, eps,
    HAS_GRAD_SCALE: tl.constexpr, MAXIMIZE: tl.constexpr,
    X_CODE: tl.constexpr, G_CODE: tl.constexpr, D_CODE: tl.constexpr, V_CODE: tl.constexpr,
    BLOCK: tl.constexpr, ITERS: tl.constexpr = 1, STAGES: tl.constexpr = 1,
):
    row, start, numel, slot = _span_rows(meta, spans, BLOCK * ITERS)
    if whole_block(row, start, numel, BLOCK * ITERS):  # NOTE [vector access]
        _amadamw_span(row, start, numel, slot, partials, weight_decay, grad_scale_ptr, bias, n_scopes,
                      lam, beta2, one_minus_beta2, eps, HAS_GRAD_SCALE, MAXIMIZE, X_CODE, G_CODE, D_CODE,
                      V_CODE, BLOCK, ITERS, STAGES, True)
    else:
        _amadamw_span(row, start, numel, slot, partials, weight_decay, grad_scale_ptr, bias, n_scopes,
                      lam, beta2, one_minus_beta2, eps, HAS_GRAD_SCALE, MAXIMIZE, X_CODE, G_CODE, D_CODE,
                      V_CODE, BLOCK, ITERS, STAGES, False)

"""Pass 2: the fused elementwise update (momentum, second moment, parameter) with each tensor's beta.

Grid: one program per row of a bucket's block table. beta, the first-step flag and the bias
corrections come from the scope scratch written on the device, lr from the lr tensor, found_inf and
grad_scale through pointers: no host value of this step is needed. With found_inf > 0 nothing is
stored. A whole, aligned block of a step that is not skipped takes the unmasked 16-byte path, the
rest the masked one (NOTE [vector access] in tensor_table.py); both run the same block function.
Program 0 of the launch with COMMIT_GROUPS also commits prev_lr (present groups) and
prev_loss; that launch has at least one program even when every tensor is empty.
"""
import triton
import triton.language as tl

from .am_math import (adamw_param, adamw_precond, adamw_second_moment, amadamw_momentum, amsgd_momentum,
                      effective_grad, sgd_param)
from .tensor_table import grad_scale_of, load_f32, store_as, whole_block


@triton.jit
def _skip(found_inf_ptr, HAS_FOUND_INF: tl.constexpr):
    if HAS_FOUND_INF:
        skip = (tl.load(found_inf_ptr).to(tl.float32) > 0.0).to(tl.int32)  # 1: skip the step
    else:
        skip = tl.program_id(0) * 0  # 0, as an int32 tensor
    return skip


@triton.jit
def _commit_groups(present_groups, n_groups, lr_ptr, prev_lr_ptr, prev_loss_ptr, loss_ptr, skip,
                   LOSS_MODE: tl.constexpr, GROUPS_P2: tl.constexpr):
    if tl.program_id(0) == 0:
        i = tl.arange(0, GROUPS_P2)
        m = i < n_groups
        groups = tl.load(present_groups + i, mask=m, other=0)
        lr = tl.load(lr_ptr + groups, mask=m, other=0.0)
        tl.store(prev_lr_ptr + groups, lr.to(tl.float32), mask=i < tl.where(skip == 0, n_groups, 0))
        if LOSS_MODE:
            loss = tl.load(loss_ptr + i, mask=i < 1, other=0.0)
            tl.store(prev_loss_ptr + i, loss, mask=i < tl.where(skip == 0, 1, 0))


@triton.jit
def _block(meta, blocks, n_blocks, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    valid = pid < n_blocks
    t = tl.load(blocks + pid * 2, mask=valid, other=0)
    j = tl.load(blocks + pid * 2 + 1, mask=valid, other=0)
    row = meta + t * 8  # META_COLS
    # NOTE: masks are built as one comparison against a limit (`offs < lim`), never as `a & b` of two
    # masks: the interpreter's `&` of a vector and a scalar mask gives a dtype tl.load rejects.
    lim = tl.where(valid, tl.load(row + 4), 0)
    start = j * BLOCK
    offs = start + tl.arange(0, BLOCK).to(tl.int64)
    return row, start, offs, lim


@triton.jit
def _load_common(row, offs, mask, lr_ptr, weight_decay, grad_scale_ptr, HAS_GRAD_SCALE: tl.constexpr,
                 X_CODE: tl.constexpr, G_CODE: tl.constexpr, D_CODE: tl.constexpr, WHOLE: tl.constexpr):
    """What both updates read: x, the raw gradient and d of the block (float32), the tensor's scope,
    its group's weight decay and lr, and the grad scale (1 without one)."""
    x = load_f32(tl.load(row + 0), offs, mask, X_CODE, WHOLE)
    grad = load_f32(tl.load(row + 1), offs, mask, G_CODE, WHOLE)
    d = load_f32(tl.load(row + 2), offs, mask, D_CODE, WHOLE)
    group = tl.load(row + 5)
    s = tl.load(row + 6)
    wd = tl.load(weight_decay + group)
    lr = tl.load(lr_ptr + group).to(tl.float32)
    scale = grad_scale_of(grad_scale_ptr, HAS_GRAD_SCALE)
    return x, grad, d, s, wd, lr, scale


@triton.jit
def _amsgd_update_block(row, offs, lim, skip, scratch, n_scopes, lr_ptr, weight_decay, grad_scale_ptr, lam,
                        HAS_GRAD_SCALE: tl.constexpr, MAXIMIZE: tl.constexpr, X_CODE: tl.constexpr,
                        G_CODE: tl.constexpr, D_CODE: tl.constexpr, WHOLE: tl.constexpr):
    x, grad, d, s, wd, lr, scale = _load_common(row, offs, offs < lim, lr_ptr, weight_decay, grad_scale_ptr,
                                                HAS_GRAD_SCALE, X_CODE, G_CODE, D_CODE, WHOLE)
    beta = tl.load(scratch + s)
    first_step = tl.load(scratch + n_scopes + s) != 0.0
    g = effective_grad(grad, x, scale, HAS_GRAD_SCALE, MAXIMIZE, wd)
    d_new = amsgd_momentum(g, d, beta, lam, first_step)
    x_new = sgd_param(x, d_new, lr)
    keep = offs < tl.where(skip == 0, lim, 0)
    store_as(tl.load(row + 2), offs, d_new, keep, D_CODE, WHOLE)
    store_as(tl.load(row + 0), offs, x_new, keep, X_CODE, WHOLE)


@triton.jit
def _amadamw_update_block(row, offs, lim, skip, scratch, n_scopes, lr_ptr, weight_decay, grad_scale_ptr,
                          lam, beta2, one_minus_beta2, eps,
                          HAS_GRAD_SCALE: tl.constexpr, MAXIMIZE: tl.constexpr, X_CODE: tl.constexpr,
                          G_CODE: tl.constexpr, D_CODE: tl.constexpr, V_CODE: tl.constexpr, WHOLE: tl.constexpr):
    x, grad, d, s, mu, lr, scale = _load_common(row, offs, offs < lim, lr_ptr, weight_decay, grad_scale_ptr,
                                                HAS_GRAD_SCALE, X_CODE, G_CODE, D_CODE, WHOLE)
    v = load_f32(tl.load(row + 3), offs, offs < lim, V_CODE, WHOLE)
    beta = tl.load(scratch + s)
    bias1 = tl.load(scratch + 2 * n_scopes + s)
    bias2 = tl.load(scratch + 3 * n_scopes + s)
    g = effective_grad(grad, x, scale, HAS_GRAD_SCALE, MAXIMIZE, 0.0)
    v_new = adamw_second_moment(g, v, beta2, one_minus_beta2)
    p = adamw_precond(v_new, bias1, bias2, eps)
    d_new = amadamw_momentum(g, d, p, beta, lam)
    x_new = adamw_param(x, d_new, p, lr, mu)
    keep = offs < tl.where(skip == 0, lim, 0)
    store_as(tl.load(row + 3), offs, v_new, keep, V_CODE, WHOLE)
    store_as(tl.load(row + 2), offs, d_new, keep, D_CODE, WHOLE)
    store_as(tl.load(row + 0), offs, x_new, keep, X_CODE, WHOLE)


@triton.jit
def amsgd_update_kernel(
    meta, blocks, n_blocks, scratch, n_scopes, lr_ptr, weight_decay, grad_scale_ptr, found_inf_ptr,
    present_groups, n_groups, prev_lr_ptr, prev_loss_ptr, loss_ptr, lam,
    HAS_GRAD_SCALE: tl.constexpr, HAS_FOUND_INF: tl.constexpr, MAXIMIZE: tl.constexpr,
    COMMIT_GROUPS: tl.constexpr, LOSS_MODE: tl.constexpr, GROUPS_P2: tl.constexpr,
    X_CODE: tl.constexpr, G_CODE: tl.constexpr, D_CODE: tl.constexpr, BLOCK: tl.constexpr,
):
    skip = _skip(found_inf_ptr, HAS_FOUND_INF)
    row, start, offs, lim = _block(meta, blocks, n_blocks, BLOCK)
    if whole_block(row, start, lim, BLOCK) & (skip == 0):  # NOTE [vector access]
        _amsgd_update_block(row, offs, lim, skip, scratch, n_scopes, lr_ptr, weight_decay, grad_scale_ptr, lam,
                            HAS_GRAD_SCALE, MAXIMIZE, X_CODE, G_CODE, D_CODE, True)
    else:
        _amsgd_update_block(row, offs, lim, skip, scratch, n_scopes, lr_ptr, weight_decay, grad_scale_ptr, lam,
                            HAS_GRAD_SCALE, MAXIMIZE, X_CODE, G_CODE, D_CODE, False)
    if COMMIT_GROUPS:
        _commit_groups(present_groups, n_groups, lr_ptr, prev_lr_ptr, prev_loss_ptr, loss_ptr, skip,
                       LOSS_MODE, GROUPS_P2)


@triton.jit
def amadamw_update_kernel(
    meta, blocks, n_blocks, scratch, n_scopes, lr_ptr, weight_decay, grad_scale_ptr, found_inf_ptr,
    present_groups, n_groups, prev_lr_ptr, prev_loss_ptr, loss_ptr, lam, beta2, one_minus_beta2, eps,
    HAS_GRAD_SCALE: tl.constexpr, HAS_FOUND_INF: tl.constexpr, MAXIMIZE: tl.constexpr,
    COMMIT_GROUPS: tl.constexpr, LOSS_MODE: tl.constexpr, GROUPS_P2: tl.constexpr,
    X_CODE: tl.constexpr, G_CODE: tl.constexpr, D_CODE: tl.constexpr, V_CODE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    skip = _skip(found_inf_ptr, HAS_FOUND_INF)
    row, start, offs, lim = _block(meta, blocks, n_blocks, BLOCK)
    if whole_block(row, start, lim, BLOCK) & (skip == 0):  # NOTE [vector access]
        _amadamw_update_block(row, offs, lim, skip, scratch, n_scopes, lr_ptr, weight_decay, grad_scale_ptr,
                              lam, beta2, one_minus_beta2, eps, HAS_GRAD_SCALE, MAXIMIZE, X_CODE, G_CODE, D_CODE,
                              V_CODE, True)
    else:
        _amadamw_update_block(row, offs, lim, skip, scratch, n_scopes, lr_ptr, weight_decay, grad_scale_ptr,
                              lam, beta2, one_minus_beta2, eps, HAS_GRAD_SCALE, MAXIMIZE, X_CODE, G_CODE, D_CODE,
                              V_CODE, False)
    if COMMIT_GROUPS:
        _commit_groups(present_groups, n_groups, lr_ptr, prev_lr_ptr, prev_loss_ptr, loss_ptr, skip,
                       LOSS_MODE, GROUPS_P2)

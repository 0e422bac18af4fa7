"""Beta per scope on the device (SPEC.md sections 1-3 and 5), and the commit of the scope scalars.

Two launches (NOTE [finalize in two launches]):
- tensor_terms_kernel, one program per tensor of the step: the tensor's block slots (float32 values,
  summed in float64 in fixed [CHUNK, 4] tiles, so the order is fixed and runs are bit-identical),
  weighted by its group's step sizes in float64 (amsgd_weighted / amadamw_weighted), written to the
  tensor's row of `terms` (float64 [T, 2]: numerator, denominator).
- finalize_kernel, one program per present scope: the terms of its tensors summed in float64 in a
  fixed tile order, then beta (scope_beta), written to scratch row 0 (read by the update kernel)
  and, unless found_inf is set, committed: step += 1, beta, beta_prod *= beta (AMAdamW). Scratch
  row 1 gets the first-step flag that AMSGD's update needs (step is already advanced when the update
  runs). prev_lr and prev_loss are committed by the update kernel: these kernels still read them.

Sharded parameters (csrc/cpu/step_driver_cpu.cpp NOTE [sharded sums]): with SUMS_OUT the finalize
stops after the sums and writes the scope's (num, den) to sums[scope] ([S, 2] float64, zeros on the
scope's first step), committing nothing; the driver all-reduces them and runs it again with SUMS_IN,
which reads num and den from there instead of the terms.

NOTE [finalize in two launches]: a scope's beta needs the weighted terms of all its tensors. One
program per scope walking its tensors one after another waits, per tensor, for its meta, then its
group's lr, then its slots (each load depends on the one before), about three memory latencies per
tensor in a row: a few hundred tensors in one scope (AMSGD's and RLLC's default global scope on a
transformer) would spend hundreds of microseconds per step in that one program, by that count (not
measured). The tensors' terms are independent of each other, so they get a program each, all in
parallel, and the scope's program only adds up its tensors' terms, CHUNK of them per load.
"""
import triton
import triton.language as tl

from .am_math import amadamw_weighted, amsgd_weighted, scope_beta


@triton.jit
def _tensor_sums(partials, first, last, N_SUMS: tl.constexpr, CHUNK: tl.constexpr):
    """The slots [first, last) of one tensor, each column summed in float64.

    NOTE [finalize tiles]: one program sums every slot of its tensor, one slot per block of the reduce
    kernels (a 1e9-element tensor has ~1e6), and each step of the loop waits for its load. So a step
    loads all of CHUNK slots' columns at once, a [CHUNK, 4] tile, rather than one column of 64 slots
    (three or four loops): 24x (AMSGD) or 32x (AMAdamW) fewer steps, in a fixed order. The launch
    gives this kernel 16 warps and a CHUNK of 2048 slots (triton_backend.TERMS_CHUNK), 16 float64
    accumulators a thread as with 4 warps and 512, and a quarter of the steps. By count, not measured:
    at one memory latency (~0.5 us) a step, 512 slots a step cost about a sixth of an AM-SGD step's
    memory time for one large tensor (512 blocks of 1024 elements move ~14.7 MB, ~3.1 us at 4.8 TB/s);
    2048 cost about a twenty-fourth."""
    cols = tl.arange(0, 4)
    acc = tl.zeros([CHUNK, 4], tl.float64)
    for c in range(first, last, CHUNK):
        rows = c + tl.arange(0, CHUNK).to(tl.int64)
        mask = (rows < last)[:, None] & (cols < N_SUMS)[None, :]
        acc += tl.load(partials + rows[:, None] * N_SUMS + cols[None, :], mask=mask, other=0.0).to(tl.float64)
    sums = tl.sum(acc, axis=0)
    return (tl.sum(tl.where(cols == 0, sums, 0.0), axis=0), tl.sum(tl.where(cols == 1, sums, 0.0), axis=0),
            tl.sum(tl.where(cols == 2, sums, 0.0), axis=0), tl.sum(tl.where(cols == 3, sums, 0.0), axis=0))


@triton.jit
def tensor_terms_kernel(
    meta, slot_start, partials, terms, lr_ptr, prev_lr_ptr, weight_decay, lam,
    AMADAMW: tl.constexpr, FIRST_ORDER: tl.constexpr, CHUNK: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    N_SUMS: tl.constexpr = 4 if AMADAMW else 3
    group = tl.load(meta + t * 8 + 5)
    first = tl.load(slot_start + t)
    last = tl.load(slot_start + t + 1)
    lr = tl.load(lr_ptr + group).to(tl.float64)
    prev_lr = tl.load(prev_lr_ptr + group).to(tl.float64)
    s0, s1, s2, s3 = _tensor_sums(partials, first, last, N_SUMS, CHUNK)
    if AMADAMW:
        mu = tl.load(weight_decay + group).to(tl.float64)
        tn, td = amadamw_weighted(s0, s1, s2, s3, lr, prev_lr, mu)
    else:
        tn, td = amsgd_weighted(s0, s1, s2, lr, prev_lr, lam, FIRST_ORDER)
    tl.store(terms + 2 * t, tn)
    tl.store(terms + 2 * t + 1, td)


@triton.jit
def finalize_kernel(
    tensor_start, present_scopes, terms, scratch, n_scopes,
    step_ptr, beta_ptr, beta_prod_ptr, found_inf_ptr,
    prev_loss_ptr, loss_ptr, sums_ptr, lam, beta_min, beta_max,
    AMADAMW: tl.constexpr, ADAPTIVE: tl.constexpr, LOSS_MODE: tl.constexpr,
    HAS_FOUND_INF: tl.constexpr, SUMS_OUT: tl.constexpr, SUMS_IN: tl.constexpr, CHUNK: tl.constexpr,
):
    s = tl.program_id(0).to(tl.int64)
    scope = tl.load(present_scopes + s)
    step = tl.load(step_ptr + scope)
    first_step = step == 0.0
    num = tl.sum(tl.zeros([CHUNK], tl.float64), axis=0)
    den = num
    if ADAPTIVE and SUMS_IN:
        num = tl.load(sums_ptr + 2 * scope)
        den = tl.load(sums_ptr + 2 * scope + 1)
    elif ADAPTIVE:
        # the scope's tensors' terms (tensor_terms_kernel), CHUNK tensors per load, in a fixed order
        t_first = tl.load(tensor_start + s)
        t_last = tl.load(tensor_start + s + 1)
        acc_num = tl.zeros([CHUNK], tl.float64)
        acc_den = tl.zeros([CHUNK], tl.float64)
        for c in range(t_first, t_last, CHUNK):
            rows = c + tl.arange(0, CHUNK).to(tl.int64)
            acc_num += tl.load(terms + 2 * rows, mask=rows < t_last, other=0.0)
            acc_den += tl.load(terms + 2 * rows + 1, mask=rows < t_last, other=0.0)
        num = tl.sum(acc_num, axis=0)
        den = tl.sum(acc_den, axis=0)
    if SUMS_OUT:
        tl.store(sums_ptr + 2 * scope, tl.where(first_step, 0.0, num))
        tl.store(sums_ptr + 2 * scope + 1, tl.where(first_step, 0.0, den))
    else:
        if ADAPTIVE:
            if LOSS_MODE:
                # (lam + 1) (prev_loss - loss), formed in float32 as the reference does, then float64
                extra = (lam + 1.0) * (tl.load(prev_loss_ptr) - tl.load(loss_ptr))
                num += extra.to(tl.float64)
        beta = scope_beta(num, den, beta_min, beta_max, first_step, ADAPTIVE)  # f32 scalars promote to f64
        beta = beta.to(tl.float32)
        tl.store(scratch + s, beta)
        tl.store(scratch + n_scopes + s, first_step.to(tl.float32))
        commit = True
        if HAS_FOUND_INF:
            commit = tl.load(found_inf_ptr).to(tl.float32) <= 0.0
            commit = commit | (tl.load(found_inf_ptr).to(tl.float32) != tl.load(found_inf_ptr).to(tl.float32))
        if commit:
            tl.store(step_ptr + scope, step + 1.0)
            tl.store(beta_ptr + scope, beta)
            if AMADAMW:
                tl.store(beta_prod_ptr + scope, tl.load(beta_prod_ptr + scope) * beta)

"""Backend "triton": the two-pass step of SPEC.md as Triton kernels (amm_kernels/triton_kernels/).

Per step, for the whole parameter list at once (no per-tensor launches):
    [AMAdamW] bias corrections per scope, in float64 on the device (two tiny torch ops, see below)
    pass 1    reduce kernel: per span of PASS1_ITERS blocks of BLOCK elements, float32 sums into the
              span's own slot
              (skipped when adaptive=False: beta is beta_max)
    terms     one program per tensor: its slots summed in float64 and weighted by its group's lrs
    finalize  one program per present scope: beta in float64 from its tensors' terms, in a fixed order;
              commits step / beta / beta_prod unless found_inf (with a process_group: twice, around
              one all_reduce of the per-scope sums); NOTE [finalize in two launches]
    pass 2    update kernel: d (and v) and x with the scope's beta; commits prev_lr / prev_loss
One launch per pass and dtype bucket (tensor_table.py NOTE [pointer table]). The tables are cached
across steps, rebased on the device when only addresses change (gradients set to None and allocated
anew) and rebuilt when sizes, dtypes or groups change. Nothing is read back to the host, there are no
float atomics (runs are bit-identical), and every value of the step (lr, beta, grad_scale, found_inf,
loss) is read through a pointer, so a step can be captured in a CUDA graph once a warm-up step has
built the tables, also with gradients allocated inside the capture (NOTE [tables and graphs]).

Runs on CUDA tensors, or on CPU tensors in Triton's interpreter when TRITON_INTERPRET=1 was set
before this module was first imported (slow: for tests).
"""
from __future__ import annotations

import contextlib
import os

import torch

# The messages below say why triton cannot run; backends.resolve adds the backends that can.


def _interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


import importlib.util

# NOTE [import order]: Triton picks interpreter or compiler per function when it is decorated, and its
# own library (tl.sum, ...) is decorated when triton is first imported. So the checks come before
# `import triton`: an unusable configuration must not import triton in the wrong mode for the process.
if importlib.util.find_spec("triton") is None:  # pragma: no cover - depends on the installation
    raise ImportError("backend 'triton' needs the triton package, which is not installed")
if not _interpreter_on() and not torch.cuda.is_available():
    raise ImportError(
        "backend 'triton' needs a CUDA GPU, or TRITON_INTERPRET=1 set before triton is first imported to run "
        "its kernels on CPU tensors in Triton's (slow) interpreter"
    )
try:
    import triton
    import triton.language as tl
except ImportError as _err:  # pragma: no cover
    raise ImportError(f"backend 'triton' could not import triton ({_err})") from _err
if _interpreter_on() and type(tl.sum).__name__ != "InterpretedFunction":
    raise ImportError(
        "backend 'triton': TRITON_INTERPRET=1 is set, but triton was imported before it was (its library is "
        "compiled-mode); set TRITON_INTERPRET=1 before anything imports triton"
    )


@triton.jit
def _loop_probe(x):
    for i in range(0, tl.load(x)):  # a loop bound read from memory, as in the finalize kernels
        tl.store(x + 1, i + 1)


def _interpreter_runs_loaded_loops() -> str | None:
    """NOTE [interpreter and NumPy]: triton 3.6's interpreter turns a loop bound into an int with
    int(array) on a 1-element array, which NumPy 2.4 refuses (triton 3.9 squeezes it first). Every
    finalize kernel loops to bounds it loads, so there the backend fails at its first step: say so at
    import instead. None when it works."""
    x = torch.tensor([2, 0], dtype=torch.int32, device="cpu")
    try:
        _loop_probe[(1,)](x)
    except Exception as err:  # noqa: BLE001 - any failure of the interpreter means the same
        import numpy

        return (f"backend 'triton': triton {triton.__version__}'s interpreter cannot run these kernels with "
                f"NumPy {numpy.__version__} ({type(err).__name__}: {err}); a newer triton or numpy<2.4 can")
    return None if x[1].item() == 2 else "backend 'triton': triton's interpreter ran a loop wrongly"


if _interpreter_on():
    _reason = _interpreter_runs_loaded_loops()
    if _reason is not None:
        raise ImportError(_reason)

from ._hyper import AMAdamWHyper, AMSGDHyper  # noqa: E402
from ._step import StepBatch, check_real_gradient, check_writable  # noqa: E402
from .triton_kernels.finalize_kernel import finalize_kernel, tensor_terms_kernel  # noqa: E402
from .triton_kernels.reduce_kernels import amadamw_reduce_kernel, amsgd_reduce_kernel  # noqa: E402
from .triton_kernels.tensor_table import DTYPE_CODES, dtype_of, get_table  # noqa: E402
from .triton_kernels.update_kernels import amadamw_update_kernel, amsgd_update_kernel  # noqa: E402
from .triton_rllc import rllc_step  # noqa: E402,F401  (RLLC, SPEC.md section 4: amm_kernels/triton_rllc.py)

# The kernels were decorated (at import) for the interpreter or for the compiler; which one is fixed.
INTERPRETED = _interpreter_on()
# Elements per program. The interpreter runs each program as NumPy calls: fewer, larger blocks.
# (tests/_triton_gpu_compile.py records its launches at COMPILED_BLOCK: what a GPU would compile.)
COMPILED_BLOCK = 1024
BLOCK = 4096 if INTERPRETED else COMPILED_BLOCK
# Blocks of BLOCK elements per pass-1 program and slot (NOTE [pass-1 spans] in
# triton_kernels/reduce_kernels.py): 1 until a GPU measures more (bench/bench_triton_variants.py).
PASS1_ITERS = 1
# Software-pipelining stages of a pass-1 span's loop (NOTE [pass-1 stages]): 1 (none) until a GPU measures more.
PASS1_STAGES = 1
CHUNK = 512  # tensors summed per load by the finalize kernel (NOTE [finalize in two launches])
TERMS_CHUNK = 2048  # slots summed per load by the tensor-terms kernel, with 16 warps (NOTE [finalize tiles])
NUM_WARPS = 4
# NOTE [no fused multiply-add]: compiled, Triton contracts a * b + c into one fma by default (sm_90 PTX of
# the RLLC update had ~1000 fma.rn.f32); the interpreter and the reference never do. An fma rounds once
# where the reference rounds twice: within tolerance for AM's beta, but RLLC's law is a pinv of a Gram
# matrix of the memory, and on ill-conditioned memories an ulp in the memory became 50x the float32
# tolerance in the law (a replay of the reference with the fma chain). So every launch compiles without
# contraction, as csrc/rllc_math.h's rl_mul / rl_add keep the CUDA RLLC kernels: each operation rounds
# as the reference's. The kernels are memory-bound; the extra instructions cost no bandwidth.
# tests/test_triton_gpu_compile.py checks the sm_80 / sm_90 PTX of every launch for fma.
COMPILED_OPTIONS = {"num_warps": NUM_WARPS, "enable_fp_fusion": False}
LAUNCH = {} if INTERPRETED else COMPILED_OPTIONS  # the interpreter takes no compile options
# Kernels launched with other options than COMPILED_OPTIONS, by name (tests/_triton_gpu_compile.py
# compiles each with its own).
KERNEL_OPTIONS = {"tensor_terms_kernel": dict(COMPILED_OPTIONS, num_warps=16),  # NOTE [finalize tiles]
                  "rllc_combine_kernel": dict(COMPILED_OPTIONS, num_warps=8)}
TERMS_LAUNCH = {} if INTERPRETED else KERNEL_OPTIONS["tensor_terms_kernel"]
COMBINE_LAUNCH = {} if INTERPRETED else KERNEL_OPTIONS["rllc_combine_kernel"]  # triton_rllc.py


def unavailable_reason(device: torch.device) -> str | None:
    """Why this backend cannot run on tensors of `device` in this process (None: it can)."""
    device = torch.device(device)
    if device.type == "cpu":
        if not INTERPRETED:
            return ("its kernels were built for the GPU; CPU tensors need TRITON_INTERPRET=1 set before "
                    "amm_kernels.triton_backend is first imported")
        if not _interpreter_on():
            return "CPU tensors need TRITON_INTERPRET=1 (Triton's interpreter)"
        return None
    if device.type == "cuda":
        if INTERPRETED:
            return "TRITON_INTERPRET=1 was set when it was imported; its interpreted kernels take CPU tensors only"
        if not torch.cuda.is_available():
            return "no CUDA device"
        return None
    return f"it runs on cuda (or cpu with TRITON_INTERPRET=1) tensors, not {device.type}"


def _as_float32(i: int, g):
    """A gradient in a dtype the kernels do not read, as float32 (TypeError for a complex one)."""
    check_real_gradient(i, g)
    return g.float()


_is_contiguous = torch.Tensor.is_contiguous
_KERNEL_DTYPES = frozenset(DTYPE_CODES)


def _all_flat(batch: StepBatch) -> bool:
    """Every tensor contiguous and every gradient in a dtype the kernels read: _flat_tensors has
    nothing to copy (each check a loop in C, not a Python call per tensor)."""
    return (all(map(_is_contiguous, batch.params)) and all(map(_is_contiguous, batch.grads))
            and all(map(_is_contiguous, batch.d)) and (batch.v is None or all(map(_is_contiguous, batch.v)))
            and _KERNEL_DTYPES.issuperset(map(dtype_of, batch.grads)))


def _flat_tensors(batch: StepBatch):
    """params, grads, d, v as dense tensors the kernels can walk as flat arrays, and the write-backs.

    The kernels index storage linearly, so a non-contiguous tensor is replaced for this step by a
    contiguous copy, copied back after the update (rare; such a step is not graph-capturable). The
    CUDA glue does the same in C++ (NOTE [working copies] in csrc/cuda/working_copies.h). A tensor to be
    written back whose elements share memory is refused here, before any kernel (check_writable: the
    copy back would fail after the others were written)."""
    if _all_flat(batch):  # the usual step (NOTE [host time of a key] in triton_kernels/tensor_table.py)
        return list(batch.params), list(batch.grads), list(batch.d), None if batch.v is None else list(batch.v), []
    writeback = []

    def written(i, t, what):  # a tensor the step writes: a copy of it is written back
        if t.is_contiguous():
            return t
        check_writable(i, t, what)
        c = t.contiguous()
        writeback.append((t, c))
        return c

    params = [written(i, t, "parameter") for i, t in enumerate(batch.params)]
    # a gradient the kernels cannot read (float64) is read as float32, as the cpu and cuda backends do
    grads = [(t if t.dtype in DTYPE_CODES else _as_float32(i, t)).contiguous() for i, t in enumerate(batch.grads)]
    d = [written(i, t, "optimizer state") for i, t in enumerate(batch.d)]
    v = None if batch.v is None else [written(i, t, "optimizer state") for i, t in enumerate(batch.v)]
    return params, grads, d, v, writeback


def _step(batch: StepBatch, hp, amadamw: bool) -> None:
    params, grads, d, v, writeback = _flat_tensors(batch)
    n_sums = 4 if amadamw else 3
    table = get_table(params, grads, d, v, batch, BLOCK, n_sums, span=PASS1_ITERS)
    state = batch.scopes
    device = params[0].device
    n_scopes = len(batch.present_scopes)
    scratch = table.scope_scratch
    dummy = scratch  # stands in for absent optional pointers (never read: their flags are off)

    has_scale = batch.grad_scale is not None
    grad_scale = batch.grad_scale.to(device) if has_scale else dummy
    has_inf = batch.found_inf is not None
    found_inf = batch.found_inf.to(device) if has_inf else dummy
    loss_mode = (not amadamw) and hp.delta_f == "loss"
    loss = batch.loss.detach().reshape(1).to(device=device, dtype=torch.float32) if loss_mode else dummy
    lam, beta_min, beta_max = float(hp.lam), float(hp.beta_min), float(hp.beta_max)
    adaptive, maximize = bool(hp.adaptive), bool(hp.maximize)

    if amadamw:
        # NOTE [bias corrections in float64] (amadamw_reference.py): 1 - beta2^t cancels in float32, so
        # both corrections are formed in float64 and rounded once, as the reference does; this takes two
        # small device ops (no host sync) rather than float64 pow in a kernel, whose accuracy differs
        # between Triton versions and targets.
        sp = table.present_scopes
        scratch[2].copy_(1 - beta_max * state.beta_prod[sp].double())
        scratch[3].copy_(1 - float(hp.beta2) ** (state.step[sp].double() + 1))

    # pass 1
    if adaptive:
        for bucket in table.buckets:
            if bucket.n_spans == 0:
                continue
            cx, cg, cd, cv = bucket.codes
            if amadamw:
                amadamw_reduce_kernel[(bucket.n_spans,)](
                    table.meta, bucket.spans, table.partials, table.weight_decay, grad_scale, scratch[2:],
                    n_scopes, lam, float(hp.beta2), 1.0 - float(hp.beta2), float(hp.eps),
                    HAS_GRAD_SCALE=has_scale, MAXIMIZE=maximize, X_CODE=cx, G_CODE=cg, D_CODE=cd, V_CODE=cv,
                    BLOCK=BLOCK, ITERS=PASS1_ITERS, STAGES=PASS1_STAGES, **LAUNCH)
            else:
                amsgd_reduce_kernel[(bucket.n_spans,)](
                    table.meta, bucket.spans, table.partials, table.weight_decay, grad_scale, lam,
                    HAS_GRAD_SCALE=has_scale, MAXIMIZE=maximize, X_CODE=cx, G_CODE=cg, D_CODE=cd,
                    BLOCK=BLOCK, ITERS=PASS1_ITERS, STAGES=PASS1_STAGES, **LAUNCH)

    # each tensor's weighted terms, then beta per scope and the scope-state commit
    # (NOTE [finalize in two launches] in triton_kernels/finalize_kernel.py)
    if adaptive:
        tensor_terms_kernel[(len(params),)](
            table.meta, table.slot_start, table.partials, table.terms, batch.lr, state.prev_lr, table.weight_decay,
            lam, AMADAMW=amadamw, FIRST_ORDER=(not amadamw) and hp.delta_f == "first_order", CHUNK=TERMS_CHUNK,
            **TERMS_LAUNCH)

    def finalize(sums, sums_out: bool, sums_in: bool):
        finalize_kernel[(n_scopes,)](
            table.tensor_start, table.present_scopes, table.terms, scratch, n_scopes,
            state.step, state.beta, state.beta_prod, found_inf, state.prev_loss, loss, sums, lam, beta_min, beta_max,
            AMADAMW=amadamw, ADAPTIVE=adaptive, LOSS_MODE=loss_mode, HAS_FOUND_INF=has_inf, SUMS_OUT=sums_out,
            SUMS_IN=sums_in, CHUNK=CHUNK, **LAUNCH)

    if batch.process_group is not None and adaptive:
        # Sharded parameters (finalize_kernel.py): this rank's scope sums, added up over the group
        # (one small all_reduce, no host sync), then beta from the whole model's sums.
        sums = torch.zeros(state.step.numel(), 2, dtype=torch.float64, device=device)
        finalize(sums, sums_out=True, sums_in=False)
        sums = batch.all_reduce_sums(sums)  # NOTE [sums by scope] in _step.py
        if has_inf:  # every rank's, summed: one rank's inf skips the step on all (the finalize reads it)
            found_inf = batch.found_inf.to(device)
        finalize(sums, sums_out=False, sums_in=True)
    else:
        finalize(dummy, sums_out=False, sums_in=False)

    # pass 2 (the first bucket's launch also commits prev_lr / prev_loss, so it always has a program)
    n_groups = len(batch.present_groups)
    for i, bucket in enumerate(table.buckets):
        commit = i == 0
        grid = (max(bucket.n_blocks, 1) if commit else bucket.n_blocks,)
        if grid[0] == 0:
            continue
        cx, cg, cd, cv = bucket.codes
        common = (table.meta, bucket.blocks, bucket.n_blocks, scratch, n_scopes, batch.lr, table.weight_decay,
                  grad_scale, found_inf, table.present_groups, n_groups, state.prev_lr, state.prev_loss, loss, lam)
        flags = dict(HAS_GRAD_SCALE=has_scale, HAS_FOUND_INF=has_inf, MAXIMIZE=maximize, COMMIT_GROUPS=commit,
                     LOSS_MODE=loss_mode, GROUPS_P2=triton.next_power_of_2(max(n_groups, 1)),
                     X_CODE=cx, G_CODE=cg, D_CODE=cd, BLOCK=BLOCK, **LAUNCH)
        if amadamw:
            amadamw_update_kernel[grid](*common, float(hp.beta2), 1.0 - float(hp.beta2), float(hp.eps), V_CODE=cv, **flags)
        else:
            amsgd_update_kernel[grid](*common, **flags)

    for dst, src in writeback:
        dst.copy_(src)


def on_params_device(batch: StepBatch):
    """NOTE [device guard]: a Triton launch runs on the current CUDA device and its current stream, not on
    its tensors' device (the cuda backend sets a CUDAGuard in C++), so a step of parameters on cuda:1,
    with cuda:0 current, would launch on the wrong GPU; and get_table's capture check reads the current
    device's stream. Every step runs under this guard."""
    device = batch.params[0].device
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


@torch.no_grad()
def amsgd_step(batch: StepBatch, hp: AMSGDHyper) -> None:
    with on_params_device(batch):
        _step(batch, hp, amadamw=False)


@torch.no_grad()
def amadamw_step(batch: StepBatch, hp: AMAdamWHyper) -> None:
    with on_params_device(batch):
        _step(batch, hp, amadamw=True)

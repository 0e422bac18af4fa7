"""backend="triton" against the reference (backend="torch"), like a kernel parity test.

Without a GPU the kernels run on CPU tensors in Triton's interpreter: TRITON_INTERPRET=1 must be set
before the kernels are decorated (at the first import of amm_kernels.triton_backend). This module sets
it for that import only and, through an autouse fixture, for its own tests; the variable is restored
afterwards so other test files see the environment they were started with. Small sizes and few steps
on CPU (the interpreter is slow), full sizes and 10 steps on CUDA.
"""
import os
import subprocess
import sys

import pytest
import torch

from _triton import CUDA, DEV, grads_for, import_triton_backend, interpreter_env, make_params  # noqa: E402,F401
from _triton import assert_bit_identical, change_lrs_at_step_2, check_found_inf_changes_nothing, lr_tensor_groups
from _triton import assert_same_run as assert_runs_agree, mixed_dtype_params, train
from _triton import assert_beta_moves, blocks_to_test

triton_backend = import_triton_backend()

from _helpers import check_exp_avg_sq_alone_is_cast, check_float64_grads_are_read_as_float32  # noqa: E402
from _helpers import (check_a_reset_tensor_restarts_its_scope, check_inf_parameter_without_decay,  # noqa: E402
                      check_signed_zeros_as_the_reference)
from _helpers import vector_params  # noqa: E402
from test_vectors import replay_am_vector  # noqa: E402

from amm_kernels import RLLC, AMAdamW, AMSGD  # noqa: E402

STEPS = 10 if CUDA else 3
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
if CUDA:
    SHAPES = [(1,), (7,), (4097,), (0,), (1024, 1024), (3, 5), (0, 4), (33, 4097), (17,), (2, 3, 4), (65536,),
              (1000, 7), (5, 3)]
else:
    SHAPES = [(1,), (7,), (4097,), (0,), (3, 5), (0, 4), (17,), (2, 3, 4), (257,), (64, 3), (9, 9), (5, 3)]
OPTS = {"AMSGD": AMSGD, "AMAdamW": AMAdamW}
SCOPE_FIELDS = ("step", "beta", "beta_prod", "prev_lr", "prev_loss")





def groups_of(params, n_groups=3, lrs=(0.05, 0.02, 0.1), wds=(0.0, 0.01, 0.1)):
    split = [params[i::n_groups] for i in range(n_groups)]
    return [{"params": ps, "lr": lrs[i], "weight_decay": wds[i]} for i, ps in enumerate(split)]


def run(cls, backend, dtype, steps=STEPS, shapes=SHAPES, kwargs=None, hook=None, seed=0, groups=None, flip=False):
    """Train from a fixed start with fixed gradients; returns (params, opt, betas per step)."""
    params = make_params(shapes, dtype, seed)
    opt = cls(groups_of(params) if groups is None else groups(params), backend=backend, **(kwargs or {}))
    return params, opt, train(opt, params, steps, "beta", hook=hook, seed=seed, flip=flip)


def assert_same_run(ref, got, dtype, what):
    assert_runs_agree(ref, got, dtype, what, "beta", SCOPE_FIELDS)


def parity(cls, dtype, **kw):
    ref = run(cls, "torch", dtype, **kw)
    got = run(cls, "triton", dtype, **kw)
    assert_same_run(ref, got, dtype, f"{cls.__name__} {dtype} {kw.get('kwargs')}")
    return got


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("scope", ["global", "group", "tensor"])
@pytest.mark.parametrize("name", list(OPTS))
def test_parity_scopes_dtypes(name, scope, dtype):
    """Each scope and dtype, on gradients that flip sign (tests/test_compiled_kernels.py NOTE [moving
    beta]): with independent ones AM-AdamW's beta stayed at its clamp in nearly every step, so its sums
    hardly reached the result."""
    assert_beta_moves(parity(OPTS[name], dtype, kwargs=dict(beta_scope=scope), flip=True)[2])


@pytest.mark.parametrize("name", list(OPTS))
def test_parity_fixed_beta(name):
    parity(OPTS[name], torch.float32, kwargs=dict(adaptive=False))


@pytest.mark.parametrize("shapes", [[(1,)], [(7,)], [(4097,)], [(0,)], [(0,), (0, 3)]], ids=str)
@pytest.mark.parametrize("name", list(OPTS))
def test_parity_single_shapes(name, shapes):
    parity(OPTS[name], torch.float32, shapes=shapes, groups=lambda ps: [{"params": ps, "lr": 0.05}])


@pytest.mark.parametrize("block", blocks_to_test(triton_backend))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", list(OPTS))
def test_parity_unaligned_views(monkeypatch, name, dtype, block):
    """Views that start 1 element into their buffer (data_ptr not a multiple of 16) take the masked
    path for every block, beside an aligned tensor of whole blocks and a partial one that take the
    16-byte path (NOTE [vector access] in triton_kernels/tensor_table.py)."""
    monkeypatch.setattr(triton_backend, "BLOCK", block)

    def views(backend):
        gen = torch.Generator().manual_seed(3)
        bufs = [torch.randn(n, generator=gen).to(DEV, dtype) for n in (2 * block + 9, block + 1, 2 * block, 37)]
        params = [torch.nn.Parameter(bufs[0][1:]), torch.nn.Parameter(bufs[1][1:]),
                  torch.nn.Parameter(bufs[2]), torch.nn.Parameter(bufs[3][1:])]
        assert [p.data_ptr() % 16 != 0 for p in params] == [True, True, False, True]
        opt = OPTS[name]([{"params": params[:2]}, {"params": params[2:], "lr": 0.02, "weight_decay": 0.1}],
                         lr=0.05, backend=backend)
        return params, opt, train(opt, params, STEPS, "beta", flip=True)

    assert_same_run(views("torch"), views("triton"), dtype, f"{name} unaligned views")


@pytest.mark.parametrize("iters,stages,dtype", [(2, 1, torch.bfloat16), (3, 1, torch.float32), (4, 3, torch.float32)],
                         ids=["2-bf16", "3-f32", "4-f32-staged3"])
@pytest.mark.parametrize("scope", ["global", "tensor"])
@pytest.mark.parametrize("name", list(OPTS))
def test_parity_pass1_spans(monkeypatch, name, scope, iters, stages, dtype):
    """NOTE [pass-1 spans] (triton_kernels/reduce_kernels.py): pass 1 with spans of 2, 3 and 4 blocks of a
    GPU's BLOCK, the last with its loop pipelined over 3 stages (NOTE [pass-1 stages]: the interpreter
    runs it as the plain loop; tests/test_triton_gpu_compile.py checks the sm_90 build copies ahead).
    Tensors of exactly one span, of a span and a partial one whose last block is partial, of part of a
    block, empty, and a view one element into its buffer (the masked path for all its spans); two
    groups, with and without weight decay (x read or not in pass 1)."""
    block = triton_backend.COMPILED_BLOCK
    monkeypatch.setattr(triton_backend, "BLOCK", block)
    monkeypatch.setattr(triton_backend, "PASS1_ITERS", iters)
    monkeypatch.setattr(triton_backend, "PASS1_STAGES", stages)
    span = iters * block

    def spans(backend):
        gen = torch.Generator().manual_seed(5)
        sizes = (span, span + block + 5, 7, 0, span + 2)
        bufs = [torch.randn(n, generator=gen).to(DEV, dtype) for n in sizes]
        params = [torch.nn.Parameter(b) for b in bufs[:4]] + [torch.nn.Parameter(bufs[4][1:])]
        opt = OPTS[name]([{"params": params[:2]}, {"params": params[2:], "lr": 0.02, "weight_decay": 0.1}],
                         lr=0.05, beta_scope=scope, backend=backend)
        return params, opt, train(opt, params, STEPS, "beta", flip=True)

    got = spans("triton")
    assert_same_run(spans("torch"), got, dtype, f"{name} spans of {iters} blocks")
    assert_beta_moves(got[2])


@pytest.mark.parametrize("scope", ["global", "group"])
@pytest.mark.parametrize("name", list(OPTS))
def test_parity_when_the_finalize_tiles_take_several_loads(monkeypatch, name, scope):
    """NOTE [finalize tiles] / [finalize in two launches] (triton_kernels/finalize_kernel.py): with the
    tiles at 2, a tensor's slots and a scope's tensors are summed over several loads of a tile, whose
    last one is partial, as on a GPU for tensors of over 2048 slots and scopes of over 512 tensors. The
    gradients flip sign (flip=True) so that beta leaves its clamp, and the sums reach the result."""
    monkeypatch.setattr(triton_backend, "CHUNK", 2)
    monkeypatch.setattr(triton_backend, "TERMS_CHUNK", 2)
    monkeypatch.setattr(triton_backend, "BLOCK", triton_backend.COMPILED_BLOCK)
    shapes = [(5000,), (3,), (2049,), (0,), (7, 9), (1025,), (4,)]  # 5, 1, 3, 0, 1, 2, 1 slots
    _, _, betas = parity(OPTS[name], torch.float32, shapes=shapes, kwargs=dict(beta_scope=scope), flip=True,
                         groups=lambda ps: [{"params": ps[:5], "lr": 0.05},
                                            {"params": ps[5:], "lr": 0.02, "weight_decay": 0.1}])
    assert_beta_moves(betas)


@pytest.mark.parametrize("shapes", [SHAPES, [(7,), (3,)]], ids=["model", "small"])
def test_parity_loss_mode(shapes):
    """With the small model the loss term (lam + 1) (prev_loss - loss) outweighs the gradient terms, so the
    first step's sums would give a beta far below beta_max: beta_max there comes from the first-step rule."""
    def closure_run(backend):
        params = make_params(shapes, torch.float32)
        opt = AMSGD(groups_of(params), backend=backend, delta_f="loss", lam=0.2)
        betas = []
        for step in range(STEPS):
            def closure():
                for p, g in zip(params, grads_for(params, step)):
                    p.grad = g
                return torch.tensor(5.0 / (step + 1) + 0.3 * (step % 2), device=DEV)
            opt.step(closure)
            betas.append(opt.beta.clone())
        return params, opt, betas

    assert_same_run(closure_run("torch"), closure_run("triton"), torch.float32, "loss mode")


@pytest.mark.parametrize("name", list(OPTS))
def test_parity_maximize(name):
    """maximize=True negates the gradient in both passes (the sums of beta and the update), on gradients
    that flip sign so that beta leaves its clamp and the sums reach the result."""
    _, _, betas = parity(OPTS[name], torch.float32, kwargs=dict(maximize=True, beta_scope="group"), flip=True)
    assert_beta_moves(betas)


@pytest.mark.parametrize("name,beta_min", [("AMSGD", 0.3), ("AMAdamW", 0.85)])
def test_parity_lower_clamp(name, beta_min):
    """beta_min > 0 and sign-flipping gradients: some tensors' betas are clamped to beta_min in the
    reference run, others not, and the kernels clamp the same ones."""
    kwargs = dict(beta_min=beta_min, beta_scope="tensor")
    ref = run(OPTS[name], "torch", torch.float32, kwargs=kwargs, flip=True)
    got = run(OPTS[name], "triton", torch.float32, kwargs=kwargs, flip=True)
    later = torch.cat([b for b in ref[2][1:]])
    assert (later == beta_min).any() and ((later > beta_min) & (later < 0.9)).any(), later
    assert_same_run(ref, got, torch.float32, f"{name} beta_min={beta_min}")


@pytest.mark.filterwarnings("ignore:overflow encountered")  # the interpreter's NumPy float32 sums
def test_parity_overflowing_sum_of_squares():
    """NOTE [non-finite sums] (reference/beta.py): finite gradients -2e19 then 1e19 in loss mode with
    lam = 0.5 make the float32 partial sum of (d - g)^2 = 9e38 overflow (den = inf) while B = <d - g,
    g + lam d> = 0 and num stays finite: beta is NaN, as the reference's, not num / inf clamped to beta_min."""
    def overflow_run(backend):
        params = [torch.zeros(5, device=DEV, requires_grad=True)]
        opt = AMSGD(params, lr=1e-3, lam=0.5, delta_f="loss", backend=backend)
        betas = []
        for g, loss in [(-2e19, 1.0), (1e19, 0.5)]:
            def closure():
                params[0].grad = torch.full((5,), g, device=DEV)
                return torch.tensor(loss, device=DEV)
            opt.step(closure)
            betas.append(opt.beta.clone())
        return params, opt, betas

    ref, got = overflow_run("torch"), overflow_run("triton")
    assert torch.isnan(ref[2][1])
    assert_same_run(ref, got, torch.float32, "overflowing sum of squares")


def test_parity_loss_mode_with_a_skipped_step():
    """A step skipped by found_inf commits nothing, prev_loss included: the step after it takes
    F = prev_loss - loss from the loss of the last step taken, as the reference."""
    def closure_run(backend):
        params = make_params([(7,), (3,)], torch.float32)
        opt = AMSGD([{"params": params, "lr": 0.05}], backend=backend, delta_f="loss", lam=0.2)
        betas = []
        for step, loss in enumerate([5.0, 4.0, 1.0, 3.9]):  # step 3: F = 4.0 - 3.9, not 1.0 - 3.9
            opt.found_inf = torch.tensor([1.0 if step == 2 else 0.0], device=DEV)

            def closure():
                for p, g in zip(params, grads_for(params, step)):
                    p.grad = g
                return torch.tensor(loss, device=DEV)
            opt.step(closure)
            betas.append(opt.beta.clone())
        return params, opt, betas

    ref, got = closure_run("torch"), closure_run("triton")
    assert 0.0 < ref[2][3] < 0.9  # beta off its clamps: the loss term reaches it
    assert_same_run(ref, got, torch.float32, "loss mode, skipped step")


@pytest.mark.parametrize("name", list(OPTS))
def test_parity_grad_scale_and_found_inf(name):
    def hook(opt, step):
        opt.grad_scale = torch.tensor(4.0, device=DEV)
        opt.found_inf = torch.tensor([1.0 if step in (0, 2) else 0.0], device=DEV)

    params, opt, betas = parity(OPTS[name], torch.float32, hook=hook, kwargs=dict(beta_scope="group"))
    # skipped steps change nothing: step 0 skipped leaves beta at beta_max, step count excludes skips
    assert torch.equal(opt._scopes.step.cpu(), torch.full_like(opt._scopes.step.cpu(), STEPS - 2))


@pytest.mark.parametrize("name", list(OPTS))
def test_parity_found_inf_that_is_not_positive_does_not_skip(name):
    """Only found_inf > 0 skips a step (StepBatch.skip); a NaN found_inf does not, and then both the update
    and the scope commit (step count, beta, beta_prod) happen, as in the reference."""
    def hook(opt, step):
        opt.found_inf = torch.tensor([float("nan") if step == 1 else 0.0], device=DEV)

    _, opt, _ = parity(OPTS[name], torch.float32, hook=hook, kwargs=dict(beta_scope="group"))
    assert torch.equal(opt._scopes.step.cpu(), torch.full_like(opt._scopes.step.cpu(), STEPS))


@pytest.mark.parametrize("name", list(OPTS))
def test_parity_grad_scale_in_the_sums_and_lr_change_on_a_skipped_step(name):
    """With test_parity_grad_scale_and_found_inf's 3 steps on CPU, the only step taken is the scopes' first
    (beta_max whatever the sums): here two more steps reach beta's sums, whose gradients are divided by
    grad_scale. Group 0's lr changes at the skipped step 2: prev_lr must keep the lr of step 1, the last
    step taken (a skipped step commits nothing), so step 3 weighs <g, d> with the old lr."""
    def hook(opt, step):
        opt.grad_scale = torch.tensor(4.0, device=DEV)
        opt.found_inf = torch.tensor([1.0 if step in (0, 2) else 0.0], device=DEV)
        if step == 2:
            opt.param_groups[0]["lr"] = 0.01
        if step == 3:  # flip=True alternates the sign each step: step 3's gradients against step 1's
            for p in (p for group in opt.param_groups for p in group["params"]):
                p.grad.neg_()

    steps = STEPS + 2
    _, opt, betas = parity(OPTS[name], torch.float32, hook=hook, steps=steps, kwargs=dict(beta_scope="group"),
                           flip=True)
    assert_beta_moves(betas[:1] + betas[3:4])  # step 3's beta leaves beta_max (betas[0]: step 0 was skipped)
    assert torch.equal(opt._scopes.step.cpu(), torch.full_like(opt._scopes.step.cpu(), steps - 2))


@pytest.mark.parametrize("name", list(OPTS))
def test_found_inf_changes_nothing(name):
    params, opt, _ = run(OPTS[name], "triton", torch.float32, steps=2)
    check_found_inf_changes_nothing(params, opt)


@pytest.mark.parametrize("name", list(OPTS))
def test_parity_lr_tensor_and_lr_change(name):
    parity(OPTS[name], torch.float32, groups=lr_tensor_groups(groups_of), hook=change_lrs_at_step_2)


@pytest.mark.filterwarnings("ignore:invalid value encountered")  # the interpreter's NumPy: inf * 0 in pass 2
@pytest.mark.parametrize("name", list(OPTS))
def test_an_inf_parameter_without_weight_decay_keeps_beta_finite(name):
    check_inf_parameter_without_decay(OPTS[name], "triton", DEV)


@pytest.mark.parametrize("cls", [AMSGD, AMAdamW, RLLC])
def test_zeros_keep_their_sign_as_in_the_reference(cls):
    check_signed_zeros_as_the_reference(cls, "triton", DEV)


@pytest.mark.filterwarnings("ignore:invalid value encountered")  # the interpreter's NumPy: inf * 0 in pass 2
@pytest.mark.parametrize("name", list(OPTS))
def test_an_inf_parameter_in_whole_blocks_without_weight_decay_keeps_beta_finite(monkeypatch, name):
    """test_an_inf_parameter_without_weight_decay_keeps_beta_finite on the unmasked path (NOTE [vector
    access]): a tensor of whole, aligned blocks, whose pass-1 load of x must still be switched off in a
    group without decay (NOTE [x in pass 1]: AM-AdamW's mu x with mu = 0 and x = inf would be NaN)."""
    monkeypatch.setattr(triton_backend, "BLOCK", triton_backend.COMPILED_BLOCK)

    def inf_run(backend):
        params = make_params([(2 * triton_backend.COMPILED_BLOCK,), (7,)], torch.float32)
        with torch.no_grad():
            params[0][5] = float("inf")
        opt = OPTS[name](params, lr=0.05, weight_decay=0.0, backend=backend)
        return params, opt, train(opt, params, 3, "beta", flip=True)

    ref, got = inf_run("torch"), inf_run("triton")
    assert all(torch.isfinite(b).all() for b in got[2])
    assert torch.isfinite(got[0][0]).sum() == got[0][0].numel() - 1  # only the inf element
    assert_same_run(ref, got, torch.float32, f"{name} inf parameter, whole blocks")


@pytest.mark.parametrize("name", list(OPTS))
def test_parity_nonfinite_grad(name):
    def groups(ps):
        return [{"params": ps[:2], "lr": 0.05}, {"params": ps[2:], "lr": 0.02}]

    def poisoned(backend):
        params = make_params([(7,), (4,), (5,)], torch.float32)
        opt = OPTS[name](groups(params), backend=backend, beta_scope="group")

        def poison(_opt, step):
            if step == 2:
                params[2].grad[1] = float("nan")

        return params, opt, train(opt, params, 3, "beta", hook=poison)

    ref, got = poisoned("torch"), poisoned("triton")
    assert torch.isnan(got[2][-1][1]) and not torch.isnan(got[2][-1][0])
    assert_same_run(ref, got, torch.float32, "non-finite grad")


def test_bfloat16_ties_round_to_even_as_torch():
    """NOTE [bfloat16 rounding] (triton_kernels/tensor_table.py store_as): a float32 result exactly halfway
    between two bfloat16 numbers is stored as the even one, as torch's .to(torch.bfloat16) (random data
    almost never hits a tie). AMSGD's first step with lr = 1 is x - g = 1 + (2 i + 1) 2^-8 here: every
    element a tie, half of them rounding down."""
    def tie_run(backend):
        x = (1.0 + torch.arange(8, dtype=torch.float32) * 2.0 ** -7).to(DEV, torch.bfloat16).requires_grad_()
        opt = AMSGD([x], lr=1.0, backend=backend)
        x.grad = torch.full_like(x, -(2.0 ** -8))
        opt.step()
        return x.detach().cpu()

    ref, got = tie_run("torch"), tie_run("triton")
    assert torch.equal(got, ref), ((got.float() - 1) * 2 ** 8, (ref.float() - 1) * 2 ** 8)


@pytest.mark.parametrize("path", vector_params("am"))
def test_vector(path):
    """SPEC.md's AM conformance vectors (test_vectors.py lists triton only where a GPU or the interpreter
    was on when the tests were collected), float32."""
    replay_am_vector(path, DEV, "triton", torch.float32)


@pytest.mark.parametrize("name", ["AMSGD", "AMAdamW", "AMAdamW-late"])
def test_fixed_beta_is_torchs_own_optimizer(name):
    """README: adaptive=False, lam=0 is torch.optim.SGD(momentum=b, dampening=b) / AdamW, here on triton
    (test_torch_parity.py's cases: 20 steps, two groups, odd and empty shapes, an lr change; with tensors
    whose first gradient comes late under beta_scope="tensor")."""
    from test_torch_parity import run_pair

    if name == "AMSGD":
        run_pair(AMSGD, dict(adaptive=False, lam=0.0, beta_max=0.85, maximize=True, backend="triton"),
                 torch.optim.SGD, dict(momentum=0.85, dampening=0.85, maximize=True), torch.float32, seed=3,
                 weight_decays=(0.0, 0.01))
    else:
        kw = dict(betas=(0.8, 0.99), eps=1e-8)
        late = {1: 4, 4: 12} if name.endswith("late") else None
        run_pair(AMAdamW, dict(adaptive=False, lam=0.0, beta_scope="tensor", backend="triton", **kw),
                 torch.optim.AdamW, dict(kw, foreach=False), torch.float32, seed=5, weight_decays=(0.01, 0.1),
                 late=late)


def test_parity_mixed_dtypes():
    """float32, bfloat16 and float16 parameters in one step: each compared at its own dtype's tolerance,
    with gradients that move beta off its clamp."""
    def groups(ps):
        return [{"params": ps[:3], "lr": 0.05}, {"params": ps[3:], "lr": 0.02, "weight_decay": 0.01}]

    for cls in OPTS.values():
        def run_mixed(backend):
            params = mixed_dtype_params()
            opt = cls(groups(params), backend=backend)
            return params, opt, train(opt, params, 3, "beta", flip=True)

        assert_same_run(run_mixed("torch"), run_mixed("triton"), torch.bfloat16, f"{cls.__name__} mixed dtypes")


@pytest.mark.parametrize("cls", [AMSGD, AMAdamW, RLLC])
def test_a_tensor_whose_state_is_reset_restarts_its_scope(cls):
    # NOTE [a reset tensor restarts its scope] (every backend: test_optimizer_api.py, test_rllc.py)
    scope = {"scope": "tensor"} if cls is RLLC else {"beta_scope": "tensor"}
    check_a_reset_tensor_restarts_its_scope(lambda params: cls(params, backend="triton", **scope), "del", device=DEV)


@pytest.mark.parametrize("cls", [AMSGD, AMAdamW, RLLC])
def test_float64_gradients_are_read_as_float32(cls):
    # the triton kernels read float32, bfloat16 and float16: a float64 gradient is converted first
    check_float64_grads_are_read_as_float32(lambda params: cls(params, backend="triton"), steps=2, device=DEV)


@pytest.mark.parametrize("name", list(OPTS))
def test_bit_identical_runs(name):
    a = run(OPTS[name], "triton", torch.float32, kwargs=dict(beta_scope="tensor"))
    b = run(OPTS[name], "triton", torch.float32, kwargs=dict(beta_scope="tensor"))
    assert_bit_identical(a, b)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64], ids=str)
def test_exp_avg_sq_alone_in_another_dtype_is_cast_at_the_next_step(dtype):
    check_exp_avg_sq_alone_is_cast(lambda ps: AMAdamW(ps, lr=0.05, weight_decay=0.01, backend="triton"), dtype, DEV)


@pytest.mark.parametrize("cls", [AMSGD, AMAdamW, RLLC])
@pytest.mark.parametrize("change", ["gradient-cut-short", "state-cut-short"])
def test_a_tensor_changed_at_its_own_address_is_refused(cls, change):
    """NOTE [state fits]: the tables are cached by address, and a gradient or state tensor can change shape
    at its address (x.data = x.data[:2]). Its element count is part of the cache key, so such a step is
    checked as a new table is, and refused before anything changes, as the reference refuses it (the
    kernels would otherwise read and write past the tensor's end)."""
    params = make_params([(4, 3), (7,)], torch.float32, transposed_last=False)
    opt = cls(params, backend="triton")
    for p, g in zip(params, grads_for(params, 0)):
        p.grad = g
    opt.step()
    opt.step()  # the same gradients at the same addresses: the cached table
    p = params[0]
    first = next(key for key in opt.state[p] if not key.startswith("amm_"))
    if change == "gradient-cut-short":
        p.grad.data = p.grad.data[:2]
    else:
        opt.state[p][first] = opt.state[p][first][..., :2, :]
    before = [t.detach().clone() for t in params], {k: v.clone() for k, v in opt.state[params[1]].items()}
    with pytest.raises(ValueError, match=r"tensor 0 of this step: its (gradient|optimizer state) has shape"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before[0], params))
    assert all(torch.equal(v, opt.state[params[1]][k]) for k, v in before[1].items())


@pytest.mark.parametrize("cls", [AMSGD, AMAdamW, RLLC])
@pytest.mark.parametrize("what", ["parameter", "state"])
def test_a_tensor_made_by_expand_after_construction_is_refused_before_anything_changes(cls, what):
    """As on the other backends (tests/test_bad_input.py): a parameter or state tensor whose elements share
    memory, made so after construction, is refused before any kernel; its working copy's copy back would
    fail only after tensor 0 was updated and the scope's step counted."""
    params = make_params([(4, 3), (7,)], torch.float32, transposed_last=False)
    opt = cls(params, backend="triton")
    for p, g in zip(params, grads_for(params, 0)):
        p.grad = g
    opt.step()
    if what == "parameter":
        params[1].data = torch.randn(1, device=DEV).expand(7)
    else:
        name = cls.STATE_NAMES[-1]
        t = opt.state[params[1]][name]
        opt.state[params[1]][name] = torch.zeros(1, dtype=t.dtype, device=DEV).expand(t.shape)
    before = [t.detach().clone() for t in params], {k: v.clone() for k, v in opt.state[params[0]].items()}
    scopes = {k: v.clone() for k, v in opt._scopes.to_dict().items() if isinstance(v, torch.Tensor)}
    with pytest.raises(ValueError, match=r"tensor 1 of this step: its (parameter|optimizer state) .*repeats elements"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before[0], params))
    assert all(torch.equal(v, opt.state[params[0]][k]) for k, v in before[1].items())
    assert all(torch.equal(v, opt._scopes.to_dict()[k]) for k, v in scopes.items())


@pytest.mark.parametrize("cls", [AMSGD, AMAdamW, RLLC])
def test_a_complex_gradient_is_refused_before_anything_changes(cls):
    """Where the other backends refuse it (tests/test_bad_input.py): triton converts a gradient of a dtype
    its kernels do not read, and a complex one would lose its imaginary part."""
    params = make_params([(4, 3), (7,)], torch.float32, transposed_last=False)
    opt = cls(params, backend="triton")
    for p, g in zip(params, grads_for(params, 0)):
        p.grad = g
    opt.step()
    params[1].grad.data = torch.randn(7, dtype=torch.complex64, device=DEV)  # (.data: autograd refuses it)
    before = [t.detach().clone() for t in params], {k: v.clone() for k, v in opt.state[params[0]].items()}
    with pytest.raises(TypeError, match=r"tensor 1 of this step: gradients must be real, got torch.complex64"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before[0], params))
    assert all(torch.equal(v, opt.state[params[0]][k]) for k, v in before[1].items())


def test_table_rebuilt_when_param_list_changes():
    params = make_params([(7,), (9,)], torch.float32)
    opt = AMSGD([{"params": params, "lr": 0.1}], backend="triton")
    ref_params = [p.detach().clone().requires_grad_() for p in params]
    ref = AMSGD([{"params": ref_params, "lr": 0.1}], backend="torch")
    for step in range(4):
        for ps in (params, ref_params):
            for i, (p, g) in enumerate(zip(ps, grads_for(ps, step))):
                p.grad = None if (step == 2 and i == 0) else g  # a parameter without grad: a shorter list
        opt.step(), ref.step()
        torch.testing.assert_close(opt.beta, ref.beta, rtol=1e-5, atol=1e-6)
    for a, b in zip(params, ref_params):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cls", [AMSGD, AMAdamW, RLLC])
def test_load_state_dict_keeps_the_tables(monkeypatch, cls):
    """load_state_dict ends in __setstate__, which keeps the caches (a pickle or deepcopy starts without
    them): the next step rebases the table to the loaded state tensors instead of building one (a build
    copies from the host), and the resumed run is the uninterrupted one bit for bit."""
    import copy

    from amm_kernels.triton_kernels import tensor_table

    def run(load_at=None):
        params = make_params([(7,), (4097,), (0,), (3, 5)], torch.float32, seed=2)
        opt = cls([{"params": params[:2], "lr": 0.05}, {"params": params[2:], "lr": 0.02}], backend="triton")
        for step in range(4):
            for p, g in zip(params, grads_for(params, step, flip=True)):
                p.grad = g
            if step == load_at:
                builds.clear()
                opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # new state tensors, same values
                assert opt._device_tables, "the tables were dropped"
            opt.step()
        return params, (opt.law if cls is RLLC else opt.beta)

    builds = []
    monkeypatch.setattr(tensor_table, "_build", lambda *a, _f=tensor_table._build: builds.append(1) or _f(*a))
    (p_ref, b_ref), (p_got, b_got) = run(), run(load_at=2)
    assert builds == [], builds
    assert all(torch.equal(a, b) for a, b in zip(p_ref, p_got)) and torch.equal(b_ref, b_got)


@pytest.mark.parametrize("cls", [AMSGD, AMAdamW, RLLC])
def test_moved_gradients_rebase_the_table(monkeypatch, cls):
    """Gradients at new addresses every step (zero_grad(set_to_none=True)): the table is built once and
    then rebased, patched by kernels (NOTE [tables and graphs]); its meta is the one a fresh build gives,
    the rebased tables share one set of scratch, and the run is the reference's."""
    from amm_kernels.triton_kernels import tensor_table

    builds, rebases = [], []
    monkeypatch.setattr(tensor_table, "_build", lambda *a, _f=tensor_table._build: builds.append(1) or _f(*a))
    monkeypatch.setattr(tensor_table, "_rebased", lambda *a, _f=tensor_table._rebased: rebases.append(1) or _f(*a))
    shapes = [(7,), (4097,), (0,), (3, 5), (9, 9)] * 3  # 15 tensors: several 8-pair patch launches a step
    runs, held = [], []
    for backend in ("torch", "triton"):
        params = make_params(shapes, torch.float32, seed=1)
        opt = cls([{"params": params[:7], "lr": 0.05}, {"params": params[7:], "lr": 0.02}], backend=backend)
        betas = []
        for step in range(4):
            gen = torch.Generator().manual_seed(step)
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen).to(DEV)
            held.append([p.grad for p in params])  # keep them alive: the next grads get new addresses
            opt.step()
            betas.append((opt.law if cls is RLLC else opt.beta).clone())
        runs.append((params, betas))
    assert len(builds) == 1 and len(rebases) == 3, (builds, rebases)
    for a, b in zip(*[r[0] for r in runs]):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.stack(runs[1][1]), torch.stack(runs[0][1]), rtol=1e-5, atol=1e-6)
    latest, *older = reversed(opt._device_tables["triton"].exact.values())  # the last step's, rebased: patched
    assert tuple(tuple(row[:4]) for row in latest.meta.cpu().tolist()) == latest.addresses
    assert [a[1] for a in latest.addresses] == [p.grad.data_ptr() for p in runs[1][0]]
    # every step's table (same layout): the same block tables and one set of scratch (NOTE [shared scratch])
    assert len(older) == 3 and all(t.buckets is latest.buckets for t in older)
    for name in ("partials", "terms", "scope_scratch"):
        assert len({getattr(t, name).data_ptr() for t in [latest, *older]}) == 1, name
    assert all(t.extras is latest.extras for t in older) and (cls is not RLLC or latest.extras)


def _poison_scratch(opt, value):
    """Every scratch buffer of every table the optimizer keeps (none before its first step), filled with value."""
    cache = opt._device_tables.get("triton")
    for table in cache.exact.values() if cache is not None else ():
        for t in (table.partials, table.terms, table.scope_scratch):
            t.fill_(value)
        for extra in table.extras.values():
            extra.partials.fill_(value)
            extra.sums.fill_(value)


@pytest.mark.parametrize("cls,kwargs", [
    (AMSGD, dict(lr=0.05, beta_scope="group")),
    (AMSGD, dict(lr=0.05, delta_f="loss")),
    (AMAdamW, dict(lr=1e-2)),  # a beta per tensor
    (RLLC, dict(lr=0.05, scope="tensor", memory="M(0.8)+M(0.5)+M(0)")),
], ids=["AMSGD-group", "AMSGD-loss", "AMAdamW", "RLLC-k3"])
def test_no_step_reads_scratch_it_did_not_write(cls, kwargs):
    """NOTE [shared scratch]: the tables of one layout share their scratch, which is sound only if a step
    writes every entry it reads first. Every scratch buffer filled with NaN before each step (gradients
    at new addresses, so each step rebases; one step skipped by found_inf; a group without gradients):
    the run is bit-identical to one without."""
    runs = []
    for poison in (False, True):
        params = make_params([(7,), (0,), (4100,), (3, 5)], torch.float32, seed=3, transposed_last=False)
        idle = make_params([(9,)], torch.float32, seed=4)  # its group never gets a gradient
        opt = cls([{"params": params[:2]}, {"params": params[2:]}, {"params": idle}], backend="triton", **kwargs)
        kept = []
        for step in range(4):
            for p, g in zip(params, grads_for(params, step, seed=3)):
                p.grad = g
            kept.append([p.grad for p in params])  # alive: the next step's gradients get new addresses
            opt.found_inf = torch.full((), float(step == 2), device=DEV)
            if poison:
                _poison_scratch(opt, float("nan"))
            loss = torch.tensor(2.0 - 0.3 * step) if kwargs.get("delta_f") == "loss" else None
            opt.step((lambda value=loss: value) if loss is not None else None)
        runs.append([p.detach().clone() for p in params] + [t.clone() for p in params
                                                           for t in opt.state[p].values() if torch.is_tensor(t)])
    assert len(runs[0]) == len(runs[1])
    for a, b in zip(*runs):
        assert torch.equal(a, b)  # (a NaN that leaked in is unequal to itself)


def test_every_patch_launch_has_the_signature_the_first_build_compiled(monkeypatch):
    """_patch_kernel is compiled at a table's first build so that a capture never compiles it; Triton
    types an int argument by its value, so every launch must pass int64 addresses, also when the
    first tensor is empty (address 0: found by a fuzz; the warm-up compiled an int32 variant)."""
    from triton.runtime.jit import mangle_type

    from amm_kernels.triton_kernels import tensor_table

    signatures = []
    kernel = tensor_table._patch_kernel

    class Recording:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                signatures.append(tuple(mangle_type(a) for a in args[1:]))
                return kernel[grid](*args, **kwargs)
            return launch

    monkeypatch.setattr(tensor_table, "_patch_kernel", Recording())
    params = [torch.zeros(0).to(DEV).requires_grad_(), torch.randn(7).to(DEV).requires_grad_(),
              torch.zeros(0, 3).to(DEV).requires_grad_()]
    opt = AMAdamW(params, backend="triton")
    kept = []  # every step's gradients stay alive, so no step's addresses repeat an earlier one's (that
    for _ in range(3):  # step's table would be found as it was, with no patch: the test failed so in CI)
        for p in params:
            p.grad = torch.randn(p.shape).to(DEV)
            kept.append(p.grad)
        opt.step()
    assert len(signatures) >= 3 and len(set(signatures)) == 1, signatures  # the build's, then rebases'
    assert set(signatures[0][1::2]) == {"i64"}


def test_each_optimizer_keeps_its_own_tables(monkeypatch):
    """Nine optimizers of nine layouts (more than one cache holds) stepping in turn with new gradients:
    each rebases its own tables instead of rebuilding them every step (found by a fuzz: a process-wide
    cache of 8 evicted them), and each can still step "inside a capture" after its warm-up."""
    from amm_kernels.triton_kernels import tensor_table

    builds = []
    monkeypatch.setattr(tensor_table, "_build", lambda *a, _f=tensor_table._build: builds.append(1) or _f(*a))
    params = [torch.randn(5 + i).to(DEV).requires_grad_() for i in range(9)]
    opts = [AMSGD([p], lr=0.05, backend="triton") for p in params]
    for _ in range(3):
        for p, opt in zip(params, opts):
            p.grad = torch.randn_like(p)
            opt.step()
    assert len(builds) == 9, builds
    monkeypatch.setattr(tensor_table, "capturing", lambda device: True)
    for p, opt in zip(params, opts):
        p.grad = torch.randn_like(p)
        opt.step()


def test_a_table_found_again_is_the_most_recent(monkeypatch):
    """The cache drops its least recently used table. A step that finds the table of the step before
    changes neither map (TableCache.last); one that finds an older table makes it the most recent, so
    the next new gradients evict another. Nine sets of gradients kept alive (nine addresses), stepped
    G0, G0, G1 .. G7, G0, G8: the cache of 8 then holds G0 and G2 .. G8, and G1 needs a new table."""
    from amm_kernels.triton_kernels import tensor_table

    made = []
    monkeypatch.setattr(tensor_table, "_rebased", lambda *a, _f=tensor_table._rebased: made.append(1) or _f(*a))
    assert tensor_table._CACHE_SIZE == 8
    params = make_params([(7,), (33,)], torch.float32, seed=3)
    opt = AMSGD(params, lr=0.05, backend="triton")
    grads = [[torch.randn_like(p) for p in params] for _ in range(9)]

    def step(k):
        for p, g in zip(params, grads[k]):
            p.grad = g
        opt.step()

    tables = opt._device_tables
    step(0)
    first = tables["triton"].last
    step(0)
    assert tables["triton"].last is first and not made, "the same gradients made a new table"
    for k in (*range(1, 8), 0, 8):
        step(k)
    assert len(made) == 8  # G1 .. G7 and G8 rebased from the latest table of the layout
    step(0)
    assert len(made) == 8 and tables["triton"].last is first, "G0's table was evicted: it was not the most recent"
    step(1)
    assert len(made) == 9, "G1's table was not the least recently used"


@pytest.mark.parametrize("cls", [AMSGD, AMAdamW])
def test_a_weight_decay_schedule_rebases_the_table(monkeypatch, cls):
    """weight_decay changed every step (a schedule's): the table is built once, its decays refilled on
    the device (NOTE [tables and graphs]), and the run is the reference's."""
    from amm_kernels.triton_kernels import tensor_table

    builds = []
    monkeypatch.setattr(tensor_table, "_build", lambda *a, _f=tensor_table._build: builds.append(1) or _f(*a))
    runs = []
    for backend in ("torch", "triton"):
        params = make_params([(7,), (300,), (5, 3)], torch.float32, seed=4)
        opt = cls([{"params": params[:1], "lr": 0.05}, {"params": params[1:], "lr": 0.02, "weight_decay": 0.0}],
                  backend=backend, beta_scope="group")
        gen = torch.Generator().manual_seed(5)
        grads = [[torch.randn(p.shape, generator=gen).to(DEV) for p in params] for _ in range(4)]
        for step in range(4):
            opt.param_groups[1]["weight_decay"] = 0.1 * step  # 0 first: no decay, then a growing one
            for p, g in zip(params, grads[step]):
                p.grad = g
            opt.step()
        runs.append((params, opt.beta.clone()))
    assert len(builds) == 1, builds
    torch.testing.assert_close(runs[1][1], runs[0][1], rtol=1e-5, atol=1e-6)
    for a, b in zip(runs[0][0], runs[1][0]):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cls", [AMAdamW, RLLC])
def test_a_capture_rebases_and_keeps_its_table_but_cannot_build_one(monkeypatch, cls):
    """Under a CUDA graph capture (simulated: tensor_table.capturing says so) a parameter list seen
    before is rebased without any host-to-device copy and its table is kept for the graph; a list never
    seen before is refused with the remedy named (NOTE [tables and graphs])."""
    from amm_kernels.triton_kernels import tensor_table

    params = make_params([(7,), (300,), (5, 3)], torch.float32, seed=2)
    opt = cls(params, backend="triton")
    for p in params:
        p.grad = torch.randn(p.shape).to(DEV)
    opt.step()  # warm-up, outside the "capture"

    def no_copy_to_device(*args, **kwargs):
        raise AssertionError("a host-to-device copy during the capture")

    monkeypatch.setattr(tensor_table, "capturing", lambda device: True)
    monkeypatch.setattr(tensor_table, "_build", no_copy_to_device)
    for p in params:
        p.grad = torch.randn(p.shape).to(DEV)  # backward() in the capture: new addresses
    opt.step()
    table = next(reversed(opt._device_tables["triton"].exact.values()))
    assert table.addresses[0][1] == params[0].grad.data_ptr()
    assert tensor_table._IN_GRAPHS[id(table)] is table

    others = make_params([(11,), (4,)], torch.float32, seed=3)
    opt2 = cls(others, backend="triton")
    for p in others:
        p.grad = torch.ones_like(p)
    with pytest.raises(RuntimeError, match="outside the capture first"):
        opt2.step()
    if cls is RLLC:  # the same parameters, a memory rule never stepped: its matrices are not on the device yet
        with pytest.raises(RuntimeError, match="outside the capture first"):
            RLLC(params, memory="M(0.8)+M(0)", backend="triton").step()


def test_a_captured_table_keeps_the_table_it_was_rebased_from(monkeypatch):
    """A table rebased during a capture is a clone of its source's meta, and the graph repeats that clone
    at every replay: the source must outlive the LRU of tables (here 9 later eager steps at new gradient
    addresses push it out) as the captured table does (NOTE [tables and graphs]). It was freed before."""
    import gc
    import weakref

    from amm_kernels.triton_kernels import tensor_table

    params = make_params([(7,), (300,)], torch.float32, seed=6)
    opt = AMSGD(params, backend="triton")
    grads = []

    def new_grads():  # kept alive, so that every step's gradients have addresses of their own
        for p in params:
            p.grad = torch.randn(p.shape).to(DEV)
            grads.append(p.grad)

    new_grads()
    opt.step()  # warm-up: builds the source table
    source = next(iter(opt._device_tables["triton"].exact.values()))
    source_meta = weakref.ref(source.meta)
    del source
    with monkeypatch.context() as m:
        m.setattr(tensor_table, "capturing", lambda device: True)
        new_grads()
        opt.step()  # "captured": rebased from the source
    for _ in range(tensor_table._CACHE_SIZE + 1):
        new_grads()
        opt.step()
    gc.collect()
    assert source_meta() is not None


_NO_BACKEND = """
import sys, torch
from amm_kernels import AMSGD
p = torch.zeros(3, requires_grad=True); p.grad = torch.ones(3)
for case in ("no_triton", "no_interpreter"):
    sys.modules["triton"] = None if case == "no_triton" else sys.modules.pop("triton", None)
    if case == "no_interpreter":
        del sys.modules["triton"]
    try:
        AMSGD([p], backend="triton").step()
        print(case, "NO ERROR")
    except RuntimeError as err:
        print(case, "ERR", err)
"""


def test_clear_error_without_triton_or_interpreter():
    """backend="triton" with triton missing, or on CPU tensors without the interpreter: a clear error
    naming the fallbacks (one subprocess: the interpreter setting is fixed at triton's first import)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                         env.get("PYTHONPATH", "")])
    out = subprocess.run([sys.executable, "-c", _NO_BACKEND], env=env, capture_output=True, text=True, timeout=120)
    lines = dict(line.split(" ", 1) for line in out.stdout.splitlines() if line.startswith("no_"))
    assert set(lines) == {"no_triton", "no_interpreter"}, out.stdout + out.stderr
    for case, expected in (("no_triton", "triton package"), ("no_interpreter", "TRITON_INTERPRET=1")):
        msg = lines[case]
        assert msg.startswith("ERR") and "'triton'" in msg and "'torch'" in msg and expected in msg, msg


def test_available_backends_follows_interpreter(monkeypatch):
    import amm_kernels

    if CUDA:
        assert "triton" in amm_kernels.available_backends("cuda")
        return
    assert "triton" in amm_kernels.available_backends("cpu")
    monkeypatch.delenv("TRITON_INTERPRET")
    assert "triton" not in amm_kernels.available_backends("cpu")


@pytest.mark.skipif(CUDA, reason="the probe is the interpreter's")
def test_an_interpreter_that_cannot_run_loaded_loop_bounds_is_refused_by_name(monkeypatch):
    """NOTE [interpreter and NumPy]: with this triton the probe runs its loop (and finds the right count);
    where it fails, the import's error names triton's and NumPy's versions and what works."""
    import numpy
    import triton

    assert triton_backend._interpreter_runs_loaded_loops() is None

    class Failing:
        def __getitem__(self, grid):
            def launch(*args):
                raise TypeError("only 0-dimensional arrays can be converted to Python scalars")
            return launch

    monkeypatch.setattr(triton_backend, "_loop_probe", Failing())
    reason = triton_backend._interpreter_runs_loaded_loops()
    assert reason is not None and f"triton {triton.__version__}" in reason and f"NumPy {numpy.__version__}" in reason
    assert "numpy<2.4" in reason and "0-dimensional" in reason


# Sharded parameters: the step split around the all_reduce (tests/_dist.py) is the one-launch step.
from _dist import one_rank_group, one_rank_nccl_group  # noqa: E402,F401


@pytest.mark.parametrize("scope", ["global", "tensor"])
@pytest.mark.parametrize("name", list(OPTS))
def test_split_step_is_the_fused_step(one_rank_group, name, scope):
    a = run(OPTS[name], "triton", torch.float32, kwargs=dict(beta_scope=scope), flip=True)
    b = run(OPTS[name], "triton", torch.float32, kwargs=dict(beta_scope=scope, process_group=one_rank_group), flip=True)
    assert_bit_identical(a, b)
    assert all(torch.equal(getattr(a[1]._scopes, k), getattr(b[1]._scopes, k)) for k in ("step", "beta", "beta_prod"))
    assert len({float(x.flatten()[0]) for x in a[2][1:]}) > 1, "beta should move"


@pytest.mark.skipif(not CUDA, reason="NCCL needs a GPU")
@pytest.mark.parametrize("name", list(OPTS))
def test_split_step_over_nccl_is_the_fused_step(one_rank_nccl_group, name):
    a = run(OPTS[name], "triton", torch.float32, flip=True)
    b = run(OPTS[name], "triton", torch.float32, kwargs=dict(process_group=one_rank_nccl_group), flip=True)
    assert_bit_identical(a, b)
    assert len({float(x.flatten()[0]) for x in a[2][1:]}) > 1, "beta should move"


def test_every_step_runs_under_a_guard_for_its_parameters_device(monkeypatch):
    """NOTE [device guard] (triton_backend.py): Triton launches on the current CUDA device, so each
    optimizer's step enters a guard for its parameters' device: torch.cuda.device(cuda:1) for parameters
    on cuda:1 (constructed here without a GPU), nothing on the CPU. Two GPUs would be needed to run it."""
    import types

    from amm_kernels import triton_backend as tb

    on_cuda1 = tb.on_params_device(types.SimpleNamespace(params=[types.SimpleNamespace(device=torch.device("cuda:1"))]))
    assert isinstance(on_cuda1, torch.cuda.device) and on_cuda1.idx == 1
    entered = []
    real = tb.on_params_device
    monkeypatch.setattr(tb, "on_params_device", lambda batch: entered.append(batch.params[0].device) or real(batch))
    for cls in (AMSGD, AMAdamW, RLLC):
        params = make_params([(7,), (5, 3)], torch.float32, seed=8)
        for p in params:
            p.grad = torch.ones_like(p)
        cls(params, backend="triton").step()
    assert entered == [params[0].device] * 3


def test_division_by_the_grad_scale_rounds_as_torchs():
    """NOTE [IEEE division] (triton_kernels/am_math.py): AMSGD's first momentum is g / grad_scale, the
    correctly rounded float32 quotient, for a scale whose reciprocal is not exact (3). In the interpreter
    it fails on a multiply by the reciprocal (checked); compiled on a GPU, also on Triton's plain `/`
    (div.full.f32, 2 ulp), which the interpreter computes exactly. The expected quotient is torch's on the
    CPU: on CUDA, torch divides by a Python number as a multiply by its reciprocal (1381 of these 4097
    elements differ from the quotient, seen on an H200), and the reference backend divides by the
    grad_scale tensor, which is a true division on both."""
    gen = torch.Generator().manual_seed(9)
    g = torch.randn(4097, generator=gen)
    p = torch.randn(4097, generator=gen).to(DEV).requires_grad_()
    p.grad = g.to(DEV)
    opt = AMSGD([p], lr=0.1, backend="triton", adaptive=False)
    opt.grad_scale = torch.tensor(3.0, device=DEV)
    opt.found_inf = torch.zeros((), device=DEV)
    opt.step()
    d = opt.state[p]["momentum_buffer"].cpu()
    expected = g / torch.tensor(3.0)
    assert torch.equal(d, expected), (d != expected).sum().item()

"""RLLC with backend="triton" (amm_kernels/triton_rllc.py) against the reference (backend="torch"): law,
parameters and memory, like a kernel parity test.

Without a GPU the kernels run on CPU tensors in Triton's interpreter, which must be switched on before
triton is first imported (tests/_triton.py does that for every Triton test). Small sizes and
few steps on CPU (the interpreter is slow), larger ones on CUDA.
"""

import pytest
import torch

from _triton import CUDA, DEV, grads_for, import_triton_backend, interpreter_env, make_params  # noqa: E402,F401
from _triton import assert_bit_identical, change_lrs_at_step_2, check_found_inf_changes_nothing, lr_tensor_groups
from _triton import assert_same_run as assert_runs_agree, mixed_dtype_params, train
from _triton import blocks_to_test

triton_backend = import_triton_backend()

from _helpers import vector_params  # noqa: E402
from amm_kernels.rllc import RLLC, rllc_backends  # noqa: E402
from test_rllc import replay_vector  # noqa: E402

STEPS = 8 if CUDA else 4
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
if CUDA:
    SHAPES = [(1,), (7,), (4097,), (0,), (1024, 1024), (3, 5), (0, 4), (33, 4097), (2, 3, 4), (5, 3)]
else:
    SHAPES = [(1,), (7,), (4097,), (0,), (3, 5), (0, 4), (2, 3, 4), (5, 3)]
MEMORIES = ["M(0.9)+M(0)", "M(0.9)+M(0.8)+M(0.7)", "J(0.8,2)+M(0)", "C(0.9,0.3)+M(0)"]
SCOPE_FIELDS = ("step", "law")





@pytest.mark.parametrize("path", vector_params("rllc"))
def test_vector(path):
    """The RLLC conformance vectors (SPEC.md section 4), float32, as test_rllc.py replays them on the
    other backends."""
    replay_vector(path, DEV, "triton", torch.float32)


def groups_of(params, n_groups=3, lrs=(0.05, 0.02, 0.1)):
    return [{"params": params[i::n_groups], "lr": lrs[i]} for i in range(n_groups)]


def run(backend, dtype, memory="M(0.9)+M(0.8)+M(0.7)", scope="global", steps=STEPS, shapes=SHAPES, hook=None,
        groups=None, seed=0, law_lr=0.2, process_group=None):
    """Train from a fixed start with fixed gradients; returns (params, opt, laws per step)."""
    params = make_params(shapes, dtype, seed)
    opt = RLLC(groups_of(params) if groups is None else groups(params), law_lr=law_lr, memory=memory, scope=scope,
               backend=backend, process_group=process_group)
    return params, opt, train(opt, params, steps, "law", hook=hook, seed=seed)


def assert_same_run(ref, got, dtype, what):
    assert_runs_agree(ref, got, dtype, what, "law", SCOPE_FIELDS)


def parity(dtype, **kw):
    ref = run("torch", dtype, **kw)
    got = run("triton", dtype, **kw)
    assert_same_run(ref, got, dtype, f"{dtype} {kw}")
    return got


def test_triton_is_an_rllc_backend():
    assert "triton" in rllc_backends(DEV)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("scope", ["global", "group", "tensor"])
def test_parity_scopes_dtypes(scope, dtype):
    _, opt, laws = parity(dtype, scope=scope)
    assert not torch.equal(laws[-1], laws[0])  # the law moved


@pytest.mark.parametrize("memory", MEMORIES)
def test_parity_memories(memory):
    parity(torch.float32, memory=memory, scope="group")


@pytest.mark.parametrize("shapes", [[(1,)], [(7,)], [(4097,)], [(0,)], [(0,), (0, 3)], [(5000,), (1,)]], ids=str)
def test_parity_single_shapes(shapes):
    parity(torch.float32, shapes=shapes, memory="J(0.8,2)+M(0)", groups=lambda ps: [{"params": ps, "lr": 0.05}])


@pytest.mark.parametrize("block", blocks_to_test(triton_backend))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("memory", ["M(0.9)+M(0)", "J(0.8,2)+M(0)"])  # k = 2: no row past k; k = 3: one
def test_parity_whole_blocks(monkeypatch, memory, dtype, block):
    """NOTE [vector access]: a block wholly inside a tensor whose numel is a multiple of 8 (every memory
    unit then starts aligned) takes the unmasked path; the partial last block and a numel off 8 do not."""
    monkeypatch.setattr(triton_backend, "BLOCK", block)
    parity(dtype, shapes=[(2 * block,), (block + 8,), (block + 4,)], memory=memory,
           groups=lambda ps: [{"params": ps, "lr": 0.05}])


@pytest.mark.parametrize("scope", ["global", "tensor"])
def test_parity_when_the_combine_takes_several_loads(monkeypatch, scope):
    """The combine kernel sums a scope's slots a tile at a time (NOTE [finalize tiles]); with 2 slots a
    tile every scope here takes several loads, the last one partial, as on a GPU for scopes of over
    1024 slots (k = 2)."""
    import amm_kernels.triton_rllc as triton_rllc

    monkeypatch.setattr(triton_rllc, "_combine_chunk", lambda np2: 2)
    monkeypatch.setattr(triton_backend, "BLOCK", triton_backend.COMPILED_BLOCK)
    parity(torch.float32, shapes=[(5000,), (3,), (2049,), (0,), (1025,)], memory="M(0.9)+M(0)", scope=scope,
           groups=lambda ps: [{"params": ps, "lr": 0.05}])


def test_parity_two_groups_one_memory_unit_and_mixed_dtypes():
    def groups(ps):
        return [{"params": ps[:3], "lr": 0.05}, {"params": ps[3:], "lr": 0.02}]

    def run_mixed(backend, memory):
        params = mixed_dtype_params()
        opt = RLLC(groups(params), law_lr=0.1, memory=memory, scope="group", backend=backend)
        return params, opt, train(opt, params, 3, "law")

    for memory in ("M(0.9)+M(0)", "M(0.5)"):
        assert_same_run(run_mixed("torch", memory), run_mixed("triton", memory), torch.bfloat16, f"mixed {memory}")


def test_parity_grad_scale_and_found_inf():
    def hook(opt, step):
        opt.grad_scale = torch.tensor(4.0, device=DEV)
        opt.found_inf = torch.tensor([1.0 if step in (0, 2) else 0.0], device=DEV)

    _, opt, _ = parity(torch.float32, hook=hook, scope="group", memory="C(0.9,0.3)+M(0)")
    assert torch.equal(opt._scopes.step.cpu(), torch.full_like(opt._scopes.step.cpu(), STEPS - 2))


@pytest.mark.filterwarnings("ignore:invalid value encountered")
def test_found_inf_changes_nothing():
    params, opt, _ = run("triton", torch.float32, steps=2, scope="tensor")
    check_found_inf_changes_nothing(params, opt, inf_grad=True)


def test_parity_nonfinite_grad():
    def groups(ps):
        return [{"params": ps[:2], "lr": 0.05}, {"params": ps[2:], "lr": 0.02}]

    def hook_nan(backend):
        params = make_params([(7,), (4,), (5,)], torch.float32)
        opt = RLLC(groups(params), law_lr=0.1, scope="group", backend=backend)

        def poison(_opt, step):
            if step == 2:
                params[2].grad[1] = float("nan")

        return params, opt, train(opt, params, 4, "law", hook=poison)

    ref, got = hook_nan("torch"), hook_nan("triton")
    assert torch.isnan(got[2][2][1]).all() and not torch.isnan(got[2][2][0]).any()
    assert_same_run(ref, got, torch.float32, "non-finite grad")


def test_parity_nonfinite_grad_on_the_first_step():
    """A NaN gradient at the first step reaches the parameters and the memory but not the law, which is
    not updated on a scope's first step (SPEC.md section 4), as the reference."""
    def first_step_nan(backend):
        params = make_params([(7,), (4,), (5,)], torch.float32)
        opt = RLLC([{"params": params, "lr": 0.05}], law_lr=0.1, backend=backend)

        def poison(_opt, step):
            if step == 0:
                params[2].grad[1] = float("nan")

        return params, opt, train(opt, params, 1, "law", hook=poison)

    ref, got = first_step_nan("torch"), first_step_nan("triton")
    assert torch.isfinite(got[2][0]).all() and torch.isnan(got[0][2]).any()
    assert_same_run(ref, got, torch.float32, "non-finite grad on the first step")


@pytest.mark.filterwarnings("ignore:invalid value encountered")  # the interpreter's NumPy: 0 * inf
def test_parity_inf_grad_with_a_tile_row_past_k():
    """k = 3 units in a 4-row tile: the row past k must be 0, not b_3 g = 0 * inf = NaN. On the first step
    the law is not updated (a later step's correction from an inf gradient makes it NaN), so with a law of
    positive weights an inf gradient element gives M L = +inf there and the parameter becomes -inf (as
    torch's SGD would), not NaN."""
    def inf_run(backend):
        params = make_params([(7,), (5,)], torch.float32)
        opt = RLLC([{"params": params, "lr": 0.05}], law_lr=0.1, law_init=(0.5, 0.3, 0.2),
                   memory="M(0.9)+M(0.8)+M(0.7)", backend=backend)

        def poison(_opt, step):
            if step == 0:
                params[1].grad[2] = float("inf")

        return params, opt, train(opt, params, 1, "law", hook=poison)

    ref, got = inf_run("torch"), inf_run("triton")
    assert ref[0][1][2] == float("-inf")
    assert_same_run(ref, got, torch.float32, "inf grad, k = 3")


def test_parity_lr_tensor_and_lr_change():
    parity(torch.float32, groups=lr_tensor_groups(groups_of), hook=change_lrs_at_step_2, memory="M(0.9)+M(0)")


def test_bit_identical_runs():
    a = run("triton", torch.float32, scope="tensor", steps=3)
    b = run("triton", torch.float32, scope="tensor", steps=3)
    assert_bit_identical(a, b)
    assert all(torch.equal(a[1].state[x]["memory"], b[1].state[y]["memory"]) for x, y in zip(a[0], b[0]))


def test_frozen_law_is_torch_sgd_momentum():
    params = make_params([(7,), (3, 5)], torch.float32)
    theirs = [p.detach().clone().requires_grad_() for p in params]
    opt = RLLC(params, lr=0.03, law_lr=0.0, memory="M(0.85)+M(0)", law_init=(0.85, 1.0), backend="triton")
    ref = torch.optim.SGD(theirs, lr=0.03, momentum=0.85, nesterov=True)
    for step in range(STEPS):
        for a, b, g in zip(params, theirs, grads_for(params, step)):
            a.grad, b.grad = g, g.clone()
        opt.step(), ref.step()
    for a, b in zip(params, theirs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# Sharded parameters: the step with a (one-rank) process_group is the step without (tests/_dist.py).
from _dist import one_rank_group  # noqa: E402,F401


def test_split_step_is_the_fused_step(one_rank_group):
    a = run("triton", torch.float32, scope="tensor", steps=4)
    b = run("triton", torch.float32, scope="tensor", steps=4, process_group=one_rank_group)
    assert_bit_identical(a, b)
    assert not torch.equal(a[2][1], a[2][-1]), "the law should move"

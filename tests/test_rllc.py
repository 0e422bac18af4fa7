"""RLLC (SPEC.md section 4): memory grammar, conformance vectors, the float64 oracle, torch parity,
basis invariance, rank-deficient memories, and the torch.optim behaviour shared with AMSGD/AMAdamW."""
import copy
import types

import _cuda_sim
import numpy as np
import pytest
import torch

from amm_kernels import backend_supports_dtype, backends
from amm_kernels.memory import MemorySyntaxError, memory_rule, parse_memory
from amm_kernels.rllc import RLLC, rllc_backends, supports_rllc

from _helpers import (assert_params_after, check_a_reset_tensor_restarts_its_scope, check_groups_rearranged_by_hand, check_found_inf_skips_the_step, check_grad_scaler_skips_inf_steps,
                      check_low_precision_params_keep_dtype, check_scheduler_closure_and_add_param_group,
                      check_sparse_gradient_raises_before_any_state_changes, load_vector, model_params,
                      resume_from_state_dict, set_grads, set_vector_grads, step_on_a_nan_gradient, tolerance,
                      vector_params, vector_tensors)
from spec_rllc_f64 import RLLCSpec, memory_matrices

CPU = torch.device("cpu")
BACKENDS = rllc_backends(CPU)
# The oracle and basis tests run in float64, which the compiled backends do not take (they are
# float32/bfloat16/float16; tests/test_rllc_kernels.py holds them to the reference instead).
F64_BACKENDS = [b for b in BACKENDS if backend_supports_dtype(b, torch.float64)]


def dtype_cases(backend_names, dtypes):
    """(backend, dtype) pairs for parametrize, leaving out dtypes a backend does not support."""
    return [pytest.param(b, dt, id=f"{b}-{str(dt).split('.')[-1]}")
            for b in backend_names for dt in dtypes if backend_supports_dtype(b, dt)]
MEMORIES = ["M(0.9)+M(0)", "M(0.9)+M(0.8)+M(0.7)", "J(0.8,2)+M(0)", "C(0.9,0.3)+M(0)"]


def test_reference_backend_runs_rllc():
    assert "torch" in BACKENDS, f"rllc_backends(cpu) = {BACKENDS!r} lacks the 'torch' reference"


# --------------------------------------------------------------------------------------------------
# memory grammar
def test_memory_units_give_the_spec_matrices():
    U, b = parse_memory("M(0.9)+M(0)")
    assert U == ((0.9, 0.0), (0.0, 0.0)) and b == (1.0, 1.0)
    U, b = parse_memory("J(0.8,2)+M(0)")
    assert U == ((0.8, 1.0, 0.0), (0.0, 0.8, 0.0), (0.0, 0.0, 0.0)) and b == (1.0, 0.0, 1.0)
    U, b = parse_memory("J(0.5, 3)")  # m_i takes the previous m_{i-1}: U[i-1][i] = 1
    assert np.array_equal(np.array(U), 0.5 * np.eye(3) + np.eye(3, k=1)) and b == (1.0, 0.0, 0.0)
    U, b = parse_memory(" C( 0.9 , 0.3 ) + M(-0.5) ")
    c, s = 0.9 * np.cos(0.3), 0.9 * np.sin(0.3)
    np.testing.assert_allclose(np.array(U), [[c, s, 0], [-s, c, 0], [0, 0, -0.5]], rtol=1e-15)
    assert b == (1.0, 0.0, 1.0)
    assert parse_memory("M(1e-1)+M(.5)+M(+2.)")[0] == ((0.1, 0, 0), (0, 0.5, 0), (0, 0, 2.0))


def test_rotation_unit_rotates_the_pair():
    # (m1, m2) <- r (cos phi m1 - sin phi m2, sin phi m1 + cos phi m2) + (g, 0), written as M U + g b^T
    U, b = (np.array(x) for x in parse_memory("C(0.7,0.4)"))
    m, g = np.array([[1.5, -2.0]]), np.array([0.3])
    new = m @ U + np.outer(g, b)
    r, phi = 0.7, 0.4
    expected = [r * (np.cos(phi) * 1.5 - np.sin(phi) * -2.0) + 0.3, r * (np.sin(phi) * 1.5 + np.cos(phi) * -2.0)]
    np.testing.assert_allclose(new[0], expected, rtol=1e-14)


@pytest.mark.parametrize("text", MEMORIES + ["J(0.7,3)+C(0.5,1.2)+M(0.1)", "M(0.9)+M(0.8)+M(0.7)+M(0)"])
def test_parser_agrees_with_the_oracles_reading_of_the_spec(text):
    U, b = parse_memory(text)
    U_spec, b_spec = memory_matrices(text)
    np.testing.assert_array_equal(np.array(U), U_spec)
    np.testing.assert_array_equal(np.array(b), b_spec)


BAD_MEMORIES = [
    ("M(0.9)+", 7, "expected a memory unit"),
    ("M(0.9)+X(1)", 7, "expected a memory unit"),
    ("M(0.9", 5, "expected ')'"),
    ("M 0.9)", 2, "expected '('"),
    ("M(0.9))", 6, "expected '+' or the end"),
    ("M(0.9)M(0)", 6, "expected '+' or the end"),
    ("M(abc)", 2, "expected a number for beta"),
    ("M(0.9.1)", 5, "expected ')'"),
    ("J(0.8)", 5, "expected ','"),
    ("J(0.8, 2.5)", 7, "j must be an integer"),
    ("J(0.8, 0)", 7, "must be >= 1"),
    ("C(0.9)", 5, "expected ','"),
    ("M(0.9)+M(1e999)", 9, "must be finite"),
    ("M(1e39)+M(0)", 2, "beta must be finite in float32 (at most 3.4028234663852886e+38"),
    ("", 0, "expected a memory unit"),
    ("m(0.9)", 0, "expected a memory unit"),
]


@pytest.mark.parametrize("text,position,what", BAD_MEMORIES, ids=[repr(t) for t, _, _ in BAD_MEMORIES])
def test_bad_memory_string_points_at_the_offending_character(text, position, what):
    with pytest.raises(MemorySyntaxError) as err:
        RLLC([torch.zeros(2, requires_grad=True)], memory=text)
    assert isinstance(err.value, ValueError) and err.value.position == position
    message = str(err.value)
    assert what in message and message.startswith("RLLC: bad memory string")
    lines = message.splitlines()
    shown = lines.index("    " + text)
    assert lines[shown + 1] == "    " + " " * position + "^", message


def test_explicit_memory_matrices():
    U, b = memory_rule(([[0.9, 0.0], [0.0, 0.0]], [1.0, 1.0]))
    assert U == ((0.9, 0.0), (0.0, 0.0)) and b == (1.0, 1.0)
    U2, b2 = memory_rule((torch.tensor([[0.9, 0.0], [0.0, 0.0]], dtype=torch.float64), np.array([1.0, 1.0])))
    assert (U2, b2) == (U, b)
    for bad, message in [
        (([[0.9]], [1.0, 1.0]), "k x k matrix with k = len(b) = 2"),
        (([[0.9, 0], [0, 0]], []), "1-D sequence of k >= 1"),
        (([[0.9, float("nan")], [0, 0]], [1, 1]), "memory U must be finite"),
        (([[1e39, 0], [0, 0]], [1, 1]), "memory U must be finite in float32"),
        (([[0.9, 0], [0, 0]], [1e39, 1]), "memory b must be finite in float32"),
        (([[0.9, 0], [0, 0]], [1, "x"]), "memory b must hold real numbers"),
        ((1, 2, 3), "a pair (U, b)"),
        (42, "a pair (U, b)"),
    ]:
        with pytest.raises(ValueError) as err:
            RLLC([torch.zeros(2, requires_grad=True)], memory=bad)
        assert message in str(err.value), str(err.value)


# --------------------------------------------------------------------------------------------------
# conformance vectors
# Every RLLC backend of every device here: on a GPU machine the cuda and triton kernels replay them too.
DEVICES = [CPU] + ([torch.device("cuda")] if torch.cuda.is_available() else [])


def _backend_dtype_params():
    cases = [pytest.param(device, *case.values, id=f"{device.type}-{case.id}")
             for device in DEVICES for case in dtype_cases(rllc_backends(device), (torch.float64, torch.float32))]
    # The CUDA backend's code on CPU tensors (tests/_cuda_sim.py), GPU or not, as test_vectors.py does.
    return cases + [pytest.param(CPU, _cuda_sim.NAME, torch.float32, id=f"cpu-{_cuda_sim.NAME}-float32")]


@pytest.mark.parametrize("device,backend,dtype", _backend_dtype_params())
@pytest.mark.parametrize("path", vector_params("rllc"))
def test_vector(path, device, backend, dtype):
    if backend == _cuda_sim.NAME:
        _cuda_sim.ensure()
    replay_vector(path, device, backend, dtype)


def replay_vector(path, device, backend, dtype):
    """One RLLC conformance vector on `backend`: the law and the parameters after every step
    (also test_triton_rllc.py's, on the interpreter)."""
    vec = load_vector(path)
    h = vec["hyper"]
    assert np.array_equal(np.array(parse_memory(h["memory"])[0]), np.array(h["U"]))
    assert np.array_equal(np.array(parse_memory(h["memory"])[1]), np.array(h["b"]))
    rtol, atol = tolerance(dtype)
    params = vector_tensors(vec, dtype, device)
    lrs = [g.get("lr", h["lr"]) for g in vec["groups"]]
    opt = RLLC([{"params": ps, "lr": lr} for ps, lr in zip(params, lrs)], law_lr=h["law_lr"], memory=h["memory"],
               law_init=h["law_init"], scope=h.get("scope", "global"), backend=backend)
    where = f"{vec['name']} device={device} backend={backend} {dtype}"
    for i, rec in enumerate(vec["steps"]):
        for gi, lr in enumerate(rec.get("lr", [])):
            opt.param_groups[gi]["lr"] = lr
        set_vector_grads(params, rec, dtype, device)
        opt.step()
        law = opt.law.cpu()
        assert isinstance(law, torch.Tensor) and law.shape == (len(h["b"]),)
        np.testing.assert_allclose(law.to(torch.float64).numpy(), np.array(rec["law_after"]).reshape(law.shape),
                                   rtol=rtol, atol=atol, err_msg=f"{where} step {i}: law")
        assert_params_after(params, rec, dtype, rtol, atol, f"{where} step {i}")


# --------------------------------------------------------------------------------------------------
# against the independent float64 oracle
SHAPES = [[(4, 3), (7,)], [(1,), (0,), (2, 5)], [(6,)]]
LRS = [0.05, 0.02, 0.0]


def _random_groups(seed, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=gen, dtype=dtype) for s in shapes] for shapes in SHAPES]


@pytest.mark.parametrize("backend", F64_BACKENDS)
@pytest.mark.parametrize("scope", ["global", "group", "tensor"])
@pytest.mark.parametrize("memory", MEMORIES)
def test_package_matches_the_float64_oracle(memory, scope, backend):
    init = _random_groups(1)
    params = [[x.clone().requires_grad_() for x in g] for g in init]
    k = len(parse_memory(memory)[1])
    law_init = [0.8] + [0.1] * (k - 1)
    opt = RLLC([{"params": ps, "lr": lr} for ps, lr in zip(params, LRS)], lr=0.03, law_lr=0.2, memory=memory,
               law_init=law_init, scope=scope, backend=backend)
    U, b = memory_matrices(memory)
    spec = RLLCSpec([{"params": [x.numpy() for x in g], "lr": lr} for g, lr in zip(init, LRS)], U, b, 0.2,
                    law_init, scope)
    gen = torch.Generator().manual_seed(2)
    for step in range(20):
        grads = [[torch.randn(x.shape, generator=gen, dtype=torch.float64) for x in g] for g in init]
        if step == 7:
            grads[0][1] = None  # a tensor without a gradient this step
        if step == 12:
            for gi in range(len(LRS)):
                opt.param_groups[gi]["lr"] = spec.groups[gi]["lr"] = 0.04 - 0.01 * gi
        for ps, gs in zip(params, grads):
            for p, g in zip(ps, gs):
                p.grad = g
        opt.step()
        spec.step([[None if g is None else g.numpy() for g in gs] for gs in grads])
        law = opt.law.numpy()
        np.testing.assert_allclose(law, spec.law, rtol=1e-9, atol=1e-9, err_msg=f"step {step}: law")
        for gi, ps in enumerate(params):
            for ti, p in enumerate(ps):
                np.testing.assert_allclose(p.detach().numpy(), spec.groups[gi]["params"][ti], rtol=1e-9, atol=1e-9,
                                           err_msg=f"step {step}: param [{gi}][{ti}]")


# --------------------------------------------------------------------------------------------------
# degenerate cases: torch.optim.SGD
PARITY_SHAPES = [(3, 5), (7,), (1,), (0,), (2, 0, 3), (1, 1, 1)]


@pytest.mark.parametrize("backend,dtype", dtype_cases(BACKENDS, (torch.float64, torch.float32)))
@pytest.mark.parametrize("case", ["momentum", "nesterov", "plain"])
def test_frozen_law_is_torch_sgd(case, dtype, backend):
    beta = 0.85
    law = {"momentum": (1.0, 0.0), "nesterov": (beta, 1.0), "plain": (0.0, 1.0)}[case]
    sgd_kwargs = {"momentum": dict(momentum=beta), "nesterov": dict(momentum=beta, nesterov=True), "plain": {}}[case]
    gen = torch.Generator().manual_seed(3)
    init = [torch.randn(s, generator=gen, dtype=dtype) for s in PARITY_SHAPES]
    ours = [x.clone().requires_grad_() for x in init]
    theirs = [x.clone().requires_grad_() for x in init]
    opt = RLLC([{"params": ours[:3], "lr": 0.03}, {"params": ours[3:], "lr": 0.1}], law_lr=0.0,
               memory=f"M({beta})+M(0)", law_init=law, backend=backend)
    ref = torch.optim.SGD([{"params": theirs[:3], "lr": 0.03}, {"params": theirs[3:], "lr": 0.1}], **sgd_kwargs)
    rtol, atol = (1e-12, 1e-14) if dtype == torch.float64 else tolerance(dtype)
    for step in range(20):
        for a, b in zip(ours, theirs):
            a.grad = torch.randn(a.shape, generator=gen, dtype=dtype)
            b.grad = a.grad.clone()
        opt.step()
        ref.step()
        for i, (a, b) in enumerate(zip(ours, theirs)):
            torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m: f"step {step} tensor {i}: {m}")
    torch.testing.assert_close(opt.law, torch.tensor(law, dtype=dtype), rtol=0, atol=0)


# --------------------------------------------------------------------------------------------------
# basis invariance (the paper's Lemma 3.8)
@pytest.mark.parametrize("backend", F64_BACKENDS)
@pytest.mark.parametrize("scope", ["global", "tensor"])
def test_change_of_memory_basis_gives_the_same_parameters(scope, backend):
    U, b = (np.array(x) for x in parse_memory("M(0.9)+C(0.8,0.5)+M(0)"))
    k = len(b)
    gen = torch.Generator().manual_seed(4)
    shapes = [(8, 3), (11,)]
    params = [torch.randn(s, generator=gen, dtype=torch.float64).requires_grad_() for s in shapes]
    grads = [[torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes] for _ in range(16)]

    def run(opt, ps, steps):
        for step in steps:
            for p, g in zip(ps, grads[step]):
                p.grad = g.clone()
            opt.step()

    opt = RLLC(params, lr=0.05, law_lr=0.3, memory=(U, b), law_init=[0.5, 0.2, -0.1, 0.4], scope=scope,
               backend=backend)
    run(opt, params, range(6))  # by now M has full column rank k in every scope
    Q = np.eye(k) + 0.4 * np.random.default_rng(5).standard_normal((k, k))
    Qinv = np.linalg.inv(Q)
    sd = copy.deepcopy(opt.state_dict())
    Qt = torch.from_numpy(Q)
    for st in sd["state"].values():  # M -> M Q: new unit a = sum_c M[c] Q[c, a]
        st["memory"] = torch.tensordot(Qt, st["memory"], dims=([0], [0]))
        # each tensor's copy of its scope's (step, law) (NOTE [checkpoint carriers]): L -> Q^{-1} L
        st["amm_scope"] = torch.cat([st["amm_scope"][:1], torch.from_numpy(Qinv) @ st["amm_scope"][1:]])
    sd["amm"]["scopes"]["law"] = sd["amm"]["scopes"]["law"] @ torch.from_numpy(Qinv).T  # L -> Q^{-1} L per scope
    twin_params = [p.detach().clone().requires_grad_() for p in params]
    twin = RLLC(twin_params, lr=0.05, law_lr=0.3, memory=(Qinv @ U @ Q, Q.T @ b), law_init=[1, 0, 0, 0],
                scope=scope, backend=backend)
    twin.load_state_dict(sd)
    run(opt, params, range(6, 16))
    run(twin, twin_params, range(6, 16))
    for a, b_ in zip(params, twin_params):
        torch.testing.assert_close(a, b_, rtol=1e-9, atol=1e-11)
    law, twin_law = opt.law.reshape(-1, k).numpy(), twin.law.reshape(-1, k).numpy()
    np.testing.assert_allclose(twin_law, law @ Qinv.T, rtol=1e-8, atol=1e-10)
    assert not np.allclose(law, [0.5, 0.2, -0.1, 0.4])  # the law did move


# --------------------------------------------------------------------------------------------------
# rank-deficient memories
@pytest.mark.parametrize("backend,dtype", dtype_cases(BACKENDS, (torch.float64, torch.float32)))
@pytest.mark.parametrize("memory", ["M(0.9)+M(0.8)+M(0.7)+M(0)", "J(0.8,2)+M(0)", "M(0.5)+M(0.5)", "J(0.9,4)"])
def test_rank_deficient_memory_gives_finite_minimum_norm_corrections(memory, dtype, backend):
    gen = torch.Generator().manual_seed(6)
    params = [torch.randn(s, generator=gen, dtype=dtype).requires_grad_() for s in [(5, 2), (3,), (0,)]]
    opt = RLLC(params, lr=0.02, law_lr=0.1, memory=memory, backend=backend)
    k = opt.k
    for step in range(6):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen, dtype=dtype)
        opt.step()
        assert torch.isfinite(opt.law).all(), f"step {step}: law {opt.law}"
        assert all(torch.isfinite(p).all() for p in params)
        assert all(torch.isfinite(opt.state[p]["memory"]).all() for p in params)
        if memory == "M(0.5)+M(0.5)":  # two equal units forever: the minimum-norm correction splits evenly
            law = opt.law.double()
            torch.testing.assert_close(law[0] - 1.0, law[1], rtol=1e-5, atol=1e-6)
    assert opt.law.shape == (k,)
    # and a zero gradient (a zero Gram matrix later on too) leaves the law as it is
    zero = [torch.zeros(3, dtype=dtype, requires_grad=True)]
    opt0 = RLLC(zero, memory=memory, backend=backend)
    for _ in range(3):
        zero[0].grad = torch.zeros(3, dtype=dtype)
        opt0.step()
    assert torch.equal(opt0.law, torch.tensor([1.0] + [0.0] * (k - 1), dtype=opt0.law.dtype))


def test_step_never_reads_device_values_back():
    # On the meta device every .item() / bool(tensor) raises: the whole step is host-sync free.
    params = [torch.zeros(3, 4, device="meta", requires_grad=True), torch.zeros(5, device="meta", requires_grad=True)]
    opt = RLLC(params, memory="J(0.8,2)+C(0.9,0.3)", scope="tensor")
    opt.grad_scale, opt.found_inf = torch.ones((), device="meta"), torch.zeros((), device="meta")
    for _ in range(3):
        for p in params:
            p.grad = torch.ones_like(p)
        opt.step()
    assert opt.law.shape == (2, 4) and opt.law.device.type == "meta"


# --------------------------------------------------------------------------------------------------
# torch.optim behaviour
BAD_ARGS = [
    (dict(lr=-1.0), ValueError, "lr must be in [0.0, inf)"),
    (dict(lr=float("nan")), ValueError, "lr must be in"),
    (dict(law_lr=-0.1), ValueError, "law_lr must be in [0.0, inf)"),
    (dict(law_lr=float("nan")), ValueError, "law_lr must be in"),
    (dict(law_lr="0.1"), ValueError, "law_lr must be a number"),
    (dict(scope="layer"), ValueError, "scope must be one of 'global', 'group', 'tensor'"),
    (dict(backend="gpu"), ValueError, "backend must be one of"),
    (dict(law_init=(1.0,)), ValueError, "law_init must be a sequence of k = 2 numbers"),
    (dict(law_init=(1.0, float("inf"))), ValueError, "law_init[1] must be a finite number"),
    (dict(memory="M(0.9)+"), ValueError, "bad memory string"),
    (dict(memory=None), ValueError, "memory must be a string"),
]


@pytest.mark.parametrize("kwargs,exc,message", BAD_ARGS, ids=[f"{list(k)[0]}-{i}" for i, (k, _, _) in enumerate(BAD_ARGS)])
def test_bad_arguments_raise_naming_them(kwargs, exc, message):
    with pytest.raises(exc) as err:
        RLLC(model_params(), **kwargs)
    assert message in str(err.value)


def test_a_tensor_without_values_is_refused_naming_the_argument():
    """law_init or memory's U as a meta tensor: a ValueError naming the argument, not torch's "Cannot copy
    out of meta tensor". (The tensors are made here, not at import: a meta torch.eye imports triton, which
    the triton test files must import first, in interpreter mode.)"""
    with pytest.raises(ValueError, match="law_init must hold numbers that can be read"):
        RLLC(model_params(), law_init=torch.ones(2, device="meta"))
    with pytest.raises(ValueError, match="memory U must hold numbers that can be read"):
        RLLC(model_params(), memory=(torch.eye(2, device="meta"), [1.0, 0.0]))


@pytest.mark.parametrize("law_init", [np.array([0.75, 0.25]), (np.float32(0.75), np.int64(0)), torch.tensor([0.75, 0.25])],
                         ids=["numpy-array", "numpy-scalars", "tensor"])
def test_law_init_may_be_an_array_or_hold_numpy_numbers(law_init):
    """As the other numbers (numpy's are numbers): law_init is read once, into floats."""
    expected = tuple(float(v) for v in law_init)
    assert RLLC(model_params(), law_init=law_init)._hyper.law_init == expected
    assert RLLC(model_params(), law_init=list(expected))._hyper.law_init == expected
    with pytest.raises(ValueError, match=r"law_init\[0\] must be a finite number"):
        RLLC(model_params(), law_init=(np.bool_(True), 0.0))


def test_bad_param_group_is_rejected():
    opt = RLLC(model_params())
    with pytest.raises(ValueError, match="lr must be in"):
        opt.add_param_group({"params": [torch.zeros(3, requires_grad=True)], "lr": -1.0})
    with pytest.raises(ValueError, match="sets law_lr=0.5, but law_lr is optimizer-wide .*may set only lr"):
        opt.add_param_group({"params": [torch.zeros(3, requires_grad=True)], "law_lr": 0.5})
    with pytest.raises(ValueError, match="sets weight_decay=0.1, but RLLC has no weight decay"):
        RLLC([{"params": model_params(), "weight_decay": 0.1}])
    with pytest.raises(ValueError, match="may set only lr; momentum is not an RLLC argument"):
        RLLC([{"params": model_params(), "momentum": 0.9}])
    assert len(opt.param_groups) == 1


def test_sparse_gradient_raises_before_any_state_changes():
    check_sparse_gradient_raises_before_any_state_changes(RLLC)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scope", ["global", "group", "tensor"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_state_dict_resume_is_bit_identical(scope, dtype, backend):
    def build(params):
        return RLLC([{"params": params[:2], "lr": 0.03}, {"params": params[2:], "lr": 0.01}], law_lr=0.1,
                    memory="J(0.8,2)+M(0)", scope=scope, backend=backend)

    ref, resumed = resume_from_state_dict(build, dtype=dtype)
    assert torch.equal(ref.law, resumed.law)


def test_loading_a_mismatched_state_is_a_clear_error():
    from amm_kernels import AMSGD

    params = model_params()
    opt = RLLC(params)
    set_grads(params, 0)
    opt.step()
    sd = opt.state_dict()
    with pytest.raises(ValueError, match="saved with k = 2 memory units, this optimizer's memory has k = 3"):
        RLLC(params, memory="M(0.9)+M(0.5)+M(0)").load_state_dict(sd)
    with pytest.raises(ValueError, match="saved with scope='global', this optimizer has scope='tensor'; construct it "
                                         "with scope='global'"):
        RLLC(params, scope="tensor").load_state_dict(sd)
    with pytest.raises(ValueError, match="saved by AMSGD, not RLLC"):
        sgd = AMSGD(params)
        sgd.step()
        RLLC(params).load_state_dict(sgd.state_dict())
    with pytest.raises(ValueError, match="not saved by an amm_kernels optimizer"):
        RLLC(params).load_state_dict(torch.optim.SGD(params).state_dict())
    bad = copy.deepcopy(sd)
    bad["amm"]["format_version"] = 99
    with pytest.raises(ValueError, match="format_version 99"):
        RLLC(params).load_state_dict(bad)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scope,how", [("group", "remove"), ("tensor", "remove"), ("group", "reverse"),
                                       ("group", "copy")])
def test_param_groups_removed_or_reordered_by_hand_keep_their_rows(backend, scope, how):
    check_groups_rearranged_by_hand(lambda groups: RLLC(groups, law_lr=0.1, scope=scope, backend=backend), how)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("how", ["del", "clear"])
def test_a_tensor_whose_state_is_reset_restarts_its_scope(backend, how):
    """NOTE [a reset tensor restarts its scope]: its law starts again from the memory's, step 0."""
    check_a_reset_tensor_restarts_its_scope(lambda params: RLLC(params, law_lr=0.1, scope="tensor", backend=backend),
                                            how)


@pytest.mark.parametrize("backend", BACKENDS)
def test_found_inf_skips_the_step_and_leaves_state_intact(backend):
    opt, twin = check_found_inf_skips_the_step(
        lambda params: RLLC(params, law_lr=0.1, scope="tensor", backend=backend))
    torch.testing.assert_close(opt.law, twin.law, rtol=1e-6, atol=1e-7)


def test_grad_scaler_skips_inf_steps():
    check_grad_scaler_skips_inf_steps(RLLC, good_steps=2)


def test_law_shape_follows_scope_and_is_a_copy():
    params = model_params()
    shapes = {"global": (3,), "group": (2, 3), "tensor": (4, 3)}
    for scope, shape in shapes.items():
        opt = RLLC([{"params": params[:1]}, {"params": params[1:]}], memory="J(0.9,2)+M(0)", scope=scope)
        assert opt.law.shape == shape and torch.equal(opt.law.reshape(-1, 3)[0], torch.tensor([1.0, 0, 0]))
        set_grads(params, 0)
        opt.step()
        law = opt.law
        assert law.shape == shape and law.device == params[0].device
        for s in (1, 2):
            set_grads(params, s)
            opt.step()
        assert torch.equal(law, torch.tensor([1.0, 0, 0]).expand(shape))  # the first step's law, not overwritten
        assert not torch.equal(opt.law, law)
    with pytest.raises(AttributeError, match="optimizer.law"):
        opt.beta


def test_params_without_grad_are_skipped():
    params = model_params()
    opt = RLLC(params, scope="tensor")
    for s in range(3):
        set_grads(params, s)
        params[1].grad = None
        opt.step()
    assert torch.equal(params[1].detach(), model_params()[1].detach())
    assert params[1] not in opt.state
    assert torch.equal(opt.law[1], torch.tensor([1.0, 0.0]))
    assert opt.state[params[0]]["memory"].shape == (2, 4, 3)


def test_zero_grad_scheduler_closure_and_add_param_group():
    torch.manual_seed(0)
    _, opt = check_scheduler_closure_and_add_param_group(lambda params, **kw: RLLC(params, scope="tensor", **kw))
    assert opt.law.shape == (4, 2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_params_keep_dtype(dtype):
    params, opt = check_low_precision_params_keep_dtype(lambda ps: RLLC(ps, memory="M(0.9)+M(0.8)+M(0)"), dtype,
                                                        steps=4)
    for p in params:
        assert opt.state[p]["memory"].dtype == dtype
    assert opt.law.dtype == torch.float32 and torch.isfinite(opt.law).all()


def test_low_precision_tracks_float32():
    p32 = model_params(dtype=torch.float32)
    p16 = [p.detach().to(torch.bfloat16).requires_grad_() for p in p32]
    p32 = [p.detach().to(torch.bfloat16).to(torch.float32).requires_grad_() for p in p32]
    opts = [RLLC(ps, lr=0.01, law_lr=0.05) for ps in (p32, p16)]
    for s in range(5):
        set_grads(p32, s)
        for a, b in zip(p16, p32):
            a.grad = b.grad.to(torch.bfloat16)
        for o in opts:
            o.step()
    rtol, atol = tolerance(torch.bfloat16)
    for a, b in zip(p16, p32):
        torch.testing.assert_close(a.float(), b, rtol=rtol, atol=atol)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_nan_gradient_on_the_first_step_leaves_the_law_at_law_init(backend):
    """SPEC.md section 4: the law is not updated on a scope's first step (the memory is still 0). A NaN in
    the first gradient reaches the parameters, as in torch's SGD, but not the law: the first step's
    correction pinv(0) (M^T g), with M^T g = 0 * NaN = NaN, is never applied."""
    params = model_params()
    law_init = (0.75, 0.25)
    opt = RLLC(params, law_lr=0.1, law_init=law_init, backend=backend)
    set_grads(params, 0)
    params[0].grad[0, 0] = float("nan")
    opt.step()
    assert torch.isnan(params[0]).any()
    assert torch.equal(opt.law.cpu().double(), torch.tensor(law_init, dtype=opt.law.dtype).double())


def test_nonfinite_gradient_gives_nonfinite_law():
    params, opt = step_on_a_nan_gradient(RLLC)
    assert torch.isnan(opt.law).all()
    set_grads(params, 2)  # a NaN memory afterwards: still no error from the eigensolver
    opt.step()
    assert torch.isnan(opt.law).all()


def test_a_backend_without_rllc_kernels_is_not_offered_and_is_refused_by_name(monkeypatch):
    """A registered backend (amm_kernels.backends.register) whose module has no rllc_step: rllc_backends()
    and supports_rllc leave it out, "auto" passes it over, and RLLC(backend=its name) is refused at the
    step, naming the backends that run RLLC, before any state is made."""
    monkeypatch.setattr(backends, "_BACKENDS", dict(backends._BACKENDS))
    monkeypatch.setattr(backends, "BACKEND_NAMES", backends.BACKEND_NAMES)
    monkeypatch.setattr(backends, "_LOADED", dict(backends._LOADED))
    module = types.SimpleNamespace(amsgd_step=lambda batch, hp: None, amadamw_step=lambda batch, hp: None)
    backends.register(backends.Backend("am_only", ("cpu",), (torch.float32,), lambda: module))
    assert "am_only" in backends.available_backends(CPU)
    assert "am_only" not in rllc_backends(CPU) and not supports_rllc("am_only", CPU)
    params = model_params()
    opt = RLLC(params, backend="am_only")
    set_grads(params, 0)
    before = [p.detach().clone() for p in params]
    with pytest.raises(RuntimeError, match="backend 'am_only' has no RLLC kernels yet; use one of .*'torch'"):
        opt.step()
    assert len(opt.state) == 0 and all(torch.equal(a, b) for a, b in zip(params, before))


def test_a_memory_of_more_than_64_units_is_refused_in_either_form():
    """At most 64 memory units (the k x k law solve, k state tensors per parameter): 64 are taken, 65 are
    refused, as a string (the caret at the unit that goes past) and as a pair (U, b)."""
    U, b = parse_memory("J(0.5, 64)")
    assert len(b) == 64 and len(U) == 64
    assert len(parse_memory("J(0.5, 62) + C(0.9, 0.1)")[1]) == 64
    for text in ("J(0.5, 65)", "J(0.5, 64) + M(0)", "J(0.5, 63) + C(0.9, 0.1)"):
        with pytest.raises(MemorySyntaxError, match="65 memory units; at most 64 are supported"):
            parse_memory(text)
    with pytest.raises(ValueError, match=r"k in \[1, 64\] units, got k = 65"):
        memory_rule(([[0.0] * 65] * 65, [1.0] * 65))
    memory_rule(([[0.0] * 64] * 64, [1.0] * 64))
    # a j past what Python reads as an int (4300 digits): the parser's error, not Python's own
    with pytest.raises(MemorySyntaxError, match="at character 6: j has 5000 digits: at most 64 memory units"):
        parse_memory("J(0.5," + "9" * 5000 + ")")
    assert len(parse_memory("J(0.5, 0000000000000000000000000002)")[1]) == 2  # leading zeros are no digits


def test_a_memory_pair_holding_bools_is_refused():
    """memory=(U, b) holds real numbers: True / False in U or b are refused, naming which, though Python
    counts bool as an int."""
    with pytest.raises(ValueError, match="memory U must hold real numbers, got True"):
        memory_rule(([[True, 0.0], [0.0, 0.0]], [1.0, 1.0]))
    with pytest.raises(ValueError, match="memory b must hold real numbers, got False"):
        memory_rule(([[0.9, 0.0], [0.0, 0.0]], [1.0, False]))
    with pytest.raises(ValueError, match="memory b must hold real numbers"):
        RLLC(model_params(), memory=([[0.9]], [True]))


def test_a_memory_pair_whose_u_is_not_k_by_k_is_refused():
    """memory=(U, b): U must be k x k with k = len(b); a ragged U, or rows of another length, is refused."""
    for U in ([[0.9, 0.0], [0.0]], [[0.9, 0.0, 0.0], [0.0, 0.0, 0.0]], [[0.9], [0.0]]):
        with pytest.raises(ValueError, match=r"memory U must be a k x k matrix with k = len\(b\) = 2"):
            memory_rule((U, [1.0, 1.0]))


def test_law_lr_given_as_a_tensor_is_read_on_the_cpu_and_refused_on_a_device():
    """law_lr is a number (optimizer-wide, fixed at construction): a 1-element CPU tensor is read, as AMSGD's
    lam and AMAdamW's eps are; a tensor on a device is refused (only lr may be one)."""
    for law_lr in (torch.tensor(0.25), torch.tensor([0.25])):
        opt = RLLC(model_params(), law_lr=law_lr)
        assert opt._hyper.law_lr == 0.25 and type(opt._hyper.law_lr) is float
    with pytest.raises(ValueError, match="law_lr must be a number .or a CPU tensor., got a tensor on meta"):
        RLLC(model_params(), law_lr=torch.tensor(0.25, device="meta"))
    with pytest.raises(ValueError, match="law_lr must be a number or a 1-element tensor"):
        RLLC(model_params(), law_lr=torch.tensor([0.25, 0.5]))
    RLLC(model_params(), lr=torch.tensor(0.01))


def test_a_group_repeating_law_init_none_is_accepted():
    """NOTE [wide keys in groups]: ZeroRedundancyOptimizer hands each group every argument with its value,
    law_init=None (the default, (1, 0, ..., 0)) among them: accepted, as the default law itself; another
    law is refused."""
    opt = RLLC([{"params": model_params(), "law_init": None}], law_init=None)
    opt.add_param_group({"params": [torch.zeros(3, requires_grad=True)], "law_init": (1.0, 0.0)})
    with pytest.raises(ValueError, match="sets law_init=None, but law_init is optimizer-wide"):
        RLLC([{"params": model_params(), "law_init": None}], law_init=(0.5, 0.5))


def test_add_param_group_keeps_the_laws_learnt_so_far():
    """add_param_group grows the law for a new scope (at law_init, step 0) and keeps the laws and step
    counts the scopes there have learnt."""
    params = model_params()
    opt = RLLC([{"params": params}], law_lr=0.05, scope="group")
    for t in range(3):
        set_grads(params, t)
        opt.step()
    law = opt.law.clone()
    assert not torch.equal(law[0], torch.tensor([1.0, 0.0]))  # learnt
    opt.add_param_group({"params": [torch.zeros(3, requires_grad=True)]})
    grown = opt.law
    assert grown.shape == (2, 2)
    assert torch.equal(grown[0], law[0]) and torch.equal(grown[1], torch.tensor([1.0, 0.0]))
    assert opt.state_dict()["amm"]["scopes"]["step"].tolist() == [3.0, 0.0]


def test_the_documented_defaults():
    """The defaults the docstrings give (RLLC: lr=0.01, law_lr=0.01, memory "M(0.9)+M(0)", law (1, 0),
    scope "global")."""
    opt = RLLC(model_params())
    assert opt.param_groups[0]["lr"] == 0.01 and opt.defaults["lr"] == 0.01
    assert opt._hyper.law_lr == 0.01 and opt.k == 2
    assert opt._hyper.U == ((0.9, 0.0), (0.0, 0.0)) and opt._hyper.b == (1.0, 1.0)
    assert torch.equal(opt.law, torch.tensor([1.0, 0.0])) and opt.scope == "global"

"""state_dtype=torch.float32: float32 state for bfloat16 / float16 parameters (SPEC.md section 5, "unless
the user asks for float32 state"; NOTE [state dtype] in amm_kernels/_hyper.py), on every backend.

The oracle needs no second implementation. Every backend computes in float32 from the values it
reads and rounds only what it writes, so a bfloat16 run with float32 state is, step for step, the
float32 run of the same (bfloat16-representable) start and gradients whose parameters are rounded to
bfloat16 after each step. The reference backend must give that run bit for bit; the kernels match it
as they match the reference elsewhere: beta and state to the float32 tolerance (their sums add in
another order), parameters to the parameter dtype's (one rounding). With state in the parameter's
dtype (state_dtype=None) the same comparison fails (test_bfloat16_state_is_not_the_oracles), so the
comparison sees the state's dtype.
"""
import copy
import pickle

import _cuda_sim
import pytest
import torch

import amm_kernels
from _helpers import model_params, resume_from_state_dict, scaled_atol, set_grads, take_steps, tolerance
from amm_kernels import AMAdamW, AMSGD, RLLC

CUDA = torch.cuda.is_available()


def _import_triton() -> str | None:
    """The triton backend imported now, before anything below imports triton (in the interpreter where
    there is no GPU: NOTE [import order] in amm_kernels/triton_backend.py); why not, if it cannot be."""
    try:
        from _triton import import_triton_backend

        import_triton_backend()
    except pytest.skip.Exception as why:
        return str(why)
    return None


TRITON_UNUSABLE = _import_triton()
LOW = [torch.bfloat16, torch.float16]
CLASSES = [
    pytest.param(AMSGD, dict(lr=0.05, lam=0.1, beta_scope="group"), id="AMSGD"),
    pytest.param(AMAdamW, dict(lr=1e-2), id="AMAdamW"),
    pytest.param(RLLC, dict(lr=0.05, law_lr=0.05, memory="M(0.9)+M(0.5)", scope="group"), id="RLLC"),
]
# odd sizes, an empty tensor, and sizes the CUDA kernels take with whole vector loads (64, 8 x 16)
GROUP_SHAPES = [[(1,), (7,), (4097,), (0,), (64,)], [(3, 5), (130,), (8, 16)]]


def _built(name):
    return name in amm_kernels.available_backends("cpu")


BACKENDS = [
    pytest.param("torch"),
    pytest.param("cpu", marks=pytest.mark.skipif(not _built("cpu"), reason="amm_kernels._C is not built")),
    pytest.param(_cuda_sim.NAME),  # csrc/cuda on CPU tensors; skips itself where the simulator cannot build
    pytest.param("triton", marks=pytest.mark.skipif(TRITON_UNUSABLE is not None, reason=str(TRITON_UNUSABLE))),
    # compiled on a GPU, else in Triton's interpreter
    pytest.param("cuda", marks=pytest.mark.skipif(
        not (CUDA and "cuda" in amm_kernels.available_backends("cuda")), reason="no CUDA device or no CUDA kernels")),
]


def _prepare(backend, monkeypatch) -> torch.device:
    """The device the backend runs on here, after what it needs (the simulator, Triton's interpreter)."""
    if backend == _cuda_sim.NAME:
        _cuda_sim.ensure()
    if backend == "triton":
        if not CUDA:
            monkeypatch.setenv("TRITON_INTERPRET", "1")  # the backend reads it at each step
        return torch.device("cuda" if CUDA else "cpu")
    return torch.device("cuda" if backend == "cuda" else "cpu")


def _group_kwargs(cls):
    """Two groups with their own lr (and weight decay where the optimizer has it)."""
    if cls is RLLC:
        return [dict(lr=0.05), dict(lr=0.02)]
    return [dict(lr=0.02, weight_decay=0.05), dict(lr=0.01, weight_decay=0.0)]


def run(cls, kwargs, backend, dtype, state_dtype, device, round_to=None, steps=6, seed=0):
    """`steps` steps from a start and gradients that are `round_to` (else `dtype`) values, held in
    `dtype`; with round_to, the parameters are rounded to it after each step (the oracle run).
    Returns (beta or law per step, parameters, state tensors), on the CPU."""
    gen = torch.Generator().manual_seed(seed)
    stored = round_to or dtype
    groups = [{"params": [torch.randn(s, generator=gen).to(stored).to(dtype).to(device).requires_grad_()
                          for s in shapes], **extra}
              for shapes, extra in zip(GROUP_SHAPES, _group_kwargs(cls))]
    params = [p for g in groups for p in g["params"]]
    opt = cls(groups, backend=backend, state_dtype=state_dtype, **kwargs)
    # a fixed direction whose sign flips every step, plus noise: beta moves (NOTE [moving beta] in
    # test_compiled_kernels.py)
    base = [torch.randn(p.shape, generator=gen) for p in params]
    trace = []
    for step in range(steps):
        for p, b in zip(params, base):
            g = (-1) ** step * b + 0.3 * torch.randn(b.shape, generator=gen)
            p.grad = g.to(stored).to(dtype).to(device)
        opt.step()
        if round_to is not None:
            with torch.no_grad():
                for p in params:
                    p.copy_(p.to(round_to).to(dtype))
        trace.append((opt.law if cls is RLLC else opt.beta).detach().cpu().clone())
    state = [t.detach().cpu().clone() for p in params for t in opt.state[p].values()]
    return trace, [p.detach().cpu().clone() for p in params], state


def oracle(cls, kwargs, dtype):
    """The float32 reference run whose parameters are rounded to `dtype` after each step."""
    return run(cls, kwargs, "torch", torch.float32, None, torch.device("cpu"), round_to=dtype)


@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls,kwargs", CLASSES)
def test_float32_state_is_the_rounded_float32_run(cls, kwargs, backend, dtype, monkeypatch):
    device = _prepare(backend, monkeypatch)
    trace, params, state = run(cls, kwargs, backend, dtype, torch.float32, device)
    ref_trace, ref_params, ref_state = oracle(cls, kwargs, dtype)
    assert all(t.dtype == torch.float32 for t in state)
    assert all(p.dtype == dtype for p in params)
    if backend == "torch":  # the same float32 arithmetic on the same values: bit for bit
        for a, b in zip(trace + params + state, ref_trace + ref_params + ref_state):
            assert torch.equal(a.float(), b.float())
        return
    rtol, atol = tolerance(torch.float32)
    for i, (a, b) in enumerate(zip(trace, ref_trace)):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m: f"beta/law at step {i}: {m}")
    for i, (a, b) in enumerate(zip(state, ref_state)):
        torch.testing.assert_close(a, b, rtol=rtol, atol=scaled_atol(atol, b), msg=lambda m: f"state {i}: {m}")
    rtol, atol = tolerance(dtype)
    for i, (a, b) in enumerate(zip(params, ref_params)):
        torch.testing.assert_close(a.float(), b.float(), rtol=rtol, atol=atol, msg=lambda m: f"param {i}: {m}")


@pytest.mark.parametrize("cls,kwargs", CLASSES)
def test_bfloat16_state_is_not_the_oracles(cls, kwargs):
    """What the test above tells apart: state kept in bfloat16 leaves the oracle by far more than the
    float32 tolerance (and is bfloat16)."""
    _, _, state = run(cls, kwargs, "torch", torch.bfloat16, None, torch.device("cpu"))
    _, _, ref_state = oracle(cls, kwargs, torch.bfloat16)
    assert all(t.dtype == torch.bfloat16 for t in state if t.numel())
    worst = max(float((a.float() - b).abs().max() / b.abs().max().clamp_min(1)) for a, b in zip(state, ref_state)
                if b.numel())
    assert worst > 100 * tolerance(torch.float32)[0]


@pytest.mark.parametrize("cls,kwargs", CLASSES)
def test_state_dtype_by_parameter_dtype(cls, kwargs):
    """float32 state for bfloat16 / float16 parameters; float32 and float64 parameters keep their own
    dtype; state_dtype=None gives every parameter's state its dtype."""
    for state_dtype in (None, torch.float32):
        for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
            params = model_params(dtype=dtype)
            opt = cls(params, backend="torch" if dtype == torch.float64 else "auto", state_dtype=state_dtype,
                      **kwargs)
            take_steps(opt, params, range(2))
            want = dtype if state_dtype is None or dtype in (torch.float32, torch.float64) else torch.float32
            got = {t.dtype for p in params for t in opt.state[p].values()}
            assert got == {want}, (state_dtype, dtype, got)


@pytest.mark.parametrize("value", [torch.bfloat16, torch.float16, torch.float64, torch.int32, "float32", 32, True])
@pytest.mark.parametrize("cls,kwargs", CLASSES)
def test_other_state_dtypes_are_refused(cls, kwargs, value):
    with pytest.raises(ValueError, match=r"state_dtype must be None .* or torch\.float32.*; got"):
        cls(model_params(), state_dtype=value, **kwargs)


@pytest.mark.parametrize("cls,kwargs", CLASSES)
def test_a_group_may_repeat_state_dtype_only_with_the_optimizers_value(cls, kwargs):
    params = model_params(dtype=torch.bfloat16)
    opt = cls([{"params": params[:2], "state_dtype": torch.float32}], state_dtype=torch.float32, **kwargs)
    with pytest.raises(ValueError, match="state_dtype is optimizer-wide"):
        opt.add_param_group({"params": params[2:], "state_dtype": None})
    assert len(opt.param_groups) == 1
    assert "state_dtype=torch.float32" in repr(opt)


@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("cls,kwargs", CLASSES)
def test_resume_keeps_float32_state(cls, kwargs, dtype):
    """torch.optim's load_state_dict casts state to the parameter's dtype; float32 state must come back
    as float32 (the run resumed from a checkpoint is bit-identical to the straight one)."""
    def build(params):
        return cls(params, state_dtype=torch.float32, **kwargs)

    _, resumed = resume_from_state_dict(build, dtype=dtype)  # asserts the bit-identity
    assert {t.dtype for st in resumed.state.values() for t in st.values()} == {torch.float32}


@pytest.mark.parametrize("cls,kwargs", CLASSES)
def test_loading_across_state_dtypes_casts_to_this_optimizers(cls, kwargs):
    """A checkpoint of bfloat16 state loads into a state_dtype=float32 optimizer as float32 (the same
    values), and one of float32 state into a state_dtype=None optimizer as bfloat16 (torch.optim's cast)."""
    params = model_params(dtype=torch.bfloat16)
    low = cls(params, **kwargs)
    take_steps(low, params, range(3))
    high = cls(params, state_dtype=torch.float32, **kwargs)
    high.load_state_dict(copy.deepcopy(low.state_dict()))
    for p in params:
        for key, t in low.state[p].items():
            assert high.state[p][key].dtype == torch.float32 and torch.equal(high.state[p][key], t.float())
    take_steps(high, params, range(3, 5))
    back = cls(params, **kwargs)
    back.load_state_dict(copy.deepcopy(high.state_dict()))
    for p in params:
        for key, t in high.state[p].items():
            assert torch.equal(back.state[p][key], t.to(torch.bfloat16))


@pytest.mark.parametrize("cls,kwargs", CLASSES)
def test_a_load_pre_hook_that_reorders_the_checkpoint_is_followed(cls, kwargs):
    """The float32 state comes back from the checkpoint torch loads, after the pre-hooks (NOTE [load
    hooks] in _checkpoint.py): here one that puts back the order of a checkpoint saved with the parameters
    listed the other way round. Post-hooks see it float32."""
    a, b = (torch.nn.Parameter(torch.randn(4).to(torch.bfloat16)) for _ in range(2))
    opt = cls([a, b], state_dtype=torch.float32, **kwargs)
    a.grad, b.grad = torch.ones(4, dtype=torch.bfloat16), -5 * torch.ones(4, dtype=torch.bfloat16)
    opt.step()
    saved = copy.deepcopy(opt.state_dict())
    saved["state"] = {1 - pid: st for pid, st in saved["state"].items()}  # saved as [b, a]
    saved["param_groups"][0]["params"] = [1, 0]

    def reorder(_, sd):
        return {**sd, "state": {1 - pid: st for pid, st in sd["state"].items()},
                "param_groups": [dict(sd["param_groups"][0], params=[0, 1])]}

    seen = []
    loaded = cls([a, b], state_dtype=torch.float32, **kwargs)
    loaded.register_load_state_dict_pre_hook(reorder)
    loaded.register_load_state_dict_post_hook(lambda o: seen.extend(t.dtype for st in o.state.values()
                                                                     for t in st.values()))
    loaded.load_state_dict(saved)
    for p in (a, b):
        for key, t in opt.state[p].items():
            assert torch.equal(loaded.state[p][key], t)
    assert set(seen) == {torch.float32}


@pytest.mark.parametrize("cls,kwargs", CLASSES)
def test_a_model_cast_to_bfloat16_keeps_float32_state(cls, kwargs):
    """model.to(bfloat16) after float32 steps: under state_dtype=float32 the state stays float32 (the
    same tensors), where state_dtype=None casts it to bfloat16."""
    for state_dtype, want in ((torch.float32, torch.float32), (None, torch.bfloat16)):
        params = model_params()
        opt = cls(params, state_dtype=state_dtype, **kwargs)
        take_steps(opt, params, range(2))
        before = {id(t) for st in opt.state.values() for t in st.values()}
        for p in params:
            p.data = p.data.to(torch.bfloat16)
        take_steps(opt, params, range(2, 4))
        assert {t.dtype for st in opt.state.values() for t in st.values()} == {want}
        kept = {id(t) for st in opt.state.values() for t in st.values()} == before
        assert kept == (state_dtype is not None)


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
@pytest.mark.parametrize("cls,kwargs", CLASSES)
def test_copies_keep_state_dtype(cls, kwargs, how):
    params = model_params(dtype=torch.bfloat16)
    opt = cls(params, state_dtype=torch.float32, **kwargs)
    take_steps(opt, params, range(2))
    twin = copy.deepcopy(opt) if how == "deepcopy" else pickle.loads(pickle.dumps(opt))
    assert twin.state_dtype is torch.float32
    twin_params = [p for g in twin.param_groups for p in g["params"]]
    set_grads(twin_params, 5)
    twin.step()
    assert {t.dtype for st in twin.state.values() for t in st.values()} == {torch.float32}

"""The degenerate cases of SPEC.md against torch's own optimizers, on every backend that runs here.

AMSGD(adaptive=False, lam=0) == torch.optim.SGD(momentum=b, dampening=b);
AMAdamW(adaptive=False, lam=0) == torch.optim.AdamW (same lr, betas, eps, weight_decay).
20 steps, odd and empty shapes, two param groups with different lr and weight decay.
"""
import collections

import _cuda_sim
import pytest
import torch
from _helpers import tolerance

import amm_kernels
from amm_kernels import AMAdamW, AMSGD

SHAPES = [(1,), (7,), (4097,), (0,), (3, 5), (2, 3, 4)]
# (triton: tests/test_triton_backend.py runs these in the interpreter)
BACKENDS = amm_kernels.available_backends("cpu") + [_cuda_sim.NAME]


def _supports(backend, dtype):
    if backend == _cuda_sim.NAME:
        _cuda_sim.ensure()  # (registers the backend, or skips)
    return amm_kernels.backend_supports_dtype(backend, dtype)


def make_groups(dtype, seed, weight_decays):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for s in SHAPES]
    return [
        {"params": params[:3], "lr": 0.05, "weight_decay": weight_decays[0]},
        {"params": params[3:], "lr": 0.02, "weight_decay": weight_decays[1]},
    ]


def reset_state(opt, how, params):
    """torch.optim's ways to reset state: del opt.state[p] for p in params, opt.state.clear(), a new opt.state."""
    if how == "del":
        for p in params:
            del opt.state[p]
    elif how == "clear":
        opt.state.clear()
    else:
        opt.state = collections.defaultdict(dict)


def run_pair(ours_cls, ours_kw, torch_cls, torch_kw, dtype, seed, weight_decays, steps=20, late=None, reset=None):
    """`late`: {tensor index (through the groups): the step of its first gradient} (None before it);
    `reset`: (step, how, tensor indices): reset_state on both optimizers before that step."""
    groups = make_groups(dtype, seed, weight_decays)
    mine = [{**g, "params": [p.clone().requires_grad_() for p in g["params"]]} for g in groups]
    theirs = [{**g, "params": [p.clone().requires_grad_() for p in g["params"]]} for g in groups]
    opt_a, opt_b = ours_cls(mine, **ours_kw), torch_cls(theirs, **torch_kw)
    gen = torch.Generator().manual_seed(seed + 1)
    for step in range(steps):
        pairs = [pair for ga, gb in zip(mine, theirs) for pair in zip(ga["params"], gb["params"])]
        for i, (pa, pb) in enumerate(pairs):
            g = torch.randn(pa.shape, generator=gen, dtype=torch.float64).to(dtype)
            pa.grad, pb.grad = g.clone(), g.clone()
            if late and step < late.get(i, 0):
                pa.grad = pb.grad = None
        if step == 10:  # an lr change mid-run, as a scheduler would make
            for g in mine + theirs:
                g["lr"] *= 0.5
        if reset and step == reset[0]:
            reset_state(opt_a, reset[1], [pairs[i][0] for i in reset[2]])
            reset_state(opt_b, reset[1], [pairs[i][1] for i in reset[2]])
        opt_a.step(), opt_b.step()
    rtol, atol = tolerance(dtype)
    for ga, gb in zip(mine, theirs):
        for pa, pb in zip(ga["params"], gb["params"]):
            torch.testing.assert_close(pa, pb, rtol=rtol, atol=atol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("maximize", [False, True])
def test_amsgd_fixed_beta_is_torch_sgd(backend, dtype, maximize):
    if not _supports(backend, dtype):
        pytest.skip(f"{backend} does not support {dtype}")
    b = 0.85
    run_pair(
        AMSGD, dict(adaptive=False, lam=0.0, beta_max=b, maximize=maximize, backend=backend),
        torch.optim.SGD, dict(momentum=b, dampening=b, maximize=maximize),
        dtype, seed=3, weight_decays=(0.0, 0.01),
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("weight_decays", [(0.0, 0.0), (0.01, 0.1)])
def test_amadamw_fixed_beta_is_torch_adamw(backend, dtype, weight_decays):
    if not _supports(backend, dtype):
        pytest.skip(f"{backend} does not support {dtype}")
    betas = (0.8, 0.99)
    run_pair(
        AMAdamW, dict(adaptive=False, lam=0.0, betas=betas, eps=1e-8, backend=backend),
        torch.optim.AdamW, dict(betas=betas, eps=1e-8, foreach=False),
        dtype, seed=5, weight_decays=weight_decays,
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["AMSGD", "AMAdamW"])
def test_tensor_scope_is_torch_for_tensors_that_join_late(backend, name):
    """README "Tensors that join late": with beta_scope="tensor" every tensor counts its own steps, as
    torch.optim does, so tensors whose first gradient comes at step 4 or 12 still match torch."""
    late = {1: 4, 4: 12}
    assert _supports(backend, torch.float32)
    if name == "AMSGD":
        run_pair(AMSGD, dict(adaptive=False, lam=0.0, beta_max=0.85, beta_scope="tensor", backend=backend),
                 torch.optim.SGD, dict(momentum=0.85, dampening=0.85), torch.float32, seed=5,
                 weight_decays=(0.0, 0.01), late=late)
    else:
        kw = dict(betas=(0.8, 0.99), eps=1e-8)
        run_pair(AMAdamW, dict(adaptive=False, lam=0.0, beta_scope="tensor", backend=backend, **kw),
                 torch.optim.AdamW, kw, torch.float32, seed=5, weight_decays=(0.0, 0.01), late=late)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["AMSGD", "AMAdamW"])
@pytest.mark.parametrize("scope,how", [("tensor", "del"), ("tensor", "clear"), ("tensor", "new"), ("global", "clear"),
                                       ("group", "new"), ("group", "del")])
def test_a_reset_tensor_starts_again_as_torchs_does(backend, name, scope, how):
    """NOTE [a reset tensor restarts its scope]: torch.optim restarts a parameter's step count when its
    state is reset (del opt.state[p], as after resizing p; opt.state.clear(); a new opt.state). A scope
    none of whose tensors has state any more restarts with them (under beta_scope="tensor", that of each
    reset tensor), so the run still matches torch's after a reset at step 13 (of two tensors, of a group's under the group scope, or of all).
    Kept, AMAdamW's zero moments met the old bias corrections."""
    assert _supports(backend, torch.float32)
    reset = (13, how, ([3, 4, 5] if scope == "group" else [1, 4]) if how == "del" else [])
    if name == "AMSGD":
        run_pair(AMSGD, dict(adaptive=False, lam=0.0, beta_max=0.85, beta_scope=scope, backend=backend),
                 torch.optim.SGD, dict(momentum=0.85, dampening=0.85), torch.float32, seed=7,
                 weight_decays=(0.0, 0.01), reset=reset)
    else:
        kw = dict(betas=(0.8, 0.99), eps=1e-8)
        run_pair(AMAdamW, dict(adaptive=False, lam=0.0, beta_scope=scope, backend=backend, **kw),
                 torch.optim.AdamW, kw, torch.float32, seed=7, weight_decays=(0.0, 0.01), reset=reset)

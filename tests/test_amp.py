"""AMP: torch.amp.GradScaler hands grad_scale and found_inf to the step (_step_supports_amp_scaling),
an inf skips the step without changing any state, and bf16 autocast training runs."""
import copy

import _cuda_sim
import pytest
import torch

import amm_kernels
from amm_kernels import AMAdamW, AMSGD

# The CUDA backend's code through the simulator too (tests/_cuda_sim.py): its found_inf / grad_scale path.
BACKENDS = [b for b in amm_kernels.available_backends("cpu") if b != "triton"] + [_cuda_sim.NAME]
OPTIMIZERS = [AMSGD, AMAdamW]


def setup(cls, backend, seed=0):
    if backend == _cuda_sim.NAME:
        _cuda_sim.ensure()
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    return model, cls(model.parameters(), lr=0.05, backend=backend)


def data(t):
    gen = torch.Generator().manual_seed(t)
    return torch.randn(16, 6, generator=gen), torch.randn(16, 2, generator=gen)


def loss_of(model, t):
    x, y = data(t)
    return (-1) ** t * torch.nn.functional.mse_loss(model(x), y)


def state_of(model, opt):
    return [p.detach().clone() for p in model.parameters()], copy.deepcopy(opt.state_dict())


def assert_same(a, b, exact=True):
    check = torch.equal if exact else (lambda x, y: torch.allclose(x, y, rtol=1e-5, atol=1e-6))
    for x, y in zip(a[0], b[0]):
        assert check(x, y)
    for k, st in a[1]["state"].items():
        for name, t in st.items():
            assert check(t, b[1]["state"][k][name]), name
    for name, t in a[1]["amm"]["scopes"].items():
        assert check(t, b[1]["amm"]["scopes"][name]), name


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_grad_scaler_matches_unscaled_training(cls, backend):
    plain_model, plain = setup(cls, backend)
    model, opt = setup(cls, backend)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    betas = []
    for t in range(5):
        loss_of(plain_model, t).backward()
        plain.step(), plain.zero_grad()
        scaler.scale(loss_of(model, t)).backward()
        scaler.step(opt), scaler.update(), opt.zero_grad()
        betas.append((plain.beta, opt.beta))
    assert not hasattr(opt, "grad_scale")  # the scaler removes what it set
    assert_same(state_of(model, opt), state_of(plain_model, plain), exact=False)
    if cls is AMSGD:
        assert len({float(b) for b, _ in betas}) > 1, "beta should move"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_inf_gradient_skips_the_step_and_changes_no_state(cls, backend):
    model, opt = setup(cls, backend)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    for t in range(2):
        scaler.scale(loss_of(model, t)).backward()
        scaler.step(opt), scaler.update(), opt.zero_grad()
    before = state_of(model, opt)
    scale = scaler.get_scale()
    scaler.scale(loss_of(model, 2)).backward()
    next(model.parameters()).grad[0, 0] = float("inf")
    scaler.step(opt), scaler.update(), opt.zero_grad()
    assert_same(state_of(model, opt), before)
    assert scaler.get_scale() == scale / 2  # the scaler saw the inf and backed off
    # and training goes on from the same state
    scaler.scale(loss_of(model, 3)).backward()
    scaler.step(opt), scaler.update()
    assert torch.isfinite(opt.beta).all()


@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_unscale_then_clip_then_step(cls):
    """scaler.unscale_ (for gradient clipping) makes the step see grad_scale=None: grads are unscaled."""
    plain_model, plain = setup(cls, "torch")
    model, opt = setup(cls, "torch")
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    for t in range(3):
        loss_of(plain_model, t).backward()
        torch.nn.utils.clip_grad_norm_(plain_model.parameters(), 0.5)
        plain.step(), plain.zero_grad()
        scaler.scale(loss_of(model, t)).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        scaler.step(opt), scaler.update(), opt.zero_grad()
    assert_same(state_of(model, opt), state_of(plain_model, plain), exact=False)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_bf16_autocast_training_runs(cls, backend):
    model, opt = setup(cls, backend)
    x, y = data(0)
    losses = []
    for _ in range(20):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = torch.nn.functional.mse_loss(model(x).float(), y)
        loss.backward()
        opt.step(), opt.zero_grad()
        losses.append(loss.item())
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert losses[-1] < losses[0] and torch.isfinite(opt.beta).all()


@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_bf16_parameters_train(cls):
    model, opt = setup(cls, "auto")
    model = model.to(torch.bfloat16)
    opt = cls(model.parameters(), lr=0.05)
    x, y = (t.to(torch.bfloat16) for t in data(0))
    losses = []
    for _ in range(20):
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step(), opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] and torch.isfinite(opt.beta).all()

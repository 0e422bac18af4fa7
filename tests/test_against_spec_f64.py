"""The package's reference backend against the independent float64 oracle (tests/spec_f64.py).

20 steps on fresh random data: three parameter groups with their own lr and weight decay, tensors of
mixed shapes (1 element, 7 elements, a (3, 5) matrix, ...), every beta scope, both optimizers,
adaptive on and off, lr changed mid-run, maximize, and delta_f="loss" with a closure. Beta and every
parameter are compared after every step, in float64 and in float32 (float32 params: the oracle starts
from the same float32-rounded values and gradients and runs in float64).
"""

import numpy as np
import pytest
import torch

from amm_kernels import AMAdamW, AMSGD

from _helpers import tolerance
from spec_f64 import AMAdamWSpec, AMSGDSpec

BACKEND = "torch"
N_STEPS = 20
SHAPES = [[(7,), (1,)], [(3, 5)], [(4,), (2, 3)]]
N_TENSORS = sum(len(g) for g in SHAPES)

CONFIG = {
    # optimizer, oracle, per-group lr, per-group weight decay, optimizer-wide hyper-parameters
    "AMSGD": (AMSGD, AMSGDSpec, [0.05, 0.02, 0.1], [0.0, 0.05, 0.01], {"lam": 0.1, "beta_max": 0.9}),
    "AMAdamW": (AMAdamW, AMAdamWSpec, [0.01, 0.003, 0.02], [0.1, 0.0, 0.01],
                {"lam": 0.2, "betas": (0.9, 0.99), "eps": 1e-8}),
}
# lr multipliers applied to every group before the given step (prev_lr then differs from lr)
LR_CHANGES = {7: [0.5, 2.0, 0.3], 14: [1.5, 0.25, 1.0]}

DTYPES = [pytest.param(torch.float64, id="float64"), pytest.param(torch.float32, id="float32")]


def _rounded(a, dtype):
    """a (float64) rounded to dtype, back in float64: the oracle's copy of the package's input."""
    return torch.tensor(a, dtype=dtype).to(torch.float64).numpy()


def beta_shape(scope):
    return {"global": (), "group": (len(SHAPES),), "tensor": (N_TENSORS,)}[scope]


class Run:
    """The package and the oracle side by side on the same groups and the same inputs."""

    def __init__(self, name, dtype, seed, lrs=None, **hyper):
        cls, spec_cls, default_lrs, wds, base = CONFIG[name]
        self.lrs = list(default_lrs if lrs is None else lrs)
        kwargs = dict(base)
        kwargs.update(hyper)
        self.dtype = dtype
        self.scope = kwargs.get("beta_scope", "global")
        self.rng = np.random.default_rng(seed)
        x0 = [[_rounded(self.rng.standard_normal(s), dtype) for s in gs] for gs in SHAPES]
        self.params = [[torch.tensor(x, dtype=dtype) for x in gs] for gs in x0]
        self.opt = cls([{"params": ps, "lr": lr, "weight_decay": wd}
                        for ps, lr, wd in zip(self.params, self.lrs, wds)], backend=BACKEND, **kwargs)
        self.spec = spec_cls([{"params": xs, "lr": lr, "weight_decay": wd}
                              for xs, lr, wd in zip(x0, self.lrs, wds)], **kwargs)
        self.where = f"{name} {dtype} seed={seed} {hyper}"

    def set_lrs(self, lrs):
        self.lrs = list(lrs)
        for gi, lr in enumerate(lrs):
            self.opt.param_groups[gi]["lr"] = lr
            self.spec.groups[gi]["lr"] = lr

    def random_grads(self):
        return [[_rounded(self.rng.standard_normal(s), self.dtype) for s in gs] for gs in SHAPES]

    def step_with_grads(self, grads):
        """grads[group][tensor]: float64 array or None (no gradient this step)."""
        for ps, gs in zip(self.params, grads):
            for p, g in zip(ps, gs):
                p.grad = None if g is None else torch.tensor(g, dtype=self.dtype)
        self.opt.step()
        self.spec.step(grads)

    def check(self, i):
        rtol, atol = tolerance(self.dtype)
        beta = self.opt.beta
        assert isinstance(beta, torch.Tensor)
        assert tuple(beta.shape) == beta_shape(self.scope), (
            f"{self.where} step {i}: beta shape {tuple(beta.shape)}, expected {beta_shape(self.scope)}")
        np.testing.assert_allclose(beta.detach().to(torch.float64).numpy(), self.spec.beta,
                                   rtol=rtol, atol=atol, err_msg=f"{self.where} step {i}: beta")
        for gi, (ps, xs) in enumerate(zip(self.params, self.spec.params)):
            for ti, (p, x) in enumerate(zip(ps, xs)):
                assert p.dtype == self.dtype and tuple(p.shape) == x.shape
                np.testing.assert_allclose(p.detach().to(torch.float64).numpy(), x, rtol=rtol, atol=atol,
                                           err_msg=f"{self.where} step {i}: param [{gi}][{ti}]")

    def change_lr(self, i):
        if i in LR_CHANGES:
            self.set_lrs([lr * f for lr, f in zip(self.lrs, LR_CHANGES[i])])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("adaptive", [True, False], ids=["adaptive", "fixed"])
@pytest.mark.parametrize("scope", ["global", "group", "tensor"])
@pytest.mark.parametrize("name", ["AMSGD", "AMAdamW"])
def test_matches_spec(name, scope, adaptive, seed, dtype):
    # seed 1 also raises beta_min, so that the lower clamp is taken now and then
    run = Run(name, dtype, seed, beta_scope=scope, adaptive=adaptive, beta_min=0.25 * seed)
    betas = []
    for i in range(N_STEPS):
        run.change_lr(i)
        run.step_with_grads(run.random_grads())
        run.check(i)
        betas.append(np.atleast_1d(run.spec.beta))
    betas = np.concatenate(betas[1:])
    if adaptive:  # the data must exercise the formula, not only its clamps
        assert np.any((betas > run.spec.beta_min + 1e-6) & (betas < run.spec.beta_max - 1e-6))
    else:
        assert np.all(betas == run.spec.beta_max)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scope", ["global", "tensor"])
@pytest.mark.parametrize("name", ["AMSGD", "AMAdamW"])
def test_maximize_matches_spec(name, scope, dtype):
    run = Run(name, dtype, 5, beta_scope=scope, maximize=True)
    for i in range(N_STEPS):
        run.change_lr(i)
        run.step_with_grads(run.random_grads())
        run.check(i)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ["AMSGD", "AMAdamW"])
def test_zero_lr_group_matches_spec(name, dtype):
    """SPEC.md section 3: no formula divides by an lr, an lr of 0 is allowed (here group 1, steps 5-8;
    at step 5 and 9 its lr and prev_lr differ, one of them 0)."""
    run = Run(name, dtype, 6, beta_scope="global")
    base = list(run.lrs)
    for i in range(12):
        run.set_lrs([lr if (gi != 1 or not 5 <= i <= 8) else 0.0 for gi, lr in enumerate(base)])
        run.step_with_grads(run.random_grads())
        run.check(i)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scope", ["global", "group"])
@pytest.mark.parametrize("name", ["AMSGD", "AMAdamW"])
def test_tensor_without_grad_is_skipped(name, scope, dtype):
    """A parameter whose grad is None never moves and takes no part in the sums (the (3, 5) tensor,
    alone in group 1, never gets one; with group scope that group's beta stays where it started)."""
    run = Run(name, dtype, 7, beta_scope=scope)
    x_before = run.params[1][0].clone()
    for i in range(10):
        grads = run.random_grads()
        grads[1][0] = None
        run.step_with_grads(grads)
        assert torch.equal(run.params[1][0], x_before)
        if scope == "group":
            rtol, atol = tolerance(dtype)
            beta = run.opt.beta.detach().to(torch.float64).numpy()
            np.testing.assert_allclose(beta[[0, 2]], run.spec.beta[[0, 2]], rtol=rtol, atol=atol)
        else:
            run.check(i)
    if scope == "global":
        run.check("end")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scope", ["global", "tensor"])
@pytest.mark.parametrize("name", ["AMSGD", "AMAdamW"])
def test_group_without_gradients_keeps_its_prev_lr(name, scope, dtype):
    """prev_lr is the lr of the group's last step (x_{t-1} - x_t = eta_prev d): at step 5 no tensor of
    group 0 has a gradient while every lr triples, so at step 6 group 0's eta_prev is still its lr of
    step 4, whereas groups 1 and 2 stepped at 5 with the new lr (the oracle's prev_lr rule)."""
    run = Run(name, dtype, 3, beta_scope=scope)
    for i in range(10):
        grads = run.random_grads()
        if i == 5:
            grads[0] = [None] * len(grads[0])
            run.set_lrs([3.0 * lr for lr in run.lrs])
        run.step_with_grads(grads)
        run.check(i)


@pytest.mark.filterwarnings("ignore:AMAdamW.*first gradient")  # NOTE [late tensors] in amm_kernels/_base.py
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("adaptive", [True, False], ids=["adaptive", "fixed"])
@pytest.mark.parametrize("scope", ["global", "group", "tensor"])
@pytest.mark.parametrize("name", ["AMSGD", "AMAdamW"])
def test_tensor_whose_first_gradient_arrives_late_matches_spec(name, scope, adaptive, dtype):
    """Tensor [0][1] gets its first gradient at step 3 and [2][0] at step 6, after their scope's first
    step (except with the tensor scope): they start from zero state and the scope's step count."""
    run = Run(name, dtype, 8, beta_scope=scope, adaptive=adaptive)
    first = {(0, 1): 3, (2, 0): 6}
    for i in range(10):
        grads = run.random_grads()
        for (gi, ti), start in first.items():
            if i < start:
                grads[gi][ti] = None
        run.step_with_grads(grads)
        run.check(i)


class Quadratic:
    """f(x) = sum over tensors of 0.5 * <a, (x - c)^2> (a > 0): the loss of the loss-mode tests."""

    def __init__(self, rng, dtype):
        self.a = [[_rounded(rng.uniform(0.5, 3.0, s), dtype) for s in gs] for gs in SHAPES]
        self.c = [[_rounded(rng.standard_normal(s), dtype) for s in gs] for gs in SHAPES]

    def numpy(self, params):
        loss = 0.0
        grads = []
        for xs, as_, cs in zip(params, self.a, self.c):
            grads.append([a * (x - c) for x, a, c in zip(xs, as_, cs)])
            loss += sum(float(np.sum(0.5 * a * (x - c) ** 2)) for x, a, c in zip(xs, as_, cs))
        return loss, grads

    def torch(self, params):
        loss = 0.0
        for ps, as_, cs in zip(params, self.a, self.c):
            for p, a, c in zip(ps, as_, cs):
                loss = loss + (0.5 * torch.tensor(a, dtype=p.dtype) * (p - torch.tensor(c, dtype=p.dtype)) ** 2).sum()
        return loss


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("hyper", [{"lam": 0.1, "beta_max": 0.9}, {"lam": 0.0, "beta_max": 1.0}],
                         ids=["lam0.1", "lam0"])
@pytest.mark.parametrize("maximize", [False, True])
def test_loss_mode_matches_spec(hyper, seed, dtype, maximize):
    """delta_f="loss", global scope: F = prev_loss - loss from a closure on a quadratic.
    With maximize the closure returns -quadratic, and F is that of the objective being minimised."""
    sign = -1.0 if maximize else 1.0
    run = Run("AMSGD", dtype, 10 + seed, lrs=[0.05, 0.1, 0.2], beta_scope="global", delta_f="loss",
              maximize=maximize, **hyper)
    quad = Quadratic(run.rng, dtype)
    for p in (p for ps in run.params for p in ps):
        p.requires_grad_(True)

    def closure():
        run.opt.zero_grad(set_to_none=True)
        loss = sign * quad.torch(run.params)
        loss.backward()
        return loss

    betas = []
    for i in range(N_STEPS):
        run.change_lr(i)
        loss, grads = quad.numpy(run.spec.params)
        run.opt.step(closure)
        run.spec.step([[sign * g for g in gs] for gs in grads], loss=sign * loss)
        run.check(i)
        betas.append(float(run.spec.beta))
    betas = np.array(betas[1:])
    assert np.any((betas > 1e-6) & (betas < hyper["beta_max"] - 1e-6))

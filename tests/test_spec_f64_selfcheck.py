"""The float64 oracle (spec_f64) against SPEC.md's vectors and torch's own optimizers.

The vectors were computed from SPEC.md by another independent implementation; agreeing with them to
about 1e-12 is what makes spec_f64 fit to judge the package.
"""

import numpy as np
import pytest
import torch

from _helpers import load_vector, vector_initial_params, vector_params, vector_spec_kwargs
from spec_f64 import AMAdamWSpec, AMSGDSpec

RTOL = 1e-12
ATOL = 1e-14


def replay(vec):
    """Run spec_f64 through a vector; yields (step index, step record, betas, params)."""
    kwargs = vector_spec_kwargs(vec)
    params = vector_initial_params(vec)
    groups = [{"params": ps, "weight_decay": g["weight_decay"], "lr": vec["steps"][0]["lr"][gi]}
              for gi, (ps, g) in enumerate(zip(params, vec["groups"]))]
    cls = AMSGDSpec if vec["optimizer"] == "AMSGD" else AMAdamWSpec
    opt = cls(groups, **kwargs)
    for i, rec in enumerate(vec["steps"]):
        for gi, lr in enumerate(rec["lr"]):
            opt.groups[gi]["lr"] = lr
        betas = opt.step(rec["grads"], loss=rec.get("loss"))
        yield i, rec, betas, opt.params


@pytest.mark.parametrize("path", vector_params("am"))
def test_spec_f64_reproduces_vector(path):
    vec = load_vector(path)
    n = 0
    for i, rec, betas, params in replay(vec):
        np.testing.assert_allclose(np.atleast_1d(betas), rec["beta"], rtol=RTOL, atol=ATOL,
                                   err_msg=f"{vec['name']} step {i}: beta")
        for gi, group in enumerate(rec["params_after"]):
            for ti, expected in enumerate(group):
                np.testing.assert_allclose(params[gi][ti].reshape(-1), expected, rtol=RTOL, atol=ATOL,
                                           err_msg=f"{vec['name']} step {i}: param [{gi}][{ti}]")
        n += 1
    assert n == len(vec["steps"]) > 0


def _random_run(seed, n_steps=12):
    rng = np.random.default_rng(seed)
    shapes = [(7,), (3, 5), (1,)]
    x0 = [rng.standard_normal(s) for s in shapes]
    grads = [[rng.standard_normal(s) for s in shapes] for _ in range(n_steps)]
    return x0, grads


def _lockstep_with_torch(spec, make_ref, x0, grads, rtol, after_step=None):
    """spec (one group on x0) and make_ref(float64 tensors of x0), a torch optimizer, step through the
    same gradients; after each step the parameters agree to rtol (atol 1e-14), then after_step() runs."""
    ps = [torch.tensor(x, dtype=torch.float64, requires_grad=True) for x in x0]
    ref = make_ref(ps)
    for gs in grads:
        spec.step([gs])
        for p, g in zip(ps, gs):
            p.grad = torch.tensor(g, dtype=torch.float64)
        ref.step()
        for p, x in zip(ps, spec.params[0]):
            np.testing.assert_allclose(x, p.detach().numpy(), rtol=rtol, atol=1e-14)
        if after_step is not None:
            after_step()


@pytest.mark.parametrize("wd", [0.0, 0.05])
@pytest.mark.parametrize("maximize", [False, True])
def test_spec_f64_degenerate_sgd_matches_torch(wd, maximize):
    """SPEC.md section 1: adaptive=False, lam=0 is SGD(momentum=beta_max, dampening=beta_max)."""
    x0, grads = _random_run(1)
    spec = AMSGDSpec([{"params": x0}], lr=0.05, lam=0.0, beta_max=0.8, weight_decay=wd,
                     adaptive=False, maximize=maximize)

    def beta_is_beta_max():
        assert spec.beta.shape == () and spec.beta == 0.8

    _lockstep_with_torch(
        spec, lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.8, dampening=0.8, weight_decay=wd, maximize=maximize),
        x0, grads, rtol=1e-12, after_step=beta_is_beta_max)


@pytest.mark.parametrize("wd", [0.0, 0.1])
@pytest.mark.parametrize("maximize", [False, True])
def test_spec_f64_degenerate_adamw_matches_torch(wd, maximize):
    """SPEC.md section 2: adaptive=False, lam=0 is torch.optim.AdamW."""
    x0, grads = _random_run(2)
    spec = AMAdamWSpec([{"params": x0}], lr=0.01, betas=(0.85, 0.99), lam=0.0, eps=1e-8,
                       weight_decay=wd, adaptive=False, maximize=maximize)
    _lockstep_with_torch(
        spec, lambda ps: torch.optim.AdamW(ps, lr=0.01, betas=(0.85, 0.99), eps=1e-8, weight_decay=wd,
                                           maximize=maximize, foreach=False),
        x0, grads, rtol=1e-11)


def test_spec_f64_scopes_agree_with_one_group_runs():
    """Group scope is global scope run on each group alone; tensor scope likewise per tensor."""
    rng = np.random.default_rng(3)
    shapes = [[(4,), (2, 3)], [(5,)]]
    x0 = [[rng.standard_normal(s) for s in gs] for gs in shapes]
    steps = [[[rng.standard_normal(s) for s in gs] for gs in shapes] for _ in range(8)]
    lrs = [0.1, 0.04]
    wds = [0.0, 0.02]
    for cls, kw in ((AMSGDSpec, {}), (AMAdamWSpec, {"lam": 0.2})):
        def build(groups, scope):
            return cls([{"params": p, "lr": lr, "weight_decay": wd} for p, lr, wd in groups],
                       beta_scope=scope, **kw)

        whole = build(list(zip(x0, lrs, wds)), "group")
        whole_t = build(list(zip(x0, lrs, wds)), "tensor")
        alone = [build([(x0[gi], lrs[gi], wds[gi])], "global") for gi in range(2)]
        alone_t = [build([([x0[gi][ti]], lrs[gi], wds[gi])], "global")
                   for gi in range(2) for ti in range(len(x0[gi]))]
        for k, gs in enumerate(steps):
            if k == 4:  # an lr change: prev_lr matters
                for o in [whole, whole_t] + alone + alone_t:
                    for grp in o.groups:
                        grp["lr"] *= 0.5
            b = whole.step(gs)
            bt = whole_t.step(gs)
            b_alone = [alone[gi].step([gs[gi]]) for gi in range(2)]
            b_alone_t = [alone_t[j].step([[g]]) for j, g in enumerate(gs[0] + gs[1])]
            np.testing.assert_allclose(b, np.array(b_alone), rtol=1e-13)
            np.testing.assert_allclose(bt, np.array(b_alone_t), rtol=1e-13)
            for gi in range(2):
                for ti in range(len(x0[gi])):
                    np.testing.assert_allclose(whole.params[gi][ti], alone[gi].params[0][ti], rtol=1e-13)

"""torch.optim behaviour of AMSGD and AMAdamW: errors, groups, state_dict, AMP skip, schedulers."""
import copy
import pickle

import _cuda_sim
import pytest
import torch

import amm_kernels
from _helpers import (check_a_reset_tensor_restarts_its_scope, check_groups_rearranged_by_hand, check_found_inf_skips_the_step, check_grad_scaler_skips_inf_steps,
                      check_inf_parameter_without_decay, check_low_precision_params_keep_dtype, check_signed_zeros_as_the_reference,
                      check_scheduler_closure_and_add_param_group, check_sparse_gradient_raises_before_any_state_changes,
                      assert_same_state, model_params, resume_from_state_dict, set_grads, snapshot,
                      step_on_a_nan_gradient, take_steps, tolerance)
from amm_kernels import AMAdamW, AMSGD

BACKENDS = amm_kernels.available_backends("cpu")
OPTIMIZERS = [AMSGD, AMAdamW]


# --------------------------------------------------------------------------------------------------
# bad input: ValueError naming the argument and its range, before anything changes
BAD_ARGS = [
    (AMSGD, dict(lr=-1.0), "lr must be in [0.0, inf)"),
    (AMSGD, dict(beta_max=1.5), "beta_max must be in [0.0, 1.0]"),
    (AMSGD, dict(beta_max=-0.1), "beta_max must be in [0.0, 1.0]"),
    (AMSGD, dict(beta_min=0.95, beta_max=0.9), "beta_min must be <= beta_max"),
    (AMSGD, dict(lam=-0.1), "lam must be in [0.0, inf)"),
    (AMSGD, dict(weight_decay=-1e-3), "weight_decay must be in [0.0, inf)"),
    (AMSGD, dict(beta_scope="layer"), "beta_scope must be one of"),
    (AMSGD, dict(backend="gpu"), "backend must be one of"),
    (AMSGD, dict(delta_f="exact"), "delta_f must be one of"),
    (AMSGD, dict(delta_f="loss", beta_scope="group"), "needs beta_scope='global'"),
    (AMSGD, dict(lr=float("nan")), "lr must be in"),
    (AMAdamW, dict(lr=-1e-3), "lr must be in [0.0, inf)"),
    (AMAdamW, dict(betas=(1.2, 0.999)), "betas[0] (beta_max) must be in [0.0, 1.0)"),
    (AMAdamW, dict(betas=(1.0, 0.999)), "betas[0] (beta_max) must be in [0.0, 1.0)"),  # 1 - beta_max divides
    (AMAdamW, dict(betas=(0.9, 1.0)), "betas[1] (beta2) must be in [0.0, 1.0)"),
    (AMAdamW, dict(betas=(0.9, -0.1)), "betas[1] (beta2) must be in [0.0, 1.0)"),
    (AMAdamW, dict(betas=(0.9,)), "betas must be a pair"),
    (AMAdamW, dict(eps=0.0), "eps must be in (0.0, inf)"),
    (AMAdamW, dict(eps=1e-38), "eps must be in [1.175e-37, 3.403e+38] with betas[0] (beta_max) = 0.9"),
    (AMAdamW, dict(lam=-1.0), "lam must be in [0.0, inf)"),
    (AMAdamW, dict(weight_decay=-0.1), "weight_decay must be in [0.0, inf)"),
    (AMAdamW, dict(beta_min=0.95), "beta_min must be <= betas[0] (beta_max)"),
    (AMAdamW, dict(beta_scope="param"), "beta_scope must be one of"),
    (AMAdamW, dict(backend="rocm"), "backend must be one of"),
]


@pytest.mark.parametrize("cls,kwargs,message", BAD_ARGS, ids=[f"{c.__name__}-{list(k)[0]}" for c, k, _ in BAD_ARGS])
def test_bad_arguments_raise_value_error_naming_them(cls, kwargs, message):
    with pytest.raises(ValueError) as err:
        cls(model_params(), **kwargs)
    assert message in str(err.value)


def test_betas_may_be_an_array_or_a_tensor_as_adamw_takes_them():
    import numpy as np

    for betas in (np.array([0.8, 0.99]), torch.tensor([0.8, 0.99], dtype=torch.float64), [np.float32(0.8), 0.99]):
        opt = AMAdamW(model_params(), betas=betas)
        assert (opt._hyper.beta_max, opt._hyper.beta2) == (float(betas[0]), float(betas[1]))
        assert type(opt._hyper.beta_max) is float and type(opt._hyper.beta2) is float
    for bad in (np.array([0.8, 0.9, 0.99]), torch.tensor(0.9), np.array([[0.8, 0.99]])):
        with pytest.raises(ValueError, match="betas must be a pair"):
            AMAdamW(model_params(), betas=bad)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("beta_max", [0.0, 0.9, 0.999])
def test_the_smallest_eps_taken_gives_a_finite_beta_where_gradients_are_zero(beta_max, backend):
    """NOTE [smallest eps]: at the smallest eps taken, the weight 1 / ((1 + lam p) p) of an element with a
    zero gradient (d = g = 0 at the first step, then d = 0 from there) stays finite: a finite beta. Just
    below it, an error naming eps's range; adaptive=False takes any eps > 0, as torch.optim.AdamW."""
    low = torch.finfo(torch.float32).tiny / (1.0 - beta_max)
    params = [torch.zeros(5, requires_grad=True), torch.ones(3, requires_grad=True)]
    opt = AMAdamW(params, betas=(beta_max, 0.999), eps=low * (1 + 1e-6), backend=backend, beta_scope="global")
    for t in range(3):
        params[0].grad, params[1].grad = torch.zeros(5), torch.full((3,), 0.5 * (t + 1))
        opt.step()
        assert torch.isfinite(opt.beta).all(), t
        assert all(torch.isfinite(p).all() for p in params)
    with pytest.raises(ValueError, match=r"AMAdamW: eps must be in \["):
        AMAdamW(params, betas=(beta_max, 0.999), eps=low * (1 - 1e-6))
    AMAdamW(params, betas=(beta_max, 0.999), eps=low * (1 - 1e-6), adaptive=False).step()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_beta_min_equal_to_beta_max_is_allowed_and_fixes_beta(cls, backend):
    """beta_min may equal beta_max (the range check is beta_min <= beta_max): beta is then clamped to that
    one value at every step, and the run is the adaptive=False run with the same beta_max."""
    beta_max = 0.5
    wide = dict(betas=(beta_max, 0.999)) if cls is AMAdamW else dict(beta_max=beta_max)

    def run(**kwargs):
        params = model_params()
        opt = cls(params, lr=0.01, backend=backend, **wide, **kwargs)
        take_steps(opt, params, range(4))
        return snapshot(opt, params), opt.beta

    (fixed, beta_fixed), (clamped, beta_clamped) = run(adaptive=False), run(beta_min=beta_max)
    assert torch.equal(beta_clamped, beta_fixed)
    torch.testing.assert_close(clamped[0], fixed[0], rtol=0, atol=0)


@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_bad_param_group_is_rejected(cls):
    opt = cls(model_params())
    with pytest.raises(ValueError, match="lr must be in"):
        opt.add_param_group({"params": [torch.zeros(3, requires_grad=True)], "lr": -1.0})
    with pytest.raises(ValueError, match="optimizer-wide"):
        opt.add_param_group({"params": [torch.zeros(3, requires_grad=True)], "lam": 0.5})
    assert len(opt.param_groups) == 1


ALL_OPTIMIZERS = [AMSGD, AMAdamW, amm_kernels.RLLC]


@pytest.mark.parametrize("cls", ALL_OPTIMIZERS)
def test_a_group_keeps_keys_that_are_no_optimizers_argument(cls):
    """NOTE [foreign group keys]: as torch.optim, a group may carry a name, a scheduler's initial_lr, timm's
    lr_scale; another optimizer's argument (SGD's momentum, Adam's amsgrad) is refused, never ignored."""
    a, b = model_params(seed=1), model_params(seed=1)
    with_keys = cls([{"params": a, "name": "encoder", "initial_lr": 0.1, "lr_scale": 0.5}], lr=0.1)
    plain = cls([{"params": b}], lr=0.1)
    assert with_keys.param_groups[0]["name"] == "encoder" and with_keys.param_groups[0]["lr_scale"] == 0.5
    with_keys.add_param_group({"params": [torch.zeros(3, requires_grad=True)], "name": "head"})
    take_steps(with_keys, a, [0, 1])
    take_steps(plain, b, [0, 1])
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    resumed = cls([{"params": a, "name": "encoder"}, {"params": [torch.zeros(3, requires_grad=True)]}], lr=0.1)
    resumed.load_state_dict(with_keys.state_dict())
    assert resumed.param_groups[1]["name"] == "head"
    sibling = {AMSGD: "law_lr", AMAdamW: "beta_max", amm_kernels.RLLC: "lam"}[cls]  # this package's others'
    for key in ("momentum", "amsgrad", "nesterov", "ns_steps", sibling):
        with pytest.raises(ValueError, match=f"{key} is not an {cls.__name__} argument .another optimizer's"):
            cls([{"params": model_params(), key: 0.9}])


@pytest.mark.parametrize("cls", ALL_OPTIMIZERS)
def test_numpy_scalars_are_numbers(cls):
    """torch.optim takes lr = np.float32(...) (a warm-up read from a float32 array): so do these, at
    construction and when a scheduler sets it, stepping as with the float."""
    import numpy as np

    a, b = model_params(seed=1), model_params(seed=1)
    extra = {} if cls is amm_kernels.RLLC else {"weight_decay": np.float32(0.25)}
    with_np = cls(a, lr=np.float32(0.5), **extra)
    plain = cls(b, lr=float(np.float32(0.5)), **({} if cls is amm_kernels.RLLC else {"weight_decay": 0.25}))
    sched = torch.optim.lr_scheduler.LambdaLR(with_np, lambda step: np.float32(0.5) ** step)
    plain_sched = torch.optim.lr_scheduler.LambdaLR(plain, lambda step: 0.5 ** step)
    for s in range(3):
        take_steps(with_np, a, [s])
        take_steps(plain, b, [s])
        sched.step(), plain_sched.step()
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    with pytest.raises(ValueError, match="lr must be in"):
        cls(model_params(), lr=np.float32(-1.0))
    with pytest.raises(ValueError, match="must be a number"):
        cls(model_params(), lr=np.bool_(True))


@pytest.mark.parametrize("cls", ALL_OPTIMIZERS)
def test_state_dict_post_hooks_see_the_whole_state_dict(cls):
    """torch.optim runs the state_dict post-hooks on the finished dict and returns what they return: they
    see the "amm" entry and the rows, and a hook that returns a new dict gives a loadable checkpoint."""
    params = model_params()
    opt = cls(params)
    take_steps(opt, params, [0, 1])
    seen = {}

    def look(optimizer, sd):
        seen["amm"] = "amm" in sd
        seen["rows"] = all("amm_scope" in st for st in sd["state"].values())

    def replace(optimizer, sd):
        return {**sd, "note": "written by a hook"}

    hooks = [opt.register_state_dict_post_hook(look), opt.register_state_dict_post_hook(replace)]
    saved = opt.state_dict()
    for hook in hooks:
        hook.remove()
    assert seen == {"amm": True, "rows": True} and saved["note"] == "written by a hook"
    fresh_params = [p.detach().clone().requires_grad_() for p in params]
    fresh = cls(fresh_params)
    fresh.load_state_dict(copy.deepcopy({k: v for k, v in saved.items() if k != "note"}))
    take_steps(opt, params, [2])
    take_steps(fresh, fresh_params, [2])
    assert all(torch.equal(x, y) for x, y in zip(params, fresh_params))


def test_arguments_after_torchs_positional_ones_are_keyword_only():
    """AMAdamW(p, lr, betas, eps, weight_decay) reads as torch.optim.AdamW; AMSGD(p, lr, 0.9), written for
    SGD's momentum, is an error, not a silently different lam."""
    opt = AMAdamW(model_params(), 3e-4, (0.9, 0.95), 1e-6, 0.1)
    assert (opt._hyper.eps, opt.defaults["weight_decay"], opt._hyper.beta2, opt._hyper.lam) == (1e-6, 0.1, 0.95, 0.1)
    with pytest.raises(TypeError):
        AMAdamW(model_params(), 3e-4, (0.9, 0.95), 1e-6, 0.1, 0.5)
    with pytest.raises(TypeError):
        AMSGD(model_params(), 0.1, 0.9)
    with pytest.raises(TypeError):
        amm_kernels.RLLC(model_params(), 0.1, 0.01)


@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_sparse_gradient_raises_before_any_state_changes(cls):
    check_sparse_gradient_raises_before_any_state_changes(cls)


@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_params_on_two_devices_in_one_scope_raise(cls):
    cpu = torch.zeros(3, requires_grad=True)
    meta = torch.zeros(3, device="meta", requires_grad=True)
    opt = cls([cpu, meta])
    cpu.grad, meta.grad = torch.ones(3), torch.ones(3, device="meta")
    with pytest.raises(RuntimeError, match="one device"):
        opt.step()
    assert len(opt.state) == 0 and torch.equal(cpu.detach(), torch.zeros(3))


def test_loss_mode_needs_a_closure():
    params = model_params()
    opt = AMSGD(params, delta_f="loss")
    set_grads(params, 0)
    with pytest.raises(RuntimeError, match="closure"):
        opt.step()


# --------------------------------------------------------------------------------------------------
# behaviour
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls", OPTIMIZERS)
@pytest.mark.parametrize("scope", ["global", "group", "tensor"])
def test_state_dict_resume_is_bit_identical(backend, cls, scope):
    def build(params):
        return cls([{"params": params[:2], "lr": 0.03}, {"params": params[2:], "lr": 0.01, "weight_decay": 0.1}],
                   beta_scope=scope, backend=backend)

    ref, resumed = resume_from_state_dict(build)
    assert torch.equal(ref.beta, resumed.beta)


def test_loading_another_optimizers_state_is_a_clear_error():
    params = model_params()
    sgd, adamw = AMSGD(params), AMAdamW(params)
    set_grads(params, 0)
    sgd.step()
    with pytest.raises(ValueError, match="saved by AMSGD, not AMAdamW"):
        adamw.load_state_dict(sgd.state_dict())
    with pytest.raises(ValueError, match="not saved by an amm_kernels optimizer"):
        adamw.load_state_dict(torch.optim.AdamW(params).state_dict())
    with pytest.raises(ValueError, match="saved with beta_scope='global', this optimizer has beta_scope='tensor'; "
                                         "construct it with beta_scope='global'"):
        AMSGD(params, beta_scope="tensor").load_state_dict(sgd.state_dict())
    # AMAdamW's default scope is "tensor" (it was "global" before 2026-11-28): a checkpoint of the global
    # scope loads only into an AMAdamW constructed with it, and a refused load changes nothing
    global_adamw = AMAdamW(params, beta_scope="global")
    global_adamw.step()
    adamw.step()
    before = {k: v.clone() for k, v in adamw._scopes.to_dict().items()}
    with pytest.raises(ValueError, match="construct it with beta_scope='global'"):
        adamw.load_state_dict(global_adamw.state_dict())
    assert all(torch.equal(v, before[k]) for k, v in adamw._scopes.to_dict().items())
    AMAdamW(params, beta_scope="global").load_state_dict(global_adamw.state_dict())
    bad_version = sgd.state_dict()
    bad_version["amm"]["format_version"] = 99
    with pytest.raises(ValueError, match="format_version 99"):
        AMSGD(params).load_state_dict(bad_version)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_found_inf_skips_the_step_and_leaves_state_intact(backend, cls):
    check_found_inf_skips_the_step(lambda params: cls(params, backend=backend))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_only_a_positive_found_inf_skips_the_step(backend, cls):
    """StepBatch.skip is found_inf > 0 (a GradScaler's found_inf is 0 or a count of infs): found_inf = 0
    or NaN takes the step exactly as without a found_inf, on every backend."""
    def run(values):
        params = model_params()
        opt = cls(params, lr=0.01, backend=backend)
        for seed, value in enumerate(values):
            opt.found_inf = None if value is None else torch.tensor([value])
            take_steps(opt, params, [seed])
        return snapshot(opt, params)

    assert_same_state(run([0.0, float("nan"), 0.0, float("nan")]), run([None] * 4))


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_skipped_step_in_loss_mode_is_no_step(backend):
    """A step skipped by found_inf commits nothing, prev_loss included: a loss-mode run with a skipped
    step (its closure's loss 1.0) ends exactly as the run without that step, whose next step takes
    F = 4.0 - 3.9 (not 1.0 - 3.9)."""
    def run(with_skipped_step):
        params = model_params()
        opt = AMSGD(params, lr=0.05, lam=0.2, delta_f="loss", backend=backend)
        betas = []
        for step, loss in enumerate([5.0, 4.0, 1.0, 3.9]):
            if step == 2 and not with_skipped_step:
                continue
            opt.found_inf = torch.tensor([1.0 if step == 2 else 0.0])

            def closure():
                set_grads(params, step)
                return torch.tensor(loss)

            opt.step(closure)
            betas.append(opt.beta.clone())
        return snapshot(opt, params), betas

    (skipped, betas), (without, _) = run(True), run(False)
    assert 0.0 < betas[-1] < 0.9, betas  # the loss term reaches beta
    assert_same_state(skipped, without)


@pytest.mark.parametrize("backend", BACKENDS + [_cuda_sim.NAME])
@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_an_inf_parameter_without_weight_decay_keeps_beta_finite(backend, cls):
    if backend == _cuda_sim.NAME:
        _cuda_sim.ensure()
    check_inf_parameter_without_decay(cls, backend)


@pytest.mark.parametrize("backend", BACKENDS + [_cuda_sim.NAME])
@pytest.mark.parametrize("cls", [AMSGD, AMAdamW, amm_kernels.RLLC])
def test_zeros_keep_their_sign_as_in_the_reference(backend, cls):
    if backend == _cuda_sim.NAME:
        _cuda_sim.ensure()
    check_signed_zeros_as_the_reference(cls, backend)


@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_grad_scaler_skips_inf_steps(cls):
    check_grad_scaler_skips_inf_steps(cls, good_steps=1)


@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_params_without_grad_are_skipped(cls):
    params = model_params()
    opt = cls(params, beta_scope="tensor")
    set_grads(params, 0)
    params[1].grad = None
    frozen = params[1].detach().clone()
    opt.step()
    assert torch.equal(params[1].detach(), frozen)
    assert params[1] not in opt.state
    assert opt.beta.shape == (4,)


@pytest.mark.filterwarnings("ignore:AMAdamW.*first gradient")  # NOTE [late tensors]; tested below
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "torch"] + [_cuda_sim.NAME])
@pytest.mark.parametrize("cls", OPTIMIZERS)
@pytest.mark.parametrize("scope", ["global", "group", "tensor"])
def test_a_late_first_gradient_matches_the_reference(backend, cls, scope):
    """params[0] gets its first gradient at step 2, after its scope's first step (but in the tensor
    scope): every backend starts it from zero state with the scope's step count, as the reference does
    (test_against_spec_f64.py pins the reference to the oracle)."""
    if backend == _cuda_sim.NAME:
        _cuda_sim.ensure()
    runs = []
    for b in ("torch", backend):
        params = model_params()
        opt = cls([{"params": params[:2], "lr": 0.05}, {"params": params[2:], "lr": 0.02}], beta_scope=scope,
                  backend=b)
        for seed in range(5):
            set_grads(params, seed)
            if seed < 2:
                params[0].grad = None
            opt.step()
        runs.append((params, opt.beta))
    (ref, ref_beta), (got, got_beta) = runs
    rtol, atol = tolerance(torch.float32)
    torch.testing.assert_close(got_beta, ref_beta, rtol=rtol, atol=atol)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


@pytest.mark.parametrize("backend", BACKENDS + [_cuda_sim.NAME])
@pytest.mark.parametrize("cls", OPTIMIZERS)
@pytest.mark.parametrize("how", ["del", "clear"])
def test_a_tensor_whose_state_is_reset_restarts_its_scope(backend, cls, how):
    """NOTE [a reset tensor restarts its scope], with beta adaptive (test_torch_parity.py: against torch)."""
    if backend == _cuda_sim.NAME:
        _cuda_sim.ensure()
    check_a_reset_tensor_restarts_its_scope(lambda params: cls(params, lr=0.05, beta_scope="tensor", backend=backend),
                                            how)


@pytest.mark.parametrize("backend", BACKENDS + [_cuda_sim.NAME])
@pytest.mark.parametrize("cls", OPTIMIZERS)
@pytest.mark.parametrize("scope,how", [("group", "remove"), ("tensor", "remove"), ("global", "reverse"),
                                       ("group", "reverse"), ("tensor", "reverse"), ("global", "copy"),
                                       ("group", "copy"), ("group", "copy-fewer"), ("tensor", "copy-fewer")])
def test_param_groups_removed_or_reordered_by_hand_keep_their_rows(backend, cls, scope, how):
    if backend == _cuda_sim.NAME:
        _cuda_sim.ensure()
    check_groups_rearranged_by_hand(lambda groups: cls(groups, beta_scope=scope, backend=backend), how)


def test_amadamw_warns_once_of_a_late_tensor_in_a_shared_scope():
    """NOTE [late tensors]: AMAdamW says so (once) when a tensor joins a scope that has stepped, where
    its bias corrections are the scope's; not in the tensor scope, nor for a group whose every tensor
    starts together, nor for AMSGD (whose late tensor takes a smaller first step, not a larger one)."""
    import warnings

    def run(cls, scope, late, read_state_first=False):
        params = model_params()
        opt = cls([{"params": params[:2]}, {"params": params[2:]}], beta_scope=scope)
        if read_state_first:  # a look at the state before any step makes empty entries: no state taken
            assert all(len(opt.state[p]) == 0 for p in params)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for seed in range(4):
                set_grads(params, seed)
                for i in late:
                    if seed < late[i]:
                        params[i].grad = None
                opt.step()
        return [str(w.message) for w in caught if "first gradient" in str(w.message)]

    said = run(AMAdamW, "global", {0: 1, 2: 2})
    assert len(said) == 1 and "1 parameter tensor(s)" in said[0] and "beta_scope='global'" in said[0]
    assert len(run(AMAdamW, "group", {0: 1})) == 1
    assert run(AMAdamW, "group", {2: 2, 3: 2}) == []  # group 1 starts as a whole: its scope's first step
    assert run(AMAdamW, "tensor", {0: 1, 2: 2}) == []
    assert run(AMSGD, "global", {0: 1}) == []
    assert run(AMAdamW, "global", {}, read_state_first=True) == []  # the first step is every scope's first
    said = run(AMAdamW, "global", {0: 1}, read_state_first=True)  # so the warning is still there to give
    assert len(said) == 1 and "1 parameter tensor(s)" in said[0]


def test_late_counts_read_back_from_a_gpu_are_each_reported_and_never_polled_in_a_capture(monkeypatch):
    """NOTE [late tensors, sharded] on CUDA: each step's count waits in pinned memory behind an event;
    step() reports every count whose event has completed, in order, none lost to a later one, and does
    not query an event while a graph is being captured (not allowed there). Stand-ins for the events
    (no GPU here)."""
    import warnings

    import amm_kernels._base as base

    class Event:
        def __init__(self):
            self.ready, self.queried = False, 0

        def query(self):
            self.queried += 1
            return self.ready

    params = model_params()
    opt = AMAdamW(params, beta_scope="global")
    take_steps(opt, params, range(1))
    first, second = Event(), Event()
    opt._late_pending = [(torch.tensor(3), first), (torch.tensor(0), second)]

    def step():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            set_grads(params, 5)
            opt.step()
        return [str(w.message) for w in caught if "first gradient" in str(w.message)]

    assert step() == [] and len(opt._late_pending) == 2  # not landed: kept
    monkeypatch.setattr(base, "_cuda_capturing", lambda: True)
    first.ready = second.ready = True
    queried = first.queried
    assert step() == [] and first.queried == queried  # capturing: not even queried
    monkeypatch.setattr(base, "_cuda_capturing", lambda: False)
    said = step()
    assert len(said) == 1 and said[0].startswith("AMAdamW: 3 parameter tensor(s)") and opt._late_pending == []


@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_beta_shape_follows_scope_and_is_a_copy(cls):
    params = model_params()
    shapes = {"global": (), "group": (2,), "tensor": (4,)}
    for scope, shape in shapes.items():
        opt = cls([{"params": params[:1]}, {"params": params[1:]}], beta_scope=scope)
        set_grads(params, 0)
        opt.step()
        beta = opt.beta
        assert beta.shape == shape and beta.device == params[0].device
        set_grads(params, 1)
        opt.step()
        assert torch.all(beta == (0.9 if cls is AMSGD else 0.9))  # the first step's beta, not overwritten


@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_zero_grad_scheduler_closure_and_add_param_group(cls):
    model, opt = check_scheduler_closure_and_add_param_group(cls)
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())


def test_loss_mode_uses_the_closures_loss():
    # On a quadratic, loss mode and first-order mode take different betas after the first step.
    target = torch.tensor([1.0, -2.0, 3.0])
    results = {}
    for mode in ("first_order", "loss"):
        x = torch.zeros(3, requires_grad=True)
        opt = AMSGD([x], lr=0.1, lam=0.0, beta_max=1.0, delta_f=mode)

        def closure():
            opt.zero_grad()
            loss = ((x - target) ** 2 * torch.tensor([1.0, 10.0, 0.1])).sum()
            loss.backward()
            return loss

        betas = []
        for _ in range(5):
            opt.step(closure)
            betas.append(opt.beta.item())
        results[mode] = betas
    assert results["loss"][0] == results["first_order"][0] == 1.0
    assert results["loss"][1:] != pytest.approx(results["first_order"][1:], abs=1e-4)


@pytest.mark.parametrize("cls", OPTIMIZERS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_params_keep_dtype(cls, dtype):
    params, opt = check_low_precision_params_keep_dtype(cls, dtype, steps=3)
    for p in params:
        assert all(t.dtype == dtype for t in opt.state[p].values()) if p.numel() else True
    assert opt.beta.dtype == torch.float32 and torch.isfinite(opt.beta).all()


@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_nonfinite_gradient_gives_nonfinite_beta(cls):
    _, opt = step_on_a_nan_gradient(cls)
    beta = opt.beta.reshape(-1)  # AMSGD: one global beta; AMAdamW: one per tensor (its default scope)
    assert torch.isnan(beta[0])  # the scope of the tensor with the NaN
    assert torch.isfinite(beta[1:]).all()  # the other tensors' betas do not see it


# --------------------------------------------------------------------------------------------------
# copies, checkpoints with empty entries, printing, backend_supports_dtype
ALL_OPTIMIZERS = [AMSGD, AMAdamW, amm_kernels.RLLC]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
@pytest.mark.parametrize("cls", ALL_OPTIMIZERS)
def test_a_copied_optimizer_continues_exactly_as_the_original(cls, how, backend):
    """copy.deepcopy / pickle carry the optimizer-wide settings and the scope state (step counts, beta),
    not only torch.optim's state and groups: the copy steps on as the original does, bit for bit."""
    import copy
    import pickle

    params = model_params()
    opt = cls(params, lr=0.05, backend=backend)
    set_grads(params, 0), opt.step(), set_grads(params, 1), opt.step()
    if how == "deepcopy":
        twin = copy.deepcopy({"params": params, "opt": opt})  # the copy steps its own copies of the params
    else:
        twin = pickle.loads(pickle.dumps({"params": params, "opt": opt}))
    for p, q in zip(params, twin["params"]):
        q.grad = p.grad.clone()
    for ps, o in ((params, opt), (twin["params"], twin["opt"])):
        for s in (2, 3):
            set_grads(ps, s)
            o.step()
    for p, q in zip(params, twin["params"]):
        assert torch.equal(p, q)
    assert repr(twin["opt"]) == repr(opt) and twin["opt"].defaults == opt.defaults


@pytest.mark.parametrize("cls", ALL_OPTIMIZERS)
def test_a_checkpoint_with_an_empty_state_entry_loads(cls):
    """Reading optimizer.state[p] before p's first step leaves {} there (torch.optim's defaultdict), and
    state_dict() saves it: such a checkpoint loads, as it does into torch.optim.AdamW."""
    params = model_params()
    opt = cls(params, lr=0.05)
    params[2].requires_grad_(False)
    set_grads(params, 0)
    params[2].grad = None
    opt.step()
    assert opt.state[params[2]] == {}
    fresh = cls(params, lr=0.05)
    fresh.load_state_dict(opt.state_dict())
    set_grads(params, 1)
    fresh.step()


def test_repr_shows_the_optimizer_wide_arguments():
    text = repr(AMAdamW(model_params(), betas=(0.8, 0.99), lam=0.2))
    assert text.startswith("AMAdamW (") and "betas=(0.8, 0.99)" in text and "lam=0.2" in text and "lr: 0.001" in text


def test_backend_supports_dtype():
    assert amm_kernels.backend_supports_dtype("auto", torch.float32)
    assert amm_kernels.backend_supports_dtype("auto", torch.float64)  # the reference runs it
    assert not amm_kernels.backend_supports_dtype("cpu", torch.float64)
    with pytest.raises(ValueError, match="name must be one of"):
        amm_kernels.backend_supports_dtype("gpu", torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls", OPTIMIZERS + [amm_kernels.RLLC])
def test_a_closure_may_return_anything_outside_loss_mode(backend, cls):
    """As in torch.optim, step(closure) returns what the closure returned; only delta_f="loss" reads
    it (a 3-element tensor crashed the step in a reshape before)."""
    params = model_params()

    def closure():
        set_grads(params, 0)
        return torch.ones(3), "anything"

    opt = cls(params, backend=backend)
    out = opt.step(closure)
    assert out[1] == "anything" and torch.equal(out[0], torch.ones(3))


def test_no_backend_claims_apples_mps_and_the_errors_say_why():
    """The reference combines its sums in float64, which MPS does not have: no backend is offered
    there, and asking for one names the reason (not run on a Mac: none here)."""
    from amm_kernels.backends import resolve

    assert amm_kernels.available_backends("mps") == []
    mps = torch.device("mps")
    with pytest.raises(RuntimeError, match=r"backend 'torch' cannot run here \(Apple's MPS has no float64.*no backend runs on mps here"):
        resolve("torch", mps, {torch.float32}, "AMSGD")
    with pytest.raises(RuntimeError, match=r"no backend runs on mps tensors here \('torch': Apple's MPS has no float64"):
        resolve("auto", mps, {torch.float32}, "AMSGD")
    with pytest.raises(RuntimeError, match=r"backend 'cpu' cannot run here \(it runs on cpu tensors, not mps\)"):
        resolve("cpu", mps, {torch.float32}, "AMSGD")


@pytest.mark.parametrize("backend", BACKENDS)
def test_tiny_gradients_give_the_float64_beta(backend):
    """NOTE [weighting in float64] (amadamw_reference.py): the sums of squares of ~3e-18 gradients are
    normal float32 numbers (~1e-35), but lr = 1e-8 times them is a float32 subnormal; weighted in
    float64, as every backend's finalize, beta keeps its digits. (Normal sums: a library that sets
    flush-to-zero in the process must not change what this test sees.)"""
    def betas(b, dtype):
        gen = torch.Generator().manual_seed(1)
        params = [torch.randn(s, generator=gen).to(dtype).requires_grad_() for s in [(5, 3), (7,), (4,)]]
        opt = AMSGD(params, lr=1e-8, beta_scope="tensor", backend=b)
        gen = torch.Generator().manual_seed(3)
        for _ in range(5):
            for p in params:
                p.grad = (torch.randn(p.shape, generator=gen) * 3e-18).to(dtype)
            opt.step()
        return opt.beta.double()

    exact = betas("torch", torch.float64)
    assert not torch.all(exact == exact[0]), "beta should differ per tensor"
    torch.testing.assert_close(betas(backend, torch.float32), exact, rtol=0, atol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_overflowing_sum_of_squares_gives_a_nan_beta_as_the_reference(backend):
    """NOTE [non-finite sums] (reference/beta.py): a denominator that is not finite gives a NaN beta, also
    when the numerator is finite; the "den not > 0" rule alone would give num / inf = 0, i.e. beta_min.
    Loss mode with lam = 0.5 and gradients -2e19 then 1e19 (finite float32 numbers): d - g = -3e19, whose
    float32 square overflows (den = inf), while g + lam d = 0 exactly (B = 0, and loss mode has no <g, d>
    term), so num = (lam + 1) (prev_loss - loss) is finite."""
    def betas(b):
        x = torch.zeros(3, requires_grad=True)
        opt = AMSGD([x], lr=1e-3, lam=0.5, delta_f="loss", backend=b)
        out = []
        for g, loss in [(-2e19, 1.0), (1e19, 0.5)]:
            def closure():
                x.grad = torch.full((3,), g)
                return torch.tensor(loss)

            opt.step(closure)
            out.append(opt.beta.clone())
        return torch.stack(out)

    ref, got = betas("torch"), betas(backend)
    assert torch.isnan(ref[1]), ref  # the reference's rule for non-finite sums
    torch.testing.assert_close(got, ref, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("in_place", [False, True], ids=["new_dict", "in_place"])
@pytest.mark.parametrize("cls", ALL_OPTIMIZERS)
def test_load_hooks_see_the_checkpoint_torch_loads_and_the_optimizer_as_loaded(cls, in_place):
    """NOTE [load hooks] in _checkpoint.py: a pre-hook that renumbers a checkpoint's parameters (saved by an
    optimizer that listed them in another order) is applied before the checkpoint is checked and
    loaded; the per-tensor scope state (here tensors with different step counts) follows the tensors
    (NOTE [checkpoint carriers]); a post-hook sees the scope state loaded."""
    scope = {"scope": "tensor"} if cls is amm_kernels.RLLC else {"beta_scope": "tensor"}
    params = model_params()
    opt = cls(params, **scope)
    for step in range(4):
        set_grads(params, step)
        if step < 2:
            params[0].grad = None  # tensor 0 joins at step 2: its scope has fewer steps
        opt.step()
    n = len(params)
    # the checkpoint of an optimizer that listed the parameters backwards (its scope rows backwards too)
    saved = copy.deepcopy(opt.state_dict())
    saved["state"] = {n - 1 - pid: st for pid, st in saved["state"].items()}
    saved["param_groups"][0]["params"] = list(range(n))[::-1]
    meta = saved["amm"]
    meta["scopes"] = {k: (v.flip(0) if v.dim() and v.shape[0] == n else v) for k, v in meta["scopes"].items()}
    saved["param_groups"][0]["amm"] = meta
    saved["state"][n] = saved["state"][0]  # an entry no group lists: refused unless the hook drops it

    def renumber(_, sd):
        state = {n - 1 - pid: st for pid, st in sd["state"].items() if pid < n}
        if in_place:  # the same dicts, edited
            sd["state"].clear()
            sd["state"].update(state)
            sd["param_groups"][0]["params"] = list(range(n))
            return None
        return {**sd, "state": state, "param_groups": [dict(sd["param_groups"][0], params=list(range(n)))]}

    seen = {}
    fresh = cls(params, **scope)
    fresh.register_load_state_dict_pre_hook(renumber)
    fresh.register_load_state_dict_post_hook(lambda o: seen.update(scopes=o._scopes))
    fresh.load_state_dict(saved)
    assert seen["scopes"] is fresh._scopes
    assert opt._scopes.step.tolist() == [2.0, 4.0, 4.0, 4.0]
    for k, v in opt._scopes.to_dict().items():
        assert torch.equal(getattr(fresh._scopes, k), v), k
    for p in params:
        for key, t in opt.state[p].items():
            assert torch.equal(fresh.state[p][key], t)
        assert set(fresh.state[p]) == set(opt.state[p])  # the carriers stay out of the live state


# steps at which tensors get no gradient: 2 and 3 have no state when the checkpoint is taken (after step
# 2), and the first steps after it have gradients only for them
_FROZEN = {0: {2, 3}, 1: {2, 3}, 2: {2, 3}, 3: {0, 1}, 4: {0, 1}}


def _frozen_steps(opt, params, steps):
    for t in steps:
        set_grads(params, t)
        for i in _FROZEN.get(t, ()):
            params[i].grad = None
        opt.step()


@pytest.mark.filterwarnings("ignore:AMAdamW.*first gradient")  # tensors 2 and 3 join late
@pytest.mark.parametrize("then", ["step", "step_of_others", "state_dict"])
@pytest.mark.parametrize("cls", ALL_OPTIMIZERS)
def test_state_written_straight_into_the_optimizer_brings_its_scope_values(cls, then):
    """NOTE [checkpoint carriers]: ZeroRedundancyOptimizer.load_state_dict writes each parameter's
    state_dict entry straight into the optimizer's state (done so here, without torch.distributed).
    Each entry carries its scope's values; the optimizer takes them at its next step, even one where
    only tensors without saved state have gradients ("step"; "step_of_others": entries written only for
    the tensors with state, 0 and 1, while the step has gradients for 2 and 3 only), or at a
    state_dict() before any step ("state_dict", loaded again): the run goes on exactly as one without
    the checkpoint."""
    kw = {"scope": "global"} if cls is amm_kernels.RLLC else {"beta_scope": "global"}
    params = model_params()
    straight = cls(params, **kw)
    _frozen_steps(straight, params, range(6))

    params = model_params()
    opt = cls(params, **kw)
    _frozen_steps(opt, params, range(3))
    saved = copy.deepcopy(opt.state_dict())
    resumed_params = [p.detach().clone().requires_grad_() for p in params]
    resumed = cls(resumed_params, **kw)
    for i, p in enumerate(resumed_params):  # as ZeroRedundancyOptimizer.load_state_dict
        has_state = bool(set(saved["state"].get(i, {})) - {"amm_scope", "amm_setting"})
        if i in saved["state"] and (has_state or then != "step_of_others"):
            resumed.state[p] = dict(saved["state"][i])
    if then == "state_dict":
        again = copy.deepcopy(resumed.state_dict())
        # the rows taken, their keys keep stand-ins (a flattened DCP save would otherwise lose them)
        assert all(st["amm_scope"].dim() == 0 for st in resumed.state.values() if "exp_avg" in st or
                   "momentum_buffer" in st or "memory" in st)
        assert any(st for st in resumed.state.values())
        resumed = cls(resumed_params, **kw)
        resumed.load_state_dict(again)
    _frozen_steps(resumed, resumed_params, range(3, 6))
    ref_params = [p for g in straight.param_groups for p in g["params"]]
    for a, b in zip(resumed_params, ref_params):
        assert torch.equal(a, b)
    for k, v in straight._scopes.to_dict().items():
        assert torch.equal(getattr(resumed._scopes, k), v), k
    assert all(st["amm_scope"].dim() == 0 for st in resumed.state.values())  # rows taken: stand-ins left


@pytest.mark.parametrize("cls", ALL_OPTIMIZERS)
def test_a_state_dict_post_hook_may_key_the_state_by_name(cls):
    """torch lets a state_dict post-hook key the state by parameter name; the scope values still reach
    every parameter's entry, and the checkpoint loads back through the matching pre-hook."""
    params = model_params()
    names = [f"p{i}" for i in range(len(params))]
    opt = cls(params)
    take_steps(opt, params, range(2))

    def by_name(_, sd):
        sd["state"] = {names[pid]: st for pid, st in sd["state"].items()}
        sd["param_groups"] = [dict(g, params=[names[pid] for pid in g["params"]]) for g in sd["param_groups"]]

    def by_id(_, sd):
        return {**sd, "state": {names.index(k): st for k, st in sd["state"].items()},
                "param_groups": [dict(g, params=[names.index(k) for k in g["params"]]) for g in sd["param_groups"]]}

    opt.register_state_dict_post_hook(by_name)
    sd = opt.state_dict()
    assert set(sd["state"]) == set(names) and all("amm_scope" in st for st in sd["state"].values())
    twin = cls(params)
    twin.register_load_state_dict_pre_hook(by_id)
    twin.load_state_dict(sd)
    for k, v in opt._scopes.to_dict().items():
        assert torch.equal(getattr(twin._scopes, k), v), k


@pytest.mark.parametrize("cls", ALL_OPTIMIZERS)
def test_a_bad_scope_row_in_a_checkpoint_is_refused_before_anything_changes(cls):
    params = model_params()
    opt = cls(params)
    take_steps(opt, params, range(2))
    bad = copy.deepcopy(opt.state_dict())
    bad["state"][0]["amm_scope"] = bad["state"][0]["amm_scope"][:-1]
    twin_params = [p.detach().clone().requires_grad_() for p in params]
    twin = cls(twin_params)
    take_steps(twin, twin_params, range(1))
    before = snapshot(twin, twin_params)
    with pytest.raises(ValueError, match="carries its scope's values"):
        twin.load_state_dict(bad)
    assert_same_state(before, snapshot(twin, twin_params))


@pytest.mark.filterwarnings("ignore:AMAdamW.*first gradient")
@pytest.mark.parametrize("scope", ["global", "group"])
@pytest.mark.parametrize("cls", ALL_OPTIMIZERS)
def test_a_parameter_without_state_carries_its_scope_row_too(cls, scope):
    """A ZeroRedundancyOptimizer rank may hold only tensors that had no gradient before the checkpoint:
    their entries carry their scope's row alone, so that rank's scope resumes at the checkpoint's step
    count (and a plain load of the checkpoint gives such tensors no state). None of the rank's tensors
    has state, but its scope does not start again (NOTE [a reset tensor restarts its scope]): the rows
    give it its values."""
    kw = {"scope": scope} if cls is amm_kernels.RLLC else {"beta_scope": scope}
    params = model_params()
    opt = cls(params, **kw)
    _frozen_steps(opt, params, range(3))  # tensors 2 and 3 have no state
    saved = copy.deepcopy(opt.state_dict())
    assert set(saved["state"][2]) == {"amm_scope", "amm_setting"}
    held = [p.detach().clone().requires_grad_() for p in params[2:]]
    rank = cls(held, **kw)  # the rank that holds tensors 2 and 3
    for j, p in enumerate(held):
        rank.state[p] = dict(saved["state"][2 + j])
    set_grads(held, 3)
    rank.step()
    assert rank._scopes.step.tolist() == [4.0]
    plain = cls(params, **kw)
    plain.load_state_dict(saved)
    assert set(plain.state) == set(params[:2])


@pytest.mark.parametrize("cls", ALL_OPTIMIZERS)
def test_rows_of_another_setting_put_in_place_are_refused_before_anything_changes(cls):
    """Rows put in place without load_state_dict (as ZeroRedundancyOptimizer does) say what they were
    saved under: another scope mode, or another optimizer, is an error at the next step, not rows
    written into the wrong scopes. A ZeRO checkpoint (no "amm" entry) loads into a plain optimizer
    from its rows, of its own setting only."""
    key = "scope" if cls is amm_kernels.RLLC else "beta_scope"
    params = model_params()
    opt = cls(params, **{key: "tensor"})
    take_steps(opt, params, range(2))
    saved = copy.deepcopy(opt.state_dict())
    other = [p.detach().clone().requires_grad_() for p in params]
    target = cls(other, **{key: "global"})
    for i, p in enumerate(other):
        target.state[p] = dict(saved["state"][i])
    before = {k: v.clone() for k, v in target._scopes.to_dict().items()}
    set_grads(other, 2)
    with pytest.raises(ValueError, match="was saved by .* with scope 'tensor'; this is .* with scope 'global'"):
        target.step()
    assert all(torch.equal(getattr(target._scopes, k), v) for k, v in before.items())
    assert all(set(st) == set(saved["state"][i]) for i, st in enumerate(target.state[p] for p in other))
    zero_like = {"state": saved["state"], "param_groups": [{k: v for k, v in g.items() if k != "amm"}
                                                           for g in saved["param_groups"]]}
    plain = cls(params, **{key: "tensor"})
    plain.load_state_dict(copy.deepcopy(zero_like))
    for k, v in opt._scopes.to_dict().items():
        assert torch.equal(getattr(plain._scopes, k), v), k
    with pytest.raises(ValueError, match="was saved by .* with scope 'tensor'; this is .* with scope 'global'"):
        cls(params, **{key: "global"}).load_state_dict(copy.deepcopy(zero_like))


@pytest.mark.filterwarnings("ignore:AMAdamW.*first gradient")  # (row-alone: tensors 2 and 3 join late)
@pytest.mark.parametrize("entries", ["with-state", "row-alone"])
@pytest.mark.parametrize("scope", ["global", "tensor"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls", ALL_OPTIMIZERS)
def test_a_refused_step_leaves_rows_put_in_place_where_they_were(cls, backend, scope, entries):
    """NOTE [refused steps]: rows put in place without load_state_dict (as ZeroRedundancyOptimizer does)
    move into the scope state at the next step. When the backend refuses that step, the move is taken
    back: each state dict holds what it held (its row, not a stand-in; "row-alone": the entry of a tensor
    that had no state, its row alone, is neither dropped nor given state) and the scope state is as it
    was, its tensors the same objects, and the run goes on as one without the refused call, to the bit.
    Before, the rows stayed moved (and a row alone was dropped with the state the step had made)."""
    key = "scope" if cls is amm_kernels.RLLC else "beta_scope"
    params = model_params()
    opt = cls(params, **{key: scope})
    (_frozen_steps if entries == "row-alone" else take_steps)(opt, params, range(2))
    saved = copy.deepcopy(opt.state_dict())
    if entries == "row-alone":
        assert set(saved["state"][3]) == {"amm_scope", "amm_setting"}

    def resumed(refuse):
        held = [p.detach().clone().requires_grad_() for p in params]
        rank = cls(held, backend=backend, **{key: scope})
        for i, p in enumerate(held):
            rank.state[p] = copy.deepcopy(saved["state"][i])  # (each run its own state: the steps write it)
        if refuse:
            before = [dict(rank.state[p]) for p in held], dict(vars(rank._scopes)), rank._scopes.to_dict()
            set_grads(held, 2)
            held[0].grad.data = torch.zeros(2, 3)  # (.data: past autograd's own check) refused by the backend
            with pytest.raises((ValueError, RuntimeError), match=r"(tensor 0|grads\[0\]).*(shape|as many elements)"):
                rank.step()
            for p, st in zip(held, before[0]):
                assert rank.state[p].keys() == st.keys() and all(rank.state[p][k] is t for k, t in st.items())
            assert all(getattr(rank._scopes, k) is t for k, t in before[1].items())
            assert all(torch.equal(getattr(rank._scopes, k), v) for k, v in before[2].items())
        take_steps(rank, held, [2, 3])
        return snapshot(rank, held)

    assert_same_state(resumed(refuse=True), resumed(refuse=False))


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # DCP in one process
@pytest.mark.filterwarnings("ignore:AMAdamW.*first gradient")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("scope", ["global", "group", "tensor"])
@pytest.mark.parametrize("cls", ALL_OPTIMIZERS)
def test_a_flattened_distributed_checkpoint_resumes_exactly(cls, scope, dtype, tmp_path):
    """torch.distributed.checkpoint with flatten_optimizer_state_dict=True (as torchtitan and OLMo-core
    checkpoint) rebuilds the state_dict it hands load_state_dict from the keys the live optimizer has:
    its param groups' keys and each parameter's state keys, so the "amm" entry is dropped. The live
    state keeps 0-d stand-ins under the rows' keys (NOTE [checkpoint carriers]): every tensor's row
    comes back, and the run goes on exactly as one without the checkpoint (the same betas, step counts
    and parameters; a lost step count changes AMSGD's first step and AMAdamW's bias corrections), in
    float64 too (its scope state is float64: rounded to float32, the run would differ)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict,
                                                         set_optimizer_state_dict)

    key = "scope" if cls is amm_kernels.RLLC else "beta_scope"

    def build():
        model = torch.nn.ParameterList(model_params(dtype=dtype))
        params = list(model)
        return model, params, cls([{"params": params[:2], "lr": 0.03}, {"params": params[2:], "lr": 0.01}],
                                  **{key: scope})

    def steps(opt, params, which):  # tensors 2 and 3 join at step 1; step 3 has gradients for them only
        for t in which:
            set_grads(params, t)
            for i in {0: (2, 3), 3: (0, 1)}.get(t, ()):
                params[i].grad = None
            opt.step()

    _, params, straight = build()
    steps(straight, params, range(5))

    model, params, opt = build()
    steps(opt, params, range(3))  # (DCP loads only state the checkpoint has: every tensor has some here)
    flat = StateDictOptions(flatten_optimizer_state_dict=True)
    saved = get_optimizer_state_dict(model, opt, options=flat)
    assert all(v.dim() == 1 for k, v in saved.items() if k.endswith(".amm_scope"))  # rows, not stand-ins
    # the flattened form repeats a group's keys for each of its parameters: after a step the scope state
    # rides in the rows only, not in a group (a copy per parameter, each as long as the tensor scope)
    assert not any(k.startswith("param_groups.") and k.endswith(".amm") for k in saved)
    dcp.save({"optim": saved}, checkpoint_id=tmp_path)

    new_model, new_params, resumed = build()
    with torch.no_grad():
        for a, b in zip(new_params, params):
            a.copy_(b)
    template = {"optim": get_optimizer_state_dict(new_model, resumed, options=flat)}  # (steps it with zero grads)
    dcp.load(template, checkpoint_id=tmp_path)
    set_optimizer_state_dict(new_model, resumed, template["optim"], options=flat)
    steps(resumed, new_params, range(3, 5))
    for a, b in zip(new_params, [p for g in straight.param_groups for p in g["params"]]):
        assert torch.equal(a, b)
    for k, v in straight._scopes.to_dict().items():
        assert torch.equal(getattr(resumed._scopes, k), v), k


@pytest.mark.parametrize("cls", ALL_OPTIMIZERS)
@pytest.mark.parametrize("built", ["with_params", "empty_then_added"])
def test_a_checkpoint_before_any_step_loads_from_its_state_and_groups_alone(cls, built):
    """Before any step, a checkpoint cut down to "state" and "param_groups" (as ZeroRedundancyOptimizer
    and DCP keep it) loads from its rows, and the run then goes on as a fresh one: the scope state is
    made with the first parameters, at construction or by add_param_group (NOTE [checkpoint carriers]).
    One of an optimizer without parameters, with no state at all, loads too."""
    def build(params):
        if built == "with_params":
            return cls(params)
        opt = cls([{"params": []}])
        opt.add_param_group({"params": params})
        return opt

    params = model_params()
    saved = build(params).state_dict()
    assert not any("amm" in g for g in saved["param_groups"])  # (its rows carry the scope state)
    assert all("amm_scope" in saved["state"][i] for i in range(len(params)))
    empty = cls([{"params": []}]).state_dict()
    cls([{"params": []}]).load_state_dict({"state": empty["state"], "param_groups": empty["param_groups"]})
    kept = copy.deepcopy({"state": saved["state"], "param_groups": saved["param_groups"]})
    loaded = build(params)
    loaded.load_state_dict(kept)
    twin_params = [p.detach().clone().requires_grad_() for p in params]
    fresh = build(twin_params)
    take_steps(loaded, params, range(2))
    take_steps(fresh, twin_params, range(2))
    for a, b in zip(params, twin_params):
        assert torch.equal(a, b)


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # DCP in one process
@pytest.mark.parametrize("cls", ALL_OPTIMIZERS)
def test_state_without_the_stand_ins_gets_them_and_a_load_that_lost_a_row_is_refused(cls, tmp_path):
    """NOTE [checkpoint carriers]: state without the stand-ins (pickled by an earlier version, or made
    by hand) gets them when unpickled and at the next step. A flattened DCP load into an optimizer
    where a parameter's state lacks them brings no row for that parameter: refused, naming why, rather
    than that parameter's scope values silently reset."""
    import pickle

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict,
                                                         set_optimizer_state_dict)

    key = "scope" if cls is amm_kernels.RLLC else "beta_scope"
    model = torch.nn.ParameterList(model_params())
    params = list(model)
    opt = cls(params, **{key: "tensor"})
    take_steps(opt, params, range(2))
    assert all(st["amm_scope"].dim() == 0 and st["amm_setting"].dim() == 0 for st in opt.state.values())

    def strip(o):
        for st in o.state.values():
            del st["amm_scope"], st["amm_setting"]

    strip(opt)
    unpickled = pickle.loads(pickle.dumps(opt))
    assert all(st["amm_scope"].dim() == 0 for st in unpickled.state.values())
    strip(unpickled)
    take_steps(unpickled, [p for g in unpickled.param_groups for p in g["params"]], range(2, 3))
    assert all(st["amm_scope"].dim() == 0 for st in unpickled.state.values())

    flat = StateDictOptions(flatten_optimizer_state_dict=True)
    dcp.save({"optim": get_optimizer_state_dict(model, opt, options=flat)}, checkpoint_id=tmp_path)
    new_model = torch.nn.ParameterList(model_params())
    target = cls(list(new_model), **{key: "tensor"})
    template = {"optim": get_optimizer_state_dict(new_model, target, options=flat)}
    dcp.load(template, checkpoint_id=tmp_path)
    first = target.state[new_model[0]]
    del first["amm_scope"], first["amm_setting"]
    before = {k: v.clone() for k, v in target._scopes.to_dict().items()}
    with pytest.raises(ValueError, match="came without its scope values"):
        set_optimizer_state_dict(new_model, target, template["optim"], options=flat)
    assert all(torch.equal(getattr(target._scopes, k), v) for k, v in before.items())


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # DCP in one process
def test_a_flattened_load_into_an_optimizer_without_state_says_why(tmp_path):
    """DCP gives a fresh optimizer its state by a step with zero gradients, but not when a parameter
    already has a gradient: the flattened load then asks for no state at all (torch's Adam loads
    nothing, silently). Refused, saying what to do."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict,
                                                         set_optimizer_state_dict)

    flat = StateDictOptions(flatten_optimizer_state_dict=True)
    model = torch.nn.ParameterList(model_params())
    opt = AMAdamW(list(model))
    take_steps(opt, list(model), range(2))
    dcp.save({"optim": get_optimizer_state_dict(model, opt, options=flat)}, checkpoint_id=tmp_path)
    new_model = torch.nn.ParameterList(model_params())
    target = AMAdamW(list(new_model))
    set_grads(list(new_model), 0)  # gradients already there
    template = {"optim": get_optimizer_state_dict(new_model, target, options=flat)}
    dcp.load(template, checkpoint_id=tmp_path)
    with pytest.raises(ValueError, match=r"zero_grad\(set_to_none=True\) before loading"):
        set_optimizer_state_dict(new_model, target, template["optim"], options=flat)


def assert_resumes_alike(opt, params, twin, twin_params, steps):
    """twin (loaded from a checkpoint of opt) holds opt's scope state, and the two go on alike."""
    for k, v in opt._scopes.to_dict().items():
        assert torch.equal(getattr(twin._scopes, k), v), k
    take_steps(opt, params, steps)
    take_steps(twin, twin_params, steps)
    for a, b in zip(params, twin_params):
        assert torch.equal(a, b)


@pytest.mark.parametrize("cls", ALL_OPTIMIZERS)
def test_an_empty_tensor_under_the_scope_key_is_no_row(cls):
    """NOTE [checkpoint carriers]: only values under "amm_scope" are a row; the 0-d stand-in and an empty
    tensor there are none (_carries_row). A checkpoint whose entries hold empty tensors there loads its
    scope state from its "amm" entry, and the run goes on exactly."""
    params = model_params()
    opt = cls(params)
    take_steps(opt, params, range(3))
    saved = copy.deepcopy(opt.state_dict())
    for st in saved["state"].values():
        st["amm_scope"] = torch.empty(0)
    twin_params = [p.detach().clone().requires_grad_() for p in params]
    twin = cls(twin_params)
    twin.load_state_dict(saved)
    assert_resumes_alike(opt, params, twin, twin_params, range(3, 5))


def _tensor_scopes_of_uneven_steps(cls):
    """An optimizer of per-tensor scopes after 3 steps, tensor 1 without a gradient at the first: scopes
    with different step counts. Returns (optimizer, params, its scope argument)."""
    scope = {"scope": "tensor"} if cls is amm_kernels.RLLC else {"beta_scope": "tensor"}
    params = model_params()
    opt = cls(params, **scope)
    for step in range(3):
        set_grads(params, step)
        if step == 0:
            params[1].grad = None
        opt.step()
    return opt, params, scope


@pytest.mark.parametrize("cls", ALL_OPTIMIZERS)
def test_load_state_dict_leaves_the_callers_checkpoint_as_it_was(cls):
    """load_state_dict takes the rows (NOTE [checkpoint carriers]) without editing the caller's
    checkpoint: its entries keep their rows and setting codes, so it loads again, into another optimizer,
    from its rows alone."""
    opt, params, scope = _tensor_scopes_of_uneven_steps(cls)
    saved = opt.state_dict()
    kept = copy.deepcopy(saved)
    twin = cls([p.detach().clone().requires_grad_() for p in params], **scope)
    twin.load_state_dict(saved)
    assert saved["state"].keys() == kept["state"].keys()
    for pid, st in kept["state"].items():
        assert set(saved["state"][pid]) == set(st), pid
        for key, t in st.items():
            assert torch.equal(saved["state"][pid][key], t), (pid, key)
    again = cls([p.detach().clone().requires_grad_() for p in params], **scope)
    again.load_state_dict({"state": saved["state"], "param_groups": saved["param_groups"]})
    for k, v in opt._scopes.to_dict().items():
        assert torch.equal(getattr(again._scopes, k), v), k


@pytest.mark.parametrize("cls", ALL_OPTIMIZERS)
def test_an_amm_entry_copied_into_a_live_group_stays_out_of_state_dict(cls):
    """ZeroRedundancyOptimizer copies a loaded checkpoint's group keys into the live param groups, an
    earlier version's "amm" entry among them (NOTE [checkpoint carriers]). state_dict() puts "amm" in no
    param group: only the current one, at its top."""
    params = model_params()
    opt = cls(params)
    take_steps(opt, params, range(2))
    stale = copy.deepcopy(opt.state_dict()["amm"])
    take_steps(opt, params, range(2, 4))
    opt.param_groups[0]["amm"] = stale  # as ZeroRedundancyOptimizer.load_state_dict leaves it
    sd = opt.state_dict()
    assert not any("amm" in g for g in sd["param_groups"])
    for k, v in opt._scopes.to_dict().items():
        assert torch.equal(sd["amm"]["scopes"][k], v), k


@pytest.mark.parametrize("cls", ALL_OPTIMIZERS)
def test_an_earlier_versions_checkpoint_with_amm_in_a_group_only_loads(cls):
    """Checkpoints of earlier versions carry no rows and kept "amm" in the first param group too
    (NOTE [checkpoint carriers]); cut to "state" and "param_groups" (ZeroRedundancyOptimizer's), the
    group's copy is the one there is: it loads, and the run goes on exactly."""
    opt, params, scope = _tensor_scopes_of_uneven_steps(cls)
    sd = copy.deepcopy(opt.state_dict())
    old = {"state": {pid: {k: v for k, v in st.items() if k not in ("amm_scope", "amm_setting")}
                     for pid, st in sd["state"].items()},
           "param_groups": [dict(sd["param_groups"][0], amm=sd["amm"])]}
    twin_params = [p.detach().clone().requires_grad_() for p in params]
    twin = cls(twin_params, **scope)
    twin.load_state_dict(old)
    assert_resumes_alike(opt, params, twin, twin_params, range(3, 5))


@pytest.mark.parametrize("cls", ALL_OPTIMIZERS)
def test_a_load_pre_hook_that_returns_another_checkpoint_loads_that_ones_scope_state(cls):
    """NOTE [load hooks]: torch loads the dict the pre-hooks return, and so does the scope state: a hook
    that hands over another checkpoint (here one of an earlier step, without rows, as an earlier
    version saved it) loads that checkpoint's "amm" entry, not the one of the dict given."""
    params = model_params()
    opt = cls(params)
    take_steps(opt, params, range(2))
    earlier = copy.deepcopy(opt.state_dict())
    earlier["state"] = {pid: {k: v for k, v in st.items() if k not in ("amm_scope", "amm_setting")}
                        for pid, st in earlier["state"].items()}
    take_steps(opt, params, range(2, 5))
    later = copy.deepcopy(opt.state_dict())
    twin = cls([p.detach().clone().requires_grad_() for p in params])
    twin.register_load_state_dict_pre_hook(lambda _, sd: earlier)
    twin.load_state_dict(later)
    for k, v in earlier["amm"]["scopes"].items():
        assert torch.equal(getattr(twin._scopes, k), v), k


@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_beta_of_an_optimizer_without_parameters_is_beta_max(cls):
    """Before any step beta is beta_max (its first step's), also for an optimizer built without
    parameters, whose scope state is made only with its first ones."""
    kwargs = dict(beta_max=0.8, beta_min=0.2) if cls is AMSGD else dict(betas=(0.8, 0.999), beta_min=0.2)
    opt = cls([{"params": []}], beta_scope="global", **kwargs)
    assert opt.beta.shape == ()
    assert opt.beta.item() == pytest.approx(0.8)
    beta = cls([{"params": []}, {"params": []}], beta_scope="group", **kwargs).beta
    assert beta.shape == (2,) and torch.all(beta == torch.tensor(0.8))


@pytest.mark.parametrize("cls", ALL_OPTIMIZERS)
def test_an_lr_tensor_changed_in_place_is_read_at_every_step_beside_float_lrs(cls):
    """A group's lr may be a tensor, changed in place between steps (a capturable run's schedule), while
    another group's lr is a float: every step reads the tensor's current value. Set to 0, its group's
    parameters stay where they are; the other group's go on moving."""
    params = model_params()
    lr = torch.tensor(0.1)
    opt = cls([{"params": params[:2], "lr": lr}, {"params": params[2:], "lr": 0.05}])
    take_steps(opt, params, [0])
    lr.fill_(0.0)
    before = [p.detach().clone() for p in params]
    take_steps(opt, params, [1])
    for p, b in zip(params[:2], before[:2]):
        assert torch.equal(p, b)
    assert not torch.equal(params[2], before[2])


@pytest.mark.parametrize("cls,kwargs", [(AMSGD, {}), (AMSGD, {"delta_f": "loss"}), (AMAdamW, {})],
                         ids=["AMSGD", "AMSGD-loss", "AMAdamW"])
def test_add_param_group_keeps_the_scope_state_of_the_groups_there(cls, kwargs):
    """add_param_group grows the scope state for the new group and keeps what the groups there had: the
    lr each moved with (prev_lr) and the previous loss. The run equals one where the group was there from
    the start with no gradient until it joins."""
    def run(add_later):
        params = model_params()
        extra = torch.randn(5, generator=torch.Generator().manual_seed(7)).requires_grad_()
        groups = [{"params": params}] + ([] if add_later else [{"params": [extra], "lr": 0.02}])
        opt = cls(groups, lr=0.05, **kwargs)
        for t in range(4):
            if t == 2 and add_later:
                opt.add_param_group({"params": [extra], "lr": 0.02})
            set_grads(params, t)
            if t >= 2:
                extra.grad = torch.randn(5, generator=torch.Generator().manual_seed(t))
            opt.step(lambda: torch.tensor(1.0 / (t + 1)))
        return [*params, extra], opt

    (pa, a), (pb, b) = run(True), run(False)
    for x, y in zip(pa, pb):
        assert torch.equal(x, y)
    for k, v in b._scopes.to_dict().items():
        assert torch.equal(getattr(a._scopes, k), v), k


TENSOR_SCOPES = [(AMSGD, {"beta_scope": "tensor"}), (AMAdamW, {}), (amm_kernels.RLLC, {"scope": "tensor"})]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls,kwargs", TENSOR_SCOPES, ids=[c.__name__ for c, _ in TENSOR_SCOPES])
def test_tensor_scopes_follow_their_tensors_when_groups_are_edited_by_hand(cls, kwargs, backend):
    """NOTE [tensor scopes follow their tensors]: a tensor inserted into a group's "params" by hand, the
    tensors reordered, one replaced and one removed: each tensor keeps its own step count, beta (law) and
    bias correction, as in a run where every tensor was listed from the start and had no gradient while
    it was not in the groups. Without it, every tensor after the insertion took its neighbour's."""
    def grads(named, t):
        for k, (name, p) in enumerate(sorted(named.items())):
            p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(100 * t + k))

    def make():
        gen = torch.Generator().manual_seed(3)
        return {n: torch.randn(s, generator=gen).requires_grad_() for n, s in
                [("a", (4, 3)), ("b", (7,)), ("c", (5,)), ("e", (3,)), ("f", (6,))]}

    # edited by hand: [a, b], [c] for 2 steps; then e inserted first and a, b swapped; then c removed
    # and b replaced by f
    t_ = make()
    edited = cls([{"params": [t_["a"], t_["b"]]}, {"params": [t_["c"]]}], lr=0.05, backend=backend, **kwargs)
    listed = {0: "a b c", 2: "e b a c", 4: "e f a"}
    for t in range(6):
        if t == 2:
            edited.param_groups[0]["params"][:] = [t_["e"], t_["b"], t_["a"]]
        if t == 4:
            edited.param_groups[0]["params"][1] = t_["f"]
            edited.param_groups[1]["params"].remove(t_["c"])
        names = listed[max(k for k in listed if k <= t)].split()
        grads({n: t_[n] for n in names}, t)
        edited.step()
        for n in set(t_) - set(names):
            t_[n].grad = None
    # every tensor listed from the start, without a gradient while it is not in the groups above
    r_ = make()
    whole = cls([{"params": [r_[n] for n in "abef"]}, {"params": [r_["c"]]}], lr=0.05, backend=backend, **kwargs)
    for t in range(6):
        names = listed[max(k for k in listed if k <= t)].split()
        for n in r_:
            r_[n].grad = None
        grads({n: r_[n] for n in names}, t)
        whole.step()
    for n in t_:
        assert torch.equal(t_[n], r_[n]), n
    scope = "law" if cls is amm_kernels.RLLC else "beta"
    final = dict(zip("efa", getattr(edited, scope)))
    for n, value in zip("abefc", getattr(whole, scope)):
        if n in final:
            assert torch.equal(final[n], value), n
    assert edited._scopes.step.tolist() == [4.0, 2.0, 6.0] and whole._scopes.step.tolist() == [6.0, 4.0, 4.0, 2.0, 4.0]


def _staggered_run(cls, kwargs, backend, between):
    """Tensors a, b stepped 2 and 1 times (so their scope values differ), then between(opt, params)
    (which returns the optimizer to go on with), then one step of every tensor it lists. The scope
    state (step counts, beta or law, ...) and the parameters at the end."""
    gen = torch.Generator().manual_seed(6)
    params = [torch.randn(s, generator=gen).requires_grad_() for s in [(4, 3), (7,)]]
    opt = cls([{"params": params}], lr=0.05, backend=backend, **kwargs)
    for t, which in enumerate([{0}, {0, 1}]):
        for k, p in enumerate(params):
            p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(10 * t + k)) if k in which else None
        opt.step()
    opt = between(opt, params)
    listed = opt.param_groups[0]["params"]
    for k, p in enumerate(listed):
        p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(100 + k))
    opt.step()
    return opt._scopes.to_dict(), [p.detach().clone() for p in listed]


def _assert_same_run(x, y):
    assert all(torch.equal(a, b) for a, b in zip(x[1], y[1])) and len(x[1]) == len(y[1])
    for k, v in x[0].items():
        assert torch.equal(y[0][k], v), k


@pytest.mark.parametrize("how", ["read", "state_dict", "deepcopy", "pickle"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls,kwargs", TENSOR_SCOPES, ids=[c.__name__ for c, _ in TENSOR_SCOPES])
def test_a_hand_edit_is_seen_before_the_next_step(cls, kwargs, backend, how):
    """NOTE [tensor scopes follow their tensors]: between a hand edit of a group's "params" and the next
    step, a read of beta (law) shows each tensor's value at its new position, and a run resumed from a
    state_dict() or a copy taken there is the uninterrupted run to the bit. Before, all of them read the
    scope state in the old order: a resumed run swapped two tensors' step counts and betas."""
    scope = "law" if cls is amm_kernels.RLLC else "beta"

    def edit(interrupt):
        def between(opt, params):
            a, b = params
            c = torch.randn(5, generator=torch.Generator().manual_seed(4)).requires_grad_()
            before = getattr(opt, scope)
            opt.param_groups[0]["params"][:] = [c, b, a]  # by hand: c new, a and b swapped
            if interrupt == "read":
                after = getattr(opt, scope)
                fresh = getattr(cls([c], lr=0.05, backend=backend, **kwargs), scope)
                assert torch.equal(after[0], fresh[0]) and torch.equal(after[1], before[1]) \
                    and torch.equal(after[2], before[0])
            if interrupt == "state_dict":
                resumed = cls([{"params": [p.detach().clone().requires_grad_() for p in (c, b, a)]}], lr=0.05,
                              backend=backend, **kwargs)
                resumed.load_state_dict(copy.deepcopy(opt.state_dict()))
                return resumed
            if interrupt in ("deepcopy", "pickle"):
                return copy.deepcopy(opt) if interrupt == "deepcopy" else pickle.loads(pickle.dumps(opt))
            return opt
        return between

    uninterrupted = _staggered_run(cls, kwargs, backend, edit(None))
    assert uninterrupted[0]["step"].tolist() == [1.0, 2.0, 3.0]
    _assert_same_run(uninterrupted, _staggered_run(cls, kwargs, backend, edit(how)))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls,kwargs", TENSOR_SCOPES, ids=[c.__name__ for c, _ in TENSOR_SCOPES])
def test_a_hand_edit_right_after_a_load_moves_the_loaded_scopes(cls, kwargs, backend):
    """NOTE [tensor scopes follow their tensors]: the loaded scopes are in param_groups' order, and a
    hand edit before the first step after load_state_dict moves them as any other. Before, the load
    left no record of that order: the edit went unseen and the tensors swapped their step counts."""
    def reverse(opt, params):
        opt.param_groups[0]["params"].reverse()
        return opt

    def load_then_reverse(opt, params):
        loaded = cls([{"params": params}], lr=0.05, backend=backend, **kwargs)
        loaded.load_state_dict(copy.deepcopy(opt.state_dict()))
        return reverse(loaded, params)

    uninterrupted = _staggered_run(cls, kwargs, backend, reverse)
    assert uninterrupted[0]["step"].tolist() == [2.0, 3.0]  # b listed first now: its one step and this one
    _assert_same_run(uninterrupted, _staggered_run(cls, kwargs, backend, load_then_reverse))


def _refused_step(opt):
    p = opt.param_groups[0]["params"][0]
    p.grad = torch.zeros(p.shape)
    p.grad.data = torch.zeros(2, 3)  # (.data: past autograd's own check) a gradient the backend refuses
    with pytest.raises((ValueError, RuntimeError), match=r"(tensor 0|grads\[0\]).*(shape|as many elements)"):
        opt.step()


@pytest.mark.parametrize("how", ["read", "deepcopy", "pickle", "refused-step"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls,kwargs", TENSOR_SCOPES, ids=[c.__name__ for c, _ in TENSOR_SCOPES])
def test_a_read_or_a_refused_step_between_steps_changes_nothing(cls, kwargs, backend, how):
    """A read of beta (law) or a copy between steps only looks, and a step the backend refuses changes
    nothing (NOTE [refused steps]): a tensor taken out and given back before the next step keeps its
    scope, read or not (the fit is the step's). Before, the read fitted the scopes to the tensor's
    absence, and so did the refused step, and the step after started it afresh. (state_dict() goes the
    same way, but torch.optim's refuses the state of a tensor that is not in param_groups: a KeyError.)"""
    read = {"read": lambda o: o.law if cls is amm_kernels.RLLC else o.beta,
            "deepcopy": copy.deepcopy, "pickle": pickle.dumps, "refused-step": _refused_step}[how]

    def out_and_back(reading):
        def between(opt, params):
            taken = opt.param_groups[0]["params"].pop(1)
            if reading:
                read(opt)
            opt.param_groups[0]["params"].append(taken)
            return opt
        return between

    unread = _staggered_run(cls, kwargs, backend, out_and_back(False))
    assert unread[0]["step"].tolist() == [3.0, 2.0]
    _assert_same_run(unread, _staggered_run(cls, kwargs, backend, out_and_back(True)))


def test_a_checkpoint_of_rows_alone_resumes_loss_mode_exactly():
    """NOTE [checkpoint carriers]: each row carries the previous loss too (delta_f="loss"): a checkpoint
    cut to "state" and "param_groups" (DCP's, ZeroRedundancyOptimizer's) resumes exactly."""
    def steps(opt, params, ts):
        for t in ts:
            set_grads(params, t)
            opt.step(lambda: torch.tensor(1.0 / (t + 1)))

    ref_params = model_params()
    ref = AMSGD(ref_params, delta_f="loss")
    steps(ref, ref_params, range(5))
    params = model_params()
    opt = AMSGD(params, delta_f="loss")
    steps(opt, params, range(3))
    sd = copy.deepcopy(opt.state_dict())
    resumed_params = [p.detach().clone().requires_grad_() for p in params]
    resumed = AMSGD(resumed_params, delta_f="loss")
    resumed.load_state_dict({"state": sd["state"], "param_groups": sd["param_groups"]})
    steps(resumed, resumed_params, range(3, 5))
    for a, b in zip(resumed_params, ref_params):
        assert torch.equal(a, b)
    for k, v in ref._scopes.to_dict().items():
        assert torch.equal(getattr(resumed._scopes, k), v), k


@pytest.mark.parametrize("cls", [AMSGD, amm_kernels.RLLC])
def test_adams_betas_and_eps_in_a_group_are_refused(cls):
    """NOTE [foreign group keys]: a param group written for Adam/AdamW (betas, eps, amsgrad, foreach) given
    to an optimizer without those arguments is refused, naming the key, not silently ignored."""
    for key, value in (("betas", (0.9, 0.99)), ("eps", 1e-6), ("amsgrad", True), ("foreach", False)):
        with pytest.raises(ValueError, match=f"{key} is not an {cls.__name__} argument .another optimizer's"):
            cls([{"params": model_params(), key: value}])


def test_auto_on_the_cpu_is_the_compiled_backend_before_the_reference():
    """available_backends lists the backends fastest first, and "auto" takes the first that runs the
    parameters: on the CPU the C++ ops ("cpu", where built) before the reference ("torch")."""
    names = amm_kernels.available_backends("cpu")
    assert "torch" in names
    if amm_kernels.backend_supports_dtype("cpu", torch.float32) and "cpu" in names:
        assert names.index("cpu") < names.index("torch")
        from amm_kernels import compiled_backend
        opt = AMSGD(model_params())
        assert opt._backend_module("auto", torch.device("cpu"), {torch.float32}) is compiled_backend


@pytest.mark.parametrize("cls", OPTIMIZERS)
@pytest.mark.parametrize("make", [
    lambda opt, **kw: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=10, **kw),
    lambda opt, **kw: torch.optim.lr_scheduler.CyclicLR(opt, base_lr=0.01, max_lr=0.1, step_size_up=2, **kw),
], ids=["OneCycleLR", "CyclicLR"])
def test_schedulers_that_cycle_momentum_need_it_off(cls, make):
    """README: OneCycleLR and CyclicLR need cycle_momentum=False (beta is computed every step: there is no
    momentum to cycle). With it on (their default) torch refuses the optimizer when the scheduler is made;
    with it off the lr follows the schedule torch.optim.SGD's takes."""
    p = torch.randn(3, requires_grad=True)
    opt = cls([p], lr=0.01)
    with pytest.raises(ValueError, match="cycle_momentum"):
        make(opt)
    ours = make(opt, cycle_momentum=False)
    theirs = make(torch.optim.SGD([torch.randn(3, requires_grad=True)], lr=0.01), cycle_momentum=False)
    for _ in range(6):
        p.grad = torch.randn(3)
        opt.step()
        ours.step(), theirs.optimizer.step(), theirs.step()
        assert opt.param_groups[0]["lr"] == theirs.optimizer.param_groups[0]["lr"]
    assert torch.isfinite(p).all()


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "torch"] + [_cuda_sim.NAME])
@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_a_float32_step_count_stops_at_2_to_the_24(backend, cls):
    """README: a scope's step count is float32 (as torch's capturable Adam's "step"): it counts exactly to
    2^24 and stays there, on every backend as on the reference, and the step goes on finite (the counts
    put 2 below it by hand)."""
    if backend == _cuda_sim.NAME:
        _cuda_sim.ensure()
    runs = []
    for b in ("torch", backend):
        params = model_params()
        opt = cls(params, lr=0.05, beta_scope="tensor", backend=b)
        take_steps(opt, params, [0])
        opt._scopes.step.fill_(2.0 ** 24 - 2)
        take_steps(opt, params, [1, 2, 3])
        steps = opt.state_dict()["amm"]["scopes"]["step"]
        assert steps.dtype == torch.float32 and steps.tolist() == [2.0 ** 24] * 4, (b, steps)
        assert all(torch.isfinite(p).all() for p in params)
        runs.append(params)
    rtol, atol = tolerance(torch.float32)
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # DCP in one process
def test_a_loss_mode_optimizer_takes_its_state_for_a_dcp_load_from_a_step_at_lr_0(tmp_path):
    """README (checkpoints): DCP gives a fresh optimizer its state by a step without a closure, which
    delta_f="loss" refuses; one step(closure) at lr=0 in every group first gives it its state and moves
    nothing, the load replaces what that step computed, and the run resumes exactly."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict,
                                                         set_optimizer_state_dict)

    flat = StateDictOptions(flatten_optimizer_state_dict=True)

    def build():
        model = torch.nn.ParameterList(model_params())
        return model, list(model), AMSGD([{"params": list(model)[:2]}, {"params": list(model)[2:], "lr": 0.02}],
                                         lr=0.05, delta_f="loss")

    def steps(opt, params, which):
        for t in which:
            set_grads(params, t)
            opt.step(lambda: torch.tensor(10.0 - t))

    _, params, straight = build()
    steps(straight, params, range(5))
    model, params, opt = build()
    steps(opt, params, range(3))
    dcp.save({"optim": get_optimizer_state_dict(model, opt, options=flat)}, checkpoint_id=tmp_path)

    new_model, new_params, resumed = build()
    with torch.no_grad():
        for a, b in zip(new_params, params):
            a.copy_(b)
    with pytest.raises(RuntimeError, match="closure"):
        get_optimizer_state_dict(new_model, resumed, options=flat)
    for p in new_params:
        p.grad = None  # (the refused step made no state)
    assert not any(resumed.state.values())
    lrs = [g["lr"] for g in resumed.param_groups]
    for g in resumed.param_groups:
        g["lr"] = 0.0
    set_grads(new_params, 0)
    resumed.step(lambda: torch.tensor(0.0))
    for g, lr in zip(resumed.param_groups, lrs):
        g["lr"] = lr
    assert all(torch.equal(a, b) for a, b in zip(new_params, params))  # it moved nothing
    resumed.zero_grad()
    template = {"optim": get_optimizer_state_dict(new_model, resumed, options=flat)}
    dcp.load(template, checkpoint_id=tmp_path)
    set_optimizer_state_dict(new_model, resumed, template["optim"], options=flat)
    steps(resumed, new_params, range(3, 5))
    for a, b in zip(new_params, [p for g in straight.param_groups for p in g["params"]]):
        assert torch.equal(a, b)



@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls", ALL_OPTIMIZERS)
@pytest.mark.parametrize("scope", ["global", "group"])
@pytest.mark.parametrize("left", ["a-key-of-the-users", "a-replaced-tensor"])
def test_a_shared_scope_restarts_where_no_tensor_of_it_has_moments_left(backend, cls, scope, left):
    """NOTE [a reset tensor restarts its scope] in a shared scope: what counts as state is a tensor's
    moments, among the tensors param_groups lists. After opt.state.clear() an entry that holds only a key
    of the user's, or the entry of a tensor replaced in param_groups by hand (torch.optim leaves it), keeps
    nothing of the scope's steps: the scope starts again (the run, and AMAdamW's warnings of late tensors, are
    a fresh optimizer's)."""
    import warnings

    key = "scope" if cls is amm_kernels.RLLC else "beta_scope"
    params = model_params()
    opt = cls([{"params": params[:2]}, {"params": params[2:], "lr": 0.02}], lr=0.05, backend=backend, **{key: scope})
    take_steps(opt, params, range(4))
    if left == "a-replaced-tensor":  # (its old entry stays in opt.state, keyed by the old tensor)
        params[0] = params[0].detach().clone().requires_grad_()
        opt.param_groups[0]["params"][0] = params[0]
        for p in params[1:]:
            del opt.state[p]
    else:
        opt.state.clear()
        opt.state[params[1]]["my_key"] = 1
    twin = [p.detach().clone().requires_grad_() for p in params]
    fresh = cls([{"params": twin[:2]}, {"params": twin[2:], "lr": 0.02}], lr=0.05, backend=backend, **{key: scope})
    said = []
    for o, ps in ((opt, params), (fresh, twin)):
        said.append([])
        for t in range(4, 7):
            set_grads(ps, t)
            if t == 4:
                ps[1].grad = None  # (the entry holding the user's key: no gradient at the restart)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                o.step()
            said[-1] += [(t, str(w.message)) for w in caught if "first gradient" in str(w.message)]
    assert said[0] == said[1]  # (tensor 1 joins the restarted scope a step late: at the same step in both)
    assert opt._scopes.step.tolist() == fresh._scopes.step.tolist() == [3.0] * (1 if scope == "global" else 2), \
        (opt._scopes.step, fresh._scopes.step)
    for a, b in zip(params, twin):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("cls", [AMSGD, AMAdamW, amm_kernels.RLLC])
def test_a_deleted_optimizer_is_freed_where_a_backend_cannot_load(monkeypatch, cls):
    """A backend whose loader raises (triton on a machine without a GPU, a build without _C) must not keep
    the optimizer that asked, its parameters or its caller's locals alive: the ImportError's traceback
    holds those frames, so only its message is kept (Backend.loaded)."""
    import gc
    import weakref

    from amm_kernels import backends

    monkeypatch.setattr(backends, "_BACKENDS", dict(backends._BACKENDS))
    monkeypatch.setattr(backends, "_LOADED", dict(backends._LOADED))

    def cannot_load():
        raise ImportError("this backend cannot load here")
    backends.register(backends.Backend("never", ("cpu",), (torch.float32,), cannot_load))

    def train():
        data = torch.zeros(10)  # a local of the user's function that built the optimizer
        params = [torch.nn.Parameter(torch.randn(4))]
        opt = cls(params, backend="auto")
        params[0].grad = torch.randn(4)
        opt.step()
        return weakref.ref(opt), weakref.ref(params[0]), weakref.ref(data)

    refs = train()
    gc.collect()
    assert [r() is None for r in refs] == [True, True, True]
    assert "cannot load here" in backends._BACKENDS["never"].unavailable_reason(torch.device("cpu"))
    with pytest.raises(ImportError, match="this backend cannot load here"):
        backends._BACKENDS["never"].module()

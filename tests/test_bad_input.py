"""Bad input for every optimizer (AMSGD, AMAdamW, RLLC): a clear error that names what is wrong, raised
before anything changes. Here: values that pass the constructor's type but not its range (inf, device
tensors, truthy non-bools), group values set by hand after construction, a loss of several elements,
and corrupted checkpoints; and errors part-way through a step, a load or a read (an out-of-memory error
injected at each torch call in turn), which leave the optimizer as it was. The constructor's plain range
errors are in test_optimizer_api.py and test_rllc.py."""
import contextlib
import copy
import inspect
import re
import subprocess
import sys
import textwrap

import _cuda_sim
import numpy as np
import pytest
import torch

import amm_kernels
from _helpers import (assert_same_state, check_exp_avg_sq_alone_is_cast, check_float64_grads_are_read_as_float32,
                      model_params, set_grads, snapshot, take_steps, tolerance)
from amm_kernels import RLLC, AMAdamW, AMSGD

BACKENDS = amm_kernels.available_backends("cpu") + [_cuda_sim.NAME]
OPTIMIZERS = [AMSGD, AMAdamW, RLLC]
INF = float("inf")


def backend_ready(backend):
    if backend == _cuda_sim.NAME:
        _cuda_sim.ensure()
    return backend


def full_snapshot(opt, params):
    """snapshot() and the param groups' hyperparameters (a refused load must not change them either)."""
    return snapshot(opt, params), [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]


def assert_unchanged(before, opt, params):
    state_before, groups_before = before
    assert_same_state(state_before, snapshot(opt, params))
    assert [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups] == groups_before


# --------------------------------------------------------------------------------------------------
# the constructor
NON_FINITE = [
    (AMSGD, dict(lr=INF), "lr must be in [0.0, inf)"),
    (AMSGD, dict(lam=INF), "lam must be in [0.0, inf)"),
    (AMSGD, dict(weight_decay=INF), "weight_decay must be in [0.0, inf)"),
    (AMSGD, dict(beta_max=-INF), "beta_max must be in [0.0, 1.0]"),
    (AMAdamW, dict(eps=INF), "eps must be in (0.0, inf)"),
    (AMAdamW, dict(lam=INF), "lam must be in [0.0, inf)"),
    (AMAdamW, dict(weight_decay=INF), "weight_decay must be in [0.0, inf)"),
    (AMAdamW, dict(lr=torch.tensor(INF)), "lr must be in [0.0, inf)"),
    (RLLC, dict(lr=INF), "lr must be in [0.0, inf)"),
    (RLLC, dict(law_lr=INF), "law_lr must be in [0.0, inf)"),
]


@pytest.mark.parametrize("cls,kwargs,message", NON_FINITE, ids=[f"{c.__name__}-{list(k)[0]}" for c, k, _ in NON_FINITE])
def test_infinite_hyperparameters_are_refused(cls, kwargs, message):
    with pytest.raises(ValueError) as err:
        cls(model_params(), **kwargs)
    assert message in str(err.value)


HUGE = 10**400  # a Python int beyond every float: float(HUGE) raises OverflowError
BEYOND_FLOATS = [
    (AMSGD, dict(lr=HUGE), "lr must be at most 3.4028234663852886e+38 in magnitude"),
    (AMSGD, dict(lr=-HUGE), "lr must be at most 3.4028234663852886e+38 in magnitude"),
    (AMAdamW, dict(weight_decay=HUGE), "weight_decay must be at most 3.4028234663852886e+38 in magnitude"),
    (RLLC, dict(law_lr=HUGE), "law_lr must be at most 3.4028234663852886e+38 in magnitude"),
    (RLLC, dict(memory=([[HUGE, 0], [0, 0]], [1, 1])), "memory U must be finite in float32"),
    (RLLC, dict(memory=([[0.5, 0], [0, 0]], [HUGE, 1])), "memory b must be finite in float32"),
]


@pytest.mark.parametrize("cls,kwargs,message", BEYOND_FLOATS, ids=[f"{c.__name__}-{i}" for i, (c, _, _) in enumerate(BEYOND_FLOATS)])
def test_an_int_beyond_every_float_is_a_value_error_naming_the_argument(cls, kwargs, message):
    # (not the OverflowError of float(10**400), which names nothing)
    with pytest.raises(ValueError, match=re.escape(message)):
        cls(model_params(), **kwargs)
    params = model_params()
    opt = cls(params)
    take_steps(opt, params, [0])
    set_grads(params, 1)
    before = full_snapshot(opt, params)
    opt.param_groups[0]["lr"] = HUGE  # set by hand: checked again at the step, before anything changes
    with pytest.raises(ValueError, match=re.escape("param_groups[0]['lr'] must be at most 3.4028234663852886e+38")):
        opt.step()
    opt.param_groups[0]["lr"] = before[1][0]["lr"]
    assert_unchanged(before, opt, params)


DEVICE_TENSORS = [
    (AMSGD, "lam"), (AMSGD, "beta_max"), (AMSGD, "beta_min"), (AMSGD, "weight_decay"),
    (AMAdamW, "eps"), (AMAdamW, "lam"), (AMAdamW, "weight_decay"),
]


@pytest.mark.parametrize("cls,name", DEVICE_TENSORS, ids=[f"{c.__name__}-{n}" for c, n in DEVICE_TENSORS])
def test_only_lr_may_be_a_device_tensor(cls, name):
    # A device tensor cannot be range-checked without a host sync: lr (capturable) is the one argument
    # that may be one. A meta tensor stands in for a GPU tensor here.
    with pytest.raises(ValueError, match=f"{name} must be a number .*only lr may be a device tensor"):
        cls(model_params(), **{name: torch.tensor(0.5, device="meta")})
    cls(model_params(), lr=torch.tensor(0.01, device="meta"))  # accepted, unchecked


@pytest.mark.parametrize("cls", [AMSGD, AMAdamW])
def test_cpu_tensor_hyperparameters_are_read_as_numbers(cls):
    opt = cls(model_params(), lam=torch.tensor(0.25), weight_decay=torch.tensor(0.01))
    assert opt._hyper.lam == 0.25 and type(opt._hyper.lam) is float
    with pytest.raises(ValueError, match="lam must be in"):
        cls(model_params(), lam=torch.tensor(-0.2))


def test_an_lr_tensor_that_requires_grad_is_read_without_a_warning():
    """A CPU lr tensor is read as a number at construction and at every step: one that requires grad (a
    learnt lr) is read through detach(), without torch's "Converting a tensor with requires_grad=True".
    In a fresh process: torch gives that warning once per process, so an earlier test could hide it."""
    code = textwrap.dedent("""\
        import warnings, torch
        from amm_kernels import AMSGD, AMAdamW, RLLC
        warnings.simplefilter("error")
        for cls in (AMSGD, AMAdamW, RLLC):
            params = [torch.nn.Parameter(torch.randn(3))]
            opt = cls(params, lr=torch.tensor(0.01, requires_grad=True), backend="torch")
            params[0].grad = torch.ones(3)
            opt.step()
        """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]


@pytest.mark.parametrize("cls", [AMSGD, AMAdamW, RLLC])
def test_a_process_group_must_be_one(cls):
    """Refused at construction, naming the argument (not an AttributeError from inside the first step)."""
    for bad in ("world", 0, object()):
        with pytest.raises(TypeError, match=f"{cls.__name__}: process_group must be a torch.distributed "
                                            f"ProcessGroup or None, got {type(bad).__name__}"):
            cls(model_params(), process_group=bad)


@pytest.mark.parametrize("cls,name", [(AMSGD, "adaptive"), (AMSGD, "maximize"), (AMAdamW, "adaptive"),
                                      (AMAdamW, "maximize"), (AMSGD, "capturable"), (RLLC, "capturable")])
def test_flags_must_be_bools(cls, name):
    with pytest.raises(ValueError, match=f"{name} must be True or False, got 'no'"):
        cls(model_params(), **{name: "no"})
    cls(model_params(), **{name: 0})  # 0 and 1 are accepted as False and True


# --------------------------------------------------------------------------------------------------
# the step
BAD_GROUP_VALUES = [("lr", -1.0), ("lr", float("nan")), ("lr", INF), ("lr", 1e39), ("lr", "0.1"), ("lr", None),
                    ("weight_decay", -0.5), ("weight_decay", float("nan")), ("weight_decay", 1e39)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls", OPTIMIZERS)
@pytest.mark.parametrize("key,value", BAD_GROUP_VALUES, ids=[f"{k}={v!r}" for k, v in BAD_GROUP_VALUES])
def test_a_bad_group_value_set_after_construction_fails_the_step_before_any_change(backend, cls, key, value):
    params = model_params()
    opt = cls([{"params": params[:2]}, {"params": params[2:]}], backend=backend_ready(backend))
    take_steps(opt, params, [0])
    set_grads(params, 1)
    before = snapshot(opt, params)
    opt.param_groups[1][key] = value  # by hand, or by a scheduler gone wrong
    message = rf"param_groups\[1\]\['{key}'\] must be"
    if cls is RLLC and key == "weight_decay":  # not an RLLC argument: any value but 0 is refused
        message = rf"param_groups\[1\] sets weight_decay={re.escape(repr(value))}, but RLLC has no weight decay"
    with pytest.raises(ValueError, match=message):
        opt.step()
    assert_same_state(before, snapshot(opt, params))


@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_a_hyperparameter_beyond_float32_is_refused_and_float32s_largest_taken(cls):
    """lr=1e39 is finite in Python but inf in the float32 the kernels compute in."""
    big, largest = 1e39, torch.finfo(torch.float32).max
    names = ["lr", "lam", "weight_decay"] if cls is AMSGD else ["lr", "lam", "weight_decay", "eps"] \
        if cls is AMAdamW else ["lr", "law_lr"]
    for name in names:
        with pytest.raises(ValueError, match=rf"{name} must be at most 3.4028234663852886e\+38 in magnitude"):
            cls(model_params(), **{name: big})
        cls(model_params(), **{name: largest})
    with pytest.raises(ValueError, match=r"lr must be at most"):
        cls(model_params(), lr=torch.tensor(big, dtype=torch.float64))
    if cls is RLLC:
        with pytest.raises(ValueError, match=r"law_init\[0\] must be a finite number, at most"):
            cls(model_params(), law_init=[big, 0.0])


@pytest.mark.parametrize("zero", [0, 0.0, np.float64(0.0), torch.tensor(0.0)], ids=["int", "float", "numpy", "tensor"])
def test_rllc_takes_a_weight_decay_of_zero_in_a_group_given_or_set_by_hand(zero):
    params = model_params()
    RLLC([{"params": params, "weight_decay": zero}])
    opt = RLLC(params)
    opt.param_groups[0]["weight_decay"] = zero  # a loop written for AdamW, setting no decay
    set_grads(params, 0)
    opt.step()
    with pytest.raises(ValueError, match=r"a param group sets weight_decay=0.1, but RLLC has no weight decay"):
        RLLC([{"params": params, "weight_decay": 0.1}])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss", [torch.ones(3), "1.0", None], ids=["3-elements", "a-string", "none"])
def test_loss_mode_refuses_anything_but_one_loss_before_any_change(backend, loss):
    params = model_params()
    opt = AMSGD(params, delta_f="loss", backend=backend_ready(backend))
    for seed in (0, 1):
        set_grads(params, seed)
        opt.step(lambda: torch.tensor(2.0 - seed))
    set_grads(params, 2)
    before = snapshot(opt, params)
    with pytest.raises(RuntimeError, match="delta_f='loss' needs"):
        opt.step(lambda: loss)
    assert_same_state(before, snapshot(opt, params))
    opt.step(lambda: torch.tensor([0.5]))  # one element, in any shape, is a loss


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss", [torch.tensor(True), torch.tensor(1.0 + 2.0j), torch.tensor(1.0, device="meta"), 10 ** 400],
                         ids=["bool", "complex", "meta", "int-beyond-float"])
def test_a_loss_that_cannot_be_used_is_refused_before_any_state_is_made(backend, loss):
    """A loss that passes for one number but cannot become the step's loss (a bool to negate under
    maximize, a complex or meta tensor, an int no float holds): refused before a tensor stepping for
    the first time gets state."""
    params = model_params()
    opt = AMSGD(params[:2], delta_f="loss", maximize=True, backend=backend_ready(backend))
    set_grads(params, 0)
    opt.step(lambda: torch.tensor(2.0))
    newcomer = torch.randn(3, requires_grad=True)
    opt.add_param_group({"params": [newcomer]})
    newcomer.grad = torch.randn(3)
    set_grads(params, 1)
    before = snapshot(opt, params[:2])
    with pytest.raises((RuntimeError, OverflowError), match="delta_f='loss' needs the closure to return one loss|int too large"):
        opt.step(lambda: loss)
    assert_same_state(before, snapshot(opt, params[:2]))
    assert newcomer not in opt.state


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_a_complex_gradient_of_a_real_parameter_is_refused(backend, cls):
    """torch.optim's SGD refuses it; reading its real part alone would be silently wrong. Each backend
    checks it where it converts a gradient of another dtype (no cost on the usual step)."""
    params = model_params()
    opt = cls(params, backend=backend_ready(backend))
    take_steps(opt, params, [0])
    set_grads(params, 1)
    params[1].grad.data = torch.randn(7, dtype=torch.complex64)
    before = full_snapshot(opt, params)
    with pytest.raises((TypeError, RuntimeError), match=r"tensor 1.*gradients must be real, got (torch.complex64|ComplexFloat)"):
        opt.step()
    assert_unchanged(before, opt, params)


@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_an_expanded_parameter_is_refused_when_given(cls):
    """NOTE [aliased parameters]: expand()'s elements share memory; no in-place update can write them, and a
    fused step would fail after updating the other tensors."""
    wide = torch.randn(4, 1).expand(4, 3).requires_grad_()
    with pytest.raises(ValueError, match=r"parameter 1 .*shape \(4, 3\), strides \(1, 0\)\) repeats elements"):
        cls([torch.randn(2, requires_grad=True), wide])
    params = model_params()
    opt = cls(params)
    with pytest.raises(ValueError, match=r"parameter 4 .*repeats elements"):
        opt.add_param_group({"params": [wide]})
    assert len(opt.param_groups) == 1
    # (a stride of 0 over a size-1 dimension repeats nothing: test_a_zero_stride_over_a_size_1_dimension_is_no_repeat)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_a_gradient_cut_short_in_place_is_refused(backend, cls):
    """A gradient made shorter at its own address (p.grad.data = p.grad.data[:2], gradients kept across
    steps) is refused before anything changes (triton's case, whose tables are cached by address:
    test_triton_backend.py)."""
    params = model_params()
    opt = cls(params, backend=backend_ready(backend))
    set_grads(params, 0)
    opt.step()
    opt.step()  # the same gradients, at the same addresses: the cached table
    params[0].grad.data = params[0].grad.data[:2]
    before = full_snapshot(opt, params)
    with pytest.raises((ValueError, RuntimeError), match=r"(tensor 0|grads\[0\]).*shape (\(2, 3\)|\[2, 3\])"):
        opt.step()
    assert_unchanged(before, opt, params)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_a_refused_step_adds_no_stand_ins_to_state_made_by_hand(backend, cls):
    """NOTE [refused steps]: state put in place by hand (no stand-ins) keeps its keys when the step fails."""
    params = model_params()
    opt = cls(params, backend=backend_ready(backend))
    take_steps(opt, params, [0])
    hand_made = {key: t.clone() for key, t in opt.state[params[0]].items() if not key.startswith("amm_")}
    opt.state[params[0]] = dict(hand_made)
    set_grads(params, 1)
    params[1].grad.data = torch.randn(2, 3)  # refused by every backend
    with pytest.raises((ValueError, RuntimeError), match=r"(tensor 1|grads\[1\]).*(gradient has shape \(2, 3\)|shape \[2, 3\])"):
        opt.step()
    assert set(opt.state[params[0]]) == set(hand_made)


@pytest.mark.parametrize("cls", OPTIMIZERS)
@pytest.mark.parametrize("lr,message", [
    (torch.tensor(-1.0), r"param_groups\[0\]\['lr'\] must be in \[0.0, inf\), got -1.0"),
    (torch.tensor(float("nan")), r"param_groups\[0\]\['lr'\] must be in \[0.0, inf\), got nan"),
    (torch.tensor([0.1, 0.2]), r"param_groups\[0\]\['lr'\] must be a number or a 1-element tensor, got shape \(2,\)"),
    (torch.tensor(0.1 + 0j), r"param_groups\[0\]\['lr'\] must be a real number, got a torch.complex64 tensor"),
    (None, r"param_groups\[0\] has no 'lr'"),
], ids=["negative-cpu-tensor", "nan-cpu-tensor", "2-elements", "complex", "removed"])
def test_an_lr_tensor_set_in_a_group_later_is_checked_at_the_step(cls, lr, message):
    """A CPU tensor is read at the step (no device to wait for), as the constructor reads it; any tensor's
    shape and dtype are checked; a removed lr is named. Nothing changes."""
    params = model_params()
    opt = cls(params)
    take_steps(opt, params, [0])
    set_grads(params, 1)
    before = full_snapshot(opt, params)
    if lr is None:
        del opt.param_groups[0]["lr"]
    else:
        opt.param_groups[0]["lr"] = lr
    with pytest.raises(ValueError, match=message):
        opt.step()
    opt.param_groups[0]["lr"] = before[1][0]["lr"]
    assert_unchanged(before, opt, params)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls", OPTIMIZERS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_float64_gradients_are_read_as_float32(backend, cls, dtype):
    check_float64_grads_are_read_as_float32(lambda params: cls(params, backend=backend_ready(backend)), dtype)


# --------------------------------------------------------------------------------------------------
# load_state_dict
CORRUPTIONS = {
    "scopes-field-missing": (lambda sd: sd["amm"]["scopes"].pop("step"), "no floating-point tensor 'step'"),
    "scopes-missing": (lambda sd: sd["amm"].pop("scopes"), "has no 'scopes'"),
    "scope-tensor-too-long": (lambda sd: sd["amm"]["scopes"].update(step=torch.zeros(9)),
                              r"scope state 'step' has shape \(9,\)"),
    "scope-tensor-integer": (lambda sd: sd["amm"]["scopes"].update(step=sd["amm"]["scopes"]["step"].long()),
                             "no floating-point tensor 'step'"),
    "param-state-key-missing": (lambda sd: sd["state"][0].update(renamed=sd["state"][0].pop(next(iter(sd["state"][0])))),
                                "the state of parameter 0 has no tensor"),  # ({} is no state yet: it loads)
    "param-state-wrong-shape": (lambda sd: sd["state"][0].update({k: v.reshape(-1) for k, v in sd["state"][0].items()}),
                                "of parameter 0 has shape"),
    "param-state-unknown-id": (lambda sd: sd["state"].update({99: sd["state"][0]}), "parameter 99, which no param group"),
    "group-lr-negative": (lambda sd: sd["param_groups"][1].update(lr=-5.0), r"param_groups\[1\]\['lr'\] must be in"),
    "group-lr-missing": (lambda sd: sd["param_groups"][0].pop("lr"), r"param_groups\[0\] has no 'lr'"),
    "group-too-small": (lambda sd: sd["param_groups"][1]["params"].pop(), r"param_groups\[1\] has 1 parameters"),
    "groups-missing": (lambda sd: sd["param_groups"].pop(), "has 1 param groups, this optimizer has 2"),
    # tensors without values, or sparse: refused before torch.optim replaces state and groups
    "scope-tensor-meta": (lambda sd: sd["amm"]["scopes"].update(step=sd["amm"]["scopes"]["step"].to("meta")),
                          "no floating-point tensor 'step' .dense, with values"),
    "scope-tensor-sparse": (lambda sd: sd["amm"]["scopes"].update(step=sd["amm"]["scopes"]["step"].to_sparse()),
                            "no floating-point tensor 'step' .dense, with values"),
    "row-meta": (lambda sd: sd["state"][0].update(amm_scope=sd["state"][0]["amm_scope"].to("meta")),
                 r"parameter 0 .*carries its scope's values .*meta.*dense floating-point"),
    "row-sparse": (lambda sd: sd["state"][0].update(amm_scope=sd["state"][0]["amm_scope"].to_sparse()),
                   r"parameter 0 .*carries its scope's values .*sparse.*dense floating-point"),
    "param-state-sparse": (lambda sd: sd["state"][0].update({k: v.to_sparse() for k, v in sd["state"][0].items()
                                                             if not k.startswith("amm_")}),
                           r"of parameter 0 is a torch.sparse_coo .*dense real tensor"),
}


@pytest.mark.parametrize("cls", OPTIMIZERS)
@pytest.mark.parametrize("scope", ["global", "tensor"])
@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_a_corrupted_checkpoint_is_refused_and_changes_nothing(cls, scope, corruption):
    corrupt, message = CORRUPTIONS[corruption]
    scope_arg = {"scope" if cls is RLLC else "beta_scope": scope}

    def build(params, lr):
        return cls([{"params": params[:2], "lr": lr}, {"params": params[2:], "lr": lr}], **scope_arg)

    src_params = model_params(seed=1)
    src = build(src_params, 0.1)
    take_steps(src, src_params, [0, 1])
    checkpoint = copy.deepcopy(src.state_dict())
    corrupt(checkpoint)

    params = model_params(seed=2)
    opt = build(params, 0.5)
    take_steps(opt, params, [5, 6, 7])
    before = full_snapshot(opt, params)
    with pytest.raises(ValueError, match=message):
        opt.load_state_dict(checkpoint)
    assert_unchanged(before, opt, params)
    opt.load_state_dict(src.state_dict())  # the intact checkpoint still loads


@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_a_checkpoint_before_any_step_loads(cls):
    # scopes None and no parameter state: nothing to check against, and nothing refused
    saved = cls(model_params()).state_dict()
    params = model_params()
    opt = cls(params)
    take_steps(opt, params, [0])
    opt.load_state_dict(saved)
    assert len(opt.state) == 0


# --------------------------------------------------------------------------------------------------
# state that no longer fits its parameter (NOTE [state fits] in _step.py)
def _resize_parameter_1(params):
    params[1].data = torch.cat([params[1].data, torch.randn(5)])  # an embedding extended in place
    set_grads(params, 2)


def _misshape_gradient_0(params):
    set_grads(params, 2)
    params[0].grad.data = torch.randn(2, 3)  # .data bypasses autograd's own shape check


def _transpose_gradient_0(params):
    set_grads(params, 2)
    params[0].grad.data = params[0].grad.data.t().contiguous()  # (3, 4): as many elements, another shape


# the reference and triton: check_fits (_step.py); "cpu" and the CUDA glue: their own C++ checks
MISFITS = {
    "parameter-resized": (_resize_parameter_1, r"(tensor 1|momentum\[1\]|memory\[1\]).*(shape|elements)"),
    "gradient-misshaped": (_misshape_gradient_0,
                           r"(tensor 0|grads\[0\]).*(gradient has shape \(2, 3\)|shape \[2, 3\]|as many elements)"),
    # every backend refuses it as the reference does, not only a gradient with another element count
    "gradient-transposed": (_transpose_gradient_0, r"(tensor 0|grads\[0\]).*(gradient has shape \(3, 4\)|shape \[3, 4\])"),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls", OPTIMIZERS)
@pytest.mark.parametrize("misfit", list(MISFITS))
def test_a_state_or_gradient_that_does_not_fit_fails_the_step_before_any_change(backend, cls, misfit):
    """NOTE [state fits]: a parameter resized after its steps no longer fits its state; a gradient set
    through .grad.data may not fit its parameter. Every backend refuses before anything changes
    (triton's kernels would read and write past the ends, the reference would update some tensors first)."""
    make_misfit, message = MISFITS[misfit]
    params = model_params()
    opt = cls(params, lr=0.1, backend=backend_ready(backend))
    take_steps(opt, params, [0, 1])
    newcomer = torch.randn(3, requires_grad=True)  # its first step is the refused one: no state after it
    opt.add_param_group({"params": [newcomer]})
    make_misfit(params)
    newcomer.grad = torch.randn(3)
    before = full_snapshot(opt, params)
    with pytest.raises((ValueError, RuntimeError), match=message):
        opt.step()
    assert_unchanged(before, opt, params)  # NOTE [refused steps]
    assert newcomer not in opt.state


def _expand_parameter_1(opt, params):
    params[1].data = torch.randn(1).expand(7)  # a stride of 0: refused at construction, made so later
    set_grads(params, 2)


def _expand_state_1(opt, params):
    set_grads(params, 2)
    state = opt.state[params[1]]
    name = type(opt).STATE_NAMES[-1]
    state[name] = torch.zeros(1, dtype=state[name].dtype).expand(state[name].shape)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls", OPTIMIZERS)
@pytest.mark.parametrize("make", [_expand_parameter_1, _expand_state_1], ids=["parameter", "state"])
def test_a_tensor_made_by_expand_after_construction_fails_the_step_before_any_change(backend, cls, make):
    """NOTE [aliased parameters]: a parameter whose elements share memory is refused at construction; one
    made so later (p.data = t.expand(...)), or such a state tensor, is refused by every backend before
    anything is written (the copy back of its working copy would fail after tensor 0 was updated)."""
    params = model_params()
    opt = cls(params, lr=0.1, backend=backend_ready(backend))
    take_steps(opt, params, [0, 1])
    make(opt, params)
    before = full_snapshot(opt, params)
    with pytest.raises((ValueError, RuntimeError), match=r"tensor 1.*repeats elements in memory \(made by expand"):
        opt.step()
    assert_unchanged(before, opt, params)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls", OPTIMIZERS)
@pytest.mark.parametrize("old,new", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32)], ids=str)
def test_state_follows_the_parameters_dtype_after_model_to(backend, cls, old, new):
    """model.to(dtype) after some steps: the state is cast to the parameters' dtype (SPEC.md section 5)
    on every backend, so each continues as the reference does."""
    def run(b):
        params = model_params(dtype=old)
        opt = cls(params, lr=0.05, backend=backend_ready(b))
        take_steps(opt, params, [0, 1])
        for p in params:
            p.data = p.data.to(new)
        take_steps(opt, params, [2, 3])
        assert all(t.dtype == new for st in opt.state.values() for t in st.values())
        return [p.detach().float() for p in params]

    rtol, atol = tolerance(new)  # (both runs round to bfloat16 alike; what differs is the float32 arithmetic)
    for a, b in zip(run(backend), run("torch")):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


def test_a_hand_set_device_or_negative_weight_decay_tensor_fails_the_step():
    """Only lr may be a tensor the step does not read back: any other tensor is checked at every step."""
    params = model_params()
    opt = AMAdamW(params)
    take_steps(opt, params, [0])
    set_grads(params, 1)
    before = full_snapshot(opt, params)
    opt.param_groups[0]["weight_decay"] = torch.tensor(-1.0)
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['weight_decay'\] must be in \[0.0, inf\)"):
        opt.step()
    opt.param_groups[0]["weight_decay"] = torch.tensor(1e-2, device="meta")
    with pytest.raises(ValueError, match="only lr may be a device tensor"):
        opt.step()
    opt.param_groups[0]["weight_decay"] = 1e-2
    assert_unchanged(before, opt, params)


# --------------------------------------------------------------------------------------------------
# optimizer-wide arguments repeated in a param group (NOTE [wide keys in groups] in _base.py)
WIDE = [(AMSGD, "lam", 0.1, 0.2), (AMSGD, "beta_max", 0.9, 0.8), (AMAdamW, "betas", (0.9, 0.999), (0.95, 0.999)),
        (AMAdamW, "eps", 1e-8, 1e-6), (RLLC, "law_lr", 0.01, 0.02), (RLLC, "memory", "M(0.9)+M(0)", "M(0.9)+M(0.5)")]


@pytest.mark.parametrize("cls,key,same,other", WIDE, ids=[f"{c.__name__}-{k}" for c, k, _, _ in WIDE])
def test_a_group_may_repeat_an_optimizer_wide_argument_only_with_its_value(cls, key, same, other):
    """As torch's ZeroRedundancyOptimizer hands them: the same value is accepted; another is refused
    when the group is given, when it is set by hand before a step, and in a checkpoint."""
    params = model_params()
    opt = cls([{"params": params[:2], key: same}, {"params": params[2:]}], lr=0.1)
    take_steps(opt, params, [0])
    with pytest.raises(ValueError, match=f"sets {key}=.* but {key} is optimizer-wide"):
        opt.add_param_group({"params": [torch.zeros(2, requires_grad=True)], key: other})
    saved = copy.deepcopy(opt.state_dict())
    set_grads(params, 1)
    before = full_snapshot(opt, params)
    opt.param_groups[0][key] = other  # by hand, or a OneCycleLR cycling betas
    with pytest.raises(ValueError, match=rf"param_groups\[0\] sets {key}=.* but {key} is optimizer-wide"):
        opt.step()
    opt.param_groups[0][key] = same
    assert_unchanged(before, opt, params)
    saved["param_groups"][1][key] = other
    with pytest.raises(ValueError, match=rf"param_groups\[1\] sets {key}="):
        opt.load_state_dict(saved)
    assert_unchanged(before, opt, params)
    opt.param_groups[0]["initial_lr"] = 0.1  # a scheduler's own key is not an argument: it passes
    opt.step()


@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_complex_and_repeated_parameters_are_refused_at_construction(cls):
    z = torch.zeros(3, dtype=torch.complex64, requires_grad=True)
    p = torch.zeros(3, requires_grad=True)
    for complex_params, repeated in (([z], [p, p]), ([("z", z)], [("p", p), ("q", p)])):  # named too
        with pytest.raises(TypeError, match="complex parameters are not supported"):
            cls(complex_params)
        with pytest.raises(ValueError, match="lists the same parameter twice"):
            cls(repeated)


def _aliasing_cases():
    """(description, two parameters, whether they are refused as sharing memory)."""
    P = torch.nn.Parameter
    flat = torch.randn(12)
    grid = flat.view(4, 3)
    return [
        ("one tensor, two Parameters", P(flat), P(flat), True),
        ("overlapping slices", P(flat[:5]), P(flat[4:]), True),
        ("a row block and a flat slice into it", P(grid[1:3]), P(flat[8:10]), True),
        ("a transpose of the same memory", P(grid), P(grid.t()), True),
        ("disjoint slices of one buffer", P(flat[:6]), P(flat[6:]), False),
        ("interleaved columns", P(grid[:, 0]), P(grid[:, 2]), False),
        # NOTE [aliased parameters]: a view with gaps is not examined, as torch's overlap check gives up
        ("a column and a row crossing it (not examined)", P(grid[:, 1]), P(grid[2]), False),
        ("separate tensors", P(torch.randn(3)), P(torch.randn(3)), False),
    ]


@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_parameters_that_share_memory_are_refused_in_one_group_across_groups_and_when_added(cls):
    for desc, a, b, shared in _aliasing_cases():
        for make in (lambda: cls([a, b]), lambda: cls([{"params": [a]}, {"params": [b], "lr": 0.5}])):
            if shared:
                with pytest.raises(ValueError, match=r"parameters 0 and 1 .* share memory"):
                    make()
            else:
                make()  # disjoint elements of one storage are fine
        opt = cls([a])
        if shared:
            with pytest.raises(ValueError, match=r"parameters 0 and 1 .* share memory"):
                opt.add_param_group({"params": [b]})
            assert len(opt.param_groups) == 1, desc  # refused before the group was added
        else:
            opt.add_param_group({"params": [b]})
            assert len(opt.param_groups) == 2, desc


@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_parameters_without_an_address_pass_the_shared_memory_check(cls):
    """Fake (FakeTensorMode, as memory estimators build optimizers: every address 0), lazy and meta
    parameters, and tensor subclasses without storage, are passed over, as before the check existed."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        cls(torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2)).parameters())
    cls(torch.nn.LazyLinear(3).parameters())
    cls(torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2)).to("meta").parameters())
    try:
        from torch.testing._internal.two_tensor import TwoTensor
    except ImportError:
        return
    cls([torch.nn.Parameter(TwoTensor(torch.randn(3), torch.randn(3))) for _ in range(2)])


REPEATS = [(AMSGD, dict(adaptive=1)), (AMSGD, dict(lam=torch.tensor(0.1))), (AMAdamW, dict(eps=torch.tensor(1e-8))),
           (AMAdamW, dict(betas=[0.9, torch.tensor(0.999)])), (RLLC, dict(law_init=torch.tensor([1.0, 0.0]))),
           (AMSGD, dict(maximize=np.False_)), (AMAdamW, dict(lam=np.float32(0.25))),
           (RLLC, dict(law_init=np.array([1.0, 0.0])))]


@pytest.mark.parametrize("cls,kwargs", REPEATS, ids=[f"{c.__name__}-{list(k)[0]}" for c, k in REPEATS])
def test_a_group_may_repeat_an_argument_in_any_form_the_constructor_takes(cls, kwargs):
    """ZeRO copies the very objects given to the constructor (1 for True, a CPU tensor for a number)
    into every group: the same values, read as the constructor reads them."""
    params = model_params()
    opt = cls([{"params": params, **kwargs}], **kwargs)
    take_steps(opt, params, [0, 1])


def test_a_groups_capturable_other_than_the_optimizers_is_refused():
    with pytest.raises(ValueError, match="sets capturable=True, but capturable is optimizer-wide"):
        AMSGD([{"params": model_params(), "capturable": True}])


@pytest.mark.parametrize("backend", amm_kernels.available_backends("cpu"))
@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_a_refused_step_after_model_to_leaves_the_state_in_its_dtype(backend, cls):
    """NOTE [refused steps]: the step after model.to(dtype) casts the state to the parameters' new dtype
    before the backend runs; when the backend refuses that step (here a resized parameter), the cast is
    taken back: the state is left in its dtype, with its values."""
    params = model_params()
    opt = cls(params, lr=0.1, backend=backend_ready(backend))
    take_steps(opt, params, [0, 1])
    params[0].data = params[0].data.to(torch.bfloat16)  # its state is cast at the next step,
    _resize_parameter_1(params)  # which is refused
    before = [{k: v.clone() for k, v in opt.state[p].items()} for p in params]
    with pytest.raises((ValueError, RuntimeError), match=MISFITS["parameter-resized"][1]):
        opt.step()
    for p, st in zip(params, before):
        assert set(opt.state[p]) == set(st)
        for key, t in st.items():
            assert opt.state[p][key].dtype == t.dtype, key
            assert torch.equal(opt.state[p][key], t), key


@pytest.mark.parametrize("backend", ["auto", "torch"])  # (float64: the reference's; auto goes there)
@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_a_refused_step_after_model_to_leaves_the_scope_state_as_it_was(backend, cls):
    """NOTE [refused steps]: the scope state (step counts, beta or law, beta_prod, prev_lr, prev_loss) is
    float64 for float64 parameters; the step after model.to(float16) moves it to float32, rounding it.
    When the backend refuses that step, the move is taken back: the run going on in float64 is the one
    without the refused call, to the bit. Before, the scope state stayed rounded to float32."""
    def run(refuse):
        params = model_params(dtype=torch.float64)
        opt = cls(params, lr=0.1, backend=backend)
        take_steps(opt, params, [0, 1])
        if refuse:
            before, kept = snapshot(opt, params), [p.detach().clone() for p in params]
            for p in params:
                p.data = p.data.to(torch.float16)
            _misshape_gradient_0(params)
            with pytest.raises((ValueError, RuntimeError), match=MISFITS["gradient-misshaped"][1]):
                opt.step()
            for p, x in zip(params, kept):
                p.data = x
            after = opt.state_dict()["amm"]["scopes"]
            assert {k: t.dtype for k, t in after.items()} == {k: torch.float64 for k in after}
            assert_same_state(before, snapshot(opt, params))
        take_steps(opt, params, [2, 3])
        return snapshot(opt, params)

    assert_same_state(run(refuse=True), run(refuse=False))


@pytest.mark.parametrize("backend", BACKENDS)  # (triton: test_triton_backend.py)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float64], ids=str)
def test_exp_avg_sq_alone_in_another_dtype_is_cast_at_the_next_step(backend, dtype):
    check_exp_avg_sq_alone_is_cast(lambda ps: AMAdamW(ps, lr=0.05, weight_decay=0.01, backend=backend_ready(backend)),
                                   dtype)


class _FailingCall(torch.overrides.TorchFunctionMode):
    """Raises torch.OutOfMemoryError at the n-th torch call made under it (n = 0: never); records the
    calls it sees."""

    def __init__(self, n):
        super().__init__()
        self.n, self.calls = n, []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls.append(func)
        if len(self.calls) == self.n:
            raise torch.OutOfMemoryError(f"injected at torch call {self.n} ({getattr(func, '__name__', func)})")
        return func(*args, **(kwargs or {}))


# (backend, case): on the fused backends the step writes only inside one op (the extension's, the
# simulator's), and every torch call before it may fail and leave the optimizer as it was; the reference
# writes with many torch calls: for it, the calls of _build_batch, which makes the state before the update's
# first write. The cases differ only in _build_batch: the simulator (CUDA's glue, slow) runs one.
FAILING_CASES = ["first-state", "model-to", "rows-by-hand", "new-group", "reset", "groups-reordered"]
FAILING_STEPS = [(b, c) for b in ["torch", "cpu"] for c in FAILING_CASES] + [(_cuda_sim.NAME, "first-state")]


def _objects(opt, params):
    """What an optimizer holds, to see that a failure left it as it was: the parameters' values, each state
    entry (its tensors and their values; None where the parameter has none), the state mapping, the scope
    state (its fields and their values) and the orders the tensor scopes and the group rows follow."""
    state = [dict(opt.state[p]) if p in opt.state else None for p in params]
    fields = None if opt._scopes is None else dict(vars(opt._scopes))
    return dict(params=[p.detach().clone() for p in params], state=state, mapping=opt.state,
                values=[None if st is None else {k: t.clone() for k, t in st.items()} for st in state],
                scopes=opt._scopes, fields=fields,
                field_values=None if fields is None else {k: t.clone() for k, t in fields.items()},
                layout=list(opt._layout), group_layout=list(opt._group_layout))


def _assert_same_objects(before, opt, params, n):
    """The same objects as _objects saw, with the same values (n: the failed call, for the message)."""
    assert all(torch.equal(p, x) for p, x in zip(params, before["params"])), n
    assert opt.state is before["mapping"], n
    for p, st, vals in zip(params, before["state"], before["values"]):
        if st is None:
            assert p not in opt.state or not opt.state[p], (n, "state made")
            continue
        assert opt.state[p].keys() == st.keys(), n
        assert all(opt.state[p][k] is t and torch.equal(t, vals[k]) for k, t in st.items()), n
    assert opt._scopes is before["scopes"], n
    if before["fields"] is not None:
        assert vars(opt._scopes).keys() == before["fields"].keys(), n
        assert all(getattr(opt._scopes, k) is t and torch.equal(t, before["field_values"][k])
                   for k, t in before["fields"].items()), n
    for name in ("layout", "group_layout"):
        now = getattr(opt, "_" + name)
        assert len(now) == len(before[name]) and all(a is b for a, b in zip(now, before[name])), (n, name)


def _before_a_step_that_makes_state(cls, case, backend):
    """An optimizer and its parameters, their gradients set for a step that changes the state before the
    backend runs: "first-state" makes the state of tensors 2 and 3 (frozen until then); "model-to" moves
    the scope state and casts the state (the parameters now float64, or bfloat16 on a fused backend, which
    takes no float64); "rows-by-hand" moves checkpoint rows put in place by hand (as
    ZeroRedundancyOptimizer does) into the scope state; "new-group" refits the tensor scopes to a param
    group added since the last step and makes its state; "reset" makes the state of tensor 1 again (deleted
    by hand) and restarts its tensor scope (NOTE [a reset tensor restarts its scope]); "groups-reordered"
    moves the group scopes' rows and prev_lr to the groups' new places (reversed by hand)."""
    key = "scope" if cls is RLLC else "beta_scope"
    params = model_params()
    if case == "groups-reordered":
        opt = cls([{"params": params[:2], "lr": 0.05}, {"params": params[2:], "lr": 0.02}], backend=backend,
                  **{key: "group"})
        take_steps(opt, params, [0, 1])
        opt.param_groups.reverse()
    elif case == "reset":
        opt = cls(params, lr=0.05, backend=backend, **{key: "tensor"})
        take_steps(opt, params, [0, 1])
        del opt.state[params[1]]
    elif case == "new-group":
        opt = cls(params[:2], lr=0.05, backend=backend, **{key: "tensor"})
        take_steps(opt, params[:2], [0, 1])
        opt.add_param_group(dict(params=params[2:]))
    elif case == "rows-by-hand":
        first = cls(params, lr=0.05, **{key: "tensor"})
        take_steps(first, params, [0, 1])
        saved = copy.deepcopy(first.state_dict())
        params = [p.detach().clone().requires_grad_() for p in params]
        opt = cls(params, lr=0.05, backend=backend, **{key: "tensor"})
        for i, p in enumerate(params):
            opt.state[p] = copy.deepcopy(saved["state"][i])
    else:
        opt = cls(params, lr=0.05, backend=backend)
        for t in [0, 1]:
            set_grads(params, t)
            if case == "first-state":
                params[2].grad = params[3].grad = None
            opt.step()
        if case == "model-to":
            for p in params:
                p.data = p.data.to(torch.float64 if backend == "torch" else torch.bfloat16)
    set_grads(params, 2)
    return opt, params


def _failing_step(opt, n, backend):
    """opt.step() under _FailingCall(n): the whole step on a fused backend, _build_batch on the reference
    (FAILING_STEPS). Returns the mode."""
    mode = _FailingCall(n)
    if backend == "torch":
        def build_batch(loss):
            with mode:
                return type(opt)._build_batch(opt, loss)

        opt._build_batch = build_batch
    try:
        with contextlib.nullcontext() if backend == "torch" else mode:
            opt.step()
    finally:
        opt.__dict__.pop("_build_batch", None)
    return mode


@pytest.mark.filterwarnings("ignore:AMAdamW.*first gradient")  # first-state: tensors 2 and 3 join late
@pytest.mark.parametrize("backend,case", FAILING_STEPS)
@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_a_step_that_fails_before_the_backend_writes_leaves_the_optimizer_as_it_was(cls, backend, case):
    """NOTE [refused steps]: before the backend writes, a step makes the state of tensors stepping for the
    first time, casts state to new parameter dtypes, moves checkpoint rows and refits the scope state. An
    error anywhere before the write (out of memory, an interrupt) leaves the optimizer as it was: every
    torch call the step makes before that is made to fail in turn (up to the backend's op, itself included,
    on the fused backends), and after each failure the parameters are as they were, every state entry
    holds the same tensors with the same values (tensors without state before have none), the scope
    state is the same object with the same tensors and values, and going on (the same step again, then one
    more) gives the run without the failure, to the bit. Before, only the scope state was put back, and not
    where its move failed: a failure after the first tensor's state was made left that state, half of a
    cast, or rows moved."""
    backend_ready(backend)
    opt, params = _before_a_step_that_makes_state(cls, case, backend)
    calls = _failing_step(opt, 0, backend).calls
    take_steps(opt, params, [3])
    expected = snapshot(opt, params)
    if backend == "torch":
        last = len(calls)
    else:  # the backend's op: it writes, after every check (NOTE [state fits] in _step.py)
        last = max(i for i, f in enumerate(calls, 1) if getattr(f, "_qualified_op_name", "").endswith(cls.STEP_OP))
    assert last > 20, last  # (the mode saw the step's calls)
    for n in range(1, last + 1):
        opt, params = _before_a_step_that_makes_state(cls, case, backend)
        before = _objects(opt, params)
        with pytest.raises(torch.OutOfMemoryError, match=f"injected at torch call {n} "):
            _failing_step(opt, n, backend)
        _assert_same_objects(before, opt, params, n)
        take_steps(opt, params, [2, 3])
        assert_same_state(snapshot(opt, params), expected)


@pytest.mark.parametrize("case", ["plain", "state-dtype", "rows"])
@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_a_load_that_fails_part_way_changes_nothing(cls, case):
    """NOTE [a load that fails part-way]: torch.optim's load_state_dict puts the new state and param
    groups in place and then runs the post-hooks, where this optimizer makes the scope state from the
    checkpoint, adds the stand-ins and, under state_dtype, takes the float32 state again ("state-dtype";
    "rows": a checkpoint without the "amm" entry, as ZeroRedundancyOptimizer's, its scope values carried by
    each tensor's state). Every torch call of the load is made to fail in turn: after each failure the
    optimizer is as it was (its state dict, scope state and group hyperparameters; the same state objects),
    and a load then, and a step, give the run without the failure, to the bit. (A failure inside the
    prefill of the backend cache, which skips what it cannot do, is no failure: that load must be whole.)
    Before, a failure in the post-hook left the loaded state beside the old scope state."""
    key = "scope" if cls is RLLC else "beta_scope"
    kwargs = dict(lr=0.05, **{key: "tensor"})
    dtype = torch.bfloat16 if case == "state-dtype" else None
    if case == "state-dtype":
        kwargs["state_dtype"] = torch.float32

    def build(steps):
        params = model_params(dtype=dtype)
        opt = cls([dict(params=params[:2]), dict(params=params[2:], lr=0.02)], **kwargs)
        take_steps(opt, params, steps)
        return opt, params

    saved = copy.deepcopy(build([0, 1, 2])[0].state_dict())
    if case == "rows":
        saved = {"state": saved["state"], "param_groups": [{k: v for k, v in g.items() if k != "amm"}
                                                           for g in saved["param_groups"]]}
    opt, params = build([5])  # (state of its own, for the failed load to leave)
    calls = _FailingCall(0)
    loaded = copy.deepcopy(saved)
    with calls:
        opt.load_state_dict(loaded)
    take_steps(opt, params, [3])
    expected = snapshot(opt, params)
    assert len(calls.calls) > 50, len(calls.calls)
    for n in range(1, len(calls.calls) + 1):
        opt, params = build([5])
        before, objects = full_snapshot(opt, params), _objects(opt, params)
        loaded = copy.deepcopy(saved)
        try:
            with _FailingCall(n):
                opt.load_state_dict(loaded)
        except torch.OutOfMemoryError:
            assert_unchanged(before, opt, params)
            _assert_same_objects(objects, opt, params, n)
            opt.load_state_dict(copy.deepcopy(saved))
        take_steps(opt, params, [3])
        assert_same_state(snapshot(opt, params), expected)


@pytest.mark.parametrize("read", ["state_dict", "beta"])
@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_a_read_that_fails_part_way_leaves_rows_put_in_place_where_they_were(cls, read):
    """NOTE [checkpoint carriers]: rows put in place by hand (as ZeroRedundancyOptimizer does) move into the
    scope state at the first state_dict() or read of beta / law. Every torch call of that read is made to
    fail in turn: the run then goes on as one without the failed read, to the bit. Before, a failure after
    the rows left the state dicts and before they reached the scope state lost them."""
    key = "scope" if cls is RLLC else "beta_scope"

    def build():
        params = model_params()
        opt = cls(params, lr=0.05, **{key: "tensor"})
        for i, p in enumerate(params):
            opt.state[p] = copy.deepcopy(saved["state"][i])
        return opt, params

    def do_read(opt):
        return opt.state_dict() if read == "state_dict" else (opt.law if cls is RLLC else opt.beta)

    first = cls(model_params(), lr=0.05, **{key: "tensor"})
    take_steps(first, list(first.param_groups[0]["params"]), [0, 1])
    saved = copy.deepcopy(first.state_dict())
    opt, params = build()
    calls = _FailingCall(0)
    with calls:
        do_read(opt)
    take_steps(opt, params, [2, 3])
    expected = snapshot(opt, params)
    assert len(calls.calls) > 30, len(calls.calls)
    for n in range(1, len(calls.calls) + 1):
        opt, params = build()
        try:
            with _FailingCall(n):
                do_read(opt)
        except torch.OutOfMemoryError:
            pass
        take_steps(opt, params, [2, 3])
        assert_same_state(snapshot(opt, params), expected)


def _swapped_after_tensor_0_stepped_alone(params, opt):
    """Tensor 0 steps alone (its scope's step count now differs), then a hand edit swaps tensors 0 and 1 in
    group 0: under beta_scope="tensor" their scopes must follow them at the next fit."""
    take_steps(opt, params[:3], [0, 1])
    for p in params[1:]:
        p.grad = None
    set_grads(params[:1], 7)
    opt.step()
    group = opt.param_groups[0]["params"]
    group[0], group[1] = group[1], group[0]


@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_an_add_param_group_that_fails_part_way_leaves_the_tensor_scopes_on_their_tensors(cls):
    """NOTE [tensor scopes follow their tensors]: add_param_group fits the scope state to the groups, moving
    the scopes of tensors a hand edit reordered. Every torch call of it is made to fail in turn (torch.optim
    has appended the group by then, or not): the run then goes on as one without the failure, to the bit.
    Before, the new order was recorded before the scopes moved, so after a failure the next step saw nothing
    to move, and each of the two tensors went on with the other's step count and beta."""
    key = "scope" if cls is RLLC else "beta_scope"

    def build():
        params = model_params()
        opt = cls(params[:3], lr=0.05, **{key: "tensor"})
        _swapped_after_tensor_0_stepped_alone(params, opt)
        return opt, params

    opt, params = build()
    calls = _FailingCall(0)
    with calls:
        opt.add_param_group(dict(params=[params[3]]))
    take_steps(opt, params, [2, 3])
    expected = snapshot(opt, params)
    for n in range(1, len(calls.calls) + 1):
        opt, params = build()
        try:  # (the prefill of the backend cache skips what it cannot do: no failure there)
            with _FailingCall(n):
                opt.add_param_group(dict(params=[params[3]]))
        except torch.OutOfMemoryError:
            pass
        if len(opt.param_groups) == 1:  # (failed before torch.optim appended it)
            opt.add_param_group(dict(params=[params[3]]))
        take_steps(opt, params, [2, 3])
        assert_same_state(snapshot(opt, params), expected)


from _dist import one_rank_group  # noqa: E402,F401  (a fixture)


@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_a_step_without_gradients_on_a_rank_that_fails_part_way_leaves_the_tensor_scopes_on_their_tensors(
        cls, one_rank_group):
    """NOTE [a rank without gradients]: with a process_group, a step where this rank has no gradient still
    fits the scope state and joins the all_reduce. Every torch call before the all_reduce is made to fail in
    turn: the same step again, then two more, give the run without the failure, to the bit (as
    test_an_add_param_group_that_fails_part_way_leaves_the_tensor_scopes_on_their_tensors, through the
    step's own fit)."""
    key = "scope" if cls is RLLC else "beta_scope"

    def build():
        params = model_params()
        opt = cls(params, lr=0.05, process_group=one_rank_group, backend="torch", **{key: "tensor"})
        _swapped_after_tensor_0_stepped_alone(params, opt)
        for p in params:
            p.grad = None
        return opt, params

    def go_on(opt, params):
        opt.step()  # (no gradients: the step that failed)
        take_steps(opt, params, [2, 3])
        return snapshot(opt, params)

    opt, params = build()
    calls = _FailingCall(0)
    with calls:
        opt.step()
    take_steps(opt, params, [2, 3])
    expected = snapshot(opt, params)
    reduce_at = [i for i, f in enumerate(calls.calls, 1) if getattr(f, "__name__", "") == "all_reduce"]
    assert len(reduce_at) == 1, reduce_at  # (the mode saw the step's calls)
    for n in range(1, reduce_at[0] + 1):
        opt, params = build()
        with pytest.raises(torch.OutOfMemoryError):
            with _FailingCall(n):
                opt.step()
        assert_same_state(go_on(opt, params), expected)



def test_a_step_that_fails_leaves_a_key_of_the_users_in_a_state_entry():
    """A parameter without state whose entry holds a key of the user's (opt.state[p]["note"] = ...) keeps
    it, and only it, after a step that fails before the backend writes (at each torch call in turn, up to
    the op); a step that succeeds adds to it. Before, a failed step dropped the entry, the key with it."""
    def build():
        params = model_params()
        opt = AMSGD(params, lr=0.05, backend="cpu")
        take_steps(opt, params, [0])
        del opt.state[params[1]]
        opt.state[params[1]]["note"] = "mine"
        set_grads(params, 1)
        return opt, params

    opt, params = build()
    counted = _FailingCall(0)
    with counted:
        opt.step()
    assert {"note", "momentum_buffer"} <= set(opt.state[params[1]])
    last = max(i for i, f in enumerate(counted.calls, 1) if getattr(f, "_qualified_op_name", "").endswith("amsgd_step"))
    for n in range(1, last + 1):
        opt, params = build()
        entry = opt.state[params[1]]
        with pytest.raises(torch.OutOfMemoryError):
            with _FailingCall(n):
                opt.step()
        assert opt.state[params[1]] is entry and entry == {"note": "mine"}, n


@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_the_scope_state_follows_the_parameters_to_float64(cls):
    """The scope state (step counts, beta, lr, ...) is float64 for float64 parameters (scope_dtype in
    _step.py), float32 else: after model.to(torch.float64) the next step moves it to float64, with its
    values, as a checkpoint then shows."""
    params = model_params()
    opt = cls(params, lr=0.1)
    take_steps(opt, params, [0, 1])
    before = {k: v.clone() for k, v in opt.state_dict()["amm"]["scopes"].items()}
    assert all(v.dtype == torch.float32 for v in before.values())
    for p in params:
        p.data = p.data.to(torch.float64)
    take_steps(opt, params, [2])
    after = opt.state_dict()["amm"]["scopes"]
    assert all(v.dtype == torch.float64 for v in after.values()), {k: v.dtype for k, v in after.items()}
    assert torch.equal(after["step"], before["step"] + 1)


@pytest.mark.parametrize("backend", ["auto"] + amm_kernels.available_backends("cpu"))
@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_an_integer_parameter_with_a_gradient_is_a_type_error_naming_it(cls, backend):
    """Parameters must be floating point: an integer one given a gradient is refused by the step with a
    TypeError that says so, whatever the backend ("auto" too), before any state is made."""
    params = model_params()
    counts = torch.zeros(3, dtype=torch.long)
    opt = cls([*params, counts], backend=backend)
    set_grads(params, 0)
    counts.grad = torch.ones(3, dtype=torch.long)
    with pytest.raises(TypeError, match="parameters must be floating point, got torch.int64"):
        opt.step()
    assert len(opt.state) == 0


@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_one_float64_parameter_makes_the_scope_state_float64(cls):
    """scope_dtype (_step.py): the scope state is float64 when one of the parameters is float64, the
    others float32."""
    params = model_params()
    params[1] = params[1].detach().double().requires_grad_()
    opt = cls(params, lr=0.1)
    take_steps(opt, params, [0, 1])
    scopes = opt.state_dict()["amm"]["scopes"]
    assert all(v.dtype == torch.float64 for v in scopes.values()), {k: v.dtype for k, v in scopes.items()}
    assert params[0].dtype == torch.float32 and params[1].dtype == torch.float64


@pytest.mark.parametrize("cls,name", [(AMSGD, "adaptive"), (AMSGD, "maximize"), (AMAdamW, "adaptive"),
                                      (AMAdamW, "maximize"), (AMSGD, "capturable"), (RLLC, "capturable")])
def test_a_flag_given_as_a_tensor_is_refused(cls, name):
    """A flag is True or False (0 or 1), not a tensor, though a bool tensor compares equal to one."""
    for value in (torch.tensor(True), torch.tensor(False)):
        with pytest.raises(ValueError, match=f"{name} must be True or False, got tensor"):
            cls(model_params(), **{name: value})


@pytest.mark.parametrize("cls,kwargs,name", [
    (AMSGD, dict(lr=True), "lr"), (AMSGD, dict(lam=False), "lam"), (AMSGD, dict(beta_max=True), "beta_max"),
    (AMAdamW, dict(eps=True), "eps"), (AMAdamW, dict(weight_decay=False), "weight_decay"),
    (RLLC, dict(law_lr=True), "law_lr"), (RLLC, dict(lr=np.bool_(True)), "lr"),
], ids=["AMSGD-lr", "AMSGD-lam", "AMSGD-beta_max", "AMAdamW-eps", "AMAdamW-weight_decay", "RLLC-law_lr",
        "RLLC-lr-numpy"])
def test_a_bool_is_no_number(cls, kwargs, name):
    """A hyperparameter is a real number: True and False (Python's or NumPy's) are refused, naming the
    argument, though Python counts bool as an int."""
    with pytest.raises(ValueError, match=f"{name} must be a number, got"):
        cls(model_params(), **kwargs)


@pytest.mark.parametrize("backend", amm_kernels.available_backends("cpu"))
@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_a_zero_stride_over_a_size_1_dimension_is_no_repeat(cls, backend):
    """NOTE [aliased parameters]: a stride of 0 repeats elements only over a dimension of more than one
    element. A parameter with stride 0 over a size-1 dimension (as torch makes some views) holds each
    element once: accepted, and it steps as its contiguous copy does. (torch.randn(3).expand(1, 3) does
    not give such strides: as_strided does.)"""
    odd = torch.arange(3.0).as_strided((1, 3), (0, 1)).requires_grad_()
    plain = torch.arange(3.0).reshape(1, 3).requires_grad_()
    assert odd.stride() == (0, 1)
    a, b = cls([odd], lr=0.1, backend=backend_ready(backend)), cls([plain], lr=0.1, backend=backend_ready(backend))
    for t in range(3):
        g = torch.randn(1, 3, generator=torch.Generator().manual_seed(t))
        odd.grad, plain.grad = g.clone(), g.clone()
        a.step()
        b.step()
    assert torch.equal(odd, plain)


@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_a_parameter_added_again_in_a_new_group_is_torchs_duplicate_error(cls):
    """NOTE [aliased parameters]: one tensor listed twice is its own error, not two parameters that share
    memory: in a later group, torch.optim's ("appear in more than one parameter group")."""
    params = model_params()
    opt = cls(params)
    with pytest.raises(ValueError, match="some parameters appear in more than one parameter group"):
        opt.add_param_group({"params": [params[0]]})
    assert len(opt.param_groups) == 1


@pytest.mark.skipif("cpu" not in amm_kernels.available_backends("cpu"), reason="the C++ extension is not built")
@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_a_backend_asked_for_by_name_refuses_a_dtype_it_does_not_run(cls):
    """backend="cpu" (the C++ ops) runs float32, bfloat16 and float16 parameters: float64 ones are a
    TypeError naming the backend and the dtype, at the step, before any state is made (never a silent
    run on another backend)."""
    params = model_params(dtype=torch.float64)
    opt = cls(params, backend="cpu")
    set_grads(params, 0)
    before = [p.detach().clone() for p in params]
    with pytest.raises(TypeError, match="backend 'cpu' does not support parameters of dtype torch.float64"):
        opt.step()
    assert len(opt.state) == 0
    assert all(torch.equal(p, b) for p, b in zip(params, before))


EVERY_ARGUMENT = {
    AMSGD: dict(lam=0.2, beta_max=0.85, beta_min=0.1, adaptive=True, delta_f="first_order", beta_scope="group",
                maximize=False, backend="torch", process_group=None, capturable=False, state_dtype=None),
    AMAdamW: dict(betas=(0.85, 0.99), eps=1e-7, lam=0.2, beta_min=0.1, adaptive=True, beta_scope="group",
                  maximize=False, backend="torch", process_group=None, capturable=False, state_dtype=None),
    RLLC: dict(law_lr=0.02, memory="M(0.8)+M(0)", law_init=(0.9, 0.1), scope="group", backend="torch",
               process_group=None, capturable=False, state_dtype=None),
}


@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_a_group_repeating_every_argument_with_its_value_is_accepted(cls):
    """NOTE [wide keys in groups]: ZeroRedundancyOptimizer hands each param group every constructor
    argument with the optimizer's value: each one (here not its default) is accepted, and the run is the
    one without them; each one with another value is refused."""
    kwargs = EVERY_ARGUMENT[cls]
    assert set(kwargs) == set(inspect.signature(cls).parameters) - {"params", "lr", "weight_decay"}
    a, b = model_params(), model_params()
    repeated = cls([{"params": a, **kwargs}], lr=0.1, **kwargs)
    plain = cls([{"params": b}], lr=0.1, **kwargs)
    take_steps(repeated, a, [0, 1])
    take_steps(plain, b, [0, 1])
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    other = {"lam": 0.3, "beta_max": 0.8, "beta_min": 0.05, "adaptive": False, "beta_scope": "tensor", "maximize": True,
             "betas": (0.8, 0.99), "eps": 1e-6, "law_lr": 0.03, "memory": "M(0.7)+M(0)", "law_init": (1.0, 0.0),
             "scope": "tensor"}
    for key in set(kwargs) & set(other):
        with pytest.raises(ValueError, match=f"sets {key}=.* but {key} is optimizer-wide"):
            cls([{"params": model_params(), key: other[key]}], lr=0.1, **kwargs)


@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_dtensors_sharded_over_two_mesh_dimensions_or_over_different_groups_are_refused(cls, one_rank_group):
    """README "Not supported": parameters sharded over more than one mesh dimension (FSDP + tensor
    parallel) would need beta's sums reduced over several groups, and parameters sharded over different
    groups (or some not sharded) have no one group to reduce over: each is an error naming the way out,
    raised before any state is made. One rank of gloo, 1 x 1 and 1-long CPU meshes."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    def dtensor(mesh, placements, shape):
        p = torch.nn.Parameter(distribute_tensor(torch.randn(shape), mesh, placements))
        p.grad = distribute_tensor(torch.randn(shape), mesh, placements)
        return p

    two_d = init_device_mesh("cpu", (1, 1), mesh_dim_names=("dp", "tp"))
    opt = cls([dtensor(two_d, [Shard(0), Shard(1)], (4, 4))])
    scopes = opt._scopes
    with pytest.raises(NotImplementedError, match=r"sharded over 2 mesh dimensions .*shard over one mesh dimension"):
        opt.step()
    assert not opt.state and opt._scopes is scopes
    plain = torch.randn(3, requires_grad=True)
    plain.grad = torch.randn(3)
    opt = cls([dtensor(init_device_mesh("cpu", (1,)), [Shard(0)], (4,)), plain])
    scopes = opt._scopes
    with pytest.raises(RuntimeError, match="sharded over different process groups .*pass process_group= explicitly"):
        opt.step()
    assert not opt.state and opt._scopes is scopes


@pytest.mark.parametrize("how", ["del", "clear"])
def test_a_reset_tensor_under_a_process_group_joins_its_tensor_scope_late_and_amadamw_says_so(how, one_rank_group):
    """NOTE [a reset tensor restarts its scope]: not under a process_group (a rank without the tensor's
    gradient could not tell): there the tensor scope keeps its step count, and AMAdamW warns, once, as of a
    late tensor in a shared scope (NOTE [late tensors, sharded]: counted on the device). Without a reset,
    no warning."""
    import warnings

    def run(reset):
        params = model_params()
        opt = AMAdamW(params, lr=0.05, process_group=one_rank_group, backend="torch")  # beta_scope="tensor"
        take_steps(opt, params, range(3))
        if reset:
            if how == "del":
                del opt.state[params[1]]
            else:
                opt.state.clear()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            take_steps(opt, params, range(3, 5))
        return opt._scopes.step.tolist(), [str(w.message) for w in caught if "first gradient" in str(w.message)]

    steps, said = run(True)
    assert steps == [5.0] * 4
    assert len(said) == 1 and ("1 parameter" if how == "del" else "4 parameter") in said[0], said
    assert "or had their state reset" in said[0] and "keeps its scope's step count" in said[0]
    assert run(False) == ([5.0] * 4, [])


@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_a_deepcopy_with_a_process_group_shares_it_and_pickling_fails(cls, one_rank_group):
    """README, Full torch.optim behaviour: with a process_group, copy.deepcopy shares the group (it cannot
    be copied) and steps on as the original does; pickling fails, as the group cannot be pickled."""
    import pickle

    params = model_params()
    opt = cls(params, lr=0.05, process_group=one_rank_group)
    take_steps(opt, params, [0])
    copied = copy.deepcopy(opt)
    assert copied.process_group is one_rank_group
    copied_params = [p for g in copied.param_groups for p in g["params"]]
    assert all(a is not b for a, b in zip(copied_params, params))
    take_steps(opt, params, [1])
    take_steps(copied, copied_params, [1])
    assert_same_state(snapshot(copied, copied_params), snapshot(opt, params))
    with pytest.raises(TypeError, match="pickle"):
        pickle.dumps(opt)

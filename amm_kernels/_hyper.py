"""Hyperparameters of the optimizers, validated once, with errors that name the argument and range."""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

try:  # numpy's bool is no numbers.Real today; refused explicitly, should that change
    from numpy import bool_ as np_bool
except ImportError:  # pragma: no cover - numpy is optional
    np_bool = bool

BETA_SCOPES = ("global", "group", "tensor")
# The largest hyperparameter taken: the kernels hold lr, weight_decay, eps, ... in float32, where a
# larger finite Python float (lr=1e39) is inf.
F32_MAX = float(torch.finfo(torch.float32).max)
F32_TINY = float(torch.finfo(torch.float32).tiny)  # the smallest normal float32 (NOTE [smallest eps])
DELTA_F_MODES = ("first_order", "loss")
# NOTE [foreign group keys]: the arguments of torch.optim's optimizers (and of apex's, bitsandbytes'
# AdamW-likes, and of this package's other optimizers) that an optimizer here does not take. A param
# group given one (code written for SGD sets "momentum") would have it silently ignored, so it is
# refused when the group is given; a group's other keys are kept as torch.optim keeps them (a name, a
# scheduler's initial_lr, timm's lr_scale).
FOREIGN_GROUP_KEYS = frozenset((
    "momentum", "dampening", "nesterov", "betas", "eps", "amsgrad", "lr_decay", "initial_accumulator_value",
    "alpha", "centered", "rho", "momentum_decay", "decoupled_weight_decay", "lambd", "t0", "etas", "step_sizes",
    "max_iter", "max_eval", "tolerance_grad", "tolerance_change", "history_size", "line_search_fn",
    "foreach", "fused", "differentiable", "maximize", "capturable", "weight_decay", "bias_correction",
    "adam_w_mode", "set_grad_none", "optim_bits", "percentile_clipping", "block_wise", "is_paged",
    "beta2_decay", "d", "ns_steps", "ns_coefficients", "adjust_lr_fn",  # torch.optim.Adafactor's, Muon's
    # this package's optimizers' (each class lets its own through: they are its optimizer-wide arguments)
    "lam", "beta_max", "beta_min", "adaptive", "delta_f", "beta_scope", "backend", "process_group",
    "state_dtype", "law_lr", "memory", "law_init", "scope",
))


def _is_number(value) -> bool:
    """A real number: int, float and the other numbers.Real (numpy's float32, int64, ...), not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np_bool))


def check_range(owner: str, name: str, value, lo=None, hi=None, lo_open=False, hi_open=False,
                device_tensor_ok: bool = False, read_tensor: bool = True):
    """Raise ValueError unless lo <= value <= hi (open ends as flagged) and value is finite in float32
    (|value| <= F32_MAX); return it as a float. A 1-element real CPU tensor is read and checked. A
    device tensor is accepted, its value unchecked, and returned as is, only where `device_tensor_ok`
    (a capturable lr: reading it back would synchronise); so is a CPU one where not `read_tensor` (inside
    a compiled step, where reading it would break the graph)."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{owner}: {name} must be a number or a 1-element tensor, got shape {tuple(value.shape)}")
        if value.is_complex() or value.dtype == torch.bool:
            raise ValueError(f"{owner}: {name} must be a real number, got a {value.dtype} tensor")
        if value.device.type != "cpu" or not read_tensor:
            if device_tensor_ok:
                return value
            raise ValueError(f"{owner}: {name} must be a number (or a CPU tensor), got a tensor on {value.device}: "
                             "only lr may be a device tensor")
        value = float(value.detach())  # (a tensor that requires grad: no warning)
    if not _is_number(value):
        raise ValueError(f"{owner}: {name} must be a number, got {value!r}")
    try:
        bad = not math.isfinite(value)
    except OverflowError:  # an int (or a Fraction) beyond every float: 10**400
        raise ValueError(f"{owner}: {name} must be at most {F32_MAX!r} in magnitude (the largest float32: the "
                         f"kernels compute in float32), got a number beyond every float") from None
    if lo is not None:
        bad |= value <= lo if lo_open else value < lo
    if hi is not None:
        bad |= value >= hi if hi_open else value > hi
    if bad:
        lo_txt = "(" if lo_open or lo is None else "["
        hi_txt = ")" if hi_open or hi is None else "]"
        allowed = f"{lo_txt}{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}{hi_txt}"
        raise ValueError(f"{owner}: {name} must be in {allowed}, got {value!r}")
    if abs(value) > F32_MAX:
        raise ValueError(f"{owner}: {name} must be at most {F32_MAX!r} in magnitude (the largest float32: the "
                         f"kernels compute in float32), got {value!r}")
    return float(value)


def check_flag(owner: str, name: str, value) -> bool:
    """A bool argument: True or False (1 and 0 too), not any object Python would call truthy."""
    if isinstance(value, torch.Tensor) or value not in (True, False):
        raise ValueError(f"{owner}: {name} must be True or False, got {value!r}")
    return bool(value)


def check_choice(owner: str, name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{owner}: {name} must be one of {', '.join(map(repr, choices))}; got {value!r}")


# NOTE [state dtype]: SPEC.md section 5 gives the state tensors their parameter's dtype unless the user
# asks for float32 state. That is the one other choice: every kernel reads and writes state in the
# parameter's dtype or in float32 (csrc/cpu/step_driver_cpu.cpp, csrc/cuda/ops_cuda.cpp, the Triton
# tables' dtype codes). float32 and float64 parameters keep their own dtype (state is never less
# precise than its parameter).
STATE_DTYPES = (None, torch.float32)


def check_state_dtype(owner: str, value):
    """The state_dtype argument: None (each parameter's dtype) or torch.float32; returned as is."""
    if not any(value is allowed for allowed in STATE_DTYPES):
        raise ValueError(f"{owner}: state_dtype must be None (state in each parameter's dtype) or torch.float32 "
                         f"(float32 state for bfloat16 and float16 parameters); got {value!r}")
    return value


def state_dtype_for(param_dtype: torch.dtype, state_dtype) -> torch.dtype:
    """The dtype of a parameter's state tensors under the state_dtype argument (NOTE [state dtype])."""
    if state_dtype is None or param_dtype is torch.float64:
        return param_dtype
    return state_dtype


_MISSING = object()  # check_group: a key the group does not have


def check_group(owner: str, group: dict, keys, index: int | None = None, on_step: bool = False) -> None:
    """A param group's hyperparameters (`keys`: lr, and weight_decay where the optimizer has it), each
    in [0, inf); lr may be a tensor: a CPU tensor is read and checked, a device tensor's value is not
    (reading it would synchronise), nor is an lr tensor's inside a compiled step (`on_step`, the check
    at every step: reading it would break the graph); their shape and dtype are. Any other tensor
    is checked as at construction: a CPU tensor is read, a device tensor refused. `index` names the
    group in the message (param_groups[i]['lr'])."""
    for key in keys:
        value = group.get(key, _MISSING)
        if type(value) is float and 0.0 <= value <= F32_MAX:
            continue  # the usual case, at every step: no more host time than this (NOTE [host time], _base.py)
        name = key if index is None else f"param_groups[{index}][{key!r}]"
        if value is _MISSING:
            raise ValueError(f"{owner}: {'a param group' if index is None else f'param_groups[{index}]'} has no "
                             f"{key!r}: set it (a number in [0, inf))")
        check_range(owner, name, value, lo=0.0, device_tensor_ok=key == "lr",
                    read_tensor=not (on_step and key == "lr" and torch.compiler.is_compiling()))



def check_process_group(owner: str, group):
    """None, or a torch.distributed ProcessGroup (a DeviceMesh is not one: its shard dimension's group is)."""
    if group is None:
        return None
    dist = torch.distributed
    if dist.is_available() and isinstance(group, dist.ProcessGroup):
        return group
    hint = (" (a DeviceMesh: pass mesh.get_group(dim), the group of the dimension the parameters are sharded over)"
            if type(group).__name__ == "DeviceMesh" else "")
    raise TypeError(f"{owner}: process_group must be a torch.distributed ProcessGroup or None, got "
                    f"{type(group).__name__}{hint}")


def _set_checked(hp, field: str, value) -> None:
    object.__setattr__(hp, field, value)  # a frozen dataclass stores the checked value (a float, a bool)


@dataclass(frozen=True)
class AMSGDHyper:
    lam: float
    beta_max: float
    beta_min: float
    adaptive: bool
    maximize: bool
    delta_f: str

    def __post_init__(self):
        _check_common("AMSGD", self)
        check_choice("AMSGD", "delta_f", self.delta_f, DELTA_F_MODES)


@dataclass(frozen=True)
class AMAdamWHyper:
    lam: float
    beta_max: float
    beta_min: float
    beta2: float
    eps: float
    adaptive: bool
    maximize: bool

    def __post_init__(self):
        # beta_max < 1, as torch.optim.AdamW's beta1: the first step's bias correction is 1 - beta_max
        # (SPEC.md section 2), and 0 would divide by 0. AMSGD has no such term: it allows beta_max = 1.
        _check_common("AMAdamW", self, beta_max_name="betas[0] (beta_max)", beta_max_below_1=True)
        _set_checked(self, "beta2", check_range("AMAdamW", "betas[1] (beta2)", self.beta2, lo=0.0, hi=1.0, hi_open=True))
        _set_checked(self, "eps", check_range("AMAdamW", "eps", self.eps, lo=0.0, lo_open=True))
        # NOTE [smallest eps]: beta's terms weigh each element by 1 / ((1 + lam p) p), p >= (1 - beta_max) eps
        # (SPEC.md section 2). Below float32's smallest normal p that weight is inf, and an element with
        # d = g (a zero gradient on a zero momentum) makes inf * 0 = NaN: a NaN beta for its whole scope.
        # torch.optim.AdamW takes such an eps; adaptive=False here does too (it forms no terms).
        low = F32_TINY / (1.0 - self.beta_max)
        if self.adaptive and self.eps < low:
            raise ValueError(f"AMAdamW: eps must be in [{low:.4g}, {F32_MAX:.4g}] with betas[0] (beta_max) = "
                             f"{self.beta_max} and adaptive=True (so that (1 - beta_max) * eps, the smallest "
                             f"preconditioner, is a normal float32), got {self.eps!r}")


def _check_common(owner: str, hp, beta_max_name: str = "beta_max", beta_max_below_1: bool = False) -> None:
    _set_checked(hp, "lam", check_range(owner, "lam", hp.lam, lo=0.0))
    _set_checked(hp, "beta_max", check_range(owner, beta_max_name, hp.beta_max, lo=0.0, hi=1.0, hi_open=beta_max_below_1))
    _set_checked(hp, "beta_min", check_range(owner, "beta_min", hp.beta_min, lo=0.0, hi=1.0))
    _set_checked(hp, "adaptive", check_flag(owner, "adaptive", hp.adaptive))
    _set_checked(hp, "maximize", check_flag(owner, "maximize", hp.maximize))
    if hp.beta_min > hp.beta_max:
        raise ValueError(f"{owner}: beta_min must be <= {beta_max_name} = {hp.beta_max}, got {hp.beta_min!r}")

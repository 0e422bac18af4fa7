"""Hyperparameters of the optimizers, validated once, with errors that name the argument and range."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

BETA_SCOPES = ("global", "group", "tensor")
DELTA_F_MODES = ("first_order", "loss")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_range(owner: str, name: str, value, lo=None, hi=None, lo_open=False, hi_open=False) -> None:
    """Raise ValueError unless lo <= value <= hi (open ends as flagged); NaN is always rejected."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{owner}: {name} must be a number or a 1-element tensor, got shape {tuple(value.shape)}")
        if value.device.type != "cpu":
            return  # a device tensor (capturable lr) is not read back to the host to be checked
        value = float(value)
    if not _is_number(value):
        raise ValueError(f"{owner}: {name} must be a number, got {value!r}")
    lo_txt = "(" if lo_open else "["
    hi_txt = ")" if hi_open else "]"
    allowed = f"{lo_txt}{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}{hi_txt}"
    bad = math.isnan(value)
    if lo is not None:
        bad |= value <= lo if lo_open else value < lo
    if hi is not None:
        bad |= value >= hi if hi_open else value > hi
    if bad:
        raise ValueError(f"{owner}: {name} must be in {allowed}, got {value!r}")


def check_choice(owner: str, name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{owner}: {name} must be one of {', '.join(map(repr, choices))}; got {value!r}")


def check_group(owner: str, lr, weight_decay) -> None:
    """The per-group hyperparameters: lr in [0, inf), weight_decay in [0, inf)."""
    check_range(owner, "lr", lr, lo=0.0)
    check_range(owner, "weight_decay", weight_decay, lo=0.0)


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
        _check_common("AMAdamW", self, beta_max_name="betas[0] (beta_max)")
        check_range("AMAdamW", "betas[1] (beta2)", self.beta2, lo=0.0, hi=1.0, hi_open=True)
        check_range("AMAdamW", "eps", self.eps, lo=0.0, lo_open=True)


def _check_common(owner: str, hp, beta_max_name: str = "beta_max") -> None:
    check_range(owner, "lam", hp.lam, lo=0.0)
    check_range(owner, beta_max_name, hp.beta_max, lo=0.0, hi=1.0)
    check_range(owner, "beta_min", hp.beta_min, lo=0.0, hi=1.0)
    if hp.beta_min > hp.beta_max:
        raise ValueError(f"{owner}: beta_min must be <= {beta_max_name} = {hp.beta_max}, got {hp.beta_min!r}")

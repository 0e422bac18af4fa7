"""RLLC: Retrospective Learning Law Correction with linear memory (SPEC.md section 4).

The class reuses AMOptimizer's plumbing (torch.optim groups, GradScaler found_inf/grad_scale, scope
numbering) and overrides the parts that differ from AMSGD/AMAdamW: k memory tensors per parameter
(one state tensor of shape (k, *param.shape)), a learning law per scope instead of a beta, param
groups that set only lr, and a backend choice among the backends that implement `rllc_step`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor

from . import backends
from ._base import FORMAT_VERSION, STATE_DICT_KEY, AMOptimizer
from ._hyper import check_choice, check_range
from ._step import StepBatch
from .memory import memory_rule

__all__ = ["RLLC", "RLLCHyper", "RLLCScopeState", "rllc_backends", "supports_rllc"]

SCOPES = ("global", "group", "tensor")
GROUP_KEYS = ("params", "lr")  # what a param group may set; the rest is optimizer-wide
RCOND = 1e-6  # relative eigenvalue cutoff of the pseudo-inverse of the k x k Gram matrix (SPEC.md 4)


@dataclass(frozen=True)
class RLLCHyper:
    """Optimizer-wide hyperparameters; U (k x k) and b (k) as tuples of floats (host values)."""

    law_lr: float
    U: tuple[tuple[float, ...], ...]
    b: tuple[float, ...]
    law_init: tuple[float, ...]
    rcond: float = RCOND

    @property
    def k(self) -> int:
        return len(self.b)


@dataclass
class RLLCScopeState:
    """Per-scope state on the parameters' device: step[s] (steps taken) and law[s] (k numbers)."""

    step: Tensor
    law: Tensor

    FIELDS = ("step", "law")

    @classmethod
    def create(cls, n_scopes: int, law_init, device, dtype) -> "RLLCScopeState":
        law = torch.tensor(law_init, dtype=dtype).reshape(1, -1).repeat(n_scopes, 1)
        return cls(step=torch.zeros(n_scopes, dtype=dtype).to(device), law=law.to(device))

    def grow(self, n_scopes: int, law_init) -> None:
        """Extend for scopes added by add_param_group (new scopes start at law_init, step 0)."""
        fresh = RLLCScopeState.create(n_scopes, law_init, self.step.device, self.step.dtype)
        fresh.step[: self.step.numel()] = self.step
        fresh.law[: self.law.shape[0]] = self.law
        self.__dict__.update(fresh.__dict__)

    def to_dict(self) -> dict:
        return {name: getattr(self, name).clone() for name in self.FIELDS}

    @classmethod
    def from_dict(cls, saved: dict, device, dtype) -> "RLLCScopeState":
        return cls(**{name: saved[name].to(device=device, dtype=dtype).clone() for name in cls.FIELDS})


# --------------------------------------------------------------------------------------------------
# backends: those whose module has an `rllc_step(batch, hp)`; the reference always has one
def _rllc_step_of(name: str, module) -> Callable | None:
    step = getattr(module, "rllc_step", None)
    if step is None and name == "torch":
        from .reference.rllc_reference import rllc_step as step
    return step


def supports_rllc(name: str, device: torch.device | str = "cpu") -> bool:
    """True when backend `name` can run RLLC steps on tensors of `device`."""
    try:
        module = backends.resolve(name, torch.device(device), set(), "RLLC")
    except (RuntimeError, TypeError):
        return False
    return _rllc_step_of(name, module) is not None


def rllc_backends(device: torch.device | str = "cpu") -> list[str]:
    """The backends of available_backends(device) that implement RLLC, fastest first."""
    return [name for name in backends.available_backends(device) if supports_rllc(name, device)]


def _resolve_rllc(name: str, device: torch.device, dtypes: set) -> Callable:
    if name == "auto":
        for candidate in rllc_backends(device):
            if all(backends.backend_supports_dtype(candidate, dt) for dt in dtypes):
                return _rllc_step_of(candidate, backends.resolve(candidate, device, dtypes, "RLLC"))
        raise RuntimeError(f"RLLC: no backend runs RLLC on parameters of dtype {sorted(map(str, dtypes))} on {device}")
    step = _rllc_step_of(name, backends.resolve(name, device, dtypes, "RLLC"))
    if step is None:
        raise RuntimeError(
            f"RLLC: backend {name!r} has no RLLC kernels yet; use one of "
            f"{', '.join(map(repr, rllc_backends(device)))} (or backend='auto')"
        )
    return step


# --------------------------------------------------------------------------------------------------
class RLLC(AMOptimizer):
    r"""Retrospective Learning Law Correction over a linear memory (LM-RLLC; Szegedy et al. 2024).

    Keeps k memory vectors per parameter (the columns of M) and a learning law L of k numbers per
    scope, and learns L online from how well the previous memory explains the new gradient:

    .. math::
        \begin{aligned}
        &\textbf{not on the first step: } L \leftarrow L + c_2\, M^{+} g_t,
            \qquad M^{+} g = \mathrm{pinv}(M^\top M)\, M^\top g\\
        &M \leftarrow M U + g_t b^\top \qquad(\text{every unit from the previous memory})\\
        &\theta \leftarrow \theta - c_1 M L
        \end{aligned}

    with :math:`c_1` = lr (each param group's own) and :math:`c_2` = law_lr. :math:`M^\top M` and
    :math:`M^\top g` are sums over every parameter in the scope; the pseudo-inverse of the k x k Gram
    matrix drops eigenvalues below 1e-6 times the largest, so a rank-deficient memory (all units equal
    after the first step) gives the minimum-norm correction. M starts at 0 and L at ``law_init``.

    Degenerate cases: ``law_lr=0`` with ``memory="M(beta)+M(0)"`` is ``torch.optim.SGD(momentum=beta)``
    for ``law_init=(1, 0)``, Nesterov momentum for ``(beta, 1)`` and plain SGD for ``(0, 1)``.

    Args:
        params: iterable of parameters or dicts defining param groups (a group may set only ``lr``;
            the other arguments are optimizer-wide).
        lr (float or Tensor, default 0.01): step size c1, >= 0.
        law_lr (float, default 0.01): step size c2 of the law correction, >= 0 (0 freezes the law).
        memory (str or (U, b), default "M(0.9)+M(0)"): the memory units, joined by ``+``:
            ``M(beta)``: m <- beta m + g;  ``J(beta, j)``: a Jordan block of j units, m_1 <- beta m_1 + g,
            m_i <- beta m_i + m_{i-1};  ``C(r, phi)``: a rotation pair, (m_1, m_2) <- r (cos phi m_1 -
            sin phi m_2, sin phi m_1 + cos phi m_2) + (g, 0). Or an explicit pair (U, b) of a k x k
            propagator and k input weights: M <- M U + g b^T.
        law_init (sequence of k floats, default None = (1, 0, ..., 0)): the initial law L.
        scope (str, default "global"): one law for all parameters ("global"), one per param group
            ("group") or one per parameter tensor ("tensor").
        backend (str, default "auto"): a backend that implements RLLC ("torch", the reference, for
            now; see ``amm_kernels.rllc.rllc_backends()``), or "auto" for the fastest such.

    ``optimizer.law`` is the current law as a device tensor: shape (k,) for ``scope="global"``, else
    (n_groups, k) / (n_tensors, k). State per parameter: ``memory``, shape (k, *param.shape), the
    parameter's dtype (arithmetic is float32 for float32/bfloat16/float16, float64 for float64).
    """

    STATE_NAMES = ("memory",)

    def __init__(self, params, lr=0.01, law_lr: float = 0.01, memory="M(0.9)+M(0)", law_init=None,
                 scope: str = "global", backend: str = "auto"):
        name = type(self).__name__
        check_range(name, "lr", lr, lo=0.0)
        check_range(name, "law_lr", law_lr, lo=0.0)
        if isinstance(law_lr, Tensor):
            raise ValueError(f"{name}: law_lr must be a number, got a tensor")
        check_choice(name, "scope", scope, SCOPES)
        check_choice(name, "backend", backend, backends.BACKEND_NAMES)
        U, b = memory_rule(memory, name)
        k = len(b)
        if law_init is None:
            law_init = (1.0,) + (0.0,) * (k - 1)
        if isinstance(law_init, Tensor):
            law_init = law_init.detach().cpu().tolist()
        if not isinstance(law_init, (list, tuple)) or len(law_init) != k:
            raise ValueError(f"{name}: law_init must be a sequence of k = {k} numbers (one per memory unit), "
                             f"got {law_init!r}")
        for i, value in enumerate(law_init):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name}: law_init[{i}] must be a finite number, got {value!r}")
        self._hyper = RLLCHyper(law_lr=float(law_lr), U=U, b=b, law_init=tuple(float(v) for v in law_init))
        self.scope = self.beta_scope = scope  # beta_scope: the name AMOptimizer's scope numbering reads
        self.backend = backend
        self._scopes: RLLCScopeState | None = None
        torch.optim.Optimizer.__init__(self, params, dict(lr=lr))
        # The scope state is made here, on the parameters' device (so optimizer.law is there from the
        # start, and a compiled step() finds it instead of creating it; cf. AMOptimizer's NOTE [compile]).
        first = [p for g in self.param_groups for p in g["params"]]
        if first:
            dtype = torch.float64 if any(p.dtype == torch.float64 for p in first) else torch.float32
            self._scope_state(first[0].device, dtype)

    # ----------------------------------------------------------------------------------------------
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        name = type(self).__name__
        extra = sorted(k for k in param_group if k not in GROUP_KEYS)
        if extra:
            raise ValueError(
                f"{name}: a param group may set only lr; {', '.join(extra)} "
                f"{'is' if len(extra) == 1 else 'are'} optimizer-wide or not an {name} argument"
            )
        check_range(name, "lr", param_group.get("lr", self.defaults["lr"]), lo=0.0)
        torch.optim.Optimizer.add_param_group(self, param_group)

    @property
    def k(self) -> int:
        """The number of memory units."""
        return self._hyper.k

    @property
    def law(self) -> Tensor:
        """The current learning law on the parameters' device: (k,) for scope="global", else one row
        per group / parameter tensor (groups in order). A copy; reading it never synchronises."""
        if self._scopes is None:
            n_scopes, _ = self._scope_counts()
            law = RLLCScopeState.create(n_scopes, self._hyper.law_init, "cpu", torch.float32).law
        else:
            law = self._scopes.law.clone()
        return law.reshape(self.k) if self.scope == "global" else law

    @property
    def beta(self):
        raise AttributeError("RLLC has no beta; its per-scope coefficients are optimizer.law")

    def _scope_state(self, device: torch.device, dtype: torch.dtype) -> RLLCScopeState:
        n_scopes, _ = self._scope_counts()
        if self._scopes is None:
            self._scopes = RLLCScopeState.create(n_scopes, self._hyper.law_init, device, dtype)
        if self._scopes.step.device != device or self._scopes.step.dtype != dtype:
            self._scopes = RLLCScopeState.from_dict(self._scopes.to_dict(), device, dtype)
        if self._scopes.step.numel() != n_scopes:
            self._scopes.grow(n_scopes, self._hyper.law_init)
        return self._scopes

    # ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None):
        """Perform one optimization step. `closure` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        built = self._build_batch(loss)
        if built is not None:
            step_fn, batch = built
            step_fn(batch, self._hyper)
        return loss

    def _build_batch(self, loss) -> tuple[Callable, StepBatch] | None:
        """Collect every parameter with a gradient and validate it, pick the backend, then (only then)
        create state."""
        name = type(self).__name__
        entries = []  # (param, grad, group index, scope index)
        tensor_index = 0
        for gi, group in enumerate(self.param_groups):
            for p in group["params"]:
                scope = {"global": 0, "group": gi, "tensor": tensor_index}[self.scope]
                tensor_index += 1
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(f"{name} does not support sparse gradients")
                if not p.is_floating_point():
                    raise TypeError(f"{name}: parameters must be floating point, got {p.dtype}")
                entries.append((p, p.grad, gi, scope))
        if not entries:
            return None
        device = entries[0][0].device
        for p, g, gi, scope in entries:
            if p.device != device or g.device != device:
                raise RuntimeError(
                    f"{name}: all parameters and gradients must be on one device; found {device} and "
                    f"{p.device if p.device != device else g.device} (one optimizer per device is supported)"
                )
        step_fn = _resolve_rllc(self.backend, device, {p.dtype for p, *_ in entries})

        dtype = torch.float64 if any(p.dtype == torch.float64 for p, *_ in entries) else torch.float32
        scopes = self._scope_state(device, dtype)
        lrs = [g["lr"] for g in self.param_groups]
        if any(isinstance(lr, Tensor) for lr in lrs):
            lr = torch.stack([torch.as_tensor(x, dtype=dtype).to(device).reshape(()) for x in lrs])
        else:
            lr = torch.tensor(lrs, dtype=dtype).to(device, non_blocking=True)

        k = self.k
        for p, *_ in entries:  # lazy state, created only after every check above has passed
            st = self.state[p]
            if "memory" not in st:
                st["memory"] = torch.zeros((k, *p.shape), dtype=p.dtype, device=p.device)

        scope_of = [e[3] for e in entries]
        present_scopes, scope_lengths = [], []
        for s in scope_of:
            if present_scopes and present_scopes[-1] == s:
                scope_lengths[-1] += 1
            else:
                present_scopes.append(s), scope_lengths.append(1)
        batch = StepBatch(
            params=[e[0] for e in entries],
            grads=[e[1] for e in entries],
            d=[self.state[e[0]]["memory"] for e in entries],
            v=None,
            group_of=[e[2] for e in entries],
            scope_of=scope_of,
            scope_lengths=scope_lengths,
            present_scopes=present_scopes,
            present_groups=sorted(set(e[2] for e in entries)),
            lr=lr,
            weight_decay=[0.0] * len(self.param_groups),
            scopes=scopes,  # an RLLCScopeState: step and law
            grad_scale=getattr(self, "grad_scale", None),
            found_inf=getattr(self, "found_inf", None),
        )
        return step_fn, batch

    # ----------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd[STATE_DICT_KEY].update(scope=self.scope, k=self.k)
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        name = type(self).__name__
        meta = state_dict.get(STATE_DICT_KEY)
        if meta is None:
            raise ValueError(
                f"{name}.load_state_dict: this state_dict has no {STATE_DICT_KEY!r} entry, so it was not "
                f"saved by an amm_kernels optimizer (keys: {sorted(state_dict)})"
            )
        if meta.get("optimizer") != name:
            raise ValueError(f"{name}.load_state_dict: this state_dict was saved by {meta.get('optimizer')}, not {name}")
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"{name}.load_state_dict: format_version {meta.get('format_version')!r} is not supported "
                f"(this version reads {FORMAT_VERSION})"
            )
        if meta.get("scope") != self.scope:
            raise ValueError(f"{name}.load_state_dict: saved with scope={meta.get('scope')!r}, "
                             f"this optimizer has scope={self.scope!r}")
        if meta.get("k") != self.k:
            raise ValueError(f"{name}.load_state_dict: saved with k = {meta.get('k')} memory units, "
                             f"this optimizer's memory has k = {self.k}")
        torch.optim.Optimizer.load_state_dict(self, {k: v for k, v in state_dict.items() if k != STATE_DICT_KEY})
        saved = meta["scopes"]
        if saved is None:
            self._scopes = None
        else:
            device = next((p.device for g in self.param_groups for p in g["params"]), torch.device("cpu"))
            self._scopes = RLLCScopeState.from_dict(saved, device, saved["step"].dtype)

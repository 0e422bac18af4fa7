"""RLLC: Retrospective Learning Law Correction with linear memory (SPEC.md section 4).

The class is AMOptimizer (torch.optim groups, scopes, state_dict, GradScaler found_inf/grad_scale,
backend dispatch, the StepBatch) with what differs declared through its hooks: k memory tensors per
parameter (one state tensor of shape (k, *param.shape)), a learning law per scope instead of a beta,
param groups that set only lr, and backends that implement `rllc_step`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from . import backends
from ._base import AMOptimizer
from ._step import copy_scopes, is_dtensor, restart_index
from ._hyper import F32_MAX, _is_number, check_range, state_dtype_for
from .memory import memory_rule, values_of

__all__ = ["RLLC", "RLLCHyper", "RLLCScopeState", "rllc_backends", "supports_rllc"]

RCOND = 1e-6  # relative eigenvalue cutoff of the pseudo-inverse of the k x k Gram matrix (SPEC.md 4)


def default_law_init(k: int) -> tuple[float, ...]:
    """law_init=None: all weight on the first memory unit, (1, 0, ..., 0)."""
    return (1.0,) + (0.0,) * (k - 1)


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
    def create(cls, n_scopes: int, n_groups: int, law_init, device, dtype) -> "RLLCScopeState":
        law = torch.tensor(law_init, dtype=dtype).reshape(1, -1).repeat(n_scopes, 1)
        return cls(step=torch.zeros(n_scopes, dtype=dtype).to(device), law=law.to(device))

    @staticmethod
    def shapes(n_scopes: int, n_groups: int, law_init) -> dict[str, tuple[int, ...]]:
        return {"step": (n_scopes,), "law": (n_scopes, len(law_init))}

    def matches(self, n_scopes: int, n_groups: int) -> bool:
        return self.step.numel() == n_scopes

    def grow(self, n_scopes: int, n_groups: int, law_init, kept=None, kept_groups=None) -> None:
        """Resize for scopes added by add_param_group (new scopes start at law_init, step 0), or for
        scopes that moved (kept: as ScopeState.grow; no rows are kept per group here but the group
        scopes', which come as kept)."""
        fresh = RLLCScopeState.create(n_scopes, n_groups, law_init, self.step.device, self.step.dtype)
        copy_scopes(self, fresh, ("step", "law"), kept)
        self.__dict__.update(fresh.__dict__)

    def restart(self, scopes: list[int], law_init) -> None:
        """Scopes `scopes` start again at law_init, step 0 (as ScopeState.restart)."""
        at = restart_index(scopes, self.step.device)
        self.step.index_fill_(0, at, 0)
        for j, value in enumerate(law_init):
            self.law[:, j].index_fill_(0, at, value)

    def to_dict(self) -> dict:
        return {name: getattr(self, name).clone() for name in self.FIELDS}

    # A tensor's checkpoint carrier (NOTE [checkpoint carriers] in _checkpoint.py): its scope's step and law.
    def tensor_rows(self, scope_of: Tensor, group_of: Tensor) -> Tensor:
        return torch.cat([self.step[scope_of, None], self.law[scope_of]], dim=1)

    def set_tensor_rows(self, scope_of: Tensor, group_of: Tensor, rows: Tensor) -> None:
        self.step[scope_of], self.law[scope_of] = rows[:, 0], rows[:, 1:]

    @classmethod
    def from_dict(cls, saved: dict, device, dtype) -> "RLLCScopeState":
        return cls(**{name: saved[name].to(device=device, dtype=dtype).clone() for name in cls.FIELDS})


def rllc_backends(device: torch.device | str = "cpu") -> list[str]:
    """The backends of available_backends(device) that implement RLLC, fastest first."""
    return backends.available_backends(device, op=RLLC.STEP_OP)


def supports_rllc(name: str, device: torch.device | str = "cpu") -> bool:
    """True when backend `name` can run RLLC steps on tensors of `device`."""
    return name in rllc_backends(device)


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
        lr (float or Tensor, default 0.01): step size c1, >= 0. (The arguments below are keyword-only.)
        law_lr (float, default 0.01): step size c2 of the law correction, >= 0 (0 freezes the law).
        memory (str or (U, b), default "M(0.9)+M(0)"): the memory units, joined by ``+``:
            ``M(beta)``: m <- beta m + g;  ``J(beta, j)``: a Jordan block of j units, m_1 <- beta m_1 + g,
            m_i <- beta m_i + m_{i-1};  ``C(r, phi)``: a rotation pair, (m_1, m_2) <- r (cos phi m_1 -
            sin phi m_2, sin phi m_1 + cos phi m_2) + (g, 0). Or an explicit pair (U, b) of a k x k
            propagator and k input weights: M <- M U + g b^T.
        law_init (sequence of k floats, default None = (1, 0, ..., 0)): the initial law L.
        scope (str, default "global"): one law for all parameters ("global"), one per param group
            ("group") or one per parameter tensor ("tensor").
        backend (str, default "auto"): a backend that implements RLLC ("torch", the reference;
            "cpu", "cuda", "triton"; see ``amm_kernels.rllc.rllc_backends()``), or "auto" for the
            fastest such.
        process_group (default None): the torch.distributed group over which the Gram and M^T g
            sums are all-reduced when each rank holds a shard of the parameters (as for AMSGD: None
            means the mesh's shard group for DTensor parameters, no reduction for plain ones).
        capturable (bool, default False): the step may be captured in a CUDA graph (parameters on
            the GPU; pass lr as a device tensor to change it between replays).
        state_dtype (torch.dtype or None, default None): the dtype of ``memory``. None: the
            parameter's dtype, as torch.optim. ``torch.float32``: float32 state for bfloat16 and float16
            parameters (float32 and float64 parameters keep their own), so that a run in bfloat16
            keeps its momentum to float32 precision; 2 more bytes per state element, in memory and
            in each step's traffic.

    ``optimizer.law`` is the current law as a device tensor: shape (k,) for ``scope="global"``, else
    (n_groups, k) / (n_tensors, k). State per parameter: ``memory``, shape (k, *param.shape), the
    parameter's dtype or ``state_dtype`` (arithmetic is float32 for float32/bfloat16/float16, float64 for float64).
    """

    STATE_NAMES = ("memory",)
    STEP_OP = "rllc_step"
    GROUP_KEYS = ("params", "lr")
    # RLLC has no weight decay (SPEC.md section 4); a loop written for AdamW may set it: 0 passes
    ZERO_ONLY_KEYS = ("weight_decay",)
    SCOPE_ARG = "scope"
    SCOPE_STATE = RLLCScopeState

    def __init__(self, params, lr=0.01, *, law_lr: float = 0.01, memory="M(0.9)+M(0)", law_init=None,
                 scope: str = "global", backend: str = "auto", process_group=None, capturable: bool = False,
                 state_dtype=None):
        name = type(self).__name__
        law_lr = check_range(name, "law_lr", law_lr, lo=0.0)  # a CPU tensor read, as lam and eps are
        U, b = memory_rule(memory, name)
        k = len(b)
        if law_init is None:
            law_init = default_law_init(k)
        if hasattr(law_init, "tolist") and not isinstance(law_init, (list, tuple)):  # a tensor or a numpy array
            law_init = values_of(name, "law_init", law_init)
        if not isinstance(law_init, (list, tuple)) or len(law_init) != k:
            raise ValueError(f"{name}: law_init must be a sequence of k = {k} numbers (one per memory unit), "
                             f"got {law_init!r}")
        for i, value in enumerate(law_init):
            if not _is_number(value) or not abs(value) <= F32_MAX:
                raise ValueError(f"{name}: law_init[{i}] must be a finite number, at most {F32_MAX!r} in magnitude "
                                 f"(the law is kept in float32), got {value!r}")
        self._hyper = RLLCHyper(law_lr=float(law_lr), U=U, b=b, law_init=tuple(float(v) for v in law_init))
        self._memory_arg = memory  # a group repeating it is not parsed again at every step
        super().__init__(params, dict(lr=lr), scope, backend, process_group, capturable, state_dtype)
        self.scope = scope

    # hooks of AMOptimizer ------------------------------------------------------------------------
    def _new_param_state(self, p: Tensor) -> dict[str, Tensor]:
        dtype = state_dtype_for(p.dtype, self.state_dtype)
        if is_dtensor(p):
            # A sharded parameter (FSDP2): its memory is sharded the same way, one dimension later (the
            # k units come first), so each rank holds (k, *local shard) and the state_dict stays a DTensor.
            # loaded, since p is one (NOTE [DTensor, looked up where loaded] in _step.py)
            from torch.distributed.tensor import DTensor, Shard

            local = p.to_local()
            memory = torch.zeros((self.k, *local.shape), dtype=dtype, device=local.device)
            placements = [Shard(pl.dim + 1) if isinstance(pl, Shard) else pl for pl in p.placements]
            shape = (self.k, *p.shape)
            stride = torch.empty(shape, device="meta").stride()
            return {"memory": DTensor.from_local(memory, p.device_mesh, placements, run_check=False, shape=shape,
                                                 stride=stride)}
        return {"memory": torch.zeros((self.k, *p.shape), dtype=dtype, device=p.device)}

    def _state_shapes(self, p: Tensor) -> dict[str, tuple[int, ...]]:
        return {"memory": (self.k, *p.shape)}

    def _complete_scopes(self, batch, prev_loss) -> None:
        from .reference.rllc_reference import complete_scopes

        complete_scopes(batch, self._hyper)

    def _sums_width(self) -> int:
        """The Gram entries and M^T g of a sharded step's all_reduce (every step: no adaptive=False)."""
        from .reference.rllc_reference import gram_pairs

        return len(gram_pairs(self.k)) + self.k

    def _wide_args(self):
        hp = self._hyper
        return {**super()._wide_args(), "law_lr": hp.law_lr, "memory": (hp.U, hp.b), "law_init": hp.law_init}

    def _normalise_wide(self, key, value):
        if key == "memory":
            if value is self._memory_arg or (isinstance(value, str) and value == self._memory_arg):
                return (self._hyper.U, self._hyper.b)
            return memory_rule(value, type(self).__name__)
        if key == "law_init" and value is None:
            return default_law_init(self.k)
        return value

    def _scope_init(self):
        return self._hyper.law_init

    def _meta_fields(self) -> dict[str, Any]:
        return {"scope": self.beta_scope, "k": self.k}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        meta = self._meta_of(state_dict) or {}
        if meta.get("optimizer") == type(self).__name__ and meta.get("k", self.k) != self.k:
            raise ValueError(f"{type(self).__name__}.load_state_dict: saved with k = {meta['k']} memory units, "
                             f"this optimizer's memory has k = {self.k}")
        super().load_state_dict(state_dict)

    # ---------------------------------------------------------------------------------------------
    @property
    def k(self) -> int:
        """The number of memory units."""
        return self._hyper.k

    @property
    def law(self) -> Tensor:
        """The current learning law on the parameters' device: (k,) for scope="global", else one row
        per group / parameter tensor (groups in order). A copy; reading it never synchronises."""
        scopes = self._scopes_as_listed()
        if scopes is None:
            n_scopes, n_groups = self._scope_counts()
            law = RLLCScopeState.create(n_scopes, n_groups, self._hyper.law_init, "cpu", torch.float32).law
        else:
            law = scopes.law.clone()
        return law.reshape(self.k) if self.beta_scope == "global" else law

    @property
    def beta(self):
        raise AttributeError("RLLC has no beta; its per-scope coefficients are optimizer.law")

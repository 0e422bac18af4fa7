"""What one optimizer step hands to a backend: the tensors, their bookkeeping, and the scope state.

Every backend (the pure-PyTorch reference, the C++/CUDA kernels, Triton) receives the same
`StepBatch` and implements the same two passes of SPEC.md: per-tensor sums, then beta per scope,
then the elementwise update. The optimizer classes build the batch; backends never look at
`param_groups`.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor

from ._aliasing import repeats_elements


# NOTE [DTensor, looked up where loaded]: DTensor parameters (FSDP2 fully_shard, tensor parallel) are
# torch.distributed.tensor's, whose import takes ~0.6 s (sympy, its sharding rules) on the 2-core CI
# VM: nearly all of `import amm_kernels` (0.59 s after torch; 0.02 s without it). A DTensor exists only
# once that module is loaded, so the package never imports it: it looks the class up in sys.modules
# where it asks. What this saves is small: the first torch.optim optimizer a process makes (ours
# too: Optimizer.add_param_group is wrapped by torch._disable_dynamo) imports torch._dynamo, ~1.1 s,
# which loads the module anyway. It is saved where the package is imported and no optimizer made
# (a spawned DataLoader worker re-importing the script, tools asking available_backends()).
# (Under torch.compile dynamo traces the lookup as a constant.)
def dtensor_class() -> type | None:
    """torch's DTensor class where torch.distributed.tensor is loaded, else None."""
    module = sys.modules.get("torch.distributed.tensor")
    return getattr(module, "DTensor", None)


def is_dtensor(t) -> bool:
    cls = dtensor_class()
    return cls is not None and isinstance(t, cls)


def local_shard(t: Tensor) -> Tensor:
    """A DTensor's local shard (the same storage: in-place updates reach the DTensor); else t itself."""
    return t.to_local() if is_dtensor(t) else t


def scope_dtype(dtypes) -> torch.dtype:
    """The dtype of the scope state (and of the step's scalars) for parameters of `dtypes`: float64 if
    one of them is, else float32."""
    return torch.float64 if any(dt == torch.float64 for dt in dtypes) else torch.float32


def capturing(device: torch.device) -> bool:
    """Whether the current stream is capturing a CUDA graph (never on other devices). Under torch.compile
    it is not asked (constant False): dynamo folds is_compiling(), so a compiled step keeps no branch
    (a fullgraph trace refuses is_current_stream_capturing())."""
    return device.type == "cuda" and not torch.compiler.is_compiling() and torch.cuda.is_current_stream_capturing()

def check_real_gradient(i: int, g: Tensor) -> None:
    """TypeError for a complex gradient (tensor i of the step), whose real part alone would be read.
    Called where a gradient of another dtype than its parameter's is converted (the C++ glue has its own)."""
    if g.is_complex():
        raise TypeError(f"tensor {i} of this step: gradients must be real, got {g.dtype}")


def check_fits(params, grads, states, units: int | None = None) -> None:
    """NOTE [state fits]: ValueError unless every gradient has its parameter's shape and every state
    tensor (each list in `states`: d, v or RLLC's memory) the parameter's shape, or (units, *p.shape)
    where `units` is given (RLLC's k), and no parameter or state tensor repeats elements in memory
    (check_writable). (Shapes, not element counts only: the reference refuses a
    gradient of another shape with as many elements, and so do the C++ glue and triton where its table
    is looked up anew; triton walks such a view put at the tensor's own address, of a gradient, a
    parameter or a state tensor, as the flat array it is: its table key holds element counts,
    tensor_table.py.) TypeError for a complex gradient of a real
    parameter (check_real_gradient).
    A parameter resized in place after it took steps (p.data = a bigger tensor) no longer fits its
    state, nor a gradient set through .grad.data its parameter: triton's address tables would have its
    kernels read and write past their ends, and the reference would update the tensors before the misfit
    and then fail. The backends call this before they change anything ("cpu" and "cuda" check the same
    in their C++ glue); on the hot path only where it is cheap (triton: when a table is looked up anew)."""
    for i, (p, g) in enumerate(zip(params, grads)):
        if g.dtype != p.dtype:
            check_real_gradient(i, g)
        if g.shape != p.shape:
            raise ValueError(f"tensor {i} of this step: its gradient has shape {tuple(g.shape)}, the parameter "
                             f"{tuple(p.shape)}")
        check_writable(i, p, "parameter")
        need = tuple(p.shape) if units is None else (units, *p.shape)
        for ts in states:
            t = ts[i]
            if tuple(t.shape) != need:
                raise ValueError(f"tensor {i} of this step: its optimizer state has shape {tuple(t.shape)}, the "
                                 f"parameter needs {need} (was the parameter resized after it took steps? "
                                 "then reset its state: del optimizer.state[p])")
            check_writable(i, t, "optimizer state")


def check_writable(i: int, t: Tensor, what: str) -> None:
    """ValueError for a tensor the step writes whose elements share memory (made by expand() after the
    optimizer took it: construction refuses such a parameter, NOTE [aliased parameters]). Writing it fails
    only after the other tensors were written; a contiguous tensor (the usual one) is not looked at."""
    if not t.is_contiguous() and repeats_elements(t):
        raise ValueError(f"tensor {i} of this step: its {what} (shape {tuple(t.shape)}, strides {t.stride()}) "
                         "repeats elements in memory (made by expand()): no in-place update can write it; give "
                         "it a tensor of its own (.contiguous() or .clone())")


def copy_scopes(old, fresh, names: tuple[str, ...], kept=None) -> None:
    """The per-scope rows `names` of scope state `old` into `fresh`: the first ones (as many as both
    hold), or with kept = (new positions, old positions) row old[kept[1][i]] into fresh[kept[0][i]]."""
    for name in names:
        src, dst = getattr(old, name), getattr(fresh, name)
        if kept is None:
            n = min(src.shape[0], dst.shape[0])
            dst[:n] = src[:n]
        elif kept[0]:
            # index lists from the host: a copy, made only when the parameters were rearranged by hand
            new_at, old_at = (torch.tensor(k, dtype=torch.long).to(src.device) for k in kept)
            dst[new_at] = src[old_at]


def restart_index(scopes: list[int], device) -> Tensor:
    """The scopes that start again, as a device index. A copy from the host (as StepBatch.index makes on a
    first step), made only at a step that makes state anew: one copy where a fill per scope would be three
    launches per tensor on a first step under the tensor scope."""
    return torch.tensor(scopes, dtype=torch.long).to(device, non_blocking=True)


@dataclass
class ScopeState:
    """Optimizer-wide scalars, kept on the parameters' device so that step() never syncs.

    step[s]:      steps that beta scope s has taken (float, like torch.optim's `step`).
    beta[s]:      the last beta of scope s (beta_max before the first step).
    beta_prod[s]: product of the betas of all earlier steps of scope s (AMAdamW's bias correction).
    prev_lr[g]:   the lr group g moved with on its previous step (0 before it first moved).
    prev_loss:    the closure's loss at the previous step (delta_f="loss").
    """

    step: Tensor
    beta: Tensor
    beta_prod: Tensor
    prev_lr: Tensor
    prev_loss: Tensor

    FIELDS = ("step", "beta", "beta_prod", "prev_lr", "prev_loss")

    @classmethod
    def create(cls, n_scopes: int, n_groups: int, beta_max: float, device, dtype) -> "ScopeState":
        z = dict(device=device, dtype=dtype)
        return cls(
            step=torch.zeros(n_scopes, **z),
            beta=torch.full((n_scopes,), beta_max, **z),
            beta_prod=torch.ones(n_scopes, **z),
            prev_lr=torch.zeros(n_groups, **z),
            prev_loss=torch.zeros((), **z),
        )

    @staticmethod
    def shapes(n_scopes: int, n_groups: int, beta_max: float) -> dict[str, tuple[int, ...]]:
        return {"step": (n_scopes,), "beta": (n_scopes,), "beta_prod": (n_scopes,), "prev_lr": (n_groups,),
                "prev_loss": ()}

    def matches(self, n_scopes: int, n_groups: int) -> bool:
        return self.step.numel() == n_scopes and self.prev_lr.numel() == n_groups

    def grow(self, n_scopes: int, n_groups: int, beta_max: float, kept=None, kept_groups=None) -> None:
        """Resize for scopes and groups added by add_param_group (new entries start fresh), or, with
        kept = (new positions, old positions), for scopes that moved (NOTE [tensor scopes follow their
        tensors] in _base.py): scope kept[1][i] becomes scope kept[0][i], the others start fresh; the
        same for the group rows (prev_lr) with kept_groups."""
        fresh = ScopeState.create(n_scopes, n_groups, beta_max, self.step.device, self.step.dtype)
        copy_scopes(self, fresh, ("step", "beta", "beta_prod"), kept)
        copy_scopes(self, fresh, ("prev_lr",), kept_groups)
        fresh.prev_loss.copy_(self.prev_loss)
        self.__dict__.update(fresh.__dict__)

    def restart(self, scopes: list[int], beta_max: float) -> None:
        """Scopes `scopes` start again as new ones do (NOTE [a reset tensor restarts its scope] in _base.py)."""
        at = restart_index(scopes, self.step.device)
        self.step.index_fill_(0, at, 0)
        self.beta.index_fill_(0, at, beta_max)
        self.beta_prod.index_fill_(0, at, 1)

    def to_dict(self) -> dict:
        return {name: getattr(self, name).clone() for name in self.FIELDS}

    # A tensor's checkpoint carrier (NOTE [checkpoint carriers] in _checkpoint.py): one row per tensor, its
    # scope's step, beta, beta_prod, its group's prev_lr, and prev_loss.
    def tensor_rows(self, scope_of: Tensor, group_of: Tensor) -> Tensor:
        return torch.stack([self.step[scope_of], self.beta[scope_of], self.beta_prod[scope_of],
                            self.prev_lr[group_of], self.prev_loss.expand(scope_of.numel())], dim=1)

    def set_tensor_rows(self, scope_of: Tensor, group_of: Tensor, rows: Tensor) -> None:
        self.step[scope_of], self.beta[scope_of], self.beta_prod[scope_of] = rows[:, 0], rows[:, 1], rows[:, 2]
        self.prev_lr[group_of] = rows[:, 3]
        self.prev_loss.copy_(rows[0, 4])

    @classmethod
    def from_dict(cls, saved: dict, device, dtype) -> "ScopeState":
        return cls(**{name: saved[name].to(device=device, dtype=dtype).clone() for name in cls.FIELDS})


def with_reduced_found_inf(args: tuple, found_inf: Tensor | None, batch: "StepBatch") -> tuple:
    """A fused backend's op arguments with `found_inf` (the tensor object among them) replaced by the
    all-reduced one (StepBatch.all_reduce_sums), so that every rank's second half skips together."""
    if found_inf is None:
        return args
    reduced = batch.found_inf.detach().to(found_inf.device)
    return tuple(reduced if a is found_inf else a for a in args)


@dataclass
class StepBatch:
    """The tensors of one step, in scope order (each scope's tensors are contiguous).

    params, grads: the parameters that have a gradient this step, and those gradients as given
        (before grad_scale, maximize or weight decay are applied: backends do that in their kernels).
    d, v: the momentum / first moment (d) and AMAdamW's second moment (v), one per parameter.
    group_of[i], scope_of[i]: host ints, the param group and beta scope of tensor i.
    scope_lengths: how many consecutive tensors each present scope has (present_scopes order).
    present_scopes, present_groups: scopes / groups with at least one tensor in this step.
    lr: this step's lr per group, a device tensor [G] (an lr given as a tensor stays on device).
    weight_decay: per group, host floats.
    loss: the closure's loss (0-d tensor) in delta_f="loss" mode, else None.
    grad_scale, found_inf: from torch.amp.GradScaler (or None): grads are divided by grad_scale,
        and a found_inf > 0 skips the whole step, leaving every state tensor unchanged.
    process_group: None, or the torch.distributed group whose ranks each hold a shard of the model
        (FSDP2, hand-sharded parameters): the per-scope sums behind beta are all-reduced over it, so
        beta is the whole model's (SPEC.md section 3). The tensors here are the local shards.
    index_cache: device copies of the host index lists, shared across steps by the optimizer (so a
        step copies nothing host-to-device once warm: CUDA-graph capturable).
    device_tables: the optimizer's store for a backend's own device tables across steps (the triton
        backend's: NOTE [tables and graphs] in triton_kernels/tensor_table.py); they live and die
        with the optimizer, and one optimizer's tables never evict another's.
    """

    params: list[Tensor]
    grads: list[Tensor]
    d: list[Tensor]
    v: list[Tensor] | None
    group_of: list[int]
    scope_of: list[int]
    scope_lengths: list[int]
    present_scopes: list[int]
    present_groups: list[int]
    lr: Tensor
    weight_decay: list[float]
    scopes: ScopeState
    loss: Tensor | None = None
    grad_scale: Tensor | None = None
    found_inf: Tensor | None = None
    process_group: object | None = None
    index_cache: dict = field(default_factory=dict)
    device_tables: dict = field(default_factory=dict)
    # set by all_reduce_sums (sharded steps): the reduced sums, and which scopes and groups stepped on
    # some rank (device bools)
    reduced_sums: Tensor | None = None
    scopes_anywhere: Tensor | None = None
    groups_anywhere: Tensor | None = None

    def all_reduce_sums(self, sums: Tensor) -> Tensor:
        """This rank's per-scope sums ([n_scopes, width] float64, a row per scope of the optimizer at
        the scope's index, zeros where this rank holds none of its tensors) added up over the
        process_group in one all_reduce (no host sync); returns the reduced [n_scopes, width].
        NOTE [sums by scope]: ranks may hold different scopes (torch's ZeroRedundancyOptimizer can
        leave a rank none of a param group's tensors, a rank can have no gradient at all), so every rank
        hands the all_reduce the same shape, row s always meaning scope s. The C++/CUDA scope-sums ops
        and triton's finalize write their sums in this layout themselves. Riding along: a flag per
        scope and per group, 1 where this rank steps it, so that after the reduce every rank knows
        which scopes and groups stepped anywhere (scopes_anywhere, groups_anywhere) and can count
        the step of a scope it holds no gradient of (NOTE [scopes stepped elsewhere], _base.py); and
        the GradScaler's found_inf, replaced by the sum over the ranks, so that an inf on any rank
        skips the step on all of them (a plain GradScaler sees only its rank's gradients). Every
        backend reads found_inf for its skip only after this."""
        n_scopes, n_groups = self.scopes.step.numel(), self.lr.numel()
        flags = sums.new_zeros(n_scopes + n_groups)
        flags[:n_scopes].index_fill_(0, self.index("present_scopes"), 1.0)
        flags[n_scopes:].index_fill_(0, self.index("present_groups"), 1.0)
        parts = [sums.reshape(-1), flags]
        found_inf = self.found_inf
        if found_inf is not None:  # one rank's inf skips the step on every rank, as in one process
            parts.append(found_inf.detach().reshape(1).to(sums.device, sums.dtype, non_blocking=True))
        flat = torch.cat(parts)
        dist.all_reduce(flat, group=self.process_group)
        n = sums.numel()
        self.scopes_anywhere = flat[n:n + n_scopes] > 0
        self.groups_anywhere = flat[n + n_scopes:n + n_scopes + n_groups] > 0
        if found_inf is not None:  # what the rest of the step (the backend's second half) reads
            self.found_inf = flat[-1:].to(found_inf.dtype).view(found_inf.shape)
        self.reduced_sums = flat[:n].view(sums.shape)
        return self.reduced_sums

    def all_reduce_scope_sums(self, per_scope: Tensor) -> Tensor:
        """all_reduce_sums for sums given in present_scopes order ([n_present, width]); returns the
        reduced rows in the same order."""
        scopes = self.index("present_scopes")
        full = per_scope.new_zeros((self.scopes.step.numel(), *per_scope.shape[1:]))
        full.index_copy_(0, scopes, per_scope)
        return self.all_reduce_sums(full).index_select(0, scopes)

    def index(self, name: str) -> Tensor:
        """A host list of this batch (present_scopes, scope_of, ...) as a device int64 tensor."""
        values = getattr(self, name)
        key = (name, self.scopes.step.device, tuple(values))
        if key not in self.index_cache:
            self.index_cache[key] = torch.tensor(values, dtype=torch.long).to(self.scopes.step.device, non_blocking=True)
        return self.index_cache[key]

    @property
    def scope_pos(self) -> list[int]:
        """For each tensor, the position of its scope in present_scopes."""
        return [i for i, n in enumerate(self.scope_lengths) for _ in range(n)]

    @property
    def skip(self) -> Tensor | None:
        """A 0-d bool device tensor: True when the GradScaler found an inf (step skipped)."""
        if self.found_inf is None:
            return None
        return self.found_inf.reshape(()).to(self.scopes.step.device, non_blocking=True) > 0

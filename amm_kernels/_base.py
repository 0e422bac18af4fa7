"""torch.optim plumbing shared by AMSGD, AMAdamW and RLLC: groups, lazy state, scopes, AMP (the checkpoint
format, state_dict and load_state_dict, is in _checkpoint.py).

The classes in amsgd.py / amadamw.py only declare their hyperparameters and state tensors; this
module turns `param_groups` into a `StepBatch` and hands it to the chosen backend.
"""
from __future__ import annotations

import copy
import numbers
from typing import Any, Callable

import torch
from torch import Tensor

from . import backends
from ._aliasing import first_overlap, first_self_overlap
from ._hyper import (BETA_SCOPES, FOREIGN_GROUP_KEYS, _is_number, check_choice, check_flag, check_group,
                     check_process_group, check_state_dtype, state_dtype_for)
from ._checkpoint import _ABSENT, CARRIER_KEYS, SCOPE_ENTRY, CheckpointMixin, _carries_row, _needs_stand_ins
from ._step import ScopeState, StepBatch, capturing, dtensor_class, local_shard, scope_dtype


def _on_device(x, dtype: torch.dtype, device: torch.device) -> Tensor:
    """x (a number, or a 1-element tensor on any device) as a 0-d `dtype` tensor on `device`, made there
    (NOTE [no copies from the host]): a host value, a CPU tensor's too, becomes a fill."""
    if isinstance(x, Tensor):
        if x.device.type != "cpu" or device.type == "cpu":
            return x.detach().to(device=device, dtype=dtype).reshape(())
    return torch.full((), float(x), dtype=dtype, device=device)  # float() of a CPU tensor reads host memory only


def _plain(x):
    """A value as the constructor reads it: CPU tensors and numpy values as numbers (or tuples), numbers
    and flags as floats (1 is True), sequences as tuples; anything else (a string, a process group) as it is."""
    if isinstance(x, Tensor) and x.device.type == "cpu":
        x = x.item() if x.numel() == 1 else x.tolist()
    elif type(x).__module__ == "numpy" and hasattr(x, "tolist"):  # an array or a numpy scalar (np.bool_ too)
        x = x.tolist()
    if isinstance(x, numbers.Real):
        return float(x)
    if isinstance(x, (list, tuple)):
        return tuple(_plain(y) for y in x)
    return x


def _same(a, b) -> bool:
    """Whether a group's value of an optimizer-wide argument equals the optimizer's."""
    if a is b:
        return True
    a, b = _plain(a), _plain(b)
    return not isinstance(a, Tensor) and not isinstance(b, Tensor) and type(a) is type(b) and a == b


def _tensor_or_none(x):
    """A GradScaler's grad_scale / found_inf on a rank with no gradient: GradScaler sums the found_inf
    of no tensor to the int 0 there, which is no inf."""
    return x if isinstance(x, Tensor) else None




def _cuda_capturing() -> bool:
    """Whether the current CUDA stream is capturing a graph (False without CUDA)."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _device_of_group(group) -> torch.device:
    """Where a rank without tensors hands its zeros to a process group's all_reduce, so that they meet
    the other ranks' sums in the same collective backend: the current GPU where the group has NCCL
    (NCCL reduces only there; a mixed "cpu:gloo,cuda:nccl" group, init_process_group()'s default on a
    GPU machine, reduces GPU tensors through it, and the models of such runs are on the GPU), else
    the CPU (gloo)."""
    backend = str(torch.distributed.get_backend(group)).lower()
    if "nccl" in backend and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class AMOptimizer(CheckpointMixin, torch.optim.Optimizer):
    """Base class of every optimizer here. A subclass sets `_hyper` (a frozen dataclass) before calling
    __init__, and declares what differs through these class attributes and the small hooks below."""

    STATE_NAMES: tuple[str, ...] = ()  # per-parameter state tensors: d (and v), or RLLC's memory
    STEP_OP: str = ""  # the backend function that runs one step: "amsgd_step", "amadamw_step", ...
    GROUP_KEYS: tuple[str, ...] = ("params", "lr", "weight_decay")  # what a param group may set
    ZERO_ONLY_KEYS: tuple[str, ...] = ()  # arguments of other optimizers a group may hold only as 0 (RLLC: weight_decay)
    SCOPE_ARG = "beta_scope"  # the constructor argument naming the scope
    SCOPE_STATE = ScopeState  # the optimizer-wide per-scope state
    # GradScaler hands us grad_scale and found_inf (as attributes) instead of unscaling on the host.
    _step_supports_amp_scaling = True

    def __init__(self, params, defaults: dict[str, Any], beta_scope: str, backend: str,
                 process_group=None, capturable: bool = False, state_dtype=None):
        name = type(self).__name__
        check_choice(name, self.SCOPE_ARG, beta_scope, BETA_SCOPES)
        check_choice(name, "backend", backend, backends.BACKEND_NAMES)
        self._check_group_hypers(defaults)
        self.beta_scope = beta_scope
        self.backend = backend
        self.process_group = check_process_group(name, process_group)
        self.capturable = check_flag(name, "capturable", capturable)
        self.state_dtype = check_state_dtype(name, state_dtype)
        self._wide = self._wide_args()  # fixed from here on (NOTE [wide keys in groups])
        self._wide_names = frozenset(self._wide)  # dynamo traces frozenset.isdisjoint, not dict_keys'
        self._scopes: ScopeState | None = None
        self._layout: list = []  # the tensors tensor scopes are ordered by; [] until known (NOTE [tensor scopes follow their tensors])
        self._group_layout: list = []  # the groups (dicts) the per-group rows are ordered by; [] until known (the same NOTE)
        self._index_cache: dict = {}  # device index tensors and lr, reused across steps (no H2D copy once warm)
        self._in_graphs: dict = {}  # id -> tensor: what a captured step read from _index_cache (NOTE [kept for graphs])
        self._device_tables: dict = {}  # the backends' own, kept across steps (StepBatch.device_tables)
        self._resolved: dict = {}  # (backend, device, dtypes) -> backend module
        self._late_pending: list = []  # NOTE [late tensors, sharded]
        self._constructed = False  # add_param_group leaves the aliasing check to the end of __init__
        super().__init__(params, defaults)
        self._refuse_aliases([p for g in self.param_groups for p in g["params"]])
        self._constructed = True
        self._prefill_backend_cache()

    # ----------------------------------------------------------------------------------------------
    # copies and printing
    # What pickle and copy.deepcopy carry besides torch.optim's defaults, state and param_groups: the
    # optimizer-wide settings and the scope state (step counts, beta). The caches are made anew.
    _PICKLED = ("_hyper", "beta_scope", "scope", "backend", "process_group", "capturable", "state_dtype", "_scopes",
                "_warned_late_state", "_memory_arg")

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.update({k: self.__dict__[k] for k in self._PICKLED if k in self.__dict__})
        if state.get("_scopes") is not None:
            state["_scopes"] = self._scopes_view()  # the copy's scopes in its param_groups' order
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        had_differentiable = "differentiable" in state.get("defaults", {})
        super().__setstate__(state)
        if not had_differentiable:  # torch.optim's __setstate__ adds it; not an argument here
            self.defaults.pop("differentiable", None)
        # load_state_dict ends in __setstate__ too: there the caches stay (keyed by the tensors' addresses and
        # values, they rebase to the loaded state; and a captured graph may still read what _in_graphs keeps);
        # pickle and deepcopy make an object without them (_PICKLED leaves them out): they start empty
        for name in ("_index_cache", "_in_graphs", "_device_tables", "_resolved"):
            self.__dict__.setdefault(name, {})
        self.__dict__.setdefault("state_dtype", None)  # pickled before state_dtype existed
        self._add_missing_stand_ins()  # pickled before the stand-ins (NOTE [checkpoint carriers])
        self.__dict__.setdefault("_late_pending", [])
        self._layout = []  # (a copy's, or a loaded checkpoint's, scopes are in its param_groups' order)
        self._group_layout = []
        self._wide = self._wide_args()
        self._wide_names = frozenset(self._wide)
        self._prefill_backend_cache()

    def __deepcopy__(self, memo: dict):
        # a torch.distributed group cannot be copied: the copy reduces over the same one
        if self.process_group is not None:
            memo[id(self.process_group)] = self.process_group
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        new.__setstate__(copy.deepcopy(self.__getstate__(), memo))
        return new

    def __repr__(self) -> str:
        wide = ", ".join(f"{k}={v!r}" for k, v in self._wide.items() if k != "process_group")
        return super().__repr__().replace(" (", f" ({wide}", 1)

    # ----------------------------------------------------------------------------------------------
    # param groups
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        name = type(self).__name__
        foreign = sorted(k for k in param_group if k in FOREIGN_GROUP_KEYS and k not in self.GROUP_KEYS
                         and k not in self._wide and k not in self.ZERO_ONLY_KEYS)  # NOTE [foreign group keys]
        if foreign:
            allowed = " and ".join(k for k in self.GROUP_KEYS if k != "params")
            raise ValueError(
                f"{name}: a param group may set only {allowed}; {', '.join(foreign)} "
                f"{'is' if len(foreign) == 1 else 'are'} not an {name} argument (another optimizer's, which "
                f"{name} would ignore); keys that are no optimizer's argument (a name) are kept"
            )
        self._check_group_hypers({**self.defaults, **param_group})
        params = param_group["params"]
        if not isinstance(params, set):  # torch.optim refuses a set (its order changes between runs)
            params = [params] if isinstance(params, Tensor) else list(params)
            tensors = [p[1] if isinstance(p, tuple) and len(p) == 2 else p for p in params]  # (name, tensor) too
            for p in tensors:
                if isinstance(p, Tensor) and p.is_complex():
                    raise TypeError(f"{name}: complex parameters are not supported (got {p.dtype}); optimize "
                                    "torch.view_as_real(p) as a real parameter instead")
            if len({id(p) for p in tensors}) != len(tensors):
                raise ValueError(f"{name}: a param group lists the same parameter twice; list each parameter once")
            param_group["params"] = params  # in place, as torch.optim does: the caller may keep the dict
            if getattr(self, "_constructed", True):  # a group added later (__init__ checks all at once)
                self._refuse_aliases([p for g in self.param_groups for p in g["params"]] + tensors)
        super().add_param_group(param_group)
        # grown (or, for an optimizer built without parameters, made) here, not in a possibly compiled
        # step, which would drop a scope state bound to the optimizer inside it (NOTE [compile])
        if getattr(self, "_scopes", None) is not None:
            self._fit_scopes()
        elif getattr(self, "_constructed", True):
            self._prefill_backend_cache()

    def _refuse_aliases(self, params: list) -> None:
        """ValueError if a parameter repeats an element in memory, or two of the parameters (in
        param_groups order) share one (NOTE [aliased parameters] in _aliasing.py)."""
        params = [p for p in params if isinstance(p, Tensor)]  # anything else: torch.optim's error
        local = [local_shard(p) for p in params]
        i = first_self_overlap(local)
        if i is not None:
            raise ValueError(
                f"{type(self).__name__}: parameter {i} (counted across param groups, shape {tuple(params[i].shape)}, "
                f"strides {local[i].stride()}) repeats elements in memory (made by expand()): no in-place update "
                "can write it; give the parameter as a tensor of its own (.contiguous() or .clone())")
        pair = first_overlap(local, keys=params)
        if pair is not None:
            i, j = pair
            shapes = ", ".join(str(tuple(params[k].shape)) for k in pair)
            raise ValueError(
                f"{type(self).__name__}: parameters {i} and {j} (counted across param groups, shapes {shapes}) "
                "share memory: each element must belong to one parameter (two nn.Parameters made from one "
                "tensor are one parameter: give it once)"
            )

    def _check_group_hypers(self, group: dict[str, Any], index: int | None = None, on_step: bool = False) -> None:
        """The per-group hyperparameters (GROUP_KEYS but params: lr, weight_decay), each in [0, inf).
        Checked when a group is given, when a state_dict is loaded, and at every step (a value set in
        param_groups by hand or by a scheduler), before anything is written."""
        keys = [k for k in self.GROUP_KEYS if k != "params"]
        check_group(type(self).__name__, group, keys, index=index, on_step=on_step)
        if len(group) > len(self.GROUP_KEYS) and not self._wide_names.isdisjoint(group):  # NOTE [wide keys in groups]
            self._check_wide_keys(group, index, on_step)
        for key in self.ZERO_ONLY_KEYS:
            # not an argument here, but a key code written for other optimizers sets (a weight-decay loop
            # written for AdamW): 0 in any form passes, anything else is refused, never silently ignored
            # as keys that are not arguments are (a scheduler's initial_lr)
            value = group.get(key, 0)
            if not (type(value) in (int, float) and value == 0) and _plain(value) != 0.0:
                where = "a param group" if index is None else f"param_groups[{index}]"
                raise ValueError(f"{type(self).__name__}: {where} sets {key}={value!r}, but {type(self).__name__} "
                                 f"has no {key.replace('_', ' ')}: remove the key or set it to 0")

    def _wide_args(self) -> dict[str, Any]:
        """The optimizer-wide constructor arguments and their values, as a group may repeat them."""
        return {self.SCOPE_ARG: self.beta_scope, "backend": self.backend, "process_group": self.process_group,
                "capturable": self.capturable, "state_dtype": self.state_dtype}

    def _check_wide_keys(self, group: dict[str, Any], index: int | None, on_step: bool = False) -> None:
        """NOTE [wide keys in groups]: torch's ZeroRedundancyOptimizer (and code written for torch.optim,
        where every argument is a group default) hands each param group every constructor argument.
        A group may repeat an optimizer-wide argument with the optimizer's own value; a different value
        (set in the group by hand, a OneCycleLR cycling betas, a checkpoint of another setting) is an
        error, never silently ignored. Keys that are not arguments (a scheduler's initial_lr) pass, and
        so does "capturable" inside step(): torch.compile's tracing of an optimizer sets
        group["capturable"] = True in every group (torch/_dynamo/variables/optimizer.py). This runs
        only for a group with more keys than GROUP_KEYS (one with a scheduler's initial_lr: at every
        step): _check_group_hypers calls it only where one of the group's keys is an argument."""
        wide = self._wide
        for key, value in group.items():
            if key in wide and not (on_step and key == "capturable") and not _same(self._normalise_wide(key, value), wide[key]):
                where = "a param group" if index is None else f"param_groups[{index}]"
                allowed = " and ".join(k for k in self.GROUP_KEYS if k != "params")
                raise ValueError(
                    f"{type(self).__name__}: {where} sets {key}={value!r}, but {key} is optimizer-wide "
                    f"({wide[key]!r} here): a param group may set only {allowed}, and may repeat an "
                    "optimizer-wide argument only with the optimizer's value"
                )

    def _normalise_wide(self, key: str, value):
        """A group's value of an optimizer-wide argument in the form _wide_args gives it."""
        return value

    def _new_param_state(self, p: Tensor) -> dict[str, Tensor]:
        """A parameter's state on its first step: zeros like the parameter, one per STATE_NAMES, in the
        state dtype (NOTE [state dtype] in _hyper.py)."""
        dtype = state_dtype_for(p.dtype, self.state_dtype)
        return {key: torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format) for key in self.STATE_NAMES}

    def _state_shapes(self, p: Tensor) -> dict[str, tuple[int, ...]]:
        """The shape of each state tensor of parameter p (what load_state_dict checks a checkpoint against)."""
        return {key: tuple(p.shape) for key in self.STATE_NAMES}

    def _match_state_dtypes(self, keys: list[Tensor], replaced: list[tuple[dict, dict]]) -> None:
        """Cast state to the dtype its parameter's state has (NOTE [state dtype] in _hyper.py) where they
        differ: the parameter's dtype changed (model.to(dtype)) since its state was made, or a
        checkpoint held state in another dtype. Appends (state dict, the tensors it had) to `replaced`
        before each one is changed, for _undo."""
        for k in keys:
            st = self.state[k]
            dtype = state_dtype_for(k.dtype, self.state_dtype)
            old = {key: st[key] for key in self.STATE_NAMES if st[key].dtype != dtype}
            if old:
                if not _carries_row(st):  # the stand-ins (NOTE [checkpoint carriers]) follow the state
                    old.update({key: st[key] for key in CARRIER_KEYS if key in st})
                replaced.append((st, old))
                st.update({key: t.to(dtype) for key, t in old.items()})

    def _undo(self, made) -> None:
        """NOTE [refused steps]: a backend refuses a step before it writes anything (a misfit, NOTE
        [state fits]; a dtype or device it does not take), but by then _build_batch has made the zero
        state of tensors stepping for the first time, cast state to new parameter dtypes and put
        stand-ins in state made by hand (NOTE [checkpoint carriers] in _checkpoint.py). A refused
        step leaves the optimizer as it was: those are taken back here (eager only; a compiled step
        has no handler, and its failure leaves them). So is what the step did to the scope state: moved to
        the parameters' new dtype or device (float64 -> float32 rounds it), fitted to the param groups,
        made, or given a checkpoint's rows. The same undo runs when making that state fails part-way (out
        of memory): each change is recorded before it is made."""
        keys, fresh, _, _, replaced, scopes_before = made
        self._undo_changes(replaced, scopes_before)
        for i in fresh:  # state made by this step (an entry that held something before keeps it, less what the
            st = self.state.get(keys[i])  # step added; an empty one, made by the lookup, goes)
            if not st or self.STATE_NAMES[0] in st:
                self.state.pop(keys[i], None)

    def _undo_changes(self, replaced, scopes_before) -> None:
        """Put back the scope state (_scopes_before) and each state dict's entries recorded in `replaced`."""
        self._restore_scopes(scopes_before)
        for st, old in reversed(replaced):  # (latest first: a cast saved the stand-ins made before it)
            for key, value in old.items():
                if value is _ABSENT:
                    st.pop(key, None)
                else:
                    st[key] = value

    def _scopes_before(self):
        """What _restore_scopes needs to put the scope state back as it is now (NOTE [refused steps]): the
        object, its fields and the tensors the tensor scopes are ordered by, and the values of fields a
        checkpoint's rows are written into (_keep_scope_values). The fields are references: a move or a
        fit replaces them and writes none of them."""
        scopes = self._scopes
        layouts = list(self._layout), list(self._group_layout)
        fields = None if scopes is None else {name: getattr(scopes, name) for name in scopes.FIELDS}
        return scopes, fields, layouts, {}

    def _keep_scope_values(self, before):
        """`before` with a copy of the values of each field that is still the live one (before a checkpoint's
        rows are written into it): _restore_scopes writes them back into the same tensor (a captured graph and
        a compiled step hold it: NOTE [compile], NOTE [kept for graphs])."""
        scopes, fields, layout, _ = before
        live = {} if fields is None else {name: t.clone() for name, t in fields.items() if t is getattr(self._scopes, name)}
        return scopes, fields, layout, live

    def _restore_scopes(self, before) -> None:
        scopes, fields, (layout, group_layout), written = before
        if scopes is not None:  # (the same object: a compiled step keeps it, NOTE [compile])
            for name, value in fields.items():
                setattr(scopes, name, value)
            for name, values in written.items():
                getattr(scopes, name).copy_(values)
        self._scopes = scopes
        self._layout[:] = layout
        self._group_layout[:] = group_layout

    def _scope_init(self):
        """What a new scope starts from (its beta before any step)."""
        return self._hyper.beta_max

    def _meta_fields(self) -> dict[str, Any]:
        """Saved in state_dict and checked on load: a mismatch is an error, not a silent reshape."""
        return {self.SCOPE_ARG: self.beta_scope}

    # ----------------------------------------------------------------------------------------------
    # scopes
    def _scope_counts(self) -> tuple[int, int]:
        n_groups = len(self.param_groups)
        n_scopes = {
            "global": 1,
            "group": n_groups,
            "tensor": sum(len(g["params"]) for g in self.param_groups),
        }[self.beta_scope]
        return n_scopes, n_groups

    def _scope_state(self, device: torch.device, dtype: torch.dtype, moved: bool = True):
        """The scope state, made, moved to `device` and `dtype`, and fitted to the param groups. `moved`
        False: the caller has seen that the tensors are the ones the tensor scopes are ordered by."""
        if self._scopes is None:
            n_scopes, n_groups = self._scope_counts()
            self._scopes = self.SCOPE_STATE.create(n_scopes, n_groups, self._scope_init(), device, dtype)
            self._layout.clear()
            self._group_layout.clear()
        if self._scopes.step.device != device or self._scopes.step.dtype != dtype:
            # (the parameters' dtype or device changed) NOTE [compile]: set on the same object, whose
            # attribute updates a compiled step keeps; a new object bound to the optimizer it drops
            there = self.SCOPE_STATE.from_dict(self._scopes.to_dict(), device, dtype)
            for name in self.SCOPE_STATE.FIELDS:
                setattr(self._scopes, name, getattr(there, name))
        self._fit_scopes(moved)
        return self._scopes

    # NOTE [tensor scopes follow their tensors]: under beta_scope="tensor" scope s is the s-th tensor of
    # param_groups (all groups, in order), as a checkpoint numbers them. add_param_group appends tensors;
    # a hand edit of a group's "params" (a tensor inserted, removed or replaced: torch.optim, whose state
    # is keyed by the tensor, takes it) would move every later tensor onto another's step count, beta and
    # bias correction. So the tensors the scopes are ordered by are kept (self._layout), each step looks
    # whether param_groups still lists them in that order (one `is` per tensor, in _build_batch's loop),
    # and where not, each tensor's scope values follow it to its new position; a tensor new to the groups
    # starts a fresh scope, and a removed one's values are dropped (given back, it starts afresh).
    # The same for the rows kept per param group (prev_lr; the group scopes' step, beta, beta_prod), which
    # follow the group (its dict, as torch.optim's own keys do; a dict put in its place, the group it shares
    # the most tensors with) where groups are removed, reordered or replaced by hand (self._group_layout);
    # a group dict sharing no tensor with one before starts fresh ones. (A tensor moved into
    # another group takes that group's prev_lr: the lr its last step moved with is kept per group, not per
    # tensor, as SPEC.md section 3 keeps it.)
    # state_dict(), a read of beta / law and a copy (pickle, deepcopy) between a hand edit and the next
    # step see the scopes as the next step will (_scopes_view): each tensor's values at its new place.
    # They only look: the fit itself is the step's, so a read changes nothing that follows (a tensor
    # taken out and given back before the next step keeps its scope, read or not).
    def _fit_scopes(self, moved: bool = True) -> None:
        n_scopes, n_groups = self._scope_counts()
        kept, kept_groups = self._scope_moves(moved)
        if kept is not None or kept_groups is not None or not self._scopes.matches(n_scopes, n_groups):
            self._scopes.grow(n_scopes, n_groups, self._scope_init(), kept, kept_groups)
        # (after grow: where it fails, the scopes and the order they follow are both left as they were,
        # and the next fit moves them)
        if moved and self.beta_scope == "tensor":
            self._layout[:] = [p for g in self.param_groups for p in g["params"]]  # in place (NOTE [compile])
        if kept_groups is not None or len(self._group_layout) != n_groups:
            self._group_layout[:] = self.param_groups

    def _scope_moves(self, moved: bool = True):
        """(kept, kept_groups) for grow(): the scope rows and the group rows that moved, each None where
        none did. Only looks."""
        kept_groups = self._moved_groups()
        if self.beta_scope == "group":
            return kept_groups, kept_groups
        return (self._moved_tensor_scopes() if moved else None), kept_groups

    def _scopes_view(self):
        """The scope state as the next step will fit it to param_groups (None before there is one):
        the scope state itself where nothing moved, else a fitted copy; nothing here changes."""
        if self._scopes is None:
            return None
        n_scopes, n_groups = self._scope_counts()
        kept, kept_groups = self._scope_moves()
        if kept is None and kept_groups is None and self._scopes.matches(n_scopes, n_groups):
            return self._scopes
        view = self.SCOPE_STATE.from_dict(self._scopes.to_dict(), self._scopes.step.device, self._scopes.step.dtype)
        view.grow(n_scopes, n_groups, self._scope_init(), kept, kept_groups)
        return view

    def _scopes_as_listed(self):
        """What a read of beta or law reads: rows put in place without load_state_dict taken (NOTE
        [checkpoint carriers]; taking them fits the scope state, as it needs each row's position),
        then _scopes_view()."""
        self._take_pending_carriers()
        return self._scopes_view()

    def _moved_tensor_scopes(self) -> tuple[list[int], list[int]] | None:
        """(new positions, old positions) of the tensors whose scopes moved, or None where none did (the
        same tensors in the same order, perhaps more after them: grow() appends those). Only looks:
        _fit_scopes makes the tensors listed now the ones the scopes are ordered by."""
        if self.beta_scope != "tensor":
            return None
        current = [p for g in self.param_groups for p in g["params"]]
        old = self._layout
        if len(old) <= len(current) and all(a is b for a, b in zip(old, current)):
            return None
        at = {id(p): i for i, p in enumerate(old)}
        pairs = [(j, at[id(p)]) for j, p in enumerate(current) if id(p) in at]
        return [j for j, _ in pairs], [i for _, i in pairs]

    def _moved_groups(self) -> tuple[list[int], list[int]] | None:
        """(new positions, old positions) of the param groups whose rows moved (removed or reordered by
        hand), or None where none did (the same groups in the same order, perhaps more after them)."""
        current, old = self.param_groups, self._group_layout
        if len(old) <= len(current) and all(a is b for a, b in zip(old, current)):
            return None
        at = {id(g): i for i, g in enumerate(old)}
        pairs = [(j, at[id(g)]) for j, g in enumerate(current) if id(g) in at]
        taken = {i for _, i in pairs}
        # a dict put in place of a group (a copy, dict(group), perhaps with tensors added or taken out) is
        # the group it shares the most tensors with (the first of those, on a tie)
        owner = {id(p): i for i, g in enumerate(old) if i not in taken for p in g["params"]}
        for j, g in enumerate(current):
            if id(g) in at:
                continue
            shared: dict[int, int] = {}
            for p in g["params"]:
                i = owner.get(id(p))
                if i is not None and i not in taken:
                    shared[i] = shared.get(i, 0) + 1
            if shared:
                i = max(shared, key=lambda i: (shared[i], -i))
                pairs.append((j, i))
                taken.add(i)
        pairs.sort()
        return [j for j, _ in pairs], [i for _, i in pairs]

    @property
    def beta(self) -> Tensor:
        """The last beta on the parameters' device: 0-d for beta_scope="global", else one per group /
        per parameter tensor (groups in order). A copy; reading it never synchronises."""
        scopes = self._scopes_as_listed()
        if scopes is None:
            n_scopes, _ = self._scope_counts()
            beta = torch.full((n_scopes,), float(self._hyper.beta_max))
        else:
            beta = scopes.beta.clone()
        return beta.reshape(()) if self.beta_scope == "global" else beta

    # ----------------------------------------------------------------------------------------------
    # the step
    def _check_closure(self, closure):
        return None

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None):
        """Perform one optimization step. `closure` re-evaluates the model and returns the loss."""
        self._check_closure(closure)
        if self._late_pending and not torch.compiler.is_compiling() and not _cuda_capturing():
            self._poll_late()
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        batch, made = self._build_batch(loss)
        if batch is not None and not batch.params:  # NOTE [a rank without gradients]
            device = batch.scopes.step.device
            batch.all_reduce_sums(torch.zeros(batch.scopes.step.numel(), self._sums_width(), dtype=torch.float64,
                                              device=device))
            self._complete_scopes(batch, batch.scopes.prev_loss.clone() if self._uses_loss() else None)
            if capturing(device):  # NOTE [kept for graphs], below
                self._in_graphs.update((id(t), t) for t in self._index_cache.values())
        elif batch is not None:
            keys, fresh, group_of, had_state, _, _ = made
            if torch.compiler.is_compiling():  # folded by dynamo: no try in the graph
                completes, prev_loss, late_count = self._run_backend(batch, fresh)
            else:
                try:
                    completes, prev_loss, late_count = self._run_backend(batch, fresh)
                except BaseException:
                    self._undo(made)  # NOTE [refused steps]
                    raise
            if completes and batch.scopes_anywhere is not None:  # None: nothing was reduced (adaptive=False)
                self._complete_scopes(batch, prev_loss)
            if late_count is not None:
                self._report_late(late_count)
            elif fresh and had_state and self._watches_late_tensors() and not torch.compiler.is_compiling():
                self._on_late_state(keys, fresh, group_of)  # (sharded: what this rank's state shows; eager only)
            if capturing(batch.params[0].device):
                # NOTE [kept for graphs]: a captured graph reads the tensors of _index_cache that the step
                # used (the lrs, the index tensors) at their addresses at every replay. The cache lets
                # them go: an lr tensor when the float lrs change (a scheduler's), all of them past 256
                # entries. Freed, their memory could hold anything by the next replay: they are kept.
                self._in_graphs.update((id(t), t) for t in self._index_cache.values())
        return loss

    def _run_backend(self, batch: StepBatch, fresh: list[int]):
        """The backend's step, and what step() reads before it runs, returned: (whether this step completes
        scopes that stepped elsewhere, the loss before it for those scopes, the count of late tensors, NOTE
        [late tensors, sharded]). An error anywhere here, before the backend writes, is undone by step()."""
        module = self._backend_module(self.backend, batch.params[0].device, {p.dtype for p in batch.params})
        # a sharded step where a scope or group of this optimizer does not step here: it may have stepped
        # elsewhere (NOTE [scopes stepped elsewhere]); where every one steps here (FSDP2's usual step)
        # there is nothing to commit, and the completion's ~25 small ops are not run
        completes = batch.process_group is not None and (len(batch.present_scopes) < batch.scopes.step.numel()
                                                         or len(batch.present_groups) < batch.lr.numel())
        # the loss before this step, for those scopes (the backend commits this step's)
        prev_loss = batch.scopes.prev_loss.clone() if completes and self._uses_loss() else None
        # before the backend counts this step
        late_count = self._late_count(batch, fresh) if fresh and batch.process_group is not None else None
        getattr(module, self.STEP_OP)(batch, self._hyper)
        return completes, prev_loss, late_count

    def _sums_width(self) -> int | None:
        """Columns of the per-scope sums a sharded step all-reduces (num, den), or None where the step
        reduces nothing (adaptive=False: beta is beta_max)."""
        return 2 if self._hyper.adaptive else None

    _BIAS_CORRECTED = False  # AMAdamW: beta_prod is tracked (its bias correction)

    def _complete_scopes(self, batch: StepBatch, prev_loss: Tensor | None) -> None:
        """NOTE [scopes stepped elsewhere]: with sharded parameters, a scope (or group) may step on some
        ranks and not on others: ZeRO leaves a rank none of a group's tensors, a rank's tensors may
        get no gradient (frozen, or unused by its batch). A single process counts the step of every
        scope with a gradient anywhere, so every rank must: the all-reduced vector carries a flag per
        scope and group (StepBatch.all_reduce_sums), and after the backend's step each rank commits,
        for the scopes that stepped elsewhere only, what the stepping ranks committed: the step count,
        beta from the same reduced sums (and beta_prod), the groups' prev_lr, and the loss. So beta
        and the step counts are the same on every rank, as one process would have them, and a rank
        whose tensors start getting gradients later weights and counts them as the others do.
        Device-side and masked: no host sync. With adaptive=False nothing is reduced, so a rank
        counts only its own steps (AMAdamW's bias correction then follows that rank's count)."""
        from .reference.beta import complete_scopes

        complete_scopes(batch, self._hyper, prev_loss, self._BIAS_CORRECTED)

    def _backend_module(self, backend: str, device: torch.device, dtypes: set[torch.dtype]):
        """backends.resolve, remembered per (backend, device, dtypes). NOTE [compile]: the cache is filled
        at construction, so torch.compile(opt.step) finds the module in a dict and never traces
        resolve (which imports optional backends and may fail an import, which dynamo cannot trace)."""
        key = (backend, str(device), tuple(sorted(map(str, dtypes))))
        if key not in self._resolved:
            self._resolved[key] = backends.resolve(backend, device, dtypes, type(self).__name__, op=self.STEP_OP)
        return self._resolved[key]

    def _prefill_backend_cache(self) -> None:
        """The backend module and the scope state for the parameters given, made at construction.
        NOTE [compile]: torch.compile(opt.step) keeps in-place updates of tensors but drops attributes
        (re)bound on the optimizer inside the traced step, so nothing the step needs may be created there."""
        params = [local_shard(p) for g in self.param_groups for p in g["params"]]
        if not params:
            return
        self._scope_state_of(params)
        for backend in {self.backend, "torch"}:
            try:
                self._backend_module(backend, params[0].device, {p.dtype for p in params})
            except (RuntimeError, TypeError):
                pass  # step() raises it, with the same message, if it still applies then

    def _scope_state_of(self, params: list[Tensor]):
        """The scope state on the (local) parameters' device, in scope_dtype."""
        return self._scope_state(params[0].device, scope_dtype(p.dtype for p in params))

    def _reduce_group(self, params: list[Tensor]):
        """The group the sums are all-reduced over: `process_group` if given; else, for DTensor
        parameters, the mesh group of their Shard dimension (FSDP2; the shard group under HSDP); else
        None (plain parameters are whole on every rank, e.g. DDP: nothing to reduce)."""
        if self.process_group is not None:
            return self.process_group
        name = type(self).__name__
        dtensor = dtensor_class() or ()  # isinstance(p, ()) is False
        groups = []
        for p in params:
            if not isinstance(p, dtensor):
                groups.append(None)
                continue
            dims = [i for i, pl in enumerate(p.placements) if pl.is_shard()]
            if len(dims) > 1:
                raise NotImplementedError(
                    f"{name}: a parameter sharded over {len(dims)} mesh dimensions ({p.placements}) is not "
                    "supported (beta's sums would need a reduction over several groups); shard over one mesh dimension"
                )
            groups.append(p.device_mesh.get_group(dims[0]) if dims else None)
        first = groups[0]
        if any(g is not first for g in groups):
            raise RuntimeError(
                f"{name}: parameters are sharded over different process groups (or some are not sharded); "
                "beta's sums need one group: pass process_group= explicitly, or use one optimizer per sharding"
            )
        return first

    def _build_batch(self, loss) -> tuple[StepBatch | None, tuple | None]:
        """Collect every parameter with a gradient, validate all of it, then (only then) create state.
        NOTE [host time]: this runs on every step, once per parameter tensor, before the first kernel;
        on a GPU it is the whole cost of a small model's step. So each parameter is looked at in one
        pass, self.state is indexed once per parameter (a tensor's hash is a Python call), and the
        DTensor handling is skipped unless a parameter is one."""
        name = type(self).__name__
        scope_mode = self.beta_scope
        params, grads, group_of, scope_of = [], [], [], []
        tensor_index = 0
        layout = self._layout  # NOTE [tensor scopes follow their tensors]
        n_layout = len(layout) if scope_mode == "tensor" else -1
        moved = False
        for gi, group in enumerate(self.param_groups):
            self._check_group_hypers(group, index=gi, on_step=True)
            for p in group["params"]:
                if tensor_index < n_layout and layout[tensor_index] is not p:
                    moved = True
                g = p.grad
                if g is not None:
                    if g.is_sparse:
                        raise RuntimeError(f"{name} does not support sparse gradients")
                    if not p.is_floating_point():
                        raise TypeError(f"{name}: parameters must be floating point, got {p.dtype}")
                    params.append(p)
                    grads.append(g)
                    group_of.append(gi)
                    scope_of.append(0 if scope_mode == "global" else gi if scope_mode == "group" else tensor_index)
                tensor_index += 1
        if not params:
            return self._empty_sharded_batch(loss), None
        if len(self._index_cache) > 256:
            self._index_cache.clear()
        keys = params  # the parameters as the user holds them: the keys of self.state
        dtensor = dtensor_class()  # once a step, not per tensor (NOTE [host time])
        sharded = dtensor is not None and any(isinstance(p, dtensor) for p in params)
        process_group = self._reduce_group(keys) if (sharded or self.process_group is not None) else None
        if sharded:
            # DTensor parameters: the step runs on the local shards (views of the same storage).
            params, grads = [local_shard(p) for p in params], [local_shard(g) for g in grads]

        device = params[0].device
        for gi, p, g in zip(group_of, params, grads):
            if p.device != device or g.device != device:
                where = {"global": "the global beta scope", "group": f"param group {gi}", "tensor": "this optimizer"}
                raise RuntimeError(
                    f"{name}: all parameters and gradients must be on one device; found {device} and "
                    f"{p.device if p.device != device else g.device} in {where[self.beta_scope]} "
                    "(one optimizer per device is supported)"
                )
        self._check_loss(loss)

        dtypes = {p.dtype for p in params}
        dtype = scope_dtype(dtypes)
        loss = self._loss_on(loss, device, dtype)  # (before any state is made: a conversion may fail)
        if self.capturable and device.type not in ("cuda", "xpu"):
            raise RuntimeError(f"{name}: capturable=True needs parameters on a CUDA (or XPU) device, got {device}")
        self._backend_module(self.backend, device, dtypes)  # raises before any state exists
        scopes_before = self._scopes_before()
        try:
            scopes = self._scope_state(device, dtype, moved or tensor_index != n_layout)
            return self._collect_state(keys, params, grads, group_of, scope_of, device, dtype, loss, scopes,
                                       scopes_before, process_group, sharded)
        except BaseException:  # (a checkpoint's row of another setting is refused there; out of memory: NOTE [refused steps])
            self._restore_scopes(scopes_before)
            raise

    def _collect_state(self, keys, params, grads, group_of, scope_of, device, dtype, loss, scopes, scopes_before,
                       process_group, sharded) -> tuple[StepBatch, tuple]:
        """_build_batch's second half: each parameter's state (made, cast, given its checkpoint row), and
        the batch. The scope state is already on the device and fitted."""
        # NOTE [no copies from the host]: values made on the host reach the device as fills (torch.full: a
        # kernel with the value as its argument), never as copies: a copy from pageable host memory can
        # wait for the stream (a host synchronisation inside step()), and a CUDA graph capture refuses it.
        lr = self._lr_tensor(device, dtype)

        # lazy state, created only after every check above; one self.state lookup per parameter.
        # Shapes are the backends' to check (NOTE [state fits] in _step.py).
        names = self.STATE_NAMES
        state_dtype = self.state_dtype
        if torch.compiler.is_compiling():
            # NOTE [compile: the order of opt.state]: dynamo reaches a parameter's state entry by its position
            # in opt.state (the key is a tensor), and without this guards nothing of the keys' order: after
            # del opt.state[p] (made again at the end) or an entry moved by hand, a compiled step read every
            # later tensor's moments from another's entry. Iterating the keys makes it guard their order.
            tuple(self.state)
        d, v = [], ([] if len(names) > 1 else None)
        fresh, unmarked = [], []
        recast = carried = False
        for i, k in enumerate(keys):
            st = self.state[k]
            first = st.get(names[0])
            row = st.get(SCOPE_ENTRY)  # live state: a 0-d stand-in (NOTE [checkpoint carriers])
            if first is None or row is None or not isinstance(row, Tensor) or row.dim():
                carried |= row is not None  # no state yet, no stand-in, or a checkpoint's row: looked at below
                if first is None:
                    fresh.append(i)
                    d.append(None)
                    if v is not None:
                        v.append(None)
                    continue
                if _needs_stand_ins(st, names[0]):
                    unmarked.append(i)  # state made by hand, or a legacy stand-in
            want = k.dtype if state_dtype is None else state_dtype_for(k.dtype, state_dtype)
            d.append(first)
            recast |= first.dtype is not want
            if v is not None:
                v.append(st[names[1]])
                recast |= v[-1].dtype is not want  # (exp_avg_sq alone may differ: set by hand)
        # whether any tensor had state before this step, where some have none yet: a dict of self.state
        # may be empty (indexing it makes one: the loop above, or a user reading opt.state[p])
        had_state = bool(fresh) and (len(fresh) < len(keys) or any(self.state.values()))
        # checked before any state is made (raises on rows saved under another setting)
        pending = self._pending_carriers() if carried or (fresh and had_state) else []
        restart = self._restarted_scopes(keys, fresh, group_of, scope_of, had_state, process_group, scopes_before,
                                         pending)
        stand_ins, replaced = {}, []
        try:  # (each change is recorded in `replaced` before it is made: an error part-way is undone too)
            for i in unmarked:
                st = self.state[keys[i]]
                replaced.append((st, {key: st.get(key, _ABSENT) for key in CARRIER_KEYS}))  # for _undo
                self._add_stand_ins(st, stand_ins)
            for i in fresh:
                st = self.state[keys[i]]
                if st:  # a checkpoint's row alone (a ZeRO rank's tensor that had no state), a key of the user's:
                    # _undo keeps the entry, and takes out what the step adds
                    replaced.append((st, {key: _ABSENT for key in (*names, *CARRIER_KEYS) if key not in st}))
                st.update(self._new_param_state(keys[i]))
                if SCOPE_ENTRY not in st:  # (a checkpoint's row is taken below, and leaves stand-ins)
                    self._add_stand_ins(st, stand_ins)
                d[i] = st[names[0]]
                if v is not None:
                    v[i] = st[names[1]]
            if recast:
                # the parameters' dtype changed (model.to(dtype)) since their state was made: the state is
                # cast to the dtype it has for such a parameter (every backend then sees the dtypes it takes)
                self._match_state_dtypes(keys, replaced)
                d = [self.state[k][names[0]] for k in keys]
                v = None if v is None else [self.state[k][names[1]] for k in keys]
            if pending or restart:
                scopes_before = self._keep_scope_values(scopes_before)  # (written below: undone from these)
            if pending:
                self._set_carried(scopes, pending, replaced)
            if restart:
                scopes.restart(restart, self._scope_init())
        except BaseException:  # out of memory (or an interrupt) while making state: NOTE [refused steps]
            self._undo((keys, fresh, group_of, had_state, replaced, scopes_before))
            raise
        made = (keys, fresh, group_of, had_state, replaced, scopes_before)
        if sharded:
            d = [local_shard(t) for t in d]
            v = None if v is None else [local_shard(t) for t in v]

        present_scopes, scope_lengths = [], []
        for s in scope_of:
            if present_scopes and present_scopes[-1] == s:
                scope_lengths[-1] += 1
            else:
                present_scopes.append(s), scope_lengths.append(1)
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        return StepBatch(
            params=params,
            grads=grads,
            d=d,
            v=v,
            group_of=group_of,
            scope_of=scope_of,
            scope_lengths=scope_lengths,
            present_scopes=present_scopes,
            present_groups=sorted(set(group_of)),
            lr=lr,
            weight_decay=[float(g.get("weight_decay", 0.0)) for g in self.param_groups],
            scopes=scopes,
            loss=loss,
            grad_scale=grad_scale,
            found_inf=found_inf,
            process_group=process_group,
            index_cache=self._index_cache,
            device_tables=self._device_tables,
        ), made

    # NOTE [a reset tensor restarts its scope]: torch.optim's ways to reset a parameter's state (del
    # opt.state[p], as after resizing p; opt.state.clear(); a new opt.state) restart its `step`. Here steps
    # and bias corrections are the beta scope's, so a scope none of whose tensors has moments any more (an
    # entry holding only a checkpoint's row or a key of the user's, or one of a tensor no longer in
    # param_groups, keeps none) starts again too: step 0, beta and beta_prod as new (RLLC: its law); its
    # zero moments then meet a first step's bias corrections, as AdamW's do (kept, they met the old ones:
    # AMAdamW's updates ~4x AdamW's, 10 steps after a reset at step 1000). Under beta_scope="tensor" that is
    # every reset tensor; a shared scope (global, group) restarts where all its tensors were reset, and a
    # tensor reset alone joins it late (NOTE [late tensors]). A checkpoint's row taken in the same step
    # gives the scope its values instead. Not under a process_group: a rank without a
    # tensor's gradient in this step cannot tell, and the ranks' scope state must stay the same; there a
    # reset tensor joins its scope late.
    def _restarted_scopes(self, keys: list[Tensor], fresh: list[int], group_of: list[int], scope_of: list[int],
                          had_state: bool, process_group, scopes_before, pending) -> list[int]:
        """The scopes that start again in this step (host only, before any state is made): those of the
        tensors whose state is made anew where no other tensor of the scope has state (on a first step
        every scope, which holds a new scope's values already), and none that a checkpoint's row
        (`pending`, NOTE [checkpoint carriers]) gives its values in this step."""
        if not fresh or process_group is not None or scopes_before[0] is None:
            return []
        if self.beta_scope == "tensor":
            scopes = [scope_of[i] for i in fresh]
        else:
            fresh_ids = {id(keys[i]) for i in fresh}
            if self.beta_scope == "global":
                scopes = [] if had_state and self._stepped_in(range(len(self.param_groups)), fresh_ids) else [0]
            else:
                scopes = [gi for gi in sorted({group_of[i] for i in fresh}) if not self._stepped_in([gi], fresh_ids)]
        if scopes and pending:
            given = self._scopes_of_all()[0]
            given = {given[i] for i, _ in pending}
            scopes = [s for s in scopes if s not in given]
        return scopes

    def _stepped_in(self, groups, fresh_ids: set[int]) -> bool:
        """Whether a tensor of these param groups other than those of `fresh_ids` (the ids of the tensors this
        step makes state for) has state (its moments: an entry holding only a checkpoint's row or a key of the
        user's has none): on the host, whether their scope has taken a step (a step skipped by found_inf
        counts: it makes state)."""
        first = self.STATE_NAMES[0]
        return any(id(q) not in fresh_ids and first in self.state.get(q, ())
                   for gi in groups for q in self.param_groups[gi]["params"])

    def _lr_tensor(self, device: torch.device, dtype: torch.dtype) -> Tensor:
        """Every group's lr as one [G] device tensor (NOTE [no copies from the host] in _build_batch)."""
        lrs = [g["lr"] for g in self.param_groups]
        if any(isinstance(lr, Tensor) for lr in lrs):
            return torch.stack([_on_device(x, dtype, device) for x in lrs])
        # float lrs: made once per distinct set of values (a scheduler's every step)
        key = ("lr", device, dtype, tuple(lrs))
        if key not in self._index_cache:
            # in place: torch.compile before torch 2.13 refuses to reassign an attribute of the optimizer
            for stale in [k for k in self._index_cache if k[0] == "lr"]:
                del self._index_cache[stale]
            self._index_cache[key] = torch.stack([_on_device(x, dtype, device) for x in lrs])
        return self._index_cache[key]

    def _empty_sharded_batch(self, loss) -> StepBatch | None:
        """NOTE [a rank without gradients]: with a process_group (or sharded DTensor parameters) the
        all_reduce inside step() is a collective, and a rank that holds no tensor with a gradient this
        step (its tensors frozen, or unused by its batch) has no tensor to step. It must still join the
        all_reduce, or the ranks that step wait for it forever: this batch, without tensors, is what it
        joins with (step() hands the all_reduce zeros of the shape every backend reduces) and then
        commits the scopes that stepped elsewhere (NOTE [scopes stepped elsewhere]). None where
        nothing is reduced (no sharding; adaptive=False), as torch.optim's step without gradients.
        A rank whose optimizer holds no tensor at all (ZeroRedundancyOptimizer with more ranks than
        tensors) joins too, where process_group names the group: on the device the group reduces on."""
        params = [p for g in self.param_groups for p in g["params"]]
        if self._sums_width() is None or not (params or self.process_group is not None):
            return None
        process_group = self._reduce_group(params)  # None for plain parameters without a process_group
        if process_group is None:
            return None
        device = local_shard(params[0]).device if params else _device_of_group(process_group)
        dtype = scope_dtype(p.dtype for p in params)
        self._check_loss(loss)
        scopes = self._scope_state(device, dtype)
        self._take_pending_carriers(scopes)  # NOTE [checkpoint carriers]
        return StepBatch(
            params=[], grads=[], d=[], v=None, group_of=[], scope_of=[], scope_lengths=[], present_scopes=[],
            present_groups=[], lr=self._lr_tensor(device, dtype), weight_decay=[], scopes=scopes,
            loss=self._loss_on(loss, device, dtype), grad_scale=_tensor_or_none(getattr(self, "grad_scale", None)),
            found_inf=_tensor_or_none(getattr(self, "found_inf", None)), process_group=process_group,
            index_cache=self._index_cache,
            device_tables=self._device_tables,
        )

    def _check_loss(self, loss) -> None:
        """In delta_f="loss" mode, the closure's loss must be one number (checked before any state exists)."""
        if not self._uses_loss():
            return
        name = type(self).__name__
        if loss is None:
            raise RuntimeError(f"{name}: delta_f='loss' needs step(closure) returning the loss")
        if isinstance(loss, Tensor):
            one = loss.numel() == 1 and not (loss.is_complex() or loss.dtype == torch.bool or loss.device.type == "meta")
        else:
            one = _is_number(loss)
        if not one:
            got = f"a {loss.dtype} tensor of shape {tuple(loss.shape)} on {loss.device}" if isinstance(loss, Tensor) \
                else repr(loss)
            raise RuntimeError(f"{name}: delta_f='loss' needs the closure to return one loss (a real number or a "
                               f"1-element real tensor), got {got}")

    def _loss_on(self, loss, device: torch.device, dtype: torch.dtype) -> Tensor | None:
        """The loss the backends see (loss mode only, else None): a 0-d tensor on the parameters'
        device, negated under maximize (backends see the objective being minimised, so
        F = prev - loss keeps its sign)."""
        if not self._uses_loss():
            return None
        loss = _on_device(loss, dtype if not isinstance(loss, Tensor) else loss.dtype, device)
        return -loss if getattr(self._hyper, "maximize", False) else loss

    def _uses_loss(self) -> bool:
        return False

    def _watches_late_tensors(self) -> bool:
        """NOTE [late tensors]: state and step counts are per beta scope (SPEC.md section 3), so a
        tensor whose first gradient arrives after its scope's first step starts from zero state and
        takes the scope's step count, where torch.optim counts per parameter. Whether this optimizer
        tells the user so (AMAdamW, whose bias corrections make it matter, once): then _warn_late."""
        return False

    def _warn_late(self, n_late: int) -> None:
        """Tell the user that n_late > 0 tensors joined their scope late (NOTE [late tensors])."""

    def _on_late_state(self, keys: list[Tensor], fresh: list[int], group_of: list[int]) -> None:
        """Called (on the host) when keys[i] for i in fresh got their state in this step while other
        parameters already had theirs, and nothing is reduced across ranks: the host knows which of
        them joined late."""
        late = self._late_in_scope(keys, fresh, group_of)
        if late:
            self._warn_late(len(late))

    def _late_count(self, batch: StepBatch, fresh: list[int]) -> Tensor | None:
        """NOTE [late tensors, sharded]: under a process_group a scope may have stepped on other ranks
        only, which this rank's host does not know (its own state shows only its own tensors), but the
        scope step counts on the device do: they are the same on every rank (NOTE [scopes stepped
        elsewhere]). So here, before the backend counts this step, the number of fresh tensors whose
        scope has stepped is counted on the device (a few small ops, only at steps where some tensor
        gets its first state), and _report_late reads it without waiting: at once on the CPU, else
        copied to pinned host memory behind an event that a later step() polls, warning one step
        late. None where nothing is watched, or in a compiled or captured step."""
        device = batch.scopes.step.device
        if not self._watches_late_tensors() or torch.compiler.is_compiling() or capturing(device):
            return None
        if device.type not in ("cpu", "cuda"):
            return None
        per_scope: dict[int, int] = {}
        for i in fresh:
            per_scope[batch.scope_of[i]] = per_scope.get(batch.scope_of[i], 0) + 1
        steps = batch.scopes.step
        return sum(steps[s].gt(0).to(torch.int64) * n for s, n in per_scope.items())

    def _report_late(self, count: Tensor) -> None:
        if count.device.type == "cpu":
            n = int(count)
            if n:
                self._warn_late(n)
            return
        host = torch.zeros((), dtype=count.dtype, pin_memory=True)
        stream = torch.cuda.current_stream(count.device)  # the stream the copy is queued on
        host.copy_(count, non_blocking=True)
        event = torch.cuda.Event()
        event.record(stream)
        self._late_pending.append((host, event))

    def _poll_late(self) -> None:
        """The counts of earlier steps (NOTE [late tensors, sharded]) whose copies have landed, in order.
        Not inside a compiled or captured step (an event query is not allowed in a capture)."""
        while self._late_pending and self._late_pending[0][1].query():
            host, _ = self._late_pending.pop(0)
            n = int(host)
            if n and self._watches_late_tensors():
                self._warn_late(n)

    def _late_in_scope(self, keys: list[Tensor], fresh: list[int], group_of: list[int]) -> list[int]:
        """Those of `fresh` whose beta scope had already taken a step before this one (on the host: some
        other parameter of the scope has state, _stepped_in; a step skipped by found_inf is counted as
        taken)."""
        if self.beta_scope == "tensor":
            return []
        fresh_ids = {id(keys[i]) for i in fresh}
        if self.beta_scope == "global":
            return list(fresh) if self._stepped_in(range(len(self.param_groups)), fresh_ids) else []
        stepped = {gi: self._stepped_in([gi], fresh_ids) for gi in {group_of[i] for i in fresh}}
        return [i for i in fresh if stepped[group_of[i]]]

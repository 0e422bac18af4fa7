"""torch.optim plumbing shared by AMSGD and AMAdamW: groups, lazy state, scopes, state_dict, AMP.

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
from ._aliasing import first_overlap
from ._hyper import BETA_SCOPES, check_choice, check_flag, check_group, check_state_dtype, state_dtype_for
from ._step import ScopeState, StepBatch, capturing

try:  # DTensor parameters (FSDP2 fully_shard, tensor parallel)
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover - torch built without distributed
    DTensor = ()

STATE_DICT_KEY = "amm"
# in each parameter's state_dict entry (NOTE [checkpoint carriers]): its scope's values, and what they were
# saved under (the optimizer and its scope mode, as the int of _setting_code)
SCOPE_ENTRY = "amm_scope"
SETTING_ENTRY = "amm_setting"
CARRIER_KEYS = frozenset((SCOPE_ENTRY, SETTING_ENTRY))
FORMAT_VERSION = 1


def _carries_row(st) -> bool:
    """Whether a parameter's state entry holds a checkpoint's row (NOTE [checkpoint carriers]): anything
    under SCOPE_ENTRY but the 0-d stand-in that the live state keeps there (or an empty tensor)."""
    if not isinstance(st, dict) or SCOPE_ENTRY not in st:
        return False
    row = st[SCOPE_ENTRY]
    return not (isinstance(row, Tensor) and (row.dim() == 0 or row.numel() == 0))


def _needs_stand_ins(st: dict, first_name: str) -> bool:
    """Whether a parameter's live state has state tensors but neither stand-ins nor a row under the
    carriers' keys (state made by hand, or pickled before the stand-ins; NOTE [checkpoint carriers])."""
    row = st.get(SCOPE_ENTRY)
    return first_name in st and not (isinstance(row, Tensor) and row.dim() == 0) and not _carries_row(st)


def _scope_dtype(dtypes) -> torch.dtype:
    """The dtype of the scope state (and of the step's scalars) for parameters of `dtypes`: float64 if
    one of them is, else float32."""
    return torch.float64 if any(dt == torch.float64 for dt in dtypes) else torch.float32


def _on_device(x, dtype: torch.dtype, device: torch.device) -> Tensor:
    """x (a number, or a 1-element tensor on any device) as a 0-d `dtype` tensor on `device`, made there
    (NOTE [no copies from the host]): a host value, a CPU tensor's too, becomes a fill."""
    if isinstance(x, Tensor):
        if x.device.type != "cpu" or device.type == "cpu":
            return x.detach().to(device=device, dtype=dtype).reshape(())
    return torch.full((), float(x), dtype=dtype, device=device)  # float() of a CPU tensor reads host memory only


def _plain(x):
    """A value as the constructor reads it: CPU tensors as numbers (or tuples), numbers and flags as
    floats (1 is True), sequences as tuples; anything else (a string, a process group) as it is."""
    if isinstance(x, Tensor) and x.device.type == "cpu":
        x = x.item() if x.numel() == 1 else x.tolist()
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


CARRIER_OPTIMIZERS = ("", "AMSGD", "AMAdamW", "RLLC")  # the optimizers of _setting_code (index 0: none)


def _setting_name(code) -> str:
    """The optimizer and scope mode of a _setting_code, for messages."""
    if isinstance(code, int) and 10 <= code < 10 * len(CARRIER_OPTIMIZERS) and code % 10 < len(BETA_SCOPES):
        return f"{CARRIER_OPTIMIZERS[code // 10]} with scope {BETA_SCOPES[code % 10]!r}"
    return f"an unknown setting ({code!r})"


def _cuda_capturing() -> bool:
    """Whether the current CUDA stream is capturing a graph (False without CUDA)."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _local(t: Tensor) -> Tensor:
    """A DTensor's local shard (the same storage: in-place updates reach the DTensor); else t itself."""
    return t.to_local() if isinstance(t, DTensor) else t


class AMOptimizer(torch.optim.Optimizer):
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
        self.process_group = process_group
        self.capturable = check_flag(name, "capturable", capturable)
        self.state_dtype = check_state_dtype(name, state_dtype)
        self._wide = self._wide_args()  # fixed from here on (NOTE [wide keys in groups])
        self._wide_names = frozenset(self._wide)  # dynamo traces frozenset.isdisjoint, not dict_keys'
        self._scopes: ScopeState | None = None
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
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        had_differentiable = "differentiable" in state.get("defaults", {})
        super().__setstate__(state)
        if not had_differentiable:  # torch.optim's __setstate__ adds it; not an argument here
            self.defaults.pop("differentiable", None)
        self._index_cache, self._in_graphs, self._device_tables, self._resolved = {}, {}, {}, {}
        self.__dict__.setdefault("state_dtype", None)  # pickled before state_dtype existed
        self._add_missing_stand_ins()  # pickled before the stand-ins (NOTE [checkpoint carriers])
        self._late_pending = []
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
        unknown = sorted(k for k in param_group if k not in self.GROUP_KEYS and k not in self._wide
                         and k not in self.ZERO_ONLY_KEYS)
        if unknown:
            allowed = " and ".join(k for k in self.GROUP_KEYS if k != "params")
            raise ValueError(
                f"{name}: a param group may set only {allowed}; {', '.join(unknown)} "
                f"{'is' if len(unknown) == 1 else 'are'} not an {name} argument"
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
            self._scopes.grow(*self._scope_counts(), self._scope_init())
        elif getattr(self, "_constructed", True):
            self._prefill_backend_cache()

    def _refuse_aliases(self, params: list) -> None:
        """ValueError if two of the parameters (in param_groups order) share an element of memory
        (NOTE [aliased parameters] in _aliasing.py)."""
        params = [p for p in params if isinstance(p, Tensor)]  # anything else: torch.optim's error
        pair = first_overlap([_local(p) for p in params], keys=params)
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
        check_group(type(self).__name__, group, keys, index=index, skip_tensors=on_step)
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

    def _match_state_dtypes(self, keys: list[Tensor]) -> list[tuple[dict, dict]]:
        """Cast state to the dtype its parameter's state has (NOTE [state dtype] in _hyper.py) where they
        differ: the parameter's dtype changed (model.to(dtype)) since its state was made, or a
        checkpoint held state in another dtype. Returns (state dict, the tensors it had) for each one
        changed, for _undo."""
        replaced = []
        for k in keys:
            st = self.state[k]
            dtype = state_dtype_for(k.dtype, self.state_dtype)
            old = {key: st[key] for key in self.STATE_NAMES if st[key].dtype != dtype}
            if old:
                if not _carries_row(st):  # the stand-ins (NOTE [checkpoint carriers]) follow the state
                    old.update({key: st[key] for key in CARRIER_KEYS if key in st})
                replaced.append((st, old))
                st.update({key: t.to(dtype) for key, t in old.items()})
        return replaced

    def _undo(self, made) -> None:
        """NOTE [refused steps]: a backend refuses a step before it writes anything (a misfit, NOTE
        [state fits]; a dtype or device it does not take), but by then _build_batch has made the zero
        state of tensors stepping for the first time and cast state to new parameter dtypes. A refused
        step leaves the optimizer as it was: those are taken back here (eager only; a compiled step
        has no handler, and its failure leaves them)."""
        keys, fresh, _, _, replaced = made
        for st, old in replaced:
            st.update(old)
        for i in fresh:
            self.state.pop(keys[i], None)

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

    def _scope_state(self, device: torch.device, dtype: torch.dtype):
        n_scopes, n_groups = self._scope_counts()
        if self._scopes is None:
            self._scopes = self.SCOPE_STATE.create(n_scopes, n_groups, self._scope_init(), device, dtype)
        if self._scopes.step.device != device or self._scopes.step.dtype != dtype:
            # (the parameters' dtype or device changed) NOTE [compile]: set on the same object, whose
            # attribute updates a compiled step keeps; a new object bound to the optimizer it drops
            moved = self.SCOPE_STATE.from_dict(self._scopes.to_dict(), device, dtype)
            for name in self.SCOPE_STATE.FIELDS:
                setattr(self._scopes, name, getattr(moved, name))
        if not self._scopes.matches(n_scopes, n_groups):
            self._scopes.grow(n_scopes, n_groups, self._scope_init())
        return self._scopes

    @property
    def beta(self) -> Tensor:
        """The last beta on the parameters' device: 0-d for beta_scope="global", else one per group /
        per parameter tensor (groups in order). A copy; reading it never synchronises."""
        self._take_pending_carriers()
        if self._scopes is None:
            n_scopes, _ = self._scope_counts()
            beta = torch.full((n_scopes,), float(self._hyper.beta_max))
        else:
            beta = self._scopes.beta.clone()
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
            module = self._backend_module(self.backend, batch.params[0].device, {p.dtype for p in batch.params})
            # a sharded step where a scope or group of this optimizer does not step here: it may have stepped
            # elsewhere (NOTE [scopes stepped elsewhere]); where every one steps here (FSDP2's usual step)
            # there is nothing to commit, and the completion's ~25 small ops are not run
            completes = batch.process_group is not None and (len(batch.present_scopes) < batch.scopes.step.numel()
                                                             or len(batch.present_groups) < batch.lr.numel())
            # the loss before this step, for those scopes (the backend commits this step's)
            prev_loss = batch.scopes.prev_loss.clone() if completes and self._uses_loss() else None
            keys, fresh, group_of, had_state, _ = made
            # before the backend counts this step (NOTE [late tensors, sharded])
            late_count = self._late_count(batch, fresh) if fresh and batch.process_group is not None else None
            if torch.compiler.is_compiling():  # folded by dynamo: no try in the graph
                getattr(module, self.STEP_OP)(batch, self._hyper)
            else:
                try:
                    getattr(module, self.STEP_OP)(batch, self._hyper)
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
        params = [_local(p) for g in self.param_groups for p in g["params"]]
        if not params:
            return
        self._scope_state_of(params)
        for backend in {self.backend, "torch"}:
            try:
                self._backend_module(backend, params[0].device, {p.dtype for p in params})
            except (RuntimeError, TypeError):
                pass  # step() raises it, with the same message, if it still applies then

    def _scope_state_of(self, params: list[Tensor]):
        """The scope state on the (local) parameters' device, in _scope_dtype."""
        return self._scope_state(params[0].device, _scope_dtype(p.dtype for p in params))

    def _reduce_group(self, params: list[Tensor]):
        """The group the sums are all-reduced over: `process_group` if given; else, for DTensor
        parameters, the mesh group of their Shard dimension (FSDP2; the shard group under HSDP); else
        None (plain parameters are whole on every rank, e.g. DDP: nothing to reduce)."""
        if self.process_group is not None:
            return self.process_group
        name = type(self).__name__
        groups = []
        for p in params:
            if not isinstance(p, DTensor):
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
        for gi, group in enumerate(self.param_groups):
            self._check_group_hypers(group, index=gi, on_step=True)
            for p in group["params"]:
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
        sharded = any(isinstance(p, DTensor) for p in params)
        process_group = self._reduce_group(keys) if (sharded or self.process_group is not None) else None
        if sharded:
            # DTensor parameters: the step runs on the local shards (views of the same storage).
            params, grads = [_local(p) for p in params], [_local(g) for g in grads]

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
        dtype = _scope_dtype(dtypes)
        if self.capturable and device.type not in ("cuda", "xpu"):
            raise RuntimeError(f"{name}: capturable=True needs parameters on a CUDA (or XPU) device, got {device}")
        self._backend_module(self.backend, device, dtypes)  # raises before any state exists
        scopes = self._scope_state(device, dtype)
        # NOTE [no copies from the host]: values made on the host reach the device as fills (torch.full: a
        # kernel with the value as its argument), never as copies: a copy from pageable host memory can
        # wait for the stream (a host synchronisation inside step()), and a CUDA graph capture refuses it.
        lr = self._lr_tensor(device, dtype)

        # lazy state, created only after every check above; one self.state lookup per parameter.
        # Shapes are the backends' to check (NOTE [state fits] in _step.py).
        names = self.STATE_NAMES
        state_dtype = self.state_dtype
        had_state = len(self.state) > 0
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
            recast |= first.dtype is not (k.dtype if state_dtype is None else state_dtype_for(k.dtype, state_dtype))
            d.append(first)
            if v is not None:
                v.append(st[names[1]])
        # checked before any state is made (raises on rows saved under another setting)
        pending = self._pending_carriers() if carried or (fresh and had_state) else []
        stand_ins = {}
        for i in unmarked:
            self._add_stand_ins(self.state[keys[i]], stand_ins)
        for i in fresh:
            st = self.state[keys[i]]
            st.update(self._new_param_state(keys[i]))
            if SCOPE_ENTRY not in st:  # (a checkpoint's row is taken below, and leaves stand-ins)
                self._add_stand_ins(st, stand_ins)
            d[i] = st[names[0]]
            if v is not None:
                v[i] = st[names[1]]
        replaced = []
        if recast:
            # the parameters' dtype changed (model.to(dtype)) since their state was made: the state is
            # cast to the dtype it has for such a parameter (every backend then sees the dtypes it takes)
            replaced = self._match_state_dtypes(keys)
            d = [self.state[k][names[0]] for k in keys]
            v = None if v is None else [self.state[k][names[1]] for k in keys]
        if pending:
            self._set_carried(scopes, pending)
        made = (keys, fresh, group_of, had_state, replaced)
        if sharded:
            d = [_local(t) for t in d]
            v = None if v is None else [_local(t) for t in v]

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
            loss=self._loss_on(loss, device, dtype),
            grad_scale=grad_scale,
            found_inf=found_inf,
            process_group=process_group,
            index_cache=self._index_cache,
            device_tables=self._device_tables,
        ), made

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
        nothing is reduced (no sharding; adaptive=False), as torch.optim's step without gradients."""
        params = [p for g in self.param_groups for p in g["params"]]
        if self._sums_width() is None or not params:
            return None
        process_group = self._reduce_group(params)  # None for plain parameters without a process_group
        if process_group is None:
            return None
        device = _local(params[0]).device
        dtype = _scope_dtype(p.dtype for p in params)
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
        one = loss.numel() == 1 if isinstance(loss, Tensor) else isinstance(loss, numbers.Real) and not isinstance(loss, bool)
        if not one:
            got = f"a tensor of shape {tuple(loss.shape)}" if isinstance(loss, Tensor) else repr(loss)
            raise RuntimeError(f"{name}: delta_f='loss' needs the closure to return one loss (a number or a "
                               f"1-element tensor), got {got}")

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
        other parameter of the scope has state; a step skipped by found_inf is counted as taken)."""
        if self.beta_scope == "tensor":
            return []
        fresh_ids = {id(keys[i]) for i in fresh}
        if self.beta_scope == "global":
            return list(fresh)

        def group_stepped(gi):
            return any(id(q) not in fresh_ids and self.state.get(q) for q in self.param_groups[gi]["params"])

        return [i for i in fresh if group_stepped(group_of[i])]

    # ----------------------------------------------------------------------------------------------
    # state_dict
    def state_dict(self) -> dict[str, Any]:
        """torch.optim's state_dict, and the optimizer's own entry (the scope state and what it must
        match) under "amm", and each parameter's scope values in its state entry (NOTE [checkpoint
        carriers])."""
        self._take_pending_carriers()
        sd = super().state_dict()
        meta = {
            "format_version": FORMAT_VERSION,
            "optimizer": type(self).__name__,
            **self._meta_fields(),
            "scopes": None if self._scopes is None else self._scopes.to_dict(),
        }
        sd[STATE_DICT_KEY] = meta
        for group in sd["param_groups"]:  # (one a ZeroRedundancyOptimizer copied into the live groups)
            group.pop(STATE_DICT_KEY, None)
        if meta["scopes"] is None:  # no parameters (the scope state is made with the first ones)
            return sd
        # every parameter gets its row, those without state too (a ZeRO rank may hold only such tensors
        # of a scope)
        pairs = self._paired_with_saved(sd)
        ids, where = [pid for pid, _, _ in pairs], [i for _, _, i in pairs]
        if ids:
            scope_of, group_of = self._scopes_of_all()
            device = meta["scopes"]["step"].device
            rows = self.SCOPE_STATE(**meta["scopes"]).tensor_rows(
                torch.tensor([scope_of[i] for i in where], device=device),
                torch.tensor([group_of[i] for i in where], device=device))
            code = torch.tensor(self._setting_code())  # 0-d on the CPU, where ZeroRedundancyOptimizer leaves it
            for pid, row in zip(ids, rows.unbind(0)):  # views of one tensor: torch.save writes it once
                # (torch's entries are the live dicts: new ones)
                sd["state"][pid] = {**sd["state"].get(pid, {}), SCOPE_ENTRY: row, SETTING_ENTRY: code}
        return sd

    def _scopes_of_all(self) -> tuple[list[int], list[int]]:
        """The scope and the group of every parameter, in param_groups order (a state_dict's ids)."""
        mode, scope_of, group_of = self.beta_scope, [], []
        for gi, group in enumerate(self.param_groups):
            for _ in group["params"]:
                scope_of.append(0 if mode == "global" else gi if mode == "group" else len(scope_of))
                group_of.append(gi)
        return scope_of, group_of

    def _paired_with_saved(self, state_dict: dict[str, Any]) -> list[tuple[Any, Tensor, int]]:
        """(saved id, live parameter, its position in param_groups order) for every parameter, paired
        through the param groups as torch.optim pairs them (ids need not be 0..n-1: a hook may key
        them by name)."""
        pairs, offset = [], 0
        for saved, group in zip(state_dict["param_groups"], self.param_groups):
            pairs += [(pid, p, i) for i, (pid, p) in enumerate(zip(saved["params"], group["params"]), start=offset)]
            offset += len(group["params"])
        return pairs

    def _take_pending_carriers(self, scopes=None) -> None:
        """NOTE [checkpoint carriers]: per-parameter state put in place without load_state_dict
        (ZeroRedundancyOptimizer.load_state_dict writes each rank's share of a checkpoint straight into
        its optimizer's state) carries each tensor's scope values: they become the scope state, and
        leave the parameters' state, at the first step after (whichever tensors have gradients there),
        or at the first state_dict() or read of beta / law."""
        pending = self._pending_carriers()
        if not pending:
            return
        if scopes is None:
            scopes = self._scope_state_of([_local(p) for g in self.param_groups for p in g["params"]])
        self._set_carried(scopes, pending)

    def _pending_carriers(self) -> list[tuple[int, dict]]:
        """[(position of the parameter in param_groups order, its state dict)] for the state dicts that
        carry a checkpoint's row, each checked (ValueError, before anything changes, for a row of another
        optimizer or scope mode, or of another width). Host only."""
        # first a look without hashing tensors (~80 us per 1000 tensors here): the live state holds
        # 0-d stand-ins there
        for st in self.state.values():
            row = st.get(SCOPE_ENTRY)
            if row is not None and (not isinstance(row, Tensor) or row.dim()) and _carries_row(st):
                break
        else:
            return []
        pending, width = [], self._carrier_width()
        for i, p in enumerate(p for g in self.param_groups for p in g["params"]):
            st = self.state.get(p)
            if _carries_row(st):
                self._check_carrier(st, f"{type(self).__name__}: the state of parameter {i} (put in place by "
                                        "ZeroRedundancyOptimizer.load_state_dict, or by hand)", width)
                pending.append((i, st))
        return pending

    def _check_carrier(self, st: dict, where: str, width: int) -> None:
        """ValueError unless a state dict's row (NOTE [checkpoint carriers]) fits this optimizer (rows
        of `width` values)."""
        code, mine = st.get(SETTING_ENTRY), self._setting_code()
        if isinstance(code, Tensor):
            code = int(code) if code.numel() == 1 and not code.is_floating_point() else None
        if code != mine:
            raise ValueError(f"{where} was saved by {_setting_name(code)}; this is {_setting_name(mine)}: "
                             "construct it with the saved optimizer and scope to load this state")
        row = st[SCOPE_ENTRY]
        if not (isinstance(row, Tensor) and row.is_floating_point() and tuple(row.shape) == (width,)):
            got = tuple(row.shape) if isinstance(row, Tensor) else type(row).__name__
            raise ValueError(f"{where} carries its scope's values ({SCOPE_ENTRY!r}) as {got}; this optimizer "
                             f"keeps them as a floating-point ({width},) tensor")

    def _setting_code(self) -> int:
        """The optimizer and its scope mode as one int (saved as a 0-d CPU tensor: code that walks a
        state_dict's per-parameter entries meets tensors only)."""
        return 10 * CARRIER_OPTIMIZERS.index(type(self).__name__) + BETA_SCOPES.index(self.beta_scope) \
            if type(self).__name__ in CARRIER_OPTIMIZERS else -1

    def _set_carried(self, scopes, pending: list[tuple[int, dict]]) -> None:
        """Move the rows of `pending` (checked by _pending_carriers or _check_loadable) out of the state
        dicts into the scope state. The rows of one scope are equal, so which tensor's lands is
        immaterial."""
        scope_of, group_of = self._scopes_of_all()
        device, dtype = scopes.step.device, scopes.step.dtype
        ids = [i for i, _ in pending]
        rows = torch.stack([st.pop(SCOPE_ENTRY).to(device=device, dtype=dtype) for _, st in pending])
        for _, st in pending:
            st.pop(SETTING_ENTRY, None)
            if self.STATE_NAMES[0] in st:
                self._add_stand_ins(st)
        scopes.set_tensor_rows(torch.tensor([scope_of[i] for i in ids], device=device),
                               torch.tensor([group_of[i] for i in ids], device=device), rows)

    def _add_stand_ins(self, st: dict, made: dict | None = None) -> None:
        """Put the stand-ins of the carriers in a parameter's live state (NOTE [checkpoint carriers]): a
        tool that rebuilds a state_dict from the keys the live state has keeps the rows under them. One
        0-d zero in the state's dtype and device, shared through `made` by the calls of one pass."""
        first = _local(st[self.STATE_NAMES[0]])
        made = {} if made is None else made
        key = (first.device, first.dtype)
        if key not in made:
            made[key] = first.new_zeros(())
        st[SCOPE_ENTRY] = st[SETTING_ENTRY] = made[key]

    def _add_missing_stand_ins(self) -> None:
        """Stand-ins for every parameter's state that has none (unpickled from a version without them)."""
        made = {}
        for st in self.state.values():
            if _needs_stand_ins(st, self.STATE_NAMES[0]):
                self._add_stand_ins(st, made)

    def _carrier_width(self) -> int:
        """The length of a parameter's scope-values row (NOTE [checkpoint carriers])."""
        one = torch.zeros(1, dtype=torch.long)
        return self.SCOPE_STATE.create(1, 1, self._scope_init(), "meta", torch.float32).tensor_rows(
            one.to("meta"), one.to("meta")).shape[1]

    @staticmethod
    def _meta_of(state_dict: dict[str, Any]):
        """NOTE [checkpoint carriers]: the optimizer-wide state (the scope state: step counts, beta, ...)
        is not torch.optim's, and three tools rebuild an optimizer's state_dict without a top-level entry:
        - torch.distributed.checkpoint's get/set_state_dict (FSDP2's checkpoints) keep only "state" and
          "param_groups";
        - with flatten_optimizer_state_dict=True (torchtitan's, OLMo-core's checkpoints) they keep only
          the keys the live optimizer has: each param group's keys, repeated for each of the group's
          parameters, and each parameter's state keys;
        - ZeroRedundancyOptimizer keeps "state" and "param_groups", and writes each rank's share of the
          state straight into its optimizer, never calling load_state_dict.
        So:
        - the "amm" entry is at the top of a state_dict (where torch.save keeps it);
        - every parameter's state entry, one without state too, carries its scope's and group's values
          as one row (SCOPE_ENTRY; tensor_rows of the scope state classes) and what they were saved
          under (SETTING_ENTRY: the optimizer and scope mode, a 0-d CPU tensor). A checkpoint without
          "amm" loads from its rows, checked against this optimizer's setting;
        - the live state keeps stand-ins under both keys (one 0-d zero of the state's dtype and device,
          like torch's Adam's "step": made with the state, after a load, after a row is taken, at a
          step or unpickling that finds state without them, and cast with the state), so that the
          flattened load brings the rows back. A 0-d (or empty) SCOPE_ENTRY is never a row
          (_carries_row); state_dict() puts the rows in the stand-ins' place. A load from rows alone
          refuses state that came without its row (the live state had no stand-ins to ask for it);
        - "amm" is in no param group (earlier versions put it in the first one with parameters): the
          flattened form would hold a copy per parameter. The scope state is made with the first
          parameters (construction, add_param_group), so every parameter has a row before any step;
          a checkpoint cut to "state" and "param_groups" of an optimizer without parameters loads as
          a fresh one.
        Checkpoints of earlier versions have "amm" at the top only, or also in that group.
        ZeRO's rows land in the live state: the optimizer takes them at the next step (whichever tensors
        have gradients there), state_dict() or read of beta (_take_pending_carriers), refusing rows of
        another setting before anything changes. (The step that takes them makes small index tensors
        on the device: after such a load, take an eager step before capturing a CUDA graph, as a
        warm-up does.)
        load_state_dict takes the scope rows of "amm", then each tensor's row over them: the rows move
        with their tensors' state however a hook renumbers the parameters, and they are right where a
        ZeRO checkpoint's group holds an old "amm" (ZeRO copies a loaded group's keys into the live
        groups; this optimizer's state_dict() leaves them out, ZeRO's does not). An entry of only the
        row loads as no state. A tool that edits a checkpoint's scope state edits the rows too. This
        returns the "amm" entry of a state_dict, or None."""
        meta = state_dict.get(STATE_DICT_KEY)
        groups = state_dict.get("param_groups")
        if meta is None and isinstance(groups, (list, tuple)):
            meta = next((g[STATE_DICT_KEY] for g in groups if isinstance(g, dict) and STATE_DICT_KEY in g), None)
        return meta

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        meta = self._checked_meta(state_dict)
        # NOTE [load hooks]: torch.optim loads the dict its load_state_dict pre-hooks return (a hook may
        # renumber a checkpoint's parameters) and then runs its post-hooks. The dict is checked, whole,
        # as the last pre-hook, so it is the one torch loads and nothing is replaced if it does not fit;
        # that hook also keeps the carriers (NOTE [checkpoint carriers]) out of the live param groups
        # and state. The scope state and float32 state are restored by the first post-hook, so the
        # user's post-hooks see the optimizer as loaded. The scope rows of the "amm" entry give the
        # scope state, and each tensor's carrier (which moves with its state, however a hook renumbers
        # the parameters) its scope's values over them.
        loaded = {}

        def check(_, sd):
            found = self._checked_meta(sd) if self._meta_of(sd) is not None else meta
            self._check_loadable(sd, found)
            loaded.update(state_dict=sd, meta=found)
            plain = dict(sd)
            if isinstance(sd.get("param_groups"), (list, tuple)):
                plain["param_groups"] = [{k: v for k, v in g.items() if k != STATE_DICT_KEY} if isinstance(g, dict)
                                         else g for g in sd["param_groups"]]
            if isinstance(sd.get("state"), dict):
                # (an entry of only the row is a parameter without state: no entry at all)
                plain["state"] = {pid: {k: v for k, v in st.items() if k not in CARRIER_KEYS} if isinstance(st, dict)
                                  else st for pid, st in sd["state"].items()
                                  if not (isinstance(st, dict) and st and not set(st) - CARRIER_KEYS)}
            return plain

        def restore(_):
            sd = loaded["state_dict"]
            if self.state_dtype is not None:
                self._restore_wide_state(sd)
            made = {}  # (torch.optim loaded the state without the carriers; the ones its __setstate__
            for st in self.state.values():  # made may have the dtype _restore_wide_state changed since)
                if self.STATE_NAMES[0] in st:
                    self._add_stand_ins(st, made)
            saved = loaded["meta"]["scopes"]
            if saved is None:
                self._scopes = None
                self._prefill_backend_cache()
                return
            device = next((p.device for g in self.param_groups for p in g["params"]), torch.device("cpu"))
            self._scopes = self.SCOPE_STATE.from_dict(saved, device, saved["step"].dtype)
            carried = []
            for pid, _, i in self._paired_with_saved(sd):
                st = sd["state"].get(pid)
                if _carries_row(st):
                    carried.append((i, dict(st)))  # (a copy: the caller's dict is left as it was)
            if carried:
                self._set_carried(self._scopes, carried)

        hooks = [self.register_load_state_dict_pre_hook(check),
                 self.register_load_state_dict_post_hook(restore, prepend=True)]
        try:
            super().load_state_dict(state_dict)
        finally:
            for hook in hooks:
                hook.remove()

    def _checked_meta(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        """The "amm" entry of a state_dict, after checking that this optimizer can load it (the optimizer,
        the format version, the fields of _meta_fields); ValueError naming what differs."""
        name = type(self).__name__
        meta = self._meta_of(state_dict)
        state = state_dict.get("state")
        if meta is None and isinstance(state, dict) and any(_carries_row(st) for st in state.values()):
            # a checkpoint through ZeroRedundancyOptimizer or DCP (NOTE [checkpoint carriers]): no "amm"
            # entry, but every parameter's row, each saying what it was saved under: checked, they give
            # the scope state
            width = self._carrier_width()
            for pid, st in state.items():
                if _carries_row(st):
                    self._check_carrier(st, f"{name}.load_state_dict: the state of parameter {pid!r}", width)
                elif isinstance(st, dict) and self.STATE_NAMES[0] in st:
                    raise ValueError(
                        f"{name}.load_state_dict: the state of parameter {pid!r} came without its scope values "
                        f"({SCOPE_ENTRY!r}), though other parameters' came with theirs: a tool that keeps only the "
                        f"keys this optimizer's live state has (DCP's flatten_optimizer_state_dict=True) dropped "
                        f"them; the live state gets those keys at a step")
            dtype = _scope_dtype(p.dtype for g in self.param_groups for p in g["params"])
            fresh = self.SCOPE_STATE.create(*self._scope_counts(), self._scope_init(), "cpu", dtype)
            return {"format_version": FORMAT_VERSION, "optimizer": name, **self._meta_fields(),
                    "scopes": fresh.to_dict()}
        groups = state_dict.get("param_groups")
        if meta is None and state == {} and isinstance(groups, (list, tuple)) and \
                not any(isinstance(g, dict) and g.get("params") for g in groups):
            # an optimizer without parameters: no state, no rows, nothing to restore
            return {"format_version": FORMAT_VERSION, "optimizer": name, **self._meta_fields(), "scopes": None}
        if meta is None and isinstance(state, dict) and state and all(st == {} for st in state.values()):
            raise ValueError(
                f"{name}.load_state_dict: this state_dict has an empty state entry for every parameter and no "
                f"{STATE_DICT_KEY!r} entry: a tool rebuilt it from the keys of this optimizer's live state, which "
                f"had none (DCP's flatten_optimizer_state_dict=True gives a fresh optimizer its state by a step "
                f"with zero gradients, but skips that step when a parameter already has a gradient: call "
                f"zero_grad(set_to_none=True) before loading)")
        if meta is None:
            raise ValueError(
                f"{name}.load_state_dict: this state_dict has no {STATE_DICT_KEY!r} entry (at its top or in a "
                f"param group) and no parameter's {SCOPE_ENTRY!r} row, so it was not saved by an amm_kernels "
                f"optimizer (or by one older than the rows, and a tool kept only its 'state' and 'param_groups') "
                f"(keys: {sorted(state_dict)})"
            )
        if meta.get("optimizer") != name:
            raise ValueError(f"{name}.load_state_dict: this state_dict was saved by {meta.get('optimizer')}, not {name}")
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"{name}.load_state_dict: format_version {meta.get('format_version')!r} is not supported "
                f"(this version reads {FORMAT_VERSION})"
            )
        for key, mine in self._meta_fields().items():
            if meta.get(key) != mine:
                raise ValueError(
                    f"{name}.load_state_dict: saved with {key}={meta.get(key)!r}, this optimizer has {key}={mine!r}; "
                    f"construct it with {key}={meta.get(key)!r} to load this state"
                )
        return meta

    def _restore_wide_state(self, state_dict: dict[str, Any]) -> None:
        """torch.optim's load_state_dict casts every state tensor to its parameter's dtype, which rounds
        float32 state of a bfloat16 parameter to bfloat16. Under state_dtype (NOTE [state dtype] in
        _hyper.py) such state is taken again from the state_dict, cast from what was saved."""
        saved_state = state_dict["state"]
        for pid, p, _ in self._paired_with_saved(state_dict):
            st = saved_state.get(pid)
            if not st or self.STATE_NAMES[0] not in st:
                continue
            dtype = state_dtype_for(p.dtype, self.state_dtype)
            for key in self.STATE_NAMES:
                if self.state[p][key].dtype != dtype:
                    self.state[p][key] = st[key].to(device=p.device, dtype=dtype)

    def _check_loadable(self, state_dict: dict[str, Any], meta: dict[str, Any]) -> None:
        """Raise ValueError, naming what is wrong, unless every part of state_dict fits this optimizer:
        the groups (count, sizes, hyperparameters), every saved parameter state (keys and shapes) and
        the scope state (fields and shapes). A refused load changes nothing."""
        where = f"{type(self).__name__}.load_state_dict"
        groups, state = state_dict.get("param_groups"), state_dict.get("state")
        if not isinstance(groups, (list, tuple)) or not isinstance(state, dict):
            raise ValueError(f"{where}: a state_dict holds 'state' (a dict) and 'param_groups' (a list)")
        if len(groups) != len(self.param_groups):
            raise ValueError(f"{where}: the state_dict has {len(groups)} param groups, this optimizer has "
                             f"{len(self.param_groups)}")
        param_of = {}
        for gi, (saved, mine) in enumerate(zip(groups, self.param_groups)):
            missing = [k for k in self.GROUP_KEYS if k not in saved]
            if missing:
                raise ValueError(f"{where}: param_groups[{gi}] has no {', '.join(map(repr, missing))}")
            if len(saved["params"]) != len(mine["params"]):
                raise ValueError(f"{where}: param_groups[{gi}] has {len(saved['params'])} parameters in the "
                                 f"state_dict and {len(mine['params'])} in this optimizer")
            self._check_group_hypers(saved, index=gi)
            param_of.update(zip(saved["params"], mine["params"]))
        width = self._carrier_width()
        for pid, st in state.items():
            if _carries_row(st):
                self._check_carrier(st, f"{where}: the state of parameter {pid!r}", width)
            if isinstance(st, dict) and not set(st) - CARRIER_KEYS:
                continue  # no state yet (an entry made by reading optimizer.state[p], or only p's scope row)
            if pid not in param_of:
                raise ValueError(f"{where}: the state_dict has state for parameter {pid!r}, which no param group lists")
            for key, shape in self._state_shapes(param_of[pid]).items():
                t = st.get(key) if isinstance(st, dict) else None
                if not isinstance(t, Tensor):
                    raise ValueError(f"{where}: the state of parameter {pid!r} has no tensor {key!r}")
                if tuple(t.shape) != shape:
                    raise ValueError(f"{where}: state {key!r} of parameter {pid!r} has shape {tuple(t.shape)}; "
                                     f"the parameter needs {shape}")

        if "scopes" not in meta:
            raise ValueError(f"{where}: the {STATE_DICT_KEY!r} entry has no 'scopes'")
        scopes = meta["scopes"]
        if scopes is None:
            return
        shapes = self.SCOPE_STATE.shapes(*self._scope_counts(), self._scope_init())
        for field, shape in shapes.items():
            t = scopes.get(field) if isinstance(scopes, dict) else None
            if not isinstance(t, Tensor) or not t.is_floating_point():
                raise ValueError(f"{where}: the scope state has no floating-point tensor {field!r}")
            if tuple(t.shape) != shape:
                raise ValueError(f"{where}: scope state {field!r} has shape {tuple(t.shape)}; this optimizer's "
                                 f"{self.beta_scope!r} scope needs {shape}")

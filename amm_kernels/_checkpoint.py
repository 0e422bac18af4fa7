"""The checkpoint format of the AM optimizers: state_dict and load_state_dict, the optimizer-wide
"amm" entry, and each parameter's row (NOTE [checkpoint carriers] below).

AMOptimizer (_base.py) takes these methods from CheckpointMixin; torch.optim.Optimizer's own
state_dict / load_state_dict do the per-parameter state and the param groups underneath.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ._hyper import BETA_SCOPES, state_dtype_for
from ._step import local_shard, scope_dtype


# NOTE [checkpoint carriers]
# The optimizer-wide state (the scope state: step counts, beta, ...) is not torch.optim's, and three
# tools rebuild an optimizer's state_dict without a top-level entry:
# - torch.distributed.checkpoint's get/set_state_dict (FSDP2's checkpoints) keep only "state" and
#   "param_groups";
# - with flatten_optimizer_state_dict=True (torchtitan's, OLMo-core's checkpoints) they keep only
#   the keys the live optimizer has: each param group's keys, repeated for each of the group's
#   parameters, and each parameter's state keys;
# - ZeroRedundancyOptimizer keeps "state" and "param_groups", and writes each rank's share of the
#   state straight into its optimizer, never calling load_state_dict.
# So:
# - the "amm" entry is at the top of a state_dict (where torch.save keeps it);
# - every parameter's state entry, one without state too, carries its scope's and group's values
#   as one row (SCOPE_ENTRY; tensor_rows of the scope state classes) and what they were saved
#   under (SETTING_ENTRY: the optimizer and scope mode, a 0-d CPU tensor). A checkpoint without
#   "amm" loads from its rows, checked against this optimizer's setting;
# - the live state keeps stand-ins under both keys (one 0-d zero of the state's dtype and device,
#   like torch's Adam's "step": made with the state, after a load, after a row is taken, at a
#   step or unpickling that finds state without them, and cast with the state), so that the
#   flattened load brings the rows back. A 0-d (or empty) SCOPE_ENTRY is never a row
#   (_carries_row); state_dict() puts the rows in the stand-ins' place. A load from rows alone
#   refuses state that came without its row (the live state had no stand-ins to ask for it);
# - "amm" is in no param group (earlier versions put it in the first one with parameters): the
#   flattened form would hold a copy per parameter. The scope state is made with the first
#   parameters (construction, add_param_group), so every parameter has a row before any step;
#   a checkpoint cut to "state" and "param_groups" of an optimizer without parameters loads as
#   a fresh one.
# Checkpoints of earlier versions have "amm" at the top only, or also in that group.
# ZeRO's rows land in the live state: the optimizer takes them at the next step (whichever tensors
# have gradients there), state_dict() or read of beta (_take_pending_carriers), refusing rows of
# another setting before anything changes. (The step that takes them makes small index tensors
# on the device: after such a load, take an eager step before capturing a CUDA graph, as a
# warm-up does.)
# load_state_dict takes the scope rows of "amm", then each tensor's row over them: the rows move
# with their tensors' state however a hook renumbers the parameters, and they are right where a
# ZeRO checkpoint's group holds an old "amm" (ZeRO copies a loaded group's keys into the live
# groups; this optimizer's state_dict() leaves them out, ZeRO's does not). An entry of only the
# row loads as no state. A tool that edits a checkpoint's scope state edits the rows too.

STATE_DICT_KEY = "amm"
# in each parameter's state_dict entry (NOTE [checkpoint carriers]): its scope's values, and what they were
# saved under (the optimizer and its scope mode, as the int of _setting_code)
SCOPE_ENTRY = "amm_scope"
SETTING_ENTRY = "amm_setting"
CARRIER_KEYS = frozenset((SCOPE_ENTRY, SETTING_ENTRY))
_ABSENT = object()  # a key a state dict did not have (what a refused step's undo removes again)
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


def _holds_values(t) -> bool:
    """A tensor a checkpoint may hold: strided (not sparse) and with values (not on the meta device)."""
    return isinstance(t, Tensor) and t.layout == torch.strided and t.device.type != "meta"


CARRIER_OPTIMIZERS = ("", "AMSGD", "AMAdamW", "RLLC")  # the optimizers of _setting_code (index 0: none)


def _setting_name(code) -> str:
    """The optimizer and scope mode of a _setting_code, for messages."""
    if isinstance(code, int) and 10 <= code < 10 * len(CARRIER_OPTIMIZERS) and code % 10 < len(BETA_SCOPES):
        return f"{CARRIER_OPTIMIZERS[code // 10]} with scope {BETA_SCOPES[code % 10]!r}"
    return f"an unknown setting ({code!r})"


class CheckpointMixin:
    """state_dict / load_state_dict and the carriers, for AMOptimizer (which supplies param_groups, state,
    _scopes, SCOPE_STATE, STATE_NAMES, ... and the scope helpers these call)."""

    def state_dict(self) -> dict[str, Any]:
        """torch.optim's state_dict, and the optimizer's own entry (the scope state and what it must
        match) under "amm", and each parameter's scope values in its state entry (NOTE [checkpoint
        carriers]). Those are added by the first state_dict post-hook, so the user's post-hooks see (and
        may replace) the whole state_dict, as with torch's optimizers."""
        self._take_pending_carriers()
        hook = self.register_state_dict_post_hook(CheckpointMixin._add_carriers, prepend=True)
        try:
            return super().state_dict()
        finally:
            hook.remove()

    def _add_carriers(self, sd: dict[str, Any]) -> dict[str, Any]:
        """torch.optim's state_dict `sd` with the "amm" entry and every parameter's row (state_dict)."""
        scopes = self._scopes_view()  # NOTE [tensor scopes follow their tensors] in _base.py
        meta = {
            "format_version": FORMAT_VERSION,
            "optimizer": type(self).__name__,
            **self._meta_fields(),
            "scopes": None if scopes is None else scopes.to_dict(),
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
        before, replaced = self._scopes_before(), []
        try:  # (a read that fails part-way, out of memory, leaves the rows where they were: NOTE [refused steps])
            if scopes is None:
                scopes = self._scope_state_of([local_shard(p) for g in self.param_groups for p in g["params"]])
            before = self._keep_scope_values(before)
            self._set_carried(scopes, pending, replaced)
        except BaseException:
            self._undo_changes(replaced, before)
            raise

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
        if not (_holds_values(row) and row.is_floating_point() and tuple(row.shape) == (width,)):
            got = f"{tuple(row.shape)} ({row.dtype}, {row.layout}, on {row.device})" if isinstance(row, Tensor) \
                else type(row).__name__
            raise ValueError(f"{where} carries its scope's values ({SCOPE_ENTRY!r}) as {got}; this optimizer "
                             f"keeps them as a dense floating-point ({width},) tensor")

    def _setting_code(self) -> int:
        """The optimizer and its scope mode as one int (saved as a 0-d CPU tensor: code that walks a
        state_dict's per-parameter entries meets tensors only)."""
        return 10 * CARRIER_OPTIMIZERS.index(type(self).__name__) + BETA_SCOPES.index(self.beta_scope) \
            if type(self).__name__ in CARRIER_OPTIMIZERS else -1

    def _set_carried(self, scopes, pending: list[tuple[int, dict]], replaced: list | None = None) -> None:
        """Move the rows of `pending` (checked by _pending_carriers or _check_loadable) out of the state
        dicts into the scope state. The rows of one scope are equal, so which tensor's lands is
        immaterial. replaced: where a step records each state dict's entries before, for _undo."""
        scope_of, group_of = self._scopes_of_all()
        device, dtype = scopes.step.device, scopes.step.dtype
        if replaced is not None:
            replaced += [(st, {key: st.get(key, _ABSENT) for key in CARRIER_KEYS}) for _, st in pending]
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
        first = local_shard(st[self.STATE_NAMES[0]])
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
        """The "amm" entry of a state_dict (at its top, or in a param group of an earlier version), or None
        (NOTE [checkpoint carriers])."""
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
            # the checkpoint's scopes are in param_groups' order: a hand edit before the next step moves them
            self._layout[:] = [p for g in self.param_groups for p in g["params"]]
            self._group_layout[:] = self.param_groups
            carried = []
            for pid, _, i in self._paired_with_saved(sd):
                st = sd["state"].get(pid)
                if _carries_row(st):
                    carried.append((i, dict(st)))  # (a copy: the caller's dict is left as it was)
            if carried:
                self._set_carried(self._scopes, carried)

        # NOTE [a load that fails part-way]: torch.optim's load puts new state and param groups in place (new
        # objects, in __setstate__) and then runs the post-hooks, where the scope state is made and the
        # stand-ins added: an error there (out of memory; a user's post-hook) would leave the loaded state
        # beside the old scope state. The optimizer's attributes (the objects they held, which the load
        # replaces but does not write into) and the scope state's fields (moved or refitted on the same
        # object by __setstate__) are put back instead: a load either happens whole or changes nothing.
        attributes, scopes_before = dict(self.__dict__), self._scopes_before()
        hooks = [self.register_load_state_dict_pre_hook(check),
                 self.register_load_state_dict_post_hook(restore, prepend=True)]
        try:
            super().load_state_dict(state_dict)
        except BaseException:
            self.__dict__.clear()
            self.__dict__.update(attributes)
            self._restore_scopes(scopes_before)
            raise
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
            dtype = scope_dtype(p.dtype for g in self.param_groups for p in g["params"])
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
                if not _holds_values(t) or t.is_complex():
                    raise ValueError(f"{where}: state {key!r} of parameter {pid!r} is a {t.layout} {t.dtype} "
                                     f"tensor on {t.device}; it must be a dense real tensor with values")
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
            if not _holds_values(t) or not t.is_floating_point():
                raise ValueError(f"{where}: the scope state has no floating-point tensor {field!r} (dense, with "
                                 "values: not sparse, not on the meta device)")
            if tuple(t.shape) != shape:
                raise ValueError(f"{where}: scope state {field!r} has shape {tuple(t.shape)}; this optimizer's "
                                 f"{self.beta_scope!r} scope needs {shape}")

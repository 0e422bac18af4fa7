"""The device tables the kernels walk: one row per tensor, one row per block, built once per parameter
list and cached across steps (rebased, not rebuilt, when only addresses change: NOTE [tables and graphs]).

NOTE [pointer table]: a launch covers every tensor of the step, so the kernels cannot receive the
tensors as arguments. Each tensor row holds the int64 addresses of x, grad, d, v (`data_ptr()`), and a
kernel turns an address into a typed pointer with `addr.to(tl.pointer_type(dtype))` (`as_ptr` below).
This works both compiled (an inttoptr) and in the interpreter (TRITON_INTERPRET=1, where loads read
raw host addresses, so CPU tensors work). A pointer's element type is a compile-time property, so
tensors are grouped into buckets by their (param, grad, d, v) dtypes: one launch per bucket and pass,
i.e. exactly one launch per pass in the usual single-dtype model. All buckets write the same partial-sum
buffer, in slots numbered in tensor order, so the finalize kernel sees the step as one list.

Layout (int64):
    meta[T, META_COLS]: x, grad, d, v addresses, numel, group, scope position, first slot
    blocks[nb, 2] per bucket: tensor index, block index within the tensor (elements j*BLOCK ...)
    spans[ns, 2] per bucket: the same for pass 1's spans of SPAN blocks (elements j*SPAN*BLOCK ...;
        NOTE [pass-1 spans] in reduce_kernels.py); the blocks tensor itself where SPAN is 1
    slot_start[T + 1]: partial-sum slots (one a span) of tensor t are slot_start[t] .. slot_start[t+1]-1
    tensor_start[S + 1]: tensors of present scope s are tensor_start[s] .. tensor_start[s+1]-1
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field, replace
from itertools import repeat
from operator import attrgetter

import torch
import triton
import triton.language as tl

from .._step import capturing, check_fits

META_X, META_G, META_D, META_V, META_NUMEL, META_GROUP, META_SCOPE, META_SLOT, META_COLS = range(9)

# dtype codes (constexpr kernel arguments)
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


@triton.jit
def as_ptr(addr, CODE: tl.constexpr, ALIGNED: tl.constexpr = False):
    """An int64 address as a typed pointer (NOTE [pointer table]); with ALIGNED, declared 16-byte
    aligned (NOTE [vector access]: the hint must sit here, on the conversion itself)."""
    if CODE == 1:
        ptr = addr.to(tl.pointer_type(tl.bfloat16))
    elif CODE == 2:
        ptr = addr.to(tl.pointer_type(tl.float16))
    else:
        ptr = addr.to(tl.pointer_type(tl.float32))
    if ALIGNED:
        ptr = tl.multiple_of(ptr, 16)
    return ptr


@dataclass
class Bucket:
    codes: tuple[int, int, int, int]  # x, grad, d, v dtype codes
    blocks: torch.Tensor  # int64 [nb, 2]
    n_blocks: int
    spans: torch.Tensor  # int64 [ns, 2]: pass 1's rows, one a slot (`blocks` where a span is one block)
    n_spans: int


@dataclass
class Table:
    meta: torch.Tensor
    slot_start: torch.Tensor
    tensor_start: torch.Tensor
    present_scopes: torch.Tensor
    present_groups: torch.Tensor
    weight_decay: torch.Tensor  # float32 [G]
    buckets: list[Bucket]
    n_slots: int
    # Scratch reused every step (fixed addresses, so a captured CUDA graph stays valid), shared by the
    # tables of one layout (NOTE [shared scratch]).
    partials: torch.Tensor  # float32 [max(n_slots, 1), n_sums]
    terms: torch.Tensor  # float64 [T, 2]: each tensor's weighted numerator and denominator (finalize_kernel.py)
    scope_scratch: torch.Tensor  # float32 [4, S]: beta, first-step flag, bias1, bias2
    addresses: tuple = ()  # the x, grad, d, v addresses meta holds, per tensor (host copy)
    decays: tuple = ()  # the values weight_decay holds (host copy)
    # Other steps' per-table scratch (triton_rllc.py), by key; the same dict in the table's rebased copies.
    extras: dict = field(default_factory=dict)


_CACHE_SIZE = 8  # tables per optimizer, in each of TableCache's two maps
_IN_GRAPHS: dict = {}  # id -> Table: tables a captured CUDA graph reads, never freed (NOTE [tables and graphs])


class TableCache:
    """One optimizer's tables (StepBatch.device_tables["triton"]), least recently used dropped first:
    by exact key (addresses and weight decays included), and the latest of each layout. `last` is the
    table the latest step used: most recent in both maps, so a step that finds it again changes neither."""

    def __init__(self):
        self.exact: OrderedDict = OrderedDict()
        self.by_layout: OrderedDict = OrderedDict()
        self.last: Table | None = None


class _Key:
    """A key of TableCache's maps, hashed once. A tuple computes its hash again at every dict operation,
    and these hold a few items per tensor: a step's lookup and its two LRU updates hashed them ~5 times."""

    __slots__ = ("value", "hash")

    def __init__(self, value: tuple):
        self.value = value
        self.hash = hash(value)

    def __hash__(self):
        return self.hash

    def __eq__(self, other):
        return isinstance(other, _Key) and self.hash == other.hash and self.value == other.value


# NOTE [host time of a key]: get_table runs at every step, on every tensor, before the first launch, and
# a small model's step on a GPU is host-bound (bench/README.md, "Small steps are host-bound"). So _key
# reads each column by map() over the tensors with the unbound method (a loop in C, not a Python
# expression per tensor), the keys are hashed once (_Key), and a step that finds the table of the step
# before leaves the LRU maps alone (TableCache.last). Measured on a 2-vCPU AMD EPYC VM (2026-12-01),
# 219 tensors, the kernels' launches left out: get_table took 285-301 us -> 148-150 (AMSGD) and
# 360-366 -> 192-197 (AMAdamW); with _flat_tensors' check in C (triton_backend._all_flat), the whole
# step's host time 719-778 -> 524-525 and 932-941 -> 704-708 us. What is left is ~11 attribute reads
# per tensor (~55 ns each), every one needed by the key.
_data_ptr = torch.Tensor.data_ptr
_numel = torch.Tensor.numel
dtype_of = attrgetter("dtype")  # also triton_backend._all_flat's


def _key(params, grads, d, v, batch, block, n_sums, span):
    """(addresses per tensor, weight decay per group, the rest): a table serves exactly this key; the
    rest alone fixes its layout (NOTE [tables and graphs]). Returned as (exact key, layout key, the
    addresses and decays as tuples)."""
    v_addresses = repeat(0) if v is None else map(_data_ptr, v)
    addresses = tuple(zip(map(_data_ptr, params), map(_data_ptr, grads), map(_data_ptr, d), v_addresses))
    # every tensor's element count: one that changed at the same address (p.grad.data = a slice of it)
    # is a new layout, so check_fits looks at it before the kernels could walk past its end (NOTE [state
    # fits]). Counts, not shapes: a torch.Size costs ~10x an int here (~3 ms against ~0.4 ms per 1000
    # tensors), and this runs at every step; a view of another shape with as many elements at the same
    # address is walked as the flat array it is.
    v_layout = repeat(None) if v is None else zip(map(_numel, v), map(dtype_of, v))
    per_tensor = tuple(zip(map(_numel, params), map(_numel, grads), map(_numel, d),
                           map(dtype_of, params), map(dtype_of, grads), map(dtype_of, d), v_layout))
    layout = _Key((per_tensor, tuple(batch.group_of), tuple(batch.scope_of), tuple(batch.present_groups),
                   str(params[0].device), block, n_sums, span))
    decays = tuple(batch.weight_decay)
    return _Key((addresses, decays, layout)), layout, addresses, decays


def _remember(cache: OrderedDict, key, table: Table) -> None:
    cache[key] = table
    cache.move_to_end(key)
    while len(cache) > _CACHE_SIZE:
        cache.popitem(last=False)


# NOTE [tables and graphs]: torch's recipe for capturing a whole training step sets the gradients to
# None before the capture, so backward() allocates new ones from the graph's pool, at new addresses.
# Building a table copies host to device, which a capture refuses (and which can wait for the stream:
# a host synchronisation). But a table differs from the one of the warm-up steps only in its addresses:
# it is rebased (_rebased): a device copy of the old meta, patched by kernels that take the new
# addresses as arguments, which a graph records by value. Blocks, slot and scope tables are shared with
# the old table (they never change); weight decays that differ (a schedule's) are filled in anew on the
# device. Eager steps whose gradients moved (zero_grad(set_to_none=True)) take the same path. The tables
# are the optimizer's own (TableCache in StepBatch.device_tables): another optimizer's layouts never
# evict them, and another optimizer never shares their scratch (NOTE [shared scratch]). A table that a
# capture used is kept for the life of the process (_IN_GRAPHS): the graph reads it at every replay,
# and the LRU must not free it; so is the table a captured one was rebased from, whose meta the graph's
# clone reads at every replay. A layout never seen before cannot be built during a capture: run a
# warm-up step.
#
# NOTE [shared scratch]: the scratch buffers (partials, terms, scope_scratch, and RLLC's in extras) are
# shared by all the tables of one layout. A step writes every entry it reads before reading it (a table
# found again by its exact key reads what its own last step left, so no kernel relies on zeros), and
# one optimizer's steps are ordered on its stream, as its state is. So one set serves them, not one per
# table: with new gradient addresses every step the cache holds 8 tables, whose own scratch would be 8
# sets (for RLLC with k = 8 on 1e9 parameters, 0.34 GB each; bench/step_memory.py measures what an
# optimizer holds).
def get_table(params, grads, d, v, batch, block: int, n_sums: int, state_units: int | None = None,
              span: int = 1) -> Table:
    """The cached table for this exact list of tensors: rebased when only addresses or weight decays
    changed, rebuilt when a size, dtype, group or scope did (NOTE [tables and graphs]). `state_units`:
    RLLC's k, where the state tensors are (k, *param.shape) (check_fits). `span`: blocks per pass-1
    program and slot (NOTE [pass-1 spans])."""
    key, layout, addresses, decays = _key(params, grads, d, v, batch, block, n_sums, span)
    device = params[0].device
    cache = batch.device_tables.setdefault("triton", TableCache())
    in_capture = capturing(device)
    table = cache.exact.get(key)
    if table is not None and table is cache.last:  # most recent in both maps already: nothing to move
        if in_capture:
            _IN_GRAPHS[id(table)] = table
        return table
    if table is None:  # new addresses: a resized parameter or state is among them (NOTE [state fits])
        check_fits(params, grads, [d] if v is None else [d, v], units=state_units)
        source = cache.by_layout.get(layout)
        if source is not None:
            table = _rebased(source, addresses, decays)
            if in_capture:  # the graph clones source.meta at every replay: it must outlive the LRU too
                _IN_GRAPHS[id(source)] = source
        elif in_capture:
            raise RuntimeError(
                "backend 'triton' builds the tables of a new parameter list (sizes, dtypes, groups) by copying "
                "them to the GPU, which a CUDA graph capture does not allow: run at least one step of this "
                "optimizer outside the capture first (the usual warm-up), with the same parameters getting "
                f"gradients (an optimizer keeps the tables of its {_CACHE_SIZE} latest such lists)")
        else:
            table = _build(params, grads, d, v, batch, block, n_sums, span)
    _remember(cache.exact, key, table)
    _remember(cache.by_layout, layout, table)
    cache.last = table
    if in_capture:
        _IN_GRAPHS[id(table)] = table
    return table


PATCHES = 8  # (index, address) pairs one _patch_kernel launch writes


@triton.jit(do_not_specialize=[f"{c}{j}" for j in range(8) for c in "ia"])
def _patch_kernel(meta, i0, a0, i1, a1, i2, a2, i3, a3, i4, a4, i5, a5, i6, a6, i7, a7):
    """meta[i_j] = a_j for eight (flat index, address) pairs, given as arguments: a captured graph keeps
    them by value (NOTE [tables and graphs]). Unused pairs repeat a used one."""
    tl.store(meta + i0, a0)
    tl.store(meta + i1, a1)
    tl.store(meta + i2, a2)
    tl.store(meta + i3, a3)
    tl.store(meta + i4, a4)
    tl.store(meta + i5, a5)
    tl.store(meta + i6, a6)
    tl.store(meta + i7, a7)


def _patch(meta: torch.Tensor, patches: list) -> None:
    """meta.view(-1)[index] = address for each (index, address) pair, by _patch_kernel launches.

    Address 0 (an empty tensor's, never read: it has no blocks) is left out: Triton types an argument
    by its value, and 0 would be an int32 where every address is an int64, another compiled variant,
    which a capture could be the first to need (NOTE [tables and graphs])."""
    from ..triton_backend import LAUNCH

    patches = [(i, a) for i, a in patches if a != 0]
    flat = meta.view(-1)
    for start in range(0, len(patches), PATCHES):
        chunk = patches[start:start + PATCHES]
        chunk += [chunk[-1]] * (PATCHES - len(chunk))
        _patch_kernel[(1,)](flat, *(x for pair in chunk for x in pair), **LAUNCH)


def _rebased(source: Table, addresses: tuple, decays: tuple) -> Table:
    """source's table for tensors of the same layout at other addresses, or with other weight decays
    (a schedule's), made on the device (NOTE [tables and graphs])."""
    patches = [(t * META_COLS + col, new[col]) for t, (old, new) in enumerate(zip(source.addresses, addresses))
               for col in range(4) if old[col] != new[col]]
    meta = source.meta.clone()
    _patch(meta, patches)
    weight_decay = source.weight_decay
    if decays != source.decays:  # fills, as the lrs (NOTE [no copies from the host] in amm_kernels/_base.py)
        device = weight_decay.device
        weight_decay = torch.stack([torch.full((), w, dtype=torch.float32, device=device) for w in decays])
    # partials, terms, scope_scratch and extras stay source's: NOTE [shared scratch]
    return replace(source, meta=meta, addresses=addresses, decays=decays, weight_decay=weight_decay)


def _rows(i: int, n: int) -> torch.Tensor:
    """The (tensor i, j) rows j = 0 .. n-1, made by torch, not as Python pairs: a 1e9-element step has
    ~1e6 blocks, and this runs again whenever the layout changes (took 1.5 s at 1e9 as Python lists)."""
    return torch.stack([torch.full((n,), i, dtype=torch.int64), torch.arange(n, dtype=torch.int64)], dim=1)


def _build(params, grads, d, v, batch, block, n_sums, span) -> Table:
    device = params[0].device
    scope_pos = batch.scope_pos
    meta, slot_start, buckets, addresses = [], [0], {}, []
    for i, (p, g, dd) in enumerate(zip(params, grads, d)):
        vv = None if v is None else v[i]
        n = p.numel()
        n_spans = triton.cdiv(n, block * span)
        addresses.append((p.data_ptr(), g.data_ptr(), dd.data_ptr(), 0 if vv is None else vv.data_ptr()))
        meta.append([*addresses[-1], n, batch.group_of[i], scope_pos[i], slot_start[-1]])
        slot_start.append(slot_start[-1] + n_spans)
        codes = (DTYPE_CODES[p.dtype], DTYPE_CODES[g.dtype], DTYPE_CODES[dd.dtype],
                 0 if vv is None else DTYPE_CODES[vv.dtype])
        block_rows, span_rows = buckets.setdefault(codes, ([], []))
        block_rows.append(_rows(i, triton.cdiv(n, block)))
        if span > 1:
            span_rows.append(_rows(i, n_spans))
    tensor_start = [0]
    for n in batch.scope_lengths:
        tensor_start.append(tensor_start[-1] + n)

    def dev(values, dtype=torch.int64):
        return torch.tensor(values, dtype=dtype).to(device)

    n_slots = slot_start[-1]
    n_scopes = len(batch.present_scopes)
    meta = dev(meta).reshape(-1, META_COLS)
    # compile and load _patch_kernel now, by a no-op patch of a real (int64) address: a capture may need
    # it, and must not compile it
    first = next(((t * META_COLS + c, a) for t, row in enumerate(addresses) for c, a in enumerate(row) if a), None)
    if first is not None:
        _patch(meta, [first])
    return Table(
        meta=meta,
        slot_start=dev(slot_start),
        tensor_start=dev(tensor_start),
        present_scopes=dev(batch.present_scopes),
        present_groups=dev(batch.present_groups),
        weight_decay=dev(batch.weight_decay, torch.float32),
        buckets=[_bucket(codes, torch.cat(block_rows).to(device),
                         torch.cat(span_rows).to(device) if span_rows else None)
                 for codes, (block_rows, span_rows) in buckets.items()],
        n_slots=n_slots,
        partials=torch.zeros((max(n_slots, 1), n_sums), dtype=torch.float32, device=device),
        terms=torch.zeros((max(len(params), 1), 2), dtype=torch.float64, device=device),
        scope_scratch=torch.zeros((4, n_scopes), dtype=torch.float32, device=device),
        addresses=tuple(addresses),
        decays=tuple(batch.weight_decay),
    )


def _bucket(codes, blocks: torch.Tensor, spans: torch.Tensor | None) -> Bucket:
    spans = blocks if spans is None else spans
    return Bucket(codes, blocks, blocks.shape[0], spans, spans.shape[0])


# NOTE [vector access]: the kernels get their tensors as int64 addresses from the table, so Triton
# knows nothing of their alignment, and a mask against a size loaded at run time has no constancy:
# it compiled every load and store to 4-byte ld/st.global.b32 (seen in the sm_90 PTX). A block that
# lies wholly inside its tensor, of a tensor whose lists all start on 16-byte boundaries, takes the
# WHOLE path instead: no mask, and the pointer declared 16-byte aligned (tl.multiple_of on a pointer
# counts bytes), so the same loads and stores come out as 16-byte ld/st.global.v4. The other blocks
# (a tensor's last, partial block; views that start off a 16-byte boundary) keep the masked path.
# Both paths do the same float32 arithmetic on the same elements.
# Where the hint goes: triton 3.6 (the GPU machine's) records tl.multiple_of as an attribute of the
# operation that produced the value. Applied to as_ptr's result in another @jit function, that
# operation is the call, and inlining drops the attribute: every access was 4-byte again under 3.6
# while 3.9 kept 16-byte ones. So as_ptr applies it to its own int-to-pointer conversion (ALIGNED).
@triton.jit
def whole_block(row, start, lim, BLOCK: tl.constexpr):
    """True for a block of BLOCK elements inside its tensor (start + BLOCK <= lim) whose table row's
    addresses (x, grad, d, v; v is 0 where absent) are all multiples of 16 (NOTE [vector access])."""
    addrs = tl.load(row + 0) | tl.load(row + 1) | tl.load(row + 2) | tl.load(row + 3)
    return ((addrs % 16) == 0) & (start + BLOCK <= lim)


@triton.jit
def grad_scale_of(grad_scale_ptr, HAS_GRAD_SCALE: tl.constexpr):
    """The step's grad scale as float32 (read through its pointer), 1 without one."""
    scale = 1.0
    if HAS_GRAD_SCALE:
        scale = tl.load(grad_scale_ptr).to(tl.float32)
    return scale


@triton.jit
def load_f32(addr, offs, mask, CODE: tl.constexpr, WHOLE: tl.constexpr):
    """The block's elements of the tensor at `addr` (dtype CODE) as float32; masked (0 outside `mask`)
    unless WHOLE (NOTE [vector access])."""
    if WHOLE:
        val = tl.load(as_ptr(addr, CODE, True) + offs)
    else:
        val = tl.load(as_ptr(addr, CODE) + offs, mask=mask, other=0.0)
    return val.to(tl.float32)


@triton.jit
def store_as(addr, offs, value, mask, CODE: tl.constexpr, WHOLE: tl.constexpr = False,
             WHOLE_MASKED: tl.constexpr = False):
    """Store float32 `value` at the tensor of address `addr` (dtype CODE), rounding to nearest even.
    Masked by `mask` unless WHOLE (NOTE [vector access]); WHOLE_MASKED keeps the mask on the WHOLE path,
    for a mask that is uniform along the contiguous dimension (RLLC's rows past k), which keeps the
    stores 16-byte ones.

    NOTE [bfloat16 rounding]: Triton's interpreter converts float32 to bfloat16 by truncation (about half
    of all values land one ulp off torch's round-to-nearest-even), so bfloat16 is rounded here with
    integer operations, identically compiled and interpreted: add 0x7FFF plus the lowest kept bit, keep
    the high 16 bits; NaN is stored as the canonical quiet NaN (the add could carry it into infinity)."""
    if CODE == 1:
        bits = value.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        rounded = tl.where(value != value, 0x7FC0, rounded)
        ptr = addr.to(tl.pointer_type(tl.uint16))
        if WHOLE:  # NOTE [vector access]
            ptr = tl.multiple_of(ptr, 16)
        if WHOLE and not WHOLE_MASKED:
            tl.store(ptr + offs, rounded.to(tl.uint16))
        else:
            tl.store(ptr + offs, rounded.to(tl.uint16), mask=mask)
    else:
        ptr = as_ptr(addr, CODE, WHOLE) + offs
        if WHOLE and not WHOLE_MASKED:
            tl.store(ptr, value.to(ptr.dtype.element_ty))
        else:
            tl.store(ptr, value.to(ptr.dtype.element_ty), mask=mask)

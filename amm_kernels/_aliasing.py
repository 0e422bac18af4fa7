"""Parameters that share memory: found once, when the optimizer is given its parameters.

NOTE [aliased parameters]: two parameter tensors whose elements overlap in memory (two nn.Parameters
made from one tensor, overlapping slices of one buffer) would each be stepped: the sums behind beta
count the shared elements twice, and the fused kernels' update pass writes them from two places at
once (on a GPU, whichever block writes last wins). torch.optim steps such parameters one after the
other without a word; here they are refused, naming both.
- Exact for dense tensors (elements filling their address span: any contiguous tensor, a transpose):
  two of them overlap exactly when their spans do.
- A pair with a strided view that has gaps (a column block of a matrix) is not examined, as torch's
  own overlap check (at::get_overlap_status) gives up on it: an exact answer costs time in the size
  of the buffer, and column blocks of one weight (attention heads) are a legitimate layout.
- Tensors without an address are passed over: empty, meta, fake (FakeTensorMode), lazy
  (nn.UninitializedParameter) and tensor subclasses without storage.
One parameter whose own elements share memory (made with expand(): a stride of 0 over a dimension
of more than one element) is refused too: every in-place update of it fails, in torch.optim's
optimizers as here, and a fused step would fail after it had updated the other tensors. A parameter
or state tensor made so later (p.data = t.expand(...)) is refused by every backend's check that the
step's tensors fit (_step.check_fits; the C++ glue's own), before anything is written. Other
self-overlapping layouts (unfold's windows) are not examined, as torch does not (it writes them).
Parameters that share a storage without sharing an element (disjoint slices of one flat buffer, as
FSDP1's flat parameters and ZeRO's bucket views are) are fine. One tensor listed twice is a separate
error (the duplicate check in add_param_group).
"""
from __future__ import annotations

from torch import Tensor
from torch.nn.parameter import UninitializedTensorMixin

try:
    from torch._subclasses.fake_tensor import FakeTensor
except ImportError:  # pragma: no cover - a torch without it
    FakeTensor = ()


def _span(t: Tensor) -> tuple[int, int] | None:
    """[first byte, last byte + 1) of the memory t's elements occupy (strides are never negative),
    or None for a tensor without an address (see the NOTE)."""
    if isinstance(t, (UninitializedTensorMixin, FakeTensor)) or t.numel() == 0 or t.device.type == "meta":
        return None
    try:
        start = t.data_ptr()
    except (RuntimeError, NotImplementedError, TypeError):  # a subclass without storage
        return None
    if start == 0:  # no memory behind it
        return None
    extent = 1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride()))
    return start, start + extent * t.element_size()


def _dense(t: Tensor, span: tuple[int, int]) -> bool:
    """Its elements fill its span without gaps."""
    return t.numel() * t.element_size() == span[1] - span[0]


def first_overlap(tensors: list[Tensor], keys: list | None = None) -> tuple[int, int] | None:
    """Positions (i, j), i < j, of two dense tensors of the list that share memory, or None. A pair
    whose `keys` are one object (the same parameter listed twice, reported by its own check) is passed
    over. One pass over the spans sorted by start: a dense span that begins before the end of an
    earlier dense one on the same device overlaps it."""
    spans = []
    for i, t in enumerate(tensors):
        span = _span(t)
        if span is not None and _dense(t, span):
            spans.append((str(t.device), span[0], span[1], i))
    spans.sort()
    for (dev_a, _, end_a, i), (dev_b, start_b, _, j) in zip(spans, spans[1:]):
        # sorted by start, dense spans that do not overlap are disjoint intervals in order: checking
        # neighbours is enough (a span inside another overlaps its neighbour too)
        if dev_a == dev_b and start_b < end_a and (keys is None or keys[i] is not keys[j]):
            return min(i, j), max(i, j)
    return None


def repeats_elements(t: Tensor) -> bool:
    """A stride of 0 over a dimension of more than one element (expand()'s broadcast: its elements share
    memory). Reads only the shape and strides: no address (a compiled step traces it)."""
    return t.numel() > 1 and any(s == 0 and n > 1 for n, s in zip(t.shape, t.stride()))


def first_self_overlap(tensors: list[Tensor]) -> int | None:
    """The position of the first tensor of the list that repeats elements (repeats_elements), or None."""
    for i, t in enumerate(tensors):
        if _span(t) is not None and repeats_elements(t):
            return i
    return None

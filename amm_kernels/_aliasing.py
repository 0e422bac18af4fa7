"""Parameters that share memory: found once, when the optimizer is given its parameters.

NOTE [aliased parameters]: two parameter tensors whose elements overlap in memory (two nn.Parameters
made from one tensor, overlapping slices of one buffer) would each be stepped: the sums behind beta
count the shared elements twice, and the fused kernels' update pass writes them from two places at
once (on a GPU, whichever block writes last wins). torch.optim steps such parameters one after the
other without a word; here they are refused, naming both. Parameters that share a storage without
sharing an element (disjoint slices of one flat buffer, as FSDP1's flat parameters and ZeRO's bucket
views are; interleaved strided views) are fine. One tensor listed twice is a separate error (the
duplicate check in add_param_group).
"""
from __future__ import annotations

import torch
from torch import Tensor


def _span(t: Tensor) -> tuple[int, int]:
    """[first byte, last byte + 1) of the memory t's elements occupy (strides are never negative)."""
    start = t.data_ptr()
    extent = 1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride()))
    return start, start + extent * t.element_size()


def _dense(t: Tensor) -> bool:
    """Its elements fill its span without gaps, so two dense tensors overlap iff their spans do."""
    return t.numel() * t.element_size() == _span(t)[1] - _span(t)[0]


def _share_an_element(a: Tensor, b: Tensor) -> bool:
    """Exact, for two tensors whose spans intersect: the storage offsets of their elements compared.
    Tensors of different element sizes (or storages) whose spans meet are taken as overlapping."""
    if a.element_size() != b.element_size() or a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return True
    if _dense(a) and _dense(b):
        return True
    n = max(_span(a)[1], _span(b)[1]) - a.untyped_storage().data_ptr()
    offsets = torch.arange(n // a.element_size() + 1)
    of = lambda t: offsets.as_strided(t.shape, t.stride(), t.storage_offset()).reshape(-1)  # noqa: E731
    return bool(torch.isin(of(a), of(b)).any())


def first_overlap(tensors: list[Tensor], keys: list | None = None) -> tuple[int, int] | None:
    """Positions (i, j), i < j, of two tensors of the list that share an element of memory, or None.
    Meta and empty tensors hold no memory. A pair whose `keys` are one object (the same parameter
    listed twice, reported by its own check) is passed over. One pass over the spans sorted by start."""
    spans = []
    for i, t in enumerate(tensors):
        if t.numel() == 0 or t.device.type == "meta":
            continue
        start, end = _span(t)
        spans.append((str(t.device), start, end, i))
    spans.sort()
    open_spans: list[tuple[str, int, int, int]] = []  # spans that reach past the current start
    for span in spans:
        device, start, _, i = span
        open_spans = [s for s in open_spans if s[0] == device and s[2] > start]
        for _, _, _, j in open_spans:
            if (keys is None or keys[i] is not keys[j]) and _share_an_element(tensors[j], tensors[i]):
                return min(i, j), max(i, j)
        open_spans.append(span)
    return None

"""Backend dispatch: which implementations of the two-pass step exist, where they run, and "auto".

A backend is a pair of functions `amsgd_step(batch, hp)` and `amadamw_step(batch, hp)` that take a
`StepBatch` (amm_kernels/_step.py) and update it in place, exactly as the reference does.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from . import reference


@dataclass(frozen=True)
class Backend:
    name: str
    device_types: tuple[str, ...]
    dtypes: tuple[torch.dtype, ...]
    load: Callable[[], object]  # returns a module with amsgd_step / amadamw_step, or raises ImportError

    def loaded(self) -> tuple[object, ImportError | None, str | None]:
        """What `load` gives: (module, None, None), or (None, the ImportError it raised, its message).
        NOTE [compile]: a step traced by torch.compile may resolve a backend (new parameter dtypes
        after model.to(dtype)); an import, a raised and caught ImportError or its str() cannot be
        traced, a dict lookup can. So what the last eager call gave is kept, and a traced call reads
        it: every loader has run by then (the optimizer's construction resolves its backends, which
        asks each one whether it is available).
        Of an ImportError only its message is kept, in a new ImportError: the caught one's traceback (and
        its cause's) holds the frames of the call that asked, whose callers reach the optimizer under
        construction and every local of the user's function that built it (a whole model and its data),
        which a module-level dict would keep alive until the next construction."""
        key = self.name
        if key not in _LOADED or not torch.compiler.is_compiling():  # eager: loaded again (may change,
            try:  # as TRITON_INTERPRET's effect does between imports)
                _LOADED[key] = (self.load(), None, None)
            except ImportError as err:
                why = str(err)
                _LOADED[key] = (None, ImportError(why), why)
        return _LOADED[key]

    def module(self):
        """The backend's module (ImportError if it cannot be loaded here)."""
        module, err, _ = self.loaded()
        if err is not None:
            raise err
        return module

    def unavailable_reason(self, device: torch.device) -> str | None:
        if device.type not in self.device_types:
            return f"it runs on {', '.join(self.device_types)} tensors, not {device.type}"
        module, err, why = self.loaded()
        if err is not None:
            return why
        # A backend module may refine by device (triton: CPU tensors only in its interpreter mode).
        check = getattr(module, "unavailable_reason", None)
        return check(device) if callable(check) else None


_FLOATS = (torch.float32, torch.bfloat16, torch.float16)
_LOADED: dict[str, tuple] = {}  # Backend.loaded: a backend's name -> what its loader last gave



def _load_compiled():
    """The C++/CUDA extension's ops (amm_kernels/compiled_backend.py); ImportError if not built."""
    from . import compiled_backend

    return compiled_backend


def _load_cuda():
    module = _load_compiled()
    if not module.has_cuda_kernels():
        raise ImportError("amm_kernels._C was built without its CUDA kernels (no nvcc or a CPU-only torch at build time)")
    return module


def _load_triton():
    from . import triton_backend

    return triton_backend


_BACKENDS: dict[str, Backend] = {
    "torch": Backend("torch", ("cpu", "cuda", "mps", "xpu", "meta"), (torch.float64, *_FLOATS), lambda: reference),
    "cpu": Backend("cpu", ("cpu",), _FLOATS, _load_compiled),
    "cuda": Backend("cuda", ("cuda",), _FLOATS, _load_cuda),
    "triton": Backend("triton", ("cuda", "cpu"), _FLOATS, _load_triton),
}

# What "auto" tries, fastest first, for each device type; the reference runs everywhere.
_AUTO_ORDER = {"cuda": ("cuda", "triton", "torch"), "cpu": ("cpu", "torch")}

BACKEND_NAMES = ("auto", "torch", "cpu", "cuda", "triton")


def register(backend: Backend) -> None:
    """Adds (or replaces) a backend; its name becomes a valid `backend=` argument."""
    global BACKEND_NAMES
    _BACKENDS[backend.name] = backend
    _LOADED.pop(backend.name, None)
    if backend.name not in BACKEND_NAMES:
        BACKEND_NAMES = (*BACKEND_NAMES, backend.name)


def available_backends(device: torch.device | str = "cpu", op: str | None = None) -> list[str]:
    """Names of the backends that can run a step on tensors of `device`, fastest first; with `op`
    (e.g. "rllc_step"), only those whose module implements that optimizer's step."""
    device = torch.device(device)
    order = _AUTO_ORDER.get(device.type, ("torch",))
    names = [n for n in order if n in _BACKENDS] + [n for n in _BACKENDS if n not in order]
    names = [n for n in names if _BACKENDS[n].unavailable_reason(device) is None]
    return [n for n in names if op is None or hasattr(_BACKENDS[n].module(), op)]


def backend_supports_dtype(name: str, dtype: torch.dtype) -> bool:
    """Whether backend `name` runs parameters of `dtype` (on some device); "auto" runs every dtype some
    backend runs. (Whether it can run here: available_backends.) An unknown name is a ValueError."""
    if name == "auto":
        return any(dtype in b.dtypes for b in _BACKENDS.values())
    if name not in _BACKENDS:
        raise ValueError(f"backend_supports_dtype: name must be one of {', '.join(map(repr, BACKEND_NAMES))}; got {name!r}")
    return dtype in _BACKENDS[name].dtypes


def resolve(name: str, device: torch.device, dtypes: set[torch.dtype], owner: str, op: str | None = None):
    """The module implementing backend `name` (and, if given, the step function `op`) for these
    tensors, or a clear error naming the fallbacks."""
    runnable = available_backends(device, op)
    if name == "auto":
        for candidate in runnable:
            if all(backend_supports_dtype(candidate, dt) for dt in dtypes):
                return _BACKENDS[candidate].module()
        if not runnable:
            reasons = "; ".join(f"{n!r}: {b.unavailable_reason(device)}" for n, b in _BACKENDS.items())
            raise RuntimeError(f"{owner}: no backend runs on {device.type} tensors here ({reasons})")
        raise RuntimeError(f"{owner}: no backend supports parameters of dtype {sorted(map(str, dtypes))} on {device}")
    backend = _BACKENDS.get(name)
    fallbacks = f"use one of {', '.join(repr(n) for n in runnable)}" if runnable else f"no backend runs on {device.type} here"
    if backend is None:
        raise RuntimeError(f"{owner}: backend {name!r} is not built in this installation; {fallbacks}")
    reason = backend.unavailable_reason(device)
    if reason is not None:
        raise RuntimeError(f"{owner}: backend {name!r} cannot run here ({reason}); {fallbacks}")
    unsupported = [dt for dt in dtypes if dt not in backend.dtypes]
    if unsupported:
        raise TypeError(
            f"{owner}: backend {name!r} does not support parameters of dtype {unsupported[0]}; "
            f"it supports {', '.join(map(str, backend.dtypes))}"
        )
    module = backend.module()
    if op is not None and not hasattr(module, op):
        raise RuntimeError(f"{owner}: backend {name!r} has no {owner} kernels yet; {fallbacks}")
    return module

"""The "cuda_sim" backend of the tests: the CUDA backend's own code (csrc/cuda: the glue, the plans,
every kernel) run on CPU tensors through the CUDA-on-CPU simulator (tests/cuda_sim, NOTE [CUDA on
the CPU] in amm_cuda_sim.h). It lets CI run every CUDA parity test without a GPU.

The simulator library registers the CUDA ops as torch.ops.amm_cuda_sim.* for CPU tensors, beside the
real amm_kernels._C; the backend module here is amm_kernels' own compiled-backend Python code with its
op namespace pointed there, so nothing but the op library differs from backend="cuda".
"""
from __future__ import annotations

import functools
import importlib.util
import os
import types
from pathlib import Path

import pytest
import torch

NAME = "cuda_sim"
_SIM_DIR = Path(__file__).resolve().parent / "cuda_sim"


@functools.lru_cache(maxsize=None)
def build_module():
    """tests/cuda_sim/build.py as a module (loaded by path: `import build` could find pypa's build)."""
    spec = importlib.util.spec_from_file_location("amm_cuda_sim_build", _SIM_DIR / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@functools.lru_cache(maxsize=None)
def _load() -> str | None:
    """Builds (or finds) and loads the simulator library; the reason it cannot, or None."""
    if os.environ.get("AMM_NO_CUDA_SIM") == "1":  # bench/gpu_session.sh: the real CUDA backend is there
        return "AMM_NO_CUDA_SIM=1: the CUDA-on-CPU simulator is not built in this run"
    sim_build = build_module()
    reason = sim_build.unavailable_reason()
    if reason:
        return reason
    # AMM_SIM_ASAN=1: the AddressSanitizer build (the process must have libasan preloaded; test_cuda_sim.py).
    torch.ops.load_library(str(sim_build.build(sanitize=os.environ.get("AMM_SIM_ASAN") == "1")))
    return None


def _rebind(fn, namespace):
    """fn with the module globals it sees replaced by `namespace` (a torch.no_grad-decorated fn: the
    function inside, decorated again)."""
    inner = getattr(fn, "__wrapped__", None)
    if inner is not None:
        return torch.no_grad()(_rebind(inner, namespace))
    return types.FunctionType(fn.__code__, namespace, fn.__name__, fn.__defaults__, fn.__closure__)


@functools.lru_cache(maxsize=None)
def backend_module():
    """amm_kernels' compiled backend (amsgd_step, amadamw_step, rllc_step), on torch.ops.amm_cuda_sim."""
    from amm_kernels import compiled_backend, rllc_compiled

    ops = torch.ops.amm_cuda_sim
    module = types.ModuleType("amm_kernels_cuda_sim_backend")
    cb = dict(vars(compiled_backend), _OPS=ops)
    module.amsgd_step = _rebind(compiled_backend.amsgd_step, cb)
    module.amadamw_step = _rebind(compiled_backend.amadamw_step, cb)
    rc = dict(vars(rllc_compiled), _OPS=ops)
    rc["has_rllc_op"] = _rebind(rllc_compiled.has_rllc_op, rc)
    rc["_fallback"] = _rebind(rllc_compiled._fallback, rc)
    module.rllc_step = _rebind(rllc_compiled.rllc_step, rc)
    return module


def register() -> str | None:
    """Registers the "cuda_sim" backend for CPU tensors (building the simulator library first if
    needed); returns why it cannot, or None."""
    reason = _load()
    if reason:
        return reason
    from amm_kernels import backends

    if NAME not in backends._BACKENDS:  # the CUDA backend's dtypes, on CPU tensors
        backends.register(backends.Backend(NAME, ("cpu",), backends._FLOATS, backend_module))
    return None


def ensure():
    """register(), or skip the calling test with the reason."""
    reason = register()
    if reason:
        pytest.skip(reason)

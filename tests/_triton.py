"""Shared set-up of the Triton tests: the backend imported in interpreter mode where there is no GPU,
the device, the fixture that keeps TRITON_INTERPRET set for the tests, and the input makers."""
import importlib.util
import os

import pytest
import torch

CUDA = torch.cuda.is_available()
DEV = torch.device("cuda" if CUDA else "cpu")


def import_triton_backend():
    """amm_kernels.triton_backend, or a module-level skip. Without a GPU, TRITON_INTERPRET=1 is set
    before triton's first import in this process (NOTE [import order] in amm_kernels/triton_backend.py)
    and restored afterwards, so other test files do not pick up the slow interpreter backend."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed", allow_module_level=True)
    if CUDA:
        import amm_kernels.triton_backend as triton_backend

        return triton_backend
    saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        import amm_kernels.triton_backend as triton_backend  # decorates the kernels for the interpreter
    except ImportError as err:
        pytest.skip(f"triton's interpreter is not usable here: {err}", allow_module_level=True)
    finally:
        if saved is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = saved
    return triton_backend


@pytest.fixture(autouse=True)
def interpreter_env(monkeypatch):
    """Autouse in the modules that import it: the backend checks TRITON_INTERPRET at each step."""
    if not CUDA:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    yield


def make_params(shapes, dtype, seed=0, transposed_last=True):
    """Random parameters on DEV; the last 2-D one is a transposed (non-contiguous) view."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i, s in enumerate(shapes):
        t = torch.randn(s, generator=gen)
        if transposed_last and i == len(shapes) - 1 and len(s) == 2:
            t = torch.randn(tuple(reversed(s)), generator=gen).t()
        out.append(t.to(DEV, dtype).requires_grad_())
    return out


def grads_for(params, step, seed=0, scale=1.0, flip=False):
    """Random gradients; with flip, a fixed direction whose sign flips every step plus 0.3 noise
    (tests/test_compiled_kernels.py NOTE [moving beta]: AMAdamW's beta then leaves its clamp)."""
    gen = torch.Generator().manual_seed(1000 * seed + step)
    noise = [torch.randn(p.shape, generator=gen) for p in params]
    if flip:
        base_gen = torch.Generator().manual_seed(1000 * seed + 999)
        noise = [(-1) ** step * torch.randn(p.shape, generator=base_gen) + 0.3 * n for p, n in zip(params, noise)]
    return [(scale * n).to(DEV, p.dtype) for p, n in zip(params, noise)]

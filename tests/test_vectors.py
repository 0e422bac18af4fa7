"""Replay SPEC.md's conformance vectors (am*.json) through the package, on every available backend.

Every step's beta(s) and parameters are compared: float64 (on backends that support it) to the
float64 tolerance, float32 to the float32 tolerance of _helpers.TOLERANCES.
"""

import _cuda_sim
import numpy as np
import pytest
import torch

from amm_kernels import AMAdamW, AMSGD, available_backends, backend_supports_dtype

from _helpers import (assert_params_after, load_vector, set_vector_grads, tolerance, vector_params,
                      vector_spec_kwargs, vector_tensors)

CPU = torch.device("cpu")
# Every backend of every device here: on a GPU machine the cuda and triton backends replay them too.
DEVICES = [CPU] + ([torch.device("cuda")] if torch.cuda.is_available() else [])


def _backend_dtype_params():
    out = []
    for device in DEVICES:
        for name in available_backends(device):
            for dtype in (torch.float64, torch.float32):
                if backend_supports_dtype(name, dtype):
                    tag = f"{device.type}-{name}-{str(dtype).split('.')[-1]}"
                    out.append(pytest.param(device, name, dtype, id=tag))
    # The CUDA backend's code on CPU tensors (tests/_cuda_sim.py), GPU or not.
    out.append(pytest.param(CPU, _cuda_sim.NAME, torch.float32, id=f"cpu-{_cuda_sim.NAME}-float32"))
    # The "cpu" backend with every scope its own batch (NOTE [scope batches] in
    # csrc/cpu/step_driver_cpu.cpp; the vectors' steps are far smaller than one default batch).
    if "cpu" in available_backends(CPU):
        out.append(pytest.param(CPU, CPU_BATCHED, torch.float32, id="cpu-cpu-float32-scope-batches"))
    return out


CPU_BATCHED = "cpu, AMM_CPU_BATCH_BYTES=1"


def test_reference_backend_is_available_in_float64():
    names = available_backends(CPU)
    assert "torch" in names, f"available_backends(cpu) = {names!r} lacks the 'torch' reference"
    assert backend_supports_dtype("torch", torch.float64) is True


def scope_shape(vec):
    scope = vec["hyper"]["beta_scope"]
    if scope == "global":
        return ()
    if scope == "group":
        return (len(vec["groups"]),)
    return (sum(len(g["params"]) for g in vec["groups"]),)


def build(vec, backend, dtype, device=CPU):
    params = vector_tensors(vec, dtype, device)
    groups = [{"params": ps, "weight_decay": g["weight_decay"], "lr": vec["steps"][0]["lr"][gi]}
              for gi, (ps, g) in enumerate(zip(params, vec["groups"]))]
    cls = {"AMSGD": AMSGD, "AMAdamW": AMAdamW}[vec["optimizer"]]
    return cls(groups, backend=backend, **vector_spec_kwargs(vec)), params


@pytest.mark.parametrize("device,backend,dtype", _backend_dtype_params())
@pytest.mark.parametrize("path", vector_params("am"))
def test_vector(path, device, backend, dtype, monkeypatch):
    if backend == _cuda_sim.NAME:
        _cuda_sim.ensure()
    if backend == CPU_BATCHED:
        monkeypatch.setenv("AMM_CPU_BATCH_BYTES", "1")
        backend = "cpu"
    replay_am_vector(path, device, backend, dtype)


def replay_am_vector(path, device, backend, dtype):
    """Every step of the vector at `path` on `backend`: beta(s) and the parameters after each step, to the
    tolerance of `dtype` (tests/test_triton_backend.py replays them on triton, in the interpreter here)."""
    vec = load_vector(path)
    rtol, atol = tolerance(dtype)
    opt, params = build(vec, backend, dtype, device)
    loss_mode = vec["hyper"].get("delta_f") == "loss"
    where = f"{vec['name']} device={device} backend={backend} {dtype}"

    for i, rec in enumerate(vec["steps"]):
        for gi, lr in enumerate(rec["lr"]):
            opt.param_groups[gi]["lr"] = lr

        if loss_mode:
            def closure():
                set_vector_grads(params, rec, dtype, device)
                return torch.tensor(rec["loss"], dtype=dtype, device=device)

            opt.step(closure)
        else:
            set_vector_grads(params, rec, dtype, device)
            opt.step()

        beta = opt.beta
        assert isinstance(beta, torch.Tensor), f"{where} step {i}: optimizer.beta is {type(beta)}"
        assert tuple(beta.shape) == scope_shape(vec), (
            f"{where} step {i}: optimizer.beta has shape {tuple(beta.shape)}, "
            f"expected {scope_shape(vec)} for beta_scope={vec['hyper']['beta_scope']!r}")
        np.testing.assert_allclose(beta.detach().cpu().to(torch.float64).reshape(-1).numpy(), rec["beta"],
                                   rtol=rtol, atol=atol, err_msg=f"{where} step {i}: beta")
        assert_params_after(params, rec, dtype, rtol, atol, f"{where} step {i}")

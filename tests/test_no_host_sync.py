"""No host synchronisation inside step() on a GPU: every backend, after warm-up steps, runs its steps with
torch.cuda.set_sync_debug_mode("error"), which raises on anything that waits for the device (.item(),
a blocking copy to or from the host, a Python branch on a device value, nonzero). The gradients are
new tensors every step (zero_grad(set_to_none=True)), so the triton backend's table rebasing (NOTE
[tables and graphs]) runs under it too. GPU only: torch on CPU has no such mode (skips without CUDA).

Without a GPU, the reference backend runs on the meta device (tensors without data) as a stand-in for
one, and every aten op of its steady-state steps is checked: none may copy from the host to the device
or read a device value back (NOTE [no copies from the host] in amm_kernels/_base.py)."""
import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import amm_kernels
from amm_kernels import RLLC, AMAdamW, AMSGD

CUDA = torch.cuda.is_available()
BACKENDS = amm_kernels.available_backends("cuda") if CUDA else []


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", BACKENDS or ["torch"])
@pytest.mark.parametrize("cls", [AMSGD, AMAdamW, RLLC])
@pytest.mark.parametrize("mode", ["float_lr", "capturable_amp", "bf16_float32_state"])
def test_cuda_step_has_no_host_sync(cls, backend, mode):
    """float_lr: capturable=False, float lrs, no scaler. capturable_amp: capturable=True with lr tensors
    and a GradScaler's grad_scale / found_inf on the device. bf16_float32_state: float lrs, bfloat16
    parameters with state_dtype=torch.float32. Two groups, two scopes' worth of tensors."""
    torch.manual_seed(0)
    shapes = [(64, 33), (33,), (1,), (0,), (4097,), (7, 5)]
    dtype = torch.bfloat16 if mode == "bf16_float32_state" else torch.float32
    params = [torch.randn(s, device="cuda").to(dtype).requires_grad_() for s in shapes]
    tensor_lr = mode == "capturable_amp"
    lrs = [torch.tensor(v, device="cuda") if tensor_lr else v for v in (0.01, 0.02)]
    kw = dict(law_lr=0.05) if cls is RLLC else dict(beta_scope="group")
    if mode == "bf16_float32_state":
        kw["state_dtype"] = torch.float32
    opt = cls([{"params": params[:3], "lr": lrs[0]}, {"params": params[3:], "lr": lrs[1]}], backend=backend,
              capturable=tensor_lr, **kw)
    if mode == "capturable_amp":
        opt.grad_scale = torch.tensor(4.0, device="cuda")
        opt.found_inf = torch.zeros((), device="cuda")
    gen = torch.Generator(device="cuda").manual_seed(1)

    def new_grads():
        for p in params:
            p.grad = torch.randn(p.shape, device="cuda", generator=gen).to(dtype)

    for _ in range(2):  # warm-up: state, tables and caches are made here (copies to the device allowed)
        new_grads()
        opt.step()
    torch.cuda.synchronize()
    before = [p.detach().clone() for p in params]
    kept = []  # keep each step's gradients alive, so the next ones get new addresses
    for _ in range(3):
        new_grads()
        kept.append([p.grad for p in params])
        torch.cuda.set_sync_debug_mode("error")
        try:
            opt.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert any(not torch.equal(a, b) for a, b in zip(before, params)), "the steps changed nothing"
    assert all(torch.isfinite(p).all() for p in params)


# aten ops that read a device value back to the host, or whose output size depends on one
_READS_BACK = {"_local_scalar_dense", "item", "nonzero", "masked_select", "unique", "_unique2", "unique_consecutive",
               "repeat_interleave", "is_nonzero", "equal", "allclose"}


class _HostTraffic(TorchDispatchMode):
    """Records the aten ops that copy from the host to the (meta) device or read a device value back."""

    def __init__(self):
        super().__init__()
        self.found = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        ins = [t for t in tree_flatten((args, kwargs or {}))[0] if isinstance(t, torch.Tensor)]
        outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        if name in _READS_BACK:
            self.found.append(name)
        elif name.startswith("lift_fresh") and any(t.device.type == "meta" for t in outs):
            self.found.append(f"{name}: Python data -> device (torch.tensor, or an index given as a list)")
        elif any(t.device.type == "cpu" for t in ins) and any(t.device.type == "meta" for t in ins + outs):
            self.found.append(f"{name}: host -> device")
        return out


class _SequenceIndex(TorchFunctionMode):
    """Records indexing of a device tensor with Python sequences: torch turns them into index tensors
    on the device below the dispatcher (a copy from the host that _HostTraffic cannot see)."""

    def __init__(self):
        super().__init__()
        self.found = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in ("__getitem__", "__setitem__") and args[0].device.type != "cpu":
            index = args[1] if isinstance(args[1], tuple) else (args[1],)
            if any(isinstance(i, (list, tuple)) for i in index):
                self.found.append(f"{func.__name__} with a Python sequence index: host -> device")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("cls", [AMSGD, AMAdamW, RLLC])
@pytest.mark.parametrize("mode", ["float_lr", "tensor_lr_amp", "schedules", "loss", "bf16_float32_state"])
def test_reference_step_copies_nothing_from_the_host(cls, mode):
    """float_lr: constant float lrs. tensor_lr_amp: device lr tensors, grad_scale / found_inf. schedules:
    float lr and weight decay changed every step (a scheduler's; made on the device by fills). loss:
    AMSGD's loss mode with a float closure result (RLLC, AMAdamW: a Python-float lr schedule instead).
    bf16_float32_state: bfloat16 parameters with state_dtype=torch.float32."""
    dev = torch.device("meta")
    shapes = [(64, 33), (33,), (1,), (0,), (4097,), (7, 5)]
    dtype = torch.bfloat16 if mode == "bf16_float32_state" else torch.float32
    params = [torch.empty(s, device=dev, dtype=dtype).requires_grad_() for s in shapes]
    lrs = [torch.full((), v, device=dev) if mode == "tensor_lr_amp" else v for v in (0.01, 0.02)]
    kw = dict(law_lr=0.05) if cls is RLLC else dict(beta_scope="group")
    if mode == "loss" and cls is AMSGD:
        kw = dict(delta_f="loss", beta_scope="global")
    groups = [{"params": params[:3], "lr": lrs[0]}, {"params": params[3:], "lr": lrs[1]}]
    if cls is not RLLC:
        groups[1]["weight_decay"] = 0.01
    if mode == "bf16_float32_state":
        kw["state_dtype"] = torch.float32
    opt = cls(groups, backend="torch", **kw)
    if mode == "tensor_lr_amp":
        opt.grad_scale = torch.full((), 4.0, device=dev)
        opt.found_inf = torch.zeros((), device=dev)
    closure = (lambda: 1.5) if mode == "loss" and cls is AMSGD else None
    found = []
    for step in range(5):
        for p in params:
            p.grad = torch.empty(p.shape, device=dev, dtype=dtype)
        if mode in ("schedules", "loss"):
            for j, g in enumerate(opt.param_groups):
                g["lr"] = 0.01 * (1 + 0.1 * step + j)
                if "weight_decay" in g and cls is not RLLC and j == 1:
                    g["weight_decay"] = 0.01 * (1 + 0.1 * step)
        spy, index_spy = _HostTraffic(), _SequenceIndex()
        with spy, index_spy:
            opt.step(closure)
        if step >= 2:  # after warm-up (state, caches)
            found += spy.found + index_spy.found
    assert not found, sorted(set(found))

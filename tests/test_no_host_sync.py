"""No host synchronisation inside step() on a GPU: every backend, after warm-up steps, runs its steps with
torch.cuda.set_sync_debug_mode("error"), which raises on anything that waits for the device (.item(),
a blocking copy to or from the host, a Python branch on a device value, nonzero). The gradients are
new tensors every step (zero_grad(set_to_none=True)), so the triton backend's table rebasing (NOTE
[tables and graphs]) runs under it too. GPU only: torch on CPU has no such mode (skips without CUDA)."""
import pytest
import torch

import amm_kernels
from amm_kernels import RLLC, AMAdamW, AMSGD

CUDA = torch.cuda.is_available()
BACKENDS = amm_kernels.available_backends("cuda") if CUDA else []


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", BACKENDS or ["torch"])
@pytest.mark.parametrize("cls", [AMSGD, AMAdamW, RLLC])
@pytest.mark.parametrize("mode", ["float_lr", "capturable_amp"])
def test_cuda_step_has_no_host_sync(cls, backend, mode):
    """float_lr: capturable=False, float lrs, no scaler. capturable_amp: capturable=True with lr tensors
    and a GradScaler's grad_scale / found_inf on the device. Two groups, two scopes' worth of tensors."""
    torch.manual_seed(0)
    shapes = [(64, 33), (33,), (1,), (0,), (4097,), (7, 5)]
    params = [torch.randn(s, device="cuda").requires_grad_() for s in shapes]
    tensor_lr = mode == "capturable_amp"
    lrs = [torch.tensor(v, device="cuda") if tensor_lr else v for v in (0.01, 0.02)]
    kw = dict(law_lr=0.05) if cls is RLLC else dict(beta_scope="group")
    opt = cls([{"params": params[:3], "lr": lrs[0]}, {"params": params[3:], "lr": lrs[1]}], backend=backend,
              capturable=tensor_lr, **kw)
    if mode == "capturable_amp":
        opt.grad_scale = torch.tensor(4.0, device="cuda")
        opt.found_inf = torch.zeros((), device="cuda")
    gen = torch.Generator(device="cuda").manual_seed(1)

    def new_grads():
        for p in params:
            p.grad = torch.randn(p.shape, device="cuda", generator=gen)

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

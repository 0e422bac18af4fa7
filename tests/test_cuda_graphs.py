"""CUDA graphs: with capturable=True (lr as a device tensor, the scope state on the GPU) a whole training
step (forward, backward, optimizer step) is captured once and replayed; replays match eager steps."""
import pytest
import torch

import amm_kernels
from _helpers import coefficients
from amm_kernels import RLLC, AMAdamW, AMSGD

CUDA = torch.cuda.is_available()
BACKENDS = [b for b in amm_kernels.available_backends("cuda") if b in ("torch", "cuda", "triton")] if CUDA else []
WARMUP, STEPS = 3, 8


def test_capturable_needs_a_gpu_parameter():
    p = torch.zeros(3, requires_grad=True)
    p.grad = torch.ones(3)
    opt = AMSGD([p], capturable=True, backend="torch")
    with pytest.raises(RuntimeError, match="capturable=True needs parameters on a CUDA"):
        opt.step()


@pytest.mark.parametrize("cls", [AMSGD, AMAdamW, RLLC])
def test_what_a_captured_step_read_outlives_the_caches(monkeypatch, cls):
    """NOTE [kept for graphs] (_base.py): a step under a capture (simulated on the CPU: _base.capturing
    says so) keeps the lr tensor it read, although a scheduler's next lr replaces it in the cache and the
    cache is cleared past 256 entries; a graph replays reads of it. Without the keep it was freed."""
    import gc
    import weakref

    from amm_kernels import _base

    p = torch.randn(5, requires_grad=True)
    opt = cls([p], lr=0.02, backend="torch")
    p.grad = torch.ones(5)
    opt.step()  # warm-up
    with monkeypatch.context() as m:
        m.setattr(_base, "capturing", lambda device: True)
        opt.step()
    captured_lr = weakref.ref(next(t for k, t in opt._index_cache.items() if k[0] == "lr"))
    for step in range(3):  # a schedule: each lr replaces the last in the cache
        opt.param_groups[0]["lr"] = 0.01 / (step + 1)
        opt.step()
    opt._index_cache.update({("filler", i): torch.zeros(1) for i in range(300)})
    opt.step()  # clears the cache
    gc.collect()
    assert captured_lr() is not None


def make(cls, backend):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4)).cuda()
    lr = torch.tensor(0.005 if cls is AMAdamW else 0.02, device="cuda")
    extra = dict(law_lr=0.05, memory="M(0.9)+M(0.5)") if cls is RLLC else {}
    return model, cls(model.parameters(), lr=lr, backend=backend, capturable=True, **extra)


def batches():
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(32, 16, generator=gen).cuda(), torch.randn(32, 4, generator=gen).cuda(), (-1.0) ** t)
            for t in range(WARMUP + STEPS)]


def loss_fn(model, x, y, sign):
    return sign * torch.nn.functional.mse_loss(model(x), y)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", BACKENDS or ["torch"])
@pytest.mark.parametrize("cls", [AMSGD, AMAdamW, RLLC])
@pytest.mark.parametrize("set_to_none", [True, False], ids=["grads_made_in_graph", "grads_kept"])
def test_whole_training_step_captured_and_replayed_matches_eager(cls, backend, set_to_none):
    """set_to_none=True is torch's recipe: backward allocates the gradients inside the capture, at new
    addresses (the triton tables are rebased there: NOTE [tables and graphs]); False keeps them and the
    graph zeroes them in place."""
    data = batches()
    ref_model, ref_opt = make(cls, backend)
    ref_betas = []
    for x, y, sign in data:
        loss_fn(ref_model, x, y, sign).backward()
        ref_opt.step()
        ref_opt.zero_grad(set_to_none=True)
        ref_betas.append(coefficients(ref_opt))

    model, opt = make(cls, backend)
    static_x, static_y = data[0][0].clone(), data[0][1].clone()
    static_sign = torch.ones((), device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: state, caches, autograd buffers (outside the capture)
        for x, y, sign in data[:WARMUP]:
            static_x.copy_(x), static_y.copy_(y), static_sign.fill_(sign)
            opt.zero_grad(set_to_none=set_to_none)
            loss_fn(model, static_x, static_y, static_sign).backward()
            opt.step()
    torch.cuda.current_stream().wait_stream(side)

    graph = torch.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=set_to_none)
    with torch.cuda.graph(graph):
        if not set_to_none:
            opt.zero_grad(set_to_none=False)
        loss_fn(model, static_x, static_y, static_sign).backward()
        opt.step()
    betas = []
    for x, y, sign in data[WARMUP:]:
        static_x.copy_(x), static_y.copy_(y), static_sign.fill_(sign)
        graph.replay()
        betas.append(coefficients(opt))
    torch.cuda.synchronize()

    torch.testing.assert_close(torch.stack(betas), torch.stack(ref_betas[WARMUP:]), rtol=1e-4, atol=1e-5)
    for a, b in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    # lr is read through its tensor: changing it changes what the replay does
    opt.param_groups[0]["lr"].mul_(0.0)
    before = [p.detach().clone() for p in model.parameters()]
    graph.replay()
    if cls in (AMSGD, RLLC):
        for a, b in zip(model.parameters(), before):
            assert torch.equal(a, b)

"""What a step allocates beyond the optimizer's state.

A fast backend ("cpu", "cuda", "triton") reads and writes the parameters, gradients and state where they
lie: a steady step allocates nothing of the model's size and leaves nothing allocated behind it. Steady:
after WARM_STEPS steps, which make the state and fill the Triton backend's cache of tables (8 an
optimizer, one per list of gradient addresses: NOTE [shared scratch] in tensor_table.py). Measured
through torch's own allocators (bench/step_memory.allocated_while): on the CPU from the profiler's
memory events (every allocation of torch's CPU allocator, inside ops too, the step run on one torch
thread so that at::parallel_for's chunks allocate where the profiler sees them: NOTE [memory events on
one thread] in bench/step_memory.py), on a GPU from the CUDA caching allocator's peak. The bound is an eighth of the largest parameter's
bytes, so a copy of that one parameter, or of its gradient in any dtype, breaks it. A parameter with
gaps (a slice) is the case that does get a copy for the step (NOTE [working copies] in
csrc/cuda/working_copies.h): the first test shows the measurement sees it.

The reference backend ("torch") is not held to this: it computes in whole-tensor temporaries (README,
"Memory"). The Triton backend is measured on a GPU only: its interpreter copies every tensor.
"""
import importlib.util
from pathlib import Path

import pytest
import torch
from test_compiled_kernels import BACKENDS as KERNEL_BACKENDS

import amm_kernels
from amm_kernels import AMAdamW, AMSGD, RLLC


def _load_bench_measurement():
    """bench/step_memory.py's allocated_while: the one measurement, shared with the benchmark (loaded by
    its path: bench/ is not put on sys.path for the whole suite)."""
    path = Path(__file__).resolve().parents[1] / "bench" / "step_memory.py"
    spec = importlib.util.spec_from_file_location("bench_step_memory", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.allocated_while


allocated_while = _load_bench_measurement()


def _triton_gpu_ok():
    return torch.cuda.is_available() and "triton" in amm_kernels.available_backends("cuda")


BACKENDS = [p for p in KERNEL_BACKENDS if p.values[0] in ("cpu", "cuda")] + [  # (not the simulator's)
    pytest.param("triton", marks=pytest.mark.skipif(not _triton_gpu_ok(),
                                                    reason="Triton on a GPU (its interpreter copies every tensor)")),
]
OPT_CASES = [
    pytest.param(AMSGD, dict(lr=0.05, lam=0.1), id="AMSGD"),
    pytest.param(AMAdamW, dict(lr=1e-3, weight_decay=0.01), id="AMAdamW"),  # a beta per tensor (default)
    pytest.param(AMAdamW, dict(lr=1e-3, weight_decay=0.01, beta_scope="global", scaled=True),
                 id="AMAdamW-global-scaled"),
    pytest.param(RLLC, dict(lr=0.05), id="RLLC"),
]
WARM_STEPS = 10
BIG = (2048, 1024)  # the largest parameter: 8 MiB in float32, 4 in bfloat16
SMALL = [(4097,), (7,), (1,), (0,), (33, 5)]


def _device(backend):
    return torch.device("cpu" if backend == "cpu" else "cuda")


def _measure(backend, fn):
    return allocated_while(fn, _device(backend))


def _setup(backend, cls, kwargs, dtype, big):
    """An optimizer over two groups (BIG or `big` in the first, odd and empty sizes), WARM_STEPS steps
    taken, and a function that sets fresh gradients outside what is measured."""
    kwargs = dict(kwargs)
    scaled = kwargs.pop("scaled", False)
    device = _device(backend)
    gen = torch.Generator().manual_seed(0)

    def param(t):
        return torch.nn.Parameter(t.to(device=device, dtype=dtype))

    first = [param(big(gen)), param(torch.randn(SMALL[0], generator=gen))]
    second = [param(torch.randn(s, generator=gen)) for s in SMALL[1:]]
    groups = [{"params": first}, {"params": second, "lr": kwargs["lr"] * 2}]
    opt = cls(groups, backend=backend, **kwargs)
    if scaled:  # as a GradScaler leaves them (NOTE in amm_kernels/_base.py): read on the device
        opt.grad_scale = torch.full((), 4.0, device=device)
        opt.found_inf = torch.zeros((), device=device)

    def fresh_grads():
        for p in first + second:
            p.grad = torch.randn(p.shape, generator=gen).to(device=device, dtype=dtype)

    for _ in range(WARM_STEPS):
        fresh_grads()
        opt.step()
    return opt, fresh_grads, first[0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_measurement_sees_a_working_copy(backend):
    """A slice with gaps is copied for the step (and written back): the measured peak holds that copy."""
    cls, kwargs = AMAdamW, dict(lr=1e-3, weight_decay=0.01)
    opt, fresh_grads, big = _setup(backend, cls, kwargs, torch.float32,
                                   lambda gen: torch.randn(BIG[0], 2 * BIG[1], generator=gen)[:, ::2])
    assert not big.is_contiguous()
    fresh_grads()
    peak, net = _measure(backend, opt.step)
    assert peak >= big.numel() * big.element_size(), peak
    assert net == 0, net


def test_the_cpu_measurement_runs_on_one_thread():
    """NOTE [memory events on one thread]: the profiler does not see at::parallel_for's worker threads,
    so the step measured runs on one torch thread (its chunks then run on the caller), and the thread
    count is given back after it, also when the step raises."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        seen = []
        allocated_while(lambda: seen.append(torch.get_num_threads()), torch.device("cpu"))
        assert seen == [1] and torch.get_num_threads() == 2

        def fails():
            raise KeyError("step")

        with pytest.raises(KeyError):
            allocated_while(fails, torch.device("cpu"))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("cls,kwargs", OPT_CASES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_steady_step_allocates_nothing_of_the_models_size(backend, cls, kwargs, dtype):
    opt, fresh_grads, big = _setup(backend, cls, kwargs, dtype, lambda gen: torch.randn(BIG, generator=gen))
    before = [p.detach().clone() for g in opt.param_groups for p in g["params"]]
    fresh_grads()
    peak, net = _measure(backend, opt.step)
    bound = big.numel() * big.element_size() // 8
    assert peak <= bound, f"a step allocated {peak} bytes at its peak (bound {bound})"
    assert net == 0, f"a step left {net} bytes allocated"
    after = [p.detach() for g in opt.param_groups for p in g["params"]]
    assert any(not torch.equal(a, b) for a, b in zip(before, after)), "the measured step changed nothing"

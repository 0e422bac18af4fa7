"""RLLC on the C++ backends ("cpu", and "cuda" where built and a GPU exists) against the reference
(amm_kernels/reference/rllc_reference.py, backend "torch").

Every case runs 10 steps on both backends from the same random start (seeded by the case) and
compares the law after every step, the parameters, the memory and the scope state: float32 to the
float32 tolerance, bfloat16 / float16 against the reference run in the same dtype to that dtype's
tolerance (tests/_helpers.py). Also: rank-deficient memories, found_inf, grad_scale, lr as a tensor,
NaN gradients, k > 8 (reference fallback) and determinism (bit-identical, 1 vs 2 threads).
The CUDA backend's code also runs here without a GPU, as "cuda_sim" (tests/_cuda_sim.py).
"""
import contextlib
import zlib

import _cuda_sim
import pytest
import torch
from _helpers import dtype_of, tolerance

import amm_kernels
from amm_kernels.memory import parse_memory
from amm_kernels.reference import rllc_reference
from amm_kernels.rllc import RLLC

try:
    from amm_kernels import rllc_compiled

    HAVE_OP = rllc_compiled.has_rllc_op()
except ImportError:  # the extension is not built
    rllc_compiled, HAVE_OP = None, False


def _cuda_ok():
    return HAVE_OP and torch.cuda.is_available() and "cuda" in amm_kernels.available_backends("cuda")


BACKENDS = [
    pytest.param("cpu", marks=pytest.mark.skipif(not HAVE_OP, reason="amm_kernels._C lacks rllc_step")),
    pytest.param("cuda", marks=pytest.mark.skipif(not _cuda_ok(), reason="no CUDA device or no CUDA kernels")),
    pytest.param(_cuda_sim.NAME),  # csrc/cuda on CPU tensors: skips itself where the simulator cannot build
]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
MEMORIES = ["M(0.9)+M(0)", "M(0.9)+M(0.8)+M(0.7)", "J(0.8,2)+M(0)", "C(0.9,0.3)+M(0)"]
# four groups: odd, empty, multi-dimensional and multi-chunk (CPU chunks are 16384 elements) shapes, and
# numels that are multiples of 8 (the CUDA kernels' vector path, NOTE [RLLC vectors] in rllc_kernels.cu)
SHAPES = [[(1,), (7,), (0,)], [(3, 5), (4097,)], [(2, 3, 5), (16500,), (33,)], [(40,), (8, 1031), (16384,)]]
LRS = [0.01, 0.03, 0.005, 0.02]


def _seed(*parts) -> int:
    return zlib.crc32(repr(parts).encode())


@contextlib.contextmanager
def kernels_only(backend, memory):
    """On a C++ backend, a step handed to the reference (rllc_compiled._fallback) is an error, unless the
    memory has more units than the kernels hold (that fallback is the design): otherwise a backend that
    quietly ran the reference would pass every comparison with it."""
    if backend == "torch" or len(parse_memory(memory)[1]) > rllc_compiled.MAX_K:
        yield
        return

    def refuse(batch, hp):
        raise AssertionError(f"backend {backend!r} handed an RLLC step to the reference")
    saved = rllc_reference.rllc_step
    rllc_reference.rllc_step = refuse
    try:
        yield
    finally:
        rllc_reference.rllc_step = saved


def run(backend, device, memory, dtype, seed, steps=10, shapes=SHAPES, lrs=LRS, lr_tensor=False, grad_scale=None,
        found_inf_at=(), nan_at=None, **kwargs):
    """`steps` steps; returns (law after each step, params, memories, scope state)."""
    if backend == _cuda_sim.NAME:
        _cuda_sim.ensure()  # (skips where the simulator cannot build: before rllc_compiled is looked at)
    with kernels_only(backend, memory):
        return _run(backend, device, memory, dtype, seed, steps, shapes, lrs, lr_tensor, grad_scale, found_inf_at,
                    nan_at, **kwargs)


def _run(backend, device, memory, dtype, seed, steps, shapes, lrs, lr_tensor, grad_scale, found_inf_at, nan_at,
         **kwargs):
    device = torch.device(device)
    gen = torch.Generator().manual_seed(seed)
    groups, k = [], 0
    for shapes_g, lr in zip(shapes, lrs):
        params = [torch.randn(s, generator=gen).to(device=device, dtype=dtype_of(dtype, k + j)).requires_grad_()
                  for j, s in enumerate(shapes_g)]
        k += len(shapes_g)
        groups.append({"params": params, "lr": torch.tensor(lr) if lr_tensor else lr})
    kwargs.setdefault("law_lr", 0.05)
    opt = RLLC(groups, memory=memory, backend=backend, **kwargs)
    params = [p for g in groups for p in g["params"]]
    laws = []
    for step in range(steps):
        grads = [torch.randn(p.shape, generator=gen) for p in params]
        if nan_at is not None and step == nan_at[0]:
            grads[nan_at[1]].view(-1)[0] = float("nan")
        if grad_scale is not None:
            grads = [g * grad_scale for g in grads]
            opt.grad_scale = torch.tensor(grad_scale, device=device)
            opt.found_inf = torch.tensor(1.0 if step in found_inf_at else 0.0, device=device)
        for p, g in zip(params, grads):
            p.grad = g.to(device=device, dtype=p.dtype)
        opt.step()
        laws.append(opt.law.detach().clone())
    memories = [opt.state[p]["memory"].detach().clone() for p in params]
    return laws, [p.detach().clone() for p in params], memories, opt._scopes.to_dict()


def _device(backend):
    return "cuda" if backend == "cuda" else "cpu"


def assert_close_runs(ours, ref, dtype, where, exact=False):
    """The law and the scope state to the float32 tolerance; each parameter and its memory to that of
    its own dtype."""
    law_tol = (0.0, 0.0) if exact else tolerance(torch.float32)  # the law is float32 state
    for name, a_list, b_list in (("law", ours[0], ref[0]), ("param", ours[1], ref[1]), ("memory", ours[2], ref[2])):
        for i, (a, b) in enumerate(zip(a_list, b_list)):
            assert a.dtype == b.dtype and a.shape == b.shape, f"{where}: {name} {i}"
            tol = law_tol if name == "law" or exact else tolerance(b.dtype)
            torch.testing.assert_close(a.cpu(), b.cpu(), rtol=tol[0], atol=tol[1], equal_nan=True,
                                       msg=lambda m: f"{where}: {name} {i}: {m}")
    for k in ref[3]:
        torch.testing.assert_close(ours[3][k].cpu(), ref[3][k].cpu(), rtol=law_tol[0], atol=law_tol[1],
                                   equal_nan=True, msg=lambda m: f"{where}: scope state {k}: {m}")


def check(backend, memory, dtype, case, **kw):
    seed = _seed(case, memory, str(dtype))
    device = _device(backend)
    ours = run(backend, device, memory, dtype, seed, **kw)
    ref = run("torch", device, memory, dtype, seed, **kw)
    assert_close_runs(ours, ref, dtype, f"{case} {memory} {backend} {dtype}")
    return ours, ref


# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("memory", MEMORIES)
def test_parity_global_scope(backend, dtype, memory):
    ours, _ = check(backend, memory, dtype, "global")
    assert all(torch.isfinite(law).all() for law in ours[0])
    assert not torch.equal(ours[0][-1].cpu(), ours[0][0].cpu()), "the law never moved: the test tests nothing"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("scope", ["group", "tensor"])
@pytest.mark.parametrize("memory", ["M(0.9)+M(0)", "M(0.9)+M(0.8)+M(0.7)"])
def test_parity_scopes(backend, scope, memory, dtype):
    ours, _ = check(backend, memory, dtype, f"scope-{scope}", scope=scope)
    assert ours[0][-1].shape[0] == (len(SHAPES) if scope == "group" else sum(map(len, SHAPES)))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_parity_k6_and_k4(backend, dtype):
    check(backend, "J(0.8,2)+C(0.9,0.3)+M(0.5)+M(0)", dtype, "k6")
    check(backend, "M(0.95)+M(0.9)+M(0.5)+M(0)", dtype, "k4", scope="group")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scope", ["global", "tensor"])
def test_parity_mixed_dtypes_in_one_step(backend, scope):
    # float32, bfloat16 and float16 parameters (and their memories) in one step: parameter k has DTYPES[k % 3]
    ours, _ = check(backend, "J(0.8,2)+M(0)", tuple(DTYPES), f"mixed-{scope}", scope=scope)
    assert {p.dtype for p in ours[1]} == set(DTYPES)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rank_deficient_memory_stays_finite(backend):
    # Two equal units: the Gram matrix has rank 1 on every step (the min-norm correction); and the
    # first correction (step 2) sees M(0) = g1 in both units of "M(0.5)+M(0)".
    for memory in ("M(0.9)+M(0.9)", "M(0.5)+M(0)", "M(0)+M(0)+M(0)"):
        ours, _ = check(backend, memory, torch.float32, "rank-deficient", law_lr=0.5)
        assert all(torch.isfinite(law).all() for law in ours[0]), memory
        assert all(torch.isfinite(p).all() for p in ours[1]), memory


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_grad_scale_and_found_inf(backend, dtype):
    ours, _ = check(backend, "M(0.9)+M(0)", dtype, "scaled", grad_scale=3.0, found_inf_at=(2, 5))
    # found_inf on the last step: nothing changes at all
    kw = dict(grad_scale=1024.0, steps=4)
    device = _device(backend)
    seed = _seed("skip-last")
    before = run(backend, device, "M(0.9)+M(0.8)+M(0.7)", dtype, seed, **kw)
    after = run(backend, device, "M(0.9)+M(0.8)+M(0.7)", dtype, seed, found_inf_at=(3,), **kw)
    three = run(backend, device, "M(0.9)+M(0.8)+M(0.7)", dtype, seed, steps=3, grad_scale=1024.0)
    assert torch.equal(after[0][-1].cpu(), three[0][-1].cpu())
    for a, b in zip(after[1] + after[2], three[1] + three[2]):
        assert torch.equal(a.cpu(), b.cpu())
    assert torch.equal(after[3]["step"].cpu(), three[3]["step"].cpu())
    assert not torch.equal(before[1][4].cpu(), after[1][4].cpu())


@pytest.mark.parametrize("backend", BACKENDS)
def test_lr_as_tensor(backend):
    check(backend, "J(0.8,2)+M(0)", torch.float32, "lr-tensor", lr_tensor=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_gradient_gives_nan_law_like_the_reference(backend):
    ours, _ = check(backend, "M(0.9)+M(0)", torch.float32, "nan", steps=5, nan_at=(2, 4))
    assert torch.isnan(ours[0][-1]).all()  # the correction of step 4 sees the NaN memory


@pytest.mark.parametrize("backend", BACKENDS)
def test_more_than_eight_units_fall_back_to_the_reference(backend):
    check(backend, "M(0.9)+M(0.8)+M(0.7)+M(0.6)+M(0.5)+M(0.4)+M(0.3)+M(0.2)+M(0)", torch.float32, "k9", steps=3)


@pytest.mark.skipif(not HAVE_OP, reason="amm_kernels._C lacks rllc_step")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cpu_bit_identical_across_thread_counts(dtype):
    # > 16384 elements per tensor and > 65536 in all: several chunks, run in parallel with 2 threads
    shapes = [[(40000,), (5,)], [(30000,)]]
    seed = _seed("threads", str(dtype))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run("cpu", "cpu", "M(0.9)+M(0.8)+M(0.7)", dtype, seed, steps=3, shapes=shapes, lrs=[0.01, 0.02])
        again = run("cpu", "cpu", "M(0.9)+M(0.8)+M(0.7)", dtype, seed, steps=3, shapes=shapes, lrs=[0.01, 0.02])
        torch.set_num_threads(2)
        two = run("cpu", "cpu", "M(0.9)+M(0.8)+M(0.7)", dtype, seed, steps=3, shapes=shapes, lrs=[0.01, 0.02])
    finally:
        torch.set_num_threads(threads)
    assert_close_runs(again, one, dtype, "rerun", exact=True)
    assert_close_runs(two, one, dtype, "1 vs 2 threads", exact=True)
    ref = run("torch", "cpu", "M(0.9)+M(0.8)+M(0.7)", dtype, seed, steps=3, shapes=shapes, lrs=[0.01, 0.02])
    assert_close_runs(one, ref, dtype, "large tensors vs reference")


@pytest.mark.skipif(not HAVE_OP, reason="amm_kernels._C lacks rllc_step")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("scope", ["group", "tensor"])
def test_cpu_scope_batches(monkeypatch, scope, dtype):
    """NOTE [scope batches] (step_driver_cpu.cpp): the CPU step runs pass 1, the laws and pass 2 per
    batch of scopes. Forced down from the default (which these sizes never reach) to 1 byte (every
    scope a batch) and 200 KB (several scopes together, the 40 000-element tensor alone): each must be
    bit-identical to one batch ("0") and match the reference."""
    shapes = SHAPES + [[(40000,), (5,)]]
    lrs = LRS + [0.01]
    seed = _seed("batches", scope, str(dtype))
    runs = {}
    for size in ("0", "1", "200000"):
        monkeypatch.setenv("AMM_CPU_BATCH_BYTES", size)
        runs[size] = run("cpu", "cpu", "M(0.9)+M(0.8)+M(0.7)", dtype, seed, steps=4, shapes=shapes, lrs=lrs,
                         scope=scope)
    assert_close_runs(runs["1"], runs["0"], dtype, "one scope per batch", exact=True)
    assert_close_runs(runs["200000"], runs["0"], dtype, "200 KB batches", exact=True)
    ref = run("torch", "cpu", "M(0.9)+M(0.8)+M(0.7)", dtype, seed, steps=4, shapes=shapes, lrs=lrs, scope=scope)
    assert_close_runs(runs["1"], ref, dtype, "batches vs reference")


@pytest.mark.skipif(not _cuda_ok(), reason="no CUDA device or no CUDA kernels")
def test_cuda_bit_identical_reruns():
    shapes = [[(200000,), (5,)], [(70000,)]]
    seed = _seed("cuda-rerun")
    a = run("cuda", "cuda", "J(0.8,2)+M(0)", torch.float32, seed, steps=4, shapes=shapes, lrs=[0.01, 0.02])
    b = run("cuda", "cuda", "J(0.8,2)+M(0)", torch.float32, seed, steps=4, shapes=shapes, lrs=[0.01, 0.02])
    assert_close_runs(a, b, torch.float32, "cuda rerun", exact=True)


# --------------------------------------------------------------------------------------------------
# Sharded parameters: the step split around the all_reduce (tests/_dist.py) is the one-op step.
from _dist import one_rank_group  # noqa: E402,F401


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scope", ["global", "tensor"])
@pytest.mark.parametrize("memory", ["M(0.9)+M(0.8)+M(0.7)", "J(0.8,2)+M(0)"])
def test_split_step_is_the_one_op_step(one_rank_group, backend, scope, memory):
    seed = _seed("split", memory, scope)
    device = _device(backend)
    whole = run(backend, device, memory, torch.float32, seed, steps=5, scope=scope, grad_scale=8.0, found_inf_at=(2,))
    split = run(backend, device, memory, torch.float32, seed, steps=5, scope=scope, grad_scale=8.0, found_inf_at=(2,),
                process_group=one_rank_group)
    assert_close_runs(split, whole, torch.float32, f"split {memory} {scope} {backend}", exact=True)
    assert not torch.equal(whole[0][1], whole[0][-1]), "the law should move"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scope", ["global", "tensor"])
def test_tensors_over_several_tables(monkeypatch, backend, scope):
    """The CUDA step's tables capped at 2 tensors (AMM_CUDA_TABLE_TENSORS, NOTE [one launch per pass] in
    csrc/cuda/launchers.h): each pass launches once per table, the slots numbered across them (slot_base).
    The other backends ignore the variable."""
    monkeypatch.setenv("AMM_CUDA_TABLE_TENSORS", "2")
    check(backend, "M(0.9)+M(0.8)", torch.float32, f"tables-{scope}", scope=scope)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_tensor_of_more_than_32_chunks(backend):
    """A tensor of 33 CUDA chunks (65536 elements each, the last partial): the RLLC finalize sums the
    slots of a tensor of more than kSerialSlots (32) with a warp instead of one thread."""
    check(backend, "M(0.9)+M(0.8)", torch.float32, "33-chunks", steps=3, shapes=[[(33 * 65_536 + 5,), (7,)]],
          lrs=[0.01])

"""The CUDA step's two variants (NOTE [step variant] in csrc/cuda/ops_cuda.cpp): the persistent step
(one cooperative launch, tiles kept in shared memory) and the two-pass step (three launches).

They share the per-chunk code, the slots and the finalize, so they must agree BIT FOR BIT on beta,
every state tensor, the scope state and the parameters, over 10 steps, for every dtype, odd / empty /
unaligned / mixed shapes, several groups, each scope, loss mode, grad scaling, found_inf, and models
larger than the tile cache (partly kept, partly re-read). Each variant is also checked against the
reference (the tolerances of tests/_helpers.py). Every test runs on the GPU where there is one, and on
the CUDA-on-CPU simulator ("cuda_sim", tests/_cuda_sim.py) everywhere; graph capture is GPU only.
"""
import _cuda_sim
import pytest
import torch
from _helpers import tolerance
from test_compiled_kernels import BETA_MIN, MIXED, SHAPES, _cuda_ok, _device, _seed, check, run

from amm_kernels import AMAdamW, AMSGD


@pytest.fixture(params=[
    pytest.param("cuda", marks=pytest.mark.skipif(not _cuda_ok(), reason="no CUDA device or no CUDA kernels")),
    pytest.param(_cuda_sim.NAME),
])
def backend(request):
    if request.param == _cuda_sim.NAME:
        _cuda_sim.ensure()
    return request.param


def _sync(backend):
    if backend == "cuda":
        torch.cuda.synchronize()


VARIANTS = ["persistent", "two_pass"]
OPT_CASES = [
    pytest.param(AMSGD, dict(lr=0.05, lam=0.1, beta_max=0.9), id="AMSGD"),
    pytest.param(AMSGD, dict(lr=0.05, lam=0.1, beta_max=0.9, weight_decay=0.01), id="AMSGD-wd"),  # x kept too
    pytest.param(AMAdamW, dict(lr=1e-2, weight_decay=0.05), id="AMAdamW"),
    pytest.param(AMAdamW, dict(lr=1e-2, weight_decay=0.0), id="AMAdamW-wd0"),
]
# Over the tile cache (512 threads x 3 or 4 iterations x 8 elements per block: on an H100's 132 blocks
# about 1.6M to 2.2M elements, on the simulator's 4 about 65K): the step keeps part and re-reads the
# rest, and blocks walk several chunks.
LARGE = {"cuda": [(2_500_001,), (1024, 1031), (7,), (0,), (65_536,)],
         _cuda_sim.NAME: [(300_001,), (257, 1031), (7,), (0,), (65_536,)]}


def set_variant(monkeypatch, variant, cache=None):
    """The step variant, and the tile cache's iterations per thread (None: as many as fit)."""
    monkeypatch.setenv("AMM_CUDA_STEP", variant)
    if cache is None:
        monkeypatch.delenv("AMM_CUDA_PERSISTENT_CACHE", raising=False)
    else:
        monkeypatch.setenv("AMM_CUDA_PERSISTENT_CACHE", str(cache))


def _run_with(monkeypatch, backend, variant, *args, cache=None, **kw):
    set_variant(monkeypatch, variant, cache)
    try:
        return run(backend, *args, **kw)
    finally:
        _sync(backend)


def assert_identical(a, b, where):
    betas_a, params_a, state_a, scopes_a, _ = a
    betas_b, params_b, state_b, scopes_b, _ = b
    pairs = list(zip(betas_a, betas_b)) + list(zip(params_a, params_b))
    pairs += [(sa[k], sb[k]) for sa, sb in zip(state_a, state_b) for k in sa]
    pairs += [(scopes_a[k], scopes_b[k]) for k in scopes_a]
    for i, (x, y) in enumerate(pairs):
        torch.testing.assert_close(x, y, rtol=0, atol=0, equal_nan=True, msg=lambda m: f"{where}: tensor {i}: {m}")


def _both(monkeypatch, backend, cls, kwargs, shapes, dtype, case, cache=None, **run_kw):
    seed = _seed("persistent", case, cls.__name__, str(dtype))
    one = _run_with(monkeypatch, backend, "persistent", cls, kwargs, shapes, dtype, seed, cache=cache, **run_kw)
    two = _run_with(monkeypatch, backend, "two_pass", cls, kwargs, shapes, dtype, seed, **run_kw)
    assert_identical(one, two, f"{case} {cls.__name__} {dtype}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("cls,kwargs", OPT_CASES)
def test_persistent_is_bit_identical_to_two_pass(monkeypatch, backend, dtype, cls, kwargs):
    _both(monkeypatch, backend, cls, kwargs, [SHAPES, MIXED[:20]], dtype, "shapes", lrs=[0.05, 0.02], wds=[0.0, 0.01])


@pytest.mark.parametrize("cache", [0, 1, None], ids=["no-cache", "cache-1", "cache-max"])
@pytest.mark.parametrize("cls,kwargs", OPT_CASES)
def test_larger_than_the_tile_cache(monkeypatch, backend, cache, cls, kwargs):
    _both(monkeypatch, backend, cls, kwargs, [LARGE[backend]], torch.float32, "large", cache=cache, steps=4)


@pytest.mark.parametrize("cls,kwargs", [OPT_CASES[0], OPT_CASES[2]])
def test_a_tile_cache_request_over_what_fits_is_clamped(monkeypatch, backend, cls, kwargs):
    """AMM_CUDA_PERSISTENT_CACHE=8 (the most the variable allows) asks for more shared memory than a
    block has (8 iterations x 3 or 4 lists x 16 KB): the plan keeps what fits (fit_kernel), and the
    step still runs as one launch, bit-identical to the two-pass step."""
    _both(monkeypatch, backend, cls, kwargs, [LARGE[backend]], torch.float32, "cache-over", cache=8, steps=2)


@pytest.mark.parametrize("scope", ["global", "group", "tensor"])
@pytest.mark.parametrize("cls,kwargs", OPT_CASES[1:3])
def test_scopes(monkeypatch, backend, scope, cls, kwargs):
    shapes = [MIXED[:7], [(4097,), (3, 5)], MIXED[10:16]]
    _both(monkeypatch, backend, cls, {**kwargs, "beta_scope": scope}, shapes, torch.float32, scope,
          lrs=[0.05, 0.01, 0.02], wds=[0.0, 0.01, 0.1])


@pytest.mark.parametrize("variant", ["loss", "grad_scale", "lr_tensor", "maximize", "beta_min"])
def test_variants(monkeypatch, backend, variant):
    cls, kwargs, run_kw = AMSGD, dict(lr=0.05, lam=0.1), {}
    if variant == "beta_min":  # a clamp the steps reach (test_compiled_kernels.py::test_variants)
        cls, kwargs = AMAdamW, dict(lr=1e-2, beta_min=BETA_MIN[AMAdamW])
    elif variant == "loss":
        kwargs["delta_f"] = "loss"
        run_kw["loss_mode"] = True
    elif variant == "grad_scale":
        run_kw["grad_scale"] = 64.0
    elif variant == "lr_tensor":
        run_kw["lr_tensor"] = True
    else:
        cls, kwargs = AMAdamW, dict(lr=1e-2, maximize=True)
    _both(monkeypatch, backend, cls, kwargs, [SHAPES + [(70_000,)]], torch.float32, variant, **run_kw)


def test_unaligned_parameters(monkeypatch, backend):
    """Parameters that are views one element into a buffer take the scalar path in both phases."""
    device = _device(backend)
    results = []
    for variant in VARIANTS:
        monkeypatch.setenv("AMM_CUDA_STEP", variant)
        gen = torch.Generator().manual_seed(6)
        bufs = [torch.randn(n + 1, generator=gen).to(device) for n in (9, 4099, 70_001)]
        params = [torch.nn.Parameter(b[1:]) for b in bufs]  # data_ptr % 16 == 4
        assert all(p.data_ptr() % 16 != 0 for p in params)
        opt = AMAdamW(params, lr=1e-2, weight_decay=0.01, backend=backend)
        betas = []
        for step in range(6):
            for p in params:
                p.grad = (-1.0) ** step * torch.ones_like(p) + 0.3 * torch.randn(p.shape, generator=gen).to(device)
            opt.step()
            betas.append(opt.beta.clone())
        _sync(backend)
        results.append((betas, [p.detach().clone() for p in params]))
    for a, b in zip(results[0][0] + results[0][1], results[1][0] + results[1][1]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("cls,kwargs", OPT_CASES[::2])
def test_each_variant_matches_the_reference(monkeypatch, backend, variant, cls, kwargs):
    monkeypatch.setenv("AMM_CUDA_STEP", variant)
    check(backend, cls, kwargs, [SHAPES, [(65_537,), (16, 9)]], torch.float32, f"ref-{variant}",
          lrs=[0.05, 0.02], wds=[0.0, 0.01])


@pytest.mark.parametrize("cls,kwargs", OPT_CASES[::2])
def test_found_inf_leaves_everything_unchanged(monkeypatch, backend, cls, kwargs):
    monkeypatch.setenv("AMM_CUDA_STEP", "persistent")
    device = _device(backend)
    params = [torch.randn(n, device=device, requires_grad=True) for n in (7, 4097, 300_000)]
    opt = cls(params, backend=backend, **kwargs)
    for step in range(3):
        for p in params:
            p.grad = torch.randn_like(p)
        if step == 2:
            before = [p.detach().clone() for p in params] + [t.clone() for st in opt.state.values()
                                                             for t in st.values()]
            before += list(opt._scopes.to_dict().values())
            opt.grad_scale = torch.ones((), device=device)
            opt.found_inf = torch.ones((), device=device)
        opt.step()
    after = [p.detach() for p in params] + [t for st in opt.state.values() for t in st.values()]
    after += list(opt._scopes.to_dict().values())
    for a, b in zip(before, after):
        assert torch.equal(a, b)


def test_forcing_it_where_it_cannot_run_is_an_error(monkeypatch, backend):
    monkeypatch.setenv("AMM_CUDA_STEP", "persistent")
    device = _device(backend)
    many = [torch.randn(3, device=device, requires_grad=True) for _ in range(400)]  # > one table (384)
    for p in many:
        p.grad = torch.randn_like(p)
    with pytest.raises(RuntimeError, match="AMM_CUDA_STEP=persistent.*at most 384 tensors; it has 400"):
        AMSGD(many, backend=backend).step()
    monkeypatch.setenv("AMM_CUDA_TABLE_TENSORS", "128")  # NOTE [one launch per pass]: tables capped
    with pytest.raises(RuntimeError, match="AMM_CUDA_STEP=persistent.*at most 128 tensors; it has 200"):
        AMSGD(many[:200], backend=backend).step()
    monkeypatch.delenv("AMM_CUDA_TABLE_TENSORS")
    few = [torch.randn(3, device=device, requires_grad=True)]
    few[0].grad = torch.randn_like(few[0])
    with pytest.raises(RuntimeError, match="AMM_CUDA_STEP=persistent"):
        AMSGD(few, backend=backend, adaptive=False).step()


@pytest.mark.parametrize("cls,kwargs", [OPT_CASES[0], OPT_CASES[2]])
def test_a_step_of_exactly_one_table_runs_as_one_launch(monkeypatch, backend, cls, kwargs):
    """kMaxTensors (384) tensors, empty ones between the others, fill one TensorTable exactly: a forced
    persistent step takes them (more is the error above), bit-identical to the two-pass step."""
    _both(monkeypatch, backend, cls, kwargs, [[(7,), (0,), (33,), (1,)] * 96], torch.float32, "one-table", steps=2)


def test_a_refused_cooperative_launch_falls_back_to_two_pass(monkeypatch, backend):
    """NOTE [cooperative refusal]: a process given part of the GPU (MPS) is refused a grid sized from
    the SMs the device reports. Under auto the two-pass step runs instead, with the same bits; a
    forced persistent step reports the refusal. The simulator stands in for MPS (AMM_SIM_COOP_SMS)."""
    if backend != _cuda_sim.NAME:
        pytest.skip("the refusal is simulated: AMM_SIM_COOP_SMS")
    cls, kwargs = AMAdamW, dict(lr=1e-2, weight_decay=0.05)
    shapes, seed = [LARGE[backend]], _seed("refused")
    monkeypatch.setenv("AMM_SIM_COOP_SMS", "1")
    auto = _run_with(monkeypatch, backend, "auto", cls, kwargs, shapes, torch.float32, seed, steps=2)
    two = _run_with(monkeypatch, backend, "two_pass", cls, kwargs, shapes, torch.float32, seed, steps=2)
    assert_identical(auto, two, "refused")
    with pytest.raises(RuntimeError, match="too many blocks in cooperative launch"):
        _run_with(monkeypatch, backend, "persistent", cls, kwargs, shapes, torch.float32, seed, steps=1)
    monkeypatch.delenv("AMM_SIM_COOP_SMS")
    _run_with(monkeypatch, backend, "persistent", cls, kwargs, shapes, torch.float32, seed, steps=1)  # fits again


@pytest.mark.parametrize("chunk", [4096, 16384])
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("cls,kwargs", OPT_CASES[::2])
def test_a_smaller_chunk_matches_the_reference(monkeypatch, backend, chunk, variant, cls, kwargs):
    """NOTE [chunk size]: AMM_CUDA_CHUNK cuts every tensor into smaller chunks (more blocks, more pass-1
    slots; a block of the persistent step walks more of them). Each variant still matches the reference,
    with tensors of several chunks, a partial last chunk, an exact multiple, and tensors of one chunk."""
    monkeypatch.setenv("AMM_CUDA_CHUNK", str(chunk))
    monkeypatch.setenv("AMM_CUDA_STEP", variant)
    check(backend, cls, kwargs, [[(3 * chunk + 5,), (2 * chunk,), (7,), (0,), (257, 33)], SHAPES], torch.float32,
          f"chunk-{chunk}-{variant}", lrs=[0.05, 0.02], wds=[0.0, 0.01])


@pytest.mark.parametrize("cls,kwargs", OPT_CASES[::2])
def test_the_variants_agree_bit_for_bit_at_a_smaller_chunk(monkeypatch, backend, cls, kwargs):
    monkeypatch.setenv("AMM_CUDA_CHUNK", "4096")
    _both(monkeypatch, backend, cls, kwargs, [[(3 * 4096 + 5,), (4096,), (7,), (0,)], SHAPES], torch.float32,
          "chunk-4096", steps=4)


def test_bad_settings_name_the_variable(monkeypatch, backend):
    p = torch.randn(3, device=_device(backend), requires_grad=True)
    p.grad = torch.randn_like(p)
    monkeypatch.setenv("AMM_CUDA_STEP", "fast")
    with pytest.raises(RuntimeError, match="AMM_CUDA_STEP must be auto, two_pass or persistent"):
        AMSGD([p], backend=backend).step()
    monkeypatch.setenv("AMM_CUDA_STEP", "persistent")
    monkeypatch.setenv("AMM_CUDA_PERSISTENT_CACHE", "99")
    with pytest.raises(RuntimeError, match=r"AMM_CUDA_PERSISTENT_CACHE must be an integer in \[-1, 8\]"):
        AMSGD([p], backend=backend).step()
    monkeypatch.delenv("AMM_CUDA_PERSISTENT_CACHE")
    monkeypatch.setenv("AMM_CUDA_STEP", "two_pass")
    monkeypatch.setenv("AMM_CUDA_CHUNK", "5000")
    with pytest.raises(RuntimeError, match="AMM_CUDA_CHUNK must be a multiple of 4096 in \\[4096, 65536\\], got 5000"):
        AMSGD([p], backend=backend).step()
    monkeypatch.setenv("AMM_CUDA_CHUNK", "131072")
    with pytest.raises(RuntimeError, match=r"AMM_CUDA_CHUNK must be an integer in \[4096, 65536\]"):
        AMSGD([p], backend=backend).step()
    monkeypatch.delenv("AMM_CUDA_CHUNK")
    for bad in ("0", "385", "many"):
        monkeypatch.setenv("AMM_CUDA_TABLE_TENSORS", bad)
        with pytest.raises(RuntimeError, match=rf"AMM_CUDA_TABLE_TENSORS must be an integer in \[1, 384\], got '{bad}'"):
            AMSGD([p], backend=backend).step()


@pytest.mark.skipif(not _cuda_ok(), reason="no CUDA device or no CUDA kernels")
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("cls", [AMSGD, AMAdamW])
def test_graph_capture_replays_like_eager(monkeypatch, variant, cls):
    """A captured step (capturable=True) replays exactly what the eager step does, in each variant."""
    monkeypatch.setenv("AMM_CUDA_STEP", variant)
    gen = torch.Generator().manual_seed(3)
    shapes = [(7,), (4097,), (300_001,), (0,)]
    init = [torch.randn(s, generator=gen).cuda() for s in shapes]
    grads = [[(-1.0) ** t * torch.ones(s).cuda() + 0.3 * torch.randn(s, generator=gen).cuda() for s in shapes]
             for t in range(8)]

    def make():
        params = [torch.nn.Parameter(x.clone()) for x in init]
        return params, cls(params, lr=torch.tensor(0.01, device="cuda"), backend="cuda", capturable=True)

    eager_params, eager = make()
    eager_betas = []
    for g in grads:
        for p, gi in zip(eager_params, g):
            p.grad = gi.clone()
        eager.step()
        eager_betas.append(eager.beta.clone())

    params, opt = make()
    for p in params:
        p.grad = torch.zeros_like(p)
    static = [p.grad for p in params]
    for p, gi in zip(params, grads[0]):  # step 1 eagerly: state exists before the capture
        p.grad.copy_(gi)
    opt.step()
    betas = [opt.beta.clone()]
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    for g in grads[1:]:
        for s, gi in zip(static, g):
            s.copy_(gi)
        graph.replay()
        betas.append(opt.beta.clone())
    torch.cuda.synchronize()
    for a, b in zip(betas, eager_betas):
        assert torch.equal(a, b)
    for a, b in zip(params, eager_params):
        assert torch.equal(a, b)


def _late_joiner_run(monkeypatch, backend, variant, cls, kwargs, cache=None):
    """Tensor 0 has no gradient on the first two steps, so on step 3 its scope takes its first step
    while the other tensor's does not; returns (betas, params, state tensors)."""
    if variant is not None:
        set_variant(monkeypatch, variant, cache)
    device = _device(backend)
    gen = torch.Generator().manual_seed(21)
    shapes = [(1031,), (300_001,)]
    params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(device)) for s in shapes]
    base = [torch.randn(s, generator=gen) for s in shapes]
    opt = cls(params, backend=backend, beta_scope="tensor", **kwargs)
    betas = []
    for step in range(5):
        grads = [((-1) ** step * b + 0.3 * torch.randn(b.shape, generator=gen)).to(device) for b in base]
        for i, (p, g) in enumerate(zip(params, grads)):
            p.grad = None if (i == 0 and step < 2) else g
        opt.step()
        betas.append(opt.beta.detach().clone())
    _sync(backend)
    state = [t.detach().clone() for p in params for t in opt.state[p].values()]
    return betas, [p.detach().clone() for p in params], state


@pytest.mark.parametrize("cache", [2, None], ids=["cache-2", "cache-max"])
@pytest.mark.parametrize("cls,kwargs", OPT_CASES[::2])
def test_a_scope_on_its_first_step_beside_older_ones(monkeypatch, backend, cache, cls, kwargs):
    """NOTE [tile cache]: on a scope's first step the reduce phase skips its chunks and keeps nothing,
    so the update phase must not count them either: a block that walks such a chunk before a chunk of
    an older scope then reads that chunk's tiles from where the reduce phase kept them. Persistent and
    two-pass agree bit for bit, and both match the reference."""
    one = _late_joiner_run(monkeypatch, backend, "persistent", cls, kwargs, cache=cache)
    two = _late_joiner_run(monkeypatch, backend, "two_pass", cls, kwargs)
    ref = _late_joiner_run(monkeypatch, "torch", None, cls, kwargs)
    for i, (a, b) in enumerate(zip(one[0] + one[1] + one[2], two[0] + two[1] + two[2])):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True, msg=lambda m: f"tensor {i}: {m}")
    rtol, atol = tolerance(torch.float32)
    for i, (a, b) in enumerate(zip(one[0] + one[1] + one[2], ref[0] + ref[1] + ref[2])):
        torch.testing.assert_close(a.cpu(), b.cpu(), rtol=rtol, atol=atol, equal_nan=True,
                                   msg=lambda m: f"reference, tensor {i}: {m}")

"""The C++ backends ("cpu", and "cuda" where built and a GPU exists) against the reference ("torch").
The CUDA backend's code also runs here without a GPU, as "cuda_sim" (tests/_cuda_sim.py).

Every case runs 10 steps on both backends from the same random start (seeded by the case) and
compares beta, every state tensor, the scope state and the parameters: float32 to the float32
tolerance, bfloat16 / float16 against the reference run in the same dtype to that dtype's tolerance
(tests/_helpers.py). Also: determinism (bit-identical reruns, 1 vs 2 threads) on the CPU.
"""
import zlib

import _cuda_sim
import pytest
import torch
from _helpers import dtype_of, scaled_atol, state_atol, tolerance

import amm_kernels
from amm_kernels import AMAdamW, AMSGD


def _cuda_ok():
    return torch.cuda.is_available() and "cuda" in amm_kernels.available_backends("cuda")


BACKENDS = [
    pytest.param("cpu", marks=pytest.mark.skipif("cpu" not in amm_kernels.available_backends("cpu"),
                                                 reason="amm_kernels._C is not built")),
    pytest.param("cuda", marks=pytest.mark.skipif(not _cuda_ok(), reason="no CUDA device or no CUDA kernels")),
    pytest.param(_cuda_sim.NAME),  # csrc/cuda on CPU tensors: skips itself where the simulator cannot build
]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
MIXED_DTYPES = tuple(DTYPES)  # a step of all three: parameter k has DTYPES[k % 3]
DTYPE_CASES = DTYPES + [MIXED_DTYPES]
DTYPE_IDS = lambda d: "mixed" if isinstance(d, tuple) else str(d)  # noqa: E731
SHAPES = [(1,), (7,), (4097,), (0,), (3, 5)]
MIXED = [(1,), (7,), (33,), (4097,), (0,), (16, 9), (2, 3, 5), (130,), (64, 64), (5,)] * 6  # 60 tensors


def _seed(*parts) -> int:
    return zlib.crc32(repr(parts).encode())


def _device(backend):
    return torch.device("cuda" if backend == "cuda" else "cpu")


def _coarsest(dtype):
    """The dtype whose tolerance beta and the scope state are held to: of several, the coarsest."""
    return max(dtype, key=lambda d: tolerance(d)[0]) if isinstance(dtype, tuple) else dtype


def make_groups(shapes_per_group, dtype, device, seed, lrs=None, wds=None):
    gen = torch.Generator().manual_seed(seed)
    groups, k = [], 0
    for gi, shapes in enumerate(shapes_per_group):
        params = [torch.randn(s, generator=gen).to(device=device, dtype=dtype_of(dtype, k + j))
                  for j, s in enumerate(shapes)]
        k += len(shapes)
        group = {"params": params}
        if lrs is not None:
            group["lr"] = lrs[gi]
        if wds is not None:
            group["weight_decay"] = wds[gi]
        groups.append(group)
    return groups


def run(backend, cls, kwargs, shapes_per_group, dtype, seed, steps=10, lrs=None, wds=None, hook=None,
        loss_mode=False, grad_scale=None, lr_tensor=False):
    """Runs `steps` steps; returns (betas per step, params, state tensors, scope state)."""
    if backend == _cuda_sim.NAME:
        _cuda_sim.ensure()
    device = _device(backend)
    groups = make_groups(shapes_per_group, dtype, device, seed, lrs, wds)
    groups = [{**g, "params": [p.clone().requires_grad_() for p in g["params"]]} for g in groups]
    if lr_tensor:
        for g in groups:
            g["lr"] = torch.tensor(g.get("lr", kwargs.get("lr", 1e-2)))
    opt = cls(groups, backend=backend, **kwargs)
    params = [p for g in groups for p in g["params"]]
    gen = torch.Generator().manual_seed(seed + 1)
    # NOTE [moving beta]: a fixed direction whose sign flips every step, plus noise. With independent
    # random gradients AMAdamW's beta sits on its beta_max clamp at every step, and a test would not
    # see its sums; with this it moves.
    base = [torch.randn(p.shape, generator=gen) for p in params]
    betas = []
    grad_max = [torch.zeros(()) for _ in params]  # the largest |gradient| per tensor (scaled_atol)
    for step in range(steps):
        grads = [((-1) ** step * b + 0.3 * torch.randn(p.shape, generator=gen)).to(device=device, dtype=p.dtype)
                 for b, p in zip(base, params)]
        grad_max = [torch.maximum(m, g.abs().max().float().cpu()) if g.numel() else m for m, g in zip(grad_max, grads)]
        loss_value = torch.rand((), generator=gen).item() * 10
        if grad_scale is not None:
            grads = [g * grad_scale for g in grads]
            opt.grad_scale = torch.tensor(grad_scale, device=device)
            opt.found_inf = torch.zeros((), device=device)
        for p, g in zip(params, grads):
            p.grad = g
        if hook is not None:
            hook(opt, step)
        if loss_mode:
            opt.step(lambda: torch.tensor(loss_value, device=device, dtype=dtype))
        else:
            opt.step()
        betas.append(opt.beta.detach().clone())
    state = [{k: v.detach().clone() for k, v in opt.state[p].items()} for p in params]
    scopes = opt._scopes.to_dict() if opt._scopes is not None else {}
    return betas, [p.detach().clone() for p in params], state, scopes, grad_max


def assert_runs_close(ours, ref, dtype, where):
    """beta and the scope state to the tolerance of `dtype` (the coarsest, of a tuple); each parameter and its
    state to that of its own dtype."""
    rtol, atol = tolerance(_coarsest(dtype))
    b_ours, p_ours, s_ours, sc_ours, _ = ours
    b_ref, p_ref, s_ref, sc_ref, g_max = ref
    for i, (a, b) in enumerate(zip(b_ours, b_ref)):
        torch.testing.assert_close(a.cpu().float(), b.cpu().float(), rtol=rtol, atol=atol, equal_nan=True,
                                   msg=lambda m: f"{where}: beta at step {i}: {m}")
    for k in sc_ref:
        torch.testing.assert_close(sc_ours[k].cpu(), sc_ref[k].cpu(), rtol=rtol, atol=atol, equal_nan=True,
                                   msg=lambda m: f"{where}: scope state {k}: {m}")
    for i, (a, b) in enumerate(zip(p_ours, p_ref)):
        assert a.dtype == b.dtype
        rtol, atol = tolerance(a.dtype)
        torch.testing.assert_close(a.cpu(), b.cpu(), rtol=rtol, atol=scaled_atol(atol, b, g_max[i]),
                                   equal_nan=True, msg=lambda m: f"{where}: param {i}: {m}")
    for i, (a, b) in enumerate(zip(s_ours, s_ref)):
        assert a.keys() == b.keys()
        rtol, atol = tolerance(p_ref[i].dtype)
        for k in a:
            torch.testing.assert_close(a[k].cpu(), b[k].cpu(), rtol=rtol, atol=state_atol(k, atol, b[k], g_max[i]), equal_nan=True,
                                       msg=lambda m: f"{where}: state {k} of param {i}: {m}")


def check(backend, cls, kwargs, shapes_per_group, dtype, case, **run_kw):
    seed = _seed(case, cls.__name__, str(dtype))
    ours = run(backend, cls, kwargs, shapes_per_group, dtype, seed, **run_kw)
    ref = run("torch", cls, kwargs, shapes_per_group, dtype, seed, **run_kw) if backend != "cuda" else \
        _ref_on_device(cls, kwargs, shapes_per_group, dtype, seed, **run_kw)
    assert_runs_close(ours, ref, dtype, f"{case} {cls.__name__} {backend} {dtype}")
    return ours


def _ref_on_device(cls, kwargs, shapes_per_group, dtype, seed, **run_kw):
    # The reference on the same device as the CUDA backend (so the random data are identical).
    import unittest.mock as mock

    with mock.patch(f"{__name__}._device", lambda backend: torch.device("cuda")):
        return run("torch", cls, kwargs, shapes_per_group, dtype, seed, **run_kw)


OPT_CASES = [
    pytest.param(AMSGD, dict(lr=0.05, lam=0.1, beta_max=0.9), id="AMSGD"),
    pytest.param(AMAdamW, dict(lr=1e-2, weight_decay=0.05), id="AMAdamW"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("cls,kwargs", OPT_CASES)
def test_shapes(backend, dtype, cls, kwargs):
    check(backend, cls, kwargs, [SHAPES], dtype, "shapes")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("cls,kwargs", OPT_CASES)
def test_many_tensors(backend, dtype, cls, kwargs):
    check(backend, cls, kwargs, [MIXED], dtype, "many")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scope", ["global", "tensor"])
@pytest.mark.parametrize("cls,kwargs", OPT_CASES)
def test_more_tensors_than_one_launch_holds(monkeypatch, backend, scope, cls, kwargs):
    """180 tensors in two groups: the CUDA step, its tables capped at 64 tensors (AMM_CUDA_TABLE_TENSORS,
    NOTE [one launch per pass] in csrc/cuda/launchers.h), splits them over three tables."""
    monkeypatch.setenv("AMM_CUDA_TABLE_TENSORS", "64")
    shapes = [MIXED * 2, MIXED]
    check(backend, cls, {**kwargs, "beta_scope": scope}, shapes, torch.float32, f"tables-{scope}", steps=4,
          lrs=[0.05, 0.02], wds=[0.0, 0.01])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("cls,kwargs", OPT_CASES)
def test_multi_chunk_tensors(backend, dtype, cls, kwargs):
    """Tensors of several chunks (CPU: 16384 elements, CUDA: 65536), the last one partial."""
    check(backend, cls, kwargs, [[(65_536 * 2 + 3,), (300, 301), (1,), (16_385,)]], dtype, "chunks", steps=5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("cls,kwargs", OPT_CASES)
def test_16bit_stores_round_to_nearest(backend, dtype, cls, kwargs):
    """16-bit parameters and state are rounded to nearest (even) once per element, as the reference
    rounds them. check()'s tolerances allow an ulp of the dtype, so a store that truncated would pass
    them; here, over two steps, at most 1% of the elements of any 16-bit tensor may differ in any bit
    from the reference (they differ only where the float32 values straddle a rounding boundary: under
    0.2% measured). 4101 elements: a vector body and a scalar tail of 5 (the CUDA kernels' kVec,
    the CPU's 16 lanes)."""
    seed = _seed("rounding", cls.__name__, str(dtype))
    shapes = [[(4096 + 5,), (1000,)]]
    ours = run(backend, cls, kwargs, shapes, dtype, seed, steps=2)
    ref = run("torch", cls, kwargs, shapes, dtype, seed, steps=2) if backend != "cuda" else \
        _ref_on_device(cls, kwargs, shapes, dtype, seed, steps=2)
    pairs = [(f"param {i}", a, b) for i, (a, b) in enumerate(zip(ours[1], ref[1]))]
    pairs += [(f"state {k} of param {i}", sa[k], sb[k]) for i, (sa, sb) in enumerate(zip(ours[2], ref[2]))
              for k in sa if sa[k].dtype == dtype]
    for name, a, b in pairs:
        assert a.dtype == b.dtype == dtype, name
        differ = (a.cpu() != b.cpu()).float().mean().item()
        assert differ <= 0.01, f"{backend} {cls.__name__} {dtype}: {differ:.1%} of {name} differs from the reference"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scope", ["global", "group", "tensor"])
@pytest.mark.parametrize("dtype", DTYPE_CASES, ids=DTYPE_IDS)
@pytest.mark.parametrize("cls,kwargs", OPT_CASES)
def test_groups_and_scopes(backend, scope, dtype, cls, kwargs):
    """Several groups (lr, weight decay), each scope, each dtype, and a step of float32, bfloat16 and float16
    parameters together (parameter k of the step has DTYPES[k mod 3]: groups of two and three dtypes)."""
    shapes = [[(7,), (4097,)], [(1,), (0,), (3, 5)], [(130,), (16, 9)], [(33,), (5,), (2, 3)]]
    check(backend, cls, {**kwargs, "beta_scope": scope}, shapes, dtype, f"groups-{scope}",
          lrs=[0.05, 0.01, 0.002, 0.02], wds=[0.0, 0.01, 0.1, 0.0])


BETA_MIN = {AMSGD: 0.3, AMAdamW: 0.85}  # where the NOTE [moving beta] gradients take beta below it at some steps


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", ["non_adaptive", "maximize", "lr_tensor", "lr_tensor_change", "grad_scale",
                                     "lr_change", "beta_min"])
@pytest.mark.parametrize("dtype", DTYPE_CASES, ids=DTYPE_IDS)
@pytest.mark.parametrize("cls,kwargs", OPT_CASES)
def test_variants(backend, variant, dtype, cls, kwargs):
    kw, run_kw = dict(kwargs), {}
    if variant == "non_adaptive":
        kw["adaptive"] = False
    elif variant == "maximize":
        kw["maximize"] = True
    elif variant == "lr_tensor":
        run_kw["lr_tensor"] = True
    elif variant == "lr_tensor_change":  # the first-order term's prev_lr, committed from a tensor lr
        run_kw["lr_tensor"] = True

        def hook(opt, step):
            for g in opt.param_groups:
                if step == 4:
                    g["lr"].mul_(0.3)  # in place: the tensor the steps read
                elif step == 7:
                    g["lr"] = g["lr"] * 2.5  # a new tensor
        run_kw["hook"] = hook
    elif variant == "grad_scale":
        run_kw["grad_scale"] = 1024.0
    elif variant == "lr_change":
        def hook(opt, step):
            if step == 5:
                for g in opt.param_groups:
                    g["lr"] = g["lr"] * 0.3
        run_kw["hook"] = hook
    elif variant == "beta_min":
        kw["beta_min"] = BETA_MIN[cls]
    betas = check(backend, cls, kw, [SHAPES, [(33,), (2, 3, 5)]], dtype, variant, lrs=[0.03, 0.01],
                  wds=[0.01, 0.0], **run_kw)[0]
    if variant == "beta_min":  # the clamp was reached, so the comparison above saw it
        lowest = torch.stack([b.float().cpu() for b in betas]).min()
        assert lowest == torch.tensor(BETA_MIN[cls], dtype=lowest.dtype), f"beta never reached beta_min: {lowest}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_amsgd_loss_mode(backend, dtype):
    check(backend, AMSGD, dict(lr=0.05, delta_f="loss"), [SHAPES], dtype, "loss", loss_mode=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPE_CASES, ids=DTYPE_IDS)
@pytest.mark.parametrize("cls,kwargs", OPT_CASES)
def test_found_inf_skips_the_step(backend, dtype, cls, kwargs):
    pairs = []  # (state before, state after) of each run's skipped step

    def hook(opt, step):
        device = opt.param_groups[0]["params"][0].device
        opt.grad_scale = torch.tensor(1.0, device=device)
        opt.found_inf = torch.tensor(1.0 if step == 4 else 0.0, device=device)
        if step == 4:
            pairs.append([_snapshot(opt)])

    class Spy(cls):  # records the state right after the skipped step
        def step(self, closure=None):
            out = super().step(closure)
            if pairs and len(pairs[-1]) == 1:
                pairs[-1].append(_snapshot(self))
            return out

    check(backend, Spy, kwargs, [SHAPES], dtype, "found_inf", hook=hook)
    assert len(pairs) == 2
    for before, after in pairs:
        assert len(before) == len(after)
        for a, b in zip(before, after):
            assert torch.equal(a, b), "a step with found_inf > 0 changed the optimizer's state"


def _snapshot(opt):
    out = [p.detach().clone() for g in opt.param_groups for p in g["params"]]
    for st in opt.state.values():
        out += [t.clone() for t in st.values()]
    if opt._scopes is not None:
        out += list(opt._scopes.to_dict().values())
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls,kwargs", OPT_CASES)
@pytest.mark.parametrize("scope", ["global", "tensor"])
def test_non_finite_gradient_gives_nan_beta(backend, cls, kwargs, scope):
    """A NaN in tensor 2's gradient gives a NaN beta in its scope only: every beta under the global
    scope, tensor 2's alone under the tensor scope."""
    def hook(opt, step):
        if step == 6:
            opt.param_groups[0]["params"][2].grad[5] = float("nan")

    ours = check(backend, cls, dict(kwargs, beta_scope=scope), [SHAPES], torch.float32, "nan", hook=hook, steps=8)
    beta = ours[0][6].reshape(-1)
    nan = torch.zeros(beta.shape, dtype=torch.bool)
    nan[0 if scope == "global" else 2] = True
    assert torch.equal(torch.isnan(beta.cpu()), nan)


@pytest.mark.skipif("cpu" not in amm_kernels.available_backends("cpu"), reason="amm_kernels._C is not built")
def test_cpu_kernels_run_on_several_threads():
    """setup.py NOTE [OpenMP]: built without -fopenmp, at::parallel_for in the extension runs on one
    thread, silently (the kernels were 2x slower and the thread-count test below saw one thread)."""
    from amm_kernels import _C

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert _C.parallel_threads() == 2
    finally:
        torch.set_num_threads(threads)


_ISA_SCRIPT = r"""
import sys, torch
from amm_kernels import _C, AMSGD, AMAdamW, RLLC
torch.manual_seed(0)
shapes = [(1,), (7,), (33,), (4097,), (70_001,), (16, 9)]
out = {"isa": _C.cpu_isa()}
for name, make in [("AMSGD", lambda p: AMSGD(p, weight_decay=0.01, backend="cpu")),
                   ("AMAdamW", lambda p: AMAdamW(p, weight_decay=0.01, backend="cpu")),
                   ("RLLC", lambda p: RLLC(p, law_lr=0.05, backend="cpu"))]:
    for dtype in (torch.float32, torch.bfloat16):
        params = [torch.randn(s).to(dtype).requires_grad_() for s in shapes]
        opt = make(params)
        for step in range(4):
            for p in params:
                p.grad = ((-1) ** step * torch.ones(p.shape) + 0.3 * torch.randn(p.shape)).to(dtype)
            opt.step()
        out[f"{name}-{dtype}"] = [p.detach().clone() for p in params] + [
            t.clone() for st in opt.state.values() for t in st.values() if torch.is_tensor(t)]
torch.save(out, sys.argv[1])
"""


@pytest.mark.skipif("cpu" not in amm_kernels.available_backends("cpu"), reason="amm_kernels._C is not built")
def test_an_unknown_cpu_isa_is_an_error_before_any_write():
    """AMM_CPU_ISA=AVX2 (or any name but base, avx2, avx512) fails the step, naming the variable and its
    values, with nothing changed; it does not run the best build under another name. In its own process:
    the variable is read once."""
    import subprocess
    import sys

    code = ("import torch\nfrom amm_kernels import AMAdamW, RLLC\n"
            "for make in (lambda p: AMAdamW(p, backend='cpu'), lambda p: RLLC(p, backend='cpu')):\n"
            "    p = [torch.ones(5, requires_grad=True)]\n    p[0].grad = torch.ones(5)\n    opt = make(p)\n"
            "    try:\n        opt.step()\n    except RuntimeError as err:\n        print('RAISED', err)\n"
            "    assert torch.equal(p[0].detach(), torch.ones(5)) and all(not s for s in opt.state.values())\n")
    res = subprocess.run([sys.executable, "-c", code], env={**__import__("os").environ, "AMM_CPU_ISA": "AVX2"},
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    said = [ln for ln in res.stdout.splitlines() if ln.startswith("RAISED")]
    assert len(said) == 2 and all("AMM_CPU_ISA must be base, avx2 or avx512" in ln and "'AVX2'" in ln for ln in said), res.stdout


@pytest.mark.skipif("cpu" not in amm_kernels.available_backends("cpu"), reason="amm_kernels._C is not built")
def test_cpu_isa_builds_are_bit_identical(tmp_path):
    """cpu_kernels.h NOTE: the chunk loops are compiled for base x86-64, AVX2 and AVX-512, and built
    with -ffp-contract=off so that every build rounds identically. Each build runs in its own process
    (AMM_CPU_ISA is read once), on the same inputs; the results must agree bit for bit."""
    import os
    import subprocess
    import sys

    from amm_kernels import _C

    best = _C.cpu_isa()
    isas = ["base", "avx2", "avx512"][: ["base", "avx2", "avx512"].index(best) + 1]
    if len(isas) == 1:
        pytest.skip(f"this CPU runs only the {best} build")
    script = tmp_path / "isa_run.py"
    script.write_text(_ISA_SCRIPT)
    results = {}
    for isa in isas:
        path = tmp_path / f"{isa}.pt"
        env = dict(os.environ, AMM_CPU_ISA=isa, OMP_NUM_THREADS="2")
        subprocess.run([sys.executable, str(script), str(path)], env=env, check=True, timeout=300)
        results[isa] = torch.load(path)
        assert results[isa]["isa"] == isa, "AMM_CPU_ISA did not select the build asked for"
    base = results["base"]
    for isa in isas[1:]:
        for key, tensors in base.items():
            if key == "isa":
                continue
            for i, (a, b) in enumerate(zip(tensors, results[isa][key])):
                assert torch.equal(a, b), f"{key} tensor {i}: the {isa} build differs from the base build"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls,kwargs", OPT_CASES)
def test_deterministic(backend, cls, kwargs):
    """Bit-identical beta and parameters on reruns, and (CPU) with 1 thread vs 2."""
    shapes = [[(300_000,), (70_001,), (5,), (64, 257)]]
    seed = _seed("determinism", cls.__name__)
    first = run(backend, cls, kwargs, shapes, torch.float32, seed, steps=4)
    runs = [run(backend, cls, kwargs, shapes, torch.float32, seed, steps=4)]
    if backend == "cpu":
        threads = torch.get_num_threads()
        try:
            for n in (1, 2):
                torch.set_num_threads(n)
                runs.append(run(backend, cls, kwargs, shapes, torch.float32, seed, steps=4))
        finally:
            torch.set_num_threads(threads)
    for other in runs:
        for a, b in zip(first[0], other[0]):
            assert torch.equal(a, b)
        for a, b in zip(first[1], other[1]):
            assert torch.equal(a, b)


_CPU_BUILT = pytest.mark.skipif("cpu" not in amm_kernels.available_backends("cpu"), reason="amm_kernels._C is not built")


@_CPU_BUILT
@pytest.mark.parametrize("variant", ["float32", "bfloat16", "float16", "grad_scale", "lr_tensor"])
@pytest.mark.parametrize("scope", ["group", "tensor"])
@pytest.mark.parametrize("cls,kwargs", OPT_CASES)
def test_cpu_scope_batches(monkeypatch, scope, cls, kwargs, variant):
    """NOTE [scope batches] (step_driver_cpu.cpp): with many scopes the CPU step runs pass 1 and pass 2
    batch by batch. The test suite's steps are smaller than one default batch, so here the size is
    forced down: 1 byte (every scope a batch), 40 KB (some scopes together, the 300 000-element
    tensor alone, over several chunks). Each must be bit-identical to one batch ("0") and match the
    reference."""
    shapes = [[(7,), (4097,), (300_000,)], [(1,), (0,), (3, 5), (2000,)], [(130,), (16, 9)], [(64, 65)]]
    lrs, wds = [0.05, 0.01, 0.002, 0.02], [0.0, 0.01, 0.1, 0.0]
    seed = _seed("batches", scope, cls.__name__, variant)
    kw = {**kwargs, "beta_scope": scope}
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(variant, torch.float32)
    run_kw = dict(steps=5, lrs=lrs, wds=wds, grad_scale=1024.0 if variant == "grad_scale" else None,
                  lr_tensor=variant == "lr_tensor")
    runs = {}
    for size in ("0", "1", "40000"):
        monkeypatch.setenv("AMM_CPU_BATCH_BYTES", size)
        runs[size] = run("cpu", cls, kw, shapes, dtype, seed, **run_kw)
    for size in ("1", "40000"):
        for what, ours, one in zip(("betas", "params"), runs[size][:2], runs["0"][:2]):
            for i, (a, b) in enumerate(zip(ours, one)):
                assert torch.equal(a, b), f"AMM_CPU_BATCH_BYTES={size}: {what}[{i}] differs from one batch"
        for i, (a, b) in enumerate(zip(runs[size][2], runs["0"][2])):
            for k in b:
                assert torch.equal(a[k], b[k]), f"AMM_CPU_BATCH_BYTES={size}: state {k} of param {i} differs"
    ref = run("torch", cls, kw, shapes, dtype, seed, **run_kw)
    assert_runs_close(runs["1"], ref, dtype, f"batches {scope} {cls.__name__} {variant}")


@_CPU_BUILT
def test_cpu_batches_env_is_checked(monkeypatch):
    """A bad AMM_CPU_BATCH_BYTES is an error naming it and its range; the refused step changes
    nothing: the next step is the same as a fresh optimizer's first."""
    torch.manual_seed(0)
    start, grad = [torch.randn(s) for s in [(5,), (3, 4)]], [torch.randn(s) for s in [(5,), (3, 4)]]
    results = []
    for refuse_first in (True, False):
        params = [x.clone().requires_grad_() for x in start]
        opt = AMAdamW(params, backend="cpu")
        for p, g in zip(params, grad):
            p.grad = g.clone()
        if refuse_first:
            monkeypatch.setenv("AMM_CPU_BATCH_BYTES", "-3")
            with pytest.raises(RuntimeError, match="AMM_CPU_BATCH_BYTES must be a number of bytes >= 0"):
                opt.step()
            assert all(torch.equal(p.detach(), x) for p, x in zip(params, start))
            monkeypatch.delenv("AMM_CPU_BATCH_BYTES")
        for _ in range(2):
            opt.step()
        results.append([p.detach().clone() for p in params] + [opt.beta.clone()])
    assert all(torch.equal(a, b) for a, b in zip(*results))


@_CPU_BUILT
@pytest.mark.parametrize("cls,kwargs", OPT_CASES)
def test_cpu_bad_state_dtype_fails_before_any_write(monkeypatch, cls, kwargs):
    """A state tensor of a dtype the kernels do not take (float64 for a float32 parameter) is refused
    before anything is written, also when the step would run in batches and the bad tensor is in the
    last one. (The optimizer casts state to its parameter's dtype first: that is switched off here,
    so the kernels' own check is what is tested.)"""
    monkeypatch.setenv("AMM_CPU_BATCH_BYTES", "1")
    monkeypatch.setattr(cls, "_match_state_dtypes", lambda self, keys, replaced: None)
    params = [torch.randn(s, requires_grad=True) for s in [(7,), (300,), (11,)]]
    opt = cls(params, backend="cpu", beta_scope="tensor", **kwargs)
    for step in range(2):
        for p in params:
            p.grad = torch.randn(p.shape)
        opt.step()
    for key in ["momentum_buffer"] if cls is AMSGD else ["exp_avg", "exp_avg_sq"]:
        opt.state[params[-1]][key] = opt.state[params[-1]][key].double()
    for p in params:
        p.grad = torch.randn(p.shape)
    snapshot = ([p.detach().clone() for p in params],
                [{k: v.clone() for k, v in opt.state[p].items()} for p in params], opt.beta.clone())
    with pytest.raises(RuntimeError, match="state dtype"):
        opt.step()
    assert all(torch.equal(p.detach(), q) for p, q in zip(params, snapshot[0]))
    for p, st in zip(params, snapshot[1]):
        assert all(torch.equal(opt.state[p][k], v) for k, v in st.items())
    assert torch.equal(opt.beta, snapshot[2])


# --------------------------------------------------------------------------------------------------
# Sharded parameters: the step split around the all_reduce (tests/_dist.py) is the one-op step.
from _dist import one_rank_group, one_rank_nccl_group  # noqa: E402,F401


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", ["global", "group", "tensor", "loss", "grad_scale", "non_adaptive",
                                     "group_batched", "tensor_batched"])
@pytest.mark.parametrize("cls,kwargs", OPT_CASES)
def test_split_step_is_the_one_op_step(one_rank_group, monkeypatch, backend, variant, cls, kwargs):
    """The step split around the all-reduce (the sums op, then the step op with the reduced sums) is the
    one-op step bit for bit. "_batched": the cpu backend with every scope a batch of its own
    (AMM_CPU_BATCH_BYTES=1), where the one-op step runs scope batch after scope batch but the sums op,
    which needs every scope's sums before any update, must still run as one batch (NOTE [sharded sums])."""
    if variant == "loss" and cls is not AMSGD:
        pytest.skip("delta_f='loss' is AMSGD's")
    if variant.endswith("_batched"):
        if backend != "cpu":
            pytest.skip("AMM_CPU_BATCH_BYTES is the cpu backend's")
        monkeypatch.setenv("AMM_CPU_BATCH_BYTES", "1")
        variant = variant.split("_")[0]
    kw = dict(kwargs)
    run_kw = dict(lrs=[0.05, 0.02], wds=[0.0, 0.01])
    if variant in ("global", "group", "tensor"):
        kw["beta_scope"] = variant
    elif variant == "loss":
        kw["delta_f"] = "loss"
        run_kw["loss_mode"] = True
    elif variant == "grad_scale":
        run_kw["grad_scale"] = 64.0
    else:
        kw["adaptive"] = False
    shapes = [MIXED[:6], MIXED[6:12]]
    seed = _seed("split", variant, cls.__name__)
    whole = run(backend, cls, kw, shapes, torch.float32, seed, steps=5, **run_kw)
    split = run(backend, cls, {**kw, "process_group": one_rank_group}, shapes, torch.float32, seed, steps=5, **run_kw)
    b_whole, p_whole, s_whole, sc_whole, _ = whole
    b_split, p_split, s_split, sc_split, _ = split
    assert all(torch.equal(a, b) for a, b in zip(b_whole, b_split)), "beta"
    assert all(torch.equal(a, b) for a, b in zip(p_whole, p_split)), "parameters"
    assert all(torch.equal(a[k], b[k]) for a, b in zip(s_whole, s_split) for k in a), "state"
    assert all(torch.equal(sc_whole[k], sc_split[k]) for k in sc_whole), "scope state"
    if variant != "non_adaptive":  # NOTE [moving beta]
        assert len({float(b.flatten()[0]) for b in b_whole[1:]}) > 1, "beta should move"


@pytest.mark.skipif(not _cuda_ok(), reason="no CUDA device or no CUDA kernels")
@pytest.mark.parametrize("scope", ["global", "tensor"])
@pytest.mark.parametrize("cls,kwargs", OPT_CASES)
def test_split_step_over_nccl_is_the_one_op_step(one_rank_nccl_group, scope, cls, kwargs):
    """The sums all-reduced by NCCL (GPU only): on one rank, bit for bit the one-op step."""
    kw = dict(kwargs, beta_scope=scope)
    shapes = [MIXED[:6], MIXED[6:12]]
    seed = _seed("nccl", scope, cls.__name__)
    whole = run("cuda", cls, kw, shapes, torch.float32, seed, steps=5, lrs=[0.05, 0.02], wds=[0.0, 0.01])
    split = run("cuda", cls, {**kw, "process_group": one_rank_nccl_group}, shapes, torch.float32, seed, steps=5,
                lrs=[0.05, 0.02], wds=[0.0, 0.01])
    for a, b in zip(whole[:2], split[:2]):  # betas, parameters
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert len({float(b.flatten()[0]) for b in whole[0][1:]}) > 1, "beta should move"


def _odd_layouts(device, seed):
    """Leaf parameters in the layouts a user may hand an optimizer: a slice with gaps, a transpose,
    a permuted 3-D tensor, an offset slice, and a plain one (NOTE [working copies] in csrc/cuda/working_copies.h)."""
    gen = torch.Generator().manual_seed(seed)

    def leaf(shape, view):  # the view is taken on the device: .to(device) would copy a gapped or offset view densely
        return view(torch.randn(shape, generator=gen).to(device)).detach().requires_grad_()

    return [leaf(14, lambda t: t[::2]), leaf((5, 3), lambda t: t.t()), leaf((2, 3, 4), lambda t: t.permute(2, 0, 1)),
            leaf(20, lambda t: t[3:10]), leaf(6, lambda t: t)]


def _layout_case(backend, name):
    """The optimizer class named and the backend's device (the simulator built where it is the backend)."""
    if backend == _cuda_sim.NAME:
        _cuda_sim.ensure()
    return {"AMSGD": AMSGD, "AMAdamW": AMAdamW, "RLLC": amm_kernels.RLLC}[name], _device(backend)


def _assert_runs_alike(runs):
    """runs = [(params, optimizer) of the reference, of the backend]: parameters and state agree."""
    (ref, ref_opt), (got, got_opt) = runs
    rtol, atol = tolerance(torch.float32)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a.detach().cpu(), b.detach().cpu(), rtol=rtol, atol=atol)
    for pa, pb in zip(got, ref):
        for key, t in got_opt.state[pa].items():
            torch.testing.assert_close(t.cpu(), ref_opt.state[pb][key].cpu(), rtol=rtol, atol=atol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["AMSGD", "AMAdamW", "RLLC"])
def test_parameters_in_any_layout(backend, name):
    """Every layout runs on the fast backends as on the reference, is updated in place (the user's
    tensor, not a copy), and a state tensor in another layout than its parameter's (as a checkpoint
    may load it) is followed, not refused. The CUDA glue walks only dense parameters and RLLC's only
    contiguous ones: these used to be errors on "cuda" (and "cuda_sim")."""
    cls, device = _layout_case(backend, name)
    runs = []
    for b in ("torch", backend):
        params = _odd_layouts(device, seed=3)
        ptrs = [p.data_ptr() for p in params]
        opt = cls([{"params": params[:3], "lr": 0.05}, {"params": params[3:], "lr": 0.02}], backend=b)
        gen = torch.Generator().manual_seed(4)
        for step in range(4):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen).to(device)
            opt.step()
            if step == 1:  # a state in another layout than its parameter's (contiguous, the transpose's not)
                st = opt.state[params[1]]
                for key in opt.STATE_NAMES:  # (not the 0-d stand-ins: NOTE [checkpoint carriers])
                    t = st[key]
                    st[key] = t.contiguous() if not t.is_contiguous() else t.mT.contiguous().mT
        assert [p.data_ptr() for p in params] == ptrs
        runs.append((params, opt))
    _assert_runs_alike(runs)


# ---- paths the tests above do not reach: NaN found_inf, skipped steps, absent groups, gradient layouts,
# ---- offsets off 16 bytes, three tables, the finalize's warp path

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls,kwargs", OPT_CASES)
def test_a_nan_found_inf_does_not_skip_the_step(backend, cls, kwargs):
    """found_inf = NaN is not > 0: the step is taken, as the reference's `found_inf > 0` (the CPU
    driver's and the CUDA kernels' step_skipped compare the same way; `!(found_inf <= 0)` would skip)."""
    def hook(opt, step):
        device = opt.param_groups[0]["params"][0].device
        opt.grad_scale = torch.tensor(1.0, device=device)
        opt.found_inf = torch.tensor(float("nan") if step in (3, 4) else 0.0, device=device)

    check(backend, cls, kwargs, [SHAPES], torch.float32, "found_inf_nan", hook=hook)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls,kwargs,loss_mode", [
    pytest.param(AMSGD, dict(lr=0.05, lam=0.1, beta_max=0.9), False, id="AMSGD"),
    pytest.param(AMSGD, dict(lr=0.05, lam=0.1, beta_max=0.9, delta_f="loss"), True, id="AMSGD-loss"),
    pytest.param(AMAdamW, dict(lr=1e-2, weight_decay=0.05), False, id="AMAdamW"),
])
def test_a_skipped_step_keeps_prev_lr_and_prev_loss(backend, cls, kwargs, loss_mode):
    """A step skipped by found_inf writes no scope state, even where it would change it: the lr of
    every group changes at the skipped step (prev_lr must keep the lr the groups last moved with) and,
    in loss mode, the skipped step's loss differs from the last one (prev_loss must keep the old one)."""
    pairs = []

    def hook(opt, step):
        device = opt.param_groups[0]["params"][0].device
        opt.grad_scale = torch.tensor(1.0, device=device)
        opt.found_inf = torch.tensor(1.0 if step == 4 else 0.0, device=device)
        if step == 4:
            for g in opt.param_groups:
                g["lr"] = g["lr"] * 0.5
            pairs.append([_snapshot(opt)])

    class Spy(cls):
        def step(self, closure=None):
            out = super().step(closure)
            if pairs and len(pairs[-1]) == 1:
                pairs[-1].append(_snapshot(self))
            return out

    check(backend, Spy, kwargs, [SHAPES, [(33,), (2, 3, 5)]], torch.float32, "skip_state", hook=hook,
          lrs=[0.03, 0.01], loss_mode=loss_mode)
    assert len(pairs) == 2
    for before, after in pairs:
        for a, b in zip(before, after):
            assert torch.equal(a, b), "a step with found_inf > 0 changed the optimizer's state"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls,kwargs", OPT_CASES)
def test_a_group_without_gradients_keeps_its_prev_lr(backend, cls, kwargs):
    """A group none of whose parameters has a gradient does not move: its prev_lr stays the lr it last
    moved with, even when its lr changes meanwhile (the reference writes prev_lr of the stepping groups
    only); the first-order term of its next step uses that prev_lr."""
    def hook(opt, step):
        if step == 3:
            opt.param_groups[1]["lr"] = opt.param_groups[1]["lr"] * 0.25
        if step in (3, 4):
            for p in opt.param_groups[1]["params"]:
                p.grad = None

    check(backend, cls, {**kwargs, "beta_scope": "global"}, [SHAPES, [(33,), (2, 3, 5)]], torch.float32,
          "absent_group", lrs=[0.03, 0.01], hook=hook, steps=7)


def _odd_layout_grad(p, gen, step):
    """A gradient of p's shape, on p's device, in a non-contiguous layout: gapped (every other element
    of a larger buffer) on even steps, dimension-reversed (a transpose's) on odd ones. The view is taken
    on the device: moving a gapped view there would give a contiguous copy."""
    if step % 2 == 0:
        return torch.randn((*p.shape, 2), generator=gen).to(p.device)[..., 0]
    dims = list(range(p.dim()))[::-1]
    return torch.randn([p.shape[d] for d in dims], generator=gen).to(p.device).permute(*dims)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["AMSGD", "AMAdamW", "RLLC"])
def test_gradients_in_any_layout(backend, name):
    """Gradients that are not contiguous (a gapped view, a transpose's layout; autograd gives a
    parameter's layout, hooks and user code give anything) are read in the parameter's element order,
    as on the reference."""
    cls, device = _layout_case(backend, name)
    runs = []
    for b in ("torch", backend):
        gen = torch.Generator().manual_seed(5)
        params = [torch.randn(s, generator=gen).to(device).requires_grad_() for s in [(5, 3), (2, 3, 4), (37,), (40, 33)]]
        opt = cls([{"params": params[:2], "lr": 0.05}, {"params": params[2:], "lr": 0.02}], backend=b)
        for step in range(4):
            for p in params:
                g = _odd_layout_grad(p, gen, step)
                assert not g.is_contiguous() or p.dim() == 1 and step % 2 == 1
                p.grad = g
            opt.step()
        runs.append((params, opt))
    _assert_runs_alike(runs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("cls,kwargs", OPT_CASES)
def test_parameters_at_every_offset_from_16_bytes(backend, dtype, cls, kwargs):
    """Parameters that are views k elements into a buffer, for every k that leaves them off a 16-byte
    boundary (float32: 4, 8, 12 bytes; bfloat16: 2 to 14): the CUDA step must take the scalar path for
    all of them (an 8-byte aligned pointer is not 16-byte aligned: a vector access there faults)."""
    if backend == _cuda_sim.NAME:
        _cuda_sim.ensure()
    device = _device(backend)
    per_vector = 16 // torch.tensor([], dtype=dtype).element_size()
    runs = []
    for b in ("torch", backend):
        gen = torch.Generator().manual_seed(8)
        bufs = [torch.randn(n + off, generator=gen).to(device=device, dtype=dtype)
                for off in range(1, per_vector) for n in (9, 4099)]
        offs = [off for off in range(1, per_vector) for _ in (9, 4099)]
        params = [torch.nn.Parameter(buf[off:]) for buf, off in zip(bufs, offs)]
        assert all(p.data_ptr() % 16 != 0 for p in params)
        opt = cls(params, backend=b, **kwargs)
        betas = []
        for step in range(5):
            for p in params:
                p.grad = ((-1.0) ** step * torch.ones(p.shape) + 0.3 * torch.randn(p.shape, generator=gen)).to(
                    device=device, dtype=dtype)
            opt.step()
            betas.append(opt.beta.detach().clone())
        states = [(k, t.detach().clone(), p.grad) for p in params for k, t in opt.state[p].items() if t.dim()]
        runs.append((betas, [p.detach().clone() for p in params], states))
    rtol, atol = tolerance(dtype)
    for a, b in zip(runs[1][0] + runs[1][1], runs[0][0] + runs[0][1]):
        torch.testing.assert_close(a.cpu().float(), b.cpu().float(), rtol=rtol, atol=atol)
    assert len(runs[1][2]) == len(runs[0][2]) == len(cls.STATE_NAMES) * len(params)
    for (k, a, _), (_, b, g) in zip(runs[1][2], runs[0][2]):
        torch.testing.assert_close(a.cpu().float(), b.cpu().float(), rtol=rtol, atol=state_atol(k, atol, b.float(), g.float()))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls,kwargs", OPT_CASES)
def test_more_tensors_than_two_launches_hold(monkeypatch, backend, cls, kwargs):
    """300 tensors under one global scope: the CUDA step, its tables capped at 128 tensors
    (AMM_CUDA_TABLE_TENSORS), splits them over three tables, so the third table's slots must start
    after the first two tables' (slot_base)."""
    monkeypatch.setenv("AMM_CUDA_TABLE_TENSORS", "128")
    shapes = [[(7,), (33,), (1,), (16, 9), (130,)] * 60]
    check(backend, cls, {**kwargs, "beta_scope": "global"}, shapes, torch.float32, "three-tables", steps=4)


@pytest.mark.parametrize("backend", BACKENDS[1:])  # cuda, cuda_sim
def test_a_full_table_and_one_tensor_more(backend):
    """kMaxTensors (384) tensors fill the CUDA step's first table, the 385th starts a second (NOTE [one
    launch per pass]), at the default table size, in two groups whose boundary falls inside the first,
    under one global beta: its sums span both tables. The 385th is the largest (two chunks), so second-table
    slots written over the first table's (a wrong slot_base) change beta beyond the tolerance: a review's
    mutant of the planner passed the version with a 1-element 385th tensor and 2 steps."""
    shapes = [[(7,), (0,), (33,), (1,), (300,)] * 40, [(5,), (4_097,), (2,)] * 61 + [(1,), (65_537,)]]
    assert sum(map(len, shapes)) == 385
    check(backend, AMAdamW, {"lr": 1e-2, "weight_decay": 0.05, "beta_scope": "global"}, shapes, torch.float32,
          "full-table", steps=4, lrs=[0.05, 0.02], wds=[0.0, 0.01])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls,kwargs", OPT_CASES)
def test_a_tensor_of_more_than_32_chunks(backend, cls, kwargs):
    """A tensor of 33 CUDA chunks (65536 elements each, the last partial): the finalize sums a tensor
    of more than kSerialSlots (32) slots with a warp instead of one thread (finalize.cuh)."""
    check(backend, cls, kwargs, [[(33 * 65_536 + 5,), (7,)]], torch.float32, "33-chunks", steps=3)

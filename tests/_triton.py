"""Shared set-up of the Triton tests: the backend imported in interpreter mode where there is no GPU,
the device, the fixture that keeps TRITON_INTERPRET set for the tests, the input makers, the training
loop and the checks that compare two runs."""
import functools
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from _helpers import state_atol, tolerance

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
        if "was imported before" in str(err):
            # not this machine's limit but the suite's order: a module collected earlier imported triton
            # (a meta torch.eye at import time does, through torch's meta registrations). Skipping would
            # drop every triton test of the run in silence: fail the collection instead.
            raise RuntimeError(f"a test module collected before this one imported triton: {err}") from err
        pytest.skip(f"triton's interpreter is not usable here: {err}", allow_module_level=True)
    finally:
        if saved is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = saved
    return triton_backend


@functools.lru_cache(maxsize=None)
def interpreter_unusable() -> str | None:
    """Why the triton backend cannot import in interpreter mode here, for a reason it names (triton not
    installed; NOTE [interpreter and NumPy] in amm_kernels/triton_backend.py), else None; any other
    failure to import is an error, not a reason to skip. Asked of a fresh process: the mode is fixed
    at triton's first import. For tests that drive the interpreter in subprocesses of their own."""
    code = "import amm_kernels.triton_backend"
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode == 0:
        return None
    last = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
    if "needs the triton package" in last or "interpreter cannot run these kernels" in last:
        return last
    raise RuntimeError(f"amm_kernels.triton_backend does not import in interpreter mode:\n{proc.stderr[-3000:]}")


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


def blocks_to_test(triton_backend):
    """The interpreter's BLOCK and the GPU's (one entry on a GPU): tables, slots and the whole-block path
    are cut by BLOCK, so the interpreter also runs at the size a GPU uses."""
    return sorted({triton_backend.BLOCK, triton_backend.COMPILED_BLOCK})


def assert_beta_moves(betas):
    """A run's betas (one tensor per step) left their clamp at least once, so the sums behind them
    reached the result (grads_for(flip=True) gives such runs)."""
    betas = torch.cat([b.flatten() for b in betas]).float()
    assert betas.max() - betas.min() > 1e-3, betas


def mixed_dtype_params():
    """Six parameters on DEV, two each of float32, bfloat16 and float16, one of them empty."""
    params = make_params([(7,), (4097,), (3, 3), (5,), (0,), (40,)], torch.float32)
    dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.float32, torch.bfloat16, torch.float16]
    return [p.detach().to(dt).requires_grad_() for p, dt in zip(params, dtypes)]


def lr_tensor_groups(groups_of):
    """groups(params) for a run: groups_of(params) with group 1's lr a tensor, 0.02 on DEV."""
    def groups(params):
        g = groups_of(params)
        g[1]["lr"] = torch.tensor(0.02, device=DEV)
        return g

    return groups


def change_lrs_at_step_2(opt, step):
    """A run's hook: from step 2 on, group 0's lr is 0.01 and group 1's a tensor, 0.07 on DEV."""
    if step == 2:
        opt.param_groups[0]["lr"] = 0.01
        opt.param_groups[1]["lr"] = torch.tensor(0.07, device=DEV)


def train(opt, params, steps, watch, hook=None, seed=0, flip=False):
    """`steps` steps on grads_for(params, step, seed, flip=flip); hook(opt, step), where given, runs once
    the step's gradients are set, just before opt.step() (it may change them). Returns a copy of
    getattr(opt, watch) ("beta" or "law") after each step."""
    record = []
    for step in range(steps):
        for p, g in zip(params, grads_for(params, step, seed, flip=flip)):
            p.grad = g
        if hook is not None:
            hook(opt, step)
        opt.step()
        record.append(getattr(opt, watch).detach().clone())
    return record


def assert_same_run(ref, got, dtype, what, watch, scope_fields):
    """Two runs, each (params, opt, the `watch` values per step), agree to the tolerance of `dtype`: the
    watched value of every step, the parameters (and their dtypes), every per-parameter state tensor (the
    same names, dtypes and shapes) and the scope state fields `scope_fields`. The watched values and the
    scope state to the tolerance of `dtype` (of the coarsest parameters in a run of several dtypes); each
    parameter and its state to that of its own dtype."""
    rtol, atol = tolerance(dtype)
    (p_ref, o_ref, w_ref), (p_got, o_got, w_got) = ref, got
    for i, (wr, wg) in enumerate(zip(w_ref, w_got)):
        torch.testing.assert_close(wg.cpu(), wr.cpu(), rtol=rtol, atol=atol, equal_nan=True,
                                   msg=lambda m: f"{what} step {i} {watch}: {m}")
    for i, (a, b) in enumerate(zip(p_ref, p_got)):
        assert b.dtype == a.dtype
        rtol, atol = tolerance(a.dtype)
        torch.testing.assert_close(b.detach().float().cpu(), a.detach().float().cpu(), rtol=rtol, atol=atol,
                                   equal_nan=True, msg=lambda m: f"{what} param {i}: {m}")
        assert o_ref.state[a].keys() == o_got.state[b].keys()
        for key, sr in o_ref.state[a].items():
            sg = o_got.state[b][key]
            assert sg.dtype == sr.dtype and sg.shape == sr.shape
            s_atol = state_atol(key, atol, sr.float().cpu()) if key == "exp_avg_sq" else atol
            torch.testing.assert_close(sg.float().cpu(), sr.float().cpu(), rtol=rtol, atol=s_atol, equal_nan=True,
                                       msg=lambda m: f"{what} state {key} of param {i}: {m}")
    rtol, atol = tolerance(dtype)
    for name in scope_fields:
        torch.testing.assert_close(getattr(o_got._scopes, name).cpu(), getattr(o_ref._scopes, name).cpu(),
                                   rtol=rtol, atol=atol, equal_nan=True, msg=lambda m: f"{what} scope {name}: {m}")


def assert_bit_identical(a, b):
    """Two runs, each (params, opt, watched values per step), agree bit for bit in the watched values and
    the parameters."""
    assert all(torch.equal(x, y) for x, y in zip(a[2], b[2]))
    assert all(torch.equal(x, y) for x, y in zip(a[0], b[0]))


def check_found_inf_changes_nothing(params, opt, inf_grad=False):
    """A step with found_inf = 1 on grads_for(params, 7) (with inf_grad, an inf in the first gradient
    too) leaves the parameters, the scope state and the per-parameter state bit-identical."""
    before = ([p.detach().clone() for p in params], {k: v.clone() for k, v in opt._scopes.to_dict().items()},
              [{k: v.clone() for k, v in opt.state[p].items()} for p in params])
    opt.found_inf = torch.tensor([1.0], device=DEV)
    for p, g in zip(params, grads_for(params, 7)):
        p.grad = g
    if inf_grad:
        params[0].grad[0] = float("inf")
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before[0], params))
    assert all(torch.equal(v, getattr(opt._scopes, k)) for k, v in before[1].items())
    assert all(torch.equal(v, opt.state[p][k]) for s, p in zip(before[2], params) for k, v in s.items())

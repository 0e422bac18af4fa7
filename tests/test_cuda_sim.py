"""The CUDA-on-CPU simulator (tests/cuda_sim, NOTE [CUDA on the CPU] in amm_cuda_sim.h) behind the
"cuda_sim" backend, which lets CI run csrc/cuda's kernels without a GPU.

1. The simulator finds what it claims to find: small kernels (tests/cuda_sim/selftest_kernels.cu)
   with a divergent barrier, a shared-memory overrun, a read of unwritten shared memory, a missing
   barrier, grid.sync outside a cooperative launch, and launches the driver refuses.
2. Under AddressSanitizer (a subprocess with libasan preloaded), csrc/cuda's kernels read and write
   only inside their tensors, for odd, multi-chunk and unaligned sizes, every dtype and RLLC.
3. A steady-state step moves exactly the bytes per parameter bench/README.md budgets (NOTE [traffic
   hook] in csrc/cuda/multi_tensor.cuh), for both step variants.
4. csrc/cuda's results do not depend on the schedule (NOTE [schedules] in amm_cuda_sim.cpp): every
   order of threads the simulator can run gives the same bits, for both CUDA step variants and RLLC.
   A race (a missing __syncthreads or grid barrier) makes them differ or shows as NaN.
The parity of the CUDA kernels with the reference runs in the backend tests, where "cuda_sim" is one
of the backends (test_compiled_kernels.py, test_cuda_persistent.py, test_rllc_kernels.py, test_vectors.py).
"""
import os
import re
import subprocess
import sys
from pathlib import Path

import _cuda_sim
import pytest
import torch
from test_compiled_kernels import MIXED, _seed, run
from test_cuda_persistent import assert_identical, set_variant
from test_rllc_kernels import assert_close_runs
from test_rllc_kernels import run as run_rllc

from amm_kernels import AMAdamW, AMSGD

SCHEDULES = ["ascending", "descending", "round_robin"]


@pytest.fixture(autouse=True)
def sim():
    _cuda_sim.ensure()


def selftest(monkeypatch, name, schedule="ascending"):
    monkeypatch.setenv("AMM_SIM_SCHEDULE", schedule)
    return torch.ops.amm_cuda_sim_selftest.run(name)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_a_correct_block_reduction_gives_the_exact_sum(monkeypatch, schedule):
    out = selftest(monkeypatch, "block_reduce", schedule)
    assert out[:2].tolist() == [sum(range(512))] * 2


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_grid_sync_orders_the_blocks_of_a_cooperative_launch(monkeypatch, schedule):
    out = selftest(monkeypatch, "grid_sync_cooperative", schedule)
    expected = [float(b + (b + 1) % 4) for b in range(4) for _ in range(32)]
    assert out[512:512 + 128].tolist() == expected


def test_a_missing_barrier_shows_as_nan_under_the_default_schedule(monkeypatch):
    """Warp 0 reads the other warps' partials before they are written: uninitialised shared memory (NaN)."""
    assert torch.isnan(selftest(monkeypatch, "reduce_missing_barrier")[0])


def test_uninitialised_shared_memory_reads_as_nan(monkeypatch):
    assert torch.isnan(selftest(monkeypatch, "uninitialised_shared")[:32]).all()


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("name,match", [
    ("divergent_barrier", r"deadlock.*1 threads wait at __syncthreads, 31 at a warp shuffle"),
    ("shared_overrun", "wrote past a __shared__ array"),
    ("grid_sync_not_cooperative", r"grid.sync\(\) in a launch that is not cooperative"),
    ("cooperative_too_large", "too many blocks in cooperative launch"),
    ("dynamic_shared_over_48k", "invalid argument"),
    ("misaligned_vector_store", "misaligned address: a 16-byte vector store"),
])
def test_faults_are_errors(monkeypatch, schedule, name, match):
    with pytest.raises(RuntimeError, match=match):
        selftest(monkeypatch, name, schedule)


def test_dynamic_shared_memory_over_48k_after_raising_the_limit(monkeypatch):
    out = selftest(monkeypatch, "dynamic_shared_over_48k_raised")
    assert out[:256].tolist() == [float(255 - i) for i in range(256)]


def test_a_bad_schedule_name_is_an_error(monkeypatch):
    with pytest.raises(ValueError, match="AMM_SIM_SCHEDULE must be ascending, descending or round_robin"):
        selftest(monkeypatch, "block_reduce", "random")


# --------------------------------------------------------------------------------------------------
# Memory traffic (NOTE [traffic hook] in csrc/cuda/multi_tensor.cuh): the bytes of parameter, gradient
# and state elements a steady-state step loads and stores, per float32 parameter, against the budget in
# bench/README.md that the bandwidth bars are measured against. The persistent step keeps what pass 1
# read in shared memory: for a model that fits its tile cache, pass 2 re-reads nothing it kept, so
# the whole step moves what torch's fused AdamW moves (28), or SGD with momentum (20).
N_TRAFFIC = 4 * 12_288  # four tensors, each one chunk a block's tile cache holds whole (3 x 8 x 512)
TRAFFIC = [  # (optimizer, weight decay, variant, cache setting, bytes per parameter)
    ("AMSGD", 0.0, "two_pass", None, 28), ("AMSGD", 0.01, "two_pass", None, 32),
    ("AMAdamW", 0.0, "two_pass", None, 40), ("AMAdamW", 0.01, "two_pass", None, 44),
    ("AMSGD", 0.0, "persistent", None, 20), ("AMSGD", 0.01, "persistent", None, 20),
    ("AMAdamW", 0.0, "persistent", None, 28), ("AMAdamW", 0.01, "persistent", None, 28),
    ("AMAdamW", 0.01, "persistent", 0, 44),  # no tile cache: the two-pass bytes
]


@pytest.mark.parametrize("name,wd,variant,cache,budget", TRAFFIC,
                         ids=[f"{t[0]}-wd{t[1]}-{t[2]}-cache{t[3]}" for t in TRAFFIC])
def test_a_step_moves_the_budgeted_bytes(monkeypatch, name, wd, variant, cache, budget):
    set_variant(monkeypatch, variant, cache)
    cls = {"AMSGD": AMSGD, "AMAdamW": AMAdamW}[name]
    per_step, _ = _bytes_per_parameter(cls, dict(lr=0.01, weight_decay=wd), steps=3)
    assert per_step[1:] == [budget, budget], f"bytes per parameter of the three steps: {per_step}"


def _bytes_per_parameter(cls, kwargs, steps):
    """The bytes each of `steps` steps of cls(**kwargs) moves per parameter, on N_TRAFFIC float32 parameters
    in four tensors, and the optimizer."""
    params = [torch.randn(N_TRAFFIC // 4, requires_grad=True) for _ in range(4)]
    opt = cls(params, backend=_cuda_sim.NAME, **kwargs)
    per_step = []
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn_like(p)
        torch.ops.amm_cuda_sim_selftest.take_traffic()
        opt.step()
        loaded, stored = torch.ops.amm_cuda_sim_selftest.take_traffic()
        per_step.append((loaded + stored) / N_TRAFFIC)
    return per_step, opt



@pytest.mark.parametrize("limit,budget", [(None, 28), (N_TRAFFIC, 28), (N_TRAFFIC - 1, 44), (0, 44)])
def test_auto_runs_the_persistent_step_up_to_its_limit(monkeypatch, limit, budget):
    """AMM_CUDA_PERSISTENT_MAX_NUMEL (README, Backends; default 524,288): under auto, a step of at most
    that many elements runs as the persistent step, told here by the bytes it moves (28 per parameter
    for AMAdamW with weight decay, its tiles kept; 44 as two passes), a larger one as two passes; and a
    value that is not an integer >= 0 is an error naming the variable."""
    set_variant(monkeypatch, "auto")
    if limit is None:
        monkeypatch.delenv("AMM_CUDA_PERSISTENT_MAX_NUMEL", raising=False)
    else:
        monkeypatch.setenv("AMM_CUDA_PERSISTENT_MAX_NUMEL", str(limit))
    per_step, opt = _bytes_per_parameter(AMAdamW, dict(lr=0.01, weight_decay=0.01), steps=2)
    assert per_step[1] == budget, per_step
    monkeypatch.setenv("AMM_CUDA_PERSISTENT_MAX_NUMEL", "-1")
    with pytest.raises(RuntimeError, match="AMM_CUDA_PERSISTENT_MAX_NUMEL must be an integer"):
        opt.step()


def test_a_captured_step_tries_one_launch_only_where_one_ran(monkeypatch):
    """NOTE [cooperative launch under capture] in csrc/cuda/ops_cuda.cpp: a cooperative launch refused
    while a stream is captured would invalidate the graph, so under auto a step being captured runs as
    the persistent step only where a launch of its grid ran before, with no refusal since. Modelled here:
    AMM_SIM_COOP_SMS=1 refuses the grid (an MPS client), AMM_SIM_CAPTURING=1 is a capture (a launch that
    fails then fails every launch after it). Which step ran is told by the bytes it moved (the persistent
    step keeps its tiles: 28 bytes per parameter against 44), and every step must give the two-pass bits."""
    set_variant(monkeypatch, "auto")
    # (eager or captured, the device refuses the grid, the bytes the step must move; the first step's
    # differ, it has no state to read)
    schedule = [(False, True, None), (True, True, 44), (True, True, 44),  # refused eagerly: captured two-pass
                (False, False, 28), (True, False, 28)]  # ran eagerly: captured as one launch
    bytes_moved = []

    def hook(opt, step):
        captured, refused, _ = schedule[step]
        for name, on in (("AMM_SIM_CAPTURING", captured), ("AMM_SIM_COOP_SMS", refused)):
            monkeypatch.setenv(name, "1") if on else monkeypatch.delenv(name, raising=False)
        loaded, stored = torch.ops.amm_cuda_sim_selftest.take_traffic()  # the step before this one
        if step > 0:
            bytes_moved.append((loaded + stored) / N_TRAFFIC if step > 1 else None)

    shapes, seed = [[(N_TRAFFIC // 4,)] * 4], _seed("captured")
    kwargs = dict(lr=1e-2, weight_decay=0.01)
    try:
        auto = run(_cuda_sim.NAME, AMAdamW, kwargs, shapes, torch.float32, seed, steps=len(schedule), hook=hook)
    finally:
        monkeypatch.delenv("AMM_SIM_CAPTURING", raising=False)
        monkeypatch.delenv("AMM_SIM_COOP_SMS", raising=False)
    loaded, stored = torch.ops.amm_cuda_sim_selftest.take_traffic()
    bytes_moved.append((loaded + stored) / N_TRAFFIC)
    assert bytes_moved == [b for _, _, b in schedule], f"bytes per parameter of the steps: {bytes_moved}"
    set_variant(monkeypatch, "two_pass")
    two = run(_cuda_sim.NAME, AMAdamW, kwargs, shapes, torch.float32, seed, steps=len(schedule))
    assert_identical(auto, two, "captured")


# --------------------------------------------------------------------------------------------------
# AddressSanitizer (NOTE [AddressSanitizer] in amm_cuda_sim.cpp): the simulator and csrc/cuda built with
# -fsanitize=address, run in a subprocess that preloads libasan; any access outside a tensor aborts it.
REPO = Path(__file__).resolve().parents[1]
ASAN_TESTS = ["tests/test_compiled_kernels.py", "tests/test_cuda_persistent.py", "tests/test_rllc_kernels.py"]
# (the error paths too: a step the glue refuses throws, unwinding through csrc/cuda)
ASAN_SELECTION = ("cuda_sim and (test_shapes or multi_chunk or unaligned or global_scope or forcing or refused "
                  "or bad_settings)")


def _asan_env():
    preload = _cuda_sim.build_module().asan_runtime()
    if preload is None:
        pytest.skip("no AddressSanitizer runtime (libasan) for this compiler")
    return dict(os.environ, LD_PRELOAD=preload, AMM_SIM_ASAN="1",
                ASAN_OPTIONS="detect_leaks=0:detect_stack_use_after_return=0")


def test_the_cuda_kernels_stay_inside_their_tensors_under_asan():
    """First that this build of AddressSanitizer sees an overrun at all (a kernel that writes one element
    past its tensor aborts the process with its report), then the CUDA kernels' tests under it. One test,
    not two: each needs the sanitized build (~1 minute on 2 cores), and as two tests under xdist one worker
    sat idle on the build's lock while the other built it."""
    env = _asan_env()
    code = ("import sys; sys.path.insert(0, 'tests'); import _cuda_sim, torch; _cuda_sim.ensure(); "
            "torch.ops.amm_cuda_sim_selftest.run('global_overrun')")
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode != 0 and "heap-buffer-overflow" in res.stderr, res.stderr[-3000:]

    # --capture=sys: pytest's default capture of fd 2 would swallow AddressSanitizer's report (written by
    # the C runtime, then the process aborts): the failure showed empty stdout and stderr (checked)
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "--capture=sys",
                          *ASAN_TESTS, "-k", ASAN_SELECTION], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=1200)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "AddressSanitizer" not in res.stderr
    passed = re.search(r"(\d+) passed", res.stdout)
    assert passed and int(passed.group(1)) >= 20, res.stdout[-2000:]


# --------------------------------------------------------------------------------------------------
# csrc/cuda under every schedule: many tensors (blocks of the persistent step walk several chunks and
# call the block reduction once per chunk), tensors of several chunks, two groups and tensor scope.
SHAPES = [MIXED[:30], [(65_536 * 2 + 3,), (300, 301), (0,), (1,)]]


@pytest.mark.parametrize("variant", ["persistent", "two_pass"])
@pytest.mark.parametrize("cls,kwargs", [
    pytest.param(AMSGD, dict(lr=0.05, lam=0.1, weight_decay=0.01, beta_scope="tensor"), id="AMSGD"),
    pytest.param(AMAdamW, dict(lr=1e-2, weight_decay=0.05), id="AMAdamW"),
])
def test_the_amm_steps_do_not_depend_on_the_schedule(monkeypatch, variant, cls, kwargs):
    monkeypatch.setenv("AMM_CUDA_STEP", variant)
    results = {}
    for schedule in SCHEDULES:
        monkeypatch.setenv("AMM_SIM_SCHEDULE", schedule)
        results[schedule] = run(_cuda_sim.NAME, cls, kwargs, SHAPES, torch.float32, _seed("schedules", cls.__name__),
                                steps=3, lrs=[0.05, 0.02], wds=[0.0, 0.01])
    for schedule in SCHEDULES[1:]:
        assert_identical(results[schedule], results[SCHEDULES[0]], f"{schedule} vs {SCHEDULES[0]}")


def test_rllc_does_not_depend_on_the_schedule(monkeypatch):
    results = {}
    for schedule in SCHEDULES:
        monkeypatch.setenv("AMM_SIM_SCHEDULE", schedule)
        results[schedule] = run_rllc(_cuda_sim.NAME, "cpu", "M(0.9)+M(0.8)+M(0.7)", torch.float32,
                                     _seed("rllc-schedules"), steps=3, shapes=SHAPES, lrs=[0.01, 0.02])
    for schedule in SCHEDULES[1:]:
        assert_close_runs(results[schedule], results[SCHEDULES[0]], torch.float32, f"{schedule} vs {SCHEDULES[0]}",
                          exact=True)

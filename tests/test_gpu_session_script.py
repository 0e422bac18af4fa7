"""bench/gpu_session.sh, the one device call a GPU session gets, checked here without a GPU: a part
runs and reports its status, an unknown part fails the run, a part that does not fit the budget is
skipped and says so, and what comes back is at most 8 plain files with names the device tool accepts
(its README: letters, digits, '.', '_' and '-'). Only the cheap "variants" part runs (it exits at
once without CUDA); each call still imports torch a few times, about 15 s."""
import os
import re
import shutil
import subprocess
import sys
import tarfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from _triton import interpreter_unusable

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "gpu_session.sh"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def session(tmp_path, budget, *parts):
    out = tmp_path / "out"
    env = {"PATH": "/usr/bin:/bin", "OUT": str(out), "PYTHON": sys.executable, "AMM_GPU_BUDGET_S": str(budget),
           "HOME": str(tmp_path)}
    proc = subprocess.run(["bash", str(SCRIPT), *parts], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    return proc, out, (out / "session.log").read_text()


def test_parts_report_and_results_come_back_as_few_plain_files(tmp_path):
    proc, out, log = session(tmp_path, 300, "variants", "no_such_part")
    assert proc.returncode == 1, proc.stdout + proc.stderr  # the unknown part fails the run
    assert "== part variants rc=0" in log
    assert "== part no_such_part: unknown" in log
    assert "== unfinished" not in log
    files = sorted(p for p in out.rglob("*") if p.is_file())
    assert 0 < len(files) <= 8, files
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", p.name) for p in files), files
    assert {"session.log", "results.tgz"} <= {p.name for p in files}
    with tarfile.open(out / "results.tgz") as tar:
        assert all(not m.name.startswith("/") for m in tar.getmembers())


def test_a_part_that_does_not_fit_the_budget_is_skipped(tmp_path):
    proc, _, log = session(tmp_path, 30, "variants")  # 30 s less the 15 s reserve: under a part's 20 s minimum
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert re.search(r"== part variants: skipped, \d+ s of the budget left", log), log
    assert "== part variants (limit" not in log
    assert "== unfinished: variants (next: AMM_GPU_BUDGET_S=<device time left - 60> OUT=$OUT bash " \
           "bench/gpu_session.sh variants)" in log, log


def test_the_sanitize_part_fails_without_compute_sanitizer_and_its_script_without_cuda(tmp_path):
    """The part checks nothing here (no compute-sanitizer on PATH): it fails and says why, never passes
    silently; bench/sanitize_step.py imports and refuses a machine without CUDA."""
    if shutil.which("compute-sanitizer") or list(Path("/usr/local").glob("cuda*/bin/compute-sanitizer")):
        pytest.skip("compute-sanitizer is installed here")
    proc, _, log = session(tmp_path, 300, "sanitize")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "compute-sanitizer not found: nothing checked" in log and "== part sanitize rc=1" in log, log
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "sanitize_step.py")], cwd=ROOT, capture_output=True,
                         text=True, timeout=120, env={"PATH": "/usr/bin:/bin", "CUDA_VISIBLE_DEVICES": "", "HOME": "/tmp"})
    assert run.returncode == 1 and "sanitize_step: no CUDA device" in run.stdout, run.stdout + run.stderr


def _selection(name):
    """The node ids bench/gpu_session.sh's pytest selection NAME (CUDA_TESTS / TRITON_TESTS) collects here."""
    expr = re.search(rf'^{name}="([^"]+)"$', SCRIPT.read_text(), re.M).group(1)
    env = {"PATH": "/usr/bin:/bin", "AMM_NO_CUDA_SIM": "1", "HOME": "/tmp"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "tests", "--collect-only", "-q", "-p", "no:cacheprovider",
                           "-k", expr], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return {line for line in proc.stdout.splitlines() if "::" in line}


def test_the_gpu_test_parts_select_the_gpu_tests_once():
    """Each GPU-only test file (or GPU case) is in one part, not both (a module fixture such as
    test_distributed's two spawned ranks would run twice), and the CPU-only files stay out (CI runs them)."""
    unusable = interpreter_unusable()  # without a GPU the triton test files need the interpreter
    if unusable:
        pytest.skip(unusable)
    cuda, triton = _selection("CUDA_TESTS"), _selection("TRITON_TESTS")
    assert not cuda & triton, sorted(cuda & triton)[:5]
    files = lambda ids: {i.split("::")[0].removeprefix("tests/") for i in ids}  # noqa: E731
    assert {"test_cuda_graphs.py", "test_cuda_persistent.py", "test_distributed.py", "test_rllc_kernels.py",
            "test_compiled_kernels.py", "test_no_host_sync.py"} <= files(cuda), files(cuda)
    assert {"test_triton_backend.py", "test_triton_rllc.py"} <= files(triton), files(triton)
    for cpu_only in ("test_amp.py", "test_compile.py", "test_examples.py", "test_bench_smoke.py"):
        assert cpu_only not in files(cuda) | files(triton)
    assert not any("[cpu" in i or "-cpu" in i or "cuda_sim" in i for i in cuda), "CPU-backend cases in the GPU part"


# The build part, against a stand-in python (no compiler runs): pip's answer decides whether it falls back.
_STUB_PYTHON = """#!/bin/sh
case "$*" in
  *"pip install"*) echo "$PIP_SAYS"; exit 1 ;;
  *"setup.py build_ext --inplace"*) echo "stub: built in place"; exit 0 ;;
  *) exit 0 ;;
esac
"""


@pytest.mark.parametrize("pip_says,falls_back", [
    ("error: invalid command 'bdist_wheel'", True),  # setuptools < 70.1 without wheel: nothing compiled
    ("FAILED: /tmp/build/ops_cuda.o", False),  # a compile error: not retried
])
def test_the_build_falls_back_to_an_in_place_build_only_when_pip_failed_before_compiling(tmp_path, pip_says,
                                                                                         falls_back):
    repo = tmp_path / "repo"  # a copy: the build part writes a stamp under build/
    (repo / "bench").mkdir(parents=True)
    shutil.copy(SCRIPT, repo / "bench" / SCRIPT.name)
    (repo / "setup.py").write_text("")
    stub = tmp_path / "python"
    stub.write_text(_STUB_PYTHON)
    stub.chmod(0o755)
    out = tmp_path / "out"
    env = {"PATH": "/usr/bin:/bin", "OUT": str(out), "PYTHON": str(stub), "AMM_GPU_BUDGET_S": "300",
           "HOME": str(tmp_path), "PIP_SAYS": pip_says}
    proc = subprocess.run(["bash", str(repo / "bench" / SCRIPT.name), "build"], cwd=repo, env=env,
                          capture_output=True, text=True, timeout=120)
    build_log = (out / "build.log").read_text()
    log = (out / "session.log").read_text()
    assert ("stub: built in place" in build_log) == falls_back, build_log
    assert ("pip failed before compiling" in build_log) == falls_back, build_log
    assert ("== part build rc=0" in log) == falls_back, log
    assert proc.returncode == (0 if falls_back else 1), proc.stdout + proc.stderr


def test_the_build_is_redone_from_scratch_when_the_compiler_changes(tmp_path):
    """A second call with CC / CXX naming other compilers (what the part "errors" may call for) builds
    again, after removing the first build's _C.so (setup.py build_ext would keep it as up to date); the
    same compilers and sources skip the build."""
    repo = tmp_path / "repo"
    (repo / "bench").mkdir(parents=True)
    (repo / "amm_kernels").mkdir()
    shutil.copy(SCRIPT, repo / "bench" / SCRIPT.name)
    (repo / "setup.py").write_text("")
    stub = tmp_path / "python"
    stub.write_text('#!/bin/sh\ncase "$*" in *"pip install"*) echo "stub: pip built it";; esac\nexit 0\n')
    stub.chmod(0o755)
    old_so = repo / "amm_kernels" / "_C.stub.so"

    def build(cxx):
        out = tmp_path / f"out_{cxx}_{len(list(tmp_path.iterdir()))}"
        env = {"PATH": "/usr/bin:/bin", "OUT": str(out), "PYTHON": str(stub), "AMM_GPU_BUDGET_S": "300",
               "HOME": str(tmp_path), "CXX": cxx}
        proc = subprocess.run(["bash", str(repo / "bench" / SCRIPT.name), "build"], cwd=repo, env=env,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return (out / "session.log").read_text()

    assert "stub: pip built it" in build("/opt/gcc/bin/g++")
    old_so.write_text("the first build's")
    assert "already built" in build("/opt/gcc/bin/g++") and old_so.exists()
    log = build("/usr/bin/g++")
    assert "stub: pip built it" in log and "already built" not in log and not old_so.exists(), log


def _probe_errors():
    """bench/probe_errors.py as a module (bench/ is not a package)."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import probe_errors
    finally:
        sys.path.pop(0)
    return probe_errors


def test_probe_errors_builds_its_cases_and_reads_the_toolchain_without_a_gpu():
    """bench/probe_errors.py (the part "errors") runs once, on the GPU: here, that every case's script is
    valid Python that imports what it uses, that the minimal extension builds and raises, that the
    toolchain facts read this build (readelf, nm and a process's mapped libraries), and that without
    CUDA it says so and exits 1 without running a case."""
    probe_errors = _probe_errors()
    for name, (env, code) in probe_errors.CASES.items():
        compile(probe_errors.script(code), name, "exec")
        assert all(isinstance(k, str) and isinstance(v, str) for k, v in env.items()), name
    assert probe_errors.FORCED_200 in probe_errors.CASES
    # NOTE [a minimal extension]: built here by the first compiler (as on the GPU, with $CXX's), its op
    # raises through torch.ops (this machine's toolchain is sound: the CPU suite raises from _C.so)
    cxx = probe_errors.compilers()
    assert cxx, "no C++ compiler found"
    verdict, out = probe_errors.run_case(*probe_errors.minimal_case(0, cxx[0]), 300, True)
    assert verdict == "raised" and "RAISED amm_probe: the minimal extension's TORCH_CHECK" in out, (verdict, out)
    facts = "\n".join(probe_errors.toolchain_facts())
    assert "readelf -d:" in facts and "libc10.so" in facts, facts
    assert "nm -D: (nothing)" in facts, facts  # _C.so defines no unwinder or C++ runtime of its own
    assert "libstdc++" in facts and "amm_kernels/_C" in facts, facts
    res = subprocess.run([sys.executable, str(ROOT / "bench" / "probe_errors.py")], cwd=ROOT, capture_output=True,
                         text=True, timeout=300, env={"PATH": "/usr/bin:/bin", "CUDA_VISIBLE_DEVICES": ""})
    assert res.returncode == 1 and "no CUDA device" in res.stdout, res.stdout + res.stderr


# the simulator's backend in a case's own process (its code may patch a class, and the glue reads its
# environment variables at the step)
_ON_THE_SIMULATOR = ("import sys; sys.path.insert(0, {tests!r}); import _cuda_sim\n"
                     "assert _cuda_sim.register() is None\n")


def _on_the_simulator(script: str) -> str:
    """A probe case's script with its CUDA tensors and backend put on the CUDA-on-CPU simulator."""
    for quote in "'\"":
        script = script.replace(f"device={quote}cuda{quote}", f"device={quote}cpu{quote}")
        script = script.replace(f"backend={quote}cuda{quote}", f"backend={quote}cuda_sim{quote}")
    return _ON_THE_SIMULATOR.format(tests=str(ROOT / "tests")) + script


def test_each_probe_case_of_the_cuda_glue_raises_the_glues_error_on_the_simulator():
    """bench/probe_errors.py counts a case as "raised" on any RuntimeError, TypeError or ValueError: a case
    whose own Python broke (a patch that no longer fits the method it replaces) would pass on the GPU
    without reaching the check it names. Each CUDA case, run on the simulator (the same glue), must
    raise the glue's RuntimeError ("amm_kernels (CUDA): ...") and nothing else."""
    import _cuda_sim
    _cuda_sim.ensure()
    probe_errors = _probe_errors()
    cases = {name: case for name, case in probe_errors.CASES.items() if name.startswith(("CUDA", "the test"))}
    assert len(cases) >= 7 and probe_errors.FORCED_200 in cases, sorted(cases)

    def run(item):
        name, (env, code) = item
        proc = subprocess.run([sys.executable, "-c", _on_the_simulator(probe_errors.script(code))], cwd=ROOT,
                              env={**os.environ, **env}, capture_output=True, text=True, timeout=300)
        return name, proc.returncode, proc.stdout + proc.stderr

    with ThreadPoolExecutor(max_workers=2) as pool:
        for name, rc, out in pool.map(run, cases.items()):
            raised = [ln for ln in out.splitlines() if ln.startswith(("RAISED", "NOT RAISED"))]
            assert rc == 0 and raised and raised[-1].startswith(probe_errors.GLUE_ERROR), \
                (name, rc, out[-2000:])


def test_a_cuda_gdb_stopped_at_its_time_still_returns_the_backtrace_it_printed(tmp_path, monkeypatch):
    """bench/probe_errors.py: cuda-gdb reading torch's symbols can outlast its share of the part; what it
    printed before (the first backtrace, before it reads any symbols) still comes back. A stand-in
    cuda-gdb prints a frame, then hangs."""
    fake = tmp_path / "cuda-gdb"
    fake.write_text("#!/bin/sh\necho 'Thread 1 \"python\" received signal SIGSEGV, Segmentation fault.'\n"
                    "echo '#0  0x00007f in __cxa_throw () from libstdc++.so.6'\nexec sleep 60\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    probe_errors = _probe_errors()
    env, code = probe_errors.CASES[probe_errors.FORCED_200]
    out = probe_errors.gdb_backtrace(env, code, 3)
    assert "cuda-gdb stopped at 3 s" in out and "#0  0x00007f in __cxa_throw ()" in out and "SIGSEGV" in out, out

"""bench/gpu_session.sh, the one device call a GPU session gets, checked here without a GPU: a part
runs and reports its status, an unknown part fails the run, a part that does not fit the budget is
skipped and says so, and what comes back is at most 8 plain files with names the device tool accepts
(its README: letters, digits, '.', '_' and '-'). Only the cheap "variants" part runs (it exits at
once without CUDA); each call still imports torch a few times, about 15 s."""
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

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

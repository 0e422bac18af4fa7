"""tests/conftest.py's watchdog (NOTE [test watchdog]): a test that hangs fails, named, with its stack,
and the run goes on; with one process, the run ends there instead of hanging."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

HANGS = '''
import time

def test_before():
    pass

def test_hangs_in_sleep():
    time.sleep(600)

def test_after():
    pass
'''


def run_pytest(tmp_path, *args):
    shutil.copy(Path(__file__).with_name("conftest.py"), tmp_path / "conftest.py")
    (tmp_path / "test_hang.py").write_text(HANGS)
    env = dict(os.environ, AMM_TEST_TIMEOUT_S="3")
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args, "test_hang.py"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)


def test_a_hanging_test_fails_with_its_stack_and_the_others_run(tmp_path):
    pytest.importorskip("xdist")
    res = run_pytest(tmp_path, "-n", "2")
    out = res.stdout + res.stderr
    assert res.returncode == 1, out
    assert "crashed while running 'test_hang.py::test_hangs_in_sleep'" in out, out
    assert "in test_hangs_in_sleep" in out, out  # the stack the watchdog wrote
    assert "1 failed, 2 passed" in out, out


def test_in_one_process_the_run_ends_with_the_stack(tmp_path):
    res = run_pytest(tmp_path, "-p", "no:xdist")
    out = res.stdout + res.stderr
    assert res.returncode != 0, out
    assert "Timeout (0:00:03)!" in out and "in test_hangs_in_sleep" in out, out

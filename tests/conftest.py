"""Two settings for the whole suite: each pytest-xdist worker's share of the cores (NOTE [threads per
worker], below), and a watchdog for every test: one that runs past AMM_TEST_TIMEOUT_S (default 1500 s;
0 turns it off) ends its process with every thread's stack, instead of hanging the run.

NOTE [test watchdog]: a CI run (d3e0800) stopped printing at 96% of the suite and was killed at its 90
minutes; the suite takes ~12 on that machine. It printed no clue where (the likeliest place, found
later: NOTE [torchrun workers] in tests/test_examples.py). With this file a hang becomes a failure that
names its test. Under pytest-xdist the worker's end is reported as "worker 'gwN' crashed while running
'<test>'", the test fails and a new worker takes the rest; in one process the run ends there.
faulthandler's timer runs in a C thread of its own, so it fires even when the hang holds the GIL (a C++
destructor, a collective that never completes). The stacks go to a copy
of the process's stderr made before pytest captures it (the capture is lost when the process ends).
The limit is above every subprocess timeout in the suite (the longest: 1200 s), so those report first.
"""
import faulthandler
import os
import sys

import pytest

LIMIT_S = float(os.environ.get("AMM_TEST_TIMEOUT_S", "1500"))
_stacks_to = None


def pytest_configure(config):
    global _stacks_to
    if LIMIT_S > 0:
        _stacks_to = os.fdopen(os.dup(sys.stderr.fileno()), "w")
    _share_the_cores()


# NOTE [threads per worker]: torch sizes its CPU thread pool for the whole machine, in every process. Under
# pytest-xdist each worker did so: 2 workers x 2 threads on 2 cores, and the CPU tests ran at half speed
# (test_pinv.py and test_compiled_kernels.py: 132 s with -n 2 as they were, 70 s with one thread a worker,
# 2026-12-01). So a worker takes its share of the cores, and hands it to the programs it starts (bench
# scripts, torchrun, the AddressSanitizer run) through OMP_NUM_THREADS. An OMP_NUM_THREADS set by the user
# is left as it is, and one process (no -n) keeps torch's default. The CPU kernels' parallel paths are
# still run: the tests that compare thread counts set theirs (test_compiled_kernels.py, test_rllc_kernels.py).
def _share_the_cores():
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0") or 0)
    if workers < 1 or "OMP_NUM_THREADS" in os.environ:
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    share = max(1, cores // workers)
    os.environ["OMP_NUM_THREADS"] = str(share)
    import torch

    torch.set_num_threads(share)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    # setup, call and teardown: a module fixture's work (test_distributed's spawn) runs in its first test's setup
    if _stacks_to is None:
        yield
        return
    faulthandler.dump_traceback_later(LIMIT_S, exit=True, file=_stacks_to)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()


def pytest_unconfigure(config):
    global _stacks_to
    if _stacks_to is not None:
        _stacks_to.close()
        _stacks_to = None

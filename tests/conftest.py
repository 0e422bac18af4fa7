"""A watchdog for every test: one that runs past AMM_TEST_TIMEOUT_S (default 1500 s; 0 turns it off) ends
its process with every thread's stack, instead of hanging the run.

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

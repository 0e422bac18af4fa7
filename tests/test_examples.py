"""examples/log_beta_tensorboard.py runs and logs beta at every step (issue 6: observability), with a
stand-in SummaryWriter that records the calls (tensorboard is not a dependency)."""
import importlib.util
import sys
import types
import warnings
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "log_beta_tensorboard.py"


class RecordingWriter:
    calls: list = []

    def __init__(self, logdir):
        self.logdir = logdir

    def add_scalar(self, tag, value, step):
        RecordingWriter.calls.append(("scalar", tag, value, step))

    def add_scalars(self, tag, values, step):
        RecordingWriter.calls.append(("scalars", tag, dict(values), step))

    def add_histogram(self, tag, values, step):
        RecordingWriter.calls.append(("histogram", tag, values.clone(), step))

    def close(self):
        pass


@pytest.fixture
def example(monkeypatch, tmp_path):
    RecordingWriter.calls = []
    fake = types.ModuleType("torch.utils.tensorboard")
    fake.SummaryWriter = RecordingWriter
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", fake)
    spec = importlib.util.spec_from_file_location("log_beta_tensorboard", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(sys, "argv", ["log_beta_tensorboard.py", "--logdir", str(tmp_path), "--steps", "20",
                                      "--log-every", "5"])
    return module


def test_tensorboard_example_logs_every_steps_betas(example, capsys):
    example.main()
    calls = RecordingWriter.calls
    losses = [c for c in calls if c[1] == "train/loss"]
    spreads = [c for c in calls if c[0] == "scalars" and c[1] == "amm/beta"]
    hists = [c for c in calls if c[0] == "histogram"]
    assert [c[3] for c in losses] == list(range(1, 21))
    # AMAdamW's default scope: one beta per parameter tensor (4 in the example's model)
    assert [c[3] for c in spreads] == list(range(1, 21)) and [c[3] for c in hists] == list(range(1, 21))
    for (_, _, spread, _), (_, _, per_tensor, _) in zip(spreads, hists):
        assert per_tensor.shape == (4,)
        assert spread == {"mean": float(per_tensor.mean()), "min": float(per_tensor.min()),
                          "max": float(per_tensor.max())}
        assert 0.0 <= spread["min"] <= spread["mean"] <= spread["max"] <= 0.9 + 1e-6
    assert spreads[0][2]["min"] == pytest.approx(0.9)  # the first step's beta is beta_max
    assert "last betas" in capsys.readouterr().out


TORCHRUN_EXAMPLE = EXAMPLE.parent / "torchrun_ddp_fsdp.py"


def _end_tagged(tag):
    """SIGKILL every process whose environment carries AMM_TEST_RUN_TAG=tag (Linux /proc)."""
    import os
    import signal

    mark = f"AMM_TEST_RUN_TAG={tag}".encode()
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            if mark in (entry / "environ").read_bytes().split(b"\0"):
                os.kill(int(entry.name), signal.SIGKILL)
        except (OSError, ValueError):
            pass  # gone, or not ours to read


def run_bounded(cmd, timeout, env=None):
    """cmd's (returncode, stdout, stderr, hung): cmd and every process it starts, wherever they run, end
    within `timeout` + ~30 s.

    NOTE [torchrun workers]: torchrun starts each worker in a session of its own (torch's
    SubprocessHandler: start_new_session), so killing torchrun's process group leaves a worker that hangs
    at exit (NOTE [gloo teardown]) alive; with the output read from pipes, which that worker holds open,
    the wait for their end then never returned. Here the output goes to files, torchrun is asked to stop
    (SIGTERM: it ends its workers), and then whatever is left of it and of what it started is found by a
    tag in the environment, which every descendant inherits, and killed."""
    import os
    import subprocess
    import tempfile
    import uuid

    tag = uuid.uuid4().hex
    env = dict(os.environ if env is None else env, AMM_TEST_RUN_TAG=tag)
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=err, text=True)
        try:
            proc.wait(timeout=timeout)
            hung = False
        except subprocess.TimeoutExpired:
            hung = True
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                pass
        _end_tagged(tag)  # cmd itself if still there, and a worker left behind, on either path
        proc.wait()
        out.seek(0)
        err.seek(0)
        return proc.returncode, out.read(), err.read(), hung


def test_run_bounded_ends_a_child_in_a_session_of_its_own():
    """A parent that hangs, with a child in its own session that holds the output open and hangs too (as
    torchrun and a worker hung at exit): run_bounded returns in time, with what both printed, and the
    child is gone."""
    import subprocess
    import time

    child = "import time; print('child up', flush=True); time.sleep(600)"
    parent = (f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {child!r}], "
              "start_new_session=True); time.sleep(1); print('parent up', flush=True); time.sleep(600)")
    start = time.monotonic()
    code, out, err, hung = run_bounded([sys.executable, "-c", parent], timeout=5)
    assert hung and time.monotonic() - start < 60, (code, out, err)
    assert "parent up" in out and "child up" in out, (out, err)
    left = subprocess.run(["pgrep", "-f", "child up"], capture_output=True, text=True).stdout.split()
    assert not left, f"the child is still running: {left}"


def _torchrun(mode, *args):
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    import os

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(TORCHRUN_EXAMPLE),
           "--mode", mode, "--cpu", *(args or ("--steps", "6"))]
    returncode, stdout, stderr, hung = run_bounded(cmd, timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert "2 ranks done" in stdout.splitlines(), f"hung: {hung}\n" + stdout + stderr[-3000:]
    # NOTE [gloo teardown]: on a loaded machine a rank may abort at exit, after every rank has finished (the
    # barrier before "2 ranks done"): "terminate called without an active exception", with no Python frame
    # left (torch's gloo threads at interpreter shutdown, not ours; about one fsdp launch in 16). A rank also
    # hung at exit, in 4 ddp launches of 16: DDP's reducer freed the group with the GIL held (gdb), which the
    # example now avoids (none in 20). An abort or a hang after the run finished is let through, reported as
    # a warning; anything before that line fails, with the output. Before run_bounded, such a hang held the
    # test for ever (NOTE [torchrun workers]): the likeliest cause of the CI run on d3e0800 that stopped at 96%.
    if hung:
        warnings.warn(f"torchrun {mode}: a rank hung at exit after finishing (NOTE [gloo teardown])")
    elif returncode != 0:
        assert "terminate called without an active exception" in stderr, stdout + stderr[-3000:]
        warnings.warn(f"torchrun {mode}: a rank aborted at exit after finishing (NOTE [gloo teardown])")
    return [line for line in stdout.splitlines() if line.startswith("step")]


def test_torchrun_example_fsdp_matches_ddp_on_cpu():
    """examples/torchrun_ddp_fsdp.py on 2 gloo ranks: FSDP2 (each rank a shard; beta's sums all-reduced)
    prints the same losses and betas as DDP (each rank the whole model), step for step."""
    fsdp, ddp = _torchrun("fsdp"), _torchrun("ddp")
    assert len(fsdp) == 2 and fsdp == ddp, (fsdp, ddp)  # steps 0 and 5


def test_torchrun_example_resumes_from_its_checkpoint_as_the_run_without_one(tmp_path):
    """The example's checkpoint (torch.distributed.checkpoint, flattened as torchtitan saves it) after
    step 13 of 16, loaded by a fresh launch: its last step prints the loss and beta of the run without
    a checkpoint (NOTE [checkpoint carriers]: the scope state resumes with the parameters and moments).
    Step 15 is one where a tensor's beta leaves beta_max, so the printed mean moves with it."""
    folder = str(tmp_path / "ckpt")
    straight = _torchrun("fsdp", "--steps", "16")
    _torchrun("fsdp", "--steps", "13", "--save", folder)
    resumed = _torchrun("fsdp", "--steps", "16", "--load", folder)
    assert len(straight) == 4 and resumed == straight[3:], (straight, resumed)  # step 15
    assert not straight[3].endswith("beta mean 0.9000"), straight

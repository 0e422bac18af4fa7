"""Smoke test of the demo (python -m amm_kernels.demo --quick): runs on CPU in a few seconds."""
import math

import pytest
import torch

from amm_kernels import demo


@pytest.fixture
def keep_torch_threads():
    """demo.main() sets torch's thread count; put it back for the tests that follow."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_quick_demo_runs_and_reports(tmp_path, capsys, keep_torch_threads):
    out = tmp_path / "demo.png"
    results = demo.main(["--quick", "--device", "cpu", "--out", str(out)])

    assert out.is_file() and out.stat().st_size > 0

    # The table: "optimizer  train loss  val loss  wall time", one row per optimizer.
    rows = {}
    for line in capsys.readouterr().out.splitlines():
        fields = line.split()
        if fields and fields[0] in ("AdamW", "AMAdamW"):
            rows[fields[0]] = fields
    assert set(rows) == {"AdamW", "AMAdamW"}
    for fields in rows.values():
        assert math.isfinite(float(fields[1])) and math.isfinite(float(fields[2])), fields

    assert [r.name for r in results] == ["AdamW", "AMAdamW"]
    for r in results:
        assert r.losses and all(math.isfinite(x) for x in r.losses)
        assert all(math.isfinite(v) for _, v in r.val_curve)
    betas = results[1].betas  # per step, one beta per parameter tensor (AMAdamW's default scope)
    assert betas is not None and len(betas) == len(results[1].losses)
    quick = demo.parse_args(["--quick"])
    n_tensors = len(list(demo.ByteGPT(quick.context, quick.d_model, quick.layers, quick.heads).parameters()))
    assert all(len(step) == n_tensors for step in betas)
    assert all(0.0 <= b <= 0.9 + 1e-6 for step in betas for b in step)  # clamped to [beta_min, beta_max]

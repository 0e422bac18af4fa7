"""Smoke test of the benchmark scripts in bench/: each main() runs with --quick on tiny sizes into a
temporary directory, and its result files must exist and hold finite numbers. The sklearn-based ones
skip cleanly when scikit-learn is not installed."""
from __future__ import annotations

import csv
import importlib
import inspect
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "bench"

SCRIPTS = [  # (module, files it must write, a numeric CSV column that must be finite in every "ok" row, needs sklearn)
    ("throughput", ["throughput_cpu.csv", "throughput_cpu.json", "throughput_cpu.png"], "ms_per_step", False),
    ("bench_kernel_breakdown", ["kernel_breakdown_cpu.csv", "kernel_breakdown_cpu.json"], "ms_per_step", False),
    ("train_step_overhead", ["train_step_overhead_cpu.csv", "train_step_overhead_cpu.json"], "ms_per_train_step", False),
    ("conv_quadratic", ["conv_quadratic.csv", "conv_quadratic.json", "conv_quadratic.png"], "final_gap", False),
    ("conv_logistic", ["conv_logistic.csv", "conv_logistic.json", "conv_logistic.png"], "final_loss", True),
    ("conv_digits", ["conv_digits.csv", "conv_digits.json", "conv_digits.png"], "train_loss_final_mean", True),
    ("conv_lm", ["conv_lm.csv", "conv_lm.json", "conv_lm.png"], "val_loss_final_mean", False),
    ("conv_rllc", ["conv_rllc.csv", "conv_rllc.json", "conv_rllc.png"], "score", False),  # digits part needs sklearn
    # GPU-only in earnest; --quick runs three variants' children in Triton's interpreter (plumbing only)
    ("bench_triton_variants", ["triton_variants_cpu.csv", "triton_variants_cpu.json"], "step_ms", False),
    ("step_memory", ["step_memory_cpu.csv", "step_memory_cpu.json"], "step_peak_per_param_bytes", False),
]


@pytest.fixture(scope="module", autouse=True)
def bench_on_path():
    sys.path.insert(0, str(BENCH))
    yield
    sys.path.remove(str(BENCH))
    # bench/common.py turns on flush-to-zero for the process when it is imported; the tests that run
    # after these must see torch's default (off), as they do when run alone
    torch.set_flush_denormal(False)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cpu_step_quick(dtype, tmp_path):
    """bench_cpu_step.py on a small model: a row per case, finite; on bfloat16 AMAdamW with float32 state too."""
    import amm_kernels

    out = tmp_path / "cpu_step.csv"
    importlib.import_module("bench_cpu_step").main(["--numel", "100000", "--repeats", "4", "--threads", "1",
                                                    "--dtype", dtype, "--csv", str(out)])
    with open(out, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert rows and all(math.isfinite(float(r["ms_per_step"])) and r["dtype"] == dtype for r in rows)
    names = {r["optimizer"] for r in rows}
    assert {"torch AdamW fused", "AMAdamW backend=torch"} <= names
    if "cpu" in amm_kernels.available_backends("cpu"):
        assert ("AMAdamW backend=cpu f32 state" in names) == (dtype == "bfloat16")


@pytest.mark.parametrize("module,files,column,needs_sklearn", SCRIPTS, ids=[s[0] for s in SCRIPTS])
def test_script_quick(module, files, column, needs_sklearn, tmp_path, monkeypatch):
    if needs_sklearn:
        pytest.importorskip("sklearn", reason="scikit-learn is not installed (pip install scikit-learn)")
    if module == "bench_triton_variants":
        from _triton import interpreter_unusable

        if interpreter_unusable():
            pytest.skip(interpreter_unusable())
    monkeypatch.setenv("TQDM_DISABLE", "1")
    argv = ["--quick", "--out-dir", str(tmp_path)]
    if module in ("throughput", "bench_kernel_breakdown", "train_step_overhead", "conv_lm", "step_memory"):
        argv += ["--device", "cpu"]
    importlib.import_module(module).main(argv)
    for name in files:
        assert (tmp_path / name).is_file() and (tmp_path / name).stat().st_size > 0, name
    rows = list(csv.DictReader(open(tmp_path / files[0])))
    assert rows, f"{files[0]} has no rows"
    ok = [r for r in rows if r.get("status", "ok") == "ok"]
    assert ok, f"{files[0]}: no row ran"
    for r in ok:
        assert math.isfinite(float(r[column])), (column, r)
    if module == "bench_triton_variants":  # each variant patches its own process: each must have run
        assert {r["variant"] for r in rows} == {"base", "iters4", "approx_math"}, rows
    data = json.load(open(tmp_path / files[1]))
    assert data["environment"]["device"] and data["rows"]


def test_throughput_ratios_name_their_baseline(tmp_path, monkeypatch):
    """Each row's ratio divides by its family's baseline in the same size and layout: AMAdamW by fused
    AdamW at the same weight decay, AMSGD by fused SGD (issue 3's bars), and --only keeps those rows."""
    monkeypatch.setenv("TQDM_DISABLE", "1")
    rows = importlib.import_module("throughput").main(
        ["--quick", "--device", "cpu", "--layouts", "model", "--only", "AMAdamW[,AMSGD[", "--out-dir", str(tmp_path)])
    by_name = {r["optimizer"]: r for r in rows}
    assert {r["layout"] for r in rows} == {"model"}
    assert "SGD-momentum fused" in by_name and "AdamW fused wd=0" in by_name and "AdamW fused" in by_name
    assert not any(name.startswith("RLLC") for name in by_name)
    expected = {"adamw": "AdamW fused", "adamw0": "AdamW fused wd=0", "sgd": "SGD-momentum fused"}
    for r in rows:
        assert r["baseline"] == expected[r["family"]], r
        base = by_name[r["baseline"]]["ms_per_step"]
        assert math.isclose(r["ratio_to_baseline"], r["ms_per_step"] / base, rel_tol=1e-2, abs_tol=1e-3), r
    assert any(r["family"] == "adamw0" and r["optimizer"].startswith("AMAdamW") for r in rows) or \
        "cpu" not in importlib.import_module("amm_kernels").available_backends("cpu")


def test_each_timed_call_starts_from_flushed_caches(monkeypatch):
    """NOTE [cold caches, host time] in bench/common.py: time_fn flushes the caches before every timed
    call (not before a warm-up call), with a buffer larger than the last-level cache; on CUDA also
    synchronising after it, which needs a GPU (the order of those calls is read, not run, here)."""
    common = importlib.import_module("common")
    calls = []
    monkeypatch.setattr(common, "flush_caches", lambda device: calls.append("flush"))
    common.time_fn(lambda: calls.append("fn"), torch.device("cpu"), warmup=2, repeats=3)
    assert calls == ["fn", "fn"] + ["flush", "fn"] * 3
    monkeypatch.undo()
    common.flush_caches(torch.device("cpu"))
    llc = common.last_level_cache_bytes()
    assert common._FLUSH_BUFFERS["cpu"].nbytes >= max(64 << 20, 2 * (llc or 0))
    source = inspect.getsource(common.time_fn)
    cuda_loop = source[source.index("for start, end in events"):]
    assert cuda_loop.index("flush_caches") < cuda_loop.index("torch.cuda.synchronize()") < cuda_loop.index("start.record()")


def test_throughput_replot_draws_the_png_from_its_json(tmp_path, monkeypatch):
    """--replot measures nothing: it draws the PNG again from a results JSON (bench/results' GPU plots were
    redrawn so, with a colour per optimizer)."""
    monkeypatch.setenv("TQDM_DISABLE", "1")
    throughput = importlib.import_module("throughput")
    throughput.main(["--quick", "--device", "cpu", "--layouts", "flat", "--only", "AMSGD[", "--out-dir", str(tmp_path)])
    (json_path,) = tmp_path.glob("*.json")
    png = json_path.with_suffix(".png")
    png.unlink()
    rows = throughput.main(["--replot", str(json_path)])
    assert png.is_file() and png.stat().st_size > 0
    assert rows == json.load(open(json_path))["rows"]


def test_triton_occupancy_counts_programs_from_the_registers(tmp_path):
    """bench/triton_occupancy.py compiles a pass kernel for sm_90 without a GPU and counts the programs an
    SM holds from its registers: checked here against sm_90's limits for what it read."""
    triton = pytest.importorskip("triton")

    if not os.access(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump", os.X_OK):
        pytest.skip("this triton carries no cuobjdump")
    from _triton import interpreter_unusable

    if interpreter_unusable():  # the launches are recorded in the interpreter (as test_triton_gpu_compile's)
        pytest.skip(interpreter_unusable())
    # its own process: the kernels must be compiled ones, and this one may have imported them interpreted
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, str(BENCH / "triton_occupancy.py"), "--configs", "1024x4x1,1024x4x2",
                          "--kernels", "amsgd_reduce_kernel", "--out-dir", str(tmp_path)], env=env,
                         capture_output=True, text=True, timeout=600)
    if "cannot record launches with triton" in out.stderr:  # an older triton's interpreter (3.5)
        pytest.skip(out.stderr.strip().splitlines()[-1])
    assert out.returncode == 0, out.stdout + out.stderr[-3000:]
    rows = list(csv.DictReader(open(tmp_path / f"triton_occupancy_sm90_triton{triton.__version__}.csv")))
    assert [(r["BLOCK"], r["ITERS"]) for r in rows] == [("1024", "1"), ("1024", "2")], rows
    for r in rows:
        regs, programs = int(r["registers"]), int(r["programs_per_sm"])
        assert 16 <= regs <= 255
        per_thread = -(-regs // 8) * 8
        assert programs * 128 * per_thread <= 65536 < (programs + 1) * 128 * per_thread or programs == 16
        assert float(r["kib_in_flight_per_sm"]) == programs * 1024 * 8 / 1024


def test_triton_variants_share_a_cache_but_approx_math_and_a_budget_among_them(tmp_path, monkeypatch):
    """bench_triton_variants.py's plumbing, its children stood in for: the variants that change a constexpr
    or a compile option share one Triton cache (in its key), approx_math gets its own (its patch is not);
    --budget caps each child's timeout at what is left and does not start a variant under 20 s."""
    variants = importlib.import_module("bench_triton_variants")
    calls = []

    def fake_run(cmd, env, timeout, **kw):
        variant = cmd[cmd.index("--run") + 1]
        calls.append((variant, env["TRITON_CACHE_DIR"], timeout))
        rows = "".join("ROW " + json.dumps(dict(variant=variant, optimizer=o, step_ms=1.0, pass1_ms=0.5, pass2_ms=0.4,
                                                 pass1_of_copy=0.9, pass2_of_copy=0.9, finalize_ms=0.01)) + "\n"
                       for o in variants.OPTIMIZERS)
        return subprocess.CompletedProcess(cmd, 0, rows, "")

    monkeypatch.setattr(variants.subprocess, "run", fake_run)
    argv = ["--quick", "--out-dir", str(tmp_path), "--timeout", "50"]
    assert variants.main(argv + ["--variants", "base,iters4,approx_math,block2048,base_again", "--budget", "600"]) == 0
    cache = {v: c for v, c, _ in calls}
    assert cache["base"] == cache["iters4"] == cache["block2048"] == cache["base_again"] != cache["approx_math"], calls
    assert variants.VARIANTS[-1] == "base_again"  # the rerun comes last, after every variant it is compared with
    assert all(t == 50 for _, _, t in calls), calls
    calls.clear()
    assert variants.main(argv + ["--variants", "base", "--budget", "30"]) == 0
    assert 20 <= calls[0][2] <= 30, calls  # what is left of 30 s, under --timeout
    calls.clear()
    assert variants.main(argv + ["--variants", "base,iters4", "--budget", "19"]) == 1  # nothing started
    assert calls == []


def test_kernel_breakdown_only_keeps_the_named_steps(tmp_path, monkeypatch):
    """--only (gpu_session.sh's chunks part: '[cuda]', the steps a chunk size changes) measures those
    alone, no baseline; a filter that matches nothing measures nothing and says what there is."""
    monkeypatch.setenv("TQDM_DISABLE", "1")
    breakdown = importlib.import_module("bench_kernel_breakdown")
    argv = ["--quick", "--device", "cpu", "--out-dir", str(tmp_path)]
    rows = breakdown.main(argv + ["--only", "AMSGD["])
    assert rows and {r["optimizer"] for r in rows} == {n for n, _, _ in breakdown.cases(torch.device("cpu"))
                                                       if n.startswith("AMSGD[")}, rows
    assert breakdown.main(argv + ["--only", "[no such backend]"]) == []

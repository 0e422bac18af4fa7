"""Every Triton kernel launch of a step compiles to a cubin for sm_80 and sm_90 (no GPU needed):
tests/_triton_gpu_compile.py records the launches of representative steps in the interpreter, then
compiles each distinct specialization in compiled mode, in a fresh process each (the interpreter and
the compiler cannot share one: NOTE [import order] in amm_kernels/triton_backend.py).

The compile runs twice: with the triton installed here, and with the triton of the GPU machine the
device tool lends (3.6), installed beside it by .ci/run and named by AMM_TRITON_GPU_MACHINE (a
directory to put first on PYTHONPATH). The two compilers differ in what they keep of our hints
(NOTE [vector access] in triton_kernels/tensor_table.py), so each must be checked."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from _triton import interpreter_unusable
from _triton_gpu_compile import CANNOT_RECORD

HERE = Path(__file__).resolve().parent
TOOL = str(HERE / "_triton_gpu_compile.py")
# The triton the GPU machine carries (/work/.library/device/README.md), installed by .ci/run.
GPU_MACHINE_TRITON = os.environ.get("AMM_TRITON_GPU_MACHINE")

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")


@pytest.fixture(scope="module")
def launches(tmp_path_factory):
    unusable = interpreter_unusable()  # the launches are recorded in the interpreter
    if unusable:
        pytest.skip(unusable)
    path = tmp_path_factory.mktemp("triton_launches") / "launches.json"
    env = dict(os.environ, TRITON_INTERPRET="1", TRITON_DEFAULT_FP_FUSION="1")
    rec = subprocess.run([sys.executable, TOOL, "record", str(path)], env=env, capture_output=True, text=True,
                         timeout=600)
    if rec.returncode == CANNOT_RECORD:  # an older triton's interpreter
        pytest.skip(rec.stdout.strip())
    assert rec.returncode == 0, rec.stdout + rec.stderr
    n = int(rec.stdout.split("recorded ")[1].split()[0])
    assert n >= 20, f"only {n} launches recorded: the workloads no longer reach every kernel"
    return path


def compile_and_check(launches, tmp_path, pythonpath_first=None, version=None):
    env = dict(os.environ, TRITON_DEFAULT_FP_FUSION="1")
    env.pop("TRITON_INTERPRET", None)
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")  # a real compile, not a cache hit
    if pythonpath_first:
        env["PYTHONPATH"] = os.pathsep.join([pythonpath_first, str(HERE.parent), env.get("PYTHONPATH", "")])
    out = subprocess.run([sys.executable, TOOL, "compile", str(launches)], env=env, capture_output=True, text=True,
                         timeout=900)
    assert out.returncode == 0, out.stdout + out.stderr[-3000:]
    assert "0 failures" in out.stdout
    if version is not None:
        assert f"(triton {version}" in out.stdout, out.stdout
    # NOTE [vector access] (triton_kernels/tensor_table.py): the AM and RLLC passes read (and pass 2
    # writes) whole aligned blocks with 16-byte instructions; without it every access was a 4-byte one.
    vectors = json.loads(out.stdout.split("vector accesses ")[1].splitlines()[0])
    for name in ("amsgd_reduce_kernel", "amadamw_reduce_kernel", "amsgd_update_kernel", "amadamw_update_kernel",
                 "rllc_reduce_kernel", "rllc_update_kernel"):
        loads, stores = vectors[name]
        assert loads > 0, f"{name}: no 16-byte loads in its sm_90 PTX"
        assert stores > 0 or "reduce" in name, f"{name}: no 16-byte stores in its sm_90 PTX"
    # NOTE [no fused multiply-add] (amm_kernels/triton_backend.py): each operation rounds as the reference's,
    # although TRITON_DEFAULT_FP_FUSION=1 above asks for contraction wherever a launch does not forbid it
    fmas = json.loads(out.stdout.split("fused multiply-adds ")[1].splitlines()[0])
    assert len(fmas) >= 6 and not any(fmas.values()), fmas
    # NOTE [IEEE division] (triton_kernels/am_math.py): float32 `/` and tl.sqrt compile to approximate
    # instructions (div.full.f32, sqrt.approx.ftz.f32), where the reference and the interpreter round exactly
    inexact = json.loads(out.stdout.split("inexact divisions ")[1].splitlines()[0])
    assert len(inexact) >= 6 and not any(inexact.values()), inexact
    # NOTE [negation] (triton_kernels/am_math.py): no float negation compiled as `0 - x` (triton 3.6 builds
    # unary minus so; +0 then stays +0 where the reference's -x is -0)
    from_zero = json.loads(out.stdout.split("subtractions from zero ")[1].splitlines()[0])
    assert len(from_zero) >= 6 and not any(from_zero.values()), from_zero
    # Next to no local memory (register spills, or arrays ptxas could not keep in registers) in what a GPU
    # runs: the launches were recorded at the GPU's BLOCK (at the interpreter's 4096 the AM-AdamW and RLLC
    # kernels took 255 registers and 16-3480-byte frames). Allowed: one word (8 bytes), which triton 3.6
    # spills once per program, not per element (seen: around a call in one finalize, and across the
    # update with grad scale and found_inf); and for RLLC with k >= 6, 32 bytes (k = 8's update: 255
    # registers, 16 bytes with triton 3.9, 24 with 3.6), as its CUDA kernels keep a scalar walk there
    # for the same pressure (NOTE [RLLC vectors] in csrc/cuda/rllc_kernels.cu).
    resources = json.loads(out.stdout.split("registers and stack ")[1].splitlines()[0])
    assert resources, "no resources read: this triton carries no cuobjdump (triton/backends/nvidia/bin)"
    assert {"amadamw_update_kernel", "rllc_update_kernel K=5", "rllc_reduce_kernel K=8"} <= set(resources), resources

    def allowed(key):
        return 32 if key.startswith("rllc") and "K=" in key and int(key.split("K=")[1]) >= 6 else 8

    spilled = {k: v for k, v in resources.items() if v[1] > allowed(k)}
    assert not spilled, f"stack frames (local memory) in sm_90 cubins, [registers, bytes]: {spilled}"
    # NOTE [pass-1 stages] (triton_kernels/reduce_kernels.py): a pass-1 span loop of STAGES > 1 copies its
    # next blocks' loads with cp.async (what bench_triton_variants' iters8_staged3 is for); the shipped
    # STAGES = 1 has none
    pipelined = json.loads(out.stdout.split("pipelined loads ")[1].splitlines()[0])
    for name in ("amsgd_reduce_kernel", "amadamw_reduce_kernel"):
        assert pipelined[f"{name} STAGES=1"] == 0 and pipelined[f"{name} STAGES=3"] > 0, pipelined


def test_every_launch_compiles_for_sm80_and_sm90(launches, tmp_path):
    compile_and_check(launches, tmp_path)


@pytest.mark.skipif(not GPU_MACHINE_TRITON, reason="AMM_TRITON_GPU_MACHINE is not set (.ci/run sets it)")
def test_every_launch_compiles_with_the_gpu_machines_triton(launches, tmp_path):
    compile_and_check(launches, tmp_path, pythonpath_first=GPU_MACHINE_TRITON, version="3.6")

"""csrc/cuda/tensor_plan.h, the CUDA launches' host-side planning, built with g++ alone (no torch, no
CUDA toolkit: the simulator's stubs of the CUDA runtime headers stand in for the toolkit's): many
scopes, the scope-contiguity contract, and a tensor too large for a grid.
The simulator tests (test_cuda_sim.py, test_compiled_kernels.py) run it inside whole steps."""
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def plan_check(tmp_path_factory):
    cxx = shutil.which("g++")
    if cxx is None:
        pytest.skip("g++ is not installed")
    exe = tmp_path_factory.mktemp("tensor_plan") / "tensor_plan_check"
    sim = ROOT / "tests" / "cuda_sim"
    subprocess.run([cxx, "-std=c++17", "-O1", "-Wall", "-Werror", f"-I{ROOT / 'csrc'}", f"-I{sim / 'include'}", f"-I{sim}",
                    str(ROOT / "tests" / "cpp" / "tensor_plan_check.cpp"), "-o", str(exe)], check=True)
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    return dict(line.split(" ", 1) for line in out.splitlines())


def test_one_scope_per_tensor_over_many_tensors(plan_check):
    # 20000 tensors of 7 elements: one block and one scope leader each, over several tables
    assert plan_check["many_tensors"] == "20000"
    assert plan_check["many_leaders"] == "20000"
    assert plan_check["many_blocks"] == "20000"


def test_a_scope_split_in_the_lists_is_refused(plan_check):
    assert plan_check["split_scope_throws"] == "yes"
    assert plan_check["contiguous_scopes_throw"] == "no"


def test_a_tensor_larger_than_a_grid_is_refused(plan_check):
    assert plan_check["huge_tensor_throws"] == "yes"  # 2^31 chunks: the block count would wrap
    assert plan_check["largest_tensor_throws"] == "no"  # 2^31 - 1 chunks still fit


def test_a_chunk_size_cuts_tensors_and_travels_in_the_table(plan_check):
    """NOTE [chunk size] in csrc/cuda/ops_cuda.cpp: 4 + 1 + 1 chunks of 4096 (a partial one, an exact one,
    an empty tensor's one); the default is 65536; sizes that are not a multiple of 4096 up to 65536 are refused."""
    assert plan_check["chunk_4096_blocks"] == "6"
    assert plan_check["chunk_4096_table"] == "4096"
    assert plan_check["default_chunk_table"] == "65536"
    assert plan_check["chunk_5000_throws"] == plan_check["chunk_0_throws"] == plan_check["chunk_131072_throws"] == "yes"


def test_a_table_holds_384_tensors_or_fewer_where_capped(plan_check):
    """NOTE [one launch per pass] in csrc/cuda/launchers.h: 4 x 384 + 1 tensors fill four tables and put
    one in a fifth, whose slots start after all of theirs; capped at 128 tensors (AMM_CUDA_TABLE_TENSORS),
    13 tables; a cap of 0 or over 384 is refused, a cap of 1 is one tensor a table."""
    assert plan_check["max_tensors"] == "384"
    assert plan_check["full_tables"] == "5"
    assert plan_check["full_last_tensors"] == "1"
    assert plan_check["full_last_slot_base"] == str(4 * 384)
    assert plan_check["capped_tables"] == "13"
    assert plan_check["capped_first_tensors"] == "128"
    assert plan_check["table_0_throws"] == plan_check["table_over_max_throws"] == "yes"
    assert plan_check["table_1_throws"] == "no"

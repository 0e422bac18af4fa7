"""csrc/cuda's kernels on tensors of more than 2^31 and 2^32 elements, through the CUDA-on-CPU simulator
(tests/cpp/huge_tensor_check.cpp, NOTE [lazy huge tensors] there). No other test reaches these sizes:
a step walks every element, and the simulator runs a 2^31-element step for hours. The program runs
pass 1 and pass 2 on a huge tensor's last chunks (element indices, byte offsets and RLLC's memory rows
past 2^31 or 2^32) and on a small tensor holding the same values: the slots and the lists must be the
same bits. A 32-bit index on the way reads or writes other elements (DIFFER) or crashes the program.
The planner's arithmetic at these sizes is tests/test_tensor_plan.py's; Triton's kernels take their
element offsets from int64 tables and widen program ids (checked by reading, not by a test)."""
import subprocess
from pathlib import Path

import _cuda_sim
import pytest

ROOT = Path(__file__).resolve().parents[1]
CASES = ["amsgd_bf16_past_2to31", "amadamw_bf16_past_2to31", "amadamw_f32_past_2to32", "rllc_bf16_k2_vector_rows",
         "rllc_f32_k3_scalar_rows"]
UNITS = ["cuda/amsgd_kernels.cu", "cuda/amadamw_kernels.cu", "cuda/rllc_kernels.cu"]


@pytest.fixture(scope="module")
def huge_check(tmp_path_factory):
    _cuda_sim.ensure()  # (or a skip with the reason: AMM_NO_CUDA_SIM=1, no compiler, not x86-64 Linux)
    sim_build = _cuda_sim.build_module()
    exe = tmp_path_factory.mktemp("huge_tensors") / "huge_tensor_check"
    sim_build.build_program(ROOT / "tests" / "cpp" / "huge_tensor_check.cpp", exe, UNITS)
    res = subprocess.run([str(exe)], capture_output=True, text=True, timeout=300)
    if res.stdout.startswith("skip "):
        pytest.skip(res.stdout.strip())
    lines = dict(line.split(" ", 1) for line in res.stdout.splitlines() if " " in line)
    return res.returncode, lines, res.stdout + res.stderr


@pytest.mark.parametrize("case", CASES)
def test_the_last_chunks_of_a_huge_tensor_match_a_small_one(huge_check, case):
    returncode, lines, output = huge_check
    assert returncode == 0, f"huge_tensor_check ended with {returncode} (a negative number is a signal):\n{output}"
    assert lines.get(case, "").startswith("same "), output

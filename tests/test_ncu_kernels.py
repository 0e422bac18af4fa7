"""bench/ncu_kernels.py without a GPU: its reading of ncu's raw CSV page (the layout other parsers of
`ncu --csv --page raw` read: a header row, a units row, quoted values with thousands separators, ncu's
own lines before the header), the per-kernel sums and duration-weighted rates, and its refusal where
there is no CUDA device. Whether real ncu output has this layout, only a GPU session can show: there the
part "ncu" of bench/gpu_session.sh writes the raw CSVs beside its results."""
from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.fixture(scope="module")
def ncu_kernels():
    sys.path.insert(0, str(BENCH))
    try:
        import ncu_kernels
        import bench_kernel_breakdown

        yield ncu_kernels, bench_kernel_breakdown
    finally:
        sys.path.remove(str(BENCH))


FIXED = '"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream","Block Size","Grid Size","Device","CC"'
METRICS = ["dram__bytes_read.sum", "dram__bytes_write.sum", "gpu__time_duration.sum",
           "gpu__dram_throughput.avg.pct_of_peak_sustained_elapsed", "launch__grid_size",
           "launch__registers_per_thread", "sm__cycles_active.avg", "gpc__cycles_elapsed.max",
           "sm__inst_issued.avg.pct_of_peak_sustained_active",
           "smsp__average_warps_issue_stalled_long_scoreboard_per_issue_active.ratio",
           "smsp__average_warps_issue_stalled_selected_per_issue_active.ratio",
           "smsp__average_warps_issue_stalled_wait_per_issue_active.ratio", "smsp__inst_executed.sum",
           "smsp__issue_active.avg.pct_of_peak_sustained_active", "smsp__thread_inst_executed_per_inst_executed.ratio"]
UNITS = ["Mbyte", "Kbyte", "usecond", "%", "", "register/thread", "cycle", "cycle", "%", "", "", "", "inst", "%", ""]


def launch(i, name, read_mb, write_kb, us, dram_pct, grid, inst, issue, long_sb, wait, regs=64, active=900.0):
    vals = [read_mb, write_kb, us, dram_pct, grid, regs, active, 1000.0, issue - 1, long_sb, 1.0, wait, inst, issue, 31.5]
    fixed = [str(i), "4242", "python3", "h", name, "1", "7", "(512, 1, 1)", f"({grid}, 1, 1)", "0", "9.0"]
    return ",".join(f'"{v}"' for v in fixed + [f"{v:,}" if isinstance(v, int) else str(v) for v in vals])


def raw_page():
    header = FIXED + "," + ",".join(f'"{m}"' for m in METRICS)
    units = ",".join(['""'] * 11 + [f'"{u}"' for u in UNITS])
    return "\n".join([
        "==PROF== Disconnected from process 4242",
        header, units,
        launch(0, "amadamw_sums_kernel", 800, 20, 100.0, 80.0, 1_000, 2_000_000, 70.0, 2.0, 1.0),
        launch(1, "amadamw_sums_kernel", 400, 10, 300.0, 60.0, 512, 1_000_000, 50.0, 4.0, 0.5),
        launch(2, "finalize_kernel", 0.5, 1, 20.0, 1.0, 1, 10_000, 5.0, 0.1, 3.0),
        launch(3, "amadamw_update_kernel", 2_000, 1_500_000, 500.0, 90.0, 1_512, 3_000_000, 40.0, 6.0, 0.2),
    ])


def page(*launches):
    header = FIXED + "," + ",".join(f'"{m}"' for m in METRICS)
    units = ",".join(['""'] * 11 + [f'"{u}"' for u in UNITS])
    return "\n".join([header, units, *launches])


def test_the_raw_page_is_read_in_base_units_past_ncus_own_lines(ncu_kernels):
    mod, _ = ncu_kernels
    launches = mod.parse_raw(raw_page())
    assert [l["Kernel Name"] for l in launches] == ["amadamw_sums_kernel"] * 2 + ["finalize_kernel", "amadamw_update_kernel"]
    first = launches[0]
    assert first["dram__bytes_read.sum"] == 800e6 and first["dram__bytes_write.sum"] == 20e3
    assert first["gpu__time_duration.sum"] == 100e3  # nanoseconds
    assert first["smsp__inst_executed.sum"] == 2_000_000  # "2,000,000"
    assert first["Block Size"] == "(512, 1, 1)"
    assert mod.parse_raw("==ERROR== nothing profiled\n") == []


def test_launches_of_a_kernel_are_summed_and_rates_weighted_by_time(ncu_kernels):
    mod, breakdown = ncu_kernels
    numel, copy_gbs = 100_000_000, 4000.0
    rows = {r["kernel"]: r for r in mod.summarize(mod.parse_raw(raw_page()), numel, copy_gbs,
                                                  breakdown.PASS_BYTES["AMAdamW wd=0"], breakdown.part_of)}
    sums = rows["amadamw_sums_kernel"]
    assert sums["part"] == "pass1" and sums["launches"] == 2 and sums["budget_bytes_per_param"] == 12
    assert sums["duration_us"] == 400.0
    dram = 800e6 + 20e3 + 400e6 + 10e3
    assert sums["dram_bytes_per_param"] == round(dram / numel, 2)
    assert sums["dram_gbs"] == round(dram / 400e-6 / 1e9, 1)
    assert sums["frac_of_copy"] == round(dram / 400e-6 / 1e9 / copy_gbs, 3)
    assert sums["dram_pct_peak"] == round((80.0 * 100 + 60.0 * 300) / 400, 1)  # weighted by duration
    assert sums["issue_active_pct"] == round((70.0 * 100 + 50.0 * 300) / 400, 1)
    assert sums["issue_slots_busy_pct"] == round((69.0 * 100 + 49.0 * 300) / 400, 1)
    assert sums["sm_active_pct"] == 90.0  # 900 of 1000 cycles
    assert sums["thread_inst_per_param"] == round(3_000_000 * 31.5 / numel, 1)
    assert sums["warp_slots_per_param"] == round(3_000_000 * 32 / numel, 1)
    assert sums["grid"] == 1_512 and sums["registers"] == 64
    long_sb, wait = (2.0 * 100 + 4.0 * 300) / 400, (1.0 * 100 + 0.5 * 300) / 400
    assert sums["stalls"] == f"long_scoreboard {long_sb:.2f}; wait {wait:.2f}"  # "selected" is no stall
    assert rows["amadamw_update_kernel"]["part"] == "pass2" and rows["amadamw_update_kernel"]["budget_bytes_per_param"] == 28
    assert rows["finalize_kernel"]["part"] == "finalize" and rows["finalize_kernel"]["budget_bytes_per_param"] is None
    # a baseline (no byte budget): every kernel is the step
    base = mod.summarize(mod.parse_raw(raw_page()), numel, copy_gbs, None, breakdown.part_of)
    assert {r["part"] for r in base} == {"step"}


def test_the_total_dram_bytes_stand_in_where_reads_and_writes_are_not_split(ncu_kernels):
    mod, breakdown = ncu_kernels
    launches = [{"Kernel Name": "amsgd_sums_kernel", "dram__bytes.sum": 8e8, "gpu__time_duration.sum": 2e5}]
    (row,) = mod.summarize(launches, 100_000_000, 4000.0, breakdown.PASS_BYTES["AMSGD"], breakdown.part_of)
    assert row["dram_bytes_per_param"] == 8.0 and row["dram_gbs"] == 4000.0 and row["frac_of_copy"] == 1.0
    assert row["thread_inst_per_param"] is None and row["stalls"] == ""
    # only the rate (the 'detailed' set): bytes = rate x time, "Tbyte/second" read in bytes/s
    page = "\n".join([FIXED + ',"dram__bytes.sum.per_second","gpu__time_duration.sum"',
                      ",".join(['""'] * 11) + ',"Tbyte/second","usecond"',
                      ",".join(['"0"', '"1"', '"p"', '"h"', '"amsgd_sums_kernel"'] + ['"1"'] * 6) + ',"4","200"'])
    (row,) = mod.summarize(mod.parse_raw(page), 100_000_000, 4000.0, breakdown.PASS_BYTES["AMSGD"], breakdown.part_of)
    assert row["dram_bytes_per_param"] == 8.0 and row["frac_of_copy"] == 1.0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without a CUDA device")
def test_without_a_cuda_device_it_says_so_and_fails(ncu_kernels, capsys, tmp_path):
    mod, _ = ncu_kernels
    assert mod.main(["--out-dir", str(tmp_path)]) == 1
    assert "no CUDA device" in capsys.readouterr().out
    assert not list(tmp_path.iterdir())


def test_kernels_of_one_name_but_other_registers_or_blocks_are_rows_of_their_own(ncu_kernels):
    """torch's fused AdamW: its step-count add and its update are both multi_tensor_apply_kernel."""
    mod, breakdown = ncu_kernels
    add = ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<at::native::(anonymous namespace)::"
           "TensorListMetadata<1>, at::native::(anonymous namespace)::BinaryOpScalarFunctor<float, 1, 1, 0>>(T1, T2)")
    adam = ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<at::native::(anonymous namespace)::"
            "FusedOptimizerTensorListMetadata<4>, at::native::(anonymous namespace)::FusedAdamMathFunctor<float, 4>>(T1, T2)")
    assert mod.short_name(add) == "multi_tensor_apply_kernel<BinaryOpScalarFunctor>"
    assert mod.short_name("amm_cuda::(anonymous namespace)::amadamw_sums_kernel(amm_cuda::TensorTable, "
                          "amm_cuda::PassArgs)") == "amadamw_sums_kernel"
    assert mod.short_name("amadamw_reduce_kernel") == "amadamw_reduce_kernel"
    text = page(launch(0, add, 1, 1, 3.0, 5.0, 2, 100, 10.0, 1.0, 1.0, regs=16),
                *(launch(i, adam, 400, 400_000, 110.0, 85.0, 320, 1_000_000, 40.0, 5.0, 1.0, regs=72) for i in (1, 2)),
                launch(3, "amadamw_sums_kernel", 100, 1, 50.0, 80.0, 9, 10, 50.0, 1.0, 1.0, regs=64),
                launch(4, "amadamw_sums_kernel", 100, 1, 50.0, 80.0, 9, 10, 50.0, 1.0, 1.0, regs=40))
    rows = mod.summarize(mod.parse_raw(text), 100_000_000, 4000.0, None, breakdown.part_of, step_bytes=28)
    by = {(r["kernel"], r["registers"]): r for r in rows}
    assert len(rows) == 4
    assert by[("multi_tensor_apply_kernel<FusedAdamMathFunctor>", 72.0)]["launches"] == 2
    assert by[("multi_tensor_apply_kernel<FusedAdamMathFunctor>", 72.0)]["budget_bytes_per_param"] == 28  # the longest
    assert by[("multi_tensor_apply_kernel<BinaryOpScalarFunctor>", 16.0)]["budget_bytes_per_param"] is None
    assert by[("amadamw_sums_kernel", 40.0)]["launches"] == 1


def fake_ncu(tmp_path, body: str) -> Path:
    """A stand-in ncu: logs its arguments to tmp_path/calls; `out` is the report path of -o; the import
    prints tmp_path/page.csv."""
    (tmp_path / "page.csv").write_text(raw_page())
    fake = tmp_path / "ncu"
    fake.write_text(f"""#!/usr/bin/env bash
echo "$*" >> {tmp_path}/calls
out=""; prev=""
for a in "$@"; do [ "$prev" = "-o" ] && out="$a"; prev="$a"; done
if [[ " $* " == *" --import "* ]]; then [[ " $* " == *" --print-units "* ]] && exit 1; cat {tmp_path}/page.csv; exit 0; fi
{body}
""")
    fake.chmod(0o755)
    return fake


def calls(tmp_path):
    return (tmp_path / "calls").read_text().splitlines()


def test_a_refused_section_goes_to_the_detailed_set_for_this_case_and_the_next(ncu_kernels, tmp_path):
    mod, _ = ncu_kernels
    fake = fake_ncu(tmp_path, 'case " $* " in *" --section "*) echo "==ERROR== Option \'--section regex:x\' did '
                              'not match any section."; exit 1 ;; esac\ntouch "$out.ncu-rep"')
    prof = mod.Profiler(str(fake), 1e8, tmp_path, tmp_path / "raw")
    raw, err, how = prof.profile(0, "AMAdamW[cuda]", 60)
    assert how == "detailed" and len(mod.parse_raw(raw)) == 4 and "refused" in err
    log = calls(tmp_path)
    assert len(log) == 4, log  # sections refused, detailed, import with --print-units (refused), without
    assert "--section" in log[0] and "--set detailed" in log[1]
    for line in log[:2]:
        assert "--profile-from-start off" in line and "--clock-control none" in line
        assert line.endswith("--inner AMAdamW[cuda] --size 100000000.0")
    assert "--print-units base" in log[2] and "--print-units" not in log[3]
    raw2, err2, how2 = prof.profile(1, "AMSGD[cuda]", 60)
    assert how2 == "detailed" and err2 == ""
    assert len(calls(tmp_path)) == 4 + 3 and "--section" not in calls(tmp_path)[4]  # straight to 'detailed'
    kept = sorted(p.name for p in (tmp_path / "raw").iterdir())
    assert kept == ["AMAdamW_cuda.csv", "AMAdamW_cuda.detailed.log", "AMAdamW_cuda.sections.log",
                    "AMSGD_cuda.csv", "AMSGD_cuda.detailed.log"]


def test_a_report_is_read_even_where_the_profiled_process_failed(ncu_kernels, tmp_path):
    mod, _ = ncu_kernels
    fake = fake_ncu(tmp_path, 'touch "$out.ncu-rep"; echo "==WARNING== the target exited with 11"; exit 11')
    raw, err, how = mod.Profiler(str(fake), 1e8, tmp_path, None).profile(0, "AMAdamW[cuda]", 60)
    assert how == "sections" and len(mod.parse_raw(raw)) == 4
    assert "rc=11 with a report" in err and "exited with 11" in err
    assert sum("--inner" in c for c in calls(tmp_path)) == 1  # not profiled again


def test_no_permission_for_the_counters_stops_every_later_case(ncu_kernels, tmp_path):
    mod, _ = ncu_kernels
    fake = fake_ncu(tmp_path, 'echo "==ERROR== ERR_NVGPUCTRPERM - The user does not have permission"; exit 1')
    prof = mod.Profiler(str(fake), 1e8, tmp_path, None)
    done, failed, left = mod.run_cases(["AMAdamW[cuda]", "AdamW fused", "AMSGD[cuda]"], prof, 600, 60, time.time())
    assert done == {} and left == [] and list(failed) == ["AMAdamW[cuda]", "AdamW fused", "AMSGD[cuda]"]
    assert "ERR_NVGPUCTRPERM" in failed["AMAdamW[cuda]"] and failed["AdamW fused"].startswith("not run:")
    assert len(calls(tmp_path)) == 1


def test_a_step_that_failed_fails_its_case_alone_but_a_step_never_profiled_stops_the_run(ncu_kernels, tmp_path):
    mod, _ = ncu_kernels
    names = ["AMAdamW[cuda]", "AdamW fused"]
    fake = fake_ncu(tmp_path, 'echo "RuntimeError: amm_kernels._C has no CUDA part"; '
                              'echo "==WARNING== No kernels were profiled."; exit 1')
    done, failed, _ = mod.run_cases(names, mod.Profiler(str(fake), 1e8, tmp_path, None), 600, 60, time.time())
    assert list(failed) == names and "no CUDA part" in failed["AMAdamW[cuda]"]
    assert not failed["AdamW fused"].startswith("not run:")  # the second case was tried
    (tmp_path / "calls").unlink()
    fake = fake_ncu(tmp_path, f'echo "{mod.PROFILED} of x"; echo "==WARNING== No kernels were profiled."; exit 0')
    done, failed, _ = mod.run_cases(names, mod.Profiler(str(fake), 1e8, tmp_path, None), 600, 60, time.time())
    assert failed["AdamW fused"].startswith("not run:") and len(calls(tmp_path)) == 1


def test_cases_that_would_not_fit_the_budget_are_left_out_not_failed(ncu_kernels):
    mod, _ = ncu_kernels
    now = [0.0]
    took = {"a": 40.0, "b": 25.0, "c": 25.0, "d": 25.0}
    given = {}

    def profile(i, name, timeout):
        given[name] = timeout
        now[0] += took[name]
        return ("raw", "", "sections") if name != "b" else ("", "boom", "")

    done, failed, left = mod.run_cases(list(took), profile, budget=100, timeout=60, started=0.0, clock=lambda: now[0])
    # a: 60 s at most (100 left); b: 60 (60 left), took 25 -> 35 left; c: 35 (>= 25), took 25 -> 10 left: d waits
    assert given == {"a": 60, "b": 60, "c": 35}
    assert list(done) == ["a", "c"] and failed == {"b": "boom"} and left == ["d"]


def test_a_case_out_of_time_ends_with_the_process_it_profiles(ncu_kernels, tmp_path):
    """run_group ends ncu's whole process group: the Python it profiles must not live on."""
    mod, _ = ncu_kernels
    script = tmp_path / "slow"
    script.write_text(f"#!/usr/bin/env bash\nsleep 300 &\necho $! > {tmp_path}/child\nwait\n")
    script.chmod(0o755)
    t0 = time.time()
    rc, _ = mod.run_group([str(script)], 1)
    assert rc is None and time.time() - t0 < 20
    child = int((tmp_path / "child").read_text())
    for _ in range(50):
        if not Path(f"/proc/{child}").exists() or "zombie" in Path(f"/proc/{child}/status").read_text().lower():
            break
        time.sleep(0.1)
    else:
        raise AssertionError("the profiled process outlived the timeout")

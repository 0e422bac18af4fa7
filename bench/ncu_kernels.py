"""Why a pass falls short, read off the GPU's counters: Nsight Compute (ncu) on the kernels of one
optimizer.step() at 1e8 parameters in the LLaMA-shaped list of bench_core (issue 3: "where a figure
falls short, say why (from the disassembly, the profiler or a variant that isolates the cause)").

    python bench/ncu_kernels.py                       # GPU with ncu; writes bench/results/ncu_kernels_<device>.*
    python bench/ncu_kernels.py --cases "AMAdamW[cuda] wd=0,AdamW fused" --size 3e8

Each case (bench_kernel_breakdown.py's optimizers: AMAdamW and AMSGD on the compiled backends and their
fused baselines) runs in its own process under ncu: three steps unprofiled (Triton compiles, the state
is made), then one step between cudaProfilerStart and cudaProfilerStop (--profile-from-start off), its
main kernels only (-k: the passes, the finalize, torch's multi-tensor kernels). The clocks are left as
they are (--clock-control none: the step as it runs, not at base clocks) and the caches are flushed
before each replay pass (ncu's default), as bench/common.py times from cold caches.

Per kernel (the launches of one kernel, registers and block in a step summed) it records:
  - duration, DRAM bytes per parameter beside the bytes the pass must move (bench/README.md's budget;
    a baseline's whole step on its longest kernel), and their GB/s as a fraction of the copy bandwidth
    measured in this run (without ncu);
  - the DRAM and SM throughput as ncu's percent of peak;
  - issue, of the cycles an SM was active: the percent a scheduler issued (SchedulerStats), the issue
    slots busy and the eligible warps a cycle; and the warp instructions executed x 32 per parameter
    (InstructionStats: the issue slots the NOTE below counts), which tell an instruction-bound pass
    from one waiting on memory;
  - the percent of the kernel's elapsed cycles an SM was active at all, and the waves a launch makes:
    idle SMs in a last wave;
  - achieved occupancy, registers a thread, grid and block;
  - the three largest warp stall reasons (WarpStateStats: cycles per issued instruction).

NOTE [what the counters decide]: on the H200 (2026-11-29, kernel_breakdown_nvidia_h200.csv) AM-AdamW's
CUDA pass 1 moved 16 bytes a parameter with weight decay in 0.411 ms (0.91 of copy) and 12 bytes without
in 0.351 ms (0.80): a quarter fewer bytes, a seventh less time. Per element it computes one IEEE sqrt,
two IEEE divisions and one IEEE reciprocal (exact: NOTE [IEEE division] in
amm_kernels/triton_kernels/am_math.py) and ~28 separate float32 multiplies and adds (no FMA
contraction: --fmad=false). Its sm_90 SASS (nvcc 13.0, read with the cuobjdump in Triton's package)
has 793 instructions in the vector loop, 8 elements an iteration; the float32 path without decay
skips x's load, the 16-bit loads and the divisions' slow paths, and issues about 71 an element
(about 72 with decay, which loads x).
12 bytes at the copy bandwidth (4246 GB/s) leave time for about 95 at the H200's issue rate (132 SMs x
4 schedulers x 1.98 GHz, one warp instruction each a cycle); with decay, 16 bytes leave about 126.
At the measured times both come to 52-60% of the issue slots (two blocks of 512 threads an SM), as do
Triton's (~96 an element with or without decay, and the same time for both: bench/README.md, "AM-AdamW's
pass 1 by its instructions"; ~89 since its whole path lost the mask, NOTE [no mask on the whole path]). So pass 1 may be bound by instruction issue rather than memory.
A high issue percent with DRAM well under its peak says so; a low one with few warps eligible
(long_scoreboard stalls) says latency; SMs active for a small share of the elapsed cycles say the
last wave's idle SMs (NOTE [chunk size] in csrc/cuda/ops_cuda.cpp).

Without ncu, a CUDA device, or permission to read the counters (ncu's ERR_NVGPUCTRPERM; a gVisor
machine's LibraryNotLoaded), it says which and exits 1 after the first case that meets it. Cases left
for want of time make it exit 124 (gpu_session.sh then lists the part as unfinished) and are printed
as the --cases of a rerun. With --keep-raw, each case's ncu log and raw CSV are written beside the
results (the report itself too where its CSV could not be read), for what this script does not parse.
"""
from __future__ import annotations

import argparse
import csv
import glob
import io
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

# The optimizers, in the order of what they can tell: AM-AdamW's passes (without decay first: the
# suspected instruction-bound pass 1), the fused baseline that moves the same bytes as pass 2, Triton's.
DEFAULT_CASES = ("AMAdamW[cuda] wd=0", "AMAdamW[cuda]", "AdamW fused", "AMAdamW[triton]", "AMSGD[cuda]",
                 "AMAdamW[triton] wd=0", "AMSGD[triton]", "SGD-momentum fused")
KERNELS = "regex:sums|update|reduce|finalize|tensor_terms|persistent|multi_tensor_apply"
# ncu's sections by identifier; a regex so that one missing from this ncu drops out rather than failing
# the run. SchedulerStats: issue, eligible warps; WarpStateStats: stalls; InstructionStats: instructions.
SECTIONS = ("regex:^(SpeedOfLight|LaunchStats|Occupancy|SchedulerStats|WarpStateStats|InstructionStats|"
            "ComputeWorkloadAnalysis|MemoryWorkloadAnalysis)$")
# DRAM bytes read and written: named dram__bytes_read.sum on some chips, dram__bytes_op_read.sum on
# others; dram__bytes.sum (the total) on all. A regex that matches nothing fails the run: this one
# matches the total at least, whether ncu matches it against base names (dram__bytes, expanded to its
# .sum, .avg, ...) or full ones.
DRAM_METRICS = r"regex:^dram__bytes(_op)?(_read|_write)?(\.sum)?$"
# What ncu is asked to collect: the sections and DRAM metrics, or, where this ncu refuses one of those,
# its 'detailed' set (no stall reasons, DRAM bytes from their rate).
TRIES = (("sections", ["--section", SECTIONS, "--metrics", DRAM_METRICS]), ("detailed", ["--set", "detailed"]))
# ncu's words for a machine where no case can be profiled: stop at the first. Also fatal: no kernels
# profiled in a step that ran (PROFILED printed: the profiler range is not honoured here); a case whose
# step failed (a backend missing) fails alone.
FATAL = ("ERR_NVGPUCTRPERM", "LibraryNotLoaded", "Failed to initialize the profiler", "Device not supported")
PROFILED = "ncu_kernels: profiled one step"
REFUSED = re.compile(r"==ERROR==.*(section|metric)", re.IGNORECASE)
IMPORT_S = 15  # seconds kept for importing a case's report

STALL = re.compile(r"^smsp__average_warps_issue_stalled_(\w+?)_per_issue_active\.ratio$")
SCALE = {"byte": 1.0, "kbyte": 1e3, "mbyte": 1e6, "gbyte": 1e9, "tbyte": 1e12,  # to bytes
         "nsecond": 1.0, "usecond": 1e3, "msecond": 1e6, "second": 1e9,    # to nanoseconds
         "ns": 1.0, "us": 1e3, "ms": 1e6, "s": 1e9,
         "byte/second": 1.0, "kbyte/second": 1e3, "mbyte/second": 1e6, "gbyte/second": 1e9,  # to bytes/s
         "tbyte/second": 1e12}


def find_ncu(given: str | None) -> str | None:
    if given:
        return given if (os.path.isfile(given) or shutil.which(given)) else None
    found = shutil.which("ncu")
    if found:
        return found
    for pattern in ("/usr/local/cuda*/bin/ncu", "/opt/nvidia/nsight-compute/*/ncu"):
        hits = sorted(glob.glob(pattern))
        if hits:
            return hits[-1]
    return None


# --------------------------------------------------------------------------------------------------
# ncu's raw page
# --------------------------------------------------------------------------------------------------

def number(text: str) -> float | None:
    """A value of ncu's CSV ("1,048,576", "87.5", "n/a", "(512, 1, 1)") as a float, or None."""
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def parse_raw(text: str) -> list[dict]:
    """The launches of `ncu --import R --csv --page raw`: one dict per launch, metric name -> float
    (bytes in bytes, times in nanoseconds, whatever unit ncu printed), and "Kernel Name" etc. as text.
    Lines before the header ("==PROF==", "==WARNING==") are skipped; the row after it gives the units."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith('"ID",')), None)
    if start is None:
        return []
    rows = list(csv.reader(io.StringIO("\n".join(lines[start:]))))
    if len(rows) < 2:
        return []
    header, units = rows[0], rows[1]
    launches = []
    for row in rows[2:]:
        if len(row) != len(header):
            continue
        launch = {}
        for name, unit, value in zip(header, units, row):
            v = number(value)
            if v is None or name in ("Kernel Name", "Block Size", "Grid Size", "Process Name", "Host Name"):
                launch[name] = value
            else:
                launch[name] = v * SCALE.get(unit.strip().lower(), 1.0)
        launches.append(launch)
    return launches


def first(launch: dict, *names: str) -> float | None:
    for n in names:
        v = launch.get(n)
        if isinstance(v, float):
            return v
    return None


def short_name(kernel: str) -> str:
    """A demangled kernel name made short: its function's name without namespaces, parameters or
    template arguments, and the functor among those (torch's multi_tensor_apply_kernel<..., Functor>)."""
    kernel = kernel.replace("(anonymous namespace)::", "")
    cut = min([i for i in (kernel.find("<"), kernel.find("(")) if i >= 0], default=len(kernel))
    base = kernel[:cut].split()[-1] if kernel[:cut].split() else kernel  # without "void "
    base = base.split("::")[-1]
    functor = re.findall(r"(\w+Functor)\b", kernel)
    return f"{base}<{functor[0]}>" if functor else base


def summarize(launches: list[dict], numel: int, copy_gbs: float, budget: dict[str, int] | None,
              part_of, step_bytes: int | None = None) -> list[dict]:
    """One row per kernel (launches with the same demangled name, registers and block summed: time,
    bytes, instructions), rates and percentages weighted by duration. budget: the AM step's bytes per
    parameter by part (bench_kernel_breakdown.PASS_BYTES), or None for a baseline, whose longest kernel
    gets step_bytes (its step's bytes per parameter)."""
    by_key: dict[tuple, list[dict]] = {}
    for launch in launches:
        key = (str(launch.get("Kernel Name", "?")), first(launch, "launch__registers_per_thread"),
               first(launch, "launch__block_size"))
        by_key.setdefault(key, []).append(launch)
    rows = []
    for (name, registers, block), group in by_key.items():
        ns = [first(g, "gpu__time_duration.sum") or 0.0 for g in group]
        total_ns = sum(ns)

        def weighted(*names):
            vals = [(first(g, *names), w) for g, w in zip(group, ns)]
            vals = [(v, w) for v, w in vals if v is not None]
            if not vals:
                return None
            wsum = sum(w for _, w in vals)
            return sum(v * w for v, w in vals) / wsum if wsum > 0 else sum(v for v, _ in vals) / len(vals)

        def summed(*names):
            vals = [first(g, *names) for g in group]
            return sum(v for v in vals if v is not None) if any(v is not None for v in vals) else None

        read = summed("dram__bytes_read.sum", "dram__bytes_op_read.sum")
        write = summed("dram__bytes_write.sum", "dram__bytes_op_write.sum")
        dram = read + write if read is not None and write is not None else summed("dram__bytes.sum")
        if dram is None:  # the 'detailed' set's rate (MemoryWorkloadAnalysis) times each launch's time
            rates = [first(g, "dram__bytes.sum.per_second") for g in group]
            if all(r is not None for r in rates):
                dram = sum(r * t * 1e-9 for r, t in zip(rates, ns))
        warp_inst = summed("smsp__inst_executed.sum", "sm__inst_executed.sum")
        lanes = weighted("smsp__thread_inst_executed_per_inst_executed.ratio")
        active = [(first(g, "sm__cycles_active.avg"), first(g, "gpc__cycles_elapsed.max"), w) for g, w in zip(group, ns)]
        active = [(a / e, w) for a, e, w in active if a is not None and e]
        stalls = {}
        for key in group[0]:
            m = STALL.match(key)
            if m and m.group(1) != "selected":  # "selected" is issuing, not a stall
                v = weighted(key)
                if v is not None:
                    stalls[m.group(1)] = v
        top = sorted(stalls.items(), key=lambda kv: -kv[1])[:3]
        short = short_name(name)
        part = part_of(short) if budget is not None else "step"
        seconds = total_ns * 1e-9
        gbs = dram / seconds / 1e9 if dram is not None and seconds > 0 else None
        rows.append(dict(
            kernel=short, part=part, launches=len(group), duration_us=round(total_ns / 1e3, 2),
            dram_bytes_per_param=round(dram / numel, 2) if dram is not None else None,
            budget_bytes_per_param=(budget or {}).get(part),
            dram_gbs=round(gbs, 1) if gbs is not None else None,
            frac_of_copy=round(gbs / copy_gbs, 3) if gbs is not None and copy_gbs > 0 else None,
            dram_pct_peak=rnd(weighted("gpu__dram_throughput.avg.pct_of_peak_sustained_elapsed",
                                       "dram__throughput.avg.pct_of_peak_sustained_elapsed")),
            sm_pct_peak=rnd(weighted("sm__throughput.avg.pct_of_peak_sustained_elapsed")),
            # of the cycles an SM was active: the share a scheduler issued (one or more warps eligible)
            issue_active_pct=rnd(weighted("smsp__issue_active.avg.pct_of_peak_sustained_active")),
            issue_slots_busy_pct=rnd(weighted("sm__inst_issued.avg.pct_of_peak_sustained_active")),
            sm_busy_pct=rnd(weighted("sm__instruction_throughput.avg.pct_of_peak_sustained_active")),
            eligible_warps=rnd(weighted("smsp__warps_eligible.avg.per_cycle_active"), 2),
            # of the kernel's elapsed cycles: the share an SM was active at all (idle SMs in a last wave)
            sm_active_pct=rnd(100 * sum(r * w for r, w in active) / sum(w for _, w in active)) if active and sum(
                w for _, w in active) > 0 else None,
            waves=rnd(first(group[0], "launch__waves_per_multiprocessor"), 2),
            # warp instructions x 32 (the issue slots, as NOTE [what the counters decide] counts them),
            # and x the threads active in each (where ncu gives that ratio)
            warp_slots_per_param=round(warp_inst * 32 / numel, 1) if warp_inst is not None else None,
            thread_inst_per_param=round(warp_inst * lanes / numel, 1) if warp_inst is not None and lanes else None,
            occupancy_pct=rnd(weighted("sm__warps_active.avg.pct_of_peak_sustained_active")),
            registers=registers, grid=summed("launch__grid_size"), block=block,
            stalls="; ".join(f"{k} {v:.2f}" for k, v in top), demangled=name[:300],
        ))
    if budget is None and step_bytes and rows:  # a baseline: its step is its longest kernel
        max(rows, key=lambda r: r["duration_us"])["budget_bytes_per_param"] = step_bytes
    return rows


def rnd(v, digits=1):
    return round(v, digits) if v is not None else None


# --------------------------------------------------------------------------------------------------
# One case, profiled (the process ncu starts)
# --------------------------------------------------------------------------------------------------

def inner(name: str, size: float) -> int:
    import torch

    from bench_kernel_breakdown import cases
    from throughput import make_params, model_shapes

    device = torch.device("cuda")
    factory = {n: f for n, _, f in cases(device)}.get(name)
    if factory is None:
        print(f"ncu_kernels: no case {name!r} here; cases: {', '.join(n for n, _, _ in cases(device))}")
        return 2
    params = make_params(model_shapes(int(size)), device)
    opt = factory(params)
    for _ in range(3):
        opt.step()
    # cudaProfilerStart with this thread's context current (ncu intercepts the driver's call)
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    opt.step()
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()
    print(f"{PROFILED} of {name}")
    return 0


# --------------------------------------------------------------------------------------------------
# The cases under ncu
# --------------------------------------------------------------------------------------------------

def run_group(cmd: list[str], timeout: float) -> tuple[int | None, str]:
    """(exit status, or None where it ran out of time; stdout and stderr together) of cmd, run in its
    own process group, which is ended whole at the timeout or when this process is interrupted (ncu's
    target, the Python it profiles, would otherwise live on holding the GPU)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=max(timeout, 1))
        return proc.returncode, out
    except subprocess.TimeoutExpired:
        return None, end_group(proc)
    except BaseException:
        end_group(proc)
        raise


def end_group(proc: subprocess.Popen) -> str:
    out = ""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            out, _ = proc.communicate(timeout=10)
            break
        except subprocess.TimeoutExpired:
            continue
    try:  # what is left of the group once its leader has gone
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    return out or ""


def ncu_lines(out: str, n: int = 4) -> str:
    """ncu's last errors and warnings in `out` and the last lines of the rest (the profiled Python's
    traceback, say), on one line."""
    lines = [line.strip() for line in out.splitlines() if line.strip()]
    marked = [line for line in lines if line.startswith(("==ERROR==", "==WARNING=="))]
    rest = [line for line in lines if not line.startswith("==")]
    return " / ".join(marked[-n:] + rest[-3:])[:800]


class Profiler:
    """Runs the cases under ncu one at a time. Remembers what this ncu refused (the first of TRIES:
    later cases go straight to the next) and a fatal answer (no case is started after it)."""

    def __init__(self, ncu: str, size: float, workdir: Path, raw_dir: Path | None):
        self.ncu, self.size, self.workdir, self.raw_dir = ncu, size, workdir, raw_dir
        self.tries = list(TRIES)
        self.fatal = ""

    def keep(self, name: str, suffix: str, text: str | None = None, path: Path | None = None):
        if self.raw_dir is None:
            return
        self.raw_dir.mkdir(parents=True, exist_ok=True)
        dest = self.raw_dir / (re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_") + suffix)
        if path is not None:
            shutil.copyfile(path, dest)
        else:
            dest.write_text(text[-200_000:])

    def profile(self, i: int, name: str, timeout: float) -> tuple[str, str, str]:
        """(raw CSV text or "", what went wrong or "", which of TRIES collected it)."""
        t0, errors = time.time(), []
        report = self.workdir / f"case{i}"
        rep = report.with_suffix(".ncu-rep")
        while self.tries:
            label, extra = self.tries[0]
            left = timeout - (time.time() - t0) - IMPORT_S
            if left < 10:
                errors.append(f"{left + IMPORT_S:.0f} s left: not tried with '{label}'")
                break
            rep.unlink(missing_ok=True)
            cmd = [self.ncu, *extra, "--profile-from-start", "off", "--clock-control", "none",
                   "-k", KERNELS, "-f", "-o", str(report),
                   sys.executable, str(Path(__file__).resolve()), "--inner", name, "--size", str(self.size)]
            rc, out = run_group(cmd, left)
            self.keep(name, f".{label}.log", out)
            if rc is None:
                errors.append(f"ncu did not finish in {left:.0f} s: {ncu_lines(out)}")
                break
            if not rep.exists():
                if any(f in out for f in FATAL) or ("No kernels were profiled" in out and PROFILED in out):
                    self.fatal = f"{name}: {ncu_lines(out)}"
                    errors.append(f"no report (fatal for every case): {ncu_lines(out)}")
                elif REFUSED.search(out) and len(self.tries) > 1:
                    errors.append(f"'{label}' refused: {ncu_lines(out)}")
                    self.tries.pop(0)
                    continue
                else:
                    errors.append(f"rc={rc}, no report: {ncu_lines(out)}")
                break
            # a report, whatever ncu's status (the target may fail at exit after its step was profiled)
            if rc != 0:
                errors.append(f"rc={rc} with a report: {ncu_lines(out)}")
            left = max(timeout - (time.time() - t0), 5)
            raw = ""
            for opts in (["--print-units", "base"], []):  # an ncu without --print-units: its defaults
                irc, raw = run_group([self.ncu, "--import", str(rep), "--csv", "--page", "raw", *opts], left)
                if irc == 0:
                    break
            self.keep(name, ".csv", raw)
            if parse_raw(raw):
                return raw, " | ".join(errors), label
            self.keep(name, ".ncu-rep", path=rep)
            errors.append(f"import gave no launches: {ncu_lines(raw)}")
            break
        return "", " | ".join(errors), ""


def run_cases(names: list[str], profile, budget: float | None, timeout: float, started: float,
              clock=time.time) -> tuple[dict, dict, list]:
    """profile(i, name, timeout) -> (raw, error, try) for each name in turn, within `budget` seconds
    from `started` (each case gets `timeout` at most, and none starts with less than the last one
    took, or 30 s before the first). Returns ({name: (raw, error, try)} profiled, {name: error} not
    profiled, [names] left for want of time). profile.fatal (where it has one) stops the rest."""
    done, failed, left_out = {}, {}, []
    last = 30.0
    for i, name in enumerate(names):
        fatal = getattr(profile, "fatal", "")
        if fatal:
            failed[name] = f"not run: {fatal}"
            continue
        remaining = float("inf") if budget is None else budget - (clock() - started)
        if remaining < min(last, timeout):
            left_out.append(name)
            continue
        t0 = clock()
        fn = profile.profile if hasattr(profile, "profile") else profile
        raw, err, how = fn(i, name, min(timeout, remaining))
        last = clock() - t0
        if raw:
            done[name] = (raw, err, how)
        else:
            failed[name] = err
    return done, failed, left_out


def main(argv=None) -> int:
    started = time.time()  # the budget counts the imports too
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--inner", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--size", type=float, default=1e8, help="parameters (default 1e8)")
    ap.add_argument("--cases", default=None, help=f"comma-separated case names (default: {', '.join(DEFAULT_CASES)})")
    ap.add_argument("--ncu", default=None, help="the ncu executable (default: on PATH, then /usr/local/cuda*/bin, "
                                                 "/opt/nvidia/nsight-compute/*)")
    ap.add_argument("--timeout", type=float, default=120, help="seconds for one case (ncu's tries and the import)")
    ap.add_argument("--budget", type=float, default=None, help="seconds for the whole run: no case starts after")
    ap.add_argument("--keep-raw", action="store_true", help="also write each case's ncu log and raw CSV beside the results")
    ap.add_argument("--out-dir", default=None)
    args = ap.parse_args(argv)
    if args.inner:
        return inner(args.inner, args.size)

    import tempfile

    import torch

    from bench_kernel_breakdown import PASS_BYTES, cases, part_of
    from common import RESULTS, copy_bandwidth, device_tag, environment, write_results
    from throughput import cases as throughput_cases, free, model_shapes

    if not torch.cuda.is_available():
        print("ncu_kernels: no CUDA device here; nothing profiled")
        return 1
    ncu = find_ncu(args.ncu)
    if ncu is None:
        print("ncu_kernels: ncu (Nsight Compute) not found; nothing profiled")
        return 1
    device = torch.device("cuda")
    env = environment(device)
    try:
        version = subprocess.run([ncu, "--version"], capture_output=True, text=True, timeout=30).stdout.strip().splitlines()
    except (OSError, subprocess.TimeoutExpired) as err:
        print(f"ncu_kernels: {ncu} --version failed ({err}); nothing profiled")
        return 1
    env["ncu"] = version[-1] if version else "unknown"
    copy_gbs = copy_bandwidth(device, 256 << 20)
    free(device)
    shapes = model_shapes(int(args.size))
    numel = sum(torch.Size(s).numel() for s in shapes)
    kinds = {n: kind for n, kind, _ in cases(device)}
    step_bytes = {n: bpp for n, _, bpp, _ in throughput_cases(device)}
    wanted = [c.strip() for c in args.cases.split(",")] if args.cases else list(DEFAULT_CASES)
    missing = [c for c in wanted if c not in kinds]
    if missing:
        print(f"ncu_kernels: not a case here: {', '.join(missing)} (cases: {', '.join(kinds)})")
    wanted = [c for c in wanted if c in kinds]
    print(f"{env['device']}: {numel / 1e6:.1f}M float32 parameters in {len(shapes)} tensors; copy bandwidth "
          f"{copy_gbs:.1f} GB/s; {env['ncu']}; torch {env['torch']}, triton {env['triton']}", flush=True)
    out_dir = Path(args.out_dir or RESULTS)
    stem = f"ncu_kernels_{device_tag(device)}"
    rows = []

    class Reporting(Profiler):  # prints and writes each case as it comes (a run stopped at its limit keeps them)
        def profile(self, i, name, timeout):
            t0 = time.time()
            raw, err, how = super().profile(i, name, timeout)
            took = time.time() - t0
            if not raw:
                print(f"\n{name}: not profiled ({took:.0f} s): {err}", flush=True)
                return raw, err, how
            kind = kinds[name]
            case_rows = summarize(parse_raw(raw), numel, copy_gbs, PASS_BYTES.get(kind) if kind else None,
                                  part_of, step_bytes.get(name))
            print(f"\n{name} ({took:.0f} s under ncu, '{how}'){': ' + err if err else ''}")
            print(f"  {'kernel':34s} {'part':8s} {'us':>8s} {'B/par':>6s} {'budget':>6s} {'copy':>5s} {'dram%':>6s} "
                  f"{'issue%':>6s} {'slots/par':>9s} {'occ%':>5s} {'smact%':>6s} {'regs':>4s}  stalls")
            for r in case_rows:
                print(f"  {r['kernel'][:34]:34s} {r['part']:8s} {r['duration_us']:8.1f} {fmt(r['dram_bytes_per_param']):>6s} "
                      f"{fmt(r['budget_bytes_per_param']):>6s} {fmt(r['frac_of_copy']):>5s} {fmt(r['dram_pct_peak']):>6s} "
                      f"{fmt(r['issue_active_pct']):>6s} {fmt(r['warp_slots_per_param']):>9s} {fmt(r['occupancy_pct']):>5s} "
                      f"{fmt(r['sm_active_pct']):>6s} {fmt(r['registers']):>4s}  {r['stalls']}", flush=True)
            rows.extend(dict(optimizer=name, numel=numel, tensors=len(shapes), collected=how, **r) for r in case_rows)
            write_results(stem, rows, env, out_dir, extra=dict(copy_gbs=copy_gbs))
            return raw, err, how

    with tempfile.TemporaryDirectory() as tmp:
        raw_dir = out_dir / f"{stem}_raw" if args.keep_raw else None
        profiler = Reporting(ncu, args.size, Path(tmp), raw_dir)
        done, failed, left_out = run_cases(wanted, profiler, args.budget, args.timeout, started)
    extra = dict(copy_gbs=copy_gbs, not_profiled=failed, left_for_time=left_out,
                 warnings={n: e for n, (_, e, _) in done.items() if e})
    if rows or failed:
        write_results(stem, rows, env, out_dir, extra=extra)
        print(f"\nwrote {out_dir / stem}.csv")
    if profiler.fatal:
        print(f"ncu_kernels: stopped: {profiler.fatal}")
    if left_out:
        print(f"ncu_kernels: left for want of time; rerun with --cases \"{','.join(left_out)}\"")
    if failed or not done:
        return 1
    return 124 if left_out else 0


def fmt(v) -> str:
    if v is None:
        return "-"
    return f"{v:.3g}" if isinstance(v, float) else str(v)


if __name__ == "__main__":
    sys.exit(main())

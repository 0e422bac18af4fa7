#!/usr/bin/env bash
# What a GPU session runs, in ONE device call. The device tool lends a task 15 minutes of device time
# in all (the machine's start, a minute or two, included), at most 10 minutes a call, and a machine
# goes back 30 s after a call: so one call does everything, in order of value, each part under a time
# limit cut from one budget (AMM_GPU_BUDGET_S, default 560 s), and a part that would not fit is
# skipped and says so. Every part writes as it goes, so a part stopped at its limit still leaves what
# it measured. The machine has no network: everything runs offline from the working tree.
#
#   cp -r ../shared/vectors .carry/vectors        # here, first (git-ignored; test_vectors reads them)
#   git rev-parse --short HEAD > .carry/commit    # the commit, for session.log (.git may not travel)
#   run: OUT=$OUT bash bench/gpu_session.sh       # carry [".carry"], timeout_s 600
#   OUT=... bash bench/gpu_session.sh build conv  # named parts only (see PARTS below)
#   CC=gcc CXX=g++ OUT=... bash bench/gpu_session.sh build test_cuda errors
#                                                 # rebuilt by other compilers (the part "errors" says when)
#
# What comes back in $OUT (the tool returns at most 8 files):
#   session.log   each part's tail, wall time and exit status, and the machine (nvidia-smi, versions)
#   build.log     the extension's full build output
#   tests.log     pytest -v of the GPU tests (failures in full, skip reasons)
#   bench.log     the benchmarks' output (the tables)
#   sanitize.log  compute-sanitizer's findings (the last 40 lines of each tool's run)
#   results.tgz   the bench/results files this call wrote, and pytest's junit xml files; made again
#                 after every part, so a call cut short still returns what the finished parts wrote
#
# Parts (default order = order of value, new information first; limits are maxima, each also capped by
# what is left):
#   build        amm_kernels._C with its CUDA part (strict), for sm_90 only (AMM_CUDA_ARCHS; CI
#                compile-checks sm_80 and sm_90 with nvcc). A failed build does not stop the Triton parts.
#   test_cuda    the CUDA extension's tests: parity, persistent step, CUDA graphs, vectors, NCCL, sharded
#   errors       whether the extension's C++ errors reach Python or crash the process (bench/probe_errors.py;
#                the first GPU session saw a segfault where the simulator raises), with cuda-gdb backtraces,
#                and whether a one-function extension built by each C++ compiler there raises
#   chunks       bench_core's CUDA rows at 1e8 and 1e9 with chunks of 16384, 65536 (the default: this run's
#                baseline) and 32768 (AMM_CUDA_CHUNK; NOTE [chunk size] in csrc/cuda/ops_cuda.cpp), and at
#                65536 with the 11-29 tables of 128 tensors (AMM_CUDA_TABLE_TENSORS; NOTE [one launch per
#                pass] in csrc/cuda/launchers.h); the 1e8 breakdown of the CUDA steps at 16384 (the part
#                "breakdown" has them at 65536)
#   ncu          Nsight Compute on one step of each optimizer at 1e8 (bench/ncu_kernels.py): per kernel the
#                DRAM bytes, issue-slot use, instructions per parameter, occupancy and stall reasons, which
#                tell an instruction-bound pass from one waiting on memory or idle in its last wave (NOTE
#                [what the counters decide] there); the raw CSVs come back too
#   test_triton  the Triton backend's tests, compiled at full size
#   triton_variants  why Triton's pass 1 falls short (bench/bench_triton_variants.py: pass-1 spans, BLOCK,
#                exact math, warps, each variant in its own process, the likeliest cause first, then the
#                shipped step again for the run-to-run spread), at 1e8
#   bench_core   issue 3's figures: AMAdamW (wd 0.01 and 0) and AMSGD, cuda and triton, against fused
#                AdamW / SGD, at 1e8, 3e8 and 1e9 parameters in a LLaMA-shaped list, with the copy bandwidth
#                (measured in the first GPU session: after the parts that can say something new)
#   breakdown    per-kernel device time of each step at 1e8 parameters (why a figure falls short)
#   sanitize     compute-sanitizer racecheck / synccheck / memcheck on small steps of the main kernel paths
#   variants     persistent vs two-pass CUDA step by size (the threshold for AMM_CUDA_PERSISTENT_MAX_NUMEL)
#   overhead     a real training step, AdamW vs AMAdamW (issue 5)
#   bench_full   issue 5's whole throughput ladder (every backend, 1e5..1e9, flat and model)
#   memory       what each optimizer and backend holds beyond its state and what a steady step allocates
#                (bench/step_memory.py; tests/test_step_memory.py holds cuda and triton to a bound)
#   conv         the byte-level LM convergence run, larger than on CPU (not in the default list)
set -o pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INDEX=1  # offline
export AMM_NO_CUDA_SIM=1  # the simulator's tests are CI's; here the real CUDA backend runs (tests/_cuda_sim.py)
# the checkout first on the path: where the build part falls back to an in-place build (the package is
# then not installed), test subprocesses started from other folders still import it
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
BUDGET="${AMM_GPU_BUDGET_S:-560}"
T0=$(date +%s)
STAMP_T="$(mktemp)"  # results newer than this were written by this call
JUNIT="$(mktemp -d)"  # pytest's junit files, packed into results.tgz (not left in $OUT: at most 8 files come back)
parts=("$@")
[ ${#parts[@]} -eq 0 ] && parts=(build test_cuda errors chunks ncu test_triton triton_variants bench_core breakdown sanitize variants overhead bench_full memory)
declare -A MAX_S=([build]=240 [test_cuda]=150 [errors]=120 [bench_core]=120 [chunks]=170 [ncu]=120 [triton_variants]=210 [test_triton]=150 [sanitize]=120 [variants]=90
                  [breakdown]=60 [overhead]=60 [bench_full]=240 [memory]=60 [conv]=300)
# the least a part needs to leave a result (below it the part is skipped, not started and killed)
declare -A MIN_S=([test_cuda]=60 [errors]=45 [bench_core]=60 [chunks]=40 [ncu]=45 [triton_variants]=60 [test_triton]=60 [sanitize]=50 [variants]=40 [breakdown]=35
                  [overhead]=45 [bench_full]=60 [memory]=30)
RESERVE=15  # seconds kept for packing the results
status=0
unfinished=()  # parts skipped or stopped at their limit: what a second call on the still-warm machine would run

log() { echo "$*" | tee -a "$OUT/session.log"; }
left() { echo $(( BUDGET - ($(date +%s) - T0) - RESERVE )); }
# what the build is made from: the sources and the compilers named by CC / CXX (a second call with
# CC=... CXX=... rebuilds with them: the part "errors" may show that another compiler's build raises)
src_hash() { { cat setup.py csrc/*.h csrc/*.cpp csrc/*/* 2>/dev/null; echo "CC=${CC:-} CXX=${CXX:-}"; } | sha1sum | cut -c1-12; }

# xdist hands out single tests (--dist load), not whole files: a test that crashes its worker (a segfault
# on the first GPU session) then costs that test only. Under loadfile the crashed worker's file went to a
# new worker, which crashed on the same test again, four times, until xdist's scheduler failed
# (INTERNALERROR, KeyError) with 12 of the file's tests never run. (loadgroup, which would keep one
# file together, does not group under pytest 9: xdist 3.8 renames items' _nodeid, which pytest 9 ignores;
# seen here, 2026-11-29.) $1: "xdist" to run on 8 workers, else one process.
pytest_args() {  # xdist and pytest-timeout where installed (the GPU image has both)
  local a=(-v -rs -p no:cacheprovider --continue-on-collection-errors)
  [ "$1" = xdist ] && "$PY" -c "import xdist" 2>/dev/null && a+=(-n 8 --dist load)
  "$PY" -c "import pytest_timeout" 2>/dev/null && a+=(--timeout 120)
  echo "${a[@]}"
}

has_cuda_part() { timeout -k 5 60 "$PY" -c "import amm_kernels._C as c, sys; sys.exit(0 if c.has_cuda else 1)"; }

# A part stopped at its limit gets SIGINT first, which pytest (its xdist workers too: timeout signals
# the whole process group) answers with its summary and junit file, and Python with KeyboardInterrupt;
# SIGKILL 30 s later if it still runs (xdist's workers take a while to stop). Either way the part's
# status is 124 (or 137 after the kill).
limited() { timeout -s INT -k 30 "$@"; }

part_build() {
  local stamp="build/amm_gpu_build_stamp" want
  want="$(src_hash)"
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && \
     has_cuda_part 2>/dev/null; then
    echo "build: amm_kernels._C with CUDA is already built from csrc/ $want; skipped"
    return 0
  fi
  # a build from other sources or by other compilers: from scratch (setup.py build_ext skips an
  # extension whose _C.so is newer than its .cpp / .cu files, whatever the headers or the compiler)
  [ -f "$stamp" ] && rm -rf build/temp.* amm_kernels/_C*.so
  local t0 rc
  t0=$(date +%s)
  # for both builds below, this call only: sm_90 (the GPU's), all cores, a failed extension an error
  local -x AMM_CUDA_ARCHS="${AMM_CUDA_ARCHS:-90}" MAX_JOBS="${MAX_JOBS:-16}" AMM_KERNELS_STRICT_BUILD=1
  limited "$1" "$PY" -m pip install --no-deps --no-build-isolation -v -e . > "$OUT/build.log" 2>&1
  rc=$?
  # pip can fail before compiling anything: an image's setuptools older than 70.1 without the wheel
  # package has no bdist_wheel ("invalid command"), which an editable install needs. Then build in place
  # (tests and bench import the package from the checkout). A compile error is not retried.
  local rest=$(( $1 - ($(date +%s) - t0) ))
  if [ $rc -ne 0 ] && [ $rc -ne 124 ] && [ $rc -ne 137 ] && [ $rest -ge 30 ] && \
     ! grep -qE "FAILED: |Error compiling objects|error: command '.*' failed" "$OUT/build.log"; then
    echo "build: pip failed before compiling (see build.log); building in place with setup.py build_ext" | tee -a "$OUT/build.log"
    limited "$rest" "$PY" setup.py build_ext --inplace >> "$OUT/build.log" 2>&1
    rc=$?
  fi
  tail -n 30 "$OUT/build.log"
  [ $rc -eq 0 ] || { echo "build rc=$rc"; return $rc; }
  has_cuda_part || { echo "amm_kernels._C was built without its CUDA part (see build.log)"; return 1; }
  echo "amm_kernels._C has its CUDA part"
  mkdir -p build && echo "$want" > "$stamp"
}

run_pytest() {  # $1 limit, $2 junit name, $3 xdist or serial, then pytest's paths and selection arguments
  local limit=$1 name=$2 how=$3; shift 3
  if [ -d .carry/vectors ]; then
    AMM_VECTORS_DIR="$(mktemp -d)/vectors"; cp -r .carry/vectors "$AMM_VECTORS_DIR"; export AMM_VECTORS_DIR
  fi
  # shellcheck disable=SC2046
  limited "$limit" "$PY" -m pytest "$@" $(pytest_args "$how") --junitxml="$JUNIT/junit_$name.xml" 2>&1 | tee -a "$OUT/tests.log"
}

# Selections: every test that skips without a GPU is in exactly one of the two parts, and few CPU-only
# tests ride along (CI runs those): "not cpu" drops the cpu backend's cases, test_distributed's GPU cases
# (triton among them) run once, here. Checked with pytest --collect-only (tests/test_gpu_session_script.py).
CUDA_TESTS="(cuda or persistent or graph or compiled or vectors or nccl or sharded) and not cuda_sim and not cpu and not test_compile.py and (not triton or test_distributed)"
TRITON_TESTS="triton and not cuda_sim and not gpu_compile and not test_distributed and not test_bench_smoke"

part_test_cuda() {
  # without the CUDA part every CUDA test would skip and the part would pass: fail it instead
  has_cuda_part || { echo "amm_kernels._C has no CUDA part (see build.log): the CUDA tests would only skip"; return 1; }
  local t0 rc
  t0=$(date +%s)
  # test_distributed.py in one process: its module fixture spawns two ranks that run every case, which
  # under --dist load every worker given one of its tests would do again
  run_pytest "$1" cuda_distributed serial tests/test_distributed.py -k "$CUDA_TESTS"
  rc=$?
  local rest=$(( $1 - ($(date +%s) - t0) )) rc2
  [ "$rest" -ge 10 ] || { echo "test_cuda: ${rest} s left after test_distributed.py: the other CUDA tests not run"; return 124; }
  run_pytest "$rest" cuda xdist tests --ignore=tests/test_distributed.py -k "$CUDA_TESTS"
  rc2=$?
  [ $rc -eq 0 ] && rc=$rc2
  return $rc
}

# (the PTX compile test needs no GPU and runs in CI with this machine's triton: not here)
part_test_triton() { run_pytest "$1" triton xdist tests -k "$TRITON_TESTS"; }

bench() { limited "$1" "$PY" "${@:2}" 2>&1 | tee -a "$OUT/bench.log"; }

part_errors() {
  has_cuda_part || { echo "amm_kernels._C has no CUDA part (see build.log)"; return 1; }
  # each case ~5 s (a fresh python importing torch), the minimal extensions' builds beside them (~10 s);
  # what is left of the part goes to cuda-gdb's backtraces of a crash (printed as it reads symbols:
  # a gdb stopped at its time keeps the ones it printed)
  bench "$1" bench/probe_errors.py --timeout 30 --build-timeout $(( $1 / 2 )) --budget $(( $1 - 10 ))
}

part_bench_core() {
  bench "$1" bench/throughput.py --layouts model --sizes 1e8,3e8,1e9 --stem-suffix core \
    --only "AMAdamW[cuda],AMAdamW[triton],AMSGD[cuda],AMSGD[triton]"
}

# Is the two-pass step's shortfall at 1e8 the last wave's idle blocks (NOTE [chunk size])? The same rows
# with smaller chunks, and with the tables of 11-29 (128 tensors: two launches a pass where the default
# of 384 makes one, NOTE [one launch per pass] in csrc/cuda/launchers.h), each beside its own fused
# baselines; then where the time goes at 16384.
part_chunks() {
  has_cuda_part || { echo "amm_kernels._C has no CUDA part (see build.log)"; return 1; }
  local t0 run chunk tables rest
  t0=$(date +%s)
  for run in 16384:384 65536:384 65536:128 32768:384; do
    chunk=${run%:*} tables=${run#*:}
    rest=$(( $1 - ($(date +%s) - t0) ))
    [ "$rest" -ge 20 ] || { echo "chunks: $chunk ($tables-tensor tables) not run, ${rest} s left"; return 124; }
    local suffix="chunk$chunk"
    [ "$tables" = 384 ] || suffix="chunk${chunk}_tables$tables"
    AMM_CUDA_CHUNK=$chunk AMM_CUDA_TABLE_TENSORS=$tables bench "$rest" bench/throughput.py --layouts model \
      --sizes 1e8,1e9 --stem-suffix "$suffix" --only "AMAdamW[cuda],AMSGD[cuda]" || return $?
  done
  rest=$(( $1 - ($(date +%s) - t0) ))
  [ "$rest" -ge 20 ] || { echo "chunks: the breakdown not run, ${rest} s left"; return 124; }
  AMM_CUDA_CHUNK=16384 bench "$rest" bench/bench_kernel_breakdown.py --size 1e8 --only "[cuda]" --out-dir bench/results/chunk16384
}

# ncu's cases one after another, each in its own process (not yet timed: a fresh python, three steps,
# Triton's compiles for its cases, ncu's replay passes over the step's main kernels), the likeliest to
# explain a shortfall first; no permission for the counters ends the part after the first case
part_ncu() { bench "$1" bench/ncu_kernels.py --timeout 75 --budget $(( $1 - 5 )) --keep-raw; }

# compute-sanitizer (racecheck, synccheck, memcheck) on small steps of the main kernel paths
# (bench/sanitize_step.py: shared-memory hazards, barriers, out-of-bounds and misaligned accesses on
# the real GPU, which the CPU simulator cannot show). Each tool gets an equal share of what is left;
# a finding (exit 9) fails the part, a tool stopped at its share makes it "stopped at its limit".
find_sanitizer() {
  command -v compute-sanitizer && return
  ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -n 1 | grep . && return
  local sp  # the nvidia-cuda-sanitizer-api wheel's copy
  for sp in $("$PY" -c "import site; print(' '.join(site.getsitepackages()))" 2>/dev/null); do
    ls "$sp"/nvidia/cuda_sanitizer_api/compute-sanitizer/compute-sanitizer 2>/dev/null && return
  done
  return 1
}

part_sanitize() {
  local cs found=0 cut=0 t0 tool rest share s n=3
  cs="$(find_sanitizer)" || { echo "compute-sanitizer not found: nothing checked"; return 1; }
  has_cuda_part || { echo "amm_kernels._C has no CUDA part (see build.log)"; return 1; }
  t0=$(date +%s)
  for tool in racecheck synccheck memcheck; do
    rest=$(( $1 - ($(date +%s) - t0) ))
    share=$(( rest / n )); n=$(( n - 1 ))
    if [ "$share" -lt 15 ]; then echo "== $tool: not run, ${rest} s left" | tee -a "$OUT/sanitize.log"; cut=1; continue; fi
    echo "== compute-sanitizer --tool $tool (limit ${share} s)" | tee -a "$OUT/sanitize.log"
    # memcheck without the caching allocator: an overrun then leaves its allocation instead of landing
    # in a neighbour's part of one cached segment (only there: the variable is read as set, whatever
    # its value, by some torch versions)
    local envs=() which=cuda,triton
    [ "$tool" = memcheck ] && envs=(PYTORCH_NO_CUDA_MEMORY_CACHING=1)
    # racecheck is the slowest: twice it ran the CUDA backend's 31 runs and was cut in Triton's (40 s, 20 s)
    [ "$tool" = racecheck ] && which=cuda
    limited "$share" env "${envs[@]}" "$cs" --tool "$tool" --error-exitcode 9 "$PY" bench/sanitize_step.py --backends "$which" 2>&1 \
      | tail -n 40 | tee -a "$OUT/sanitize.log"
    s=${PIPESTATUS[0]}
    case $s in
      0) echo "== $tool: clean" | tee -a "$OUT/sanitize.log" ;;
      124|137) echo "== $tool: stopped at its limit (${share} s)" | tee -a "$OUT/sanitize.log"; cut=1 ;;
      *) echo "== $tool: exit $s (9: a finding)" | tee -a "$OUT/sanitize.log"; found=1 ;;
    esac
  done
  [ $found -eq 0 ] || return 1
  [ $cut -eq 0 ] || return 124
  return 0
}

# the variants one after another, each with what is left of the part (at most 90 s: base compiles every
# kernel from an empty cache; the others only what they change): a part cut short keeps the first ones
part_triton_variants() { bench "$1" bench/bench_triton_variants.py --timeout 90 --budget $(( $1 - 5 )); }

part_variants() { bench "$1" bench/bench_cuda_variants.py; }

part_breakdown() { bench "$1" bench/bench_kernel_breakdown.py --size 1e8; }

part_overhead() { bench "$1" bench/train_step_overhead.py --d 1024 --layers 12 --batch 16 --ctx 512; }

part_bench_full() { bench "$1" bench/throughput.py; }

part_memory() { bench "$1" bench/step_memory.py --device cuda; }

part_conv() { bench "$1" bench/conv_lm.py --steps 600 --seeds 2 --d 512 --layers 8 --batch 32 --ctx 256; }

# Everything written under bench/results by this call, and the junit files, in one archive (again
# after every part: a call cut short by the device tool still returns what the finished parts wrote).
pack() {
  { find bench/results -type f -newer "$STAMP_T" 2>/dev/null; ls "$JUNIT"/junit_*.xml 2>/dev/null; } > "$JUNIT/.list"
  tar czf "$OUT/results.tgz.part" --transform 's,^.*/junit_,junit_,' -T "$JUNIT/.list" 2>/dev/null
  mv -f "$OUT/results.tgz.part" "$OUT/results.tgz"
}

{
  # the commit: .carry/commit where the caller wrote it (the device's copy of the tree may lack .git)
  commit="$(git rev-parse --short HEAD 2>/dev/null || cat .carry/commit 2>/dev/null || echo unknown)"
  echo "== $(date -u +%FT%TZ) gpu_session ${parts[*]} (budget ${BUDGET} s): commit $commit"
  timeout -k 5 30 nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv || echo "nvidia-smi failed"
  timeout -k 5 60 "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'gpu', torch.cuda.is_available())"
  timeout -k 5 60 "$PY" -c "import triton; print('triton', triton.__version__)" || echo "triton: import failed"
  command -v nvcc >/dev/null && nvcc --version | tail -n 1
} 2>&1 | tee -a "$OUT/session.log"

for p in "${parts[@]}"; do
  if ! declare -F "part_$p" >/dev/null; then log "== part $p: unknown (parts: ${!MAX_S[*]})"; status=1; continue; fi
  budget=$(left)
  limit=$(( budget < ${MAX_S[$p]} ? budget : ${MAX_S[$p]} ))
  if [ "$limit" -lt "${MIN_S[$p]:-20}" ]; then log "== part $p: skipped, ${budget} s of the budget left"; unfinished+=("$p"); continue; fi
  start=$(date +%s)
  log "== part $p (limit ${limit} s)"
  "part_$p" "$limit" > "$OUT/part_$p.out" 2>&1
  rc=$?
  tail -n 25 "$OUT/part_$p.out" | tee -a "$OUT/session.log"
  rm -f "$OUT/part_$p.out"
  # 124: stopped at the limit; 137: killed, which is the limit only if the limit had passed (else OOM)
  { [ $rc -eq 124 ] || { [ $rc -eq 137 ] && [ $(( $(date +%s) - start )) -ge "$limit" ]; }; } && \
    { log "   (stopped at its limit of ${limit} s)"; unfinished+=("$p"); }
  log "== part $p rc=$rc in $(( $(date +%s) - start )) s"
  [ $rc -eq 0 ] || status=1
  pack
done

pack
rm -rf "$JUNIT" "$STAMP_T"
log "== done in $(( $(date +%s) - T0 )) s, status $status; results.tgz: $(tar tzf "$OUT/results.tgz" 2>/dev/null | tr '\n' ' ')"
# The machine stays warm 30 s after a call and keeps the build: a second call started at once can run
# what did not fit (it skips the build when csrc/ is unchanged), if the session's device time allows.
# Its budget must fit the device time left (status's budget_left_s), less the start and the packing.
[ ${#unfinished[@]} -gt 0 ] && log "== unfinished: ${unfinished[*]} (next: AMM_GPU_BUDGET_S=<device time left - 60> OUT=\$OUT bash bench/gpu_session.sh ${unfinished[*]})"
exit $status

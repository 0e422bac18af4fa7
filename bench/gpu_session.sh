#!/usr/bin/env bash
# What a GPU session runs (no network there), in stages that each fit one device call (10 minutes):
#   bash bench/gpu_session.sh build test     # call 1: strict build of amm_kernels._C with CUDA, the GPU tests
#   bash bench/gpu_session.sh build bench    # call 2: step throughput (bench_cuda_variants, throughput)
#   bash bench/gpu_session.sh build conv     # call 3: train-step overhead, the LM convergence run
# (no stage named: build test bench). "build" is skipped when the extension in the tree already has
# its CUDA part and was built from the same csrc/ (a warm machine, or the .so carried back: the build
# copies it to $OUT; put it at the same path here and name it in the call's `carry`).
# Every stage runs under `timeout`, logs to $OUT/<stage>.log, and prints its wall time; the vectors
# for the conformance tests travel in .carry/vectors (git-ignored: cp -r ../shared/vectors .carry/).
set -o pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(build test bench)
status=0

src_hash() { cat setup.py csrc/*.h csrc/*.cpp csrc/*/* 2>/dev/null | sha1sum | cut -c1-12; }

stage_build() {
  local stamp=".carry/build_stamp" want
  want="$(src_hash)"
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && \
     "$PY" -c "import amm_kernels._C as c, sys; sys.exit(0 if c.has_cuda else 1)" 2>/dev/null; then
    echo "build: amm_kernels._C with CUDA is already built from csrc/ $want; skipped"
    return 0
  fi
  PYTHON="$PY" .ci/nvcc_check || return 1
  MAX_JOBS="${MAX_JOBS:-16}" AMM_KERNELS_STRICT_BUILD=1 timeout 420 "$PY" -m pip install --no-deps \
    --no-build-isolation -v -e . > "$OUT/build_full.log" 2>&1
  local rc=$?
  tail -n 30 "$OUT/build_full.log"
  [ $rc -eq 0 ] || { echo "build rc=$rc"; return $rc; }
  "$PY" -c "import amm_kernels._C as c; assert c.has_cuda, 'no CUDA part'; print('amm_kernels._C has_cuda =', c.has_cuda)" || return 1
  mkdir -p .carry && echo "$want" > "$stamp"
  cp amm_kernels/_C*.so "$OUT/" 2>/dev/null && cp "$stamp" "$OUT/"
  return 0
}

stage_test() {
  if [ -d .carry/vectors ]; then
    AMM_VECTORS_DIR="$(mktemp -d)/vectors"; cp -r .carry/vectors "$AMM_VECTORS_DIR"; export AMM_VECTORS_DIR
  fi
  local par=()
  "$PY" -c "import xdist" 2>/dev/null && par=(-n 8)
  timeout 500 "$PY" -m pytest -q tests -k "(cuda or triton or compiled or persistent or graph) and not cuda_sim" "${par[@]}" \
    -p timeout --timeout 240 -rs --junitxml="$OUT/pytest.xml"
}

stage_bench() {
  timeout 200 "$PY" bench/bench_cuda_variants.py; local a=$?
  timeout 360 "$PY" bench/throughput.py --max-size 3e8; local b=$?
  cp bench/results/cuda_variants_* bench/results/throughput_* "$OUT/" 2>/dev/null
  [ $a -eq 0 ] && [ $b -eq 0 ]
}

stage_conv() {
  timeout 120 "$PY" bench/train_step_overhead.py --d 1024 --layers 12 --batch 16 --ctx 512; local a=$?
  timeout 420 "$PY" bench/conv_lm.py --steps 2000 --seeds 3 --d 512 --layers 8 --batch 32 --ctx 256; local b=$?
  "$PY" bench/summarize.py > "$OUT/bench_tables.md"
  tar czf "$OUT/conv_results.tgz" bench/results
  [ $a -eq 0 ] && [ $b -eq 0 ]
}

{
  echo "== $(date -u +%FT%TZ) gpu_session ${stages[*]}: $(git rev-parse --short HEAD 2>/dev/null || echo no-git)"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv || echo "nvidia-smi failed"
  "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'gpu', torch.cuda.is_available())"
} 2>&1 | tee -a "$OUT/session.log"
for s in "${stages[@]}"; do
  start=$(date +%s)
  echo "== stage $s" | tee -a "$OUT/session.log"
  "stage_$s" > "$OUT/$s.log" 2>&1
  rc=$?
  tail -n 40 "$OUT/$s.log"
  echo "== stage $s rc=$rc in $(( $(date +%s) - start )) s" | tee -a "$OUT/session.log"
  [ $rc -eq 0 ] || status=1
  if [ "$s" = build ] && [ $rc -ne 0 ]; then echo "build failed: later stages skipped"; exit 1; fi
done
exit $status

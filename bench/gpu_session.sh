#!/usr/bin/env bash
# The one script a GPU session runs (no network): device info, strict build of amm_kernels._C with
# its CUDA part, the GPU tests, then the GPU step benchmark if present. Everything goes to $OUT/log.
#   bash bench/gpu_session.sh          (from the repository root; $OUT defaults to ./gpu_out)
set -o pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"

{
  echo "== $(date -u +%FT%TZ) gpu_session: $(git rev-parse --short HEAD 2>/dev/null || echo no-git)"
  nvidia-smi || echo "nvidia-smi failed"
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available())"
  command -v nvcc >/dev/null && nvcc --version | tail -n 1

  echo "== nvcc compile check"
  if [ -x .ci/nvcc_check ]; then PYTHON="$PY" .ci/nvcc_check; echo "nvcc_check rc=$?"; fi

  echo "== build (AMM_KERNELS_STRICT_BUILD=1)"
  AMM_KERNELS_STRICT_BUILD=1 "$PY" -m pip install --no-deps --no-build-isolation -v -e . > "$OUT/build.log" 2>&1
  build_rc=$?
  tail -n 60 "$OUT/build.log"
  echo "build rc=$build_rc"
  "$PY" -c "import amm_kernels._C as c, torch; print('amm_kernels._C has_cuda =', c.has_cuda); print(torch.ops.amm_kernels.amsgd_step)"

  echo "== GPU tests"
  if [ -d .carry/vectors ]; then
    VDIR="$(mktemp -d)/vectors"; cp -r .carry/vectors "$VDIR"; export AMM_VECTORS_DIR="$VDIR"
    echo "AMM_VECTORS_DIR=$AMM_VECTORS_DIR"
  fi
  "$PY" -m pytest -q tests -k "cuda or triton or compiled" -rs --junitxml="$OUT/pytest.xml"
  test_rc=$?
  echo "pytest rc=$test_rc"
  echo "$build_rc $test_rc" > "$OUT/.rc"

  echo "== benchmarks (rows land in bench/results/, copied to \$OUT)"
  "$PY" bench/throughput.py; echo "throughput rc=$?"
  "$PY" bench/train_step_overhead.py --d 1024 --layers 12 --batch 16 --ctx 512; echo "train_step rc=$?"
  "$PY" bench/conv_lm.py --steps 3000 --seeds 3 --d 512 --layers 8 --batch 32 --ctx 256; echo "conv_lm rc=$?"
  "$PY" bench/summarize.py > "$OUT/bench_tables.md"
  tar czf "$OUT/bench_results.tgz" bench/results  # one file: the device tool returns at most 8
  echo "== done $(date -u +%FT%TZ)"
} 2>&1 | tee "$OUT/log"
read -r build_rc test_rc < "$OUT/.rc" 2>/dev/null || { build_rc=1; test_rc=1; }
rm -f "$OUT/.rc"
[ "$build_rc" = 0 ] && [ "$test_rc" = 0 ]

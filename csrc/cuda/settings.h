// Torch glue shared by ops_cuda.cpp and rllc_ops_cuda.cpp: the AMM_CUDA_* environment variables both
// read at every step. Needs c10 (TORCH_CHECK), not a pure-CUDA header.
#pragma once

#include <c10/util/Exception.h>

#include <cstdint>
#include <cstdlib>

#include "cuda/launchers.h"

namespace amm_cuda {

// The integer in the environment variable `name`, or `fallback` where it is unset or empty; anything
// else than an integer in [lo, hi] is an error naming the variable and the range.
inline int64_t env_int(const char* name, int64_t fallback, int64_t lo, int64_t hi) {
  const char* v = std::getenv(name);
  if (v == nullptr || *v == '\0') return fallback;
  char* end = nullptr;
  const long long parsed = std::strtoll(v, &end, 10);
  TORCH_CHECK(end != v && *end == '\0' && parsed >= lo && parsed <= hi, "amm_kernels (CUDA): ", name,
              " must be an integer in [", lo, ", ", hi, "], got '", v, "'");
  return parsed;
}

// NOTE [one launch per pass] in launchers.h: AMM_CUDA_TABLE_TENSORS caps the tensors of a table.
inline int64_t table_tensors() { return env_int("AMM_CUDA_TABLE_TENSORS", kMaxTensors, 1, kMaxTensors); }

}  // namespace amm_cuda

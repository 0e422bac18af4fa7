// Torch glue shared by ops_cuda.cpp and rllc_ops_cuda.cpp: the AMM_CUDA_* environment variables both
// read at every step, and the launch plan with its errors as torch's. Needs c10 (TORCH_CHECK), not a
// pure-CUDA header.
#pragma once

#include <c10/util/Exception.h>

#include <cstdint>
#include <cstdlib>
#include <stdexcept>
#include <vector>

#include "cuda/launchers.h"
#include "cuda/tensor_plan.h"

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

// plan_launches (tensor_plan.h, pure C++ for its own test) with a refused plan as a torch error.
inline LaunchPlan plan_or_throw(const std::vector<TensorDesc>& descs, bool one_block_per_tensor, int64_t chunk_size,
                                int64_t table_tensors) {
  try {
    return plan_launches(descs, one_block_per_tensor, chunk_size, table_tensors);
  } catch (const std::invalid_argument& err) {
    TORCH_CHECK(false, err.what());
  }
  return LaunchPlan{};  // unreachable
}

}  // namespace amm_cuda

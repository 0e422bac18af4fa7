// Host-side interface of the RLLC CUDA kernels (rllc_kernels.cu): the argument struct and the
// launchers. Plain C++17 plus the CUDA runtime header (no torch); rllc_ops_cuda.cpp fills it.
//
// A step is three kinds of launch on one stream, with no host sync and no float atomics:
//   pass 1   launch_rllc_sums      one multi-tensor launch per TensorTable (tensor_plan.h; lists kX
//                                   param, kG grad, kD memory base): per (tensor, chunk) block, the
//                                   double Gram / M^T g sums into the block's slot, and the TensorMeta;
//   finalize launch_rllc_finalize  one block: slots -> per-tensor sums -> per-scope sums (fixed
//                                   order) -> the law update (rllc_math.h's Jacobi pinv) and step;
//   pass 2   launch_rllc_update    one multi-tensor launch per TensorTable: memory rows and param,
//                                   reading the new law from the scope state (device pointer).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "cuda/launchers.h"
#include "rllc_math.h"

namespace amm_cuda {

struct RllcArgs {
  float U[amm::kRllcMaxK * amm::kRllcMaxK];  // row-major k x k, float32
  float b[amm::kRllcMaxK];
  int32_t k;
  int32_t num_tensors;
  const float* lr;          // [G]
  const float* grad_scale;  // 0-d or nullptr
  const float* found_inf;   // 0-d or nullptr: > 0 skips the step (nothing written)
  float* step;              // [S] scope state (pass 1 reads it before the finalize updates it)
  float* law;               // [S, k] scope state (the finalize writes the new law; pass 2 reads it)
  double* slots;            // [n_slots * n_sums] pass 1 output
  TensorMeta* meta;         // [T] pass 1 output
  double* tensor_sums;      // [T * n_sums] finalize workspace
  // NOTE [sharded sums] (launchers.h): sums_out set: the finalize writes each present scope's sums
  // to row s ([S, n_sums], zeros on the scope's first step) and nothing else, and there is no pass 2;
  // sums_in set: no pass 1 (a meta-only launch instead), the finalize takes the sums from row s.
  const double* sums_in;    // [S * n_sums] or nullptr
  double* sums_out;         // [S * n_sums] or nullptr
  double law_lr;
  double rcond;
};
static_assert(sizeof(TensorTable) + sizeof(RllcArgs) <= kMaxKernelArgBytes,
              "an RLLC pass's arguments exceed what a kernel takes (NOTE [one launch per pass] in launchers.h)");

// Bytes of the step's workspace and the offsets of its parts (16-byte aligned).
struct RllcWorkspace {
  int64_t slots_offset, meta_offset, sums_offset, total_bytes;
};
inline RllcWorkspace rllc_workspace(int64_t n_slots, int n_sums, int64_t n_tensors) {
  auto up = [](int64_t v) { return (v + 15) / 16 * 16; };
  RllcWorkspace w{};
  w.slots_offset = 0;
  w.meta_offset = up(n_slots * n_sums * static_cast<int64_t>(sizeof(double)));
  w.sums_offset = w.meta_offset + up(n_tensors * static_cast<int64_t>(sizeof(TensorMeta)));
  w.total_bytes = w.sums_offset + up(n_tensors * n_sums * static_cast<int64_t>(sizeof(double)));
  return w;
}

cudaError_t launch_rllc_sums(const TensorTable& table, const RllcArgs& args, cudaStream_t stream);
cudaError_t launch_rllc_finalize(const RllcArgs& args, cudaStream_t stream);
cudaError_t launch_rllc_update(const TensorTable& table, const RllcArgs& args, cudaStream_t stream);

}  // namespace amm_cuda

// AM-AdamW, two-pass: pass 1 and pass 2 as multi-tensor launches, one block per chunk: multi_tensor.cuh's
// reduce_chunk / update_chunk with amadamw_pass.cuh's ops, as the persistent step (persistent_kernels.cu).
#include "cuda/amadamw_pass.cuh"

namespace amm_cuda {
namespace {

__global__ void __launch_bounds__(kBlockSize)
amadamw_sums_kernel(const __grid_constant__ TensorTable table, const PassArgs args) {
  NoCache none;
  reduce_chunk<AmadamwPass>(table, args, static_cast<int>(blockIdx.x), none);
}

// Nothing is written when found_inf > 0.
__global__ void __launch_bounds__(kBlockSize)
amadamw_update_kernel(const __grid_constant__ TensorTable table, const PassArgs args) {
  if (step_skipped(args.found_inf)) return;
  NoCache none;
  update_chunk<AmadamwPass>(table, args, static_cast<int>(blockIdx.x), none);
}

}  // namespace

cudaError_t launch_amadamw_sums(const TensorTable& table, const PassArgs& args, cudaStream_t stream) {
  if (table.num_blocks == 0) return cudaSuccess;
  amadamw_sums_kernel<<<grid_of(table), kBlockSize, 0, stream>>>(table, args);
  return cudaGetLastError();
}

cudaError_t launch_amadamw_update(const TensorTable& table, const PassArgs& args, cudaStream_t stream) {
  if (table.num_blocks == 0) return cudaSuccess;
  amadamw_update_kernel<<<grid_of(table), kBlockSize, 0, stream>>>(table, args);
  return cudaGetLastError();
}

}  // namespace amm_cuda

// The finalize kernel of the two-pass step (one block; the math is finalize.cuh's), and the
// meta-only launch of adaptive=False.
#include "cuda/finalize.cuh"

namespace amm_cuda {
namespace {

__global__ void __launch_bounds__(kFinalizeThreads) finalize_kernel(const FinalizeArgs a) { finalize_block(a); }

// adaptive=False: no sums, but the finalize still needs every tensor's TensorMeta.
__global__ void write_meta_kernel(const __grid_constant__ TensorTable table, TensorMeta* meta) {
  const BlockWork work = locate_block(table);
  if (work.chunk == 0 && threadIdx.x == 0) write_tensor_meta(table, work.tensor, meta);
}

}  // namespace

cudaError_t launch_finalize(const FinalizeArgs& args, cudaStream_t stream) {
  if (args.num_tensors == 0) return cudaSuccess;
  finalize_kernel<<<1, kFinalizeThreads, 0, stream>>>(args);
  return cudaGetLastError();
}

cudaError_t launch_write_meta(const TensorTable& table, TensorMeta* meta, cudaStream_t stream) {
  if (table.num_blocks == 0) return cudaSuccess;
  write_meta_kernel<<<grid_of(table), 32, 0, stream>>>(table, meta);
  return cudaGetLastError();
}

}  // namespace amm_cuda

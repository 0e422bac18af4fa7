// Small kernels that show the simulator (amm_cuda_sim.h) finds what it claims to find, for
// tests/test_cuda_sim.py: torch.ops.amm_cuda_sim_selftest.run(name) runs one and returns what it wrote.
// Compiled only into the simulator library (build.py), with the same rewrites as csrc/.
#include <cooperative_groups.h>
#include <cuda_runtime.h>
#include <ATen/ATen.h>
#include <torch/library.h>

#include <stdexcept>
#include <string>
#include <vector>

namespace {

namespace cg = cooperative_groups;

// A correct block reduction (shuffles, then warp 0 over the warps' partials): out[0] = sum of 0..n-1.
__global__ void block_reduce(float* out) {
  __shared__ float partial[32];
  float v = static_cast<float>(threadIdx.x);
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = v;
  __syncthreads();
  if (threadIdx.x < 32) {
    v = threadIdx.x < blockDim.x / 32 ? partial[threadIdx.x] : 0.f;
    for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
    if (threadIdx.x == 0) out[blockIdx.x] = v;
  }
}

// The same without the barrier between writing the partials and reading them: a race.
__global__ void reduce_missing_barrier(float* out) {
  __shared__ float partial[32];
  float v = static_cast<float>(threadIdx.x);
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = v;
  if (threadIdx.x < 32) {
    v = threadIdx.x < blockDim.x / 32 ? partial[threadIdx.x] : 0.f;
    for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
    if (threadIdx.x == 0) out[blockIdx.x] = v;
  }
}

// Lane 0 of warp 1 waits at __syncthreads while the rest of its warp waits at a shuffle.
__global__ void divergent_barrier(float* out) {
  float v = 1.f;
  if (threadIdx.x == 32) __syncthreads();
  else if (threadIdx.x > 32 && threadIdx.x < 64) v = __shfl_down_sync(0xffffffffu, v, 1);
  out[threadIdx.x] = v;
}

__global__ void shared_overrun(float* out) {
  __shared__ float buf[64];
  buf[threadIdx.x] = 1.f;  // launched with 72 threads: 32 bytes past the end, inside the red zone
  out[threadIdx.x] = 0.f;
}

__global__ void uninitialised_shared(float* out) {
  __shared__ float buf[4];
  out[threadIdx.x] = buf[threadIdx.x % 4];
}

// out[512 + i] = (block b's value) + (block b+1's value), each written before the grid barrier.
__global__ void grid_sync(float* out) {
  out[blockIdx.x * blockDim.x + threadIdx.x] = static_cast<float>(blockIdx.x);
  cg::this_grid().sync();
  out[512 + blockIdx.x * blockDim.x + threadIdx.x] =
      out[blockIdx.x * blockDim.x + threadIdx.x] + out[((blockIdx.x + 1) % gridDim.x) * blockDim.x + threadIdx.x];
}

__global__ void dynamic_shared(float* out) {
  extern __shared__ float4 dyn[];
  reinterpret_cast<float*>(dyn)[threadIdx.x] = static_cast<float>(threadIdx.x);
  __syncthreads();
  out[threadIdx.x] = reinterpret_cast<float*>(dyn)[blockDim.x - 1 - threadIdx.x];
}

// A 16-byte vector store at an address 4 bytes past a 16-byte boundary.
__global__ void misaligned_vector_store(float* out) {
  __stwb(reinterpret_cast<float4*>(out + 1 + 4 * threadIdx.x), make_float4(1.f, 2.f, 3.f, 4.f));
}

// Writes one element past the end of `out` (1024 elements): only AddressSanitizer sees it.
__global__ void global_overrun(float* out) { out[1024 - 32 + threadIdx.x + 1] = 0.f; }

void check(cudaError_t err) {
  if (err != cudaSuccess) throw std::runtime_error(std::string("CUDA error (cuda_sim): ") + cudaGetErrorString(err));
}

at::Tensor run(const std::string& name) {
  at::Tensor out = at::full({1024}, -1.f);
  float* p = out.data_ptr<float>();
  if (name == "block_reduce") {
    block_reduce<<<2, 512>>>(p);
  } else if (name == "reduce_missing_barrier") {
    reduce_missing_barrier<<<1, 512>>>(p);
  } else if (name == "divergent_barrier") {
    divergent_barrier<<<1, 64>>>(p);
  } else if (name == "shared_overrun") {
    shared_overrun<<<1, 72>>>(p);
  } else if (name == "uninitialised_shared") {
    uninitialised_shared<<<1, 32>>>(p);
  } else if (name == "grid_sync_not_cooperative") {
    grid_sync<<<2, 32>>>(p);
  } else if (name == "grid_sync_cooperative" || name == "cooperative_too_large") {
    const unsigned blocks = name == "grid_sync_cooperative" ? 4u : 1000u;
    void* args[] = {&p};
    cudaFuncAttributes attr;
    check(cudaFuncGetAttributes(&attr, grid_sync));  // the typed call that registers the kernel
    check(cudaLaunchCooperativeKernel(reinterpret_cast<const void*>(&grid_sync), dim3(blocks), dim3(32), args, 0,
                                      nullptr));
  } else if (name == "dynamic_shared_over_48k") {
    dynamic_shared<<<1, 256, 64 * 1024>>>(p);
  } else if (name == "dynamic_shared_over_48k_raised") {
    check(cudaFuncSetAttribute(dynamic_shared, cudaFuncAttributeMaxDynamicSharedMemorySize, 64 * 1024));
    dynamic_shared<<<1, 256, 64 * 1024>>>(p);
  } else if (name == "misaligned_vector_store") {
    misaligned_vector_store<<<1, 32>>>(p);
  } else if (name == "global_overrun") {
    global_overrun<<<1, 32>>>(p);
  } else {
    throw std::invalid_argument("unknown self-test " + name);
  }
  check(cudaGetLastError());
  return out;
}

}  // namespace

// The bytes of list elements loaded and stored since the last call (NOTE [traffic hook]), and reset.
std::vector<int64_t> take_traffic() {
  const std::vector<int64_t> out{amm_sim::g_loaded_bytes, amm_sim::g_stored_bytes};
  amm_sim::g_loaded_bytes = amm_sim::g_stored_bytes = 0;
  return out;
}

TORCH_LIBRARY(amm_cuda_sim_selftest, m) {
  m.def("run(str name) -> Tensor", &run);
  m.def("take_traffic() -> int[]", &take_traffic);
}

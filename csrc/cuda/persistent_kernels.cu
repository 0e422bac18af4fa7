// The persistent step: pass 1, the finalize and pass 2 of a whole AM-SGD / AM-AdamW step in ONE
// cooperative launch, for steps whose tensors fit one TensorTable.
//
// NOTE [persistent step]: the two-pass step is three launches (pass 1, finalize, pass 2) and reads
// every byte of pass 1's lists twice. Here a grid of co-resident blocks (at most as many as the
// device holds at once: cudaLaunchCooperativeKernel refuses more) walks the table's chunks in a
// grid-stride loop:
//   1. each block runs pass 1 on its chunks (the same per-chunk function as the two-pass kernel,
//      so every slot is bit-identical to the two-pass step's) and keeps the first tiles it reads in
//      shared memory (NOTE [tile cache] in multi_tensor.cuh);
//   2. grid barrier; block 0 runs the finalize (finalize.cuh) while the others wait;
//   3. grid barrier; each block runs pass 2 on the same chunks in the same order, taking the kept
//      tiles from shared memory and re-reading from global memory only what did not fit.
// The slots, the finalize and the update math are the two-pass step's, so beta and every state
// tensor are bit-identical to it (tested on the GPU). What it saves is two launches and, for the
// kept tiles, one read of every list: the whole step's traffic for a model that fits on chip.
// The barriers are cooperative_groups' grid.sync(), which orders memory across the grid; pass 2
// reads the ScopeScratch that block 0 wrote past L1 (load_scratch). Which step runs is the host's
// choice (ops_cuda.cpp, NOTE [step variant]).
#include <cooperative_groups.h>

#include <mutex>

#include "cuda/amadamw_pass.cuh"
#include "cuda/amsgd_pass.cuh"
#include "cuda/finalize.cuh"

namespace amm_cuda {
namespace {

namespace cg = cooperative_groups;

constexpr int kMaxDevicesForPlans = 64;  // devices whose fits fit_kernel remembers

// One block per SM at most (the tile cache takes most of an SM's shared memory): 512 threads with
// up to 128 registers each.
template <class Pass>
__global__ void __launch_bounds__(kBlockSize, 1)
persistent_step_kernel(const __grid_constant__ TensorTable table, const PassArgs pass, const FinalizeArgs fin,
                       int cache_iters) {
  extern __shared__ float4 tile_smem[];  // float4: 16-byte alignment
  const cg::grid_group grid = cg::this_grid();
  TileCache<Pass::kCacheLists> cache{reinterpret_cast<float*>(tile_smem), cache_iters, 0, 0u, true};
  for (int64_t c = blockIdx.x; c < table.num_blocks; c += gridDim.x)  // (int64: c + gridDim.x may pass INT32_MAX)
    reduce_chunk<Pass>(table, pass, static_cast<int>(c), cache);
  grid.sync();  // every slot and every TensorMeta is written
  if (blockIdx.x == 0) finalize_block(fin);
  grid.sync();  // beta and the ScopeScratch are written
  if (step_skipped(pass.found_inf)) return;
  cache.next = 0;
  cache.filling = false;
  for (int64_t c = blockIdx.x; c < table.num_blocks; c += gridDim.x)
    update_chunk<Pass>(table, pass, static_cast<int>(c), cache);
}

template <class Pass>
int cache_bytes_per_iter() {
  return Pass::kCacheLists * kVec * kBlockSize * static_cast<int>(sizeof(float));
}

// Blocks per SM and the tile cache for a kernel, computed once per (device, algorithm, request).
struct Fit {
  int blocks_per_sm = 0;
  int cache_iters = 0;
  int smem_bytes = 0;
  int sms = 0;
};

template <class Pass>
cudaError_t fit_kernel(int device, int cache_iters_wanted, Fit* out) {
  static std::mutex mutex;
  static Fit fits[kMaxDevicesForPlans][kMaxCacheIters + 2];  // [device][wanted + 1]; wanted -1: as many as fit
  static bool known[kMaxDevicesForPlans][kMaxCacheIters + 2] = {};
  if (device < 0 || device >= kMaxDevicesForPlans) return cudaErrorInvalidDevice;
  const int wanted = cache_iters_wanted < 0 ? -1 : (cache_iters_wanted > kMaxCacheIters ? kMaxCacheIters : cache_iters_wanted);
  std::lock_guard<std::mutex> lock(mutex);
  if (known[device][wanted + 1]) {
    *out = fits[device][wanted + 1];
    return cudaSuccess;
  }
  // The attribute calls below take `device`, but cudaFuncGetAttributes, cudaFuncSetAttribute and the
  // occupancy query act on the current device: the caller's device guard must have made it `device`.
  int current = -1;
  cudaError_t err = cudaGetDevice(&current);
  if (err != cudaSuccess) return err;
  if (current != device) return cudaErrorInvalidDevice;
  Fit fit;
  int coop = 0, optin = 0;
  err = cudaDeviceGetAttribute(&coop, cudaDevAttrCooperativeLaunch, device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&fit.sms, cudaDevAttrMultiProcessorCount, device);
  cudaFuncAttributes attr{};
  if (err == cudaSuccess) err = cudaFuncGetAttributes(&attr, persistent_step_kernel<Pass>);
  if (err != cudaSuccess) return err;
  if (coop) {
    const int room = optin - static_cast<int>(attr.sharedSizeBytes);
    const int most = room > 0 ? room / cache_bytes_per_iter<Pass>() : 0;
    fit.cache_iters = wanted < 0 ? (most < kMaxCacheIters ? most : kMaxCacheIters) : (wanted < most ? wanted : most);
    fit.smem_bytes = fit.cache_iters * cache_bytes_per_iter<Pass>();
    // The kernel's limit is set to the most any request can use, not to this request's size: it is
    // one attribute per kernel, and a later, smaller request must not shrink it under an earlier plan.
    err = cudaFuncSetAttribute(persistent_step_kernel<Pass>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                               (most < kMaxCacheIters ? most : kMaxCacheIters) * cache_bytes_per_iter<Pass>());
    if (err == cudaSuccess) {
      err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&fit.blocks_per_sm, persistent_step_kernel<Pass>,
                                                          kBlockSize, fit.smem_bytes);
    }
    if (err != cudaSuccess) return err;
  }
  fits[device][wanted + 1] = fit;
  known[device][wanted + 1] = true;
  *out = fit;
  return cudaSuccess;
}

template <class Pass>
cudaError_t plan_for(int device, int64_t num_chunks, int cache_iters_wanted, PersistentPlan* plan) {
  Fit fit;
  const cudaError_t err = fit_kernel<Pass>(device, cache_iters_wanted, &fit);
  if (err != cudaSuccess) return err;
  const int64_t resident = static_cast<int64_t>(fit.blocks_per_sm) * fit.sms;
  plan->grid = static_cast<int>(num_chunks < resident ? num_chunks : resident);
  plan->cache_iters = fit.cache_iters;
  plan->smem_bytes = fit.smem_bytes;
  return cudaSuccess;
}

template <class Pass>
cudaError_t launch_for(const PersistentPlan& plan, const TensorTable& table, const PassArgs& pass,
                       const FinalizeArgs& fin, cudaStream_t stream) {
  int cache_iters = plan.cache_iters;
  void* args[] = {const_cast<TensorTable*>(&table), const_cast<PassArgs*>(&pass), const_cast<FinalizeArgs*>(&fin),
                  &cache_iters};
  return cudaLaunchCooperativeKernel(reinterpret_cast<const void*>(&persistent_step_kernel<Pass>), dim3(plan.grid),
                                     dim3(kBlockSize), args, static_cast<size_t>(plan.smem_bytes), stream);
}

}  // namespace

cudaError_t plan_persistent(int algorithm, int device, int64_t num_chunks, int cache_iters_wanted,
                            PersistentPlan* plan) {
  *plan = PersistentPlan{};
  if (num_chunks <= 0 || num_chunks > INT32_MAX) return cudaSuccess;
  return algorithm == kAlgoAmsgd ? plan_for<AmsgdPass>(device, num_chunks, cache_iters_wanted, plan)
                                 : plan_for<AmadamwPass>(device, num_chunks, cache_iters_wanted, plan);
}

cudaError_t launch_persistent_step(int algorithm, const PersistentPlan& plan, const TensorTable& table,
                                   const PassArgs& pass, const FinalizeArgs& fin, cudaStream_t stream) {
  if (plan.grid <= 0) return cudaErrorInvalidConfiguration;
  return algorithm == kAlgoAmsgd ? launch_for<AmsgdPass>(plan, table, pass, fin, stream)
                                 : launch_for<AmadamwPass>(plan, table, pass, fin, stream);
}

}  // namespace amm_cuda

// CUDA-on-CPU stand-in (tests/cuda_sim): launches run synchronously, so there is one null stream.
#pragma once
#include <c10/core/Device.h>

#include "amm_cuda_sim.h"

namespace c10 {
namespace cuda {
struct CUDAStream {
  cudaStream_t stream() const { return nullptr; }
};
inline CUDAStream getCurrentCUDAStream(c10::DeviceIndex = -1) { return CUDAStream{}; }
}  // namespace cuda
}  // namespace c10

// CPU tensors stand for the simulated device 0 (build.py rewrites `device.index()` to this).
inline c10::DeviceIndex amm_sim_device_index(const c10::Device&) { return 0; }

// CUDA-on-CPU stand-in (tests/cuda_sim): one simulated device, so the guard has nothing to switch.
#pragma once
#include <c10/core/Device.h>

#include "amm_cuda_sim.h"

namespace c10 {
namespace cuda {
struct CUDAGuard {
  explicit CUDAGuard(c10::Device) {}
};
}  // namespace cuda
}  // namespace c10

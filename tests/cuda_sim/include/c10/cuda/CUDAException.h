// CUDA-on-CPU stand-in (tests/cuda_sim).
#pragma once
#include <c10/util/Exception.h>

#include "amm_cuda_sim.h"

#define C10_CUDA_CHECK(EXPR)                                                                   \
  do {                                                                                         \
    const cudaError_t amm_sim_err = (EXPR);                                                    \
    TORCH_CHECK(amm_sim_err == cudaSuccess, "CUDA error (cuda_sim): ", cudaGetErrorString(amm_sim_err)); \
  } while (0)

// CUDA-on-CPU stand-in (tests/cuda_sim): the real header is not used in the simulator build.
#pragma once
#include "amm_cuda_sim.h"

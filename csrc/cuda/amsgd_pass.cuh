// AM-SGD (SPEC.md section 1) for the chunk passes of multi_tensor.cuh (reduce_chunk, update_chunk):
// the element ops of pass 1 (the sums of beta) and pass 2 (momentum and parameter), and which lists
// each pass reads and writes. Used by the two-pass kernels (amsgd_kernels.cu) and the persistent step
// (persistent_kernels.cu). The per-element math is amm_math.h's.
#pragma once

#include "cuda/multi_tensor.cuh"

namespace amm_cuda {

struct AmsgdSumsOp {
  float inv_scale, wd, lam;
  bool maximize;
  float acc[amm::kAmsgdSums];

  template <int N>
  __device__ __forceinline__ void apply(float (&r)[kMaxLists][kVec]) {
#pragma unroll
    for (int j = 0; j < N; ++j) {
      const float g = amm::effective_grad(r[kG][j], r[kX][j], inv_scale, maximize, wd);
      const amm::AmsgdTerms t = amm::amsgd_terms(g, r[kD][j], lam);
      acc[amm::kSgdGD] += t.gd;
      acc[amm::kSgdB] += t.b;
      acc[amm::kSgdD] += t.d;
    }
  }
};

struct AmsgdUpdateOp {
  float inv_scale, wd, lam, beta, lr;
  bool maximize, first_step;

  template <int N>
  __device__ __forceinline__ void apply(float (&r)[kMaxLists][kVec]) {
#pragma unroll
    for (int j = 0; j < N; ++j) {
      const float x = r[kX][j];
      const float g = amm::effective_grad(r[kG][j], x, inv_scale, maximize, wd);
      const float d_new = amm::amsgd_momentum(g, first_step ? 0.f : r[kD][j], beta, lam, first_step);
      r[kD][j] = d_new;
      r[kX][j] = amm::sgd_param(x, d_new, lr);
    }
  }
};

struct AmsgdPass {
  static constexpr int kSums = amm::kAmsgdSums;
  static constexpr int kCacheLists = 3;  // x, g, d (NOTE [tile cache])
  static constexpr uint32_t kUpdateStores = (1u << kX) | (1u << kD);

  // Pass 1 reads x only where coupled weight decay needs it.
  __device__ static __forceinline__ uint32_t sums_loads(const TensorEntry& e) {
    return (1u << kG) | (1u << kD) | (static_cast<float>(e.weight_decay) != 0.f ? (1u << kX) : 0u);
  }
  __device__ static __forceinline__ AmsgdSumsOp sums_op(const PassArgs& args, const TensorEntry& e) {
    return AmsgdSumsOp{inv_grad_scale(args.grad_scale), static_cast<float>(e.weight_decay), args.lam, args.maximize,
                       {0.f, 0.f, 0.f}};
  }

  // d <- g on the first step: the old d is not read.
  __device__ static __forceinline__ uint32_t update_loads(bool first) {
    return (1u << kX) | (1u << kG) | (first ? 0u : (1u << kD));
  }
  __device__ static __forceinline__ AmsgdUpdateOp update_op(const PassArgs& args, const TensorEntry& e,
                                                            const ScopeScratch& sc) {
    return AmsgdUpdateOp{inv_grad_scale(args.grad_scale), static_cast<float>(e.weight_decay), args.lam, sc.beta,
                         args.lr[e.group], args.maximize, sc.first_step != 0.f};
  }
};

}  // namespace amm_cuda

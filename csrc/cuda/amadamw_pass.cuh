// AM-AdamW (SPEC.md section 2) for the chunk passes of multi_tensor.cuh (reduce_chunk, update_chunk):
// the element ops of pass 1 (the sums of beta, with v and p recomputed in registers: v is written
// only by pass 2) and pass 2 (v, d and x), and which lists each pass reads and writes. Used by the
// two-pass kernels (amadamw_kernels.cu) and the persistent step (persistent_kernels.cu). Per-element
// math: amm_math.h.
#pragma once

#include "cuda/multi_tensor.cuh"

namespace amm_cuda {

struct AdamwElement {
  float inv_scale, lam, mu, beta2, eps, bias1, bias2;
  bool maximize;
  float one_minus_beta2;  // formed in double (NOTE [1 - beta2] in amm_math.h)

  // g, the new v and the preconditioner p of one element.
  __device__ __forceinline__ void precondition(float grad, float v, float* g, float* v_new, float* p) const {
    *g = amm::effective_grad(grad, 0.f, inv_scale, maximize, 0.f);  // decoupled decay: no L2 term
    *v_new = amm::adamw_second_moment(*g, v, beta2, one_minus_beta2);
    *p = amm::adamw_precond(*v_new, bias1, bias2, eps);
  }
};

struct AmadamwSumsOp {
  AdamwElement el;
  float acc[amm::kAmadamwSums];

  template <int N>
  __device__ __forceinline__ void apply(float (&r)[kMaxLists][kVec]) {
#pragma unroll
    for (int j = 0; j < N; ++j) {
      float g, v_new, p;
      el.precondition(r[kG][j], r[kV][j], &g, &v_new, &p);
      const float x = el.mu != 0.f ? r[kX][j] : 0.f;  // not loaded without decay (AmadamwPass::sums_loads)
      const amm::AmadamwTerms t = amm::amadamw_terms(g, r[kD][j], x, p, el.lam, el.mu);
      acc[amm::kAdamA] += t.a;
      acc[amm::kAdamB] += t.b;
      acc[amm::kAdamC] += t.c;
      acc[amm::kAdamD] += t.d;
    }
  }
};

struct AmadamwUpdateOp {
  AdamwElement el;
  float beta, lr;

  template <int N>
  __device__ __forceinline__ void apply(float (&r)[kMaxLists][kVec]) {
#pragma unroll
    for (int j = 0; j < N; ++j) {
      float g, v_new, p;
      el.precondition(r[kG][j], r[kV][j], &g, &v_new, &p);
      const float d_new = amm::amadamw_momentum(g, r[kD][j], p, beta, el.lam);
      r[kV][j] = v_new;
      r[kD][j] = d_new;
      r[kX][j] = amm::adamw_param(r[kX][j], d_new, p, lr, el.mu);
    }
  }
};

struct AmadamwPass {
  static constexpr int kSums = amm::kAmadamwSums;
  static constexpr int kCacheLists = 4;  // x, g, d, v (NOTE [tile cache])
  static constexpr uint32_t kAllLists = (1u << kX) | (1u << kG) | (1u << kD) | (1u << kV);
  static constexpr uint32_t kUpdateStores = (1u << kX) | (1u << kD) | (1u << kV);

  __device__ static __forceinline__ AdamwElement element(const PassArgs& args, const TensorEntry& e, float bias1,
                                                          float bias2) {
    return AdamwElement{inv_grad_scale(args.grad_scale), args.lam, static_cast<float>(e.weight_decay), args.beta2,
                        args.eps, bias1, bias2, args.maximize, static_cast<float>(1.0 - args.beta2_d)};
  }

  // Pass 1 reads x only where there is weight decay (NOTE [x in pass 1] in amadamw_reference.py).
  __device__ static __forceinline__ uint32_t sums_loads(const TensorEntry& e) {
    return static_cast<float>(e.weight_decay) != 0.f ? kAllLists : (kAllLists & ~(1u << kX));
  }
  // Pass 1 forms the step's bias corrections itself; the finalize forms the same ones for pass 2
  // (NOTE [scope scratch] in finalize.cuh).
  __device__ static __forceinline__ AmadamwSumsOp sums_op(const PassArgs& args, const TensorEntry& e) {
    float bias1, bias2;
    adamw_bias(args.step[e.scope], args.beta_prod[e.scope], args.beta_max_d, args.beta2_d, &bias1, &bias2);
    return AmadamwSumsOp{element(args, e, bias1, bias2), {0.f, 0.f, 0.f, 0.f}};
  }

  __device__ static __forceinline__ uint32_t update_loads(bool) { return kAllLists; }
  __device__ static __forceinline__ AmadamwUpdateOp update_op(const PassArgs& args, const TensorEntry& e,
                                                              const ScopeScratch& sc) {
    return AmadamwUpdateOp{element(args, e, sc.bias1, sc.bias2), sc.beta, args.lr[e.group]};
  }
};

}  // namespace amm_cuda

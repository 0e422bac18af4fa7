// The per-element math of SPEC.md, once, for every C++ kernel (CPU and CUDA include this file).
// Plain C++17 with no torch or CUDA runtime dependency: `nvcc -c` and g++ both compile it alone.
//
// A step is two passes over memory (see amm_kernels/_step.py and amm_kernels/reference/):
//   pass 1: per element, the terms of beta's sums, accumulated into float32 per-block slots;
//   finalize: per tensor, weight its sums by its group's step sizes (double), sum per scope in a
//             fixed order, and turn them into beta (scope_beta below);
//   pass 2: per element, the momentum (and second moment) and parameter update with the tensor's beta.
#pragma once

#include <cmath>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define AMM_HD __host__ __device__ __forceinline__
#else
#define AMM_HD inline
#endif

namespace amm {

// Slots of the per-tensor sums (named so every kernel indexes them the same way).
enum AmsgdSum : int { kSgdGD = 0, kSgdB = 1, kSgdD = 2, kAmsgdSums = 3 };
enum AdamwSum : int { kAdamA = 0, kAdamB = 1, kAdamC = 2, kAdamD = 3, kAmadamwSums = 4 };

// ---------------------------------------------------------------------------------------------
// The effective gradient: grad / grad_scale, negated if maximize, plus coupled L2 (AMSGD only). The L2
// term only where there is decay, as the reference adds it (and torch.optim.SGD): g + 0 * x would turn
// a gradient of -0 into +0, so the momentum's zeros would lose their sign, and an inf x would give NaN.
// The scale is applied as a product with its reciprocal (formed outside the element loops): exact for
// the powers of two a GradScaler uses, within an ulp of the reference's division otherwise (the Triton
// kernels divide: am_math.py).
AMM_HD float effective_grad(float grad, float x, float inv_grad_scale, bool maximize, float coupled_wd) {
  float g = grad * inv_grad_scale;
  if (maximize) g = -g;
  return coupled_wd != 0.f ? g + coupled_wd * x : g;
}

// ---------------------------------------------------------------------------------------------
// AM-SGD (SPEC.md section 1)
struct AmsgdTerms {
  float gd, b, d;  // <g, d>, <d - g, g + lam d>, <d - g, d - g>
};

AMM_HD AmsgdTerms amsgd_terms(float g, float d, float lam) {
  const float diff = d - g;
  // NOTE [sum of squares]: D is accumulated as diff * diff, never |g|^2 - 2<g,d> + |d|^2.
  return {g * d, diff * (g + lam * d), diff * diff};
}

AMM_HD float amsgd_momentum(float g, float d, float beta, float lam, bool first_step) {
  return first_step ? g : ((beta + lam) * d + (1.f - beta) * g) / (1.f + lam);
}

AMM_HD float sgd_param(float x, float d_new, float lr) { return x - lr * d_new; }

// Per-tensor weighting (SPEC.md section 3): num_t = (lam + 1) eta_prev <g,d> - eta B, den_t = eta D.
// In loss mode the first-order term is left out; the finalize adds (lam + 1) (prev_loss - loss).
AMM_HD void amsgd_weighted(const float* sums, double lr, double prev_lr, double lam, bool first_order,
                           double* num, double* den) {
  *num = (first_order ? (lam + 1.0) * prev_lr * sums[kSgdGD] : 0.0) - lr * sums[kSgdB];
  *den = lr * sums[kSgdD];
}

// ---------------------------------------------------------------------------------------------
// AM-AdamW (SPEC.md section 2). bias1 = 1 - beta_max * beta_prod, bias2 = 1 - beta2^t, both formed
// in double by the caller (NOTE [bias corrections in float64] in amadamw_reference.py).
// NOTE [1 - beta2]: one_minus_beta2 is formed by the caller in double and rounded once: 1.f - beta2
// from a float32 beta2 = 0.999 is 1.3e-5 off 0.001, which the float32 tolerance notices.
AMM_HD float adamw_second_moment(float g, float v, float beta2, float one_minus_beta2) {
  return beta2 * v + one_minus_beta2 * g * g;
}

AMM_HD float adamw_precond(float v_new, float bias1, float bias2, float eps) {
  return bias1 * (eps + sqrtf(v_new / bias2));
}

struct AmadamwTerms {
  float a, b, c, d;  // <g, mu x + d/p>, <w (d-g), g + lam p d>, <d - g, x>, <w (d-g), d-g>
};

AMM_HD AmadamwTerms amadamw_terms(float g, float d, float x, float p, float lam, float mu) {
  const float w = 1.f / ((1.f + lam * p) * p);
  const float diff = d - g;
  return {g * (mu * x + d / p), w * diff * (g + lam * p * d), diff * x, w * diff * diff};
}

AMM_HD float amadamw_momentum(float g, float d, float p, float beta, float lam) {
  return (beta * d + lam * p * d + (1.f - beta) * g) / (1.f + lam * p);
}

AMM_HD float adamw_param(float x, float d_new, float p, float lr, float mu) {
  return (1.f - lr * mu) * x - lr * d_new / p;
}

// Per-tensor weighting: num_t = eta_prev A - c (B + mu C), den_t = c D, c = eta / (1 + mu eta).
AMM_HD void amadamw_weighted(const float* sums, double lr, double prev_lr, double mu, double* num, double* den) {
  const double c = lr / (1.0 + mu * lr);
  *num = prev_lr * sums[kAdamA] - c * (sums[kAdamB] + mu * sums[kAdamC]);
  *den = c * sums[kAdamD];
}

// ---------------------------------------------------------------------------------------------
// Beta of one scope from its summed num and den (SPEC.md sections 1-3 and 5).
// NOTE [non-finite sums]: a NaN/inf in the sums gives a NaN beta (not beta_max), as in the reference;
// comparisons are written so NaN propagates (fminf/fmaxf would drop it).
AMM_HD float scope_beta(double num, double den, float beta_min, float beta_max, bool first_step, bool adaptive) {
  if (first_step || !adaptive) return beta_max;
  if (!(std::isfinite(num) && std::isfinite(den))) return NAN;
  if (!(den > 0.0)) return beta_max;
  double beta = num / den;
  beta = beta < beta_min ? beta_min : beta;
  beta = beta > beta_max ? beta_max : beta;
  return static_cast<float>(beta);
}

}  // namespace amm

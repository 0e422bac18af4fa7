// The per-element and per-scope math of RLLC (SPEC.md section 4), once, for the CPU and CUDA kernels.
// Plain C++17 with no torch or CUDA runtime dependency: `nvcc -c` and g++ both compile it alone.
// It matches amm_kernels/reference/rllc_reference.py operation for operation:
//
//   pass 1, per element:  the k(k+1)/2 Gram terms m_a m_b (a <= b, gram_pairs order) and the k terms
//                         m_a g, as float32 values multiplied in double (exact) and summed in double
//                         (NOTE [Gram precision] in rllc_reference.py)          -> rllc_accumulate
//   finalize, per scope:  L <- L + c2 pinv(G) r, not on the scope's first step   -> rllc_law_update
//                         (pinv by cyclic Jacobi in double, relative cutoff rcond * max eigenvalue)
//   pass 2, per element:  m_new[a] = b[a] g + sum_c U[c][a] m[c]  (float32, c in order)
//                         x_new = x - lr * (0 + sum_a L[a] m_new[a])           -> rllc_memory_update,
//                                                                                 rllc_param
#pragma once

#include <cmath>

#include "amm_math.h"  // AMM_HD

// Loops over the k memory units unrolled completely: `#pragma unroll` in nvcc's device pass, GCC's own
// pragma for g++ (NOTE [RLLC lanes] in csrc/cpu/rllc_cpu.cpp: without it GCC left the triangular
// loop of the Gram terms rolled for k >= 3, and the lane loop around it unvectorized). Other host
// compilers get nothing (they would warn about an unknown pragma).
#if defined(__CUDA_ARCH__)
#define AMM_RLLC_UNROLL _Pragma("unroll")
#elif defined(__GNUC__) && !defined(__clang__) && !defined(__CUDACC__)
#define AMM_RLLC_UNROLL _Pragma("GCC unroll 64")
#else
#define AMM_RLLC_UNROLL
#endif

namespace amm {

// The largest memory the fused kernels handle (the Python driver falls back to the reference above).
constexpr int kRllcMaxK = 8;
AMM_HD constexpr int rllc_n_pairs(int k) { return k * (k + 1) / 2; }
// Sums per tensor: the Gram entries (gram_pairs order), then the k entries of M^T g.
AMM_HD constexpr int rllc_n_sums(int k) { return k * (k + 1) / 2 + k; }
constexpr int kRllcMaxSums = rllc_n_sums(kRllcMaxK);

// ---------------------------------------------------------------------------------------------
// float32 arithmetic exactly as written (no a*b+c contraction into an FMA, which nvcc does by
// default and which would differ from the reference's separately rounded torch ops). setup.py also
// builds with --fmad=false; these hold under AMM_FAST_MATH too, where RLLC's pinv needs them most.
AMM_HD float rl_mul(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
AMM_HD float rl_add(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}
AMM_HD float rl_sub(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}

// The effective gradient: grad / grad_scale (a division, as the reference's `g / grad_scale`).
AMM_HD float rllc_grad(float grad, bool has_scale, float grad_scale) { return has_scale ? grad / grad_scale : grad; }

// ---------------------------------------------------------------------------------------------
// Pass 1: one element's terms, term[rllc_n_sums(K)] (the Gram products m_a m_b, then m_a g), each a
// product of two float32 values in double, which is exact: whether a compiler then fuses the
// multiply with the add that sums it, the result is the same.
template <int K>
AMM_HD void rllc_terms(const float (&m)[K], float g, double* term) {
  double md[K];
AMM_RLLC_UNROLL
  for (int a = 0; a < K; ++a) md[a] = static_cast<double>(m[a]);
  int p = 0;
AMM_RLLC_UNROLL
  for (int a = 0; a < K; ++a) {
AMM_RLLC_UNROLL
    for (int b = a; b < K; ++b) term[p++] = md[a] * md[b];
  }
  const double gd = static_cast<double>(g);
AMM_RLLC_UNROLL
  for (int a = 0; a < K; ++a) term[p++] = md[a] * gd;
}

// ... added to acc[rllc_n_sums(K)].
template <int K>
AMM_HD void rllc_accumulate(const float (&m)[K], float g, double* acc) {
  double term[rllc_n_sums(K)];
  rllc_terms<K>(m, g, term);
AMM_RLLC_UNROLL
  for (int p = 0; p < rllc_n_sums(K); ++p) acc[p] += term[p];
}

// ---------------------------------------------------------------------------------------------
// Pass 2. U is row-major k x k float32 (U[c * K + a] = U[c][a]), b float32 [K]: column a of M U + g b^T,
// starting from b[a] g and adding U[c][a] m[c] for c = 0..K-1 (all terms, zeros included, so that
// inf/NaN propagate as in the reference).
template <int K>
AMM_HD void rllc_memory_update(const float (&m)[K], float g, const float* U, const float* b, float (&m_new)[K]) {
AMM_RLLC_UNROLL
  for (int a = 0; a < K; ++a) {
    float acc = rl_mul(b[a], g);
AMM_RLLC_UNROLL
    for (int c = 0; c < K; ++c) acc = rl_add(acc, rl_mul(U[c * K + a], m[c]));
    m_new[a] = acc;
  }
}

// x - lr * (0 + L[0] m_new[0] + ... + L[K-1] m_new[K-1]) (the reference's Python sum starts at 0).
template <int K>
AMM_HD float rllc_param(float x, const float (&m_new)[K], const float* law, float lr) {
  float dir = 0.f;
AMM_RLLC_UNROLL
  for (int a = 0; a < K; ++a) dir = rl_add(dir, rl_mul(law[a], m_new[a]));
  return rl_sub(x, rl_mul(lr, dir));
}

// ---------------------------------------------------------------------------------------------
// pinv(G) r for a k x k symmetric positive semi-definite G (k <= kRllcMaxK), in double.
// G is given as its upper-triangle entries in gram_pairs order, r as k entries; out gets k entries.
// Eigen-decomposition by cyclic Jacobi with a fixed number of sweeps (quadratic convergence: a few
// sweeps reach double rounding for k <= 8; extra sweeps only rotate by angles that round to nothing);
// eigenvalues <= rcond * the largest are dropped (minimum-norm least squares), as the reference's
// torch.linalg.eigh route. Non-finite G or r gives NaN in every entry (NOTE [non-finite sums]).
constexpr int kRllcJacobiSweeps = 12;

AMM_HD void rllc_pinv_apply(int k, const double* gram, const double* r, double rcond, double* out) {
  bool finite = true;
  const int n_pairs = rllc_n_pairs(k);
  for (int p = 0; p < n_pairs; ++p) finite = finite && std::isfinite(gram[p]);
  for (int a = 0; a < k; ++a) finite = finite && std::isfinite(r[a]);
  if (!finite) {
    for (int a = 0; a < k; ++a) out[a] = NAN;
    return;
  }
  double A[kRllcMaxK][kRllcMaxK];
  double V[kRllcMaxK][kRllcMaxK];
  int p = 0;
  for (int a = 0; a < k; ++a) {
    for (int b = a; b < k; ++b) {
      A[a][b] = gram[p];
      A[b][a] = gram[p];
      ++p;
    }
  }
  for (int a = 0; a < k; ++a)
    for (int b = 0; b < k; ++b) V[a][b] = a == b ? 1.0 : 0.0;

  for (int sweep = 0; sweep < kRllcJacobiSweeps; ++sweep) {
    for (int i = 0; i < k - 1; ++i) {
      for (int j = i + 1; j < k; ++j) {
        const double aij = A[i][j];
        if (aij == 0.0) continue;
        // The rotation J (J[i][i] = J[j][j] = c, J[i][j] = s, J[j][i] = -s) that zeroes A'[i][j] of
        // A' = J^T A J; t = tan(theta) is the smaller root of t^2 + 2 tau t - 1 = 0.
        const double tau = (A[j][j] - A[i][i]) / (2.0 * aij);
        const double t = (tau >= 0.0 ? 1.0 : -1.0) / (std::fabs(tau) + std::hypot(1.0, tau));
        const double c = 1.0 / std::sqrt(1.0 + t * t);
        const double s = t * c;
        for (int q = 0; q < k; ++q) {  // columns: A J
          const double aqi = A[q][i], aqj = A[q][j];
          A[q][i] = c * aqi - s * aqj;
          A[q][j] = s * aqi + c * aqj;
        }
        for (int q = 0; q < k; ++q) {  // rows: J^T (A J)
          const double aiq = A[i][q], ajq = A[j][q];
          A[i][q] = c * aiq - s * ajq;
          A[j][q] = s * aiq + c * ajq;
        }
        A[i][j] = 0.0;
        A[j][i] = 0.0;
        for (int q = 0; q < k; ++q) {  // eigenvectors: V J
          const double vqi = V[q][i], vqj = V[q][j];
          V[q][i] = c * vqi - s * vqj;
          V[q][j] = s * vqi + c * vqj;
        }
      }
    }
  }
  // Eigenvalues A[a][a], eigenvectors the columns of V: out = V diag(1/w, kept) V^T r.
  double w_max = A[0][0];
  for (int a = 1; a < k; ++a) w_max = A[a][a] > w_max ? A[a][a] : w_max;
  const double cutoff = rcond * w_max;
  double proj[kRllcMaxK];
  for (int a = 0; a < k; ++a) {
    double v_r = 0.0;
    for (int q = 0; q < k; ++q) v_r += V[q][a] * r[q];
    const double w = A[a][a];
    proj[a] = (w > cutoff ? 1.0 / w : 0.0) * v_r;  // the reference's inv_w * (V^T r)
  }
  for (int q = 0; q < k; ++q) {
    double acc = 0.0;
    for (int a = 0; a < k; ++a) acc += V[q][a] * proj[a];
    out[q] = acc;
  }
}

// The law of one scope after this step (float32 state, double arithmetic, rounded once):
// law_new[a] = law[a] on the scope's first step, else law[a] + law_lr * (pinv(G) r)[a].
// sums: the scope's rllc_n_sums(k) double sums (Gram entries, then M^T g).
AMM_HD void rllc_law_update(int k, const double* sums, const float* law, bool first_step, double law_lr,
                            double rcond, float* law_new) {
  if (first_step) {
    for (int a = 0; a < k; ++a) law_new[a] = law[a];
    return;
  }
  double corr[kRllcMaxK];
  rllc_pinv_apply(k, sums, sums + rllc_n_pairs(k), rcond, corr);
  for (int a = 0; a < k; ++a) law_new[a] = static_cast<float>(static_cast<double>(law[a]) + law_lr * corr[a]);
}

}  // namespace amm

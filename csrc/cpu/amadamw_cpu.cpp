// AM-AdamW on CPU: pass 1 (v in registers, the preconditioner p and the four sums of beta; writes
// nothing) and pass 2 (v, d and x). The per-element math is amm_math.h's, with the divisions shared
// (the helpers below); loops run over kLanes independent lanes so they vectorize without
// reassociating a float sum (see amsgd_cpu.cpp). Each chunk function exists for three instruction
// sets (cpu_kernels.h, Isa), identical in results.
// No a*b+c may become an FMA (the AVX2 / AVX-512 variants would then round differently from the
// baseline one): setup.py builds every C++ file with -ffp-contract=off.

#include "cpu_kernels.h"

#include <ATen/Parallel.h>

#include "amm_math.h"

#ifndef AMM_PREFETCH
#define AMM_PREFETCH 1024
#endif

namespace amm {
namespace cpu {
namespace {

// ---------------------------------------------------------------------------------------------
// The preconditioner and the reciprocals both passes need, with one division where amm_math.h's
// formulas have three (candidates for amm_math.h; the CUDA kernels pay for the divisions too):
//   p = bias1 (eps + sqrt(v_new / bias2))   with v_new / bias2 as v_new * inv_bias2 (inv_bias2 =
//                                            1 / bias2 formed once per tensor, in double)
//   q = 1 + lam p
//   r = 1 / (q p)                           = amm::amadamw_terms' w, exactly as it rounds it
//   1 / p = r q,  1 / q = r p               (two roundings more than a division: ~1.5 ulp)
struct Precond {
  float p, q, r;
};

AMM_ALWAYS_INLINE Precond adamw_precond_shared(float v_new, float bias1, float inv_bias2, float eps, float lam) {
  const float p = bias1 * (eps + sqrtf(v_new * inv_bias2));
  const float q = 1.f + lam * p;
  return {p, q, 1.f / (q * p)};
}

// amm::amadamw_terms with w = r and d / p = d * (r q).
AMM_ALWAYS_INLINE AmadamwTerms amadamw_terms_shared(float g, float d, float x, const Precond& k, float lam, float mu) {
  const float diff = d - g;
  const float inv_p = k.r * k.q;
  return {g * (mu * x + d * inv_p), k.r * diff * (g + lam * k.p * d), diff * x, k.r * diff * diff};
}

// amm::amadamw_momentum: the numerator over q, as (beta d + lam p d + (1 - beta) g) / q.
// amm::adamw_param: (1 - lr mu) x - lr d_new / p.
// Pass 2 keeps both divisions of amm_math.h (d and x are the state; their rounding is the reference's).

// NOTE [software prefetch]: per 16 elements, one prefetch per stream kPrefetch elements ahead. The
// hardware prefetchers alone left pass 1 at ~8 GB/s per core here (its division and square root
// keep few loads in flight); with this it streams ~30% faster, and pass 2 ~15%. Prefetches never
// fault, so the ones past a chunk's end are harmless.
constexpr int64_t kPrefetch = AMM_PREFETCH;

template <class TX, class TG, class TS>
AMM_ALWAYS_INLINE void prefetch_ahead(const TX* x, const TG* g, const TS* d, const TS* v, int64_t i) {
  if (x != nullptr) __builtin_prefetch(x + i + kPrefetch);
  __builtin_prefetch(g + i + kPrefetch);
  __builtin_prefetch(d + i + kPrefetch);
  __builtin_prefetch(v + i + kPrefetch);
}

struct Scalars {
  float inv_scale, lam, beta2, omb2, eps, bias1, inv_bias2, mu, beta, lr;
};

Scalars scalars_of(const CommonArgs& a, const StepTensor& t) {
  return {a.inv_grad_scale, a.lam, a.beta2, a.one_minus_beta2, a.eps, t.bias1,
          static_cast<float>(1.0 / static_cast<double>(t.bias2)), t.wd, t.beta, t.lr};
}

// kWithX false: a group without weight decay, where x is not read (NOTE [x in pass 1] in
// amadamw_reference.py) and enters the terms as 0.
template <bool kWithX, class TX, class TG, class TS>
AMM_ALWAYS_INLINE AmadamwTerms term_at(const TX* __restrict__ x, const TG* __restrict__ g, const TS* __restrict__ d,
                                       const TS* __restrict__ v, int64_t i, const Scalars& s) {
  const float gv = amm::effective_grad(ld(g[i]), 0.f, s.inv_scale, false, 0.f);
  const float vn = amm::adamw_second_moment(gv, ld(v[i]), s.beta2, s.omb2);
  const Precond k = adamw_precond_shared(vn, s.bias1, s.inv_bias2, s.eps, s.lam);
  return amadamw_terms_shared(gv, ld(d[i]), kWithX ? ld(x[i]) : 0.f, k, s.lam, s.mu);
}

template <bool kWithX, class TX, class TG, class TS>
AMM_ALWAYS_INLINE void sums_loop(const TX* __restrict__ x, const TG* __restrict__ g, const TS* __restrict__ d,
                                 const TS* __restrict__ v, int64_t n, const Scalars& s, float* out) {
  float acc_a[kLanes] = {}, acc_b[kLanes] = {}, acc_c[kLanes] = {}, acc_d[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    prefetch_ahead(kWithX ? x : nullptr, g, d, v, i);
    for (int j = 0; j < kLanes; ++j) {
      const AmadamwTerms r = term_at<kWithX>(x, g, d, v, i + j, s);
      acc_a[j] += r.a;
      acc_b[j] += r.b;
      acc_c[j] += r.c;
      acc_d[j] += r.d;
    }
  }
  for (int j = 0; i < n; ++i, ++j) {
    const AmadamwTerms r = term_at<kWithX>(x, g, d, v, i, s);
    acc_a[j] += r.a;
    acc_b[j] += r.b;
    acc_c[j] += r.c;
    acc_d[j] += r.d;
  }
  out[amm::kAdamA] = lane_sum(acc_a);
  out[amm::kAdamB] = lane_sum(acc_b);
  out[amm::kAdamC] = lane_sum(acc_c);
  out[amm::kAdamD] = lane_sum(acc_d);
}

// x == nullptr: the group has no weight decay (NOTE [x in pass 1]).
template <class TX, class TG, class TS>
AMM_ALWAYS_INLINE void sums_chunk(const TX* __restrict__ x, const TG* __restrict__ g, const TS* __restrict__ d,
                                  const TS* __restrict__ v, int64_t n, const Scalars& s, float* out) {
  if (x != nullptr) sums_loop<true>(x, g, d, v, n, s, out);
  else sums_loop<false>(x, g, d, v, n, s, out);
}

template <class TX, class TG, class TS>
AMM_ALWAYS_INLINE void update_at(TX* __restrict__ x, const TG* __restrict__ g, TS* __restrict__ d,
                                 TS* __restrict__ v, int64_t i, const Scalars& s, float keep, float one_minus_beta) {
  const float xv = ld(x[i]);
  const float dv = ld(d[i]);
  const float gv = amm::effective_grad(ld(g[i]), 0.f, s.inv_scale, false, 0.f);
  const float vn = amm::adamw_second_moment(gv, ld(v[i]), s.beta2, s.omb2);
  const float p = s.bias1 * (s.eps + sqrtf(vn * s.inv_bias2));  // adamw_precond_shared's p
  const float lp = s.lam * p;
  const float dn = (s.beta * dv + lp * dv + one_minus_beta * gv) / (1.f + lp);  // amm::amadamw_momentum
  v[i] = st<TS>(vn);
  d[i] = st<TS>(dn);
  x[i] = st<TX>(keep * xv - s.lr * dn / p);  // amm::adamw_param
}

// NOTE [pass 2 codegen]: the scalars are copied into locals and the lane loop is marked ivdep.
// Without both, GCC reloads every scalar from memory after each store (a store through x, d or v
// might change them) and checks at run time, on every 16 elements, whether x, d and v overlap:
// about 40 integer instructions per vector of work, which made pass 2 compute-bound on AVX-512
// machines. The arithmetic is unchanged (the same operations in the same order).
template <class TX, class TG, class TS>
AMM_ALWAYS_INLINE void update_chunk(TX* __restrict__ x, const TG* __restrict__ g, TS* __restrict__ d,
                                    TS* __restrict__ v, int64_t n, const Scalars& scalars) {
  const Scalars s = scalars;
  const float keep = 1.f - s.lr * s.mu;  // amm::adamw_param's (1 - lr mu), hoisted
  const float one_minus_beta = 1.f - s.beta;
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    prefetch_ahead(x, g, d, v, i);
#pragma GCC ivdep
    for (int j = 0; j < kLanes; ++j) update_at(x, g, d, v, i + j, s, keep, one_minus_beta);
  }
  for (; i < n; ++i) update_at(x, g, d, v, i, s, keep, one_minus_beta);
}

// The three compilations of each chunk function.
template <class TX, class TG, class TS>
void sums_base(const TX* x, const TG* g, const TS* d, const TS* v, int64_t n, const Scalars& s, float* out) {
  sums_chunk(x, g, d, v, n, s, out);
}
template <class TX, class TG, class TS>
void update_base(TX* x, const TG* g, TS* d, TS* v, int64_t n, const Scalars& s) {
  update_chunk(x, g, d, v, n, s);
}
#if AMM_CPU_MULTI_ISA
template <class TX, class TG, class TS>
AMM_TARGET_AVX2 void sums_avx2(const TX* x, const TG* g, const TS* d, const TS* v, int64_t n, const Scalars& s,
                               float* out) {
  sums_chunk(x, g, d, v, n, s, out);
}
template <class TX, class TG, class TS>
AMM_TARGET_AVX2 void update_avx2(TX* x, const TG* g, TS* d, TS* v, int64_t n, const Scalars& s) {
  update_chunk(x, g, d, v, n, s);
}
template <class TX, class TG, class TS>
AMM_TARGET_AVX512 void sums_avx512(const TX* x, const TG* g, const TS* d, const TS* v, int64_t n, const Scalars& s,
                                   float* out) {
  sums_chunk(x, g, d, v, n, s, out);
}
template <class TX, class TG, class TS>
AMM_TARGET_AVX512 void update_avx512(TX* x, const TG* g, TS* d, TS* v, int64_t n, const Scalars& s) {
  update_chunk(x, g, d, v, n, s);
}
#endif

}  // namespace

void amadamw_sums(Tensors ts, const CommonArgs& a, std::vector<float>& sums) {
  constexpr int K = amm::kAmadamwSums;
  const ChunkPlan plan = make_plan(ts, [](const StepTensor& t) { return t.need_sums && t.numel > 0; });
  std::vector<float> partial(plan.tensor.size() * K, 0.f);
  const Isa isa = cpu_isa();
  for_each_chunk(plan, [&](int64_t c) {
    const StepTensor& t = ts[plan.tensor[c]];
    const int64_t b = plan.begin[c], n = plan.end[c] - b;
    const Scalars s = scalars_of(a, t);
    with_step_types(t.x.scalar_type(), t.g.scalar_type(), t.d.scalar_type(), [&](auto tx, auto tg, auto ts_) {
      using TX = decltype(tx);
      using TG = decltype(tg);
      using TS = decltype(ts_);
      const TX* x = s.mu != 0.f ? t.x.const_data_ptr<TX>() + b : nullptr;  // NOTE [x in pass 1]
      AMM_PICK_ISA(isa, sums, TX, TG, TS)(x, t.g.const_data_ptr<TG>() + b,
                                          t.d.const_data_ptr<TS>() + b, t.v.const_data_ptr<TS>() + b, n, s,
                                          partial.data() + c * K);
    });
  });
  combine_chunk_sums(plan, partial, K, sums);
}

void amadamw_update(Tensors ts, const CommonArgs& a) {
  const ChunkPlan plan = make_plan(ts, [](const StepTensor& t) { return t.numel > 0; });
  const Isa isa = cpu_isa();
  for_each_chunk(plan, [&](int64_t c) {
    const StepTensor& t = ts[plan.tensor[c]];
    const int64_t b = plan.begin[c], n = plan.end[c] - b;
    const Scalars s = scalars_of(a, t);
    with_step_types(t.x.scalar_type(), t.g.scalar_type(), t.d.scalar_type(), [&](auto tx, auto tg, auto ts_) {
      using TX = decltype(tx);
      using TG = decltype(tg);
      using TS = decltype(ts_);
      AMM_PICK_ISA(isa, update, TX, TG, TS)(t.x.mutable_data_ptr<TX>() + b, t.g.const_data_ptr<TG>() + b,
                                            t.d.mutable_data_ptr<TS>() + b, t.v.mutable_data_ptr<TS>() + b, n, s);
    });
  }, /*reverse=*/true);
}

}  // namespace cpu
}  // namespace amm

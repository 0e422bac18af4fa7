// AM-SGD on CPU: pass 1 (the per-tensor sums of beta) and pass 2 (momentum and parameter update).
// The per-element math is amm_math.h's; the loops are written over kLanes independent lanes so that
// the compiler vectorizes them without reassociating any float sum (the order is fixed at compile
// time, so results do not depend on the thread count or the run). Each chunk function exists for
// three instruction sets (cpu_kernels.h, Isa), identical in results: setup.py's -ffp-contract=off
// keeps any a*b+c from becoming an FMA in the AVX2 / AVX-512 variants.

#include "cpu_kernels.h"

#include <ATen/Parallel.h>

#include "amm_math.h"

namespace amm {
namespace cpu {
namespace {

template <class TX, class TG, class TS, bool Coupled>
AMM_ALWAYS_INLINE void sums_chunk(const TX* __restrict__ x, const TG* __restrict__ g, const TS* __restrict__ d, int64_t n,
                float inv_scale, float wd, float lam, float* out) {
  float acc_gd[kLanes] = {}, acc_b[kLanes] = {}, acc_d[kLanes] = {};
  // Coupled == (wd != 0): without weight decay x is not read at all (and an inf x adds no NaN).
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) {
      float xv = 0.f;
      if constexpr (Coupled) xv = ld(x[i + j]);
      const float gv = amm::effective_grad(ld(g[i + j]), xv, inv_scale, false, wd);
      const amm::AmsgdTerms t = amm::amsgd_terms(gv, ld(d[i + j]), lam);
      acc_gd[j] += t.gd;
      acc_b[j] += t.b;
      acc_d[j] += t.d;
    }
  }
  for (int j = 0; i < n; ++i, ++j) {
    float xv = 0.f;
    if constexpr (Coupled) xv = ld(x[i]);
    const float gv = amm::effective_grad(ld(g[i]), xv, inv_scale, false, wd);
    const amm::AmsgdTerms t = amm::amsgd_terms(gv, ld(d[i]), lam);
    acc_gd[j] += t.gd;
    acc_b[j] += t.b;
    acc_d[j] += t.d;
  }
  out[amm::kSgdGD] = lane_sum(acc_gd);
  out[amm::kSgdB] = lane_sum(acc_b);
  out[amm::kSgdD] = lane_sum(acc_d);
}

template <class TX, class TG, class TS>
AMM_ALWAYS_INLINE void update_chunk(TX* __restrict__ x, const TG* __restrict__ g, TS* __restrict__ d, int64_t n, float inv_scale,
                  float wd, float lam, float beta, bool first, float lr) {
  for (int64_t i = 0; i < n; ++i) {
    const float xv = ld(x[i]);
    const float gv = amm::effective_grad(ld(g[i]), xv, inv_scale, false, wd);
    const float dn = amm::amsgd_momentum(gv, ld(d[i]), beta, lam, first);
    d[i] = st<TS>(dn);
    x[i] = st<TX>(amm::sgd_param(xv, dn, lr));
  }
}

// The three compilations of each chunk function.
#define AMM_SGD_VARIANTS(SUFFIX, TARGET)                                                                       \
  template <class TX, class TG, class TS, bool Coupled>                                                        \
  TARGET void sums_##SUFFIX(const TX* x, const TG* g, const TS* d, int64_t n, float inv_scale, float wd,      \
                            float lam, float* out) {                                                           \
    sums_chunk<TX, TG, TS, Coupled>(x, g, d, n, inv_scale, wd, lam, out);                                      \
  }                                                                                                            \
  template <class TX, class TG, class TS>                                                                      \
  TARGET void update_##SUFFIX(TX* x, const TG* g, TS* d, int64_t n, float inv_scale, float wd, float lam,     \
                              float beta, bool first, float lr) {                                              \
    update_chunk<TX, TG, TS>(x, g, d, n, inv_scale, wd, lam, beta, first, lr);                                 \
  }
AMM_SGD_VARIANTS(base, )
#if AMM_CPU_MULTI_ISA
AMM_SGD_VARIANTS(avx2, AMM_TARGET_AVX2)
AMM_SGD_VARIANTS(avx512, AMM_TARGET_AVX512)
#endif
#undef AMM_SGD_VARIANTS

}  // namespace

void amsgd_sums(Tensors ts, const CommonArgs& a, std::vector<float>& sums) {
  const ChunkPlan plan = make_plan(ts, [](const StepTensor& t) { return t.need_sums && t.numel > 0; });
  std::vector<float> partial(plan.tensor.size() * amm::kAmsgdSums, 0.f);
  const Isa isa = cpu_isa();
  for_each_chunk(plan, [&](int64_t c) {
    const StepTensor& t = ts[plan.tensor[c]];
    const int64_t b = plan.begin[c], n = plan.end[c] - b;
    float* out = partial.data() + c * amm::kAmsgdSums;
    with_step_types(t.x.scalar_type(), t.g.scalar_type(), t.d.scalar_type(), [&](auto tx, auto tg, auto ts_) {
      using TX = decltype(tx);
      using TG = decltype(tg);
      using TS = decltype(ts_);
      auto* kernel = t.wd != 0.f ? AMM_PICK_ISA(isa, sums, TX, TG, TS, true) : AMM_PICK_ISA(isa, sums, TX, TG, TS, false);
      kernel(t.x.const_data_ptr<TX>() + b, t.g.const_data_ptr<TG>() + b, t.d.const_data_ptr<TS>() + b, n,
             a.inv_grad_scale, t.wd, a.lam, out);
    });
  });
  combine_chunk_sums(plan, partial, amm::kAmsgdSums, sums);
}

void amsgd_update(Tensors ts, const CommonArgs& a) {
  const ChunkPlan plan = make_plan(ts, [](const StepTensor& t) { return t.numel > 0; });
  const Isa isa = cpu_isa();
  for_each_chunk(plan, [&](int64_t c) {
    const StepTensor& t = ts[plan.tensor[c]];
    const int64_t b = plan.begin[c], n = plan.end[c] - b;
    with_step_types(t.x.scalar_type(), t.g.scalar_type(), t.d.scalar_type(), [&](auto tx, auto tg, auto ts_) {
      using TX = decltype(tx);
      using TG = decltype(tg);
      using TS = decltype(ts_);
      AMM_PICK_ISA(isa, update, TX, TG, TS)(t.x.mutable_data_ptr<TX>() + b, t.g.const_data_ptr<TG>() + b,
                                            t.d.mutable_data_ptr<TS>() + b, n, a.inv_grad_scale, t.wd, a.lam,
                                            t.beta, t.first, t.lr);
    });
  }, /*reverse=*/true);
}

}  // namespace cpu
}  // namespace amm

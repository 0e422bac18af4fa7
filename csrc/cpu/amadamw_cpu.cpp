// AM-AdamW on CPU: pass 1 (v in registers, the preconditioner p and the four sums of beta; writes
// nothing) and pass 2 (v, d and x). The per-element math is amm_math.h's; loops run over kLanes
// independent lanes so they vectorize without reassociating a float sum (see amsgd_cpu.cpp).
#include "cpu_kernels.h"

#include <ATen/Parallel.h>

#include "amm_math.h"

namespace amm {
namespace cpu {
namespace {

template <class TX, class TG, class TS>
void sums_chunk(const TX* __restrict__ x, const TG* __restrict__ g, const TS* __restrict__ d,
                const TS* __restrict__ v, int64_t n, const CommonArgs& a, const StepTensor& t, float* out) {
  float acc_a[kLanes] = {}, acc_b[kLanes] = {}, acc_c[kLanes] = {}, acc_d[kLanes] = {};
  const float inv_scale = a.inv_grad_scale, lam = a.lam, beta2 = a.beta2, omb2 = a.one_minus_beta2, eps = a.eps;
  const float bias1 = t.bias1, bias2 = t.bias2, mu = t.wd;
  auto term = [&](int64_t i) {
    const float xv = ld(x[i]);
    const float gv = amm::effective_grad(ld(g[i]), 0.f, inv_scale, false, 0.f);
    const float vn = amm::adamw_second_moment(gv, ld(v[i]), beta2, omb2);
    const float p = amm::adamw_precond(vn, bias1, bias2, eps);
    return amm::amadamw_terms(gv, ld(d[i]), xv, p, lam, mu);
  };
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) {
      const amm::AmadamwTerms r = term(i + j);
      acc_a[j] += r.a;
      acc_b[j] += r.b;
      acc_c[j] += r.c;
      acc_d[j] += r.d;
    }
  }
  for (int j = 0; i < n; ++i, ++j) {
    const amm::AmadamwTerms r = term(i);
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

template <class TX, class TG, class TS>
void update_chunk(TX* __restrict__ x, const TG* __restrict__ g, TS* __restrict__ d, TS* __restrict__ v, int64_t n,
                  const CommonArgs& a, const StepTensor& t) {
  const float inv_scale = a.inv_grad_scale, lam = a.lam, beta2 = a.beta2, omb2 = a.one_minus_beta2, eps = a.eps;
  const float bias1 = t.bias1, bias2 = t.bias2, mu = t.wd, beta = t.beta, lr = t.lr;
  for (int64_t i = 0; i < n; ++i) {
    const float xv = ld(x[i]);
    const float gv = amm::effective_grad(ld(g[i]), 0.f, inv_scale, false, 0.f);
    const float vn = amm::adamw_second_moment(gv, ld(v[i]), beta2, omb2);
    const float p = amm::adamw_precond(vn, bias1, bias2, eps);
    const float dn = amm::amadamw_momentum(gv, ld(d[i]), p, beta, lam);
    v[i] = st<TS>(vn);
    d[i] = st<TS>(dn);
    x[i] = st<TX>(amm::adamw_param(xv, dn, p, lr, mu));
  }
}

}  // namespace

void amadamw_sums(const std::vector<StepTensor>& ts, const CommonArgs& a, std::vector<float>& sums) {
  constexpr int K = amm::kAmadamwSums;
  sums.assign(ts.size() * K, 0.f);
  const ChunkPlan plan = make_plan(ts, [](const StepTensor& t) { return t.need_sums && t.numel > 0; });
  std::vector<float> partial(plan.tensor.size() * K, 0.f);
  for_each_chunk(plan, [&](int64_t c) {
    const StepTensor& t = ts[plan.tensor[c]];
    const int64_t b = plan.begin[c], n = plan.end[c] - b;
    with_step_types(t.x.scalar_type(), t.g.scalar_type(), t.d.scalar_type(), [&](auto tx, auto tg, auto ts_) {
      using TX = decltype(tx);
      using TG = decltype(tg);
      using TS = decltype(ts_);
      sums_chunk<TX, TG, TS>(t.x.const_data_ptr<TX>() + b, t.g.const_data_ptr<TG>() + b,
                             t.d.const_data_ptr<TS>() + b, t.v.const_data_ptr<TS>() + b, n, a, t,
                             partial.data() + c * K);
    });
  });
  for (size_t t = 0; t < ts.size(); ++t) {
    for (int k = 0; k < K; ++k) {
      double s = 0.0;
      for (int64_t c = plan.first_slot[t]; c < plan.first_slot[t + 1]; ++c) s += partial[c * K + k];
      sums[t * K + k] = static_cast<float>(s);
    }
  }
}

void amadamw_update(const std::vector<StepTensor>& ts, const CommonArgs& a) {
  const ChunkPlan plan = make_plan(ts, [](const StepTensor& t) { return t.numel > 0; });
  for_each_chunk(plan, [&](int64_t c) {
    const StepTensor& t = ts[plan.tensor[c]];
    const int64_t b = plan.begin[c], n = plan.end[c] - b;
    with_step_types(t.x.scalar_type(), t.g.scalar_type(), t.d.scalar_type(), [&](auto tx, auto tg, auto ts_) {
      using TX = decltype(tx);
      using TG = decltype(tg);
      using TS = decltype(ts_);
      update_chunk<TX, TG, TS>(t.x.mutable_data_ptr<TX>() + b, t.g.const_data_ptr<TG>() + b,
                               t.d.mutable_data_ptr<TS>() + b, t.v.mutable_data_ptr<TS>() + b, n, a, t);
    });
  });
}

}  // namespace cpu
}  // namespace amm

// The finalize of a step, as one block's device function: the slots of pass 1 -> per-tensor sums ->
// weighted per-tensor terms (amm::amsgd_weighted / amadamw_weighted, double) -> per-scope beta
// (amm::scope_beta), the ScopeScratch that pass 2 reads, and the scope state (or, with sums_out, only
// the per-scope sums: NOTE [sharded sums]). Run by finalize_kernels.cu's kernel and by the persistent
// step (persistent_kernels.cu).
#pragma once

#include "cuda/multi_tensor.cuh"

namespace amm_cuda {

// A tensor with at most this many slots is summed by one thread, a larger one by a warp.
constexpr int kSerialSlots = 32;

// NOTE [scope scratch]: pass 2 needs, per scope, this step's beta, whether it is the scope's first
// step, and (AM-AdamW) the bias corrections pass 1 used. The finalize overwrites step and beta_prod,
// so it first records these in the workspace's ScopeScratch, from the state as pass 1 saw it; pass 2
// reads only the scratch, never the state. Pass 1 and the finalize form the bias corrections with the
// same function (adamw_bias) from the same floats, so pass 1 and pass 2 use bit-identical p.

// NOTE [sums in registers]: n_sums (3 or 4) is known only at run time, and a loop `k < n_sums` over
// a fixed array makes nvcc keep the array in local memory (ptxas reported a 48-byte stack frame for
// the finalize kernel, 80 for the persistent step, and their SASS had LDL/STL round trips per slot).
// Every loop over the sums runs to the compile-time kAmadamwSums with the tail guarded, so the arrays
// stay in registers; .ci/nvcc_check fails on any stack frame (ptxas -v) in the AM kernels.
__device__ __forceinline__ void add_slot(const float* slots, int64_t s, int n_sums, double (&sums)[amm::kAmadamwSums]) {
#pragma unroll
  for (int k = 0; k < amm::kAmadamwSums; ++k)
    if (k < n_sums) sums[k] += slots[s * n_sums + k];
}

__device__ __forceinline__ void weigh_tensor(const FinalizeArgs& a, const TensorMeta& m, int t, const double* sums) {
  float s[amm::kAmadamwSums];
#pragma unroll
  for (int k = 0; k < amm::kAmadamwSums; ++k) s[k] = static_cast<float>(sums[k]);  // a tensor's float32 sums
  const double lr = a.lr[m.group], prev_lr = a.prev_lr[m.group];
  double num, den;
  if (a.algorithm == kAlgoAmsgd) {
    amm::amsgd_weighted(s, lr, prev_lr, a.lam, /*first_order=*/a.loss == nullptr, &num, &den);
  } else {
    amm::amadamw_weighted(s, lr, prev_lr, m.weight_decay, &num, &den);
  }
  a.tensor_terms[2 * t] = num;
  a.tensor_terms[2 * t + 1] = den;
}

// A scope's end of the finalize, by one thread: its summed (num, den) into the sharded sums_out, or
// beta, the scratch for pass 2 and (unless the step is skipped) the scope state. In a split step's
// second half (sums_in: NOTE [sharded sums]) the caller has no terms; the all-reduced pair is read here.
__device__ __forceinline__ void finish_scope(const FinalizeArgs& a, int s, double num, double den, double extra_num,
                                             bool skip) {
  if (a.adaptive && a.sums_in != nullptr) {
    num = a.sums_in[2 * s];
    den = a.sums_in[2 * s + 1];
  }
  const float step = a.step[s];
  const bool first = step == 0.f;
  if (a.sums_out != nullptr) {  // as the CPU op: zeros on a scope's first step
    a.sums_out[2 * s] = first ? 0.0 : num;
    a.sums_out[2 * s + 1] = first ? 0.0 : den;
    return;
  }
  const float beta = amm::scope_beta(num + extra_num, den, static_cast<float>(a.beta_min),
                                     static_cast<float>(a.beta_max), first, a.adaptive);
  ScopeScratch sc{beta, first ? 1.f : 0.f, 1.f, 1.f};
  if (a.algorithm == kAlgoAmadamw) adamw_bias(step, a.beta_prod[s], a.beta_max, a.beta2, &sc.bias1, &sc.bias2);
  a.scratch[s] = sc;
  if (!skip) {
    a.step[s] = step + 1.f;
    a.beta[s] = beta;
    if (a.beta_prod != nullptr) a.beta_prod[s] = a.beta_prod[s] * beta;
  }
}

// The whole finalize, run by one block of any multiple of 32 threads: the finalize kernel, or block 0
// of the persistent step between its two grid barriers.
__device__ __forceinline__ void finalize_block(const FinalizeArgs& a) {
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32, n_warps = blockDim.x / 32;
  const int n_sums = a.algorithm == kAlgoAmsgd ? static_cast<int>(amm::kAmsgdSums) : static_cast<int>(amm::kAmadamwSums);
  const int T = a.num_tensors;
  const bool skip = step_skipped(a.found_inf);
  // Loss mode's scope-level numerator term (lam + 1) (prev_loss - loss), in float32 as the reference
  // forms it. Read by every thread before the barrier after which thread 0 overwrites prev_loss.
  double extra_num = 0.0;
  if (a.adaptive && a.loss != nullptr) {
    extra_num = static_cast<double>(static_cast<float>(a.lam + 1.0) * (*a.prev_loss - *a.loss));
  }

  // Phase A: per tensor, its slots summed in slot order (double), rounded to float32 and weighted.
  if (a.adaptive && a.sums_in == nullptr) {
    for (int t = tid; t < T; t += blockDim.x) {
      const TensorMeta m = a.meta[t];
      if (m.n_slots > kSerialSlots) continue;
      double sums[amm::kAmadamwSums] = {0.0, 0.0, 0.0, 0.0};
      for (int64_t s = m.slot_begin; s < m.slot_begin + m.n_slots; ++s) add_slot(a.slots, s, n_sums, sums);
      weigh_tensor(a, m, t, sums);
    }
    for (int t = warp; t < T; t += n_warps) {
      const TensorMeta m = a.meta[t];
      if (m.n_slots <= kSerialSlots) continue;
      double sums[amm::kAmadamwSums] = {0.0, 0.0, 0.0, 0.0};
      for (int64_t s = m.slot_begin + lane; s < m.slot_begin + m.n_slots; s += 32) add_slot(a.slots, s, n_sums, sums);
#pragma unroll
      for (int k = 0; k < amm::kAmadamwSums; ++k) sums[k] = warp_sum_down(sums[k]);
      if (lane == 0) weigh_tensor(a, m, t, sums);
    }
  }
  __syncthreads();  // tensor_terms complete; nothing below reads prev_lr or prev_loss any more

  // Phase B: per scope (a run of tensors led by its first tensor): the run's terms summed in a fixed
  // order, beta, the scratch for pass 2, and (unless skipped) the scope state. NOTE [one thread per
  // scope]: a scope of one tensor (AM-AdamW's default tensor scope: hundreds of them) is taken by one
  // thread, a longer run by one warp. The beta and bias math of a scope (double, pow) is one thread's in
  // either case, so with a warp per scope it ran 14 scopes deep per warp for 219 scopes: the finalize
  // took 34 us of an H200 (kernel_breakdown_nvidia_h200.csv), 9 us for one global scope. One tensor's
  // num is 0.0 + its term, as the warp's sum of it and 31 zeros gives (a -0.0 term becomes +0.0).
  for (int t = tid; t < T; t += blockDim.x) {
    const TensorMeta m = a.meta[t];
    if (!(m.flags & kScopeLeader) || m.scope_end - t != 1) continue;
    double num = 0.0, den = 0.0;
    if (a.adaptive && a.sums_in == nullptr) {
      num += a.tensor_terms[2 * t];
      den += a.tensor_terms[2 * t + 1];
    }
    finish_scope(a, m.scope, num, den, extra_num, skip);
  }
  for (int t = warp; t < T; t += n_warps) {
    const TensorMeta m = a.meta[t];
    if (!(m.flags & kScopeLeader) || m.scope_end - t == 1) continue;
    double num = 0.0, den = 0.0;
    if (a.adaptive && a.sums_in == nullptr) {
      for (int u = t + lane; u < m.scope_end; u += 32) {
        num += a.tensor_terms[2 * u];
        den += a.tensor_terms[2 * u + 1];
      }
      num = warp_sum_down(num);
      den = warp_sum_down(den);
    }
    if (lane == 0) finish_scope(a, m.scope, num, den, extra_num, skip);
  }
  if (a.sums_out == nullptr && !skip) {
    for (int t = tid; t < T; t += blockDim.x) {
      const TensorMeta m = a.meta[t];
      if (m.flags & kGroupLeader) a.prev_lr[m.group] = a.lr[m.group];
    }
  }
  if (tid == 0 && a.loss != nullptr && !skip && a.sums_out == nullptr) *a.prev_loss = *a.loss;
}

}  // namespace amm_cuda

// The finalize of a step (one block): the slots of pass 1 -> per-tensor sums -> weighted per-tensor
// terms (amm::amsgd_weighted / amadamw_weighted, double) -> per-scope beta (amm::scope_beta), the
// ScopeScratch that pass 2 reads, and the scope state (or, for the *_scope_sums ops, only the
// per-scope sums: NOTE [sharded sums]). Also the meta-only launch of adaptive=False.
#include "cuda/multi_tensor.cuh"

namespace amm_cuda {
namespace {

// A tensor with at most this many slots is summed by one thread, a larger one by a warp.
constexpr int kSerialSlots = 32;

// NOTE [scope scratch]: pass 2 needs, per scope, this step's beta, whether it is the scope's first
// step, and (AM-AdamW) the bias corrections pass 1 used. The finalize overwrites step and beta_prod,
// so it first records these in the workspace's ScopeScratch, from the state as pass 1 saw it; pass 2
// reads only the scratch, never the state. Pass 1 and the finalize form the bias corrections with the
// same function (adamw_bias) from the same floats, so pass 1 and pass 2 use bit-identical p.

__device__ __forceinline__ void weigh_tensor(const FinalizeArgs& a, const TensorMeta& m, int t, const double* sums) {
  float s[amm::kAmadamwSums];
  const int n_sums = a.algorithm == kAlgoAmsgd ? static_cast<int>(amm::kAmsgdSums) : static_cast<int>(amm::kAmadamwSums);
  for (int k = 0; k < n_sums; ++k) s[k] = static_cast<float>(sums[k]);  // a tensor's float32 sums
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

__global__ void __launch_bounds__(kFinalizeThreads) finalize_kernel(const FinalizeArgs a) {
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
      for (int64_t s = m.slot_begin; s < m.slot_begin + m.n_slots; ++s)
        for (int k = 0; k < n_sums; ++k) sums[k] += a.slots[s * n_sums + k];
      weigh_tensor(a, m, t, sums);
    }
    for (int t = warp; t < T; t += n_warps) {
      const TensorMeta m = a.meta[t];
      if (m.n_slots <= kSerialSlots) continue;
      double sums[amm::kAmadamwSums] = {0.0, 0.0, 0.0, 0.0};
      for (int64_t s = m.slot_begin + lane; s < m.slot_begin + m.n_slots; s += 32)
        for (int k = 0; k < n_sums; ++k) sums[k] += a.slots[s * n_sums + k];
      for (int k = 0; k < amm::kAmadamwSums; ++k) sums[k] = warp_sum_down(sums[k]);
      if (lane == 0) weigh_tensor(a, m, t, sums);
    }
  }
  __syncthreads();  // tensor_terms complete; nothing below reads prev_lr or prev_loss any more

  // Phase B: per scope (a run of tensors led by its first tensor), one warp: the run's terms summed
  // in a fixed order, beta, the scratch for pass 2, and (unless skipped) the scope state.
  for (int t = warp; t < T; t += n_warps) {
    const TensorMeta m = a.meta[t];
    if (m.flags & kScopeLeader) {
      double num = 0.0, den = 0.0;
      if (a.adaptive && a.sums_in == nullptr) {
        for (int u = t + lane; u < m.scope_end; u += 32) {
          num += a.tensor_terms[2 * u];
          den += a.tensor_terms[2 * u + 1];
        }
        num = warp_sum_down(num);
        den = warp_sum_down(den);
      } else if (a.adaptive) {
        num = a.sums_in[2 * m.scope];
        den = a.sums_in[2 * m.scope + 1];
      }
      if (lane == 0 && a.sums_out != nullptr) {
        const bool first = a.step[m.scope] == 0.f;  // as the CPU op: zeros on a scope's first step
        a.sums_out[2 * m.scope] = first ? 0.0 : num;
        a.sums_out[2 * m.scope + 1] = first ? 0.0 : den;
      } else if (lane == 0) {
        const int s = m.scope;
        const float step = a.step[s];
        const bool first = step == 0.f;
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
    }
    if (a.sums_out != nullptr) continue;
    if (lane == 0 && (m.flags & kGroupLeader) && !skip) a.prev_lr[m.group] = a.lr[m.group];
  }
  if (tid == 0 && a.loss != nullptr && !skip && a.sums_out == nullptr) *a.prev_loss = *a.loss;
}

// adaptive=False: no sums, but the finalize still needs every tensor's TensorMeta.
__global__ void write_meta_kernel(const __grid_constant__ TensorTable table, TensorMeta* meta) {
  const BlockWork work = locate_block(table);
  if (work.chunk == 0 && threadIdx.x == 0) write_tensor_meta(table, work.tensor, meta);
}

}  // namespace

cudaError_t launch_finalize(const FinalizeArgs& args, cudaStream_t stream) {
  if (args.num_tensors == 0) return cudaSuccess;
  finalize_kernel<<<1, kFinalizeThreads, 0, stream>>>(args);
  return cudaGetLastError();
}

cudaError_t launch_write_meta(const TensorTable& table, TensorMeta* meta, cudaStream_t stream) {
  if (table.num_blocks == 0) return cudaSuccess;
  write_meta_kernel<<<grid_of(table), 32, 0, stream>>>(table, meta);
  return cudaGetLastError();
}

}  // namespace amm_cuda

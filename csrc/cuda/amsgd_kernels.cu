// AM-SGD (SPEC.md section 1): pass 1 (the per-chunk sums of beta) and pass 2 (momentum and parameter
// update). The per-element math is amm_math.h's; this file is loads, stores and bookkeeping.
#include "cuda/multi_tensor.cuh"

namespace amm_cuda {
namespace {

// The effective gradient of one element. Coupled L2 reads x only when the group has weight decay
// (as the reference adds `weight_decay * x` only then: an inf x with no decay must not give NaN).
__device__ __forceinline__ float sgd_grad(float grad, float x, float inv_scale, bool maximize, float wd) {
  return amm::effective_grad(grad, wd != 0.f ? x : 0.f, inv_scale, maximize, wd);
}

struct AmsgdSumsOp {
  float inv_scale, wd, lam;
  bool maximize;
  float acc[amm::kAmsgdSums];

  template <int N>
  __device__ __forceinline__ void apply(float (&r)[kMaxLists][kVec]) {
#pragma unroll
    for (int j = 0; j < N; ++j) {
      const float g = sgd_grad(r[kG][j], r[kX][j], inv_scale, maximize, wd);
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
      const float g = sgd_grad(r[kG][j], x, inv_scale, maximize, wd);
      const float d_new = amm::amsgd_momentum(g, first_step ? 0.f : r[kD][j], beta, lam, first_step);
      r[kD][j] = d_new;
      r[kX][j] = amm::sgd_param(x, d_new, lr);
    }
  }
};

// Pass 1: one block per chunk; thread 0 writes the chunk's three sums to its slot.
__global__ void __launch_bounds__(kBlockSize)
amsgd_sums_kernel(const __grid_constant__ TensorTable table, const PassArgs args) {
  const BlockWork work = locate_block(table);
  const TensorEntry& e = table.tensors[work.tensor];
  if (work.chunk == 0 && threadIdx.x == 0) write_tensor_meta(table, work.tensor, args.meta);

  const float wd = static_cast<float>(e.weight_decay);
  AmsgdSumsOp op{inv_grad_scale(args.grad_scale), wd, args.lam, args.maximize, {0.f, 0.f, 0.f}};
  // On a scope's first step beta is beta_max whatever the sums: skip reading the chunk.
  if (args.step[e.scope] != 0.f) {
    const uint32_t loads = (1u << kG) | (1u << kD) | (wd != 0.f ? (1u << kX) : 0u);
    apply_chunk(e, work.chunk, loads, 0u, op);
  }
  block_sum(op.acc);
  if (threadIdx.x == 0) {
    float* slot = args.slots + (table.slot_base + blockIdx.x) * amm::kAmsgdSums;
#pragma unroll
    for (int k = 0; k < amm::kAmsgdSums; ++k) slot[k] = op.acc[k];
  }
}

// Pass 2: d and x with the scope's beta (from the finalize's ScopeScratch); nothing when found_inf > 0.
__global__ void __launch_bounds__(kBlockSize)
amsgd_update_kernel(const __grid_constant__ TensorTable table, const PassArgs args) {
  if (step_skipped(args.found_inf)) return;
  const BlockWork work = locate_block(table);
  const TensorEntry& e = table.tensors[work.tensor];
  const ScopeScratch sc = args.scratch[e.scope];
  const bool first = sc.first_step != 0.f;
  AmsgdUpdateOp op{inv_grad_scale(args.grad_scale), static_cast<float>(e.weight_decay), args.lam, sc.beta,
                   args.lr[e.group], args.maximize, first};
  // d <- g on the first step: the old d is not read.
  const uint32_t loads = (1u << kX) | (1u << kG) | (first ? 0u : (1u << kD));
  apply_chunk(e, work.chunk, loads, (1u << kX) | (1u << kD), op);
}

}  // namespace

cudaError_t launch_amsgd_sums(const TensorTable& table, const PassArgs& args, cudaStream_t stream) {
  if (table.num_blocks == 0) return cudaSuccess;
  amsgd_sums_kernel<<<grid_of(table), kBlockSize, 0, stream>>>(table, args);
  return cudaGetLastError();
}

cudaError_t launch_amsgd_update(const TensorTable& table, const PassArgs& args, cudaStream_t stream) {
  if (table.num_blocks == 0) return cudaSuccess;
  amsgd_update_kernel<<<grid_of(table), kBlockSize, 0, stream>>>(table, args);
  return cudaGetLastError();
}

}  // namespace amm_cuda

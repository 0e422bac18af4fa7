// AM-AdamW (SPEC.md section 2): pass 1 (the per-chunk sums of beta, with v and p recomputed in
// registers: v is written only by pass 2) and pass 2 (v, d and x). Per-element math: amm_math.h.
#include "cuda/multi_tensor.cuh"

namespace amm_cuda {
namespace {

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
      const amm::AmadamwTerms t = amm::amadamw_terms(g, r[kD][j], r[kX][j], p, el.lam, el.mu);
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

constexpr uint32_t kAllLists = (1u << kX) | (1u << kG) | (1u << kD) | (1u << kV);
constexpr uint32_t kStateLists = (1u << kX) | (1u << kD) | (1u << kV);

__global__ void __launch_bounds__(kBlockSize)
amadamw_sums_kernel(const __grid_constant__ TensorTable table, const PassArgs args) {
  const BlockWork work = locate_block(table);
  const TensorEntry& e = table.tensors[work.tensor];
  if (work.chunk == 0 && threadIdx.x == 0) write_tensor_meta(table, work.tensor, args.meta);

  const float step = args.step[e.scope];
  AmadamwSumsOp op{};
  op.el = AdamwElement{inv_grad_scale(args.grad_scale), args.lam, static_cast<float>(e.weight_decay), args.beta2,
                       args.eps, 1.f, 1.f, args.maximize, static_cast<float>(1.0 - args.beta2_d)};
  adamw_bias(step, args.beta_prod[e.scope], args.beta_max_d, args.beta2_d, &op.el.bias1, &op.el.bias2);
  // On a scope's first step beta is beta_max whatever the sums: skip reading the chunk.
  if (step != 0.f) apply_chunk(e, work.chunk, kAllLists, 0u, op);
  block_sum(op.acc);
  if (threadIdx.x == 0) {
    float* slot = args.slots + (table.slot_base + blockIdx.x) * amm::kAmadamwSums;
#pragma unroll
    for (int k = 0; k < amm::kAmadamwSums; ++k) slot[k] = op.acc[k];
  }
}

__global__ void __launch_bounds__(kBlockSize)
amadamw_update_kernel(const __grid_constant__ TensorTable table, const PassArgs args) {
  if (step_skipped(args.found_inf)) return;
  const BlockWork work = locate_block(table);
  const TensorEntry& e = table.tensors[work.tensor];
  // The bias corrections of this step, as pass 1 formed them (NOTE [scope scratch] in finalize_kernels.cu).
  const ScopeScratch sc = args.scratch[e.scope];
  AmadamwUpdateOp op{AdamwElement{inv_grad_scale(args.grad_scale), args.lam, static_cast<float>(e.weight_decay),
                                  args.beta2, args.eps, sc.bias1, sc.bias2, args.maximize,
                                  static_cast<float>(1.0 - args.beta2_d)},
                     sc.beta, args.lr[e.group]};
  apply_chunk(e, work.chunk, kAllLists, kStateLists, op);
}

}  // namespace

cudaError_t launch_amadamw_sums(const TensorTable& table, const PassArgs& args, cudaStream_t stream) {
  if (table.num_blocks == 0) return cudaSuccess;
  amadamw_sums_kernel<<<grid_of(table), kBlockSize, 0, stream>>>(table, args);
  return cudaGetLastError();
}

cudaError_t launch_amadamw_update(const TensorTable& table, const PassArgs& args, cudaStream_t stream) {
  if (table.num_blocks == 0) return cudaSuccess;
  amadamw_update_kernel<<<grid_of(table), kBlockSize, 0, stream>>>(table, args);
  return cudaGetLastError();
}

}  // namespace amm_cuda

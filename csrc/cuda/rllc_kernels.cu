// RLLC (SPEC.md section 4) on CUDA: pass 1 (double Gram / M^T g sums per block slot), the one-block
// finalize (law update on the device), pass 2 (memory rows and parameter). The math is
// csrc/rllc_math.h's, as amm_kernels/reference/rllc_reference.py computes it; this file is loads,
// stores and bookkeeping. No float atomics: every sum is combined in a fixed order
// (NOTE [deterministic sums] in multi_tensor.cuh), so reruns give bit-identical laws.
#include "cuda/multi_tensor.cuh"
#include "cuda/rllc_launchers.h"
#include "rllc_math.h"

namespace amm_cuda {
namespace {

// The memory rows of a tensor: one (k, *shape) tensor, row a starting at element a * numel.
// NOTE [RLLC vectors]: where every list of the tensor starts on a 16-byte boundary (kAligned) and
// numel is a multiple of kVec (8, so 16 bytes of 2-byte elements and 32 of 4-byte ones), every memory
// row starts aligned too: such a tensor's chunks are walked kVec consecutive elements per thread and
// iteration with 16-byte loads and stores (load_vec / store_vec, as apply_chunk does for the AM steps);
// the rest of a chunk, and every other tensor, one element per thread (consecutive threads, consecutive
// elements). Which thread takes which element depends only on the tensor's size and alignment, so the
// sums stay bit-identical run to run (NOTE [element order] in multi_tensor.cuh).
// Only for k <= kRllcVecMaxK: a thread then holds (k + 1) x kVec (pass 2: k + 2) floats per iteration,
// and pass 1 also its k(k+3)/2 double sums. ptxas (CUDA 13.0, sm_90, launch bound kBlockSize = 512
// threads: at most 128 registers) fits k <= 5 in registers (pass 1: 54, 82, 100, 120 registers for
// k = 2..5); with the vector walk at k = 6 pass 1 starts to spill (16 bytes of spill stores; k = 7: 800,
// k = 8: 1960), so k >= 6 keeps the scalar walk (100 and 128 registers, no spills). Measured
// 2026-11-29 with nvcc -Xptxas -v, kRllcVecMaxK set to 8 for the vector figures.
constexpr int kRllcVecMaxK = 5;

template <int K>
__device__ __forceinline__ bool rows_aligned(const TensorEntry& e) {
  return K <= kRllcVecMaxK && (e.flags & kAligned) != 0u && e.numel % kVec == 0;
}

// The width of one step of a walk, as a type (the walk's body is written once for both widths).
template <int N>
struct Width {
  static constexpr int value = N;
};

// Walks the chunk [begin, end) of tensor e as NOTE [RLLC vectors] says: body(Width<kVec>{}, i) for
// the kVec elements from i where the rows are aligned, body(Width<1>{}, i) for one element otherwise
// and for the rest of the chunk. Both passes walk with it, so the element order is the same in both.
template <int K, class Body>
__device__ __forceinline__ void walk_rows(const TensorEntry& e, int64_t begin, int64_t end, const Body& body) {
  int64_t tail = begin;
  if (rows_aligned<K>(e)) {
    const int64_t vec_end = begin + (end - begin) / kVec * kVec;
    for (int64_t i = begin + static_cast<int64_t>(threadIdx.x) * kVec; i < vec_end;
         i += static_cast<int64_t>(blockDim.x) * kVec)
      body(Width<kVec>{}, i);
    tail = vec_end;
  }
  for (int64_t i = tail + threadIdx.x; i < end; i += blockDim.x) body(Width<1>{}, i);
}

// Block reduction of N doubles (fixed tree: shuffle-down per warp, then warp 0 over the warps).
// The totals are valid in thread 0 only; call once per block.
template <int N>
__device__ __forceinline__ void block_sum_double(double (&acc)[N]) {
  __shared__ double partial[N][kBlockSize / 32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int n_warps = (blockDim.x + 31) / 32;
#pragma unroll
  for (int p = 0; p < N; ++p) {
    const double w = warp_sum_down(acc[p]);
    if (lane == 0) partial[p][warp] = w;
  }
  __syncthreads();
  if (warp == 0) {
#pragma unroll
    for (int p = 0; p < N; ++p) acc[p] = warp_sum_down(lane < n_warps ? partial[p][lane] : 0.0);
  }
}

// Pass 1: one block per chunk; thread 0 writes the chunk's rllc_n_sums(K) double sums to its slot.
template <int K>
__global__ void __launch_bounds__(kBlockSize)
rllc_sums_kernel(const __grid_constant__ TensorTable table, const RllcArgs args) {
  constexpr int P = amm::rllc_n_sums(K);
  const BlockWork work = locate_block(table);
  const TensorEntry& e = table.tensors[work.tensor];
  if (work.chunk == 0 && threadIdx.x == 0) write_tensor_meta(table, work.tensor, args.meta);
  double acc[P];
#pragma unroll
  for (int p = 0; p < P; ++p) acc[p] = 0.0;
  // On a scope's first step the law is not corrected: skip reading the chunk (the slot gets zeros).
  if (args.step[e.scope] != 0.f) {
    const bool has_scale = args.grad_scale != nullptr;
    const float scale = has_scale ? *args.grad_scale : 1.f;
    const int64_t n = e.numel;
    const uint32_t dm = dtype_of(e.dtypes, kD), dg = dtype_of(e.dtypes, kG);
    walk_rows<K>(e, work.begin, work.end, [&](auto width, int64_t i) {
      constexpr int N = decltype(width)::value;
      float mv[K][N], gv[N];
#pragma unroll
      for (int a = 0; a < K; ++a) load_n<N>(e.ptr[kD], dm, a * n + i, mv[a]);
      load_n<N>(e.ptr[kG], dg, i, gv);
#pragma unroll
      for (int j = 0; j < N; ++j) {
        float m[K];
#pragma unroll
        for (int a = 0; a < K; ++a) m[a] = mv[a][j];
        amm::rllc_accumulate<K>(m, amm::rllc_grad(gv[j], has_scale, scale), acc);
      }
    });
  }
  block_sum_double(acc);
  if (threadIdx.x == 0) {
    double* slot = args.slots + (table.slot_base + blockIdx.x) * P;
#pragma unroll
    for (int p = 0; p < P; ++p) slot[p] = acc[p];
  }
}

// A tensor with at most this many slots is summed by one thread, a larger one by a warp.
constexpr int kSerialSlots = 32;

// The finalize: one block of kFinalizeThreads threads.
__global__ void __launch_bounds__(kFinalizeThreads) rllc_finalize_kernel(const RllcArgs a) {
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32, n_warps = blockDim.x / 32;
  const int k = a.k, P = amm::rllc_n_sums(k), T = a.num_tensors;
  const bool skip = step_skipped(a.found_inf);

  // Phase A: per tensor, its slots summed in slot order (double). Not with sums_in (no pass 1 ran).
  for (int t = tid; t < T && a.sums_in == nullptr; t += blockDim.x) {
    const TensorMeta m = a.meta[t];
    if (m.n_slots > kSerialSlots) continue;
    for (int p = 0; p < P; ++p) {
      double s = 0.0;
      for (int64_t j = m.slot_begin; j < m.slot_begin + m.n_slots; ++j) s += a.slots[j * P + p];
      a.tensor_sums[static_cast<int64_t>(t) * P + p] = s;
    }
  }
  for (int t = warp; t < T && a.sums_in == nullptr; t += n_warps) {
    const TensorMeta m = a.meta[t];
    if (m.n_slots <= kSerialSlots) continue;
    for (int p = 0; p < P; ++p) {
      double s = 0.0;
      for (int64_t j = m.slot_begin + lane; j < m.slot_begin + m.n_slots; j += 32) s += a.slots[j * P + p];
      s = warp_sum_down(s);
      if (lane == 0) a.tensor_sums[static_cast<int64_t>(t) * P + p] = s;
    }
  }
  __syncthreads();

  // Phase B: per scope (a run of tensors led by its first tensor), one warp: the run's sums in a
  // fixed order, then lane 0 updates the law and the step.
  for (int t = warp; t < T; t += n_warps) {
    const TensorMeta m = a.meta[t];
    if (!(m.flags & kScopeLeader)) continue;
    double sums[amm::kRllcMaxSums];
    const int64_t row = static_cast<int64_t>(m.scope) * P;
    for (int p = 0; p < P; ++p) {
      double s = 0.0;
      if (a.sums_in != nullptr) {
        s = a.sums_in[row + p];
      } else {
        for (int u = t + lane; u < m.scope_end; u += 32) s += a.tensor_sums[static_cast<int64_t>(u) * P + p];
        s = warp_sum_down(s);
      }
      sums[p] = s;  // valid in lane 0
    }
    if (lane == 0 && a.sums_out != nullptr) {
      const bool first = a.step[m.scope] == 0.f;
      for (int p = 0; p < P; ++p) a.sums_out[row + p] = first ? 0.0 : sums[p];
    } else if (lane == 0 && !skip) {
      const int s = m.scope;
      const float step = a.step[s];
      float law_new[amm::kRllcMaxK];
      amm::rllc_law_update(k, sums, a.law + static_cast<int64_t>(s) * k, step == 0.f, a.law_lr, a.rcond, law_new);
      for (int c = 0; c < k; ++c) a.law[static_cast<int64_t>(s) * k + c] = law_new[c];
      a.step[s] = step + 1.f;
    }
  }
}

// Pass 2: memory rows and parameter with the scope's new law; nothing when found_inf > 0.
template <int K>
__global__ void __launch_bounds__(kBlockSize)
rllc_update_kernel(const __grid_constant__ TensorTable table, const RllcArgs args) {
  if (step_skipped(args.found_inf)) return;
  const BlockWork work = locate_block(table);
  const TensorEntry& e = table.tensors[work.tensor];
  float U[K * K], b[K], law[K];
#pragma unroll
  for (int p = 0; p < K * K; ++p) U[p] = args.U[p];
#pragma unroll
  for (int c = 0; c < K; ++c) {
    b[c] = args.b[c];
    law[c] = args.law[static_cast<int64_t>(e.scope) * K + c];
  }
  const float lr = args.lr[e.group];
  const bool has_scale = args.grad_scale != nullptr;
  const float scale = has_scale ? *args.grad_scale : 1.f;
  const int64_t n = e.numel;
  const uint32_t dx = dtype_of(e.dtypes, kX), dm = dtype_of(e.dtypes, kD), dg = dtype_of(e.dtypes, kG);
  walk_rows<K>(e, work.begin, work.end, [&](auto width, int64_t i) {
    constexpr int N = decltype(width)::value;
    float mv[K][N], gv[N], xv[N];
#pragma unroll
    for (int c = 0; c < K; ++c) load_n<N>(e.ptr[kD], dm, c * n + i, mv[c]);
    load_n<N>(e.ptr[kG], dg, i, gv);
    load_n<N>(e.ptr[kX], dx, i, xv);
#pragma unroll
    for (int j = 0; j < N; ++j) {
      float m[K], m_new[K];
#pragma unroll
      for (int c = 0; c < K; ++c) m[c] = mv[c][j];
      amm::rllc_memory_update<K>(m, amm::rllc_grad(gv[j], has_scale, scale), U, b, m_new);
      xv[j] = amm::rllc_param<K>(xv[j], m_new, law, lr);
#pragma unroll
      for (int c = 0; c < K; ++c) mv[c][j] = m_new[c];
    }
    store_n<N>(e.ptr[kX], dx, i, xv);
#pragma unroll
    for (int c = 0; c < K; ++c) store_n<N>(e.ptr[kD], dm, c * n + i, mv[c]);
  });
}

template <template <int> class Launch>
cudaError_t with_k(int k, const TensorTable& table, const RllcArgs& args, cudaStream_t stream) {
  switch (k) {
    case 1: return Launch<1>::run(table, args, stream);
    case 2: return Launch<2>::run(table, args, stream);
    case 3: return Launch<3>::run(table, args, stream);
    case 4: return Launch<4>::run(table, args, stream);
    case 5: return Launch<5>::run(table, args, stream);
    case 6: return Launch<6>::run(table, args, stream);
    case 7: return Launch<7>::run(table, args, stream);
    case 8: return Launch<8>::run(table, args, stream);
    default: return cudaErrorInvalidValue;
  }
}

template <int K>
struct SumsLaunch {
  static cudaError_t run(const TensorTable& table, const RllcArgs& args, cudaStream_t stream) {
    rllc_sums_kernel<K><<<grid_of(table), kBlockSize, 0, stream>>>(table, args);
    return cudaGetLastError();
  }
};

template <int K>
struct UpdateLaunch {
  static cudaError_t run(const TensorTable& table, const RllcArgs& args, cudaStream_t stream) {
    rllc_update_kernel<K><<<grid_of(table), kBlockSize, 0, stream>>>(table, args);
    return cudaGetLastError();
  }
};

}  // namespace

cudaError_t launch_rllc_sums(const TensorTable& table, const RllcArgs& args, cudaStream_t stream) {
  if (table.num_blocks == 0) return cudaSuccess;
  return with_k<SumsLaunch>(args.k, table, args, stream);
}

cudaError_t launch_rllc_finalize(const RllcArgs& args, cudaStream_t stream) {
  if (args.num_tensors == 0) return cudaSuccess;
  if (args.k < 1 || args.k > amm::kRllcMaxK) return cudaErrorInvalidValue;
  rllc_finalize_kernel<<<1, kFinalizeThreads, 0, stream>>>(args);
  return cudaGetLastError();
}

cudaError_t launch_rllc_update(const TensorTable& table, const RllcArgs& args, cudaStream_t stream) {
  if (table.num_blocks == 0) return cudaSuccess;
  return with_k<UpdateLaunch>(args.k, table, args, stream);
}

}  // namespace amm_cuda

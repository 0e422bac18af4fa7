// Device plumbing of the multi-tensor launches: finding a block's tensor and chunk, loading and
// storing kVec elements of any supported dtype as float32, walking a chunk, and the fixed-order
// block reduction. The math lives in csrc/amm_math.h; the kernels in the *_kernels.cu files.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "amm_math.h"
#include "cuda/launchers.h"

namespace amm_cuda {

// ---------------------------------------------------------------------------------------------
// Which tensor (local index in the table) and which chunk of it this block works on.
struct BlockWork {
  int tensor;          // local index into table.tensors
  int64_t chunk;       // chunk of that tensor
  int64_t begin, end;  // its elements [begin, end): table.chunk_size of them, fewer in the tensor's last
};

// Chunk c of the table (the two-pass kernels: c = blockIdx.x; the persistent step walks them).
__device__ __forceinline__ BlockWork locate_chunk(const TensorTable& table, int b) {
  // Largest lo with block_begin[lo] <= b (every tensor has at least one chunk).
  int lo = 0, hi = table.num_tensors - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (table.block_begin[mid] <= b) lo = mid; else hi = mid - 1;
  }
  const int64_t chunk = b - table.block_begin[lo], numel = table.tensors[lo].numel;
  const int64_t begin = chunk * table.chunk_size;
  return {lo, chunk, begin, begin + table.chunk_size < numel ? begin + table.chunk_size : numel};
}

__device__ __forceinline__ BlockWork locate_block(const TensorTable& table) {
  return locate_chunk(table, static_cast<int>(blockIdx.x));
}

// NOTE [tensor meta]: the finalize is one block and must see every tensor of the step, far more than
// one kernel argument holds. Rather than copy a host table to the device (a host-to-device copy that
// a CUDA graph would have to keep alive), the first block of each tensor in pass 1 writes that
// tensor's TensorMeta into the step's workspace; the launches are ordered on one stream, so the
// finalize reads a complete array.
__device__ __forceinline__ void write_tensor_meta(const TensorTable& table, int tl, TensorMeta* meta) {
  const TensorEntry& e = table.tensors[tl];
  TensorMeta m;
  m.slot_begin = table.slot_base + table.block_begin[tl];
  m.n_slots = table.block_begin[tl + 1] - table.block_begin[tl];
  m.group = e.group;
  m.scope = e.scope;
  m.scope_end = e.scope_end;
  m.flags = e.flags;
  m.weight_decay = e.weight_decay;
  meta[e.index] = m;
}

// ---------------------------------------------------------------------------------------------
// NOTE [traffic hook]: every load and store of a list element below goes through AMM_CUDA_TRAFFIC
// (address, bytes, is_store). A real build defines it as nothing; the CUDA-on-CPU simulator
// (tests/cuda_sim) counts with it, so tests/test_cuda_sim.py can check each step moves exactly the
// bytes per parameter that bench/README.md budgets (the figure the bandwidth bars are measured
// against), and it faults a vector access that is not 16-byte aligned, as a GPU would.
#ifndef AMM_CUDA_TRAFFIC
#define AMM_CUDA_TRAFFIC(address, bytes, is_store)
#endif

__device__ __forceinline__ int bytes_of(uint32_t dt) { return dt == kFloat32 ? 4 : 2; }

// Loads and stores, float32 in registers whatever the dtype in memory. The dtype is uniform across
// a block (one tensor per block), so the switches never diverge.
__device__ __forceinline__ float load_one(const void* p, uint32_t dt, int64_t i) {
  AMM_CUDA_TRAFFIC(static_cast<const char*>(p) + i * bytes_of(dt), bytes_of(dt), false);
  switch (dt) {
    case kBFloat16: return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
    case kFloat16: return __half2float(static_cast<const __half*>(p)[i]);
    default: return static_cast<const float*>(p)[i];
  }
}

__device__ __forceinline__ void store_one(void* p, uint32_t dt, int64_t i, float v) {
  AMM_CUDA_TRAFFIC(static_cast<const char*>(p) + i * bytes_of(dt), bytes_of(dt), true);
  switch (dt) {
    case kBFloat16: static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(v); break;
    case kFloat16: static_cast<__half*>(p)[i] = __float2half_rn(v); break;
    default: static_cast<float*>(p)[i] = v; break;
  }
}

// kVec elements starting at element i (i a multiple of kVec, the pointer 16-byte aligned).
__device__ __forceinline__ void load_vec(const void* p, uint32_t dt, int64_t i, float (&out)[kVec]) {
  AMM_CUDA_TRAFFIC(static_cast<const char*>(p) + i * bytes_of(dt), kVec * bytes_of(dt), false);
  if (dt == kFloat32) {
    const float4* q = reinterpret_cast<const float4*>(static_cast<const float*>(p) + i);
#pragma unroll
    for (int h = 0; h < kVec / 4; ++h) {
      const float4 a = q[h];
      out[4 * h + 0] = a.x; out[4 * h + 1] = a.y; out[4 * h + 2] = a.z; out[4 * h + 3] = a.w;
    }
  } else {
    static_assert(kVec * 2 == sizeof(uint4), "kVec 16-bit elements are one 16-byte vector");
    const uint4 raw = *reinterpret_cast<const uint4*>(static_cast<const uint16_t*>(p) + i);
    const uint32_t words[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
    for (int w = 0; w < 4; ++w) {
      const unsigned short lo = static_cast<unsigned short>(words[w] & 0xFFFFu);
      const unsigned short hi = static_cast<unsigned short>(words[w] >> 16);
      if (dt == kBFloat16) {
        out[2 * w] = __bfloat162float(__ushort_as_bfloat16(lo));
        out[2 * w + 1] = __bfloat162float(__ushort_as_bfloat16(hi));
      } else {
        out[2 * w] = __half2float(__ushort_as_half(lo));
        out[2 * w + 1] = __half2float(__ushort_as_half(hi));
      }
    }
  }
}

// NOTE [vector stores]: written as plain float4 / uint4 assignments, these stores came out of nvcc
// 13 (-O3, sm_90) as 8 scalar st.global.f32 (4 for 16-bit data) per thread and list in the AM
// kernels (the loads stayed ld.global.v4). A warp's 1 KB of one float32 list then took eight 4-byte
// store instructions, each touching all 32 of its sectors, where two 16-byte ones do: four times the
// L2 write requests. __stwb is the same write-back store, spelled as one st.global.wb.v4 instruction
// whatever the optimiser does around it.
__device__ __forceinline__ void store_vec(void* p, uint32_t dt, int64_t i, const float (&in)[kVec]) {
  AMM_CUDA_TRAFFIC(static_cast<const char*>(p) + i * bytes_of(dt), kVec * bytes_of(dt), true);
  if (dt == kFloat32) {
    float4* q = reinterpret_cast<float4*>(static_cast<float*>(p) + i);
#pragma unroll
    for (int h = 0; h < kVec / 4; ++h) __stwb(q + h, make_float4(in[4 * h], in[4 * h + 1], in[4 * h + 2], in[4 * h + 3]));
  } else {
    uint32_t words[4];
#pragma unroll
    for (int w = 0; w < 4; ++w) {
      unsigned short lo, hi;
      if (dt == kBFloat16) {
        lo = __bfloat16_as_ushort(__float2bfloat16_rn(in[2 * w]));
        hi = __bfloat16_as_ushort(__float2bfloat16_rn(in[2 * w + 1]));
      } else {
        lo = __half_as_ushort(__float2half_rn(in[2 * w]));
        hi = __half_as_ushort(__float2half_rn(in[2 * w + 1]));
      }
      words[w] = static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
    }
    __stwb(reinterpret_cast<uint4*>(static_cast<uint16_t*>(p) + i), make_uint4(words[0], words[1], words[2], words[3]));
  }
}

// N consecutive elements starting at element i: load_vec / store_vec for N = kVec (the vector path's
// conditions hold), load_one / store_one for N = 1. For walks written once for both widths.
template <int N>
__device__ __forceinline__ void load_n(const void* p, uint32_t dt, int64_t i, float (&out)[N]) {
  static_assert(N == kVec || N == 1, "load_n: kVec or 1 elements");
  if constexpr (N == kVec) {
    load_vec(p, dt, i, out);
  } else {
    out[0] = load_one(p, dt, i);
  }
}

template <int N>
__device__ __forceinline__ void store_n(void* p, uint32_t dt, int64_t i, const float (&in)[N]) {
  static_assert(N == kVec || N == 1, "store_n: kVec or 1 elements");
  if constexpr (N == kVec) {
    store_vec(p, dt, i, in);
  } else {
    store_one(p, dt, i, in[0]);
  }
}

// ---------------------------------------------------------------------------------------------
// NOTE [tile cache]: the persistent step (persistent_kernels.cu) reads a chunk in its reduce phase
// and again in its update phase. A TileCache keeps the first `capacity` vector iterations a thread
// loads in the reduce phase in shared memory, and the update phase takes those lists from there
// instead of from global memory. Each thread reads back only what it wrote itself (a thread-private
// layout, element-interleaved across threads so that accesses are free of bank conflicts), so no
// barrier is needed. Both phases walk the same chunks in the same order with the same per-thread
// element order (NOTE [element order]), so iteration k of a thread is the same elements in both.
// `lists` says which lists were kept: in the reduce phase the lists it loads, in the update phase
// the lists the reduce phase loaded for this chunk (0 when it skipped the chunk, on a scope's first
// step: then nothing is taken from the cache and the counter does not move, as in the reduce phase).
// The scalar tail is never cached. NoCache is the two-pass kernels' policy: it compiles away.
struct NoCache {
  __device__ __forceinline__ void begin_chunk(uint32_t) {}
  __device__ __forceinline__ uint32_t hits(uint32_t) const { return 0u; }
  __device__ __forceinline__ void read(int, float (&)[kVec]) const {}
  __device__ __forceinline__ void keep(const float (&)[kMaxLists][kVec]) {}
  __device__ __forceinline__ void advance() {}
};

template <int kLists>  // lists 0 .. kLists-1 may be kept (kX, kG, kD, and kV for AM-AdamW)
struct TileCache {
  float* smem;        // kLists * kVec * capacity * kBlockSize floats (dynamic shared memory)
  int capacity;       // vector iterations a thread keeps
  int next;           // this thread's next vector iteration
  uint32_t lists;     // see the NOTE
  bool filling;       // reduce phase: keep; update phase: read

  __device__ __forceinline__ void begin_chunk(uint32_t chunk_lists) { lists = chunk_lists; }
  __device__ __forceinline__ float& at(int k, int l, int j) const {
    return smem[((k * kLists + l) * kVec + j) * kBlockSize + static_cast<int>(threadIdx.x)];
  }
  // The lists of `wanted` that this iteration reads from the cache rather than from memory.
  __device__ __forceinline__ uint32_t hits(uint32_t wanted) const {
    return (!filling && next < capacity) ? (lists & wanted) : 0u;
  }
  __device__ __forceinline__ void read(int l, float (&out)[kVec]) const {
#pragma unroll
    for (int j = 0; j < kVec; ++j) out[j] = at(next, l, j);
  }
  __device__ __forceinline__ void keep(const float (&r)[kMaxLists][kVec]) {
    if (!filling || next >= capacity) return;
#pragma unroll
    for (int l = 0; l < kLists; ++l) {
      if (lists & (1u << l)) {
#pragma unroll
        for (int j = 0; j < kVec; ++j) at(next, l, j) = r[l][j];
      }
    }
  }
  __device__ __forceinline__ void advance() {
    if (lists != 0u) ++next;
  }
};

// Walk one chunk: load the lists in load_mask, call op on the registers, store the lists in
// store_mask. op is called as op.template apply<N>(r) with N = kVec (vector path) or N = 1 (scalar
// tail, or a tensor that is not 16-byte aligned); element j of list l is r[l][j]. Vector iterations
// go through `cache` (NOTE [tile cache]): it may supply some lists, and may keep what was loaded.
// NOTE [element order]: which thread handles which element, and the order in which a thread visits
// its elements, depend only on the tensor's size and alignment, so per-thread sums are reproducible.
template <class Op, class Cache>
__device__ __forceinline__ void apply_chunk(const TensorEntry& e, const BlockWork& work, uint32_t load_mask,
                                            uint32_t store_mask, Op& op, Cache& cache) {
  const int64_t begin = work.begin, end = work.end;
  float r[kMaxLists][kVec];
  int64_t tail = begin;
  if (e.flags & kAligned) {
    const int64_t vec_end = begin + (end > begin ? (end - begin) / kVec * kVec : 0);
    for (int64_t i = begin + static_cast<int64_t>(threadIdx.x) * kVec; i < vec_end;
         i += static_cast<int64_t>(blockDim.x) * kVec) {
      const uint32_t cached = cache.hits(load_mask);
#pragma unroll
      for (int l = 0; l < kMaxLists; ++l) {
        if (cached & (1u << l)) {
          cache.read(l, r[l]);
        } else if (load_mask & (1u << l)) {
          load_vec(e.ptr[l], dtype_of(e.dtypes, l), i, r[l]);
        }
      }
      cache.keep(r);
      cache.advance();
      op.template apply<kVec>(r);
#pragma unroll
      for (int l = 0; l < kMaxLists; ++l)
        if (store_mask & (1u << l)) store_vec(e.ptr[l], dtype_of(e.dtypes, l), i, r[l]);
    }
    tail = vec_end;
  }
  for (int64_t i = tail + threadIdx.x; i < end; i += blockDim.x) {
#pragma unroll
    for (int l = 0; l < kMaxLists; ++l)
      if (load_mask & (1u << l)) r[l][0] = load_one(e.ptr[l], dtype_of(e.dtypes, l), i);
    op.template apply<1>(r);
#pragma unroll
    for (int l = 0; l < kMaxLists; ++l)
      if (store_mask & (1u << l)) store_one(e.ptr[l], dtype_of(e.dtypes, l), i, r[l][0]);
  }
}

// ---------------------------------------------------------------------------------------------
// NOTE [deterministic sums]: no float atomics anywhere. A block reduces its threads' float32 partial
// sums with a fixed tree (shuffle-down within each warp, then warp 0 over the warps' results in warp
// order), and thread 0 writes them to the block's slot. The finalize combines the slots of a tensor,
// and the tensors of a scope, in a fixed order too. Same inputs, same launch geometry: bit-identical beta.
template <typename T>
__device__ __forceinline__ T warp_sum_down(T v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
  return v;  // the total is in lane 0
}

// Reduces acc[0..N) over the block; the totals are valid in thread 0 only. The leading barrier lets
// a block call it once per chunk (the persistent step): warp 0 has read the last call's partials
// before any warp writes this call's.
template <int N>
__device__ __forceinline__ void block_sum(float (&acc)[N]) {
  __shared__ float partial[N][kBlockSize / 32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int n_warps = (blockDim.x + 31) / 32;
  __syncthreads();
#pragma unroll
  for (int k = 0; k < N; ++k) {
    const float w = warp_sum_down(acc[k]);
    if (lane == 0) partial[k][warp] = w;
  }
  __syncthreads();
  if (warp == 0) {
#pragma unroll
    for (int k = 0; k < N; ++k) acc[k] = warp_sum_down(lane < n_warps ? partial[k][lane] : 0.f);
  }
}

// ---------------------------------------------------------------------------------------------
// AM-AdamW bias corrections of a scope for the step about to be taken, formed in double and rounded
// once (NOTE [bias corrections in float64] in amadamw_reference.py). Pass 1 and the finalize both
// call this on the same (pre-step) state, so pass 1 and pass 2 use the same p.
__device__ __forceinline__ void adamw_bias(float step, float beta_prod, double beta_max, double beta2,
                                           float* bias1, float* bias2) {
  *bias1 = static_cast<float>(1.0 - beta_max * static_cast<double>(beta_prod));
  *bias2 = static_cast<float>(1.0 - pow(beta2, static_cast<double>(step) + 1.0));
}

// A scope's ScopeScratch, read past L1 (__ldcg): in the persistent step another block wrote it
// during this same launch (NOTE [persistent step]).
__device__ __forceinline__ ScopeScratch load_scratch(const ScopeScratch* scratch, int scope) {
  static_assert(sizeof(ScopeScratch) == sizeof(float4), "ScopeScratch is one 16-byte load");
  const float4 v = __ldcg(reinterpret_cast<const float4*>(scratch + scope));
  return ScopeScratch{v.x, v.y, v.z, v.w};
}

// ---------------------------------------------------------------------------------------------
// The two passes on one chunk c, for an algorithm described by a Pass struct (amsgd_pass.cuh,
// amadamw_pass.cuh): kSums, sums_op(args, e), sums_loads(e), update_op(args, e, scratch),
// update_loads(first_step), kUpdateStores. Shared by the two-pass kernels (one block per chunk,
// c = blockIdx.x) and the persistent step (each block walks chunks; NOTE [persistent step]).

// Pass 1: the chunk's sums into its slot, and a tensor's TensorMeta from its first chunk. On a
// scope's first step beta is beta_max whatever the sums, so the chunk is not read.
template <class Pass, class Cache>
__device__ __forceinline__ void reduce_chunk(const TensorTable& table, const PassArgs& args, int c, Cache& cache) {
  const BlockWork work = locate_chunk(table, c);
  const TensorEntry& e = table.tensors[work.tensor];
  if (work.chunk == 0 && threadIdx.x == 0) write_tensor_meta(table, work.tensor, args.meta);
  auto op = Pass::sums_op(args, e);
  if (args.step[e.scope] != 0.f) {
    const uint32_t loads = Pass::sums_loads(e);
    cache.begin_chunk(loads);
    apply_chunk(e, work, loads, 0u, op, cache);
  }
  block_sum(op.acc);
  if (threadIdx.x == 0) {
    float* slot = args.slots + (table.slot_base + c) * Pass::kSums;
#pragma unroll
    for (int k = 0; k < Pass::kSums; ++k) slot[k] = op.acc[k];
  }
}

// Pass 2: the update with the scope's beta from the finalize's ScopeScratch. The caller skips it
// when found_inf > 0.
template <class Pass, class Cache>
__device__ __forceinline__ void update_chunk(const TensorTable& table, const PassArgs& args, int c, Cache& cache) {
  const BlockWork work = locate_chunk(table, c);
  const TensorEntry& e = table.tensors[work.tensor];
  const ScopeScratch sc = load_scratch(args.scratch, e.scope);
  const bool first = sc.first_step != 0.f;
  auto op = Pass::update_op(args, e, sc);
  cache.begin_chunk(first ? 0u : Pass::sums_loads(e));  // what pass 1 read (nothing on a first step)
  apply_chunk(e, work, Pass::update_loads(first), Pass::kUpdateStores, op, cache);
}

__device__ __forceinline__ bool step_skipped(const float* found_inf) {
  return found_inf != nullptr && *found_inf > 0.f;
}

__device__ __forceinline__ float inv_grad_scale(const float* grad_scale) {
  return grad_scale != nullptr ? 1.f / *grad_scale : 1.f;
}

inline unsigned grid_of(const TensorTable& table) { return static_cast<unsigned>(table.num_blocks); }

}  // namespace amm_cuda

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
  int tensor;     // local index into table.tensors
  int64_t chunk;  // chunk of that tensor
};

__device__ __forceinline__ BlockWork locate_block(const TensorTable& table) {
  // Largest lo with block_begin[lo] <= blockIdx.x (every tensor has at least one block).
  const int b = static_cast<int>(blockIdx.x);
  int lo = 0, hi = table.num_tensors - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (table.block_begin[mid] <= b) lo = mid; else hi = mid - 1;
  }
  return {lo, static_cast<int64_t>(b - table.block_begin[lo])};
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
// Loads and stores, float32 in registers whatever the dtype in memory. The dtype is uniform across
// a block (one tensor per block), so the switches never diverge.
__device__ __forceinline__ float load_one(const void* p, uint32_t dt, int64_t i) {
  switch (dt) {
    case kBFloat16: return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
    case kFloat16: return __half2float(static_cast<const __half*>(p)[i]);
    default: return static_cast<const float*>(p)[i];
  }
}

__device__ __forceinline__ void store_one(void* p, uint32_t dt, int64_t i, float v) {
  switch (dt) {
    case kBFloat16: static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(v); break;
    case kFloat16: static_cast<__half*>(p)[i] = __float2half_rn(v); break;
    default: static_cast<float*>(p)[i] = v; break;
  }
}

// kVec elements starting at element i (i a multiple of kVec, the pointer 16-byte aligned).
__device__ __forceinline__ void load_vec(const void* p, uint32_t dt, int64_t i, float (&out)[kVec]) {
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

__device__ __forceinline__ void store_vec(void* p, uint32_t dt, int64_t i, const float (&in)[kVec]) {
  if (dt == kFloat32) {
    float4* q = reinterpret_cast<float4*>(static_cast<float*>(p) + i);
#pragma unroll
    for (int h = 0; h < kVec / 4; ++h) q[h] = make_float4(in[4 * h], in[4 * h + 1], in[4 * h + 2], in[4 * h + 3]);
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
    *reinterpret_cast<uint4*>(static_cast<uint16_t*>(p) + i) = make_uint4(words[0], words[1], words[2], words[3]);
  }
}

// ---------------------------------------------------------------------------------------------
// Walk one chunk: load the lists in load_mask, call op on the registers, store the lists in
// store_mask. op is called as op.template apply<N>(r) with N = kVec (vector path) or N = 1 (scalar
// tail, or a tensor that is not 16-byte aligned); element j of list l is r[l][j].
// NOTE [element order]: which thread handles which element, and the order in which a thread visits
// its elements, depend only on the tensor's size and alignment, so per-thread sums are reproducible.
template <class Op>
__device__ __forceinline__ void apply_chunk(const TensorEntry& e, int64_t chunk, uint32_t load_mask,
                                            uint32_t store_mask, Op& op) {
  const int64_t begin = chunk * kChunkSize;
  const int64_t end = begin + kChunkSize < e.numel ? begin + kChunkSize : e.numel;
  float r[kMaxLists][kVec];
  int64_t tail = begin;
  if (e.flags & kAligned) {
    const int64_t vec_end = begin + (end > begin ? (end - begin) / kVec * kVec : 0);
    for (int64_t i = begin + static_cast<int64_t>(threadIdx.x) * kVec; i < vec_end;
         i += static_cast<int64_t>(blockDim.x) * kVec) {
#pragma unroll
      for (int l = 0; l < kMaxLists; ++l)
        if (load_mask & (1u << l)) load_vec(e.ptr[l], dtype_of(e.dtypes, l), i, r[l]);
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

// Reduces acc[0..N) over the block; the totals are valid in thread 0 only. Ends with a barrier-free
// return, so call it once per block (its shared memory is not reused).
template <int N>
__device__ __forceinline__ void block_sum(float (&acc)[N]) {
  __shared__ float partial[N][kBlockSize / 32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int n_warps = (blockDim.x + 31) / 32;
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

__device__ __forceinline__ bool step_skipped(const float* found_inf) {
  return found_inf != nullptr && *found_inf > 0.f;
}

__device__ __forceinline__ float inv_grad_scale(const float* grad_scale) {
  return grad_scale != nullptr ? 1.f / *grad_scale : 1.f;
}

inline unsigned grid_of(const TensorTable& table) { return static_cast<unsigned>(table.num_blocks); }

}  // namespace amm_cuda

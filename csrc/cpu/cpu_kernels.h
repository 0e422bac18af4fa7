// Interface between the CPU step driver (step_driver_cpu.cpp) and the two passes of each optimizer
// (amsgd_cpu.cpp, amadamw_cpu.cpp). Internal to csrc/cpu/.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <array>
#include <cstdint>
#include <functional>
#include <type_traits>
#include <vector>

namespace amm {
namespace cpu {

// Elements per work chunk. Chunks are the unit of parallel work and of the float32 partial sums:
// every chunk's sums land in a fixed slot, and the slots are combined in a fixed order, so the sums
// (and beta) are bit-identical whatever the thread count. A multiple of the lane count below.
constexpr int64_t kChunk = 8192;
// Independent float32 accumulators per sum inside a chunk (lane j takes elements j, j + kLanes, ...).
constexpr int kLanes = 16;

// One tensor of the step, as the passes see it: contiguous working tensors (the driver makes
// contiguous copies of non-contiguous inputs and writes them back after pass 2).
struct StepTensor {
  at::Tensor x, g, d, v;  // v undefined for AMSGD
  int64_t numel = 0;
  // per-tensor scalars (float32, as the math is)
  float lr = 0.f;        // this step's lr of the tensor's group
  float wd = 0.f;        // weight decay of the tensor's group (coupled for AMSGD, decoupled for AMAdamW)
  float bias1 = 1.f;     // AMAdamW: 1 - beta_max * beta_prod (formed in double, rounded)
  float bias2 = 1.f;     // AMAdamW: 1 - beta2^t
  float beta = 0.f;      // pass 2: the tensor's scope's beta
  bool first = false;    // AMSGD pass 2: the scope's first step (d <- g)
  bool need_sums = false;  // pass 1 runs for this tensor
};

struct CommonArgs {
  float inv_grad_scale = 1.f;  // 1 / grad_scale, negated when maximize
  bool maximize = false;      // always false here: folded into inv_grad_scale's sign
  float lam = 0.f;
  float beta2 = 0.f;  // AMAdamW
  float one_minus_beta2 = 1.f;  // AMAdamW: 1 - beta2 formed in double, rounded once
  float eps = 0.f;    // AMAdamW
};

// The passes take any run of consecutive tensors of the step (the driver hands them one batch of
// scopes at a time, NOTE [scope batches] in step_driver_cpu.cpp); indices below are within `ts`.
using Tensors = c10::ArrayRef<StepTensor>;

// Pass 1: per-tensor float32 sums (kAmsgdSums / kAmadamwSums per tensor, row-major [T][K]); tensors
// with need_sums == false get zeros. Reads only.
void amsgd_sums(Tensors ts, const CommonArgs& a, std::vector<float>& sums);
void amadamw_sums(Tensors ts, const CommonArgs& a, std::vector<float>& sums);

// Pass 2: the update, in place on the working tensors.
void amsgd_update(Tensors ts, const CommonArgs& a);
void amadamw_update(Tensors ts, const CommonArgs& a);

// Chunked parallel loop shared by the passes: calls fn(tensor_index, begin, end, chunk_slot) for
// every chunk of every tensor with include(t) true, in parallel over chunks; chunk_slot numbers the
// chunks 0..n-1 in (tensor, offset) order. Returns the number of chunks and, per tensor, its first slot.
struct ChunkPlan {
  std::vector<int32_t> tensor;  // per chunk
  std::vector<int64_t> begin;   // per chunk
  std::vector<int64_t> end;     // per chunk
  std::vector<int64_t> first_slot;  // per tensor (size T + 1)
  int64_t total_elements = 0;
};

template <class Include>
ChunkPlan make_plan(Tensors ts, Include include) {
  ChunkPlan plan;
  plan.first_slot.resize(ts.size() + 1);
  for (size_t t = 0; t < ts.size(); ++t) {
    plan.first_slot[t] = static_cast<int64_t>(plan.tensor.size());
    if (!include(ts[t])) continue;
    const int64_t n = ts[t].numel;
    plan.total_elements += n;
    for (int64_t b = 0; b < n; b += kChunk) {
      plan.tensor.push_back(static_cast<int32_t>(t));
      plan.begin.push_back(b);
      plan.end.push_back(b + kChunk < n ? b + kChunk : n);
    }
  }
  plan.first_slot[ts.size()] = static_cast<int64_t>(plan.tensor.size());
  return plan;
}

// Pass 1's per-tensor sums from its per-chunk partials (K per chunk, in plan order): each tensor's
// chunks added in chunk order in double, rounded once to float32, into sums[t * K + k] (row-major [T][K]).
void combine_chunk_sums(const ChunkPlan& plan, const std::vector<float>& partial, int K, std::vector<float>& sums);

// Runs fn(c) for c in [0, n): on the calling thread when the work (total_elements) is below
// serial_below (the thread pool's start-up would cost more), else in parallel, each thread one
// contiguous range of c (the same ranges for the same n and thread count). With reverse, each range
// is walked from its end. Pass 2 runs in reverse: what pass 1 read last is still in the caches, and
// pass 2 uses it first (each chunk is independent in pass 2, so the order changes no result).
void parallel_chunks(int64_t n, int64_t total_elements, int64_t serial_below, const std::function<void(int64_t)>& fn,
                     bool reverse);

// parallel_chunks over the chunks of a plan (the AM steps').
void for_each_chunk(const ChunkPlan& plan, const std::function<void(int64_t)>& fn, bool reverse = false);

// Scope batches (NOTE [scope batches] in step_driver_cpu.cpp), shared by the AM and RLLC drivers.
// A step's scopes are runs of consecutive tensors, (scope index, first tensor, end tensor); a batch is
// runs [r0, r1), tensors [t0, t1).
using ScopeRuns = std::vector<std::array<int64_t, 3>>;
struct ScopeBatch {
  size_t r0, r1;
  int64_t t0, t1;
};
// Consecutive whole runs of at most batch_bytes() of pass-1 reads (`run_bytes(r)`), a larger run
// alone; one batch of all runs when split is false or the size is 0. Empty for no runs.
std::vector<ScopeBatch> scope_batches(const ScopeRuns& runs, const std::function<int64_t(size_t)>& run_bytes,
                                      bool split);
// The batch size: AMM_CPU_BATCH_BYTES when set (0: one batch), else the default; read at every step.
int64_t batch_bytes();

// How many threads an at::parallel_for in this library runs on (for the test that guards
// NOTE [OpenMP] in setup.py); exposed as amm_kernels._C.parallel_threads().
int64_t parallel_thread_count();

// ---------------------------------------------------------------------------------------------
// Instruction sets of the hot loops. The extension is built for the baseline x86-64 ISA (SSE2); the
// chunk functions are compiled a second and third time with GCC's target attribute (AVX2+FMA and
// AVX-512) and one is picked at run time (cpu_isa(), step_driver_cpu.cpp): the best the CPU has,
// or the one named by the environment variable AMM_CPU_ISA ("avx512", "avx2" or "base"; a level the
// CPU lacks falls back to the best it has; another name is an error at the first step; read once a
// process). The files with these loops are compiled with
// fp-contract=off, so no variant fuses a*b+c into an FMA: every variant does the same float32
// operations in the same order (the lanes below fix the order of the sums), and the results are
// bit-identical whichever variant runs.
//
// NOTE [lanes, not at::vec]: torch's at::vec::Vectorized (FusedAdamKernel.cpp's tool) picks its
// instruction set at compile time, from the CPU_CAPABILITY_AVX2 / _AVX512 macros torch's own build
// sets per copy of a kernel file (ATen/cpu/vec/vec256/vec256.h). In an extension's translation unit,
// built for the baseline ISA, it is the generic 32-byte array code, SSE2 at best. Plain loops over
// kLanes floats, compiled three times with the target attribute, give the AVX2 and AVX-512 code from
// one source and keep the order of every float operation fixed. Measured (bench/README.md, "CPU
// step"): the AMAdamW step on one thread took 46 ms built for the baseline ISA, 25 ms for AVX2 and
// 22 ms for AVX-512.
enum class Isa : int { kBase = 0, kAvx2 = 1, kAvx512 = 2 };
Isa cpu_isa();
const char* isa_name(Isa isa);
const char* cpu_isa_name();  // isa_name(cpu_isa()), exposed as amm_kernels._C.cpu_isa()

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define AMM_CPU_MULTI_ISA 1
#define AMM_TARGET_AVX2 __attribute__((target("avx2,fma,f16c,bmi,bmi2")))
#define AMM_TARGET_AVX512 __attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,f16c,bmi,bmi2")))
#else
#define AMM_CPU_MULTI_ISA 0
#define AMM_TARGET_AVX2
#define AMM_TARGET_AVX512
#endif
// The build of chunk function `fn` for `isa`: fn##_avx512, fn##_avx2 or fn##_base, each a template
// instantiated with the arguments after `fn` (the *_cpu.cpp files define the three with one macro).
#if AMM_CPU_MULTI_ISA
#define AMM_PICK_ISA(isa, fn, ...)                                        \
  ((isa) == Isa::kAvx512 ? &fn##_avx512<__VA_ARGS__>                      \
   : (isa) == Isa::kAvx2 ? &fn##_avx2<__VA_ARGS__> : &fn##_base<__VA_ARGS__>)
#else
#define AMM_PICK_ISA(isa, fn, ...) (static_cast<void>(isa), &fn##_base<__VA_ARGS__>)
#endif

#if defined(__GNUC__)
#define AMM_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define AMM_ALWAYS_INLINE inline
#endif

// Element types: the parameter type TX (float, BFloat16, Half); the gradient TG and the state TS are
// TX or float (the driver converts other gradient dtypes to float32). Loads convert to float.
AMM_ALWAYS_INLINE float ld(float v) { return v; }
AMM_ALWAYS_INLINE float ld(c10::BFloat16 v) { return static_cast<float>(v); }
AMM_ALWAYS_INLINE float ld(c10::Half v) { return static_cast<float>(v); }
template <class T>
AMM_ALWAYS_INLINE T st(float v) { return static_cast<T>(v); }

template <class F>
void with_float_type(at::ScalarType t, F&& f) {
  switch (t) {
    case at::kFloat: f(float{}); break;
    case at::kBFloat16: f(c10::BFloat16{}); break;
    case at::kHalf: f(c10::Half{}); break;
    default: TORCH_CHECK(false, "amm_kernels (cpu): unsupported dtype ", t);
  }
}

// Calls f(TX{}, TG{}, TS{}) with TG, TS each TX or float (the dtypes of the tensor's x, g and state).
template <class F>
void with_step_types(at::ScalarType x, at::ScalarType g, at::ScalarType s, F&& f) {
  with_float_type(x, [&](auto tx) {
    using TX = decltype(tx);
    const bool g_same = g == x, s_same = s == x;
    TORCH_CHECK(g_same || g == at::kFloat, "amm_kernels (cpu): gradient dtype ", g, " for a ", x, " parameter");
    TORCH_CHECK(s_same || s == at::kFloat, "amm_kernels (cpu): state dtype ", s, " for a ", x, " parameter");
    if constexpr (std::is_same_v<TX, float>) {
      f(tx, float{}, float{});
    } else {
      if (g_same && s_same) f(tx, tx, tx);
      else if (g_same) f(tx, tx, float{});
      else if (s_same) f(tx, float{}, tx);
      else f(tx, float{}, float{});
    }
  });
}

// Sum of kLanes lane accumulators in a fixed (pairwise) order (float for the AM sums, double for RLLC's).
template <class T>
AMM_ALWAYS_INLINE T lane_sum(const T* acc) {
  T tmp[kLanes];
  for (int j = 0; j < kLanes; ++j) tmp[j] = acc[j];
  for (int w = kLanes / 2; w > 0; w /= 2)
    for (int j = 0; j < w; ++j) tmp[j] += tmp[j + w];
  return tmp[0];
}

}  // namespace cpu
}  // namespace amm

// The CPU implementation of rllc_step (csrc/OPS.md, SPEC.md section 4), matching
// amm_kernels/reference/rllc_reference.py: pass 1 (per-chunk double sums of the previous memory's Gram
// entries and M^T g, each chunk into its own slot), the slots combined per tensor and per scope in a
// fixed order (bit-identical whatever the thread count), the law update per scope (rllc_math.h's
// Jacobi pinv), then pass 2 (the k memory rows and the parameter in one sweep), one batch of scopes
// at a time (NOTE [scope batches] in step_driver_cpu.cpp). With found_inf > 0
// nothing at all is written. It shares the math headers and cpu_kernels.h's lanes, instruction-set
// builds, scope batches and parallel loop with the AM kernels, and nothing else.
#include <ATen/ATen.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <type_traits>
#include <utility>
#include <vector>

#include "cpu_kernels.h"  // the lanes, the instruction-set builds (Isa, AMM_PICK_ISA) and ld()
#include "gradient_dtype.h"
#include "writable.h"
#include "op_signatures.h"
#include "rllc_math.h"

namespace amm {
namespace rllc_cpu {
namespace {

const char* kOwner = "amm_kernels rllc_step (cpu)";
// Elements per chunk: the unit of parallel work and of pass 1's slots.
constexpr int64_t kChunk = 16384;
// Steps smaller than this run on the calling thread.
constexpr int64_t kSerialElements = 1 << 16;

struct Tensor1 {
  at::Tensor x, g, m;  // contiguous working tensors: param, grad and memory (k rows) (each: param dtype or float32)
  int64_t n = 0;
  int64_t scope_pos = 0;  // index into the runs
  float lr = 0.f;
  bool sums = false;  // pass 1 reads this tensor (its scope is not on its first step)
};

struct Chunk {
  int32_t t;
  int64_t begin, end;
};

template <class F>
void dispatch_k(int64_t k, F&& f) {
  switch (k) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    case 5: f(std::integral_constant<int, 5>{}); break;
    case 6: f(std::integral_constant<int, 6>{}); break;
    case 7: f(std::integral_constant<int, 7>{}); break;
    case 8: f(std::integral_constant<int, 8>{}); break;
    default: TORCH_CHECK(false, kOwner, ": k = ", k, " memory units; the kernels handle 1..", kRllcMaxK);
  }
}

template <class F>
void for_each(int64_t n, int64_t total_elements, const F& fn, bool reverse = false) {
  cpu::parallel_chunks(n, total_elements, kSerialElements, fn, reverse);
}

// NOTE [RLLC lanes]: as in the AM kernels (amsgd_cpu.cpp), both passes loop over cpu::kLanes
// independent lanes (lane j takes elements j, j + kLanes, ...) so that the compiler vectorizes them
// without reassociating a sum: pass 1 keeps its double sums per lane and adds the lanes pairwise in a
// fixed order at the end of the chunk. Each chunk function is built for base x86-64, AVX2 and AVX-512
// (cpu_kernels.h, Isa) and the builds give bit-identical results (-ffp-contract=off; the double
// products are exact). Before, pass 1 added each element into one accumulator per sum (a chain of
// dependent double adds), both passes were built for base x86-64 only, and for k >= 3 GCC left the
// Gram terms' triangular loop rolled, so nothing around it vectorized (AMM_RLLC_UNROLL in
// rllc_math.h now unrolls it): the step moved 7-19 GB/s (k = 3, 4M parameters, 1 thread: 29 ms),
// where AMSGD's moves 28-39; now 29-37 GB/s (6.3 ms) (bench/README.md, "Step cost").
using cpu::Isa;
using cpu::lane_sum;
using cpu::ld;
constexpr int kLanes = cpu::kLanes;

template <int K, class TM, class TG>
AMM_ALWAYS_INLINE void add_terms(const TM* __restrict__ m, const TG* __restrict__ g, int64_t n, int64_t i,
                                 bool has_scale, float scale, double (&acc)[rllc_n_sums(K)][kLanes], int j) {
  float mv[K];
AMM_RLLC_UNROLL
  for (int a = 0; a < K; ++a) mv[a] = ld(m[a * n + i]);
  double term[rllc_n_sums(K)];
  rllc_terms<K>(mv, rllc_grad(ld(g[i]), has_scale, scale), term);
  // no AMM_RLLC_UNROLL: GCC unrolls this loop by itself (the object code is the same without the
  // pragma), and with it warned "ignoring loop annotation" 40 times a build
  for (int p = 0; p < rllc_n_sums(K); ++p) acc[p][j] += term[p];
}

// Pass 1 over elements [begin, end) of one tensor (memory m: K rows of n): its sums (double) into
// slot[0 .. rllc_n_sums(K)).
template <int K, class TM, class TG>
AMM_ALWAYS_INLINE void sums_loop(const TM* __restrict__ m, const TG* __restrict__ g, int64_t n, int64_t begin,
                                 int64_t end, bool has_scale, float scale, double* slot) {
  double acc[rllc_n_sums(K)][kLanes] = {};
  int64_t i = begin;
  for (; i + kLanes <= end; i += kLanes)
    for (int j = 0; j < kLanes; ++j) add_terms<K>(m, g, n, i + j, has_scale, scale, acc, j);
  for (int j = 0; i < end; ++i, ++j) add_terms<K>(m, g, n, i, has_scale, scale, acc, j);
  for (int p = 0; p < rllc_n_sums(K); ++p) slot[p] = lane_sum(acc[p]);
}

// What pass 2 applies to every element of a tensor: U (row-major K x K), b, the scope's new law, lr.
template <int K>
struct UpdateConsts {
  float U[K * K], b[K], law[K], lr;
};

template <int K, class TX, class TM, class TG>
AMM_ALWAYS_INLINE void update_at(TX* __restrict__ x, TM* __restrict__ m, const TG* __restrict__ g, int64_t n,
                                 int64_t i, bool has_scale, float scale, const UpdateConsts<K>& c) {
  float mv[K], mn[K];
AMM_RLLC_UNROLL
  for (int a = 0; a < K; ++a) mv[a] = ld(m[a * n + i]);
  const float gv = rllc_grad(ld(g[i]), has_scale, scale);
  rllc_memory_update<K>(mv, gv, c.U, c.b, mn);
  x[i] = static_cast<TX>(rllc_param<K>(ld(x[i]), mn, c.law, c.lr));
AMM_RLLC_UNROLL
  for (int a = 0; a < K; ++a) m[a * n + i] = static_cast<TM>(mn[a]);
}

// Pass 2 over elements [begin, end) of one tensor: the memory rows and the parameter. The constants
// are copied to locals and the lane loop is marked ivdep (NOTE [pass 2 codegen] in amadamw_cpu.cpp).
template <int K, class TX, class TM, class TG>
AMM_ALWAYS_INLINE void update_loop(TX* __restrict__ x, TM* __restrict__ m, const TG* __restrict__ g, int64_t n,
                                   int64_t begin, int64_t end, bool has_scale, float scale,
                                   const UpdateConsts<K>& consts) {
  const UpdateConsts<K> c = consts;
  int64_t i = begin;
  for (; i + kLanes <= end; i += kLanes) {
#pragma GCC ivdep
    for (int j = 0; j < kLanes; ++j) update_at<K>(x, m, g, n, i + j, has_scale, scale, c);
  }
  for (; i < end; ++i) update_at<K>(x, m, g, n, i, has_scale, scale, c);
}

// The three builds of each chunk function (cpu_kernels.h, Isa).
template <int K, class TM, class TG>
void sums_base(const TM* m, const TG* g, int64_t n, int64_t begin, int64_t end, bool has_scale, float scale,
               double* slot) {
  sums_loop<K>(m, g, n, begin, end, has_scale, scale, slot);
}
template <int K, class TX, class TM, class TG>
void update_base(TX* x, TM* m, const TG* g, int64_t n, int64_t begin, int64_t end, bool has_scale, float scale,
                 const UpdateConsts<K>& c) {
  update_loop<K>(x, m, g, n, begin, end, has_scale, scale, c);
}
#if AMM_CPU_MULTI_ISA
template <int K, class TM, class TG>
AMM_TARGET_AVX2 void sums_avx2(const TM* m, const TG* g, int64_t n, int64_t begin, int64_t end, bool has_scale,
                               float scale, double* slot) {
  sums_loop<K>(m, g, n, begin, end, has_scale, scale, slot);
}
template <int K, class TX, class TM, class TG>
AMM_TARGET_AVX2 void update_avx2(TX* x, TM* m, const TG* g, int64_t n, int64_t begin, int64_t end, bool has_scale,
                                 float scale, const UpdateConsts<K>& c) {
  update_loop<K>(x, m, g, n, begin, end, has_scale, scale, c);
}
template <int K, class TM, class TG>
AMM_TARGET_AVX512 void sums_avx512(const TM* m, const TG* g, int64_t n, int64_t begin, int64_t end, bool has_scale,
                                   float scale, double* slot) {
  sums_loop<K>(m, g, n, begin, end, has_scale, scale, slot);
}
template <int K, class TX, class TM, class TG>
AMM_TARGET_AVX512 void update_avx512(TX* x, TM* m, const TG* g, int64_t n, int64_t begin, int64_t end,
                                     bool has_scale, float scale, const UpdateConsts<K>& c) {
  update_loop<K>(x, m, g, n, begin, end, has_scale, scale, c);
}
#endif

float scalar_of(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.numel() == 1, kOwner, ": ", name, " must have one element, got ", t.numel());
  return t.to(at::kCPU).to(at::kFloat).item<float>();
}

// One RLLC step. With sums_out, only its half before the all-reduce (NOTE [sharded sums] in
// step_driver_cpu.cpp): each present scope's k(k+1)/2 + k sums go to row s of *sums_out ([S, P]
// float64; zeros on the scope's first step) and nothing is written. With sums_in (the all-reduced
// [S, P] sums), pass 1 is skipped and the law is updated from them.
void rllc_run(AMM_RLLC_PARAMS, const std::optional<at::Tensor>& sums_in, at::Tensor* sums_out) {
  const size_t T = params.size();
  const int64_t k = static_cast<int64_t>(b.size());
  TORCH_CHECK(k >= 1 && k <= kRllcMaxK, kOwner, ": k = ", k, " memory units; the kernels handle 1..", kRllcMaxK);
  TORCH_CHECK(static_cast<int64_t>(U.size()) == k * k, kOwner, ": U must have k * k = ", k * k, " entries");
  TORCH_CHECK(grads.size() == T && memory.size() == T && group_of.size() == T && scope_of.size() == T, kOwner,
              ": params, grads, memory, group_of and scope_of must have the same length");
  TORCH_CHECK(step.device().is_cpu() && step.scalar_type() == at::kFloat && step.is_contiguous(), kOwner,
              ": step must be a contiguous float32 CPU tensor");
  TORCH_CHECK(law.device().is_cpu() && law.scalar_type() == at::kFloat && law.is_contiguous(), kOwner,
              ": law must be a contiguous float32 CPU tensor");
  const int64_t S = step.numel();
  TORCH_CHECK(law.numel() == S * k, kOwner, ": law must have shape [S, k] = [", S, ", ", k, "], got ", law.sizes());
  TORCH_CHECK(lr.device().is_cpu(), kOwner, ": lr must be a CPU tensor");
  if (T == 0) return;

  if (found_inf.has_value() && found_inf->defined()) {
    // NaN is not > 0: not skipped, as the reference's `found_inf > 0`.
    if (scalar_of(*found_inf, "found_inf") > 0.f) return;
  }
  const bool given = sums_in.has_value() && sums_in->defined();
  const bool has_scale = grad_scale.has_value() && grad_scale->defined();
  const float scale = has_scale ? scalar_of(*grad_scale, "grad_scale") : 1.f;
  const at::Tensor lr_f = lr.to(at::kFloat).contiguous().reshape(-1);
  const float* lr_p = lr_f.const_data_ptr<float>();
  const int64_t G = lr_f.numel();
  float* step_p = step.mutable_data_ptr<float>();
  float* law_p = law.mutable_data_ptr<float>();

  // The tensors, their working copies, and the scope runs (scope index, first tensor, end tensor).
  std::vector<Tensor1> ts(T);
  std::vector<std::pair<at::Tensor, at::Tensor>> write_back;
  std::vector<std::array<int64_t, 3>> runs;
  std::vector<char> scope_seen(S, 0);
  for (size_t i = 0; i < T; ++i) {
    const int64_t gi = group_of[i], si = scope_of[i];
    TORCH_CHECK(gi >= 0 && gi < G, kOwner, ": group_of[", i, "] = ", gi, " is out of range [0, ", G, ")");
    TORCH_CHECK(si >= 0 && si < S, kOwner, ": scope_of[", i, "] = ", si, " is out of range [0, ", S, ")");
    const at::Tensor& x = params[i];
    const at::Tensor& mem = memory[i];
    TORCH_CHECK(x.device().is_cpu() && grads[i].device().is_cpu() && mem.device().is_cpu(), kOwner, ": tensor ", i,
                " is not on the CPU");
    const at::ScalarType xt = x.scalar_type();
    TORCH_CHECK(xt == at::kFloat || xt == at::kBFloat16 || xt == at::kHalf, kOwner, ": parameter ", i,
                " has unsupported dtype ", xt, " (float32, bfloat16, float16 are supported)");
    TORCH_CHECK(mem.scalar_type() == xt || mem.scalar_type() == at::kFloat, kOwner, ": memory[", i,
                "] must have its parameter's dtype ", xt, " or float32, got ", mem.scalar_type());
    const int64_t n = x.numel();
    TORCH_CHECK(grads[i].sizes() == x.sizes(), kOwner, ": grads[", i, "] has shape ", grads[i].sizes(),
                ", its parameter ", x.sizes());
    TORCH_CHECK(mem.dim() == x.dim() + 1 && mem.size(0) == k && mem.sizes().slice(1) == x.sizes(), kOwner,
                ": memory[", i, "] must have shape (k, *param.shape) with k = ", k, ", got ", mem.sizes());
    amm::check_writable(x, kOwner, i, "parameter");
    amm::check_writable(mem, kOwner, i, "memory");
    Tensor1& t = ts[i];
    t.n = n;
    if (x.is_contiguous()) {
      t.x = x;
    } else {
      t.x = x.contiguous();
      write_back.emplace_back(x, t.x);
    }
    if (mem.is_contiguous()) {
      t.m = mem;
    } else {
      t.m = mem.contiguous();
      write_back.emplace_back(mem, t.m);
    }
    const at::Tensor g = amm::readable_gradient(grads[i], xt, kOwner, i);
    t.g = g.is_contiguous() && g.sizes() == x.sizes() ? g : g.reshape(x.sizes()).contiguous();
    t.lr = lr_p[gi];
    if (runs.empty() || runs.back()[0] != si) {
      TORCH_CHECK(!scope_seen[si], kOwner, ": the tensors of scope ", si, " are not contiguous in the lists");
      scope_seen[si] = 1;
      runs.push_back({si, static_cast<int64_t>(i), static_cast<int64_t>(i) + 1});
    } else {
      runs.back()[2] = static_cast<int64_t>(i) + 1;
    }
    t.scope_pos = static_cast<int64_t>(runs.size()) - 1;
    t.sums = step_p[si] != 0.f && !given;  // on a scope's first step the sums are not used
  }

  const int P = rllc_n_sums(static_cast<int>(k));
  const double* given_p = nullptr;
  at::Tensor given_c;
  if (given) {
    TORCH_CHECK(sums_in->device().is_cpu() && sums_in->scalar_type() == at::kDouble && sums_in->dim() == 2 &&
                    sums_in->size(0) == S && sums_in->size(1) == P,
                kOwner, ": scope_sums must be a float64 CPU tensor of shape [", S, ", ", P, "], got ",
                sums_in->scalar_type(), " ", sums_in->sizes());
    given_c = sums_in->contiguous();
    given_p = given_c.const_data_ptr<double>();
  }

  // Scope batch by scope batch (NOTE [scope batches] in step_driver_cpu.cpp): pass 1, the laws of the
  // batch's scopes, pass 2. One batch when the sums are given or for the sums op.
  const Isa isa = cpu::cpu_isa();
  std::vector<float> law_new(runs.size() * k);
  std::vector<double> scope_sums(P), tensor_sums(P);
  const auto run_bytes = [&](size_t r) {
    int64_t bytes = 0;
    for (int64_t i = runs[r][1]; i < runs[r][2]; ++i)
      bytes += ts[i].n * (ts[i].x.element_size() + ts[i].g.element_size() + k * ts[i].m.element_size());
    return bytes;
  };
  for (const cpu::ScopeBatch& batch : cpu::scope_batches(runs, run_bytes, !given && sums_out == nullptr)) {
    // The batch's chunks (tensor, offset order); pass 1's slots are numbered by chunk.
    std::vector<Chunk> chunks;
    std::vector<int64_t> first_chunk(batch.t1 - batch.t0 + 1);  // indexed by tensor - batch.t0
    int64_t total = 0, total_sums = 0;
    for (int64_t i = batch.t0; i < batch.t1; ++i) {
      first_chunk[i - batch.t0] = static_cast<int64_t>(chunks.size());
      total += ts[i].n;
      if (ts[i].sums) total_sums += ts[i].n;
      for (int64_t s = 0; s < ts[i].n; s += kChunk)
        chunks.push_back({static_cast<int32_t>(i), s, s + kChunk < ts[i].n ? s + kChunk : ts[i].n});
    }
    first_chunk[batch.t1 - batch.t0] = static_cast<int64_t>(chunks.size());
    const int64_t n_chunks = static_cast<int64_t>(chunks.size());

    // Pass 1.
    std::vector<double> slots(static_cast<size_t>(n_chunks) * P, 0.0);
    if (total_sums > 0) {
      for_each(n_chunks, total_sums, [&](int64_t c) {
        const Chunk& ch = chunks[c];
        const Tensor1& t = ts[ch.t];
        if (!t.sums) return;
        double* slot = slots.data() + c * P;
        dispatch_k(k, [&](auto kk) {
          constexpr int K = decltype(kk)::value;
          cpu::with_step_types(t.x.scalar_type(), t.g.scalar_type(), t.m.scalar_type(), [&](auto, auto tg, auto tm) {
            using TG = decltype(tg);
            using TM = decltype(tm);
            AMM_PICK_ISA(isa, sums, K, TM, TG)(t.m.const_data_ptr<TM>(), t.g.const_data_ptr<TG>(), t.n, ch.begin,
                                                ch.end, has_scale, scale, slot);
          });
        });
      });
    }

    // The law per scope of the batch: slots summed per tensor (chunk order), tensors per scope (list order).
    for (size_t r = batch.r0; r < batch.r1; ++r) {
      const int64_t s = runs[r][0];
      const bool first = step_p[s] == 0.f;
      std::fill(scope_sums.begin(), scope_sums.end(), 0.0);
      if (!first && given) {
        for (int p = 0; p < P; ++p) scope_sums[p] = given_p[s * P + p];
      } else if (!first) {
        for (int64_t i = runs[r][1]; i < runs[r][2]; ++i) {
          std::fill(tensor_sums.begin(), tensor_sums.end(), 0.0);
          for (int64_t c = first_chunk[i - batch.t0]; c < first_chunk[i - batch.t0 + 1]; ++c)
            for (int p = 0; p < P; ++p) tensor_sums[p] += slots[c * P + p];
          for (int p = 0; p < P; ++p) scope_sums[p] += tensor_sums[p];
        }
      }
      if (sums_out != nullptr) {
        double* out = sums_out->mutable_data_ptr<double>() + s * P;
        for (int p = 0; p < P; ++p) out[p] = scope_sums[p];
        continue;
      }
      rllc_law_update(static_cast<int>(k), scope_sums.data(), law_p + s * k, first, law_lr, rcond,
                      law_new.data() + r * k);
    }
    if (sums_out != nullptr) continue;

    // Pass 2, in reverse: what pass 1 read last is still in the caches (as the AM steps' for_each_chunk).
    for_each(n_chunks, total, [&](int64_t c) {
      const Chunk& ch = chunks[c];
      const Tensor1& t = ts[ch.t];
      const float* lw = law_new.data() + t.scope_pos * k;
      dispatch_k(k, [&](auto kk) {
        constexpr int K = decltype(kk)::value;
        UpdateConsts<K> consts;
        for (int p = 0; p < K * K; ++p) consts.U[p] = static_cast<float>(U[p]);
        for (int a = 0; a < K; ++a) {
          consts.b[a] = static_cast<float>(b[a]);
          consts.law[a] = lw[a];
        }
        consts.lr = t.lr;
        cpu::with_step_types(t.x.scalar_type(), t.g.scalar_type(), t.m.scalar_type(), [&](auto tx, auto tg, auto tm) {
          using TX = decltype(tx);
          using TG = decltype(tg);
          using TM = decltype(tm);
          AMM_PICK_ISA(isa, update, K, TX, TM, TG)(t.x.mutable_data_ptr<TX>(), t.m.mutable_data_ptr<TM>(),
                                                   t.g.const_data_ptr<TG>(), t.n, ch.begin, ch.end, has_scale, scale,
                                                   consts);
        });
      });
    }, /*reverse=*/true);
  }
  if (sums_out != nullptr) return;
  for (auto& [orig, work] : write_back) orig.copy_(work);

  // Scope state.
  for (size_t r = 0; r < runs.size(); ++r) {
    const int64_t s = runs[r][0];
    step_p[s] += 1.f;
    for (int64_t a = 0; a < k; ++a) law_p[s * k + a] = law_new[r * k + a];
  }
}

void rllc_step_cpu(AMM_RLLC_PARAMS, const std::optional<at::Tensor>& scope_sums) {
  rllc_run(AMM_RLLC_ARGS, scope_sums, nullptr);
}

at::Tensor rllc_scope_sums_cpu(AMM_RLLC_PARAMS) {
  const int64_t k = static_cast<int64_t>(b.size());
  at::Tensor out = at::zeros({step.numel(), rllc_n_sums(static_cast<int>(k))}, at::TensorOptions().dtype(at::kDouble));
  rllc_run(AMM_RLLC_ARGS, std::nullopt, &out);
  return out;
}

}  // namespace
}  // namespace rllc_cpu
}  // namespace amm

TORCH_LIBRARY_IMPL(amm_kernels, CPU, m) {
  m.impl("rllc_step", &amm::rllc_cpu::rllc_step_cpu);
  m.impl("rllc_scope_sums", &amm::rllc_cpu::rllc_scope_sums_cpu);
}

// The CPU implementation of the two ops of csrc/OPS.md: validates the lists, builds the per-tensor
// work (contiguous working copies where needed), then per batch of scopes (NOTE [scope batches])
// runs pass 1, turns the per-tensor sums into one beta per scope (weighted and combined in double,
// in tensor order) and runs pass 2; last, writes the scope state. With found_inf > 0 nothing at all
// is written (as the reference's commit()).
#include "cpu_kernels.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <array>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <optional>

#include "amm_math.h"
#include "gradient_dtype.h"
#include "writable.h"
#include "op_signatures.h"

namespace amm {
namespace cpu {

// Steps smaller than this run on the calling thread (the thread pool's start-up costs more).
constexpr int64_t kSerialElements = 1 << 17;

void parallel_chunks(int64_t n, int64_t total_elements, int64_t serial_below, const std::function<void(int64_t)>& fn,
                     bool reverse) {
  if (n == 0) return;
  auto range = [&](int64_t begin, int64_t end) {
    if (reverse) {
      for (int64_t c = end - 1; c >= begin; --c) fn(c);
    } else {
      for (int64_t c = begin; c < end; ++c) fn(c);
    }
  };
  if (total_elements < serial_below || n == 1 || at::get_num_threads() == 1) {
    range(0, n);
    return;
  }
  at::parallel_for(0, n, 1, range);
}

void for_each_chunk(const ChunkPlan& plan, const std::function<void(int64_t)>& fn, bool reverse) {
  parallel_chunks(static_cast<int64_t>(plan.tensor.size()), plan.total_elements, kSerialElements, fn, reverse);
}

void combine_chunk_sums(const ChunkPlan& plan, const std::vector<float>& partial, int K, std::vector<float>& sums) {
  const size_t T = plan.first_slot.size() - 1;
  sums.assign(T * K, 0.f);
  for (size_t t = 0; t < T; ++t) {
    for (int k = 0; k < K; ++k) {
      double s = 0.0;
      for (int64_t c = plan.first_slot[t]; c < plan.first_slot[t + 1]; ++c) s += partial[c * K + k];
      sums[t * K + k] = static_cast<float>(s);
    }
  }
}

int64_t parallel_thread_count() {
  // NOTE [OpenMP] in setup.py: compiled without -fopenmp, at::parallel_for here would run on one thread.
  std::vector<char> used(static_cast<size_t>(at::get_num_threads()) + 1, 0);
  at::parallel_for(0, 1 << 20, 1, [&](int64_t, int64_t) {
    const int id = at::get_thread_num();
    if (id >= 0 && id < static_cast<int>(used.size())) used[id] = 1;
  });
  int64_t n = 0;
  for (char u : used) n += u;
  return n;
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    default: return "base";
  }
}

Isa cpu_isa() {
  static const Isa isa = [] {
    Isa best = Isa::kBase;
#if AMM_CPU_MULTI_ISA
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c") &&
        __builtin_cpu_supports("bmi") && __builtin_cpu_supports("bmi2"))
      best = Isa::kAvx2;
    if (best == Isa::kAvx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq"))
      best = Isa::kAvx512;
#endif
    const char* env = std::getenv("AMM_CPU_ISA");
    if (env == nullptr || *env == '\0') return best;
    Isa want = best;
    if (std::strcmp(env, "base") == 0) want = Isa::kBase;
    else if (std::strcmp(env, "avx2") == 0) want = Isa::kAvx2;
    else if (std::strcmp(env, "avx512") == 0) want = Isa::kAvx512;
    else  // (a typo must not time the best ISA under another name; thrown, the initializer runs again next call)
      TORCH_CHECK(false, "amm_kernels (cpu): AMM_CPU_ISA must be base, avx2 or avx512 (or unset: the best the CPU "
                  "has), got '", env, "'");
    return static_cast<int>(want) < static_cast<int>(best) ? want : best;
  }();
  return isa;
}

const char* cpu_isa_name() { return isa_name(cpu_isa()); }

// NOTE [scope batches]: each scope's beta needs only its own tensors' sums. With many scopes (the
// tensor scope, AMAdamW's default) the step runs scope batch by scope batch: pass 1 over a batch's
// tensors, their betas, pass 2 over the same tensors. A batch is consecutive whole scopes of at most
// kBatchBytes of tensors (parameter, gradient and state; a scope larger than that is a batch alone),
// so what pass 1 read is still in the caches when pass 2 (in reverse, for_each_chunk) reads it again,
// and a step of small scopes moves about one pass of memory instead of two. Results are
// bit-identical to one batch: the chunks, their slots and every order of summation stay per tensor
// and per scope. One batch when there is no pass 1 here (adaptive=False, the sums given) and for the
// sums op (NOTE [sharded sums]). RLLC's step (rllc_cpu.cpp) runs in the same batches.
// The environment variable AMM_CPU_BATCH_BYTES overrides the size (0: one batch). The default is
// half the 32 MB L3 of the machine it was measured on; 8, 12 and 16 MB were level there, 2 and 4 MB
// gained less (bench/README.md, "CPU step"). The OS's figure for the L3 is not used: in a VM it can
// be the whole socket's (320 MB reported here).
constexpr int64_t kBatchBytes = int64_t{16} << 20;

int64_t batch_bytes() {
  const char* env = std::getenv("AMM_CPU_BATCH_BYTES");
  if (env == nullptr || *env == '\0') return kBatchBytes;
  char* end = nullptr;
  const long long v = std::strtoll(env, &end, 10);
  TORCH_CHECK(end != env && *end == '\0' && v >= 0, "amm_kernels (cpu)",
              ": AMM_CPU_BATCH_BYTES must be a number of bytes >= 0 (0: one batch), got '", env, "'");
  return static_cast<int64_t>(v);
}

std::vector<ScopeBatch> scope_batches(const ScopeRuns& runs, const std::function<int64_t(size_t)>& run_bytes,
                                      bool split) {
  std::vector<ScopeBatch> batches;
  if (runs.empty()) return batches;
  (void)cpu_isa();  // the knobs are read here, before anything is written: a bad AMM_CPU_ISA fails the step whole
  const int64_t budget = split ? batch_bytes() : 0;
  if (budget == 0) return {{0, runs.size(), runs.front()[1], runs.back()[2]}};
  int64_t bytes = 0;
  for (size_t r = 0; r < runs.size(); ++r) {
    const int64_t b = run_bytes(r);
    if (batches.empty() || bytes + b > budget) {
      batches.push_back({r, r + 1, runs[r][1], runs[r][2]});
      bytes = b;
    } else {
      batches.back().r1 = r + 1;
      batches.back().t1 = runs[r][2];
      bytes += b;
    }
  }
  return batches;
}

namespace {

const char* kOwner = "amm_kernels (cpu)";

bool is_supported_float(at::ScalarType t) { return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf; }

void check_scope_tensor(const at::Tensor& t, const char* name, int64_t min_numel) {
  TORCH_CHECK(t.device().is_cpu(), kOwner, ": ", name, " must be a CPU tensor");
  TORCH_CHECK(t.scalar_type() == at::kFloat, kOwner, ": ", name, " must be float32, got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), kOwner, ": ", name, " must be contiguous");
  TORCH_CHECK(t.numel() >= min_numel, kOwner, ": ", name, " has ", t.numel(), " elements, needs ", min_numel);
}

// A float read of a 0-d / 1-element tensor (CPU here; no device sync involved).
float scalar_of(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.numel() == 1, kOwner, ": ", name, " must have one element, got ", t.numel());
  return t.to(at::kCPU).to(at::kFloat).item<float>();
}

struct Prepared {
  std::vector<StepTensor> ts;
  // Originals to copy back to when a working tensor is a contiguous copy.
  std::vector<std::pair<at::Tensor, at::Tensor>> write_back;  // (original, working)
  std::vector<int64_t> group_of, scope_of;
  // Present scopes as runs of consecutive tensors: (scope index, first tensor, end tensor).
  ScopeRuns runs;
  std::vector<int64_t> present_groups;
  CommonArgs common;
  bool skip = false;
};

at::Tensor working(const at::Tensor& t, bool mutated, Prepared& p) {
  if (t.is_contiguous()) return t;
  at::Tensor w = t.contiguous();
  if (mutated) p.write_back.emplace_back(t, w);
  return w;
}

Prepared prepare(at::TensorList params, at::TensorList grads, at::TensorList d, const at::TensorList* v,
                 at::IntArrayRef group_of, at::IntArrayRef scope_of, const at::Tensor& lr,
                 at::ArrayRef<double> weight_decay, const at::Tensor& step, int64_t n_scope_min_from_state,
                 const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
                 bool maximize) {
  Prepared p;
  const size_t T = params.size();
  TORCH_CHECK(grads.size() == T && d.size() == T && (v == nullptr || v->size() == T), kOwner,
              ": params, grads and state lists must have the same length");
  TORCH_CHECK(group_of.size() == T && scope_of.size() == T, kOwner,
              ": group_of and scope_of must have one entry per parameter");
  TORCH_CHECK(lr.device().is_cpu() && lr.dim() == 1, kOwner, ": lr must be a 1-D CPU tensor [G]");
  const int64_t G = lr.numel();
  TORCH_CHECK(static_cast<int64_t>(weight_decay.size()) >= G, kOwner, ": weight_decay needs one entry per group");
  const at::Tensor lr_f = lr.to(at::kFloat).contiguous();
  const float* lr_ptr = lr_f.const_data_ptr<float>();
  (void)n_scope_min_from_state;
  const int64_t S = step.numel();

  if (found_inf.has_value() && found_inf->defined()) {
    // NaN is not > 0: not skipped, as the reference's `found_inf > 0`.
    p.skip = scalar_of(*found_inf, "found_inf") > 0.f;
    if (p.skip) return p;
  }
  if (grad_scale.has_value() && grad_scale->defined()) p.common.inv_grad_scale = 1.f / scalar_of(*grad_scale, "grad_scale");
  // maximize is folded into the sign of the scale: grad * (-s) == -(grad * s) exactly, and the
  // kernels' loops then have no branch (they call amm::effective_grad with maximize = false).
  if (maximize) p.common.inv_grad_scale = -p.common.inv_grad_scale;
  p.common.maximize = false;

  p.group_of.assign(group_of.begin(), group_of.end());
  p.scope_of.assign(scope_of.begin(), scope_of.end());
  std::vector<char> group_seen(G, 0), scope_seen(S, 0);
  p.ts.resize(T);
  for (size_t i = 0; i < T; ++i) {
    const int64_t gi = group_of[i], si = scope_of[i];
    TORCH_CHECK(gi >= 0 && gi < G, kOwner, ": group_of[", i, "] = ", gi, " is out of range [0, ", G, ")");
    TORCH_CHECK(si >= 0 && si < S, kOwner, ": scope_of[", i, "] = ", si, " is out of range [0, ", S, ")");
    const at::Tensor& x = params[i];
    TORCH_CHECK(x.device().is_cpu() && grads[i].device().is_cpu() && d[i].device().is_cpu() &&
                    (v == nullptr || (*v)[i].device().is_cpu()),
                kOwner, ": tensor ", i, " is not on the CPU");
    TORCH_CHECK(is_supported_float(x.scalar_type()), kOwner, ": parameter ", i, " has unsupported dtype ",
                x.scalar_type(), " (float32, bfloat16, float16 are supported)");
    const int64_t n = x.numel();
    // shapes, not element counts only: as the reference and the CUDA glue (NOTE [state fits], _step.py)
    TORCH_CHECK(grads[i].sizes() == x.sizes() && d[i].sizes() == x.sizes() &&
                    (v == nullptr || (*v)[i].sizes() == x.sizes()),
                kOwner, ": tensor ", i, ": its gradient has shape ", grads[i].sizes(), " and its state ",
                d[i].sizes(), "; both must have the parameter's shape ", x.sizes());
    TORCH_CHECK(v == nullptr || (*v)[i].scalar_type() == d[i].scalar_type(), kOwner,
                ": tensor ", i, ": exp_avg and exp_avg_sq must have one dtype");
    // Checked here, before anything is written: the passes run scope batch by scope batch (NOTE
    // [scope batches]), and a batch must not fail after an earlier one has updated its tensors.
    TORCH_CHECK(d[i].scalar_type() == x.scalar_type() || d[i].scalar_type() == at::kFloat, kOwner, ": tensor ", i,
                ": state dtype ", d[i].scalar_type(), " for a ", x.scalar_type(),
                " parameter (the parameter's dtype or float32)");
    amm::check_writable(x, kOwner, i, "parameter");
    amm::check_writable(d[i], kOwner, i, "state");
    if (v != nullptr) amm::check_writable((*v)[i], kOwner, i, "state");
    StepTensor& t = p.ts[i];
    t.numel = n;
    t.x = working(x, true, p);
    const at::Tensor g = amm::readable_gradient(grads[i], x.scalar_type(), kOwner, i);
    // grads and state are indexed like the parameter: flat in the parameter's (contiguous) order.
    t.g = g.is_contiguous() && g.sizes() == x.sizes() ? g : g.reshape(x.sizes()).contiguous();
    t.d = working(d[i], true, p);
    if (v != nullptr) t.v = working((*v)[i], true, p);
    t.lr = lr_ptr[gi];
    t.wd = static_cast<float>(weight_decay[gi]);
    group_seen[gi] = 1;
    // Scopes: runs of consecutive tensors; a scope may not appear in two runs.
    if (p.runs.empty() || p.runs.back()[0] != si) {
      TORCH_CHECK(!scope_seen[si], kOwner, ": the tensors of scope ", si, " are not contiguous in the lists");
      scope_seen[si] = 1;
      p.runs.push_back({si, static_cast<int64_t>(i), static_cast<int64_t>(i) + 1});
    } else {
      p.runs.back()[2] = static_cast<int64_t>(i) + 1;
    }
  }
  for (int64_t gi = 0; gi < G; ++gi)
    if (group_seen[gi]) p.present_groups.push_back(gi);
  return p;
}

void finish(Prepared& p) {
  for (auto& [orig, work] : p.write_back) orig.copy_(work);
}

using Batch = ScopeBatch;

// The AM steps' batches, counting x, g, d (and v) of each tensor.
std::vector<Batch> am_batches(const Prepared& p, bool split) {
  return scope_batches(p.runs, [&](size_t r) {
    int64_t bytes = 0;
    for (int64_t i = p.runs[r][1]; i < p.runs[r][2]; ++i) {
      const StepTensor& t = p.ts[i];
      bytes += t.numel * (t.x.element_size() + t.g.element_size() + t.d.element_size() +
                          (t.v.defined() ? t.v.element_size() : 0));
    }
    return bytes;
  }, split);
}

Tensors tensors_of(const Prepared& p, const Batch& b) { return Tensors(p.ts.data() + b.t0, b.t1 - b.t0); }

// The finalize (SPEC.md section 3), in two halves so that the sums can be all-reduced between them
// (NOTE [sharded sums] below). First, per scope of the batch (per run r, at index r - b.r0), the
// weighted sums of its tensors, added in tensor order in double (a fixed order: bit-identical runs);
// `weighted(i, &num, &den)` weights tensor i's sums (i indexes the whole step's tensors). Zeros for a
// scope on its first step and when adaptive=False.
using RunSums = std::vector<std::array<double, 2>>;

template <class Weighted>
RunSums run_sums(const Prepared& p, const Batch& b, const float* step_p, bool adaptive, Weighted weighted) {
  RunSums sums(b.r1 - b.r0, {0.0, 0.0});
  for (size_t r = b.r0; r < b.r1; ++r) {
    const auto& run = p.runs[r];
    if (!adaptive || step_p[run[0]] == 0.f) continue;
    for (int64_t i = run[1]; i < run[2]; ++i) {
      double n_t = 0.0, d_t = 0.0;
      weighted(i, &n_t, &d_t);
      sums[r - b.r0][0] += n_t;
      sums[r - b.r0][1] += d_t;
    }
  }
  return sums;
}

// NOTE [sharded sums]: with sharded parameters (FSDP2, process_group=) each rank holds a slice of
// every tensor, and beta needs the sums over the whole model. The *_scope_sums ops stop after the
// half above and return the sums as a float64 [S, 2] tensor (absolute scope index; zeros for scopes
// absent here, so every rank's tensor has the same shape); Python all-reduces it over the group and
// hands it back to the step op as `scope_sums`, which then skips pass 1 and uses these sums.
// (Both run as one batch: the sums of all scopes exist before any update.)
at::Tensor sums_to_tensor(const Prepared& p, const RunSums& sums, int64_t n_scopes) {
  TORCH_CHECK(sums.size() == p.runs.size(), kOwner, ": internal error: the sums op ran in batches");
  at::Tensor out = at::zeros({n_scopes, 2}, at::TensorOptions().dtype(at::kDouble));
  double* o = out.mutable_data_ptr<double>();
  for (size_t r = 0; r < p.runs.size(); ++r) {
    o[2 * p.runs[r][0]] = sums[r][0];
    o[2 * p.runs[r][0] + 1] = sums[r][1];
  }
  return out;
}

RunSums sums_from_tensor(const Prepared& p, const Batch& b, const at::Tensor& t, int64_t n_scopes) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kDouble && t.dim() == 2 && t.size(0) == n_scopes &&
                  t.size(1) == 2,
              kOwner, ": scope_sums must be a float64 CPU tensor of shape [", n_scopes, ", 2], got ",
              t.scalar_type(), " ", t.sizes());
  const at::Tensor c = t.contiguous();
  const double* in = c.const_data_ptr<double>();
  RunSums sums(b.r1 - b.r0);
  for (size_t r = b.r0; r < b.r1; ++r) sums[r - b.r0] = {in[2 * p.runs[r][0]], in[2 * p.runs[r][0] + 1]};
  return sums;
}

// The per-scope sums of a batch: the all-reduced ones it was given (sums_in), or pass 1's.
// `pass1(ts, sums)` runs pass 1 over the batch's tensors into `sums` (indexed within the batch) and
// returns weighted(j, i, &num, &den), which weights the sums of the step's tensor i, the batch's
// tensor j (it is not called when the sums are given, nor when adaptive=False).
template <class Pass1>
RunSums scope_sums_of(const Prepared& p, const Batch& b, const std::optional<at::Tensor>& sums_in,
                      const float* step_p, int64_t n_scopes, bool adaptive, Pass1 pass1) {
  if (sums_in.has_value() && sums_in->defined()) return sums_from_tensor(p, b, *sums_in, n_scopes);
  if (!adaptive) return RunSums(b.r1 - b.r0, {0.0, 0.0});
  std::vector<float> sums;
  auto weighted = pass1(tensors_of(p, b), sums);
  return run_sums(p, b, step_p, adaptive, [&](int64_t i, double* n, double* d) { weighted(i - b.t0, i, n, d); });
}

// Then each scope's beta from its sums plus `extra_num`, a scope-level numerator term (loss mode's
// (lam + 1) (prev_loss - loss), 0 otherwise), handed to every tensor of the scope. Into betas[r].
void assign_scope_betas(Prepared& p, const Batch& b, const float* step_p, const RunSums& sums, bool adaptive,
                        double beta_min, double beta_max, double extra_num, std::vector<float>& betas) {
  for (size_t r = b.r0; r < b.r1; ++r) {
    const auto& run = p.runs[r];
    const bool first = step_p[run[0]] == 0.f;
    const double num = (adaptive && !first) ? sums[r - b.r0][0] + extra_num : 0.0;
    betas[r] = amm::scope_beta(num, sums[r - b.r0][1], static_cast<float>(beta_min), static_cast<float>(beta_max),
                               first, adaptive);
    for (int64_t i = run[1]; i < run[2]; ++i) p.ts[i].beta = betas[r];
  }
}

// After the update: count the step of each present scope, record its beta (and beta_prod when given),
// and the lr each present group moved with.
void commit_scope_state(const Prepared& p, const std::vector<float>& betas, float* step_p, float* beta_p,
                        float* beta_prod_p, const at::Tensor& lr, float* prev_lr_p) {
  for (size_t r = 0; r < p.runs.size(); ++r) {
    const int64_t s = p.runs[r][0];
    step_p[s] += 1.f;
    beta_p[s] = betas[r];
    if (beta_prod_p != nullptr) beta_prod_p[s] *= betas[r];
  }
  const at::Tensor lr_f = lr.to(at::kFloat).contiguous();
  const float* lr_new = lr_f.const_data_ptr<float>();
  for (int64_t g : p.present_groups) prev_lr_p[g] = lr_new[g];
}

// One AMSGD step; with sums_out, only its half before the all-reduce (NOTE [sharded sums]): the
// scope sums go to *sums_out and nothing is written. With sums_in, pass 1 is skipped.
void amsgd_run(AMM_AMSGD_PARAMS, const std::optional<at::Tensor>& sums_in, at::Tensor* sums_out) {
  check_scope_tensor(step, "step", 1);
  check_scope_tensor(beta, "beta", step.numel());
  check_scope_tensor(prev_lr, "prev_lr", lr.numel());
  check_scope_tensor(prev_loss, "prev_loss", 1);
  Prepared p = prepare(params, grads, momentum, nullptr, group_of, scope_of, lr, weight_decay, step, 0, grad_scale,
                       found_inf, maximize);
  if (p.skip) return;
  const bool given = sums_in.has_value() && sums_in->defined();
  p.common.lam = static_cast<float>(lam);
  const bool loss_mode = loss.has_value() && loss->defined();
  float* step_p = step.mutable_data_ptr<float>();
  float* beta_p = beta.mutable_data_ptr<float>();
  float* prev_lr_p = prev_lr.mutable_data_ptr<float>();
  float* prev_loss_p = prev_loss.mutable_data_ptr<float>();

  for (const auto& run : p.runs) {
    const bool first = step_p[run[0]] == 0.f;
    for (int64_t i = run[1]; i < run[2]; ++i) {
      p.ts[i].first = first;
      p.ts[i].need_sums = adaptive && !first && !given;
    }
  }
  const float loss_value = loss_mode && sums_out == nullptr ? scalar_of(*loss, "loss") : 0.f;
  // (lam + 1) * (prev_loss - loss) in float32, as the reference forms it.
  const double extra = loss_mode ? static_cast<double>(static_cast<float>(lam + 1.0) * (*prev_loss_p - loss_value)) : 0.0;
  std::vector<float> scope_betas(p.runs.size());
  for (const Batch& b : am_batches(p, adaptive && !given && sums_out == nullptr)) {
    const RunSums sums = scope_sums_of(p, b, sums_in, step_p, step.numel(), adaptive, [&](Tensors ts, std::vector<float>& s) {
      amsgd_sums(ts, p.common, s);
      return [&](int64_t j, int64_t i, double* n, double* d) {
        amm::amsgd_weighted(s.data() + j * amm::kAmsgdSums, p.ts[i].lr, prev_lr_p[p.group_of[i]], lam, !loss_mode, n, d);
      };
    });
    if (sums_out != nullptr) {
      *sums_out = sums_to_tensor(p, sums, step.numel());
      return;
    }
    assign_scope_betas(p, b, step_p, sums, adaptive, beta_min, beta_max, extra, scope_betas);
    amsgd_update(tensors_of(p, b), p.common);
  }
  finish(p);

  commit_scope_state(p, scope_betas, step_p, beta_p, nullptr, lr, prev_lr_p);
  if (loss_mode) *prev_loss_p = loss_value;
}

// One AMAdamW step, or its half before the all-reduce (as amsgd_run).
void amadamw_run(AMM_AMADAMW_PARAMS, const std::optional<at::Tensor>& sums_in, at::Tensor* sums_out) {
  check_scope_tensor(step, "step", 1);
  check_scope_tensor(beta, "beta", step.numel());
  check_scope_tensor(beta_prod, "beta_prod", step.numel());
  check_scope_tensor(prev_lr, "prev_lr", lr.numel());
  Prepared p = prepare(params, grads, exp_avg, &exp_avg_sq, group_of, scope_of, lr, weight_decay, step, 0, grad_scale,
                       found_inf, maximize);
  if (p.skip) return;
  const bool given = sums_in.has_value() && sums_in->defined();
  p.common.lam = static_cast<float>(lam);
  p.common.beta2 = static_cast<float>(beta2);
  p.common.one_minus_beta2 = static_cast<float>(1.0 - beta2);
  p.common.eps = static_cast<float>(eps);
  float* step_p = step.mutable_data_ptr<float>();
  float* beta_p = beta.mutable_data_ptr<float>();
  float* beta_prod_p = beta_prod.mutable_data_ptr<float>();
  float* prev_lr_p = prev_lr.mutable_data_ptr<float>();

  for (const auto& run : p.runs) {
    const int64_t s = run[0];
    const bool first = step_p[s] == 0.f;
    // NOTE [bias corrections in float64] (amadamw_reference.py): formed in double, then rounded.
    const float bias1 = static_cast<float>(1.0 - beta_max * static_cast<double>(beta_prod_p[s]));
    const float bias2 = static_cast<float>(1.0 - std::pow(beta2, static_cast<double>(step_p[s]) + 1.0));
    for (int64_t i = run[1]; i < run[2]; ++i) {
      p.ts[i].bias1 = bias1;
      p.ts[i].bias2 = bias2;
      p.ts[i].first = first;
      p.ts[i].need_sums = adaptive && !first && !given;
    }
  }
  std::vector<float> scope_betas(p.runs.size());
  for (const Batch& b : am_batches(p, adaptive && !given && sums_out == nullptr)) {
    const RunSums sums = scope_sums_of(p, b, sums_in, step_p, step.numel(), adaptive, [&](Tensors ts, std::vector<float>& s) {
      amadamw_sums(ts, p.common, s);
      return [&](int64_t j, int64_t i, double* n, double* d) {
        amm::amadamw_weighted(s.data() + j * amm::kAmadamwSums, p.ts[i].lr, prev_lr_p[p.group_of[i]],
                              weight_decay[p.group_of[i]], n, d);
      };
    });
    if (sums_out != nullptr) {
      *sums_out = sums_to_tensor(p, sums, step.numel());
      return;
    }
    assign_scope_betas(p, b, step_p, sums, adaptive, beta_min, beta_max, 0.0, scope_betas);
    amadamw_update(tensors_of(p, b), p.common);
  }
  finish(p);

  commit_scope_state(p, scope_betas, step_p, beta_p, beta_prod_p, lr, prev_lr_p);
}

void amsgd_step_cpu(AMM_AMSGD_PARAMS, const std::optional<at::Tensor>& scope_sums) {
  amsgd_run(AMM_AMSGD_ARGS, scope_sums, nullptr);
}

at::Tensor amsgd_scope_sums_cpu(AMM_AMSGD_PARAMS) {
  at::Tensor out = at::zeros({step.numel(), 2}, at::TensorOptions().dtype(at::kDouble));
  amsgd_run(AMM_AMSGD_ARGS, std::nullopt, &out);
  return out;
}

void amadamw_step_cpu(AMM_AMADAMW_PARAMS, const std::optional<at::Tensor>& scope_sums) {
  amadamw_run(AMM_AMADAMW_ARGS, scope_sums, nullptr);
}

at::Tensor amadamw_scope_sums_cpu(AMM_AMADAMW_PARAMS) {
  at::Tensor out = at::zeros({step.numel(), 2}, at::TensorOptions().dtype(at::kDouble));
  amadamw_run(AMM_AMADAMW_ARGS, std::nullopt, &out);
  return out;
}

}  // namespace
}  // namespace cpu
}  // namespace amm

TORCH_LIBRARY_IMPL(amm_kernels, CPU, m) {
  m.impl("amsgd_step", &amm::cpu::amsgd_step_cpu);
  m.impl("amadamw_step", &amm::cpu::amadamw_step_cpu);
  m.impl("amsgd_scope_sums", &amm::cpu::amsgd_scope_sums_cpu);
  m.impl("amadamw_scope_sums", &amm::cpu::amadamw_scope_sums_cpu);
}

// TORCH_LIBRARY_IMPL(amm_kernels, CUDA): amsgd_step / amadamw_step of csrc/OPS.md on CUDA tensors.
// Builds the TensorTables (tensor_plan.h), one workspace tensor, and calls the launchers of
// launchers.h on the current stream. No host sync, nothing copied host-to-device: the step is
// CUDA-graph capturable (NOTE [tensor table in kernel arguments] in launchers.h).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <optional>
#include <tuple>
#include <vector>

#include "amm_math.h"
#include "op_signatures.h"
#include "cuda/launchers.h"
#include "cuda/settings.h"
#include "cuda/tensor_plan.h"
#include "cuda/working_copies.h"
#include "writable.h"

namespace amm_cuda {
namespace {

DType dtype_code(const at::Tensor& t, const char* what) {
  switch (t.scalar_type()) {
    case at::kFloat: return kFloat32;
    case at::kBFloat16: return kBFloat16;
    case at::kHalf: return kFloat16;
    default:
      TORCH_CHECK(false, "amm_kernels (CUDA): ", what, " must be float32, bfloat16 or float16, got ", t.scalar_type());
  }
  return kFloat32;  // unreachable
}

// State tensors: float32, on the step's device, contiguous (they are written in place).
const at::Tensor& check_state(const at::Tensor& t, const at::Device& device, const char* what) {
  TORCH_CHECK(t.device() == device, "amm_kernels (CUDA): ", what, " must be on ", device, ", got ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat, "amm_kernels (CUDA): ", what, " must be float32");
  TORCH_CHECK(t.is_contiguous(), "amm_kernels (CUDA): ", what, " must be contiguous");
  return t;
}

// An optional scalar input (loss, grad_scale, found_inf) as a float32 device tensor with one element.
// A conversion, if needed, is an ordinary stream-ordered op: no host sync.
std::optional<at::Tensor> scalar_input(const std::optional<at::Tensor>& t, const at::Device& device, const char* what) {
  if (!t.has_value() || !t->defined()) return std::nullopt;
  TORCH_CHECK(t->numel() == 1, "amm_kernels (CUDA): ", what, " must have one element");
  return t->to(device, at::kFloat).contiguous();
}

const float* ptr_or_null(const std::optional<at::Tensor>& t) { return t.has_value() ? t->data_ptr<float>() : nullptr; }

// Elementwise partners of a parameter: same device, shape and memory layout (dense), so that
// element i of every list is the same element. Grads with another layout are copied into the
// parameter's layout (a stream-ordered copy); state is written in place, so it must match.
void check_partner(const at::Tensor& p, const at::Tensor& t, const char* what, size_t i) {
  TORCH_CHECK(t.device() == p.device(), "amm_kernels (CUDA): ", what, "[", i, "] is on ", t.device(),
              ", its parameter on ", p.device());
  TORCH_CHECK(t.sizes() == p.sizes(), "amm_kernels (CUDA): ", what, "[", i, "] has shape ", t.sizes(),
              ", its parameter ", p.sizes());
  TORCH_CHECK(t.strides() == p.strides(), "amm_kernels (CUDA): ", what, "[", i,
              "] must have its parameter's memory layout");
}

// The scope_sums input of a step op (NOTE [sharded sums]): float64 [S, 2] on the step's device.
const double* sums_input(const std::optional<at::Tensor>& t, const at::Device& device, int64_t n_scopes) {
  if (!t.has_value() || !t->defined()) return nullptr;
  TORCH_CHECK(t->device() == device && t->scalar_type() == at::kDouble && t->dim() == 2 && t->size(0) == n_scopes &&
                  t->size(1) == 2 && t->is_contiguous(),
              "amm_kernels (CUDA): scope_sums must be a contiguous float64 tensor of shape [", n_scopes, ", 2] on ",
              device, ", got ", t->scalar_type(), " ", t->sizes(), " on ", t->device());
  return t->data_ptr<double>();
}

struct Batch {
  std::vector<TensorDesc> descs;
  WorkingCopies copies;  // what the kernels walk instead of the caller's tensors (NOTE [working copies])
  int64_t n_groups = 0;
  int64_t n_scopes = 0;
};

Batch describe(at::TensorList params, at::TensorList grads, at::TensorList d, const at::TensorList* v,
               at::IntArrayRef group_of, at::IntArrayRef scope_of, at::ArrayRef<double> weight_decay,
               const at::Device& device, int64_t n_groups, int64_t n_scopes) {
  const size_t n = params.size();
  TORCH_CHECK(grads.size() == n && d.size() == n && (v == nullptr || v->size() == n) && group_of.size() == n &&
                  scope_of.size() == n,
              "amm_kernels (CUDA): the tensor lists, group_of and scope_of must have the same length");
  Batch b;
  b.n_groups = n_groups;
  b.n_scopes = n_scopes;
  b.descs.resize(n);
  for (size_t i = 0; i < n; ++i) {
    TORCH_CHECK(params[i].device() == device, "amm_kernels (CUDA): params[", i, "] is on ", params[i].device(),
                ", expected ", device);
    amm::check_writable(params[i], "amm_kernels (CUDA)", i, "parameter");
    amm::check_writable(d[i], "amm_kernels (CUDA)", i, "state");
    if (v != nullptr) amm::check_writable((*v)[i], "amm_kernels (CUDA)", i, "state");
    const at::Tensor p = b.copies.walkable(params[i], /*contiguous_only=*/false);
    const at::Tensor di = b.copies.in_layout_of(d[i], p);
    const at::Tensor vi = v != nullptr ? b.copies.in_layout_of((*v)[i], p) : at::Tensor();
    TORCH_CHECK(!grads[i].is_sparse(), "amm_kernels (CUDA): sparse gradients are not supported");
    at::Tensor g = grads[i];
    TORCH_CHECK(g.scalar_type() == p.scalar_type() || !c10::isComplexType(g.scalar_type()),
                "amm_kernels (CUDA): tensor ", i, ": gradients must be real, got ", g.scalar_type());
    if (g.scalar_type() != p.scalar_type() && g.scalar_type() != at::kFloat && g.device() == p.device()) {
      g = b.copies.read_only(g.to(at::kFloat));  // a float64 gradient is read as float32, as on the cpu
    }
    if (g.device() == p.device()) g = b.copies.in_layout_of(g, p, /*write_back=*/false);
    check_partner(p, g, "grads", i);
    check_partner(p, di, "momentum", i);
    TORCH_CHECK(di.scalar_type() == (v ? vi.scalar_type() : di.scalar_type()),
                "amm_kernels (CUDA): exp_avg[", i, "] and exp_avg_sq[", i, "] must have the same dtype");
    const int64_t group = group_of[i], scope = scope_of[i];
    TORCH_CHECK(group >= 0 && group < n_groups && group < static_cast<int64_t>(weight_decay.size()),
                "amm_kernels (CUDA): group_of[", i, "] = ", group, " is out of range");
    TORCH_CHECK(scope >= 0 && scope < n_scopes, "amm_kernels (CUDA): scope_of[", i, "] = ", scope, " is out of range");

    TensorDesc& desc = b.descs[i];
    desc.numel = p.numel();
    desc.group = static_cast<int32_t>(group);
    desc.scope = static_cast<int32_t>(scope);
    desc.weight_decay = weight_decay[group];
    desc.ptr[kX] = p.data_ptr();
    desc.dtype[kX] = dtype_code(p, "params");
    desc.ptr[kG] = g.data_ptr();
    desc.dtype[kG] = dtype_code(g, "grads");
    desc.ptr[kD] = di.data_ptr();
    desc.dtype[kD] = dtype_code(di, "state");
    if (v != nullptr) {
      check_partner(p, vi, "exp_avg_sq", i);
      desc.ptr[kV] = vi.data_ptr();
      desc.dtype[kV] = dtype_code(vi, "state");
    }
  }
  return b;
}

// NOTE [step variant]: an adaptive, unsplit step over at most one table of tensors (kMaxTensors, or
// AMM_CUDA_TABLE_TENSORS) can run as the persistent step (persistent_kernels.cu: one cooperative launch,
// tiles kept on chip) instead of the two-pass step (three launches). Both give bit-identical results.
// The environment variable AMM_CUDA_STEP chooses, read at every step:
//   auto (default)  the persistent step for steps of at most AMM_CUDA_PERSISTENT_MAX_NUMEL elements
//                   (default kPersistentMaxNumel), where it can run (under stream capture: NOTE
//                   [cooperative launch under capture]); the two-pass step otherwise;
//   two_pass        always the two-pass step;
//   persistent      always the persistent step: an error where it cannot run (more tensors than one
//                   table holds, a split step of the *_scope_sums ops, adaptive=False, a device
//                   without cooperative launch), so a test or a benchmark cannot silently get the other.
// AMM_CUDA_PERSISTENT_CACHE sets the vector iterations per thread its tile cache keeps (default:
// as many as one block's shared memory holds).
// kPersistentMaxNumel is measured (bench/bench_cuda_variants.py, H200, 2026-11-29, CUDA-graph replay,
// bench/results/cuda_variants_nvidia_h200.csv): the persistent step was 4-6% faster up to 53,648
// elements, level at 287,720, and slower from 997,128 on (2% there, 24% for AMAdamW at 3.9M). Its tile
// cache gained nothing measurable (persistent-nocache ran as fast). The threshold sits between the last
// tie and the first loss.
constexpr int64_t kPersistentMaxNumel = int64_t{1} << 19;

enum class StepVariant { kAuto, kTwoPass, kPersistent };

StepVariant step_variant() {
  const char* v = std::getenv("AMM_CUDA_STEP");
  if (v == nullptr || *v == '\0' || std::strcmp(v, "auto") == 0) return StepVariant::kAuto;
  if (std::strcmp(v, "two_pass") == 0) return StepVariant::kTwoPass;
  if (std::strcmp(v, "persistent") == 0) return StepVariant::kPersistent;
  TORCH_CHECK(false, "amm_kernels (CUDA): AMM_CUDA_STEP must be auto, two_pass or persistent, got '", v, "'");
  return StepVariant::kAuto;  // unreachable
}

// NOTE [chunk size]: a block's chunk (kChunkSize = 65,536 elements by default) sets how finely the work
// is cut, and so the last wave's idle share of a launch (a launch rarely fills a whole number of
// waves) and the number of pass-1 slots the finalize sums. On an H200 at 1e8 parameters the two-pass
// AMAdamW update ran at 0.86 of copy bandwidth where Triton's, in blocks of 1,024 elements, ran at 0.98
// (bench/results/kernel_breakdown_nvidia_h200.csv). By a count (not a measurement): two blocks of 512
// threads share an SM, so a 65,536-element chunk of the update (28 bytes an element) is ~115 us of one
// block's time, and the two launches of a 219-tensor step (two tables then: NOTE [one launch per pass]
// in launchers.h has one since) leave about 1.2 waves partly idle, ~140 us of the 0.76 ms. (torch's
// fused AdamW, in chunks of 65,536 too, moved the same bytes in the same 0.76 ms; at 1e9 parameters,
// ten times the waves, the whole step ran at 0.96.) AMM_CUDA_CHUNK (a multiple of kChunkQuantum =
// 4,096, up to 65,536, read at every step) sets the chunk size so a GPU session can measure this
// (bench/gpu_session.sh, part "chunks") before the default moves. Results depend on it (the sums'
// grouping), within the tolerances.
int64_t chunk_size() {
  const int64_t size = env_int("AMM_CUDA_CHUNK", kChunkSize, kChunkQuantum, kChunkSize);
  TORCH_CHECK(size % kChunkQuantum == 0, "amm_kernels (CUDA): AMM_CUDA_CHUNK must be a multiple of ", kChunkQuantum,
              " in [", kChunkQuantum, ", ", kChunkSize, "], got ", size);
  return size;
}

// NOTE [cooperative launch under capture]: outside stream capture a refused cooperative launch costs
// nothing (NOTE [cooperative refusal] below: the two-pass step runs instead). Under capture
// (torch.cuda.graph, capturable=True) it would cost the graph: a launch that fails while a stream is
// captured invalidates the capture (cudaErrorStreamCaptureInvalidated, "operation failed due to a
// previous error during capture"), so the two-pass launches after it fail too. So under auto a step
// being captured runs as the persistent step only where a cooperative launch of at least its grid has
// already run on this device for this algorithm and tile cache (its shared memory sets the blocks an
// SM holds, and so the largest grid a device takes), with no refusal of a grid that size since: the
// eager steps before a capture (the warm-up torch.cuda.graph asks for) find that out. Otherwise the
// captured step is the two-pass one, with the same bits. A grid that ran is remembered up to the
// largest; a refused grid lowers that below itself.
class CooperativeRecord {
 public:
  static CooperativeRecord& instance() {
    static CooperativeRecord record;
    return record;
  }
  void note(int device, int algorithm, const PersistentPlan& plan, bool ran) {
    std::lock_guard<std::mutex> lock(mutex_);
    int& known = proven_[{device, algorithm, plan.smem_bytes}];
    known = ran ? std::max(known, plan.grid) : std::min(known, plan.grid - 1);
  }
  bool proven(int device, int algorithm, const PersistentPlan& plan) {
    std::lock_guard<std::mutex> lock(mutex_);
    const auto it = proven_.find({device, algorithm, plan.smem_bytes});
    return it != proven_.end() && plan.grid <= it->second;
  }

 private:
  std::mutex mutex_;
  std::map<std::tuple<int, int, int>, int> proven_;  // (device, algorithm, shared memory) -> the largest grid known to launch
};

bool is_capturing(cudaStream_t stream) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  // A failed query counts as a capture: the two-pass step is then the safe choice.
  if (cudaStreamIsCapturing(stream, &status) != cudaSuccess) {
    (void)cudaGetLastError();
    return true;
  }
  return status != cudaStreamCaptureStatusNone;
}

// The persistent step's plan for this step, or a plan with grid 0 where the two-pass step runs.
// run_pass1 and split are run_step's: whether pass 1 runs here, and whether this is a *_scope_sums op.
PersistentPlan choose_persistent(int algorithm, const Batch& batch, const LaunchPlan& chunks, int64_t table_size,
                                 const at::Device& device, cudaStream_t stream, bool run_pass1, bool split) {
  const StepVariant variant = step_variant();
  if (variant == StepVariant::kTwoPass) return PersistentPlan{};
  int64_t numel = 0;
  for (const TensorDesc& d : batch.descs) numel += d.numel;
  const bool forced = variant == StepVariant::kPersistent;
  if (!forced && numel > env_int("AMM_CUDA_PERSISTENT_MAX_NUMEL", kPersistentMaxNumel, 0, INT64_MAX)) {
    return PersistentPlan{};
  }
  const bool fits = run_pass1 && !split && chunks.tables.size() == 1;
  TORCH_CHECK(fits || !forced, "amm_kernels (CUDA): AMM_CUDA_STEP=persistent, but this step cannot run as one launch ",
              "(it needs adaptive=True, no process_group split, and at most ", table_size, " tensors; it has ",
              batch.descs.size(), ")");
  if (!fits) return PersistentPlan{};
  PersistentPlan plan;
  const cudaError_t err = plan_persistent(algorithm, device.index(), chunks.total_blocks,
                                          static_cast<int>(env_int("AMM_CUDA_PERSISTENT_CACHE", -1, -1, kMaxCacheIters)),
                                          &plan);
  if (err != cudaSuccess) {  // the device's attributes or the occupancy query failed: auto runs the two-pass step
    if (forced) C10_CUDA_CHECK(err);
    (void)cudaGetLastError();
    return PersistentPlan{};
  }
  TORCH_CHECK(plan.grid > 0 || !forced, "amm_kernels (CUDA): AMM_CUDA_STEP=persistent, but ", device,
              " cannot run the persistent step (no cooperative launch, or no room for its blocks)");
  // NOTE [cooperative launch under capture]
  if (!forced && plan.grid > 0 && is_capturing(stream) &&
      !CooperativeRecord::instance().proven(device.index(), algorithm, plan)) {
    return PersistentPlan{};
  }
  return plan;
}

// The whole step on the current stream: pass 1 (or the meta-only launch), finalize, pass 2. With
// fin.sums_out set, only pass 1 and the finalize (which then writes the scope sums and nothing else);
// with fin.sums_in set, the meta-only launch replaces pass 1 (NOTE [sharded sums] in launchers.h).
void run_step(int algorithm, const Batch& batch, const at::Device& device, PassArgs pass, FinalizeArgs fin,
              bool adaptive) {
  const bool run_pass1 = adaptive && fin.sums_in == nullptr;
  // The current stream (at::cuda::getCurrentCUDAStream is this function; c10 keeps the include light).
  const c10::cuda::CUDAStream stream = c10::cuda::getCurrentCUDAStream(device.index());
  const int n_sums = algorithm == kAlgoAmsgd ? static_cast<int>(amm::kAmsgdSums) : static_cast<int>(amm::kAmadamwSums);
  const int64_t chunk = chunk_size();
  const int64_t table_size = table_tensors();
  const LaunchPlan chunks = plan_or_throw(batch.descs, /*one_block_per_tensor=*/false, chunk, table_size);
  const LaunchPlan meta_only =
      run_pass1 ? LaunchPlan{} : plan_or_throw(batch.descs, /*one_block_per_tensor=*/true, chunk, table_size);
  const int64_t n_slots = run_pass1 ? chunks.total_blocks : 0;
  const int64_t n_tensors = static_cast<int64_t>(batch.descs.size());
  const WorkspaceLayout layout = workspace_layout(n_slots, n_sums, n_tensors, batch.n_scopes);
  // The caching allocator makes this stream-ordered and capture-safe; every byte read is written first.
  at::Tensor workspace = at::empty({layout.total_bytes}, at::TensorOptions().device(device).dtype(at::kByte));
  char* base = static_cast<char*>(workspace.data_ptr());
  pass.slots = run_pass1 ? reinterpret_cast<float*>(base + layout.slots_offset) : nullptr;
  pass.meta = reinterpret_cast<TensorMeta*>(base + layout.meta_offset);
  pass.scratch = reinterpret_cast<const ScopeScratch*>(base + layout.scratch_offset);
  fin.slots = pass.slots;
  fin.meta = pass.meta;
  fin.tensor_terms = reinterpret_cast<double*>(base + layout.terms_offset);
  fin.scratch = reinterpret_cast<ScopeScratch*>(base + layout.scratch_offset);
  fin.num_tensors = static_cast<int32_t>(n_tensors);
  fin.algorithm = algorithm;

  const PersistentPlan persistent = choose_persistent(algorithm, batch, chunks, table_size, device, stream.stream(),
                                                       run_pass1, /*split=*/fin.sums_out != nullptr);
  if (persistent.grid > 0) {
    const cudaError_t err = launch_persistent_step(algorithm, persistent, chunks.tables[0], pass, fin, stream.stream());
    if (err == cudaSuccess || err == cudaErrorCooperativeLaunchTooLarge) {
      CooperativeRecord::instance().note(device.index(), algorithm, persistent, err == cudaSuccess);
    }
    // NOTE [cooperative refusal]: the grid is sized from the SM count the device reports, and a
    // process that may use only part of the GPU (an MPS client with a thread percentage) is refused
    // the launch. Nothing ran, so under AMM_CUDA_STEP=auto the two-pass step runs instead (after the
    // launch's error is cleared); a forced persistent step reports the error.
    if (err != cudaErrorCooperativeLaunchTooLarge || step_variant() == StepVariant::kPersistent) {
      C10_CUDA_CHECK(err);
      return;
    }
    (void)cudaGetLastError();
  }

  if (run_pass1) {
    for (const TensorTable& table : chunks.tables) {
      C10_CUDA_CHECK(algorithm == kAlgoAmsgd ? launch_amsgd_sums(table, pass, stream.stream())
                                             : launch_amadamw_sums(table, pass, stream.stream()));
    }
  } else {
    for (const TensorTable& table : meta_only.tables) C10_CUDA_CHECK(launch_write_meta(table, pass.meta, stream.stream()));
  }
  C10_CUDA_CHECK(launch_finalize(fin, stream.stream()));
  if (fin.sums_out != nullptr) return;
  for (const TensorTable& table : chunks.tables) {
    C10_CUDA_CHECK(algorithm == kAlgoAmsgd ? launch_amsgd_update(table, pass, stream.stream())
                                           : launch_amadamw_update(table, pass, stream.stream()));
  }
}

// What both algorithms' steps share: the checked scope state, lr and the scalar inputs on the device,
// and the PassArgs / FinalizeArgs fields that do not depend on the algorithm. The tensors held here
// keep the pointers in pass and fin valid until the step's launches are enqueued.
struct CommonStep {
  at::Tensor lr_f;
  std::optional<at::Tensor> scale_f, inf_f;
  PassArgs pass{};
  FinalizeArgs fin{};
};

CommonStep common_step(const at::Device& device, const at::Tensor& lr, const at::Tensor& step, const at::Tensor& beta,
                       const at::Tensor& prev_lr, const std::optional<at::Tensor>& grad_scale,
                       const std::optional<at::Tensor>& found_inf, double lam, double beta_max, double beta_min,
                       bool adaptive, bool maximize, const std::optional<at::Tensor>& sums_in, double* sums_out) {
  check_state(step, device, "step");
  check_state(beta, device, "beta");
  check_state(prev_lr, device, "prev_lr");
  TORCH_CHECK(beta.numel() == step.numel(), "amm_kernels (CUDA): scope state sizes differ");
  CommonStep c;
  c.lr_f = lr.to(device, at::kFloat).contiguous();
  TORCH_CHECK(prev_lr.numel() == c.lr_f.numel(), "amm_kernels (CUDA): lr and prev_lr must have one entry per group");
  c.scale_f = scalar_input(grad_scale, device, "grad_scale");
  c.inf_f = scalar_input(found_inf, device, "found_inf");

  PassArgs& pass = c.pass;
  pass.lr = c.lr_f.data_ptr<float>();
  pass.grad_scale = ptr_or_null(c.scale_f);
  pass.found_inf = ptr_or_null(c.inf_f);
  pass.step = step.data_ptr<float>();
  pass.lam = static_cast<float>(lam);
  pass.beta_max = static_cast<float>(beta_max);
  pass.beta_max_d = beta_max;
  pass.maximize = maximize;

  FinalizeArgs& fin = c.fin;
  fin.step = step.data_ptr<float>();
  fin.beta = beta.data_ptr<float>();
  fin.prev_lr = prev_lr.data_ptr<float>();
  fin.lr = pass.lr;
  fin.found_inf = pass.found_inf;
  fin.lam = lam;
  fin.beta_max = beta_max;
  fin.beta_min = beta_min;
  fin.adaptive = adaptive;
  fin.sums_in = sums_input(sums_in, device, step.numel());
  fin.sums_out = sums_out;
  return c;
}

// One AMSGD step, or (sums_out) its half before the all-reduce; sums_in: the all-reduced sums.
void amsgd_run(AMM_AMSGD_PARAMS, const std::optional<at::Tensor>& sums_in, double* sums_out) {
  if (params.empty()) return;
  const at::Device device = params[0].device();
  const c10::cuda::CUDAGuard guard(device);
  check_state(prev_loss, device, "prev_loss");
  TORCH_CHECK(prev_loss.numel() == 1, "amm_kernels (CUDA): prev_loss must have one element");
  CommonStep c = common_step(device, lr, step, beta, prev_lr, grad_scale, found_inf, lam, beta_max, beta_min, adaptive,
                             maximize, sums_in, sums_out);
  const auto loss_f = scalar_input(loss, device, "loss");
  const Batch batch = describe(params, grads, momentum, nullptr, group_of, scope_of, weight_decay, device,
                               c.lr_f.numel(), step.numel());
  c.fin.prev_loss = prev_loss.data_ptr<float>();
  c.fin.loss = ptr_or_null(loss_f);
  run_step(kAlgoAmsgd, batch, device, c.pass, c.fin, adaptive);
  if (sums_out == nullptr) batch.copies.copy_back();
}

// One AMAdamW step, or its half before the all-reduce (as amsgd_run).
void amadamw_run(AMM_AMADAMW_PARAMS, const std::optional<at::Tensor>& sums_in, double* sums_out) {
  if (params.empty()) return;
  const at::Device device = params[0].device();
  const c10::cuda::CUDAGuard guard(device);
  check_state(beta_prod, device, "beta_prod");
  TORCH_CHECK(beta_prod.numel() == step.numel(), "amm_kernels (CUDA): scope state sizes differ");
  CommonStep c = common_step(device, lr, step, beta, prev_lr, grad_scale, found_inf, lam, beta_max, beta_min, adaptive,
                             maximize, sums_in, sums_out);
  const Batch batch = describe(params, grads, exp_avg, &exp_avg_sq, group_of, scope_of, weight_decay, device,
                               c.lr_f.numel(), step.numel());
  c.pass.beta_prod = beta_prod.data_ptr<float>();
  c.pass.beta2_d = beta2;
  c.pass.beta2 = static_cast<float>(beta2);
  c.pass.eps = static_cast<float>(eps);
  c.fin.beta_prod = beta_prod.data_ptr<float>();
  c.fin.beta2 = beta2;
  run_step(kAlgoAmadamw, batch, device, c.pass, c.fin, adaptive);
  if (sums_out == nullptr) batch.copies.copy_back();
}

void amsgd_step_cuda(AMM_AMSGD_PARAMS, const std::optional<at::Tensor>& scope_sums) {
  amsgd_run(AMM_AMSGD_ARGS, scope_sums, nullptr);
}

// NOTE [sharded sums]: zeros for the scopes this rank lacks (a stream-ordered memset: no host sync).
at::Tensor amsgd_scope_sums_cuda(AMM_AMSGD_PARAMS) {
  at::Tensor out = at::zeros({step.numel(), 2}, step.options().dtype(at::kDouble));
  if (adaptive) amsgd_run(AMM_AMSGD_ARGS, std::nullopt, out.data_ptr<double>());
  return out;
}

void amadamw_step_cuda(AMM_AMADAMW_PARAMS, const std::optional<at::Tensor>& scope_sums) {
  amadamw_run(AMM_AMADAMW_ARGS, scope_sums, nullptr);
}

at::Tensor amadamw_scope_sums_cuda(AMM_AMADAMW_PARAMS) {
  at::Tensor out = at::zeros({step.numel(), 2}, step.options().dtype(at::kDouble));
  if (adaptive) amadamw_run(AMM_AMADAMW_ARGS, std::nullopt, out.data_ptr<double>());
  return out;
}

}  // namespace
}  // namespace amm_cuda

TORCH_LIBRARY_IMPL(amm_kernels, CUDA, m) {
  m.impl("amsgd_step", &amm_cuda::amsgd_step_cuda);
  m.impl("amadamw_step", &amm_cuda::amadamw_step_cuda);
  m.impl("amsgd_scope_sums", &amm_cuda::amsgd_scope_sums_cuda);
  m.impl("amadamw_scope_sums", &amm_cuda::amadamw_scope_sums_cuda);
}

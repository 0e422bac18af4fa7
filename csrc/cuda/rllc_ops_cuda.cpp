// TORCH_LIBRARY_IMPL(amm_kernels, CUDA): rllc_step of csrc/OPS.md on CUDA tensors. Builds the
// TensorTables (tensor_plan.h; lists kX param, kG grad, kD memory), one workspace tensor, and calls
// the launchers of rllc_launchers.h on the current stream: pass 1, the one-block finalize (the law
// update on the device), pass 2. No host sync, nothing copied host-to-device (U and b travel in the
// kernel arguments): the step is CUDA-graph capturable.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <vector>

#include "cuda/launchers.h"
#include "cuda/rllc_launchers.h"
#include "cuda/settings.h"
#include "cuda/tensor_plan.h"
#include "cuda/working_copies.h"
#include "gradient_dtype.h"
#include "writable.h"
#include "op_signatures.h"
#include "rllc_math.h"

namespace amm_cuda {
namespace {

const char* kOwner = "amm_kernels rllc_step (CUDA)";

DType rllc_dtype_code(const at::Tensor& t, const char* what) {
  switch (t.scalar_type()) {
    case at::kFloat: return kFloat32;
    case at::kBFloat16: return kBFloat16;
    case at::kHalf: return kFloat16;
    default:
      TORCH_CHECK(false, kOwner, ": ", what, " must be float32, bfloat16 or float16, got ", t.scalar_type());
  }
  return kFloat32;  // unreachable
}

std::optional<at::Tensor> rllc_scalar_input(const std::optional<at::Tensor>& t, const at::Device& device,
                                            const char* what) {
  if (!t.has_value() || !t->defined()) return std::nullopt;
  TORCH_CHECK(t->numel() == 1, kOwner, ": ", what, " must have one element");
  return t->to(device, at::kFloat).contiguous();
}

// One RLLC step, or (sums_out) its half before the all-reduce; sums_in: the all-reduced sums
// (NOTE [sharded sums] in rllc_launchers.h).
void rllc_run(AMM_RLLC_PARAMS, const std::optional<at::Tensor>& sums_in, double* sums_out) {
  const size_t T = params.size();
  const int64_t k = static_cast<int64_t>(b.size());
  TORCH_CHECK(k >= 1 && k <= amm::kRllcMaxK, kOwner, ": k = ", k, " memory units; the kernels handle 1..",
              amm::kRllcMaxK);
  TORCH_CHECK(static_cast<int64_t>(U.size()) == k * k, kOwner, ": U must have k * k = ", k * k, " entries");
  TORCH_CHECK(grads.size() == T && memory.size() == T && group_of.size() == T && scope_of.size() == T, kOwner,
              ": params, grads, memory, group_of and scope_of must have the same length");
  if (T == 0) return;
  const at::Device device = params[0].device();
  const c10::cuda::CUDAGuard guard(device);
  for (const at::Tensor* t : {&step, &law}) {
    TORCH_CHECK(t->device() == device && t->scalar_type() == at::kFloat && t->is_contiguous(), kOwner,
                ": step and law must be contiguous float32 tensors on ", device);
  }
  const int64_t S = step.numel();
  TORCH_CHECK(law.numel() == S * k, kOwner, ": law must have shape [S, k] = [", S, ", ", k, "]");
  const at::Tensor lr_f = lr.to(device, at::kFloat).contiguous();
  const int64_t G = lr_f.numel();
  const auto scale_f = rllc_scalar_input(grad_scale, device, "grad_scale");
  const auto inf_f = rllc_scalar_input(found_inf, device, "found_inf");

  std::vector<TensorDesc> descs(T);
  WorkingCopies copies;  // what the kernels walk instead of the caller's tensors (NOTE [working copies])
  for (size_t i = 0; i < T; ++i) {
    TORCH_CHECK(params[i].device() == device && grads[i].device() == device && memory[i].device() == device, kOwner,
                ": tensor ", i, " is not on ", device);
    amm::check_writable(params[i], kOwner, i, "parameter");
    amm::check_writable(memory[i], kOwner, i, "memory");
    const at::Tensor p = copies.walkable(params[i], /*contiguous_only=*/true);
    const at::Tensor m = copies.walkable(memory[i], /*contiguous_only=*/true);
    TORCH_CHECK(m.dim() == p.dim() + 1 && m.size(0) == k && m.sizes().slice(1) == p.sizes(), kOwner,
                ": memory[", i, "] must be a (k, *param.shape) tensor with k = ", k);
    TORCH_CHECK(m.scalar_type() == p.scalar_type() || m.scalar_type() == at::kFloat, kOwner, ": memory[", i,
                "] must have its parameter's dtype or float32");
    TORCH_CHECK(!grads[i].is_sparse(), kOwner, ": sparse gradients are not supported");
    TORCH_CHECK(grads[i].sizes() == p.sizes(), kOwner, ": grads[", i, "] has shape ", grads[i].sizes(),
                ", its parameter ", p.sizes());
    at::Tensor g = amm::readable_gradient(grads[i], p.scalar_type(), kOwner, i);
    if (!g.is_contiguous()) g = g.contiguous();
    if (!g.is_same(grads[i])) copies.read_only(g);
    const int64_t group = group_of[i], scope = scope_of[i];
    TORCH_CHECK(group >= 0 && group < G, kOwner, ": group_of[", i, "] = ", group, " is out of range");
    TORCH_CHECK(scope >= 0 && scope < S, kOwner, ": scope_of[", i, "] = ", scope, " is out of range");
    TensorDesc& d = descs[i];
    d.numel = p.numel();
    d.group = static_cast<int32_t>(group);
    d.scope = static_cast<int32_t>(scope);
    d.ptr[kX] = p.data_ptr();
    d.dtype[kX] = rllc_dtype_code(p, "params");
    d.ptr[kG] = g.data_ptr();
    d.dtype[kG] = rllc_dtype_code(g, "grads");
    d.ptr[kD] = m.data_ptr();
    d.dtype[kD] = rllc_dtype_code(m, "memory");
  }
  const int n_sums = amm::rllc_n_sums(static_cast<int>(k));
  const bool given = sums_in.has_value() && sums_in->defined();
  if (given) {
    TORCH_CHECK(sums_in->device() == device && sums_in->scalar_type() == at::kDouble && sums_in->dim() == 2 &&
                    sums_in->size(0) == S && sums_in->size(1) == n_sums && sums_in->is_contiguous(),
                kOwner, ": scope_sums must be a contiguous float64 tensor of shape [", S, ", ", n_sums, "] on ",
                device);
  }
  const int64_t table_size = table_tensors();  // NOTE [one launch per pass]
  const LaunchPlan plan = plan_or_throw(descs, /*one_block_per_tensor=*/false, kChunkSize, table_size);
  const LaunchPlan meta_only =
      given ? plan_or_throw(descs, /*one_block_per_tensor=*/true, kChunkSize, table_size) : LaunchPlan{};

  const RllcWorkspace layout = rllc_workspace(given ? 0 : plan.total_blocks, n_sums, static_cast<int64_t>(T));
  // The caching allocator makes this stream-ordered and capture-safe; every byte read is written first.
  at::Tensor workspace = at::empty({layout.total_bytes}, at::TensorOptions().device(device).dtype(at::kByte));
  char* base = static_cast<char*>(workspace.data_ptr());

  RllcArgs args{};
  for (int64_t j = 0; j < k * k; ++j) args.U[j] = static_cast<float>(U[j]);
  for (int64_t j = 0; j < k; ++j) args.b[j] = static_cast<float>(b[j]);
  args.k = static_cast<int32_t>(k);
  args.num_tensors = static_cast<int32_t>(T);
  args.lr = lr_f.data_ptr<float>();
  args.grad_scale = scale_f.has_value() ? scale_f->data_ptr<float>() : nullptr;
  args.found_inf = inf_f.has_value() ? inf_f->data_ptr<float>() : nullptr;
  args.step = step.data_ptr<float>();
  args.law = law.data_ptr<float>();
  args.slots = reinterpret_cast<double*>(base + layout.slots_offset);
  args.meta = reinterpret_cast<TensorMeta*>(base + layout.meta_offset);
  args.tensor_sums = reinterpret_cast<double*>(base + layout.sums_offset);
  args.sums_in = given ? sums_in->data_ptr<double>() : nullptr;
  args.sums_out = sums_out;
  args.law_lr = law_lr;
  args.rcond = rcond;

  const c10::cuda::CUDAStream stream = c10::cuda::getCurrentCUDAStream(device.index());
  if (given) {
    for (const TensorTable& table : meta_only.tables) C10_CUDA_CHECK(launch_write_meta(table, args.meta, stream.stream()));
  } else {
    for (const TensorTable& table : plan.tables) C10_CUDA_CHECK(launch_rllc_sums(table, args, stream.stream()));
  }
  C10_CUDA_CHECK(launch_rllc_finalize(args, stream.stream()));
  if (sums_out != nullptr) return;
  for (const TensorTable& table : plan.tables) C10_CUDA_CHECK(launch_rllc_update(table, args, stream.stream()));
  copies.copy_back();
}

void rllc_step_cuda(AMM_RLLC_PARAMS, const std::optional<at::Tensor>& scope_sums) {
  rllc_run(AMM_RLLC_ARGS, scope_sums, nullptr);
}

// Zeros for the scopes this rank lacks (a stream-ordered memset: no host sync).
at::Tensor rllc_scope_sums_cuda(AMM_RLLC_PARAMS) {
  const int n_sums = amm::rllc_n_sums(static_cast<int>(b.size()));
  at::Tensor out = at::zeros({step.numel(), n_sums}, step.options().dtype(at::kDouble));
  rllc_run(AMM_RLLC_ARGS, std::nullopt, out.data_ptr<double>());
  return out;
}

}  // namespace
}  // namespace amm_cuda

TORCH_LIBRARY_IMPL(amm_kernels, CUDA, m) {
  m.impl("rllc_step", &amm_cuda::rllc_step_cuda);
  m.impl("rllc_scope_sums", &amm_cuda::rllc_scope_sums_cuda);
}

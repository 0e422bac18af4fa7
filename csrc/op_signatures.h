// The C++ parameter lists of the ops that csrc/ops.cpp defines (csrc/OPS.md), written once.
//
// NOTE [op signatures]: each algorithm has a step op and a *_scope_sums op that take the same
// arguments (the step op adds `scope_sums`), and each backend (csrc/cpu/, csrc/cuda/) implements both
// through one run function. The lists below are those arguments in schema order, as the dispatcher
// passes them: AMM_<ALGO>_PARAMS declares them, AMM_<ALGO>_ARGS forwards them. A schema change is
// made in ops.cpp and here; every implementation then follows (or fails to compile).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

#include <optional>

#define AMM_AMSGD_PARAMS                                                                                            \
  at::TensorList params, at::TensorList grads, at::TensorList momentum, at::IntArrayRef group_of,                  \
      at::IntArrayRef scope_of, const at::Tensor &lr, at::ArrayRef<double> weight_decay, const at::Tensor &step,    \
      const at::Tensor &beta, const at::Tensor &prev_lr, const at::Tensor &prev_loss,                               \
      const std::optional<at::Tensor> &loss, const std::optional<at::Tensor> &grad_scale,                           \
      const std::optional<at::Tensor> &found_inf, double lam, double beta_max, double beta_min, bool adaptive,      \
      bool maximize
#define AMM_AMSGD_ARGS                                                                                              \
  params, grads, momentum, group_of, scope_of, lr, weight_decay, step, beta, prev_lr, prev_loss, loss, grad_scale,  \
      found_inf, lam, beta_max, beta_min, adaptive, maximize

#define AMM_AMADAMW_PARAMS                                                                                          \
  at::TensorList params, at::TensorList grads, at::TensorList exp_avg, at::TensorList exp_avg_sq,                   \
      at::IntArrayRef group_of, at::IntArrayRef scope_of, const at::Tensor &lr, at::ArrayRef<double> weight_decay,  \
      const at::Tensor &step, const at::Tensor &beta, const at::Tensor &beta_prod, const at::Tensor &prev_lr,       \
      const std::optional<at::Tensor> &grad_scale, const std::optional<at::Tensor> &found_inf, double lam,          \
      double beta_max, double beta_min, double beta2, double eps, bool adaptive, bool maximize
#define AMM_AMADAMW_ARGS                                                                                            \
  params, grads, exp_avg, exp_avg_sq, group_of, scope_of, lr, weight_decay, step, beta, beta_prod, prev_lr,         \
      grad_scale, found_inf, lam, beta_max, beta_min, beta2, eps, adaptive, maximize

#define AMM_RLLC_PARAMS                                                                                             \
  at::TensorList params, at::TensorList grads, at::TensorList memory, at::IntArrayRef group_of,                    \
      at::IntArrayRef scope_of, const at::Tensor &lr, at::ArrayRef<double> U, at::ArrayRef<double> b,               \
      const at::Tensor &step, const at::Tensor &law, const std::optional<at::Tensor> &grad_scale,                   \
      const std::optional<at::Tensor> &found_inf, double law_lr, double rcond
#define AMM_RLLC_ARGS params, grads, memory, group_of, scope_of, lr, U, b, step, law, grad_scale, found_inf, law_lr, rcond

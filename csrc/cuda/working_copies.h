// Torch glue shared by ops_cuda.cpp and rllc_ops_cuda.cpp: parameters and state the CUDA kernels can
// walk. Needs ATen (not a pure-CUDA header).
//
// NOTE [working copies]: the kernels index each tensor's storage linearly, in the parameter's own
// layout: a dense parameter (contiguous, or a permutation such as a transpose) for AMSGD / AMAdamW,
// a contiguous one for RLLC, and every state tensor in its parameter's layout. A user may hand the
// optimizer any view (a slice with gaps, a transpose) and a checkpoint may load state in another
// layout. Such a tensor is replaced for this step by a copy the kernels can walk, and the copy is
// written back after the step's launches, on the same stream. The usual dense parameter costs
// nothing (and keeps the step CUDA-graph capturable); the checks run in C++, not in the Python
// driver, because that runs once per tensor per step (NOTE [host time] in amm_kernels/_base.py).
#pragma once

#include <ATen/ATen.h>

#include <utility>
#include <vector>

namespace amm_cuda {

class WorkingCopies {
 public:
  // t itself when it is dense (or, with contiguous_only, contiguous); else a contiguous copy.
  at::Tensor walkable(const at::Tensor& t, bool contiguous_only) {
    if (t.is_contiguous() || (!contiguous_only && t.is_non_overlapping_and_dense())) return t;
    return keep(t, t.contiguous());
  }
  // t in the layout of the (walkable) parameter p: a state tensor (write_back), or a gradient the
  // kernels only read (its copy is kept alive until the step's launches are queued, not copied back).
  at::Tensor in_layout_of(const at::Tensor& t, const at::Tensor& p, bool write_back = true) {
    if (t.strides() == p.strides() || t.sizes() != p.sizes()) return t;  // a size mismatch is the caller's error
    at::Tensor copy = at::empty_strided(p.sizes(), p.strides(), t.options());
    copy.copy_(t);
    return write_back ? keep(t, copy) : read_only(copy);
  }
  // A tensor made for this step that the kernels only read (a gradient converted to float32).
  at::Tensor read_only(at::Tensor t) {
    read_only_.push_back(t);
    return t;
  }
  // After the step's launches: the updated copies back into the caller's tensors.
  void copy_back() const {
    for (const auto& pair : pairs_) pair.first.copy_(pair.second);
  }

 private:
  at::Tensor keep(const at::Tensor& original, at::Tensor copy) {
    pairs_.emplace_back(original, copy);
    return copy;
  }
  std::vector<std::pair<at::Tensor, at::Tensor>> pairs_;  // (caller's tensor, working copy)
  std::vector<at::Tensor> read_only_;                     // copies read and then dropped
};

}  // namespace amm_cuda

// The tensors a step writes, in one place for the C++ glue of every backend (csrc/cpu/, csrc/cuda/).
//
// A parameter or state tensor whose elements share memory (a stride of 0 over a dimension of more
// than one element, as expand() makes) cannot be written in place. The optimizer refuses such a
// parameter when it is given one (NOTE [aliased parameters], amm_kernels/_aliasing.py), but p.data may
// be replaced later: the glue would then walk a working copy and fail only when copying it back, after
// the other tensors of the step were written. So the glue checks each such tensor before any launch
// (the Python backends' twin: _step.check_writable). A contiguous tensor, the usual one, cannot
// overlap itself and is not examined.
#pragma once

#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>

namespace amm {

inline void check_writable(const at::Tensor& t, const char* owner, int64_t i, const char* what) {
  TORCH_CHECK(t.is_contiguous() || at::has_internal_overlap(t) != at::MemOverlap::Yes, owner, ": tensor ", i,
              ": its ", what, " (shape ", t.sizes(), ", strides ", t.strides(),
              ") repeats elements in memory (made by expand()): no in-place update can write it; give it a "
              "tensor of its own (.contiguous() or .clone())");
}

}  // namespace amm

// The gradient a kernel reads, in one place for the C++ glue of every backend (csrc/cpu/, csrc/cuda/).
//
// A gradient in its parameter's dtype or in float32 is read as it is; one of another real dtype
// (float64, or a 16-bit type beside float32 parameters) is converted to float32, as the Python backends
// do. A complex gradient of a real parameter is refused, naming the tensor: converting it would keep
// its real part alone (the Python backends' twin: _step.check_real_gradient).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

#include <cstdint>

namespace amm {

inline at::Tensor readable_gradient(const at::Tensor& g, at::ScalarType param_dtype, const char* owner, int64_t i) {
  if (g.scalar_type() == param_dtype || g.scalar_type() == at::kFloat) return g;
  TORCH_CHECK(!c10::isComplexType(g.scalar_type()), owner, ": tensor ", i, ": gradients must be real, got ",
              g.scalar_type());
  return g.to(at::kFloat);
}

}  // namespace amm

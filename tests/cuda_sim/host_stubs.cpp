// What csrc/ops.cpp's module stub asks of the CPU kernels, which the simulator library leaves out
// (its ops are the CUDA kernels, registered for CPU tensors under torch.ops.amm_cuda_sim).
#include <cstdint>

namespace amm {
namespace cpu {
int64_t parallel_thread_count() { return 1; }
const char* cpu_isa_name() { return "cuda_sim"; }
}  // namespace cpu
}  // namespace amm

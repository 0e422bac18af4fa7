// The op schemas of amm_kernels._C (csrc/OPS.md), defined once; the CPU kernels register in
// csrc/cpu/, the CUDA kernels in csrc/cuda/. Also the Python module stub, so that
// `import amm_kernels._C` loads this library (which runs the registrations) and exposes `has_cuda`.
#include <Python.h>
#include <torch/library.h>

#include <cstdint>

TORCH_LIBRARY(amm_kernels, m) {
  m.def(
      "amsgd_step(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum, "
      "int[] group_of, int[] scope_of, Tensor lr, float[] weight_decay, "
      "Tensor(c!) step, Tensor(d!) beta, Tensor(e!) prev_lr, Tensor(f!) prev_loss, "
      "Tensor? loss, Tensor? grad_scale, Tensor? found_inf, "
      "float lam, float beta_max, float beta_min, bool adaptive, bool maximize, "
      "Tensor? scope_sums=None) -> ()");
  m.def(
      "amsgd_scope_sums(Tensor[] params, Tensor[] grads, Tensor[] momentum, "
      "int[] group_of, int[] scope_of, Tensor lr, float[] weight_decay, "
      "Tensor step, Tensor beta, Tensor prev_lr, Tensor prev_loss, "
      "Tensor? loss, Tensor? grad_scale, Tensor? found_inf, "
      "float lam, float beta_max, float beta_min, bool adaptive, bool maximize) -> Tensor");
  m.def(
      "amadamw_step(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avg, Tensor(c!)[] exp_avg_sq, "
      "int[] group_of, int[] scope_of, Tensor lr, float[] weight_decay, "
      "Tensor(d!) step, Tensor(e!) beta, Tensor(f!) beta_prod, Tensor(g!) prev_lr, "
      "Tensor? grad_scale, Tensor? found_inf, "
      "float lam, float beta_max, float beta_min, float beta2, float eps, "
      "bool adaptive, bool maximize, Tensor? scope_sums=None) -> ()");
  m.def(
      "amadamw_scope_sums(Tensor[] params, Tensor[] grads, Tensor[] exp_avg, Tensor[] exp_avg_sq, "
      "int[] group_of, int[] scope_of, Tensor lr, float[] weight_decay, "
      "Tensor step, Tensor beta, Tensor beta_prod, Tensor prev_lr, "
      "Tensor? grad_scale, Tensor? found_inf, "
      "float lam, float beta_max, float beta_min, float beta2, float eps, "
      "bool adaptive, bool maximize) -> Tensor");
  m.def(
      "rllc_step(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] memory, "
      "int[] group_of, int[] scope_of, Tensor lr, float[] U, float[] b, "
      "Tensor(c!) step, Tensor(d!) law, Tensor? grad_scale, Tensor? found_inf, "
      "float law_lr, float rcond, Tensor? scope_sums=None) -> ()");
  m.def(
      "rllc_scope_sums(Tensor[] params, Tensor[] grads, Tensor[] memory, "
      "int[] group_of, int[] scope_of, Tensor lr, float[] U, float[] b, "
      "Tensor step, Tensor law, Tensor? grad_scale, Tensor? found_inf, "
      "float law_lr, float rcond) -> Tensor");
}

#ifdef AMM_WITH_CUDA
static constexpr long kHasCuda = 1;
#else
static constexpr long kHasCuda = 0;
#endif

namespace amm {
namespace cpu {
int64_t parallel_thread_count();  // csrc/cpu/step_driver_cpu.cpp
const char* cpu_isa_name();       // csrc/cpu/step_driver_cpu.cpp
}  // namespace cpu
}  // namespace amm

static PyObject* parallel_threads(PyObject*, PyObject*) { return PyLong_FromLongLong(amm::cpu::parallel_thread_count()); }

static PyObject* cpu_isa(PyObject*, PyObject*) { return PyUnicode_FromString(amm::cpu::cpu_isa_name()); }

static PyMethodDef kMethods[] = {
    {"cpu_isa", cpu_isa, METH_NOARGS,
     "The instruction set the CPU kernels run with: 'avx512', 'avx2' or 'base' (AMM_CPU_ISA may lower it)."},
    {"parallel_threads", parallel_threads, METH_NOARGS,
     "How many threads an at::parallel_for inside this library uses (1 means it was built without OpenMP)."},
    {nullptr, nullptr, 0, nullptr},
};

extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "amm_kernels custom ops (torch.ops.amm_kernels.*)", -1, kMethods,
  };
  PyObject* module = PyModule_Create(&module_def);
  if (module == nullptr) return nullptr;
  if (PyModule_AddIntConstant(module, "has_cuda", kHasCuda) != 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}

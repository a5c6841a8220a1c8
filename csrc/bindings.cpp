// Declares the rankkd operators. Kernels register themselves per device (kendall_cpu.cpp, kendall_cuda.cu); the
// fake (meta) implementation and autograd formula are registered from Python (rankkd/ops.py).
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(rankkd, m) {
  // Per row of (rows, C) logits: the loss (rows,), and, when asked, dloss/dstudent and dloss/dteacher (rows, C) in
  // the accumulation dtype (float32, or float64 for float64 inputs); a gradient not asked for comes back empty (0,).
  // teacher_mode is "tanh" or "sign", precision "fast" or "exact" (kendall.h), as in rankkd.kendall_rank_loss.
  m.def(
      "kendall_rank(Tensor student, Tensor teacher, float k, str teacher_mode, str precision, bool grad_student, "
      "bool grad_teacher) -> (Tensor, Tensor, Tensor)");
}

// Importing rankkd._C loads the library, which runs the registrations above; the module itself is empty.
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}

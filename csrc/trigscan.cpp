// The trigscan operator library: every schema, once. Kernels are registered per
// backend in cpu/kernels.cpp and cuda/backend.cpp; fake (meta) kernels and
// autograd formulas are registered from Python (trigscan/ops.py).
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(trigscan, m) {
  m.set_python_module("trigscan.ops");
  m.def("stamp(Tensor x, Tensor mask, Tensor pattern) -> Tensor");
  m.def("stamp_backward(Tensor grad, Tensor x, Tensor mask, Tensor pattern,"
        " bool need_grad_x=True) -> (Tensor, Tensor, Tensor)");
  m.def("nes_sample_stamp(Tensor x, Tensor theta_m, Tensor theta_p, int k, float sigma,"
        " int seed, int offset, bool joint) -> Tensor");
  m.def("nes_sample_stamp_out(Tensor x, Tensor theta_m, Tensor theta_p, int k, float sigma,"
        " int seed, int offset, bool joint, Tensor(a!) out) -> ()");
  m.def("nes_grad(Tensor losses, Tensor theta_m, Tensor theta_p, int k, float sigma,"
        " int seed, int offset, bool joint, bool baseline) -> (Tensor, Tensor)");
  m.def("nes_samples(Tensor theta_m, Tensor theta_p, int k, int seed, int offset)"
        " -> (Tensor, Tensor)");
  m.def("pixel_stamp(Tensor x, Tensor b_p, Tensor b_n, float maxp, bool use_tanh) -> Tensor");
  m.def("pixel_stamp_backward(Tensor grad, Tensor x, Tensor b_p, Tensor b_n, float maxp,"
        " bool use_tanh, bool need_grad_x=True) -> (Tensor, Tensor, Tensor)");
  m.def("pixel_size_loss(Tensor b_p, Tensor b_n, float gamma) -> Tensor");
  m.def("pixel_size_loss_backward(Tensor grad, Tensor b_p, Tensor b_n, float gamma)"
        " -> (Tensor, Tensor)");
}

// `import trigscan._C` only needs to run the static initialisers above; the
// module itself is empty (no pybind11, so it builds against the limited API).
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

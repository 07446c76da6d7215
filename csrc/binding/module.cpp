// The extension module torch_swiftep._C. `import torch_swiftep._C` loads this library, which
// runs the TORCH_LIBRARY_IMPL(swiftep, CUDA, ...) registrations of the binding's other files
// (dispatch_layout.cpp, dispatch.cpp, combine.cpp, swiglu_rows.cpp); the Python module itself
// is empty.
#include <Python.h>

PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr,
                                   nullptr,               nullptr, nullptr, nullptr};
  return PyModule_Create(&module_def);
}

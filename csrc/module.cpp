// Python module entry point: importing cpift_fast._C loads the library, whose static
// initialisers register every cpift:: op with the dispatcher.
#include <Python.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "cpift_fast C++ ops (torch.ops.cpift)", -1, nullptr};
  return PyModule_Create(&module_def);
}
}

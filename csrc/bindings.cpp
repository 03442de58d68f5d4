// pybind11 bindings for driftscope._C. Binding only: all logic lives in the kernel files.
#include <pybind11/pybind11.h>

#include "common.h"

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "driftscope CPU kernels (OpenMP + SIMD); tensors cross as raw pointers, no libtorch link";
  m.def("has_openmp", []() {
#ifdef DRIFTSCOPE_OPENMP
    return true;
#else
    return false;
#endif
  });
  m.def("omp_max_threads", &driftscope::max_threads);
}

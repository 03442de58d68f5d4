// Shared helpers for driftscope's CPU kernels: argument checks that name the offending argument.
#pragma once
#include <stdexcept>
#include <string>

#ifdef DRIFTSCOPE_OPENMP
#include <omp.h>
#endif

namespace driftscope {

inline void check(bool ok, const std::string& msg) {
  if (!ok) throw std::invalid_argument(msg);
}

inline int max_threads() {
#ifdef DRIFTSCOPE_OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

}  // namespace driftscope

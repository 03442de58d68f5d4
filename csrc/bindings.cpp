// pybind11 bindings for driftscope._C. Binding only: all logic lives in the kernel files.
// Tensors cross as raw pointers (int from tensor.data_ptr()) plus sizes; the Python launchers in
// driftscope/kernels/ check shapes, dtypes, devices and contiguity before calling in.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "common.h"
#include "cov_update.h"
#include "glue.h"
#include "paged_attention.h"
#include "small_gemm.h"
#include "thread_pool.h"
#include "varlen_attention.h"
#include "vocab_probe.h"

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
  m.def("pool_spin_us", &driftscope::pool_spin_us);
  m.def(  // the decode pool's contract, for tests: `jobs` jobs of n tasks each, task i adding 1 to counts[i] (int64)
      "pool_count",
      [](uintptr_t counts, int64_t n, int threads, int64_t jobs) {
        auto* c = reinterpret_cast<int64_t*>(counts);
        for (int64_t j = 0; j < jobs; ++j)
          driftscope::parallel_tasks(n, threads, [c](int64_t i) { __atomic_fetch_add(c + i, 1, __ATOMIC_RELAXED); });
      },
      py::arg("counts"), py::arg("n"), py::arg("threads"), py::arg("jobs"), py::call_guard<py::gil_scoped_release>());

  py::class_<driftscope::VocabFold>(m, "VocabFold")
      .def(py::init<int64_t, int64_t, std::vector<std::pair<int64_t, int64_t>>>(), py::arg("n_rows"), py::arg("topk"),
           py::arg("pairs"))
      .def("fold", &driftscope::VocabFold::fold, py::arg("zs"), py::arg("ld"), py::arg("rows"), py::arg("cols"),
           py::arg("row0"), py::arg("col0"), py::arg("targets"), py::arg("zpre"),
           py::call_guard<py::gil_scoped_release>())
      .def("finalize", &driftscope::VocabFold::finalize, py::arg("pair"), py::arg("out_f"), py::arg("out_i"),
           py::call_guard<py::gil_scoped_release>())
      .def_static("float_fields", &driftscope::VocabFold::float_fields)
      .def_static("int_fields", &driftscope::VocabFold::int_fields)
      .def("tuned_top", &driftscope::VocabFold::tuned_top, py::arg("pair"), py::arg("row0"), py::arg("rows"),
           py::arg("top_t"), py::arg("zb_at_top_t"), py::arg("shift_top"))
      .def_property_readonly("n_rows", &driftscope::VocabFold::n_rows)
      .def_property_readonly("topk", &driftscope::VocabFold::topk)
      .def_property_readonly("n_sources", &driftscope::VocabFold::n_sources)
      .def_property_readonly("n_pairs", &driftscope::VocabFold::n_pairs);
  m.def("count_greater", &driftscope::count_greater, py::arg("z"), py::arg("ld"), py::arg("rows"), py::arg("cols"),
        py::arg("col0"), py::arg("thr"), py::arg("excl"), py::arg("active"), py::arg("out"),
        py::call_guard<py::gil_scoped_release>());
  m.def("cov_update", &driftscope::cov_update, py::arg("sum_x"), py::arg("sum_xxT"), py::arg("x"), py::arg("n"),
        py::arg("d"), py::arg("ld"), py::arg("elem_bytes"), py::call_guard<py::gil_scoped_release>());
  m.def("small_gemm", &driftscope::small_gemm, py::arg("out"), py::arg("x"), py::arg("w"), py::arg("bias"),
        py::arg("M"), py::arg("N"), py::arg("K"), py::call_guard<py::gil_scoped_release>());
  m.def("paged_decode_attention", &driftscope::paged_decode_attention, py::arg("out"), py::arg("q"),
        py::arg("k_cache"), py::arg("v_cache"), py::arg("block_tables"), py::arg("context_lens"), py::arg("B"),
        py::arg("M"), py::arg("Hq"), py::arg("Hkv"), py::arg("D"), py::arg("block_size"), py::arg("num_slots"),
        py::arg("scale"), py::arg("window") = 0, py::arg("ldq") = 0, py::call_guard<py::gil_scoped_release>());
  m.def("rms_norm", &driftscope::rms_norm, py::arg("out"), py::arg("x"), py::arg("w"), py::arg("rows"), py::arg("d"),
        py::arg("ldx"), py::arg("eps"), py::call_guard<py::gil_scoped_release>());
  m.def("add_rms_norm", &driftscope::add_rms_norm, py::arg("res"), py::arg("out"), py::arg("h"), py::arg("a"),
        py::arg("w"), py::arg("rows"), py::arg("d"), py::arg("eps"), py::call_guard<py::gil_scoped_release>());
  m.def("silu_mul", &driftscope::silu_mul, py::arg("out"), py::arg("gu"), py::arg("rows"), py::arg("inter"),
        py::call_guard<py::gil_scoped_release>());
  m.def("rope_cache_write", &driftscope::rope_cache_write, py::arg("qkv"), py::arg("cos"), py::arg("sin"),
        py::arg("k_cache"), py::arg("v_cache"), py::arg("slots"), py::arg("T"), py::arg("Hq"), py::arg("Hkv"),
        py::arg("D"), py::arg("R"), py::arg("num_slots"), py::call_guard<py::gil_scoped_release>());
  m.def("varlen_attention", &driftscope::varlen_attention, py::arg("out"), py::arg("q"), py::arg("k"), py::arg("v"),
        py::arg("cu_seqlens"), py::arg("B"), py::arg("Hq"), py::arg("Hkv"), py::arg("D"), py::arg("sq"), py::arg("sk"),
        py::arg("sv"), py::arg("scale"), py::arg("window") = 0, py::call_guard<py::gil_scoped_release>());
  m.def("varlen_attention_lanes", &driftscope::varlen_attention_lanes);
}

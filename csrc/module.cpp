// The Python module embedops._C: loading it registers every op (the TORCH_LIBRARY blocks of the
// other files); it also exposes build_info() and advise_huge_pages().

#include <ATen/Parallel.h>
#include <pybind11/pybind11.h>

#include <pybind11/stl.h>

#include "common/cpu_capability.h"
#include "common/memory.h"

namespace py = pybind11;

namespace {

py::dict build_info() {
  py::dict d;
  d["version"] = EMBEDOPS_VERSION;
  d["torch_version"] = EMBEDOPS_TORCH_VERSION;
#ifdef EMBEDOPS_WITH_CUDA
  d["cuda"] = true;
  d["cuda_archs"] = EMBEDOPS_CUDA_ARCHS;
  d["cuda_compiler"] = EMBEDOPS_CUDA_COMPILER;
#else
  d["cuda"] = false;
  d["cuda_archs"] = "";
  d["cuda_compiler"] = "";
#endif
  d["cxx_compiler"] = EMBEDOPS_CXX_COMPILER;
  d["cpu_arch"] = EMBEDOPS_CPU_ARCH;  // an extra -march for the highest level, if any
  d["cpu_capabilities"] = embedops::compiled_cpu_capabilities();
  try {
    d["cpu_capability"] = embedops::cpu_capability_name(embedops::cpu_capability());
  } catch (const c10::Error& e) {
    throw py::value_error(e.what_without_backtrace());
  }
  d["cpu_supports"] = embedops::supported_cpu_capabilities();
#ifdef EMBEDOPS_EMULATE_AVX512
  d["cpu_avx512_emulated"] = true;  // a test build: its avx512 level is AVX2 code (CMakeLists.txt)
#else
  d["cpu_avx512_emulated"] = false;
#endif
#ifdef _OPENMP
  d["openmp"] = true;
#else
  d["openmp"] = false;
#endif
  d["num_threads"] = at::get_num_threads();
  return d;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "embedops native extension: registers the torch.ops.embedops.* kernels";
  m.def("build_info", &build_info, "How this extension was built (version, torch, CUDA, compiler, threads).");
  m.def(
      "_check_cpu_capability",
      [] {
        try {
          return std::string(embedops::cpu_capability_name(embedops::cpu_capability()));
        } catch (const c10::Error& e) {
          throw py::value_error(e.what_without_backtrace());
        }
      },
      "The CPU level the kernels run at; raises ValueError for a bad EMBEDOPS_CPU_CAPABILITY.");
  m.def(
      "advise_huge_pages",
      [](uintptr_t ptr, size_t nbytes) { embedops::advise_huge_pages(ptr, nbytes); }, py::arg("ptr"),
      py::arg("nbytes"),
      "Ask for transparent huge pages on host memory [ptr, ptr + nbytes) (Linux; advice only, the data is "
      "unchanged): long-lived storage that is streamed or randomly read then costs fewer TLB misses. A no-op "
      "below 8 MB. Call it before the memory is first written.");
}

// The Python module embedops._C: loading it registers every op (the TORCH_LIBRARY blocks of the
// other files); it also exposes build_info() and advise_huge_pages().

#include <ATen/Parallel.h>
#include <pybind11/pybind11.h>

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
  d["cpu_arch"] = EMBEDOPS_CPU_ARCH;
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
      "advise_huge_pages",
      [](uintptr_t ptr, size_t nbytes) { embedops::advise_huge_pages(ptr, nbytes); }, py::arg("ptr"),
      py::arg("nbytes"),
      "Ask for transparent huge pages on host memory [ptr, ptr + nbytes) (Linux; advice only, the data is "
      "unchanged): long-lived storage that is streamed or randomly read then costs fewer TLB misses. A no-op "
      "below 8 MB. Call it before the memory is first written.");
}

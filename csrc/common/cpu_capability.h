#pragma once
// CPU levels: the kernel files under csrc/<family>/cpu/ are compiled once per level, each level in
// its own namespace (embedops::CPU_CAPABILITY, ATen's scheme), and register their entry points in
// a CpuKernelStub. The host code (checks, allocation, registration: compiled once, baseline
// x86-64) calls the stub, which runs the kernel of the level chosen at load:
//   - the best compiled level this CPU supports (cpuid: avx512 = x86-64-v4, avx2 = x86-64-v3), or
//   - EMBEDOPS_CPU_CAPABILITY=default|avx2|avx512 (an unknown value, or a level this CPU or this
//     build lacks, is an error naming the variable, never SIGILL), else
//   - ATEN_CPU_CAPABILITY when it names a level (capped at what the CPU supports, as torch does).

#include <c10/util/Exception.h>

#include <string>
#include <vector>

namespace embedops {

enum class CpuCapability : int { kDefault = 0, kAvx2 = 1, kAvx512 = 2 };
constexpr int kNumCpuCapabilities = 3;

const char* cpu_capability_name(CpuCapability c);

// The level the kernels run at (resolved once, at the first call; throws c10::ValueError for a
// bad EMBEDOPS_CPU_CAPABILITY, every time it is called).
CpuCapability cpu_capability();

// Levels compiled into this build, lowest first; levels this CPU can run (compiled or not).
std::vector<std::string> compiled_cpu_capabilities();
std::vector<std::string> supported_cpu_capabilities();

// The per-level kernels of one entry point. Constant-initialised (an array of null pointers), so
// the registrars of the kernel files may fill it in any static-initialisation order.
template <typename Fn>
struct CpuKernelStub;

template <typename R, typename... Args>
struct CpuKernelStub<R(Args...)> {
  using Fn = R (*)(Args...);
  const char* name;
  Fn table[kNumCpuCapabilities] = {};

  constexpr explicit CpuKernelStub(const char* n) : name(n) {}

  // the chosen level's kernel, or the best lower level compiled (a build with fewer levels)
  Fn kernel() const {
    for (int c = static_cast<int>(cpu_capability()); c >= 0; --c)
      if (table[c] != nullptr) return table[c];
    TORCH_CHECK(false, "embedops: no CPU kernel was compiled for ", name);
  }
  template <typename... A>
  R operator()(A&&... args) const {
    return kernel()(std::forward<A>(args)...);
  }
};

struct CpuKernelRegistrar {
  template <typename Stub>
  CpuKernelRegistrar(Stub& stub, CpuCapability c, typename Stub::Fn fn) {
    stub.table[static_cast<int>(c)] = fn;
  }
};

#define EMBEDOPS_DECLARE_CPU_STUB(stub, signature) extern ::embedops::CpuKernelStub<signature> stub
#define EMBEDOPS_DEFINE_CPU_STUB(stub, signature) ::embedops::CpuKernelStub<signature> stub(#stub)

}  // namespace embedops

// In a kernel file (compiled per level): EMBEDOPS_REGISTER_CPU_KERNEL(stub, fn) at namespace scope,
// fn a function of this level's namespace.
#if defined(CPU_CAPABILITY)
#if defined(CPU_CAPABILITY_AVX512)
#define EMBEDOPS_THIS_CPU_CAPABILITY ::embedops::CpuCapability::kAvx512
#elif defined(CPU_CAPABILITY_AVX2)
#define EMBEDOPS_THIS_CPU_CAPABILITY ::embedops::CpuCapability::kAvx2
#else
#define EMBEDOPS_THIS_CPU_CAPABILITY ::embedops::CpuCapability::kDefault
#endif
#define EMBEDOPS_CONCAT_INNER(a, b) a##b
#define EMBEDOPS_CONCAT(a, b) EMBEDOPS_CONCAT_INNER(a, b)
#define EMBEDOPS_REGISTER_CPU_KERNEL(stub, fn)                                                       \
  static ::embedops::CpuKernelRegistrar EMBEDOPS_CONCAT(embedops_register_##stub##_, CPU_CAPABILITY)( \
      stub, EMBEDOPS_THIS_CPU_CAPABILITY, fn)
#endif

#pragma once
// One host function per op, one kernel per backend and CPU level (ATen's DispatchStub scheme).
//
// The op's host function (csrc/<family>/<op>.cpp, compiled once) checks the arguments, makes the
// operands the layout the kernels read, allocates the outputs and calls the op's KernelStub with
// the device type of its inputs; it is registered for CPU and, in a CUDA build, for CUDA. Each
// backend only fills preallocated outputs:
//   - csrc/<family>/cpu/*.cpp, compiled once per CPU level, register with
//     EMBEDOPS_REGISTER_CPU_KERNEL(stub, fn); the stub runs the level chosen at load
//     (common/cpu_capability.h), or the best lower level compiled;
//   - csrc/<family>/cuda/*.cu register with EMBEDOPS_REGISTER_CUDA_KERNEL(stub, fn).
// A stub is constant-initialised (null pointers), so the registrars may run in any
// static-initialisation order.

#include <c10/core/DeviceType.h>
#include <c10/util/Exception.h>

#include <utility>

#include "common/cpu_capability.h"

namespace embedops {

template <typename Fn>
struct KernelStub;

template <typename R, typename... Args>
struct KernelStub<R(Args...)> {
  using Fn = R (*)(Args...);
  const char* name;
  Fn cpu[kNumCpuCapabilities] = {};
  Fn cuda = nullptr;

  constexpr explicit KernelStub(const char* n) : name(n) {}

  Fn kernel(c10::DeviceType device) const {
    if (device == c10::DeviceType::CPU) {
      for (int c = static_cast<int>(cpu_capability()); c >= 0; --c)
        if (cpu[c] != nullptr) return cpu[c];
      TORCH_CHECK(false, "embedops: no CPU kernel was compiled for ", name);
    }
    if (device == c10::DeviceType::CUDA && cuda != nullptr) return cuda;
    TORCH_CHECK(false, "embedops: no ", c10::DeviceTypeName(device), " kernel for ", name, " in this build");
  }
  template <typename... A>
  R operator()(c10::DeviceType device, A&&... args) const {
    return kernel(device)(std::forward<A>(args)...);
  }
};

struct KernelRegistrar {
  template <typename Stub>
  KernelRegistrar(Stub& stub, CpuCapability c, typename Stub::Fn fn) {
    stub.cpu[static_cast<int>(c)] = fn;
  }
  template <typename Stub>
  KernelRegistrar(Stub& stub, typename Stub::Fn fn) {
    stub.cuda = fn;
  }
};

}  // namespace embedops

#define EMBEDOPS_DECLARE_STUB(stub, signature) extern ::embedops::KernelStub<signature> stub
#define EMBEDOPS_DEFINE_STUB(stub, signature) ::embedops::KernelStub<signature> stub(#stub)

// In a host file: EMBEDOPS_HOST_OPS(register_fn), register_fn(torch::Library&) calling m.impl for
// the file's ops, registers them for CPU and, in a CUDA build, for CUDA (one function for both).
#if defined(EMBEDOPS_WITH_CUDA)
#define EMBEDOPS_HOST_OPS(register_fn)                     \
  TORCH_LIBRARY_IMPL(embedops, CPU, m) { register_fn(m); } \
  TORCH_LIBRARY_IMPL(embedops, CUDA, m) { register_fn(m); }
#else
#define EMBEDOPS_HOST_OPS(register_fn) \
  TORCH_LIBRARY_IMPL(embedops, CPU, m) { register_fn(m); }
#endif

#define EMBEDOPS_CONCAT_INNER(a, b) a##b
#define EMBEDOPS_CONCAT(a, b) EMBEDOPS_CONCAT_INNER(a, b)

// In a .cu file, at namespace scope: fn fills the outputs the host function allocated.
#define EMBEDOPS_REGISTER_CUDA_KERNEL(stub, fn) \
  static ::embedops::KernelRegistrar EMBEDOPS_CONCAT(embedops_register_cuda_, stub)(stub, fn)

// In a CPU kernel file (compiled per level), at namespace scope: fn a function of this level's
// namespace.
#if defined(CPU_CAPABILITY)
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX512_EMULATED)
#define EMBEDOPS_THIS_CPU_CAPABILITY ::embedops::CpuCapability::kAvx512
#elif defined(CPU_CAPABILITY_AVX2)
#define EMBEDOPS_THIS_CPU_CAPABILITY ::embedops::CpuCapability::kAvx2
#else
#define EMBEDOPS_THIS_CPU_CAPABILITY ::embedops::CpuCapability::kDefault
#endif
#define EMBEDOPS_REGISTER_CPU_KERNEL(stub, fn)                                                    \
  static ::embedops::KernelRegistrar EMBEDOPS_CONCAT(embedops_register_##stub##_, CPU_CAPABILITY)( \
      stub, EMBEDOPS_THIS_CPU_CAPABILITY, fn)
#endif

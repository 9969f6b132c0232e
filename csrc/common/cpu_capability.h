#pragma once
// CPU levels: the kernel files under csrc/<family>/cpu/ are compiled once per level, each level in
// its own namespace (embedops::CPU_CAPABILITY, ATen's scheme), and register their entry points in
// a KernelStub (common/kernel_stub.h). The stub runs the kernel of the level chosen at load:
//   - the best compiled level this CPU supports (cpuid: avx512 = x86-64-v4, avx2 = x86-64-v3), or
//   - EMBEDOPS_CPU_CAPABILITY=default|avx2|avx512 (an unknown value, or a level this CPU or this
//     build lacks, is an error naming the variable, never SIGILL), else
//   - ATEN_CPU_CAPABILITY when it names a level (capped at what the CPU supports, as torch does).

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

}  // namespace embedops

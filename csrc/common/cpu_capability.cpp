// CPU level detection and the EMBEDOPS_CPU_CAPABILITY override (compiled once, baseline ISA).

#include "common/cpu_capability.h"

#include <c10/util/Exception.h>

#include <cstdlib>
#include <cstring>
#include <mutex>
#include <optional>
#include <sstream>

namespace embedops {

namespace {

constexpr const char* kNames[kNumCpuCapabilities] = {"default", "avx2", "avx512"};

// EMBEDOPS_CPU_LEVELS: the levels CMake compiled, as a bit mask (bit c = CpuCapability c).
#ifndef EMBEDOPS_CPU_LEVELS
#define EMBEDOPS_CPU_LEVELS 1
#endif

bool compiled(int c) { return (EMBEDOPS_CPU_LEVELS >> c) & 1; }

// What this CPU (and its OS: __builtin_cpu_supports checks that the vector state is enabled) runs.
bool cpu_supports(int c) {
  if (c == 0) return true;
#if defined(__x86_64__) && defined(__GNUC__)
  __builtin_cpu_init();
  if (c == static_cast<int>(CpuCapability::kAvx2)) return __builtin_cpu_supports("x86-64-v3");
#ifdef EMBEDOPS_EMULATE_AVX512
  // the test build's avx512 level is AVX2 code (CMake EMBEDOPS_EMULATE_AVX512)
  if (c == static_cast<int>(CpuCapability::kAvx512)) return __builtin_cpu_supports("x86-64-v3");
#else
  if (c == static_cast<int>(CpuCapability::kAvx512)) return __builtin_cpu_supports("x86-64-v4");
#endif
#endif
  return false;
}

std::string join(const std::vector<std::string>& v) {
  std::ostringstream s;
  for (size_t i = 0; i < v.size(); ++i) s << (i ? ", " : "") << v[i];
  return s.str();
}

std::optional<int> parse(const char* value) {
  for (int c = 0; c < kNumCpuCapabilities; ++c)
    if (std::strcmp(value, kNames[c]) == 0) return c;
  return std::nullopt;
}

int best_level() {
  int best = 0;
  for (int c = 0; c < kNumCpuCapabilities; ++c)
    if (compiled(c) && cpu_supports(c)) best = c;
  return best;
}

// The level to use, or an error message (EMBEDOPS_CPU_CAPABILITY wrong for this CPU / build).
struct Choice {
  int level = 0;
  std::string error;
};

Choice choose() {
  Choice ch;
  ch.level = best_level();
  if (const char* e = std::getenv("EMBEDOPS_CPU_CAPABILITY"); e != nullptr && *e != '\0') {
    const std::optional<int> c = parse(e);
    std::ostringstream msg;
    if (!c) {
      msg << "embedops: EMBEDOPS_CPU_CAPABILITY='" << e << "' is not a CPU level; use one of default, avx2, avx512 "
          << "(this CPU supports " << join(supported_cpu_capabilities()) << ")";
    } else if (!cpu_supports(*c)) {
      msg << "embedops: EMBEDOPS_CPU_CAPABILITY='" << e << "' but this CPU does not support " << e
          << "; it supports " << join(supported_cpu_capabilities());
    } else if (!compiled(*c)) {
      msg << "embedops: EMBEDOPS_CPU_CAPABILITY='" << e << "' but this build has no " << e
          << " kernels; compiled levels: " << join(compiled_cpu_capabilities())
          << " (rebuild with -C cmake.define.EMBEDOPS_CPU_CAPABILITIES=...)";
    } else {
      ch.level = *c;
    }
    ch.error = msg.str();
    return ch;
  }
  if (const char* a = std::getenv("ATEN_CPU_CAPABILITY"); a != nullptr && *a != '\0') {
    // torch's own variable: honoured when it names one of our levels (avx512_* and amx mean avx512),
    // capped at the best level this CPU and build have, as torch caps it.
    std::optional<int> c = parse(a);
    if (!c && (std::strncmp(a, "avx512", 6) == 0 || std::strcmp(a, "amx") == 0))
      c = static_cast<int>(CpuCapability::kAvx512);
    if (c && *c < ch.level) {
      while (*c > 0 && !compiled(*c)) --*c;
      ch.level = *c;
    }
  }
  return ch;
}

}  // namespace

const char* cpu_capability_name(CpuCapability c) { return kNames[static_cast<int>(c)]; }

CpuCapability cpu_capability() {
  static const Choice ch = choose();
  TORCH_CHECK_VALUE(ch.error.empty(), ch.error);
  return static_cast<CpuCapability>(ch.level);
}

std::vector<std::string> compiled_cpu_capabilities() {
  std::vector<std::string> v;
  for (int c = 0; c < kNumCpuCapabilities; ++c)
    if (compiled(c)) v.emplace_back(kNames[c]);
  return v;
}

std::vector<std::string> supported_cpu_capabilities() {
  std::vector<std::string> v;
  for (int c = 0; c < kNumCpuCapabilities; ++c)
    if (cpu_supports(c)) v.emplace_back(kNames[c]);
  return v;
}

}  // namespace embedops

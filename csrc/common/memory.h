#pragma once
// Fresh large outputs. glibc serves an allocation above its mmap threshold (at most 32 MB) with a
// new mapping, so an op that returns a large tensor page-faults all of it in 4 KB pages on every
// call (measured here: ~0.3-0.7 ms per MB, more than writing the data). Asking for transparent
// huge pages on the tensor's 2 MB-aligned interior before the kernel first touches it makes
// those faults several times cheaper. Advice only: the data and the result never change.
// Where the kernel compacts memory synchronously on such faults (THP defrag "madvise"), a
// fragmented machine can make them slower instead: EMBEDOPS_HUGE_PAGES=0 turns the advice off.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace embedops {

// Host memory [ptr, ptr + bytes); a no-op below 8 MB.
inline void advise_huge_pages(uintptr_t ptr, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  static const bool enabled = [] {
    const char* e = std::getenv("EMBEDOPS_HUGE_PAGES");
    return e == nullptr || std::strcmp(e, "0") != 0;
  }();
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  if (!enabled || ptr == 0 || bytes < 4 * kHuge) return;
  const uintptr_t b = (ptr + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t e = (ptr + bytes) & ~(kHuge - 1);
  if (e > b) (void)madvise(reinterpret_cast<void*>(b), e - b, MADV_HUGEPAGE);
#else
  (void)ptr;
  (void)bytes;
#endif
}

inline void advise_huge_pages(const at::Tensor& t) {
  if (t.is_cpu()) advise_huge_pages(reinterpret_cast<uintptr_t>(t.data_ptr()), t.nbytes());
}

// at::empty / at::zeros for outputs that may be large: the advice comes before the first touch.
inline at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor t = at::empty(sizes, options);
  advise_huge_pages(t);
  return t;
}

inline at::Tensor zeros_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor t = empty_output(sizes, options);
  t.zero_();
  return t;
}

}  // namespace embedops

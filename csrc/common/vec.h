#pragma once
// The vector layer of the CPU kernels: GCC/Clang vector types as wide as one register of the level
// the including file is compiled for (16 floats on avx512, 8 on avx2, 4 on the default level's
// SSE2 / NEON), and the few operations the kernels need beyond + - * and lane-wise compares
// (which the vector types have natively). Register blocking reads kRegisters: 32 zmm on avx512,
// 16 ymm / xmm below.
//
// Only for the per-level kernel files (csrc/<family>/cpu/): everything here lives in the level's
// namespace, so the three compilations never share a symbol. Code written on these types stays in
// registers when the vector is one register wide (a 64-byte type on AVX2 is lowered through the
// stack: the reason this layer exists). Checked with objdump -d on the hot loops of each level.

#ifndef CPU_CAPABILITY
#error "common/vec.h is for the kernel files compiled once per CPU level (csrc/<family>/cpu/)"
#endif

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>

#if defined(__SSE2__)
#include <immintrin.h>
#endif

// The vector width follows the compiled ISA. A test build (CMake EMBEDOPS_EMULATE_AVX512) compiles
// the avx512 level for AVX2 with EMBEDOPS_VEC_BYTES=64 and EMBEDOPS_VEC_REGISTERS=32 given: the
// avx512 level's lane counts and register blocking on a CPU without AVX-512 (GCC splits each
// 64-byte operation into two 32-byte ones). The intrinsic branches below are taken only where the
// width is the ISA's own (EMBEDOPS_VEC_AVX512 / _AVX2 / _SSE2); otherwise the generic code runs.
#ifndef EMBEDOPS_VEC_BYTES
#if defined(__AVX512F__)
#define EMBEDOPS_VEC_BYTES 64
#elif defined(__AVX2__)
#define EMBEDOPS_VEC_BYTES 32
#else
#define EMBEDOPS_VEC_BYTES 16
#endif
#endif
#if EMBEDOPS_VEC_BYTES == 64 && defined(__AVX512F__)
#define EMBEDOPS_VEC_AVX512 1
#elif EMBEDOPS_VEC_BYTES == 32 && defined(__AVX2__)
#define EMBEDOPS_VEC_AVX2 1
#elif EMBEDOPS_VEC_BYTES == 16 && defined(__SSE2__)
#define EMBEDOPS_VEC_SSE2 1
#endif

namespace embedops {
namespace CPU_CAPABILITY {
namespace vec {

constexpr int kBytes = EMBEDOPS_VEC_BYTES;
constexpr int kFloats = kBytes / 4;
constexpr int kDoubles = kBytes / 8;
#if defined(EMBEDOPS_VEC_REGISTERS)
constexpr int kRegisters = EMBEDOPS_VEC_REGISTERS;
#elif defined(__AVX512F__)
constexpr int kRegisters = 32;
#else
constexpr int kRegisters = 16;
#endif

typedef float vfloat __attribute__((vector_size(EMBEDOPS_VEC_BYTES)));
typedef int32_t vint __attribute__((vector_size(EMBEDOPS_VEC_BYTES)));
typedef double vdouble __attribute__((vector_size(EMBEDOPS_VEC_BYTES)));

// Prefetches the cache lines of [p, p + bytes) into every cache level (a hint: no fault, no effect
// on results). For rows read with a large stride or far ahead of use, which the hardware prefetchers
// follow poorly.
inline void prefetch(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(c + off, 0, 3);
}

template <typename T>
struct Of;
template <>
struct Of<float> {
  using type = vfloat;
};
template <>
struct Of<double> {
  using type = vdouble;
};
// the register-wide vector of T, and its lane count
template <typename T>
using vec_t = typename Of<T>::type;
template <typename T>
constexpr int kLanes = kBytes / static_cast<int>(sizeof(T));

template <typename T>
inline vec_t<T> loadu(const T* p) {
  vec_t<T> v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
template <typename T>
inline void storeu(T* p, vec_t<T> v) {
  std::memcpy(p, &v, sizeof(v));
}

// kFloats int8 / uint8 codes at p as float lanes: vpmovsxbd / vpmovzxbd + vcvtdq2ps on AVX2 /
// AVX-512, SSE2 unpacks (sign-extended by arithmetic shifts) on the default level. Intrinsics:
// GCC lowers __builtin_convertvector of a byte vector to byte-by-byte extracts (seen in objdump).
template <typename C>
inline vfloat load_codes(const C* p) {
  static_assert(std::is_same_v<C, int8_t> || std::is_same_v<C, uint8_t>, "int8 or uint8 codes");
  [[maybe_unused]] constexpr bool kSigned = std::is_same_v<C, int8_t>;
#if defined(EMBEDOPS_VEC_AVX512)
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m512 x = _mm512_cvtepi32_ps(kSigned ? _mm512_cvtepi8_epi32(b) : _mm512_cvtepu8_epi32(b));
#elif defined(EMBEDOPS_VEC_AVX2)
  const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  const __m256 x = _mm256_cvtepi32_ps(kSigned ? _mm256_cvtepi8_epi32(b) : _mm256_cvtepu8_epi32(b));
#elif defined(EMBEDOPS_VEC_SSE2)
  int32_t four;
  std::memcpy(&four, p, sizeof(four));
  const __m128i b = _mm_cvtsi32_si128(four);
  __m128i w;
  if constexpr (kSigned) {
    const __m128i h = _mm_srai_epi16(_mm_unpacklo_epi8(b, b), 8);  // bytes -> int16
    w = _mm_srai_epi32(_mm_unpacklo_epi16(h, h), 16);               // int16 -> int32
  } else {
    const __m128i zero = _mm_setzero_si128();
    w = _mm_unpacklo_epi16(_mm_unpacklo_epi8(b, zero), zero);
  }
  const __m128 x = _mm_cvtepi32_ps(w);
#else
  vfloat x;
  for (int i = 0; i < kFloats; ++i) x[i] = static_cast<float>(p[i]);
#endif
  vfloat f;
  static_assert(sizeof(x) == sizeof(f), "one register of codes");
  std::memcpy(&f, &x, sizeof(f));
  return f;
}
// A brace list of N copies: GCC emits one broadcast (a lane-by-lane loop can become N inserts;
// and not vfloat{} + x: adding +0.0 is not an identity for -0.0, so that costs an add per splat).
namespace detail {
template <typename T, size_t... I>
inline vec_t<T> splat_list(T x, std::index_sequence<I...>) {
  return vec_t<T>{((void)I, x)...};
}
}  // namespace detail
template <typename T>
inline vec_t<T> splat(T x) {
  return detail::splat_list<T>(x, std::make_index_sequence<kLanes<T>>{});
}
inline vfloat splat(float x) { return splat<float>(x); }

// x[0:n] (n <= kFloats) in a vector, zeros past n; never reads past x[n - 1].
inline vfloat load_partial(const float* x, int64_t n) {
  if (n >= kFloats) return loadu(x);
  vfloat v = {};
  if (n > 0) std::memcpy(&v, x, static_cast<size_t>(n) * sizeof(float));
  return v;
}

// lanes 0, 1, 2, ...
inline vint lane_index() {
  vint v;
#pragma GCC unroll 16
  for (int i = 0; i < kFloats; ++i) v[i] = i;
  return v;
}

inline vfloat max(vfloat a, vfloat b) { return a > b ? a : b; }

// ---- horizontal reductions: a shuffle tree down to 4 lanes, then scalar ---------------------
namespace detail {
template <typename V, int... I>
inline auto half_lo(V v, std::integer_sequence<int, I...>) {
  return __builtin_shufflevector(v, v, I...);
}
template <typename V, int... I>
inline auto half_hi(V v, std::integer_sequence<int, I...>) {
  return __builtin_shufflevector(v, v, (I + static_cast<int>(sizeof...(I)))...);
}
template <typename V>
constexpr int lanes_of() {
  return static_cast<int>(sizeof(V) / sizeof(decltype(std::declval<V>()[0])));
}
}  // namespace detail

template <typename V>
inline auto hsum(V v) {
  constexpr int n = detail::lanes_of<V>();
  if constexpr (n == 2) {
    return v[0] + v[1];
  } else if constexpr (n == 4) {
    return (v[0] + v[2]) + (v[1] + v[3]);
  } else {
    using Seq = std::make_integer_sequence<int, n / 2>;
    return hsum(detail::half_lo(v, Seq{}) + detail::half_hi(v, Seq{}));
  }
}

template <typename V>
inline auto hmax(V v) {
  constexpr int n = detail::lanes_of<V>();
  if constexpr (n == 4) {
    return std::max(std::max(v[0], v[2]), std::max(v[1], v[3]));
  } else {
    using Seq = std::make_integer_sequence<int, n / 2>;
    const auto a = detail::half_lo(v, Seq{}), b = detail::half_hi(v, Seq{});
    return hmax(a > b ? a : b);
  }
}

// True if some lane of the compare mask is set.
inline bool any(vint mask) {
  int32_t lanes[kFloats];
  std::memcpy(lanes, &mask, sizeof(mask));
  int32_t a = 0;
#pragma GCC unroll 16
  for (int i = 0; i < kFloats; ++i) a |= lanes[i];
  return a != 0;
}

// ---- exp --------------------------------------------------------------------------------------
// exp(x) for float: 2^n * p(r) with r = x - n ln2 in [-ln2/2, ln2/2] and a degree-6 Taylor
// polynomial (relative error ~2e-7); x below -87 (2^-126) gives 0. The scalar exp_f32 below and
// the vector exp compute the same formula.
inline float exp_f32(float x) {
  const float xc = std::min(std::max(x, -87.0f), 88.0f);
  const float n = std::floor(xc * 1.44269504088896341f + 0.5f);
  const float r = xc - n * 0.693145751953125f - n * 1.42860682030941723212e-6f;
  float p = 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t e = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &e, sizeof(scale));
  return x < -87.0f ? 0.0f : p * scale;
}

// (round-to-nearest by the 1.5 * 2^23 trick)
inline vfloat exp(vfloat x) {
  const vfloat lo = splat(-87.0f), hi = splat(88.0f), magic = splat(12582912.0f);
  vfloat xc = x < lo ? lo : x;
  xc = xc > hi ? hi : xc;
  const vfloat n = (xc * 1.44269504088896341f + magic) - magic;
  const vfloat r = xc - n * 0.693145751953125f - n * 1.42860682030941723212e-6f;
  vfloat p = splat(1.0f / 720.0f);
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const vint e = (__builtin_convertvector(n, vint) + 127) << 23;
  vfloat pow2n;
  std::memcpy(&pow2n, &e, sizeof(pow2n));
  const vfloat res = p * pow2n;
  return x < lo ? vfloat{} : res;
}

// 1 / sqrt(x) lane by lane, correctly rounded (a divide of the square root: the same bits as the
// scalar 1.f / std::sqrt(x)).
inline vfloat inv_sqrt(vfloat x) {
  vfloat r;
#if defined(EMBEDOPS_VEC_AVX512)
  __m512 s;
  std::memcpy(&s, &x, sizeof(s));
  const __m512 v = _mm512_div_ps(_mm512_set1_ps(1.f), _mm512_sqrt_ps(s));
  std::memcpy(&r, &v, sizeof(r));
#elif defined(EMBEDOPS_VEC_AVX2)
  __m256 s;
  std::memcpy(&s, &x, sizeof(s));
  const __m256 v = _mm256_div_ps(_mm256_set1_ps(1.f), _mm256_sqrt_ps(s));
  std::memcpy(&r, &v, sizeof(r));
#elif defined(EMBEDOPS_VEC_SSE2)
  __m128 s;
  std::memcpy(&s, &x, sizeof(s));
  const __m128 v = _mm_div_ps(_mm_set1_ps(1.f), _mm_sqrt_ps(s));
  std::memcpy(&r, &v, sizeof(r));
#else
  for (int i = 0; i < kFloats; ++i) r[i] = 1.f / std::sqrt(x[i]);
#endif
  return r;
}

// ---- streaming (non-temporal) stores ------------------------------------------------------------
// A large output written once skips the read-for-ownership of every line. p aligned to kBytes.
// Pair with stream_fence() before the writes are published to other threads.
inline void store_stream(float* p, vfloat v) {
#if defined(EMBEDOPS_VEC_AVX512)
  __m512 r;
  std::memcpy(&r, &v, sizeof(r));
  _mm512_stream_ps(p, r);
#elif defined(EMBEDOPS_VEC_AVX2)
  __m256 r;
  std::memcpy(&r, &v, sizeof(r));
  _mm256_stream_ps(p, r);
#elif defined(EMBEDOPS_VEC_SSE2)
  __m128 r;
  std::memcpy(&r, &v, sizeof(r));
  _mm_stream_ps(p, r);
#else
  storeu(p, v);
#endif
}

// bytes (a multiple of 64) from src to the 64-byte aligned dst with streaming stores
inline void stream_copy(void* dst, const void* src, int64_t bytes) {
  for (int64_t o = 0; o < bytes; o += kBytes) {
    vfloat v;
    std::memcpy(&v, static_cast<const char*>(src) + o, sizeof(v));
    store_stream(reinterpret_cast<float*>(static_cast<char*>(dst) + o), v);
  }
}

inline void stream_fence() {
#if defined(__SSE2__)
  _mm_sfence();
#endif
}

// ---- kFloats x kFloats transpose, in log2(kFloats) butterfly stages ----------------------------
// Stage b pairs rows i and i + b (i & b == 0) and swaps their off-diagonal b-wide blocks:
//   lo[t] = t % 2b < b ? v_i[t] : v_{i+b}[t - b]      hi[t] = t % 2b < b ? v_i[t + b] : v_{i+b}[t]
namespace detail {
template <int b, int... T>
inline vfloat butterfly_lo(vfloat x, vfloat y, std::integer_sequence<int, T...>) {
  return __builtin_shufflevector(x, y, ((T % (2 * b)) < b ? T : kFloats + T - b)...);
}
template <int b, int... T>
inline vfloat butterfly_hi(vfloat x, vfloat y, std::integer_sequence<int, T...>) {
  return __builtin_shufflevector(x, y, ((T % (2 * b)) < b ? T + b : kFloats + T)...);
}
template <int b>
inline void butterfly_stage(vfloat* v) {
  using Seq = std::make_integer_sequence<int, kFloats>;
#pragma GCC unroll 16
  for (int i = 0; i < kFloats; ++i) {
    if (i & b) continue;
    const vfloat lo = butterfly_lo<b>(v[i], v[i + b], Seq{});
    const vfloat hi = butterfly_hi<b>(v[i], v[i + b], Seq{});
    v[i] = lo;
    v[i + b] = hi;
  }
}
template <int b>
inline void transpose_from(vfloat* v) {
  butterfly_stage<b>(v);
  if constexpr (b > 1) transpose_from<b / 2>(v);
}
}  // namespace detail

// v[r][c] -> v[c][r] for the kFloats vectors v[0..kFloats)
inline void transpose(vfloat* v) { detail::transpose_from<kFloats / 2>(v); }

}  // namespace vec
}  // namespace CPU_CAPABILITY
}  // namespace embedops

#pragma once
// THE hash of the embedding family. One definition, used by the CPU kernels, the CUDA kernels
// and (re-written bit for bit in numpy) by python/embedops/reference.py.
//
//   mix64(z)      = splitmix64's finaliser (Stafford's "Mix13"):
//                     z ^= z >> 30; z *= 0xBF58476D1CE4E5B9; z ^= z >> 27; z *= 0x94D049BB133111EB; z ^= z >> 31
//   salt(s, f, p) = mix64( mix64(s + 0x9E3779B97F4A7C15) XOR (f << 32 | p) )
//   h(v)          = mix64( v XOR salt(s, f, p) )
//   row(v)        = floor( h(v) * R / 2^64 )                     (Lemire's multiply-shift range)
//
// All arithmetic is on unsigned 64-bit integers modulo 2^64. The id v and the seed s are read as
// two's complement (an int32 id is sign-extended first, so int32 -1 and int64 -1 hash alike);
// feature f and probe p are in [0, 2^32); R = num_rows in [1, 2^63).
// For a fixed (s, f, p) the map v -> h is a bijection of the 64-bit integers (mix64 is one), and
// distinct (f, p) under one seed give distinct salts.

#include <c10/macros/Macros.h>

#include <cstdint>

namespace embedops {

constexpr uint64_t kHashGolden = 0x9E3779B97F4A7C15ULL;

// The finaliser on any type with unsigned 64-bit arithmetic: a uint64_t, or (the CPU kernels'
// vectorised hashing) a GCC vector of them, lane by lane.
template <typename U>
C10_HOST_DEVICE inline U mix64_lanes(U z) {
  z ^= z >> 30;
  z *= 0xBF58476D1CE4E5B9ULL;
  z ^= z >> 27;
  z *= 0x94D049BB133111EBULL;
  z ^= z >> 31;
  return z;
}

C10_HOST_DEVICE inline uint64_t mix64(uint64_t z) { return mix64_lanes(z); }

C10_HOST_DEVICE inline uint64_t hash_salt(int64_t seed, uint32_t feature, uint32_t probe) {
  const uint64_t fp = (static_cast<uint64_t>(feature) << 32) | static_cast<uint64_t>(probe);
  return mix64(mix64(static_cast<uint64_t>(seed) + kHashGolden) ^ fp);
}

// High 64 bits of the 128-bit product a * b.
C10_HOST_DEVICE inline uint64_t mulhi64(uint64_t a, uint64_t b) {
#if defined(__CUDA_ARCH__)
  return __umul64hi(a, b);
#else
  return static_cast<uint64_t>((static_cast<unsigned __int128>(a) * b) >> 64);
#endif
}

// Row in [0, num_rows) of id `value` under a salt from hash_salt().
C10_HOST_DEVICE inline int64_t hash_row(int64_t value, uint64_t salt, uint64_t num_rows) {
  return static_cast<int64_t>(mulhi64(mix64(static_cast<uint64_t>(value) ^ salt), num_rows));
}

}  // namespace embedops

#pragma once
// Host-side declarations shared by the matryoshka family's CPU and CUDA files: argument checks
// (device independent, one implementation for both backends).

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <cstdint>
#include <optional>
#include <vector>

namespace embedops {

struct MatryoshkaShape {
  int64_t B = 0;  // queries
  int64_t N = 0;  // corpus rows
  int64_t D = 0;  // full dimension
  std::vector<int64_t> dims;  // strictly ascending prefix sizes in [1, D]
  bool cosine = true;
};

// queries (B, D), corpus (N, D): same float dtype and device; dims strictly ascending in [1, D];
// metric "cosine" or "dot". Raises ValueError/TypeError naming `op` and the argument.
MatryoshkaShape check_matryoshka_args(const char* op, const at::Tensor& queries, const at::Tensor& corpus,
                                      at::IntArrayRef dims, c10::string_view metric);

// k in [0, N].
void check_topk_k(const char* op, int64_t k, int64_t N);

// Optional precomputed corpus inverse norms: shape (rows, N), dtype float64 for a float64 corpus
// else float32, on the corpus' device.
void check_inv_norms(const char* op, const std::optional<at::Tensor>& inv_norms, int64_t rows, int64_t N,
                     const at::Tensor& corpus);

// int8 / uint8 codes of sentence-transformers' quantize_embeddings ("int8" = "uint8" - 128) and
// the (2, D) per-dimension ranges [min; max] they were made with: returns `dequant` (2, D) in the
// compute type of `queries` on their device, row 0 base, row 1 step, so that a code c stands for
// base + step * c (the midpoint of its step: min + (c + offset + 0.5) * step, step = (max - min) / 255,
// offset 128 for int8, 0 for uint8). ranges: floating point, finite, max >= min.
at::Tensor code_dequant(const char* op, const at::Tensor& ranges, int64_t D, at::ScalarType code_dtype,
                        const at::Tensor& queries);

// funnel stages: ks non-increasing, ks[0] <= N, one k per dim.
void check_funnel_ks(const char* op, at::IntArrayRef dims, at::IntArrayRef ks, int64_t N);

// Packed binary codes (sentence-transformers' "ubinary" uint8 or "binary" int8 = ubinary - 128;
// bit i of a vector is bit 7 - i % 8 of byte i / 8): queries (B, nbytes), corpus (N, nbytes) rows,
// or blocked (P, N, piece_bytes) with P * piece_bytes = nbytes (piece p of every row holds its
// bytes [p * piece_bytes, (p + 1) * piece_bytes): segment-major storage, so that a bit prefix reads
// contiguous memory). Byte j of corpus row r lies at
//   (j / piece_bytes) * piece_stride + r * row_stride + j % piece_bytes
// (rows: piece_bytes = nbytes, piece_stride = 0). Blocked pieces are whole 64-bit words, so a word
// never straddles two pieces.
struct HammingShape {
  int64_t B = 0, N = 0, nbytes = 0;
  int64_t nbits = 0;  // the compared prefix: the first nbits bits of every code
  int64_t row_stride = 0, piece_bytes = 0, piece_stride = 0;
  int64_t byte_offset(int64_t j) const { return (j / piece_bytes) * piece_stride + j % piece_bytes; }
};

// The compared prefix as 64-bit little-endian words, the rule both backends use: nw words, the
// last one read with last_bytes bytes (never past a row) and masked to the prefix's bytes and bits
// (bit i is bit 7 - i % 8 of byte i / 8, so a partial last byte keeps its high bits).
struct HammingWords {
  int64_t nw = 0, last_bytes = 8;
  uint64_t last_mask = ~uint64_t(0);
};
HammingWords hamming_words(const HammingShape& s);

// Same dtype (uint8 or int8), device and code length; nbits in [1, 8 * nbytes] (-1: all bits);
// k in [0, N]; the corpus (N, nbytes) or blocked (P, N, piece_bytes), bytes of unit stride (the
// host makes them so). Fills the layout fields for `corpus` as it will be passed to the kernel.
HammingShape check_hamming_args(const char* op, const at::Tensor& queries, const at::Tensor& corpus, int64_t k,
                                int64_t nbits);

// corpus rows must have unit stride along D; returns corpus or a contiguous copy.
at::Tensor rows_unit_stride(const at::Tensor& corpus);

// The dtype scores are computed and returned in: float64 for float64 inputs, else float32.
inline at::ScalarType acc_dtype_of(at::ScalarType s) { return s == at::kDouble ? at::kDouble : at::kFloat; }

}  // namespace embedops

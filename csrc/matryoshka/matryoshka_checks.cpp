// Argument checks of the matryoshka ops, shared by the CPU and CUDA kernels.

#include <ATen/core/Tensor.h>
#include <ATen/TensorOperators.h>
#include <ATen/ops/stack.h>

#include <algorithm>

#include "common/checks.h"
#include "matryoshka/matryoshka.h"

namespace embedops {

MatryoshkaShape check_matryoshka_args(const char* op, const at::Tensor& queries, const at::Tensor& corpus,
                                      at::IntArrayRef dims, c10::string_view metric) {
  check_dim(op, "queries", queries, 2, "(B, D)");
  check_dim(op, "corpus", corpus, 2, "(N, D)");
  check_float_dtype(op, "queries", queries);
  check_float_dtype(op, "corpus", corpus);
  check_same_dtype(op, "corpus", corpus, "queries", queries);
  check_same_device(op, "corpus", corpus, "queries", queries);
  check_size(op, "corpus", corpus, 1, queries.size(1), "the dimension D of queries");
  TORCH_CHECK_VALUE(metric == "cosine" || metric == "dot", op, ": metric must be \"cosine\" or \"dot\", got \"",
                    metric, "\"");
  MatryoshkaShape s;
  s.B = queries.size(0);
  s.N = corpus.size(0);
  s.D = queries.size(1);
  s.cosine = metric == "cosine";
  TORCH_CHECK_VALUE(!dims.empty(), op, ": dims must be a non-empty list of prefix sizes, got []");
  for (size_t i = 0; i < dims.size(); ++i) {
    TORCH_CHECK_VALUE(dims[i] >= 1 && dims[i] <= s.D, op, ": dims must be in [1, D=", s.D, "], got dims[", i,
                      "] = ", dims[i], " (dims ", dims, ")");
    TORCH_CHECK_VALUE(i == 0 || dims[i] > dims[i - 1], op, ": dims must be strictly ascending, got ", dims);
  }
  s.dims.assign(dims.begin(), dims.end());
  return s;
}

void check_topk_k(const char* op, int64_t k, int64_t N) {
  TORCH_CHECK_VALUE(k >= 0, op, ": k must be >= 0, got ", k);
  TORCH_CHECK_VALUE(k <= N, op, ": k must be <= the number of corpus rows N=", N, ", got k=", k);
}

void check_inv_norms(const char* op, const std::optional<at::Tensor>& inv_norms, int64_t rows, int64_t N,
                     const at::Tensor& corpus) {
  if (!inv_norms.has_value()) return;
  const at::Tensor& t = *inv_norms;
  const at::ScalarType want = acc_dtype_of(corpus.scalar_type());
  TORCH_CHECK_TYPE(t.scalar_type() == want, op, ": corpus_inv_norms must have dtype ", want, ", got ",
                   t.scalar_type());
  check_same_device(op, "corpus_inv_norms", t, "corpus", corpus);
  TORCH_CHECK_VALUE(t.dim() == 2 && t.size(0) == rows && t.size(1) == N, op,
                    ": corpus_inv_norms must have shape (", rows, ", ", N, "), got ", t.sizes());
}

void check_funnel_ks(const char* op, at::IntArrayRef dims, at::IntArrayRef ks, int64_t N) {
  TORCH_CHECK_VALUE(ks.size() == dims.size(), op, ": ks must have one k per stage dim (", dims.size(),
                    "), got ", ks.size());
  for (size_t i = 0; i < ks.size(); ++i) {
    TORCH_CHECK_VALUE(ks[i] >= 0, op, ": ks must be >= 0, got ks[", i, "] = ", ks[i]);
    TORCH_CHECK_VALUE(i > 0 || ks[i] <= N, op, ": the first stage keeps ks[0]=", ks[0],
                      " rows, more than the corpus has (N=", N, ")");
    TORCH_CHECK_VALUE(i == 0 || ks[i] <= ks[i - 1], op,
                      ": ks must be non-increasing (a stage reranks the previous stage's survivors), got ", ks);
  }
}

at::Tensor code_dequant(const char* op, const at::Tensor& ranges, int64_t D, at::ScalarType code_dtype,
                        const at::Tensor& queries) {
  check_dim(op, "ranges", ranges, 2, "(2, D)");
  check_float_dtype(op, "ranges", ranges);
  check_same_device(op, "ranges", ranges, "queries", queries);
  TORCH_CHECK_VALUE(ranges.size(0) == 2 && ranges.size(1) == D, op, ": ranges must have shape (2, D=", D,
                    ") (per-dimension min and max rows), got ", ranges.sizes());
  // float32 arithmetic for the step, as the quantisation (sentence-transformers, numpy float32) does
  const at::Tensor r = ranges.to(at::kFloat);
  TORCH_CHECK_VALUE(r.isfinite().all().item<bool>(), op, ": ranges must be finite");
  TORCH_CHECK_VALUE((r[1] >= r[0]).all().item<bool>(), op, ": ranges must have max >= min in every dimension");
  const at::Tensor step = (r[1] - r[0]) / 255;
  const double offset = code_dtype == at::kChar ? 128.5 : 0.5;
  const at::Tensor base = r[0] + step * offset;
  return at::stack({base, step}).to(acc_dtype_of(queries.scalar_type())).contiguous();
}

at::Tensor rows_unit_stride(const at::Tensor& corpus) {
  if (corpus.size(0) > 1 && corpus.stride(1) == 1 && corpus.stride(0) >= corpus.size(1)) return corpus;
  return corpus.contiguous();
}

HammingWords hamming_words(const HammingShape& s) {
  HammingWords h;
  const int64_t used = (s.nbits + 7) / 8;  // bytes holding the prefix
  h.nw = (used + 7) / 8;
  h.last_bytes = std::min<int64_t>(8, s.nbytes - 8 * (h.nw - 1));
  const int64_t in_last = used - 8 * (h.nw - 1);
  h.last_mask = 0;
  for (int64_t j = 0; j < in_last; ++j) h.last_mask |= uint64_t(0xFF) << (8 * j);
  if (s.nbits % 8 != 0) {  // the partial last byte: its high nbits % 8 bits
    const uint64_t partial = static_cast<uint8_t>(0xFF << (8 - s.nbits % 8));
    h.last_mask &= ~(uint64_t(0xFF) << (8 * (in_last - 1)));
    h.last_mask |= partial << (8 * (in_last - 1));
  }
  return h;
}

HammingShape check_hamming_args(const char* op, const at::Tensor& queries, const at::Tensor& corpus, int64_t k,
                                int64_t nbits) {
  check_dim(op, "query_codes", queries, 2, "(B, nbytes)");
  TORCH_CHECK_VALUE(corpus.dim() == 2 || corpus.dim() == 3, op,
                    ": corpus_codes must have 2 dims (N, nbytes) or 3 (P, N, piece_bytes: blocked), got ",
                    corpus.dim());
  TORCH_CHECK_TYPE(queries.scalar_type() == at::kByte || queries.scalar_type() == at::kChar, op,
                   ": query_codes must be packed bits as uint8 (\"ubinary\") or int8 (\"binary\"), got ",
                   queries.scalar_type());
  check_same_dtype(op, "corpus_codes", corpus, "query_codes", queries);
  check_same_device(op, "corpus_codes", corpus, "query_codes", queries);
  HammingShape s;
  s.B = queries.size(0);
  s.nbytes = queries.size(1);
  if (corpus.dim() == 2) {
    check_size(op, "corpus_codes", corpus, 1, queries.size(1), "the code length nbytes of query_codes");
    s.N = corpus.size(0);
    s.row_stride = s.nbytes;
    s.piece_bytes = s.nbytes;
  } else {
    const int64_t P = corpus.size(0), pb = corpus.size(2);
    TORCH_CHECK_VALUE(pb >= 8 && pb % 8 == 0, op, ": blocked corpus_codes (P, N, piece_bytes) need pieces of whole ",
                      "64-bit words (piece_bytes a multiple of 8), got piece_bytes = ", pb);
    TORCH_CHECK_VALUE(P * pb == s.nbytes, op, ": blocked corpus_codes (P=", P, ", N, piece_bytes=", pb, ") hold ",
                      P * pb, " bytes per code, query_codes ", s.nbytes);
    s.N = corpus.size(1);
    s.piece_bytes = pb;
    s.row_stride = corpus.stride(1);
    s.piece_stride = corpus.stride(0);
  }
  TORCH_CHECK_VALUE(s.nbytes >= 1, op, ": codes must have at least one byte, got nbytes = 0");
  s.nbits = nbits < 0 ? 8 * s.nbytes : nbits;
  TORCH_CHECK_VALUE(nbits == -1 || (nbits >= 1 && nbits <= 8 * s.nbytes), op, ": nbits must be in [1, 8 * nbytes = ",
                    8 * s.nbytes, "] (or None for all bits), got ", nbits);
  check_topk_k(op, k, s.N);
  return s;
}

}  // namespace embedops

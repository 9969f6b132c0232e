// matryoshka_topk and matryoshka_funnel (plain corpus or column blocks: the index's storage), the
// CUDA kernels; the host side, shared with the CPU, is topk.cpp.
//
// topk: the corpus is processed in chunks of T rows (B*T bounded, so extra memory is
// O(P*B*S*k + B*T), never B x N). Per chunk the raw dot products of all prefixes are accumulated
// segment by segment into R (B x T) with cuBLAS (ATen addmm), and after segment p a selection
// kernel offers R's scores (cosine rule applied on the fly) to a running top-k per
// (prefix, query, slice): grid (S slices, B queries), one block each, the block top-k of
// select.cuh in shared memory. Small B gets many slices so the GPU stays busy. A final
// kernel merges the S partial lists of each (prefix, query). k <= 1024 on CUDA. A corpus in column
// blocks is gathered chunk by chunk into one row-major tile (one extra pass over the chunk).
//
// funnel: stage 0 is the topk above; then one block per query extends its survivors' dot products
// (one warp per survivor reads only the new segment of the row), rescores, and keeps the best of
// each stage by a bitonic sort in shared memory. ks[0] <= 1024 (512 for float64), at most 32
// stages on CUDA. Column blocks are read in place (at most 32 blocks).
//
// hamming_topk: grid (S slices, B queries), each block popcounts its slice's codes against one
// query and keeps a block top-k of -distance; the same merge kernel as topk.

#include <ATen/OpMathType.h>
#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <limits>
#include <tuple>

#include "common/dispatch.h"
#include "matryoshka/matryoshka.h"
#include "matryoshka/matryoshka_kernels.h"
#include "matryoshka/cuda/select.cuh"
#include "matryoshka/topk.h"

namespace embedops {

void launch_inv_norms(const at::Tensor& x, int64_t ld, int64_t rows, const std::vector<int64_t>& dims,
                      const at::Tensor& out, int64_t out_offset, int64_t out_ld);
mat::DimList make_dim_list(const char* op, const std::vector<int64_t>& dims);

namespace {

constexpr int64_t kMaxKCuda = 1024;

template <typename acc_t>
__global__ void fill_sentinel_kernel(acc_t* __restrict__ s, int64_t* __restrict__ id, int64_t n) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    s[i] = mat::sentinel_score<acc_t>();
    id[i] = mat::kSentinelIndex;
  }
}

// grid (S, B): block (slice, b) offers columns [slice*chunk, ...) of R's row b (prefix p) to the
// running top-k state[p, b, slice, :].
template <typename acc_t, int KP>
__global__ void __launch_bounds__(mat::kThreads) select_tile_kernel(
    const acc_t* __restrict__ R, int64_t ldr, int64_t nt, int64_t n0, int64_t B, int64_t p, int k, bool cosine,
    const acc_t* __restrict__ qinv, const acc_t* __restrict__ xinv, acc_t* __restrict__ state_s,
    int64_t* __restrict__ state_i) {
  __shared__ mat::BlockTopK<acc_t, KP> t;
  const int64_t S = gridDim.x, slice = blockIdx.x, b = blockIdx.y;
  const int64_t chunk = (nt + S - 1) / S;
  const int64_t begin = std::min(nt, slice * chunk), end = std::min(nt, begin + chunk);
  acc_t* ss = state_s + ((p * B + b) * S + slice) * k;
  int64_t* si = state_i + ((p * B + b) * S + slice) * k;
  if (begin >= end) return;  // uniform per block
  mat::block_topk_load(t, ss, si, k);
  const acc_t* r = R + b * ldr;
  const acc_t iq = cosine ? qinv[p * B + b] : acc_t(1);
  mat::block_topk_offer(t, k, begin, end, [&](int64_t n, acc_t& sc, int64_t& ix) {
    const acc_t d = r[n];
    sc = cosine ? mat::cosine_from_dot(d, iq, xinv[n]) : d;
    ix = n0 + n;
  });
  mat::block_topk_finish(t);
  for (int i = threadIdx.x; i < k; i += blockDim.x) {
    ss[i] = t.s[i];
    si[i] = t.id[i];
  }
}

// grid (B, P): merges the S partial lists of (p, b) into the sorted output.
template <typename acc_t, int KP>
__global__ void __launch_bounds__(mat::kThreads) merge_slices_kernel(
    const acc_t* __restrict__ state_s, const int64_t* __restrict__ state_i, int64_t B, int64_t S, int k,
    acc_t* __restrict__ values, int64_t* __restrict__ indices) {
  __shared__ mat::BlockTopK<acc_t, KP> t;
  const int64_t b = blockIdx.x, p = blockIdx.y;
  const acc_t* ss = state_s + (p * B + b) * S * k;
  const int64_t* si = state_i + (p * B + b) * S * k;
  mat::block_topk_load(t, ss, si, 0);
  mat::block_topk_offer(t, k, 0, S * k, [&](int64_t n, acc_t& sc, int64_t& ix) {
    sc = ss[n];
    ix = si[n];
  });
  mat::block_topk_finish(t);
  for (int i = threadIdx.x; i < k; i += blockDim.x) {
    values[(p * B + b) * k + i] = t.s[i];
    indices[(p * B + b) * k + i] = t.id[i];
  }
}

int sm_count(int device) {
  int n = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device));
  return std::max(n, 1);
}

// Rows [n0, n0 + nt), columns [0, dmax) of the corpus in the compute type: a view of a single
// block already in that type, else one copy.
at::Tensor corpus_tile(const std::vector<at::Tensor>& blocks, int64_t n0, int64_t nt, int64_t dmax,
                       at::ScalarType acc) {
  if (blocks.size() == 1) {
    at::Tensor t = blocks[0].narrow(0, n0, nt).narrow(1, 0, dmax);
    return t.scalar_type() == acc ? t : t.to(acc);
  }
  std::vector<at::Tensor> parts;
  for (int64_t c = 0; const at::Tensor& blk : blocks) {
    if (c >= dmax) break;
    const int64_t w = std::min(blk.size(1), dmax - c);
    parts.push_back(blk.narrow(0, n0, nt).narrow(1, 0, w));
    c += w;
  }
  return at::cat(parts, 1).to(acc);
}

void matryoshka_topk_cuda(const at::Tensor& q, const std::vector<at::Tensor>& blocks, const MatryoshkaShape& s,
                          int64_t k, const at::Tensor& given_inv, const at::Tensor& dequant, at::Tensor& values,
                          at::Tensor& indices) {
  constexpr const char* op = "matryoshka_topk";
  const c10::cuda::CUDAGuard guard(q.device());
  TORCH_CHECK_VALUE(k <= kMaxKCuda, op, ": k must be <= ", kMaxKCuda, " on CUDA, got ", k,
                    " (use the CPU, or several calls over corpus shards)");
  make_dim_list(op, s.dims);
  const at::ScalarType acc = q.scalar_type();
  const int64_t P = static_cast<int64_t>(s.dims.size()), B = s.B, N = s.N;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t dmax = s.dims.back();
  const auto acc_opts = q.options();
  const bool copies = blocks.size() > 1 || blocks[0].scalar_type() != acc;
  at::Tensor dq_base, dq_step;  // codes: the tile is dequantised as base + step * code
  if (dequant.defined()) {
    dq_base = dequant[0].narrow(0, 0, dmax);
    dq_step = dequant[1].narrow(0, 0, dmax);
  }

  at::Tensor qinv = at::empty({P, B}, acc_opts);
  if (s.cosine) launch_inv_norms(q, q.stride(0), B, s.dims, qinv, 0, B);

  // chunk width: B*T <= 2^24 scores, and a bounded converted copy for low-precision corpora
  int64_t T = std::max<int64_t>(1024, (int64_t{1} << 24) / B);
  if (copies) T = std::min<int64_t>(T, std::max<int64_t>(1024, (int64_t{1} << 25) / dmax));
  T = std::min(T, N);
  const int sms = sm_count(q.get_device());
  int64_t S = std::max<int64_t>(1, (2 * sms + B - 1) / B);
  S = std::min<int64_t>({S, 64, std::max<int64_t>(1, T / 2048)});
  TORCH_CHECK(B <= 65535, op, ": at most 65535 queries per call on CUDA, got ", B);

  at::Tensor state_s = at::empty({P, B, S, k}, acc_opts);
  at::Tensor state_i = at::empty({P, B, S, k}, acc_opts.dtype(at::kLong));
  at::Tensor R = at::empty({B, T}, acc_opts);
  at::Tensor xinv_buf;
  const bool given = s.cosine && given_inv.defined();
  if (s.cosine && !given) xinv_buf = at::empty({P, T}, acc_opts);

  EMBEDOPS_DISPATCH_FLOATING(acc, "matryoshka_topk_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    {
      const int64_t n = state_s.numel();
      fill_sentinel_kernel<acc_t><<<static_cast<unsigned>(std::min<int64_t>((n + 255) / 256, 4096)), 256, 0, stream>>>(
          state_s.data_ptr<acc_t>(), state_i.data_ptr<int64_t>(), n);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    mat::dispatch_kp(k, [&](auto kp) {
      constexpr int KP = decltype(kp)::value;
      for (int64_t n0 = 0; n0 < N; n0 += T) {
        const int64_t nt = std::min(T, N - n0);
        at::Tensor xc = corpus_tile(blocks, n0, nt, dmax, acc);
        if (dequant.defined()) xc = dq_base.addcmul(xc, dq_step);  // (dmax,) broadcast over the rows
        const acc_t* xinv = nullptr;
        int64_t xinv_ld = 0;
        if (s.cosine) {
          if (given) {
            xinv = given_inv.const_data_ptr<acc_t>() + n0;
            xinv_ld = N;
          } else {
            launch_inv_norms(xc, xc.stride(0), nt, s.dims, xinv_buf, 0, T);
            xinv = xinv_buf.const_data_ptr<acc_t>();
            xinv_ld = T;
          }
        }
        at::Tensor Rt = R.narrow(1, 0, nt);
        int64_t a = 0;
        for (int64_t p = 0; p < P; ++p) {
          const int64_t e = s.dims[p];
          Rt.addmm_(q.narrow(1, a, e - a), xc.narrow(1, a, e - a).t(), p == 0 ? 0 : 1, 1);
          a = e;
          const dim3 grid(static_cast<unsigned>(S), static_cast<unsigned>(B));
          select_tile_kernel<acc_t, KP><<<grid, mat::kThreads, 0, stream>>>(
              R.const_data_ptr<acc_t>(), T, nt, n0, B, p, static_cast<int>(k), s.cosine,
              qinv.const_data_ptr<acc_t>(), xinv ? xinv + p * xinv_ld : nullptr, state_s.data_ptr<acc_t>(),
              state_i.data_ptr<int64_t>());
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        }
      }
      const dim3 grid(static_cast<unsigned>(B), static_cast<unsigned>(P));
      merge_slices_kernel<acc_t, KP><<<grid, mat::kThreads, 0, stream>>>(
          state_s.const_data_ptr<acc_t>(), state_i.const_data_ptr<int64_t>(), B, S, static_cast<int>(k),
          values.data_ptr<acc_t>(), indices.data_ptr<int64_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

// ---- hamming_topk -------------------------------------------------------------------------------

// 8 bytes of a code: one load when rows are 8-byte aligned, else byte by byte
__device__ __forceinline__ uint64_t code_word(const uint8_t* p, bool aligned) {
  if (aligned) return *reinterpret_cast<const uint64_t*>(p);
  uint64_t w = 0;
#pragma unroll
  for (int j = 0; j < 8; ++j) w |= static_cast<uint64_t>(p[j]) << (8 * j);
  return w;
}

struct HammingPrefix {
  int64_t nbytes, nw, last_bytes;  // code length; prefix words; bytes of the last word inside a code
  uint64_t last_mask;              // the last word's prefix bits (hamming_words, matryoshka.h)
  int64_t row_stride, piece_bytes, piece_stride;  // the corpus layout (HammingShape, matryoshka.h)
  bool aligned;
};

// q: a query's code (contiguous); x: the start of a corpus row (its first piece)
__device__ __forceinline__ int hamming_distance(const uint8_t* q, const uint8_t* x, const HammingPrefix& h) {
  int d = 0;
  int64_t in_piece = 0;  // byte offset inside the current piece of the row (a word never straddles two)
  for (int64_t w = 0; w + 1 < h.nw; ++w) {
    d += __popcll(code_word(q + 8 * w, h.aligned) ^ code_word(x + in_piece, h.aligned));
    in_piece += 8;
    if (in_piece == h.piece_bytes) {  // blocked corpus: the next piece (rows: never before the last word)
      in_piece = 0;
      x += h.piece_stride;
    }
  }
  uint64_t ql = 0, xl = 0;
  const uint8_t* qe = q + 8 * (h.nw - 1);
  const uint8_t* xe = x + in_piece;
  for (int64_t j = 0; j < h.last_bytes; ++j) {
    ql |= static_cast<uint64_t>(qe[j]) << (8 * j);
    xl |= static_cast<uint64_t>(xe[j]) << (8 * j);
  }
  return d + __popcll((ql ^ xl) & h.last_mask);
}

// grid (S, B): block (slice, b) keeps the k nearest rows of its slice (score = -distance, exact in
// float for distances < 2^24, so the ranking is the top-k order: nearest first, ties to the lower
// index) in state[b, slice, :].
template <int KP>
__global__ void __launch_bounds__(mat::kThreads) hamming_slice_kernel(
    const uint8_t* __restrict__ q, const uint8_t* __restrict__ x, int64_t N, HammingPrefix h, int k,
    float* __restrict__ state_s, int64_t* __restrict__ state_i) {
  __shared__ mat::BlockTopK<float, KP> t;
  const int64_t S = gridDim.x, slice = blockIdx.x, b = blockIdx.y;
  const int64_t chunk = (N + S - 1) / S;
  const int64_t begin = std::min(N, slice * chunk), end = std::min(N, begin + chunk);
  float* ss = state_s + (b * S + slice) * k;
  int64_t* si = state_i + (b * S + slice) * k;
  if (begin >= end) return;  // uniform per block; the state keeps its sentinels
  mat::block_topk_load(t, ss, si, k);
  const uint8_t* qb = q + b * h.nbytes;
  mat::block_topk_offer(t, k, begin, end, [&](int64_t n, float& sc, int64_t& ix) {
    sc = -static_cast<float>(hamming_distance(qb, x + n * h.row_stride, h));
    ix = n;
  });
  mat::block_topk_finish(t);
  for (int i = threadIdx.x; i < k; i += blockDim.x) {
    ss[i] = t.s[i];
    si[i] = t.id[i];
  }
}

void hamming_topk_cuda(const at::Tensor& queries, const at::Tensor& corpus, const HammingShape& s, int64_t k,
                       at::Tensor& distances, at::Tensor& indices) {
  constexpr const char* op = "hamming_topk";
  const c10::cuda::CUDAGuard guard(queries.device());
  TORCH_CHECK_VALUE(k <= kMaxKCuda, op, ": k must be <= ", kMaxKCuda, " on CUDA, got ", k);
  TORCH_CHECK(s.B <= 65535, op, ": at most 65535 queries per call on CUDA, got ", s.B);
  const HammingWords words = hamming_words(s);
  HammingPrefix h{};
  h.nbytes = s.nbytes;
  h.nw = words.nw;
  h.last_bytes = words.last_bytes;
  h.last_mask = words.last_mask;
  h.row_stride = s.row_stride;
  h.piece_bytes = s.piece_bytes;
  h.piece_stride = s.piece_stride;
  const uint8_t* qp = reinterpret_cast<const uint8_t*>(queries.const_data_ptr());
  const uint8_t* xp = reinterpret_cast<const uint8_t*>(corpus.const_data_ptr());
  h.aligned = s.nbytes % 8 == 0 && s.row_stride % 8 == 0 && s.piece_stride % 8 == 0 &&
              reinterpret_cast<uintptr_t>(qp) % 8 == 0 && reinterpret_cast<uintptr_t>(xp) % 8 == 0;
  const int64_t B = s.B, N = s.N;
  const int sms = sm_count(queries.get_device());
  int64_t S = std::max<int64_t>(1, (2 * sms + B - 1) / B);
  S = std::min<int64_t>({S, 256, std::max<int64_t>(1, N / 2048)});
  const auto fopts = queries.options().dtype(at::kFloat);
  at::Tensor state_s = at::empty({B, S, k}, fopts);
  at::Tensor state_i = at::empty({B, S, k}, fopts.dtype(at::kLong));
  at::Tensor scores = at::empty({B, k}, fopts);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t n = state_s.numel();
  fill_sentinel_kernel<float><<<static_cast<unsigned>(std::min<int64_t>((n + 255) / 256, 4096)), 256, 0, stream>>>(
      state_s.data_ptr<float>(), state_i.data_ptr<int64_t>(), n);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  mat::dispatch_kp(k, [&](auto kp) {
    constexpr int KP = decltype(kp)::value;
    const dim3 grid(static_cast<unsigned>(S), static_cast<unsigned>(B));
    hamming_slice_kernel<KP><<<grid, mat::kThreads, 0, stream>>>(qp, xp, N, h, static_cast<int>(k),
                                                                 state_s.data_ptr<float>(), state_i.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    merge_slices_kernel<float, KP><<<dim3(static_cast<unsigned>(B), 1), mat::kThreads, 0, stream>>>(
        state_s.const_data_ptr<float>(), state_i.const_data_ptr<int64_t>(), B, S, static_cast<int>(k),
        scores.data_ptr<float>(), indices.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  distances.copy_(scores.neg());
}

// ---- funnel ------------------------------------------------------------------------------------

template <typename acc_t, int KP>
struct FunnelSmem {
  acc_t dot[KP], sq[KP], score[KP], dot2[KP], sq2[KP];
  int64_t idx[KP];
  acc_t key_s[KP];
  int64_t key_i[KP];
  int slot[KP];
  acc_t qinv[mat::kMaxDimsCuda];
};

// One block per query. v0/i0: stage-0 top ks[0] (scores at dims[0], best first).
template <typename scalar_t, typename acc_t, int KP>
__global__ void __launch_bounds__(mat::kThreads) funnel_kernel(
    const acc_t* __restrict__ q, int64_t D, mat::ColumnBlocks<scalar_t> x, mat::DimList dims,
    mat::DimList ks, bool cosine, const acc_t* __restrict__ v0, const int64_t* __restrict__ i0,
    acc_t* __restrict__ values, int64_t* __restrict__ indices) {
  __shared__ FunnelSmem<acc_t, KP> m;
  const int64_t b = blockIdx.x;
  const int lane = threadIdx.x & 31, warp = threadIdx.x / 32, nwarps = blockDim.x / 32;
  const acc_t* qb = q + b * D;
  const int k0 = static_cast<int>(ks.d[0]);
  if (threadIdx.x == 0) {  // query inverse norms at every stage prefix
    acc_t qs = 0;
    int64_t a = 0;
    for (int st = 0; st < dims.n; ++st) {
      for (int64_t j = a; j < dims.d[st]; ++j) qs += qb[j] * qb[j];
      m.qinv[st] = mat::inv_norm_from_sq(qs);
      a = dims.d[st];
    }
  }
  __syncthreads();
  // stage 0 survivors: their sums of squares at dims[0], and their raw dots recovered from the scores
  for (int c = warp; c < k0; c += nwarps) {
    const int64_t row = i0[b * k0 + c];
    acc_t sq = 0;
    mat::for_row_columns<acc_t>(x, row, 0, dims.d[0], lane, [&](int64_t, acc_t v) { sq += v * v; });
    sq = warp_sum(sq);
    if (lane == 0) {
      const acc_t sc = v0[b * k0 + c];
      const acc_t ix = mat::inv_norm_from_sq(sq), iq = m.qinv[0];
      m.sq[c] = sq;
      m.idx[c] = row;
      m.score[c] = sc;
      m.dot[c] = !cosine ? sc : (iq == acc_t(0) || ix == acc_t(0)) ? acc_t(0) : sc / (iq * ix);
    }
  }
  __syncthreads();
  int kc = k0;
  for (int st = 1; st < dims.n; ++st) {
    const int64_t a = dims.d[st - 1], e = dims.d[st];
    for (int c = warp; c < kc; c += nwarps) {
      acc_t d = 0, sq = 0;
      mat::for_row_columns<acc_t>(x, m.idx[c], a, e, lane, [&](int64_t j, acc_t v) {
        d += qb[j] * v;
        sq += v * v;
      });
      d = warp_sum(d);
      sq = warp_sum(sq);
      if (lane == 0) {
        const acc_t dot = m.dot[c] + d, s2 = m.sq[c] + sq;
        m.dot[c] = dot;
        m.sq[c] = s2;
        m.score[c] = cosine ? mat::cosine_from_dot(dot, m.qinv[st], mat::inv_norm_from_sq(s2)) : dot;
      }
    }
    __syncthreads();
    for (int i = threadIdx.x; i < KP; i += blockDim.x) {
      m.key_s[i] = i < kc ? m.score[i] : mat::sentinel_score<acc_t>();
      m.key_i[i] = i < kc ? m.idx[i] : mat::kSentinelIndex;
      m.slot[i] = i;
    }
    __syncthreads();
    mat::bitonic_sort<acc_t, true>(m.key_s, m.key_i, m.slot, KP);
    const int kn = static_cast<int>(ks.d[st]);
    for (int i = threadIdx.x; i < kn; i += blockDim.x) {
      m.dot2[i] = m.dot[m.slot[i]];
      m.sq2[i] = m.sq[m.slot[i]];
    }
    __syncthreads();
    for (int i = threadIdx.x; i < kn; i += blockDim.x) {
      m.dot[i] = m.dot2[i];
      m.sq[i] = m.sq2[i];
      m.score[i] = m.key_s[i];
      m.idx[i] = m.key_i[i];
    }
    __syncthreads();
    kc = kn;
  }
  for (int i = threadIdx.x; i < kc; i += blockDim.x) {
    values[b * kc + i] = m.score[i];
    indices[b * kc + i] = m.idx[i];
  }
}

void matryoshka_funnel_rerank_cuda(const at::Tensor& q, const std::vector<at::Tensor>& blocks,
                                   const MatryoshkaShape& s, at::IntArrayRef ks, const at::Tensor& v0,
                                   const at::Tensor& i0, at::Tensor& values, at::Tensor& indices) {
  constexpr const char* op = "matryoshka_funnel";
  const c10::cuda::CUDAGuard guard(q.device());
  TORCH_CHECK_VALUE(ks[0] <= kMaxKCuda, op, ": the first stage's k must be <= ", kMaxKCuda, " on CUDA, got ", ks[0]);
  const mat::DimList dl = make_dim_list(op, s.dims);
  const mat::DimList kl = make_dim_list(op, std::vector<int64_t>(ks.begin(), ks.end()));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  TORCH_CHECK(s.B <= std::numeric_limits<int>::max(), op, ": too many queries");
  EMBEDOPS_DISPATCH_FLOATING(blocks[0].scalar_type(), "matryoshka_funnel_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const mat::ColumnBlocks<scalar_t> x = mat::make_column_blocks<scalar_t>(op, blocks);
    mat::dispatch_kp(ks[0], [&](auto kp) {
      constexpr int KP = decltype(kp)::value;
      if constexpr (sizeof(acc_t) == 8 && KP > 512) {  // shared memory: 48 KiB per block
        TORCH_CHECK_VALUE(false, op, ": the first stage's k must be <= 512 for float64 on CUDA, got ", ks[0]);
      } else {
      funnel_kernel<scalar_t, acc_t, KP><<<static_cast<unsigned>(s.B), mat::kThreads, 0, stream>>>(
          q.const_data_ptr<acc_t>(), s.D, x, dl, kl, s.cosine,
          v0.const_data_ptr<acc_t>(), i0.const_data_ptr<int64_t>(), values.data_ptr<acc_t>(),
          indices.data_ptr<int64_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    });
  });
}

// ---- matryoshka_rescore -------------------------------------------------------------------------
//
// A few candidates per query (the later stages of a compressed funnel): gathered with ATen into a
// (B, C, d) tile, dequantised, scored with one batched GEMV, ranked by three stable sorts (index
// ascending, then score descending with NaN as -inf, then NaN last): the order of topk.h.

// inv_norm_from_sq (topk.h) elementwise
at::Tensor inv_norms_from_sq(const at::Tensor& sq) {
  return sq.rsqrt().masked_fill(sq == 0, 0).masked_fill(~sq.isfinite(), std::numeric_limits<double>::quiet_NaN());
}

void matryoshka_rescore_cuda(const at::Tensor& q, const std::vector<at::Tensor>& blocks, const MatryoshkaShape& s,
                             const at::Tensor& dequant, const at::Tensor& candidates, int64_t k, at::Tensor& values,
                             at::Tensor& indices) {
  const c10::cuda::CUDAGuard guard(q.device());
  const int64_t B = s.B, C = candidates.size(1), d = s.dims[0];
  // candidates sorted by row id first, so that the stable sorts below break score ties to the lower id
  const auto [ids, _] = candidates.sort(/*stable=*/true, 1, /*descending=*/false);
  const at::Tensor flat = ids.reshape({-1});
  std::vector<at::Tensor> parts;
  for (int64_t c = 0; const at::Tensor& blk : blocks) {
    if (c >= d) break;
    const int64_t w = std::min(blk.size(1), d - c);
    parts.push_back(blk.narrow(1, 0, w).index_select(0, flat));
    c += w;
  }
  at::Tensor x = (parts.size() == 1 ? parts[0] : at::cat(parts, 1)).to(q.scalar_type());
  if (dequant.defined()) x = dequant[0].narrow(0, 0, d).addcmul(x, dequant[1].narrow(0, 0, d));
  x = x.view({B, C, d});
  const at::Tensor qd = q.narrow(1, 0, d);
  at::Tensor score = x.bmm(qd.unsqueeze(2)).squeeze(2);  // (B, C)
  if (s.cosine) {
    const at::Tensor ix = inv_norms_from_sq(x.square().sum(2));
    const at::Tensor iq = inv_norms_from_sq(qd.square().sum(1, /*keepdim=*/true));
    score = (score * iq * ix).masked_fill((iq == 0) | (ix == 0), 0);
  }
  const at::Tensor nan = score.isnan();
  const auto [by_score, o1] =
      score.masked_fill(nan, -std::numeric_limits<double>::infinity()).sort(/*stable=*/true, 1, /*descending=*/true);
  const auto [nan_last, o2] = nan.gather(1, o1).to(at::kByte).sort(/*stable=*/true, 1, /*descending=*/false);
  const at::Tensor order = o1.gather(1, o2).narrow(1, 0, k);
  values.copy_(score.gather(1, order));
  indices.copy_(ids.gather(1, order));
}

}  // namespace

EMBEDOPS_REGISTER_CUDA_KERNEL(matryoshka_rescore_stub, &matryoshka_rescore_cuda);
EMBEDOPS_REGISTER_CUDA_KERNEL(matryoshka_topk_stub, &matryoshka_topk_cuda);
EMBEDOPS_REGISTER_CUDA_KERNEL(matryoshka_funnel_rerank_stub, &matryoshka_funnel_rerank_cuda);
EMBEDOPS_REGISTER_CUDA_KERNEL(hamming_topk_stub, &hamming_topk_cuda);

}  // namespace embedops

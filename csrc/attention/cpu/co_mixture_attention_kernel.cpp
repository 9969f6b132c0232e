// co_attention and mixture_attention on the CPU: kernels, compiled once per CPU level (the host
// side, checks and outputs, is ../co_mixture_attention.cpp).
//
// Both reuse the cross_attention tiles (cpu/tiles.h: BLAS GEMM on strided tiles, vector
// exp, per-tile fp16/bf16 conversion) and the online-softmax math of attention.h.
//
// co_attention: one task per (batch, head). Query tiles of x are visited in order; for each, the
// key tiles of y: the affinity tile S = scale * qx ky^T is computed ONCE and feeds
//   - the row softmax (online update over y, as in cross_attention): ox = softmax_y(S) vy,
//   - the column softmax: the tile's column partial state (sum, acc = P^T vx) is merged into
//     the running column state of y by an LSE-combine (rescale by exp(m_old - m_new)); the x tiles
//     are merged in a fixed order, so the result is deterministic.
// The exponent is shared too: while the scores' maxima per row and per column stay within
// kShareRange of the largest score r, E = exp(S - r) is taken once and is both softmaxes'
// numerator (row and column states referenced to r); otherwise per-row and per-column exponents.
// At B4 H8 Lx77 Ly1024 D64 (avx2, Zen 3) this took the forward from 1.14-1.23x two cross_attention
// calls to ~1.36x.
// A short side (<= kShortQMax tokens) against >= 256 runs co_forward_short instead (avx2, avx512:
// kShortQueryPass): the short side in the vector lanes as in short_query.h, each chunk's columns
// finished at once (see there).
// Backward (one task per (batch, head), owns every gradient of it: deterministic): per tile
//   dS = Pr * (dPr - Dr) + Pc * (dPc - Dc), ONE shared dS for dqx and dky.
//
// mixture_attention: one task per (batch, head, query tile); the M contiguous key segments are
// visited in order (one pass over the keys), each with its own online-softmax state; at the end of a
// segment its normalised output is stored (seg_out, used by the backward) and added to the output
// with the row's weight. A short query side (float compute) runs mix_forward_short instead: per
// (batch, head group, query tile), transposed scores, no BLAS. Backward: one task per (batch, kv
// head) like cross_attention's.

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <vector>

#include "attention/attention.h"
#include "attention/co_mixture_attention.h"
#include "attention/attention_kernels.h"
#include "attention/cpu/short_query.h"
#include "attention/cpu/tiles.h"
#include "common/checks.h"
#include "common/dispatch.h"

namespace embedops {
namespace CPU_CAPABILITY {
namespace {

using namespace attn_cpu;

// ---- small vector helpers on score tiles ------------------------------------------------------

// y[j] = exp(x[j] - c[j]) for j < n (n a multiple of kVec for float); x = -inf gives 0.
template <typename T>
void exp_sub_cols(const T* x, const T* c, T* y, int64_t n) {
  int64_t j = 0;
  if constexpr (std::is_same_v<T, float>) {
    for (; j + kVec <= n; j += kVec) vec::storeu(y + j, vec::exp(vec::loadu(x + j) - vec::loadu(c + j)));
  }
  for (; j < n; ++j) y[j] = exp_any(x[j] - c[j]);
}

// Row max of x[0, n) returned; colmax[j] = max(colmax[j], x[j]) (n a multiple of kVec for float).
template <typename T>
T row_col_max(const T* x, T* colmax, int64_t n) {
  T mx = attn::neg_inf<T>();
  int64_t j = 0;
  if constexpr (std::is_same_v<T, float>) {
    vf m = vec::splat(mx);
    for (; j + kVec <= n; j += kVec) {
      const vf y = vec::loadu(x + j);
      m = vec::max(y, m);
      vec::storeu(colmax + j, vec::max(y, vec::loadu(colmax + j)));
    }
    mx = vec::hmax(m);
  }
  for (; j < n; ++j) {
    mx = std::max(mx, x[j]);
    colmax[j] = std::max(colmax[j], x[j]);
  }
  return mx;
}

// co_attention's shared exponent: a tile whose row and column maxima so far all lie within
// kShareRange of the task's largest score r takes ONE exp pass, E = exp(S - r), for both softmaxes.
// Then every score within 47 of its row's (column's) max gives E >= exp(-87), a normal float with
// full relative precision (vec::exp flushes below -87 to 0), and the scores further down weigh
// < e^-47 of the max. Otherwise the tile takes the two exponent passes (row maxima, column maxima).
template <typename T>
constexpr T kShareRange = std::is_same_v<T, float> ? T(40) : T(600);

// Query tile height: short query sides (text ~77 tokens) in ONE tile when there are enough
// (batch, head) tasks for the threads: each key tile is then read once, and (co_attention) the
// column state of y is built in one sweep; otherwise the cross_attention heuristic.
int64_t short_side_block_q(int64_t max_k, int64_t max_q, int64_t tasks) {
  if (max_q <= 256 && tasks >= 2 * at::get_num_threads()) return std::max<int64_t>(8, (max_q + 7) / 8 * 8);
  return block_q_for(max_k, max_q);
}

// Keys per tile for a range of n keys: at most kBlockK, evened out over the tiles it needs
// (1024 keys -> 512 + 512, not 816 + 208). A multiple of 16.
int64_t even_block_k(int64_t n, int64_t block_k) {
  const int64_t tiles = std::max<int64_t>(1, (n + block_k - 1) / block_k);
  return std::min(block_k, ((n + tiles - 1) / tiles + 15) / 16 * 16);
}

// ---- co_attention -----------------------------------------------------------------------------

// A co_attention task's rows without a partner (past their length, or all of them when one side is
// empty): output 0, lse -inf. False when nothing is left to compute.
template <typename in_t, typename T>
bool co_clear_invalid(const Rows<in_t>& OX, const Rows<in_t>& OY, T* lx, T* ly, int64_t b, int64_t h, int64_t xl,
                      int64_t yl, int64_t Lx, int64_t Ly, int64_t Dvx, int64_t Dvy) {
  const int64_t x_valid = yl == 0 ? 0 : xl, y_valid = xl == 0 ? 0 : yl;
  for (int64_t i = x_valid; i < Lx; ++i) {
    std::fill(OX.at(b, i, h), OX.at(b, i, h) + Dvy, in_t(0));
    lx[i] = attn::neg_inf<T>();
  }
  for (int64_t j = y_valid; j < Ly; ++j) {
    std::fill(OY.at(b, j, h), OY.at(b, j, h) + Dvx, in_t(0));
    ly[j] = attn::neg_inf<T>();
  }
  return x_valid > 0 && y_valid > 0;
}

template <typename in_t, typename T>
void co_forward_kernel(const Rows<const in_t>& QX, const Rows<const in_t>& KY, const Rows<const in_t>& VX,
                       const Rows<const in_t>& VY, const Rows<in_t>& OX, const Rows<in_t>& OY, T* lse_x, T* lse_y,
                       const CoDesc& cd, int64_t B, int64_t H, int64_t Lx, int64_t Ly, int64_t D, int64_t Dvx,
                       int64_t Dvy, T scale) {
  constexpr bool kConvert = !std::is_same_v<in_t, T>;
  const int64_t kBlockQ = short_side_block_q(Ly, Lx, B * H);
  const int64_t kBlockK = block_k_for(kBlockQ);
  const int64_t ly_pad = padded_len(std::max<int64_t>(Ly, 1));
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> S(kBlockQ * kBlockK), Pc(kBlockQ * kBlockK), accr(kBlockQ * Dvy), m(kBlockQ), l(kBlockQ);
    std::vector<T> cm(ly_pad), cl(Ly), accc(Ly * Dvx), cmv(kBlockK), calpha(kBlockK), tmax(kBlockK);
    std::vector<T> rmax(kBlockQ), rtrue(kBlockQ), ctrue(Ly);
    std::vector<T> qbuf(kConvert ? kBlockQ * D : 0), vxbuf(kConvert ? kBlockQ * Dvx : 0);
    std::vector<T> kall(kConvert ? Ly * D : 0), vyall(kConvert ? Ly * Dvy : 0);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t h = t % H, b = t / H;
      const int64_t xl = cd.xlen[b], yl = cd.ylen[b];
      T* lx = lse_x + (b * H + h) * Lx;
      T* ly = lse_y + (b * H + h) * Ly;
      if (!co_clear_invalid(OX, OY, lx, ly, b, h, xl, yl, Lx, Ly, Dvx, Dvy)) continue;
      int64_t ldk, ldvy, ldq, ldvx;
      const T* k_all = tile(KY.at(b, 0, h), KY.sl, yl, D, kall.data(), &ldk);
      const T* vy_all = tile(VY.at(b, 0, h), VY.sl, yl, Dvy, vyall.data(), &ldvy);
      std::fill(cm.begin(), cm.begin() + yl, attn::neg_inf<T>());
      std::fill(cl.begin(), cl.begin() + yl, T(0));
      std::fill(accc.begin(), accc.begin() + yl * Dvx, T(0));
      std::fill(ctrue.begin(), ctrue.begin() + yl, attn::neg_inf<T>());
      T r_run = attn::neg_inf<T>();  // the largest score of the task so far
      const int64_t bk = even_block_k(yl, kBlockK);
      for (int64_t i0 = 0; i0 < xl; i0 += kBlockQ) {
        const int64_t qn = std::min(kBlockQ, xl - i0);
        const T* qptr = tile(QX.at(b, i0, h), QX.sl, qn, D, qbuf.data(), &ldq);
        const T* vxptr = tile(VX.at(b, i0, h), VX.sl, qn, Dvx, vxbuf.data(), &ldvx);
        std::fill(m.begin(), m.begin() + qn, attn::neg_inf<T>());
        std::fill(l.begin(), l.begin() + qn, T(0));
        std::fill(accr.begin(), accr.begin() + qn * Dvy, T(0));
        std::fill(rtrue.begin(), rtrue.begin() + qn, attn::neg_inf<T>());
        for (int64_t j0 = 0; j0 < yl; j0 += bk) {
          const int64_t kn = std::min(bk, yl - j0);
          const int64_t lds = padded_len(kn);
          const T* kptr = k_all + j0 * ldk;
          const T* vyptr = vy_all + j0 * ldvy;
          // the shared affinity tile S (qn x kn) = scale * qx ky^T, computed once
          gemm(TransposeType::Transpose, TransposeType::NoTranspose, kn, qn, D, scale, kptr, ldk, qptr, ldq, T(0),
               S.data(), lds);
          for (int64_t r = 0; r < qn; ++r) std::fill(S.data() + r * lds + kn, S.data() + (r + 1) * lds, attn::neg_inf<T>());
          // the tile's row maxima (rmax) and column maxima (tmax) in one sweep; the running true
          // maxima of the rows of this x tile and of the columns decide the exponent below
          std::fill(tmax.begin(), tmax.begin() + lds, attn::neg_inf<T>());
          for (int64_t r = 0; r < qn; ++r) rmax[r] = row_col_max(S.data() + r * lds, tmax.data(), lds);
          const T r_new = attn::softmax_new_max(r_run, row_max(tmax.data(), lds));
          r_run = r_new;
          bool shared = true;
          for (int64_t r = 0; r < qn; ++r) {
            rtrue[r] = std::max(rtrue[r], rmax[r]);
            shared &= rtrue[r] >= r_new - kShareRange<T>;
          }
          for (int64_t j = 0; j < kn; ++j) {
            ctrue[j0 + j] = std::max(ctrue[j0 + j], tmax[j]);
            shared &= ctrue[j0 + j] >= r_new - kShareRange<T>;
          }
          if (shared) {
            // ONE exponent for both softmaxes: E = exp(S - r_run), in place, with its row and column
            // sums; every row and column state is moved to the reference r_run (>= all its scores)
            std::fill(tmax.begin(), tmax.begin() + lds, T(0));  // reused as the tile's column sums
            for (int64_t r = 0; r < qn; ++r) {
              const T sum = exp_row<true>(S.data() + r * lds, lds, r_new, tmax.data());
              const T alpha = attn::softmax_rescale(m[r], r_new);
              l[r] = l[r] * alpha + sum;
              m[r] = r_new;
              if (j0 > 0 && alpha != T(1)) {
                T* a = accr.data() + r * Dvy;
#pragma omp simd
                for (int64_t d = 0; d < Dvy; ++d) a[d] *= alpha;
              }
            }
            for (int64_t j = 0; j < kn; ++j) {
              const T alpha = attn::softmax_rescale(cm[j0 + j], r_new);
              cl[j0 + j] = cl[j0 + j] * alpha + tmax[j];
              cm[j0 + j] = r_new;
              if (i0 > 0 && alpha != T(1)) {
                T* a = accc.data() + (j0 + j) * Dvx;
#pragma omp simd
                for (int64_t d = 0; d < Dvx; ++d) a[d] *= alpha;
              }
            }
            // acc_col (kn x Dvx) += E^T vx;  acc_row (qn x Dvy) += E vy
            gemm(TransposeType::NoTranspose, TransposeType::Transpose, Dvx, kn, qn, T(1), vxptr, ldvx, S.data(), lds,
                 T(1), accc.data() + j0 * Dvx, Dvx);
            gemm(TransposeType::NoTranspose, TransposeType::NoTranspose, Dvy, qn, kn, T(1), vyptr, ldvy, S.data(), lds,
                 T(1), accr.data(), Dvy);
            continue;
          }
          // -- scores too far apart for one exponent: the column side's exponent is taken from the
          // columns' own maxima, the row side's from the rows' (cross_attention's update)
          for (int64_t j = 0; j < kn; ++j) {
            const T m_old = cm[j0 + j];
            const T m_new = attn::softmax_new_max(m_old, tmax[j]);
            calpha[j] = attn::softmax_rescale(m_old, m_new);
            cmv[j] = m_new;
            cm[j0 + j] = m_new;
          }
          std::fill(cmv.begin() + kn, cmv.begin() + lds, T(0));  // padding lanes: exp(-inf - 0) = 0
          std::fill(tmax.begin(), tmax.begin() + lds, T(0));     // reused as the tile's column sums
          for (int64_t r = 0; r < qn; ++r) {
            T* pc = Pc.data() + r * lds;
            exp_sub_cols(S.data() + r * lds, cmv.data(), pc, lds);
            T* cs = tmax.data();
#pragma omp simd
            for (int64_t j = 0; j < lds; ++j) cs[j] += pc[j];
          }
          for (int64_t j = 0; j < kn; ++j) {
            cl[j0 + j] = cl[j0 + j] * calpha[j] + tmax[j];
            if (i0 > 0 && calpha[j] != T(1)) {
              T* a = accc.data() + (j0 + j) * Dvx;
#pragma omp simd
              for (int64_t d = 0; d < Dvx; ++d) a[d] *= calpha[j];
            }
          }
          // acc_col (kn x Dvx) += Pc^T vx
          gemm(TransposeType::NoTranspose, TransposeType::Transpose, Dvx, kn, qn, T(1), vxptr, ldvx, Pc.data(), lds,
               T(1), accc.data() + j0 * Dvx, Dvx);
          forward_tile_update(qn, kn, Dvy, S.data(), m.data(), l.data(), accr.data(), vyptr, ldvy, j0 == 0);
        }
        for (int64_t r = 0; r < qn; ++r) {
          store_row(OX.at(b, i0 + r, h), accr.data() + r * Dvy, Dvy, attn::softmax_inv_denominator(l[r]));
          lx[i0 + r] = attn::softmax_lse(m[r], l[r]);
        }
      }
      for (int64_t j = 0; j < yl; ++j) {
        store_row(OY.at(b, j, h), accc.data() + j * Dvx, Dvx, attn::softmax_inv_denominator(cl[j]));
        ly[j] = attn::softmax_lse(cm[j], cl[j]);
      }
    }
  });
}

// ---- co_attention with a short side (float compute): the short-query pass's layout -------------
// The short side (text, <= kShortQMax tokens; x here, the caller swaps the sides when y is the
// short one) sits in the vector lanes, the other side is visited in chunks of kShortQChunk tokens:
// S^T (chunk x short-side lanes) by broadcast-FMA in registers, no BLAS (at B4 H8 Lx77 Ly1024 D64,
// ~1/4 of the tiled kernel's time went to MKL's packing copies). Every x row is in the chunk's
// lanes, so each y column's softmax is complete within its chunk: its max, sum and output
// oy_j = sum_i P[j][i] vx_i are computed and stored there; the x rows take the online step of
// short_query.h. The exponent is shared as in the tiled kernel: while every column's max and every
// row's running max lie within kShareRange of the running max r, ONE exp pass E = exp(S^T - r)
// serves both softmaxes (the rows' states referenced to r).

// oy (kn x dvp) = E (kn rows, stride qp) . vx (xl rows, stride dvp), columns [c0, c0 + W kVec).
// objdump of the avx2 build (W = 2): the inner loop is 2 loads, 6 vbroadcastss and 12 vfmadd231ps
// on 12 accumulators in ymm registers, no stack traffic.
template <int W>
void co_short_column_block(const float* e, int64_t qp, int64_t kn, int64_t xl, const float* vx, int64_t dvp, int64_t c0,
                           float* oy) {
  constexpr int R = short_query_rows(W);
  for (int64_t jb = 0; jb < kn; jb += R) {  // a tail group repeats the last column
    const float* er[R];
#pragma GCC unroll 8
    for (int t = 0; t < R; ++t) er[t] = e + std::min<int64_t>(jb + t, kn - 1) * qp;
    vf acc[R][W];
    zero_acc(acc);
    broadcast_fma(
        xl, acc, [&](int t, int64_t i) { return er[t][i]; },
        [&](int64_t i, int w) { return vec::loadu(vx + i * dvp + c0 + w * kVec); });
    const int64_t nt = std::min<int64_t>(R, kn - jb);
#pragma GCC unroll 8
    for (int t = 0; t < R; ++t)
      if (t < nt)
#pragma GCC unroll 8
        for (int w = 0; w < W; ++w) vec::storeu(oy + (jb + t) * dvp + c0 + w * kVec, acc[t][w]);
  }
}

// the columns' un-normalised outputs of a chunk: oy (kn x dvp) = E vx, register blocks of W
// vectors (avx2 2: 6 x 2 accumulators, avx512 4: 6 x 4), a tail of single vectors
inline void co_short_column_pv(const float* e, int64_t qp, int64_t kn, int64_t xl, const float* vx, int64_t dvp,
                               float* oy) {
  constexpr int W = vec::kRegisters >= 32 ? 4 : 2;
  int64_t c = 0;
  for (; c + W * kVec <= dvp; c += W * kVec) co_short_column_block<W>(e, qp, kn, xl, vx, dvp, c, oy);
  for (; c < dvp; c += kVec) co_short_column_block<1>(e, qp, kn, xl, vx, dvp, c, oy);
}

// The short-side pass takes a side of <= kShortQMax tokens (one register tile: 96 on avx2, 128 on
// avx512; the default level keeps the tiles, see kShortQueryPass) against >= kCoShortMinLong on the
// other side.
constexpr int64_t kCoShortMinLong = 256;
inline bool co_short_side(int64_t l_short, int64_t l_long) {
  return l_short <= kShortQMax && l_long >= kCoShortMinLong;
}

// The running state of co_forward_short's rows: the online softmax (max, sum) per lane, the rows'
// true running maxima and the largest score so far
struct CoShortState {
  ShortQState rows;
  vf rtrue[kShortQMaxVec];
  float r_run;
};

// One chunk of kn <= kShortQChunk long-side tokens (kp: kn x D keys, vp: kn x Dvy values, float rows
// with strides ldk, ldv) against the xl <= NQV kVec short-side rows (qt: D x QP scaled, vx: xl x dvp).
// Out: the chunk's columns, un-normalised oy (kn x dvp), sums cs and exponent references cref (lse
// = cref + log cs); the rows' O^T (ot) and state take their online step. st, ec: kShortQChunk x QP
// scratch. Float only and not inlined: one copy per NQV for every input dtype.
template <int NQV>
[[gnu::noinline]] void co_short_chunk(CoShortState& s, int64_t D, int64_t Dvy, int64_t xl, const float* qt,
                                      const float* kp, int64_t ldk, const float* vp, int64_t ldv, int64_t kn,
                                      const float* vx, int64_t dvp, float* st, float* ec, float* ot, float* oy,
                                      float* cs, float* cref, ShortQPrefetch& pf) {
  constexpr int64_t qp = NQV * kVec;
  const float range = kShareRange<float>;
  // the last vector's lanes that hold rows (the others: zero query, score 0, left out)
  const vec::vint last_valid = vec::lane_index() < static_cast<int32_t>(xl - (NQV - 1) * kVec);
  const vf ninf = vec::splat(attn::neg_inf<float>());
  short_query_groups<NQV>([&](auto q0, auto qw) {
    short_query_scores<NQV, decltype(q0)::value, decltype(qw)::value>(D, qt, kp, ldk, kn, st, pf);
  });
  // one sweep: each column's max (over the valid lanes), each lane's max over the chunk
  vf lane_max[NQV];
  for (int q = 0; q < NQV; ++q) lane_max[q] = ninf;
  float chunk_max = attn::neg_inf<float>();
  for (int64_t j = 0; j < kn; ++j) {
    const float* row = st + j * qp;
    vf cm = ninf;
#pragma GCC unroll 12
    for (int q = 0; q < NQV; ++q) {
      vf x = vec::loadu(row + q * kVec);
      lane_max[q] = vec::max(x, lane_max[q]);
      if (q == NQV - 1) x = last_valid ? x : ninf;
      cm = vec::max(x, cm);
    }
    cref[j] = vec::hmax(cm);
    chunk_max = std::max(chunk_max, cref[j]);
  }
  const float r_new = attn::softmax_new_max(s.r_run, chunk_max);
  bool shared = true;
  const vf lo = vec::splat(r_new - range);
  for (int q = 0; q < NQV; ++q) {
    s.rtrue[q] = vec::max(lane_max[q], s.rtrue[q]);
    vec::vint below = s.rtrue[q] < lo;
    if (q == NQV - 1) below &= last_valid;
    shared &= !vec::any(below);
  }
  for (int64_t j = 0; j < kn; ++j) shared &= cref[j] >= r_new - range;
  // the columns' exponent: E = exp(S^T - r) in place (shared), else exp(S^T - column max) into ec;
  // the column sums over the valid lanes
  float* e = shared ? st : ec;
  vf row_sum[NQV] = {};
  for (int64_t j = 0; j < kn; ++j) {
    const vf ref = vec::splat(shared ? r_new : cref[j]);
    const float* src = st + j * qp;
    float* dst = e + j * qp;
    vf csum{};
#pragma GCC unroll 12
    for (int q = 0; q < NQV; ++q) {
      vf x = vec::exp(vec::loadu(src + q * kVec) - ref);
      if (q == NQV - 1) x = last_valid ? x : vf{};
      vec::storeu(dst + q * kVec, x);
      row_sum[q] += x;
      csum += x;
    }
    cs[j] = vec::hsum(csum);
    if (shared) cref[j] = r_new;
  }
  co_short_column_pv(e, qp, kn, xl, vx, dvp, oy);
  // the rows: with the shared exponent, E already is P^T under the reference r for every row; else
  // the online step of short_query.h on S^T
  vf al_all[NQV];
  if (shared) {
    const vf rv = vec::splat(r_new);
    for (int q = 0; q < NQV; ++q) {
      al_all[q] = vec::exp(s.rows.m[q] - rv);  // m_old = -inf (first chunk): 0
      s.rows.l[q] = s.rows.l[q] * al_all[q] + row_sum[q];
      s.rows.m[q] = rv;
    }
  }
  short_query_groups<NQV>([&](auto q0, auto qw) {
    constexpr int Q0 = decltype(q0)::value, QW = decltype(qw)::value;
    vf al[QW];
    if (shared) {
      for (int q = 0; q < QW; ++q) al[q] = al_all[Q0 + q];
    } else {
      short_query_softmax<NQV, Q0, QW>(s.rows, kn, st, al);
    }
    short_query_pv<NQV, Q0, QW>(al, Dvy, vp, ldv, kn, st, ot, pf);
  });
  s.r_run = r_new;
}

template <typename in_t>
void co_forward_short(const Rows<const in_t>& QX, const Rows<const in_t>& KY, const Rows<const in_t>& VX,
                      const Rows<const in_t>& VY, const Rows<in_t>& OX, const Rows<in_t>& OY, float* lse_x,
                      float* lse_y, const std::vector<int64_t>& xlen, const std::vector<int64_t>& ylen, int64_t B,
                      int64_t H, int64_t Lx, int64_t Ly, int64_t D, int64_t Dvx, int64_t Dvy, float scale) {
  constexpr bool kFloatIn = std::is_same_v<in_t, float>;
  constexpr int64_t QM = kShortQMax, C = kShortQChunk;
  const int64_t dvp = (Dvx + kVec - 1) / kVec * kVec;  // vx rows padded to whole vectors (zeros)
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qt(D * QM), ot(Dvy * QM), st(C * QM), ec(C * QM), vx(QM * dvp), oy(C * dvp),
        kv(kFloatIn ? 0 : C * (D + Dvy)), acc(QM * Dvy), mx(QM), l(QM), cs(C), cref(C);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t h = t % H, b = t / H;
      const int64_t xl = xlen[b], yl = ylen[b];
      float* lx = lse_x + (b * H + h) * Lx;
      float* ly = lse_y + (b * H + h) * Ly;
      if (!co_clear_invalid(OX, OY, lx, ly, b, h, xl, yl, Lx, Ly, Dvx, Dvy)) continue;
      const int nqv = static_cast<int>((xl + kVec - 1) / kVec);
      const auto chunk = short_query_pick(xl, [](auto n) { return &co_short_chunk<decltype(n)::value>; });
      short_query_qt(QX.at(b, 0, h), QX.sl, xl, D, scale, qt.data());
      std::fill(vx.begin(), vx.begin() + xl * dvp, 0.0f);
      for (int64_t i = 0; i < xl; ++i) copy_row_f32(vx.data() + i * dvp, VX.at(b, i, h), Dvx);
      CoShortState s;
      short_query_begin(s.rows, nqv, ot.data(), Dvy);
      for (int q = 0; q < nqv; ++q) s.rtrue[q] = vec::splat(attn::neg_inf<float>());
      s.r_run = attn::neg_inf<float>();
      for (int64_t j0 = 0; j0 < yl; j0 += C) {
        const int64_t kn = std::min(C, yl - j0);
        const float *kp, *vp;
        int64_t ldk, ldv;
        if constexpr (kFloatIn) {
          kp = KY.at(b, j0, h);
          vp = VY.at(b, j0, h);
          ldk = KY.sl;
          ldv = VY.sl;
        } else {
          float* kc = kv.data();
          for (int64_t j = 0; j < kn; ++j) {
            copy_row_f32(kc + j * D, KY.at(b, j0 + j, h), D);
            copy_row_f32(kc + C * D + j * Dvy, VY.at(b, j0 + j, h), Dvy);
          }
          kp = kc;
          vp = kc + C * D;
          ldk = D;
          ldv = Dvy;
        }
        // the next chunk's rows are prefetched, spread over the register-block steps
        ShortQPrefetch pf(KY.at(b, 0, h), KY.sl, D, VY.at(b, 0, h), VY.sl, Dvy, j0 + kn, std::min(j0 + kn + C, yl),
                          short_query_steps(nqv, kn, Dvy));
        chunk(s, D, Dvy, xl, qt.data(), kp, ldk, vp, ldv, kn, vx.data(), dvp, st.data(), ec.data(), ot.data(),
              oy.data(), cs.data(), cref.data(), pf);
        for (int64_t j = 0; j < kn; ++j) {
          store_row(OY.at(b, j0 + j, h), oy.data() + j * dvp, Dvx, attn::softmax_inv_denominator(cs[j]));
          ly[j0 + j] = attn::softmax_lse(cref[j], cs[j]);
        }
      }
      short_query_end(s.rows, xl, Dvy, ot.data(), mx.data(), l.data(), acc.data());
      for (int64_t i = 0; i < xl; ++i) {
        store_row(OX.at(b, i, h), acc.data() + i * Dvy, Dvy, attn::softmax_inv_denominator(l[i]));
        lx[i] = attn::softmax_lse(mx[i], l[i]);
      }
    }
  });
}

template <typename in_t, typename T>
void co_backward_kernel(const Rows<const in_t>& QX, const Rows<const in_t>& KY, const Rows<const in_t>& VX,
                        const Rows<const in_t>& VY, const Rows<const in_t>& OX, const Rows<const in_t>& OY,
                        const Rows<const in_t>& dOX, const Rows<const in_t>& dOY, const T* lse_x, const T* lse_y,
                        const T* dlse_x, const T* dlse_y, const Rows<in_t>& dQX, const Rows<in_t>& dKY,
                        const Rows<in_t>& dVX, const Rows<in_t>& dVY, const CoDesc& cd, int64_t B, int64_t H,
                        int64_t Lx, int64_t Ly, int64_t D, int64_t Dvx, int64_t Dvy, T scale) {
  constexpr bool kConvert = !std::is_same_v<in_t, T>;
  const int64_t kBlockQ = block_q_for(Ly, Lx);
  const int64_t kBlockK = block_k_for(kBlockQ);
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    const int64_t tile_n = kBlockQ * kBlockK;
    std::vector<T> P(tile_n), Pc(tile_n), dP(tile_n), dPc(tile_n), dr(kBlockQ), lr(kBlockQ);
    std::vector<T> dq(kBlockQ * D), dvx(kBlockQ * Dvx), dk(Ly * D), dvy(Ly * Dvy), dc(padded_len(std::max<int64_t>(Ly, 1))),
        lc(padded_len(std::max<int64_t>(Ly, 1)));
    std::vector<T> kall(kConvert ? Ly * D : 0), vyall(kConvert ? Ly * Dvy : 0), doyall(kConvert ? Ly * Dvx : 0);
    std::vector<T> qbuf(kConvert ? kBlockQ * D : 0), vxbuf(kConvert ? kBlockQ * Dvx : 0),
        doxbuf(kConvert ? kBlockQ * Dvy : 0);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t h = t % H, b = t / H;
      const int64_t xl = cd.xlen[b], yl = cd.ylen[b];
      if (xl == 0 || yl == 0) continue;  // nothing attends: every gradient is 0
      const T* lx = lse_x + (b * H + h) * Lx;
      const T* ly = lse_y + (b * H + h) * Ly;
      int64_t ldk, ldvy, lddoy, ldq, ldvx, lddox;
      const T* k_all = tile(KY.at(b, 0, h), KY.sl, yl, D, kall.data(), &ldk);
      const T* vy_all = tile(VY.at(b, 0, h), VY.sl, yl, Dvy, vyall.data(), &ldvy);
      const T* doy_all = tile(dOY.at(b, 0, h), dOY.sl, yl, Dvx, doyall.data(), &lddoy);
      // column deltas Dc_j = doy_j . oy_j - dlse_y
      for (int64_t j = 0; j < yl; ++j) {
        const in_t* o = OY.at(b, j, h);
        const T* g = doy_all + j * lddoy;
        T dot = 0;
#pragma omp simd reduction(+ : dot)
        for (int64_t d = 0; d < Dvx; ++d) dot += static_cast<T>(o[d]) * g[d];
        dc[j] = dot - (dlse_y ? dlse_y[(b * H + h) * Ly + j] : T(0));
        lc[j] = ly[j];
      }
      std::fill(lc.begin() + yl, lc.end(), T(0));  // padding lanes: exp(-inf - 0) = 0
      std::fill(dc.begin() + yl, dc.end(), T(0));
      std::fill(dk.begin(), dk.begin() + yl * D, T(0));
      std::fill(dvy.begin(), dvy.begin() + yl * Dvy, T(0));
      for (int64_t i0 = 0; i0 < xl; i0 += kBlockQ) {
        const int64_t qn = std::min(kBlockQ, xl - i0);
        const T* qptr = tile(QX.at(b, i0, h), QX.sl, qn, D, qbuf.data(), &ldq);
        const T* vxptr = tile(VX.at(b, i0, h), VX.sl, qn, Dvx, vxbuf.data(), &ldvx);
        const T* doxptr = tile(dOX.at(b, i0, h), dOX.sl, qn, Dvy, doxbuf.data(), &lddox);
        for (int64_t r = 0; r < qn; ++r) {
          const in_t* o = OX.at(b, i0 + r, h);
          const T* g = doxptr + r * lddox;
          T dot = 0;
#pragma omp simd reduction(+ : dot)
          for (int64_t d = 0; d < Dvy; ++d) dot += static_cast<T>(o[d]) * g[d];
          dr[r] = dot - (dlse_x ? dlse_x[(b * H + h) * Lx + i0 + r] : T(0));
          lr[r] = lx[i0 + r];
        }
        std::fill(dq.begin(), dq.begin() + qn * D, T(0));
        std::fill(dvx.begin(), dvx.begin() + qn * Dvx, T(0));
        for (int64_t j0 = 0; j0 < yl; j0 += kBlockK) {
          const int64_t kn = std::min(kBlockK, yl - j0);
          const int64_t lds = padded_len(kn);
          const T* kptr = k_all + j0 * ldk;
          const T* vyptr = vy_all + j0 * ldvy;
          const T* doyptr = doy_all + j0 * lddoy;
          gemm(TransposeType::Transpose, TransposeType::NoTranspose, kn, qn, D, scale, kptr, ldk, qptr, ldq, T(0),
               P.data(), lds);
          T* lcv = lc.data() + j0;
          // Pc = exp(S - lse_y[j]) (read before P is overwritten), P = exp(S - lse_x[i])
          for (int64_t r = 0; r < qn; ++r) {
            T* row = P.data() + r * lds;
            T* pc = Pc.data() + r * lds;
            std::fill(row + kn, row + lds, attn::neg_inf<T>());
            exp_sub_cols(row, lcv, pc, lds);  // every valid column has a finite lse_y (xl > 0)
            exp_row(row, lds, lr[r]);
          }
          // dvy (kn x Dvy) += P^T dox;  dvx (qn x Dvx) += Pc doy
          gemm(TransposeType::NoTranspose, TransposeType::Transpose, Dvy, kn, qn, T(1), doxptr, lddox, P.data(), lds,
               T(1), dvy.data() + j0 * Dvy, Dvy);
          gemm(TransposeType::NoTranspose, TransposeType::NoTranspose, Dvx, qn, kn, T(1), doyptr, lddoy, Pc.data(), lds,
               T(1), dvx.data(), Dvx);
          // dP = dox vy^T, dPc = vx doy^T (both qn x kn)
          gemm(TransposeType::Transpose, TransposeType::NoTranspose, kn, qn, Dvy, T(1), vyptr, ldvy, doxptr, lddox,
               T(0), dP.data(), lds);
          gemm(TransposeType::Transpose, TransposeType::NoTranspose, kn, qn, Dvx, T(1), doyptr, lddoy, vxptr, ldvx,
               T(0), dPc.data(), lds);
          // ONE shared dS = P (dP - Dr) + Pc (dPc - Dc)
          const T* dcv = dc.data() + j0;
          for (int64_t r = 0; r < qn; ++r) {
            const T* p = P.data() + r * lds;
            const T* pc = Pc.data() + r * lds;
            const T* dpc = dPc.data() + r * lds;
            T* ds = dP.data() + r * lds;
            const T drr = dr[r];
#pragma omp simd
            for (int64_t j = 0; j < kn; ++j)
              ds[j] = attn::softmax_grad(p[j], ds[j], drr) + attn::softmax_grad(pc[j], dpc[j], dcv[j]);
          }
          gemm(TransposeType::NoTranspose, TransposeType::NoTranspose, D, qn, kn, scale, kptr, ldk, dP.data(), lds,
               T(1), dq.data(), D);
          gemm(TransposeType::NoTranspose, TransposeType::Transpose, D, kn, qn, scale, qptr, ldq, dP.data(), lds, T(1),
               dk.data() + j0 * D, D);
        }
        for (int64_t r = 0; r < qn; ++r) {
          store_row(dQX.at(b, i0 + r, h), dq.data() + r * D, D, T(1));
          store_row(dVX.at(b, i0 + r, h), dvx.data() + r * Dvx, Dvx, T(1));
        }
      }
      for (int64_t j = 0; j < yl; ++j) {
        store_row(dKY.at(b, j, h), dk.data() + j * D, D, T(1));
        store_row(dVY.at(b, j, h), dvy.data() + j * Dvy, Dvy, T(1));
      }
    }
  });
}

void co_attention_forward_cpu_kernel(const at::Tensor& qc, const at::Tensor& kc, const at::Tensor& vxc,
                                     const at::Tensor& vyc, const CoDesc& cd, double sc, at::Tensor& ox,
                                     at::Tensor& oy, at::Tensor& lx, at::Tensor& ly) {
  const int64_t B = qc.size(0), Lx = qc.size(1), H = qc.size(2), Ly = kc.size(1);
  const int64_t D = qc.size(3), Dvx = vxc.size(3), Dvy = vyc.size(3);
  EMBEDOPS_DISPATCH_FLOATING(qc.scalar_type(), "co_attention_cpu", [&] {
    using T = at::opmath_type<scalar_t>;
    if constexpr (kShortQueryPass && std::is_same_v<T, float>) {
      const auto qr = rows_of<const scalar_t>(qc, false), kr = rows_of<const scalar_t>(kc, false);
      const auto vxr = rows_of<const scalar_t>(vxc, false), vyr = rows_of<const scalar_t>(vyc, false);
      const auto oxr = rows_of<scalar_t>(ox, false), oyr = rows_of<scalar_t>(oy, false);
      if (co_short_side(Lx, Ly))
        return co_forward_short<scalar_t>(qr, kr, vxr, vyr, oxr, oyr, lx.data_ptr<float>(), ly.data_ptr<float>(),
                                          cd.xlen, cd.ylen, B, H, Lx, Ly, D, Dvx, Dvy, static_cast<float>(sc));
      if (co_short_side(Ly, Lx))  // y is the short side: the same pass with the sides swapped
        return co_forward_short<scalar_t>(kr, qr, vyr, vxr, oyr, oxr, ly.data_ptr<float>(), lx.data_ptr<float>(),
                                          cd.ylen, cd.xlen, B, H, Ly, Lx, D, Dvy, Dvx, static_cast<float>(sc));
    }
    co_forward_kernel<scalar_t, T>(rows_of<const scalar_t>(qc, false), rows_of<const scalar_t>(kc, false),
                                   rows_of<const scalar_t>(vxc, false), rows_of<const scalar_t>(vyc, false),
                                   rows_of<scalar_t>(ox, false), rows_of<scalar_t>(oy, false), lx.data_ptr<T>(),
                                   ly.data_ptr<T>(), cd, B, H, Lx, Ly, D, Dvx, Dvy, static_cast<T>(sc));
  });
}

void co_attention_backward_cpu_kernel(const at::Tensor& doxc, const at::Tensor& doyc, const at::Tensor& qc,
                                      const at::Tensor& kc, const at::Tensor& vxc, const at::Tensor& vyc,
                                      const at::Tensor& oxc, const at::Tensor& oyc, const at::Tensor& lxc,
                                      const at::Tensor& lyc, const at::Tensor& dlxc, const at::Tensor& dlyc,
                                      const CoDesc& cd, double scale, at::Tensor& dqx, at::Tensor& dky,
                                      at::Tensor& dvx, at::Tensor& dvy) {
  const int64_t B = qc.size(0), Lx = qc.size(1), H = qc.size(2), Ly = kc.size(1);
  const int64_t D = qc.size(3), Dvx = vxc.size(3), Dvy = vyc.size(3);
  EMBEDOPS_DISPATCH_FLOATING(qc.scalar_type(), "co_attention_backward_cpu", [&] {
    using T = at::opmath_type<scalar_t>;
    co_backward_kernel<scalar_t, T>(
        rows_of<const scalar_t>(qc, false), rows_of<const scalar_t>(kc, false), rows_of<const scalar_t>(vxc, false),
        rows_of<const scalar_t>(vyc, false), rows_of<const scalar_t>(oxc, false), rows_of<const scalar_t>(oyc, false),
        rows_of<const scalar_t>(doxc, false), rows_of<const scalar_t>(doyc, false), lxc.const_data_ptr<T>(),
        lyc.const_data_ptr<T>(), dlxc.defined() ? dlxc.const_data_ptr<T>() : nullptr,
        dlyc.defined() ? dlyc.const_data_ptr<T>() : nullptr, rows_of<scalar_t>(dqx, false),
        rows_of<scalar_t>(dky, false), rows_of<scalar_t>(dvx, false), rows_of<scalar_t>(dvy, false), cd, B, H, Lx, Ly,
        D, Dvx, Dvy, static_cast<T>(scale));
  });
}

// ---- mixture_attention ----------------------------------------------------------------------------

// weights element (b, i, h, m): w4 strides (sh = 0 for the (B, Lq, M) layout)
template <typename T>
struct W4 {
  const T* p;
  int64_t sb, si, sh, sm;
  T at(int64_t b, int64_t i, int64_t h, int64_t m) const { return p[b * sb + i * si + h * sh + m * sm]; }
};

// Ends modality m for query rows i0 .. i0 + qn of head h: writes the segment's normalised output
// (seg_row) and lse (lse_at) from the online-softmax state (acc, mx, l), and adds the weighted
// segment output to the rows' running outputs out (qn x Dv). An empty modality has l = 0: its
// segment output is 0, its lse -inf, and it adds 0.
template <typename T, typename Wt, typename SegRow, typename LseAt>
inline void finish_modality(int64_t b, int64_t i0, int64_t h, int64_t m, int64_t qn, int64_t Dv, const T* acc,
                            const T* mx, const T* l, const W4<Wt>& W, const SegRow& seg_row, const LseAt& lse_at,
                            T* out) {
  for (int64_t r = 0; r < qn; ++r) {
    const T inv = attn::softmax_inv_denominator(l[r]);
    store_row(seg_row(b, i0 + r, h, m), acc + r * Dv, Dv, inv);
    lse_at(b, h, i0 + r, m) = attn::softmax_lse(mx[r], l[r]);
    const T wm = static_cast<T>(W.at(b, i0 + r, h, m)) * inv;
    const T* a = acc + r * Dv;
    T* o = out + r * Dv;
#pragma omp simd
    for (int64_t d = 0; d < Dv; ++d) o[d] += wm * a[d];
  }
}

template <typename in_t, typename T>
void mix_forward_kernel(const Rows<const in_t>& Q, const Rows<const in_t>& K, const Rows<const in_t>& V,
                        const W4<in_t>& W, const Rows<in_t>& O, in_t* seg_out, T* lse, const MixDesc& md, int64_t B,
                        int64_t Lq, int64_t Hq, int64_t Hkv, int64_t D, int64_t Dv, int64_t max_seg, T scale) {
  constexpr bool kConvert = !std::is_same_v<in_t, T>;
  const int64_t M = md.M;
  const int64_t kBlockQ = short_side_block_q(max_seg, Lq, B * Hq);
  const int64_t kBlockK = block_k_for(kBlockQ);
  const int64_t nqb = (Lq + kBlockQ - 1) / kBlockQ;
  const int64_t group = Hq / Hkv;
  // seg_out (B, Lq, Hq, M, Dv) contiguous; lse (B, Hq, Lq, M) contiguous
  auto seg_row = [&](int64_t b, int64_t i, int64_t h, int64_t m) { return seg_out + (((b * Lq + i) * Hq + h) * M + m) * Dv; };
  auto lse_at = [&](int64_t b, int64_t h, int64_t i, int64_t m) -> T& { return lse[((b * Hq + h) * Lq + i) * M + m]; };
  at::parallel_for(0, B * Hq * nqb, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> S(kBlockQ * kBlockK), acc(kBlockQ * Dv), out(kBlockQ * Dv), mx(kBlockQ), l(kBlockQ);
    std::vector<T> qbuf(kConvert ? kBlockQ * D : 0), kbuf(kConvert ? kBlockK * D : 0), vbuf(kConvert ? kBlockK * Dv : 0);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t qb = t % nqb, h = (t / nqb) % Hq, b = t / (nqb * Hq);
      const int64_t i0 = qb * kBlockQ, qn = std::min(kBlockQ, Lq - i0), hk = h / group;
      int64_t ldq, ldk, ldv;
      const T* qptr = tile(Q.at(b, i0, h), Q.sl, qn, D, qbuf.data(), &ldq);
      std::fill(out.begin(), out.begin() + qn * Dv, T(0));
      for (int64_t m = 0; m < M; ++m) {
        const int64_t ks = md.start[b * M + m], klen = md.len[b * M + m];
        std::fill(mx.begin(), mx.begin() + qn, attn::neg_inf<T>());
        std::fill(l.begin(), l.begin() + qn, T(0));
        std::fill(acc.begin(), acc.begin() + qn * Dv, T(0));
        const int64_t bk = even_block_k(klen, kBlockK);
        for (int64_t j0 = 0; j0 < klen; j0 += bk) {  // this modality's keys: its own online state
          const int64_t kn = std::min(bk, klen - j0);
          const int64_t lds = padded_len(kn);
          const T* kptr = tile(K.at(b, ks + j0, hk), K.sl, kn, D, kbuf.data(), &ldk);
          const T* vptr = tile(V.at(b, ks + j0, hk), V.sl, kn, Dv, vbuf.data(), &ldv);
          gemm(TransposeType::Transpose, TransposeType::NoTranspose, kn, qn, D, scale, kptr, ldk, qptr, ldq, T(0),
               S.data(), lds);
          forward_tile_update(qn, kn, Dv, S.data(), mx.data(), l.data(), acc.data(), vptr, ldv, j0 == 0);
        }
        finish_modality(b, i0, h, m, qn, Dv, acc.data(), mx.data(), l.data(), W, seg_row, lse_at, out.data());
      }
      for (int64_t r = 0; r < qn; ++r) store_row(O.at(b, i0 + r, h), out.data() + r * Dv, Dv, T(1));
    }
  });
}

// Short query side (float compute, Lq <= 2 kShortQMax, text against image/audio/... keys; the
// levels with kShortQueryPass): the short-query pass of short_query.h (per (batch, head group, query
// tile), transposed scores, no BLAS) over the M segments; each segment's end writes its output and
// lse and adds its weighted output to the task's rows, stored at the end.
template <typename in_t>
void mix_forward_short(const Rows<const in_t>& Q, const Rows<const in_t>& K, const Rows<const in_t>& V,
                       const W4<in_t>& W, const Rows<in_t>& O, in_t* seg_out, float* lse_t, const MixDesc& md,
                       int64_t B, int64_t Lq, int64_t Hq, int64_t Hkv, int64_t D, int64_t Dv, double scale) {
  const int64_t M = md.M;
  auto seg_row = [&](int64_t b, int64_t i, int64_t h, int64_t m) { return seg_out + (((b * Lq + i) * Hq + h) * M + m) * Dv; };
  auto lse_at = [&](int64_t b, int64_t h, int64_t i, int64_t m) -> float& { return lse_t[((b * Hq + h) * Lq + i) * M + m]; };
  short_query_forward(
      Q, K, V, B, Lq, Hq, Hkv, D, Dv, static_cast<float>(scale), M, [](int64_t) { return int64_t(0); },
      [&](int64_t) { return Lq; }, [&](int64_t b, int64_t m) { return std::make_pair(md.start[b * M + m], md.len[b * M + m]); },
      [&](int64_t b, int64_t i0, int64_t qn, int64_t h, int64_t m, const float* mx, const float* l, const float* acc,
          float* out) { finish_modality(b, i0, h, m, qn, Dv, acc, mx, l, W, seg_row, lse_at, out); },
      [&](int64_t b, int64_t i0, int64_t qn, int64_t h, const float* out) {
        for (int64_t r = 0; r < qn; ++r) store_row(O.at(b, i0 + r, h), out + r * Dv, Dv, 1.0f);
      });
}

template <typename in_t, typename T>
void mix_backward_kernel(const Rows<const in_t>& Q, const Rows<const in_t>& K, const Rows<const in_t>& V,
                         const W4<in_t>& W, const Rows<const in_t>& dO, const in_t* seg_out, const T* lse,
                         const Rows<in_t>& dQ, const Rows<in_t>& dK, const Rows<in_t>& dV, T* dW4,
                         const MixDesc& md, int64_t B, int64_t Lq, int64_t Lk, int64_t Hq, int64_t Hkv, int64_t D,
                         int64_t Dv, int64_t max_seg, T scale) {
  constexpr bool kConvert = !std::is_same_v<in_t, T>;
  const int64_t M = md.M;
  const int64_t group = Hq / Hkv;
  const int64_t kBlockQ = block_q_for(max_seg, Lq);
  const int64_t kBlockK = block_k_for(kBlockQ);
  at::parallel_for(0, B * Hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> P(kBlockQ * kBlockK), dP(kBlockQ * kBlockK), dq(kBlockQ * D), delta(kBlockQ), lrow(kBlockQ),
        wdo(kBlockQ * Dv);
    std::vector<T> dk(Lk * D), dv(Lk * Dv);
    std::vector<T> kall(kConvert ? Lk * D : 0), vall(kConvert ? Lk * Dv : 0);
    std::vector<T> qbuf(kConvert ? kBlockQ * D : 0), dobuf(kConvert ? kBlockQ * Dv : 0);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t hk = t % Hkv, b = t / Hkv;
      const int64_t ktot = md.start[b * M + M - 1] + md.len[b * M + M - 1];
      std::fill(dk.begin(), dk.begin() + ktot * D, T(0));
      std::fill(dv.begin(), dv.begin() + ktot * Dv, T(0));
      int64_t ldk = D, ldv = Dv, ldq, lddo;
      const T* k_all = ktot ? tile(K.at(b, 0, hk), K.sl, ktot, D, kall.data(), &ldk) : nullptr;
      const T* v_all = ktot ? tile(V.at(b, 0, hk), V.sl, ktot, Dv, vall.data(), &ldv) : nullptr;
      for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
        for (int64_t i0 = 0; i0 < Lq; i0 += kBlockQ) {
          const int64_t qn = std::min(kBlockQ, Lq - i0);
          const T* qptr = tile(Q.at(b, i0, h), Q.sl, qn, D, qbuf.data(), &ldq);
          const T* doptr = tile(dO.at(b, i0, h), dO.sl, qn, Dv, dobuf.data(), &lddo);
          std::fill(dq.begin(), dq.begin() + qn * D, T(0));
          for (int64_t m = 0; m < M; ++m) {
            const int64_t ks = md.start[b * M + m], klen = md.len[b * M + m];
            // dalpha_{i,m} = dO_i . O_{i,m};  the modality's output gradient is w dO, its delta w dalpha
            for (int64_t r = 0; r < qn; ++r) {
              const int64_t i = i0 + r;
              const in_t* so = seg_out + (((b * Lq + i) * Hq + h) * M + m) * Dv;
              const T* g = doptr + r * lddo;
              T dot = 0;
#pragma omp simd reduction(+ : dot)
              for (int64_t d = 0; d < Dv; ++d) dot += static_cast<T>(so[d]) * g[d];
              dW4[((b * Lq + i) * Hq + h) * M + m] = dot;
              const T w = static_cast<T>(W.at(b, i, h, m));
              delta[r] = w * dot;
              lrow[r] = lse[((b * Hq + h) * Lq + i) * M + m];
              T* wd = wdo.data() + r * Dv;
#pragma omp simd
              for (int64_t d = 0; d < Dv; ++d) wd[d] = w * g[d];
            }
            for (int64_t j0 = 0; j0 < klen; j0 += kBlockK) {
              const int64_t kn = std::min(kBlockK, klen - j0);
              backward_tile(qn, kn, D, Dv, scale, qptr, ldq, k_all + (ks + j0) * ldk, ldk, v_all + (ks + j0) * ldv, ldv,
                            wdo.data(), Dv, lrow.data(), delta.data(), P.data(), dP.data(), dq.data(),
                            dk.data() + (ks + j0) * D, dv.data() + (ks + j0) * Dv);
            }
          }
          for (int64_t r = 0; r < qn; ++r) store_row(dQ.at(b, i0 + r, h), dq.data() + r * D, D, T(1));
        }
      }
      for (int64_t j = 0; j < ktot; ++j) {
        store_row(dK.at(b, j, hk), dk.data() + j * D, D, T(1));
        store_row(dV.at(b, j, hk), dv.data() + j * Dv, Dv, T(1));
      }
    }
  });
}

template <typename T>
W4<T> w4_of(const at::Tensor& w) {
  const T* p = w.const_data_ptr<T>();
  if (w.dim() == 3) return {p, w.stride(0), w.stride(1), 0, w.stride(2)};
  return {p, w.stride(0), w.stride(1), w.stride(2), w.stride(3)};
}

int64_t max_segment(const MixDesc& md) {
  int64_t mx = 1;
  for (int64_t n : md.len) mx = std::max(mx, n);
  return mx;
}

void mixture_attention_forward_cpu_kernel(const at::Tensor& qc, const at::Tensor& kc, const at::Tensor& vc,
                                          const at::Tensor& weights, const MixDesc& md, double sc, at::Tensor& out,
                                          at::Tensor& lse, at::Tensor& seg_out) {
  const int64_t B = qc.size(0), Lq = qc.size(1), Hq = qc.size(2), Hkv = kc.size(2), D = qc.size(3), Dv = vc.size(3);
  EMBEDOPS_DISPATCH_FLOATING(qc.scalar_type(), "mixture_attention_cpu", [&] {
    using T = at::opmath_type<scalar_t>;
    if constexpr (kShortQueryPass && std::is_same_v<T, float>) {
      if (Lq <= 2 * kShortQMax) {
        mix_forward_short<scalar_t>(rows_of<const scalar_t>(qc, false), rows_of<const scalar_t>(kc, false),
                                    rows_of<const scalar_t>(vc, false), w4_of<scalar_t>(weights),
                                    rows_of<scalar_t>(out, false), seg_out.data_ptr<scalar_t>(), lse.data_ptr<float>(),
                                    md, B, Lq, Hq, Hkv, D, Dv, sc);
        return;
      }
    }
    mix_forward_kernel<scalar_t, T>(rows_of<const scalar_t>(qc, false), rows_of<const scalar_t>(kc, false),
                                    rows_of<const scalar_t>(vc, false), w4_of<scalar_t>(weights),
                                    rows_of<scalar_t>(out, false), seg_out.data_ptr<scalar_t>(), lse.data_ptr<T>(), md,
                                    B, Lq, Hq, Hkv, D, Dv, max_segment(md), static_cast<T>(sc));
  });
}

void mixture_attention_backward_cpu_kernel(const at::Tensor& doc, const at::Tensor& qc, const at::Tensor& kc,
                                           const at::Tensor& vc, const at::Tensor& weights, const at::Tensor& soc,
                                           const at::Tensor& lc, const MixDesc& md, double scale, at::Tensor& dq,
                                           at::Tensor& dk, at::Tensor& dv, at::Tensor& dw4) {
  const int64_t B = qc.size(0), Lq = qc.size(1), Hq = qc.size(2), Hkv = kc.size(2), D = qc.size(3), Dv = vc.size(3);
  const int64_t Lk = kc.size(1);
  EMBEDOPS_DISPATCH_FLOATING(qc.scalar_type(), "mixture_attention_backward_cpu", [&] {
    using T = at::opmath_type<scalar_t>;
    mix_backward_kernel<scalar_t, T>(rows_of<const scalar_t>(qc, false), rows_of<const scalar_t>(kc, false),
                                     rows_of<const scalar_t>(vc, false), w4_of<scalar_t>(weights),
                                     rows_of<const scalar_t>(doc, false), soc.const_data_ptr<scalar_t>(),
                                     lc.const_data_ptr<T>(), rows_of<scalar_t>(dq, false),
                                     rows_of<scalar_t>(dk, false), rows_of<scalar_t>(dv, false), dw4.data_ptr<T>(), md,
                                     B, Lq, Lk, Hq, Hkv, D, Dv, max_segment(md), static_cast<T>(scale));
  });
}

}  // namespace

EMBEDOPS_REGISTER_CPU_KERNEL(co_attention_forward_stub, &co_attention_forward_cpu_kernel);
EMBEDOPS_REGISTER_CPU_KERNEL(co_attention_backward_stub, &co_attention_backward_cpu_kernel);
EMBEDOPS_REGISTER_CPU_KERNEL(mixture_attention_forward_stub, &mixture_attention_forward_cpu_kernel);
EMBEDOPS_REGISTER_CPU_KERNEL(mixture_attention_backward_stub, &mixture_attention_backward_cpu_kernel);

}  // namespace CPU_CAPABILITY
}  // namespace embedops

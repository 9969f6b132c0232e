// cross_attention forward on tensor cores (wmma, sm_80+), float16 / bfloat16, head dims that are
// multiples of 16 up to 128. OPT-IN (EMBEDOPS_ATTN_TENSOR_CORES=1): written without a GPU to run
// it on, so the CUDA-core kernel stays the default until the CUDA tests have passed with it.
//
// One block per (64-query tile, head, batch), 4 warps, warp w owns query rows 16w..16w+15.
// Per 64-key tile: S_w = Q_w K^T (wmma, fp32 accumulate) -> shared memory; the online-softmax
// update of attention.h per row (two lanes per row); P_w (fp16/bf16) -> shared memory;
// O_w = alpha * O_w + P_w V (wmma, O_w kept in shared memory in fp32 so rows can be rescaled).

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <cstdlib>
#include <cstring>

#include "attention/cuda/attention_tiles.cuh"
#include "attention/cuda/cross_attention_tc.h"

namespace embedops {
namespace attn_cuda {

namespace {

constexpr int kTcRows = 64;  // queries per block
constexpr int kTcKeys = 64;  // keys per tile
constexpr int kTcPadH = 8;   // 16-bit row padding (wmma ldm multiple of 8)
constexpr int kTcPadF = 4;   // fp32 row padding (wmma ldm multiple of 4)

template <typename T>
struct WmmaType;
template <>
struct WmmaType<at::Half> {
  using type = __half;
  __device__ static uint16_t bits(float x) { return __half_as_ushort(__float2half_rn(x)); }
};
template <>
struct WmmaType<at::BFloat16> {
  using type = __nv_bfloat16;
  __device__ static uint16_t bits(float x) { return __bfloat16_as_ushort(__float2bfloat16_rn(x)); }
};

struct TcLayout {
  int ldq, ldk, ldv, lds, ldp, ldo;
  size_t off_k, off_v, off_s, off_p, off_o, off_m, off_l, total;  // bytes
};

__host__ __device__ inline TcLayout tc_layout(int D, int Dv) {
  TcLayout t;
  t.ldq = D + kTcPadH;
  t.ldk = D + kTcPadH;
  t.ldv = Dv + kTcPadH;
  t.lds = kTcKeys + kTcPadF;
  t.ldp = kTcKeys + kTcPadH;
  t.ldo = Dv + kTcPadF;
  // every region is a multiple of 32 bytes, so every wmma pointer below stays 32-byte aligned
  t.off_k = static_cast<size_t>(kTcRows) * t.ldq * 2;
  t.off_v = t.off_k + static_cast<size_t>(kTcKeys) * t.ldk * 2;
  t.off_s = t.off_v + static_cast<size_t>(kTcKeys) * t.ldv * 2;
  t.off_p = t.off_s + static_cast<size_t>(kTcRows) * t.lds * 4;
  t.off_o = t.off_p + static_cast<size_t>(kTcRows) * t.ldp * 2;
  t.off_m = t.off_o + static_cast<size_t>(kTcRows) * t.ldo * 4;
  t.off_l = t.off_m + kTcRows * 4;
  t.total = t.off_l + kTcRows * 4;
  return t;
}

// Raw 16-bit copy of rows [0, n) of a (rows x cols) tile into shared memory (row stride ld);
// rows [n, rows) are zero.
template <typename scalar_t>
__device__ __forceinline__ void load_tile_raw(uint16_t* dst, int ld, const Rows<const scalar_t>& src, int64_t b,
                                              int64_t tok0, int64_t h, int n, int rows, int cols) {
  for (int e = threadIdx.x; e < rows * cols; e += blockDim.x) {
    const int r = e / cols, c = e % cols;
    uint16_t v = 0;
    if (r < n) std::memcpy(&v, src.at(b, tok0 + r, h) + c, sizeof(v));
    dst[r * ld + c] = v;
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    forward_tc_kernel(Rows<const scalar_t> Q, Rows<const scalar_t> K, Rows<const scalar_t> V, Rows<scalar_t> O,
                      float* __restrict__ lse, int64_t lse_sb, int64_t lse_sh, SeqPtrs seq, Dims dm, float scale) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  using namespace nvcuda;
  using elem_t = typename WmmaType<scalar_t>::type;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  const int D = static_cast<int>(dm.D), Dv = static_cast<int>(dm.Dv);
  const TcLayout L = tc_layout(D, Dv);
  uint16_t* sQ = reinterpret_cast<uint16_t*>(smem_raw);
  uint16_t* sK = reinterpret_cast<uint16_t*>(smem_raw + L.off_k);
  uint16_t* sV = reinterpret_cast<uint16_t*>(smem_raw + L.off_v);
  float* sS = reinterpret_cast<float*>(smem_raw + L.off_s);
  uint16_t* sP = reinterpret_cast<uint16_t*>(smem_raw + L.off_p);
  float* sO = reinterpret_cast<float*>(smem_raw + L.off_o);
  float* sM = reinterpret_cast<float*>(smem_raw + L.off_m);
  float* sL = reinterpret_cast<float*>(smem_raw + L.off_l);

  const int64_t b = blockIdx.x / dm.ntiles, h = blockIdx.y;
  const int64_t i0 = (blockIdx.x % dm.ntiles) * kTcRows;
  const int64_t q_slot = seq.q_slot(b);
  if (i0 >= q_slot) return;  // uniform over the block
  const int64_t q_len = seq.q_len(b), k_len = seq.k_len(b);
  const int64_t tok0 = seq.q_start(b) + i0, ktok0 = seq.k_start(b);
  const int64_t hk = h / (dm.Hq / dm.Hkv);
  const int qn = static_cast<int>(imax(0, imin(kTcRows, q_len - i0)));
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int row0 = warp * 16;  // this warp's first query row in the tile

  load_tile_raw(sQ, L.ldq, Q, b, tok0, h, qn, kTcRows, D);
  for (int e = threadIdx.x; e < kTcRows * L.ldo; e += blockDim.x) sO[e] = 0.f;
  for (int e = threadIdx.x; e < kTcRows; e += blockDim.x) {
    sM[e] = attn::neg_inf<float>();
    sL[e] = 0.f;
  }

  float* sS_w = sS + row0 * L.lds;
  uint16_t* sP_w = sP + row0 * L.ldp;
  float* sO_w = sO + row0 * L.ldo;
  const int r_local = lane / 2, half_id = lane % 2;  // softmax: two lanes per row
  const int r = row0 + r_local;

  for (int64_t j0 = 0; j0 < k_len; j0 += kTcKeys) {
    const int kn = static_cast<int>(imin(kTcKeys, k_len - j0));
    __syncthreads();  // previous K/V tile consumed; sQ / sO / stats initialised on the first pass
    load_tile_raw(sK, L.ldk, K, b, ktok0 + j0, hk, kn, kTcKeys, D);
    load_tile_raw(sV, L.ldv, V, b, ktok0 + j0, hk, kn, kTcKeys, Dv);
    __syncthreads();

    // S_w (16 x 64) = Q_w K^T
    for (int n = 0; n < kTcKeys / 16; ++n) {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
      wmma::fill_fragment(acc, 0.f);
      for (int k = 0; k < D / 16; ++k) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, elem_t, wmma::row_major> a;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, elem_t, wmma::col_major> bf;
        wmma::load_matrix_sync(a, reinterpret_cast<const elem_t*>(sQ + row0 * L.ldq + 16 * k), L.ldq);
        wmma::load_matrix_sync(bf, reinterpret_cast<const elem_t*>(sK + (16 * n) * L.ldk + 16 * k), L.ldk);
        wmma::mma_sync(acc, a, bf, acc);
      }
      wmma::store_matrix_sync(sS_w + 16 * n, acc, L.lds, wmma::mem_row_major);
    }
    __syncwarp();

    // online softmax of row r over this tile; lane pair (2r, 2r+1) holds columns [32 half_id, +32)
    {
      const float* srow = sS_w + r_local * L.lds + 32 * half_id;
      float mx = attn::neg_inf<float>();
      for (int c = 0; c < 32; ++c) {
        const int col = 32 * half_id + c;
        const float s = col < kn ? srow[c] * scale : attn::neg_inf<float>();
        mx = s > mx ? s : mx;
      }
      const float other = __shfl_xor_sync(0xffffffffu, mx, 1);
      mx = other > mx ? other : mx;
      const float m_old = sM[r];
      const float m_new = attn::softmax_new_max(m_old, mx);
      const float alpha = attn::softmax_rescale(m_old, m_new);
      float sum = 0.f;
      uint16_t* prow = sP_w + r_local * L.ldp + 32 * half_id;
      for (int c = 0; c < 32; ++c) {
        const int col = 32 * half_id + c;
        const float p = col < kn ? attn::softmax_prob(srow[c] * scale, m_new) : 0.f;
        prow[c] = WmmaType<scalar_t>::bits(p);
        sum += p;
      }
      sum += __shfl_xor_sync(0xffffffffu, sum, 1);
      float* orow = sO_w + r_local * L.ldo;
      for (int d = half_id; d < Dv; d += 2) orow[d] *= alpha;
      __syncwarp();  // both lanes of the pair read sM[r] before it is written
      if (half_id == 0) {
        sL[r] = sL[r] * alpha + sum;
        sM[r] = m_new;
      }
    }
    __syncwarp();

    // O_w (16 x Dv) += P_w V
    for (int n = 0; n < Dv / 16; ++n) {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
      wmma::load_matrix_sync(acc, sO_w + 16 * n, L.ldo, wmma::mem_row_major);
      for (int k = 0; k < kTcKeys / 16; ++k) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, elem_t, wmma::row_major> a;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, elem_t, wmma::row_major> bf;
        wmma::load_matrix_sync(a, reinterpret_cast<const elem_t*>(sP_w + 16 * k), L.ldp);
        wmma::load_matrix_sync(bf, reinterpret_cast<const elem_t*>(sV + (16 * k) * L.ldv + 16 * n), L.ldv);
        wmma::mma_sync(acc, a, bf, acc);
      }
      wmma::store_matrix_sync(sO_w + 16 * n, acc, L.ldo, wmma::mem_row_major);
    }
    __syncwarp();
  }
  __syncthreads();  // (k_len == 0: the initialisation above must be visible)

  for (int rr = 0; rr < 16; ++rr) {
    const int row = row0 + rr;
    if (i0 + row >= q_slot) break;
    scalar_t* o = O.at(b, tok0 + row, h);
    float* lse_row = lse + b * lse_sb + h * lse_sh + tok0 + row;
    if (row < qn) {
      const float inv = attn::softmax_inv_denominator(sL[row]);
      for (int d = lane; d < Dv; d += 32) o[d] = static_cast<scalar_t>(sO[row * L.ldo + d] * inv);
      if (lane == 0) *lse_row = attn::softmax_lse(sM[row], sL[row]);
    } else {
      for (int d = lane; d < Dv; d += 32) o[d] = static_cast<scalar_t>(0.f);
      if (lane == 0) *lse_row = attn::neg_inf<float>();
    }
  }
#else
  __trap();  // launched only on sm_80+ (checked on the host)
#endif
}

}  // namespace

bool tensor_core_forward_enabled(const at::Tensor& q, int64_t D, int64_t Dv) {
  const char* env = std::getenv("EMBEDOPS_ATTN_TENSOR_CORES");
  if (env == nullptr || std::strcmp(env, "1") != 0) return false;
  if (q.scalar_type() != at::kHalf && q.scalar_type() != at::kBFloat16) return false;
  if (D % 16 != 0 || Dv % 16 != 0 || D > 128 || Dv > 128) return false;
  int major = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, q.get_device()));
  return major >= 8;
}

void forward_tensor_cores(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                          at::Tensor& out, at::Tensor& lse, const SeqDesc& desc, double scale, bool varlen) {
  const int64_t Hq = q.size(-2), Hkv = k.size(-2), D = q.size(-1), Dv = v.size(-1);
  const int64_t ntiles = (desc.max_q_slot + kTcRows - 1) / kTcRows;
  check_cuda_limits(op, D, Dv, ntiles * desc.batch, Hq);
  if (ntiles == 0) return;
  const at::Tensor seq = seq_desc_on_device(desc, q.device());
  const SeqPtrs sp{seq.const_data_ptr<int64_t>(), desc.batch};
  const Dims dm{desc.batch, Hq, Hkv, D, Dv, ntiles};
  const int64_t lse_sb = varlen ? 0 : lse.stride(0), lse_sh = varlen ? lse.stride(0) : lse.stride(1);
  const dim3 grid(static_cast<unsigned>(ntiles * desc.batch), static_cast<unsigned>(Hq));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const size_t smem = tc_layout(static_cast<int>(D), static_cast<int>(Dv)).total;
  auto launch = [&](auto tag) {
    using scalar_t = decltype(tag);
    auto kernel = forward_tc_kernel<scalar_t>;
    prepare_smem(op, reinterpret_cast<const void*>(kernel), smem, q);
    kernel<<<grid, kThreads, smem, stream>>>(rows_of<const scalar_t>(q, varlen), rows_of<const scalar_t>(k, varlen),
                                             rows_of<const scalar_t>(v, varlen), rows_of<scalar_t>(out, varlen),
                                             lse.data_ptr<float>(), lse_sb, lse_sh, sp, dm, static_cast<float>(scale));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  if (q.scalar_type() == at::kHalf) {
    launch(at::Half());
  } else {
    TORCH_CHECK(q.scalar_type() == at::kBFloat16, op, ": tensor-core path needs float16/bfloat16");
    launch(at::BFloat16());
  }
}

}  // namespace attn_cuda
}  // namespace embedops

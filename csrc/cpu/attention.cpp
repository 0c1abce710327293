// Fused attention (causal, ALiBi, GQA) forward and backward on the CPU, flash-attention style:
// query blocks against key blocks with an online softmax, so no Sq x Sk matrix is ever in
// memory. Tiles are multiplied by a small register-blocked GEMM on at::vec (two rows share
// every B load); K and V are converted once per (batch, kv head) into fp32 buffers padded to
// the vector width, so the GEMMs need no tail handling and bf16/fp16 inputs cost one pass
// of conversion instead of one per tile.
//
// Forward: parallel over (batch, q head, query block). Backward (flash-attention 2): parallel
// over (batch, kv head); a task owns dK/dV of its kv head and dQ of the q heads of its group,
// so there are no races and the result is bitwise reproducible.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

#include "common/checks.h"
#include "common/cpu_vec.h"

namespace mptk::cpu {
namespace {

using Vf = Vectorized<float>;
constexpr int64_t kW = Vf::size();
constexpr int64_t kBlockQ = 32;  // query rows per tile
constexpr int64_t kBlockK = 64;  // keys per tile (a multiple of every vector width)
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// Rows of A handled together: each B vector load feeds ROWS FMAs. 4 rows x 4 vectors of
// accumulators fit AVX-512's 32 registers; AVX2's 16 hold 2 x 4.
constexpr int kRows = kW >= 16 ? 4 : 2;

// C[R rows, NV*kW columns] (+)= A[R, K] @ B[K, those columns]; row-major fp32.
template <int R, int NV>
inline void gemm_tile(int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb, float* C, int64_t ldc,
                      bool accumulate) {
  Vf c[R][NV];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) c[r][v] = accumulate ? Vf::loadu(C + r * ldc + v * kW) : Vf(0.f);
  for (int64_t k = 0; k < K; ++k) {
    Vf b[NV];
    for (int v = 0; v < NV; ++v) b[v] = Vf::loadu(B + k * ldb + v * kW);
    for (int r = 0; r < R; ++r) {
      const Vf a(A[r * lda + k]);
      for (int v = 0; v < NV; ++v) c[r][v] = at::vec::fmadd(a, b[v], c[r][v]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) c[r][v].store(C + r * ldc + v * kW);
}

template <int NV>
void gemm_cols(int64_t M, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
               int64_t ldc, bool accumulate) {
  int64_t i = 0;
  for (; i + kRows <= M; i += kRows) gemm_tile<kRows, NV>(K, A + i * lda, lda, B, ldb, C + i * ldc, ldc, accumulate);
  for (; i < M; ++i) gemm_tile<1, NV>(K, A + i * lda, lda, B, ldb, C + i * ldc, ldc, accumulate);
}

// C[M, N] (+)= A[M, K] @ B[K, N], row-major fp32, N a multiple of kW.
void gemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
          int64_t ldc, bool accumulate) {
  int64_t n = 0;
  for (; n + 4 * kW <= N; n += 4 * kW) gemm_cols<4>(M, K, A, lda, B + n, ldb, C + n, ldc, accumulate);
  switch ((N - n) / kW) {
    case 3: gemm_cols<3>(M, K, A, lda, B + n, ldb, C + n, ldc, accumulate); break;
    case 2: gemm_cols<2>(M, K, A, lda, B + n, ldb, C + n, ldc, accumulate); break;
    case 1: gemm_cols<1>(M, K, A, lda, B + n, ldb, C + n, ldc, accumulate); break;
    default: break;
  }
}

// src [rows, D] (row stride ld) -> dst fp32 [rows, Dp] zero-padded, times scale
template <typename T>
void load_rows(const T* src, int64_t ld, int64_t rows, int64_t D, int64_t Dp, float scale, float* dst) {
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t d = 0; d < D; ++d) dst[r * Dp + d] = static_cast<float>(src[r * ld + d]) * scale;
    for (int64_t d = D; d < Dp; ++d) dst[r * Dp + d] = 0.f;
  }
}

// src [rows, D] (row stride ld) -> dst fp32 [Dp, cols] transposed (dst[d][r]), zero-padded
template <typename T>
void load_cols(const T* src, int64_t ld, int64_t rows, int64_t D, int64_t Dp, int64_t cols, float* dst) {
  for (int64_t d = 0; d < Dp; ++d)
    for (int64_t r = 0; r < cols; ++r) dst[d * cols + r] = (d < D && r < rows) ? static_cast<float>(src[r * ld + d]) : 0.f;
}

struct Geometry {
  int64_t B, Sq, Sk, Hq, Hk, D, Dp, Skp, group, offset;  // offset = Sk - Sq (bottom-right alignment)
  float scale;
  bool causal;
  // keys visible to query row i: j < last_key(i) (causal) or Sk
  int64_t key_end(int64_t i) const { return causal ? std::clamp<int64_t>(i + offset + 1, 0, Sk) : Sk; }
};

// scores tile [bq, kBlockK] for query rows [i0, i0 + bq) and keys [j0, j0 + kBlockK): ALiBi
// bias and masks (causal, padding past Sk) applied in place. The bias of row i is
// slope * (j0 - i - offset) + slope * c: a scalar plus a fixed ramp over the tile's columns.
inline void bias_and_mask(float* S, int64_t bq, int64_t i0, int64_t j0, const Geometry& g, float slope) {
  alignas(64) static thread_local float ramp[kBlockK];
  const bool has_bias = slope != 0.f;
  if (has_bias)
    for (int64_t c = 0; c < kBlockK; ++c) ramp[c] = slope * static_cast<float>(c);
  for (int64_t r = 0; r < bq; ++r) {
    const int64_t i = i0 + r, visible = g.key_end(i) - j0;  // columns [0, visible) are visible
    float* row = S + r * kBlockK;
    if (has_bias) {
      const Vf base(slope * static_cast<float>(j0 - i - g.offset));
      for (int64_t c = 0; c < kBlockK; c += kW) (Vf::loadu(row + c) + base + Vf::loadu(ramp + c)).store(row + c);
    }
    for (int64_t c = std::max<int64_t>(visible, 0); c < kBlockK; ++c) row[c] = kNegInf;
  }
}

inline float slope_of(const float* slopes, bool per_batch, const Geometry& g, int64_t b, int64_t h) {
  return slopes ? slopes[(per_batch ? b * g.Hq : 0) + h] : 0.f;
}

template <typename T>
void attention_fwd_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const float* slopes,
                        bool slopes_per_batch, const Geometry& g, at::Tensor& out, at::Tensor& lse) {
  const T* qp = q.const_data_ptr<T>();
  const T* kp = k.const_data_ptr<T>();
  const T* vp = v.const_data_ptr<T>();
  T* op = out.mutable_data_ptr<T>();
  float* lp = lse.mutable_data_ptr<float>();
  const int64_t D = g.D, Dp = g.Dp, Skp = g.Skp;
  // K^T and V of every (batch, kv head) in fp32, padded: [B*Hk, Dp, Skp] and [B*Hk, Skp, Dp]
  std::vector<float> kt(g.B * g.Hk * Dp * Skp), vv(g.B * g.Hk * Skp * Dp);
  at::parallel_for(0, g.B * g.Hk, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / g.Hk, h = t % g.Hk;
      const int64_t base = (b * g.Sk * g.Hk + h) * D;  // k[b, 0, h, 0]
      load_cols(kp + base, g.Hk * D, g.Sk, D, Dp, Skp, kt.data() + t * Dp * Skp);
      load_rows(vp + base, g.Hk * D, g.Sk, D, Dp, 1.f, vv.data() + t * Skp * Dp);
      for (int64_t r = g.Sk; r < Skp; ++r)
        for (int64_t d = 0; d < Dp; ++d) vv[(t * Skp + r) * Dp + d] = 0.f;
    }
  });
  const int64_t n_qblocks = (g.Sq + kBlockQ - 1) / kBlockQ;
  at::parallel_for(0, g.B * g.Hq * n_qblocks, 1, [&](int64_t w0, int64_t w1) {
    std::vector<float> qt(kBlockQ * Dp), S(kBlockQ * kBlockK), acc(kBlockQ * Dp), m(kBlockQ), l(kBlockQ);
    for (int64_t w = w0; w < w1; ++w) {
      const int64_t qb = w % n_qblocks, h = (w / n_qblocks) % g.Hq, b = w / (n_qblocks * g.Hq);
      const int64_t t = b * g.Hk + h / g.group;
      const int64_t i0 = qb * kBlockQ, bq = std::min(kBlockQ, g.Sq - i0);
      const float slope = slope_of(slopes, slopes_per_batch, g, b, h);
      const int64_t qrow = g.Hq * D;
      // the softmax scale is folded into q
      load_rows(qp + ((b * g.Sq + i0) * g.Hq + h) * D, qrow, bq, D, Dp, g.scale, qt.data());
      std::fill(acc.begin(), acc.end(), 0.f);
      std::fill(m.begin(), m.end(), kNegInf);
      std::fill(l.begin(), l.end(), 0.f);
      const int64_t j_end = g.key_end(i0 + bq - 1);  // the block's last row sees the most keys
      for (int64_t j0 = 0; j0 < j_end; j0 += kBlockK) {
        gemm(bq, kBlockK, Dp, qt.data(), Dp, kt.data() + t * Dp * Skp + j0, Skp, S.data(), kBlockK, false);
        bias_and_mask(S.data(), bq, i0, j0, g, slope);
        for (int64_t r = 0; r < bq; ++r) {  // online softmax: rescale what came before
          float* row = S.data() + r * kBlockK;
          Vf vmax(m[r]);
          for (int64_t c = 0; c < kBlockK; c += kW) vmax = at::vec::maximum(vmax, Vf::loadu(row + c));
          const float mx = at::vec::vec_reduce_all<float>([](Vf& a, Vf& bb) { return at::vec::maximum(a, bb); }, vmax);
          if (mx == kNegInf) continue;  // nothing visible yet in this row
          const float corr = std::exp(m[r] - mx);
          Vf vsum(0.f);
          for (int64_t c = 0; c < kBlockK; c += kW) {
            const Vf p = (Vf::loadu(row + c) - Vf(mx)).exp_u20();
            p.store(row + c);
            vsum = vsum + p;
          }
          l[r] = l[r] * corr + at::vec::vec_reduce_all<float>([](Vf& a, Vf& bb) { return a + bb; }, vsum);
          m[r] = mx;
          if (corr != 1.f)
            for (int64_t d = 0; d < Dp; d += kW) (Vf::loadu(acc.data() + r * Dp + d) * Vf(corr)).store(acc.data() + r * Dp + d);
        }
        // rows with nothing visible hold exp(-inf) = 0 in S: they add nothing here
        for (int64_t r = 0; r < bq; ++r)
          if (m[r] == kNegInf) std::fill(S.data() + r * kBlockK, S.data() + (r + 1) * kBlockK, 0.f);
        gemm(bq, Dp, kBlockK, S.data(), kBlockK, vv.data() + (t * Skp + j0) * Dp, Dp, acc.data(), Dp, true);
      }
      for (int64_t r = 0; r < bq; ++r) {
        T* orow = op + ((b * g.Sq + i0 + r) * g.Hq + h) * D;
        const float inv = l[r] > 0.f ? 1.f / l[r] : 0.f;  // a row that sees no key returns zeros
        for (int64_t d = 0; d < D; ++d) orow[d] = static_cast<T>(acc[r * Dp + d] * inv);
        lp[(b * g.Hq + h) * g.Sq + i0 + r] = l[r] > 0.f ? m[r] + std::log(l[r]) : kNegInf;
      }
    }
  });
}

template <typename T>
void attention_bwd_impl(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                        const at::Tensor& out, const at::Tensor& lse, const float* slopes, bool slopes_per_batch,
                        const Geometry& g, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv) {
  const T *dop = dout.const_data_ptr<T>(), *qp = q.const_data_ptr<T>(), *kp = k.const_data_ptr<T>(),
          *vp = v.const_data_ptr<T>(), *op = out.const_data_ptr<T>();
  const float* lp = lse.const_data_ptr<float>();
  T *dqp = dq.mutable_data_ptr<T>(), *dkp = dk.mutable_data_ptr<T>(), *dvp = dv.mutable_data_ptr<T>();
  const int64_t D = g.D, Dp = g.Dp, Skp = g.Skp;
  at::parallel_for(0, g.B * g.Hk, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> kt(Dp * Skp), kr(Skp * Dp), vt(Dp * Skp), dk_acc(Skp * Dp), dv_acc(Skp * Dp);
    std::vector<float> qt(kBlockQ * Dp), dot(kBlockQ * Dp), dq_acc(kBlockQ * Dp), S(kBlockQ * kBlockK),
        dP(kBlockQ * kBlockK), sT(kBlockK * kBlockQ), delta(kBlockQ), lrow(kBlockQ);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / g.Hk, hk = t % g.Hk;
      const int64_t kbase = (b * g.Sk * g.Hk + hk) * D, krow = g.Hk * D, qrow = g.Hq * D;
      load_cols(kp + kbase, krow, g.Sk, D, Dp, Skp, kt.data());
      load_cols(vp + kbase, krow, g.Sk, D, Dp, Skp, vt.data());
      load_rows(kp + kbase, krow, g.Sk, D, Dp, 1.f, kr.data());
      std::fill(kr.begin() + g.Sk * Dp, kr.end(), 0.f);
      std::fill(dk_acc.begin(), dk_acc.end(), 0.f);
      std::fill(dv_acc.begin(), dv_acc.end(), 0.f);
      for (int64_t h = hk * g.group; h < (hk + 1) * g.group; ++h) {
        const float slope = slope_of(slopes, slopes_per_batch, g, b, h);
        for (int64_t i0 = 0; i0 < g.Sq; i0 += kBlockQ) {
          const int64_t bq = std::min(kBlockQ, g.Sq - i0);
          const int64_t qoff = ((b * g.Sq + i0) * g.Hq + h) * D;
          load_rows(qp + qoff, qrow, bq, D, Dp, g.scale, qt.data());  // scaled q: dK = dS^T q_scaled
          load_rows(dop + qoff, qrow, bq, D, Dp, 1.f, dot.data());
          std::fill(dq_acc.begin(), dq_acc.end(), 0.f);
          for (int64_t r = 0; r < bq; ++r) {  // delta_i = rowsum(dO * O)
            float s = 0.f;
            for (int64_t d = 0; d < D; ++d) s += dot[r * Dp + d] * static_cast<float>(op[qoff + r * qrow + d]);
            delta[r] = s;
            lrow[r] = lp[(b * g.Hq + h) * g.Sq + i0 + r];
          }
          const int64_t j_end = g.key_end(i0 + bq - 1);
          for (int64_t j0 = 0; j0 < j_end; j0 += kBlockK) {
            gemm(bq, kBlockK, Dp, qt.data(), Dp, kt.data() + j0, Skp, S.data(), kBlockK, false);
            bias_and_mask(S.data(), bq, i0, j0, g, slope);
            for (int64_t r = 0; r < bq; ++r) {  // P = exp(S - lse); a row with lse = -inf has P = 0
              float* row = S.data() + r * kBlockK;
              if (lrow[r] == kNegInf) {
                std::fill(row, row + kBlockK, 0.f);
                continue;
              }
              for (int64_t c = 0; c < kBlockK; c += kW) (Vf::loadu(row + c) - Vf(lrow[r])).exp_u20().store(row + c);
            }
            // dP = dO V^T; dS = P * (dP - delta), written over dP
            gemm(bq, kBlockK, Dp, dot.data(), Dp, vt.data() + j0, Skp, dP.data(), kBlockK, false);
            for (int64_t r = 0; r < bq; ++r)
              for (int64_t c = 0; c < kBlockK; ++c) dP[r * kBlockK + c] = S[r * kBlockK + c] * (dP[r * kBlockK + c] - delta[r]);
            // dV += P^T dO and dK += dS^T q_scaled, through a transposed copy of each tile
            for (int64_t r = 0; r < bq; ++r)
              for (int64_t c = 0; c < kBlockK; ++c) sT[c * kBlockQ + r] = S[r * kBlockK + c];
            gemm(kBlockK, Dp, bq, sT.data(), kBlockQ, dot.data(), Dp, dv_acc.data() + j0 * Dp, Dp, true);
            for (int64_t r = 0; r < bq; ++r)
              for (int64_t c = 0; c < kBlockK; ++c) sT[c * kBlockQ + r] = dP[r * kBlockK + c];
            gemm(kBlockK, Dp, bq, sT.data(), kBlockQ, qt.data(), Dp, dk_acc.data() + j0 * Dp, Dp, true);
            gemm(bq, Dp, kBlockK, dP.data(), kBlockK, kr.data() + j0 * Dp, Dp, dq_acc.data(), Dp, true);  // dQ += dS K
          }
          for (int64_t r = 0; r < bq; ++r)
            for (int64_t d = 0; d < D; ++d) dqp[qoff + r * qrow + d] = static_cast<T>(dq_acc[r * Dp + d] * g.scale);
        }
      }
      for (int64_t j = 0; j < g.Sk; ++j)
        for (int64_t d = 0; d < D; ++d) {
          dkp[kbase + j * krow + d] = static_cast<T>(dk_acc[j * Dp + d]);
          dvp[kbase + j * krow + d] = static_cast<T>(dv_acc[j * Dp + d]);
        }
    }
  });
}

Geometry geometry(const at::Tensor& q, const at::Tensor& k, double softmax_scale, bool causal) {
  Geometry g;
  g.B = q.size(0), g.Sq = q.size(1), g.Hq = q.size(2), g.D = q.size(3);
  g.Sk = k.size(1), g.Hk = k.size(2);
  g.Dp = round_up(std::max<int64_t>(g.D, 1), kW);
  g.Skp = round_up(std::max<int64_t>(g.Sk, 1), kBlockK);
  g.group = g.Hq / g.Hk;
  g.offset = g.Sk - g.Sq;
  g.scale = static_cast<float>(softmax_scale);
  g.causal = causal;
  return g;
}

std::tuple<at::Tensor, at::Tensor> attention_fwd_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                     const std::optional<at::Tensor>& alibi_slopes,
                                                     double softmax_scale, bool causal) {
  mptk::check_attention_args(q, k, v, alibi_slopes, "attention_fwd");
  const Geometry g = geometry(q, k, softmax_scale, causal);
  at::Tensor out = at::empty(q.sizes(), q.options());
  at::Tensor lse = at::empty({g.B, g.Hq, g.Sq}, q.options().dtype(at::kFloat));
  if (q.numel() == 0) return {out, lse};
  const float* slopes = alibi_slopes ? alibi_slopes->const_data_ptr<float>() : nullptr;
  const bool per_batch = alibi_slopes && alibi_slopes->dim() == 2;
  if (g.Sk == 0) {  // no keys at all: every row sees nothing
    out.zero_();
    lse.fill_(-std::numeric_limits<double>::infinity());
    return {out, lse};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "mptkernels_attention_fwd", [&] {
    attention_fwd_impl<scalar_t>(q, k, v, slopes, per_batch, g, out, lse);
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd_cpu(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const std::optional<at::Tensor>& alibi_slopes, double softmax_scale, bool causal) {
  mptk::check_attention_args(q, k, v, alibi_slopes, "attention_bwd");
  mptk::check_same_layout(dout, q, "dout", "q");
  mptk::check_same_layout(out, q, "out", "q");
  const Geometry g = geometry(q, k, softmax_scale, causal);
  TORCH_CHECK(lse.dim() == 3 && lse.size(0) == g.B && lse.size(1) == g.Hq && lse.size(2) == g.Sq &&
                  lse.scalar_type() == at::kFloat && lse.is_contiguous(),
              "attention_bwd: lse must be a contiguous float32 (", g.B, ", ", g.Hq, ", ", g.Sq, ") tensor");
  at::Tensor dq = at::empty(q.sizes(), q.options()), dk = at::empty(k.sizes(), k.options()),
             dv = at::empty(v.sizes(), v.options());
  if (q.numel() == 0 || k.numel() == 0) {
    dq.zero_(), dk.zero_(), dv.zero_();
    return {dq, dk, dv};
  }
  const float* slopes = alibi_slopes ? alibi_slopes->const_data_ptr<float>() : nullptr;
  const bool per_batch = alibi_slopes && alibi_slopes->dim() == 2;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "mptkernels_attention_bwd", [&] {
    attention_bwd_impl<scalar_t>(dout, q, k, v, out, lse, slopes, per_batch, g, dq, dk, dv);
  });
  return {dq, dk, dv};
}

}  // namespace
}  // namespace mptk::cpu

TORCH_LIBRARY_IMPL(mptkernels, CPU, m) {
  m.impl("attention_fwd", &mptk::cpu::attention_fwd_cpu);
  m.impl("attention_bwd", &mptk::cpu::attention_bwd_cpu);
}

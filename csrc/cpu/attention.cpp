// Fused attention (causal, ALiBi, GQA) forward and backward on the CPU, flash-attention style:
// query blocks against key blocks with an online softmax, so no Sq x Sk matrix is ever in
// memory. Tiles are multiplied by a small register-blocked GEMM on at::vec (two rows share
// every B load); K and V are converted once per (batch, kv head) into fp32 buffers padded to
// the vector width, so the GEMMs need no tail handling and bf16/fp16 inputs cost one pass
// of conversion instead of one per tile.
//
// Forward: parallel over (sequence, q head, query block). Backward (flash-attention 2): parallel
// over (sequence, kv head); a task owns dK/dV of its kv head and dQ of the q heads of its group,
// so there are no races and the result is bitwise reproducible.
//
// One kernel serves three layouts through per-sequence descriptors (Seq): padded batches
// (attention_fwd/bwd), packed variable-length sequences (attention_varlen_*: rows located by
// cu_seqlens) and a KV cache (attention_kvcache: sequence b reads the first cache_seqlens[b]
// + seqlen_new rows of its cache, after the new keys and values are written there).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/tensor.h>
#include <ATen/ops/zeros.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include "common/cpu_vec.h"
#include "cpu/kernels.h"

namespace mptk::cpu::CPU_CAPABILITY {
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

// The multiply-add of the tile GEMMs, per operand type. A k-step is a 32-bit word of B: one
// fp32 value (FMA, below), or, at the avx512_bf16 level, a pair of bf16 values of
// consecutive k (Bf16Pairs in common/cpu_vec.h: vdpbf16ps, twice the FMA's work per
// instruction); A's word k is then elements 2k and 2k + 1 of its row.
struct F32Words {
  using E = float;
  static constexpr int64_t kPerWord = 1;
  static Vf bcast(const float* a) { return Vf(*a); }
  static Vf madd(const Vf& c, const Vf& a, const Vf& b) { return at::vec::fmadd(a, b, c); }
};

// C[R rows, NV*kW columns] (+)= A[R, W words] @ B[W, those columns]; row-major, C fp32.
template <int R, int NV, typename Dot>
inline void gemm_tile(int64_t W, const typename Dot::E* A, int64_t lda, const float* B, int64_t ldb, float* C,
                      int64_t ldc, bool accumulate) {
  Vf c[R][NV];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) c[r][v] = accumulate ? Vf::loadu(C + r * ldc + v * kW) : Vf(0.f);
  for (int64_t k = 0; k < W; ++k) {
    Vf b[NV];
    for (int v = 0; v < NV; ++v) b[v] = Vf::loadu(B + k * ldb + v * kW);
    for (int r = 0; r < R; ++r) {
      const Vf a = Dot::bcast(A + r * lda + k * Dot::kPerWord);
      for (int v = 0; v < NV; ++v) c[r][v] = Dot::madd(c[r][v], a, b[v]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) c[r][v].store(C + r * ldc + v * kW);
}

template <int NV, typename Dot>
void gemm_cols(int64_t M, int64_t W, const typename Dot::E* A, int64_t lda, const float* B, int64_t ldb, float* C,
               int64_t ldc, bool accumulate) {
  int64_t i = 0;
  for (; i + kRows <= M; i += kRows)
    gemm_tile<kRows, NV, Dot>(W, A + i * lda, lda, B, ldb, C + i * ldc, ldc, accumulate);
  for (; i < M; ++i) gemm_tile<1, NV, Dot>(W, A + i * lda, lda, B, ldb, C + i * ldc, ldc, accumulate);
}

// C[M, N] (+)= A[M, W words] @ B[W, N] (B and C fp32 words, row-major), N a multiple of kW.
template <typename Dot = F32Words>
void gemm(int64_t M, int64_t N, int64_t W, const typename Dot::E* A, int64_t lda, const float* B, int64_t ldb,
          float* C, int64_t ldc, bool accumulate) {
  int64_t n = 0;
  for (; n + 4 * kW <= N; n += 4 * kW) gemm_cols<4, Dot>(M, W, A, lda, B + n, ldb, C + n, ldc, accumulate);
  switch ((N - n) / kW) {
    case 3: gemm_cols<3, Dot>(M, W, A, lda, B + n, ldb, C + n, ldc, accumulate); break;
    case 2: gemm_cols<2, Dot>(M, W, A, lda, B + n, ldb, C + n, ldc, accumulate); break;
    case 1: gemm_cols<1, Dot>(M, W, A, lda, B + n, ldb, C + n, ldc, accumulate); break;
    default: break;
  }
}

// src [rows, D] (row stride ld) -> dst fp32 [rows, Dp] zero-padded, times scale
template <typename T>
void load_rows(const T* src, int64_t ld, int64_t rows, int64_t D, int64_t Dp, float scale, float* dst) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* in = src + r * ld;
    float* out = dst + r * Dp;
    int64_t d = 0;
    if constexpr (!std::is_same_v<T, double>) {  // two vectors at a time (float64 goes one by one)
      using IO = ChunkIO<T, float>;
      for (; d + IO::kChunk <= D; d += IO::kChunk) {
        Vf lo, hi;
        IO::load(in + d, lo, hi);
        (lo * Vf(scale)).store(out + d);
        (hi * Vf(scale)).store(out + d + kW);
      }
    }
    for (; d < D; ++d) out[d] = static_cast<float>(in[d]) * scale;
    for (; d < Dp; ++d) out[d] = 0.f;
  }
}

// src [rows, D] (row stride ld) -> dst fp32 [Dp, cols] transposed (dst[d][r]), zero-padded
// Strips of 16 source rows: the strip stays in L1 while each of its columns is written as
// one 64-byte run (a column-at-a-time walk over all rows misses the cache on every read once
// rows * ld outgrows it: 20x slower for a 2048-row cache).
// (O = uint32_t with T = uint32_t moves 32-bit words as they are: bf16 pairs, read with
// memcpy since a bf16 tensor need only be 2-byte aligned)
template <typename T, typename O>
inline O load_elem(const T* p) {
  if constexpr (std::is_same_v<T, uint32_t>) {
    uint32_t w;
    std::memcpy(&w, p, sizeof w);
    return w;
  } else {
    return static_cast<O>(*p);
  }
}

template <typename T, typename O = float>
void load_cols(const T* src, int64_t ld, int64_t rows, int64_t D, int64_t Dp, int64_t cols, O* dst) {
  constexpr int64_t kStrip = 16;
  for (int64_t r0 = 0; r0 < cols; r0 += kStrip) {
    const int64_t r1 = std::min(r0 + kStrip, cols), live = std::min(r1, rows);
    for (int64_t d = 0; d < Dp; ++d) {
      O* out = dst + d * cols;
      if (d < D) {
        for (int64_t r = r0; r < live; ++r) out[r] = load_elem<T, O>(src + r * ld + d);
        for (int64_t r = std::max(live, r0); r < r1; ++r) out[r] = O(0);
      } else {
        for (int64_t r = r0; r < r1; ++r) out[r] = O(0);
      }
    }
  }
}

// Keys as the B of q K^T, tile-major: [Skp / kBlockK][Dp][kBlockK], tile t the keys
// [t kBlockK, (t + 1) kBlockK) transposed, zero-padded (Dp: elements, or bf16 words, per key).
// Each tile is one contiguous block; a [Dp, Skp] copy put a tile's rows Skp apart, a
// power-of-two stride for 4096 keys (and more), whose rows shared a few cache sets.
template <typename T, typename O = float>
void load_key_tiles(const T* src, int64_t ld, int64_t rows, int64_t D, int64_t Dp, int64_t Skp, O* dst) {
  for (int64_t j0 = 0; j0 < Skp; j0 += kBlockK)
    load_cols(src + j0 * ld, ld, std::max<int64_t>(rows - j0, 0), D, Dp, kBlockK, dst + j0 * Dp);
}

#ifdef MPTK_BF16_PAIRS
// dst[0, n) = src rounded to bf16 (nearest even), a chunk at a time; n a multiple of the chunk
inline void round_to_bf16(const float* src, int64_t n, c10::BFloat16* dst) {
  using IO = ChunkIO<c10::BFloat16, float>;
  for (int64_t i = 0; i < n; i += IO::kChunk) IO::store(dst + i, Vf::loadu(src + i), Vf::loadu(src + i + kW));
}

// src bf16 [rows, D] (row stride ld) -> dst [ceil(cols / 2), Dp] words, rows 2u and 2u + 1
// interleaved: dst[u][d] = (src[2u][d], src[2u + 1][d]), zeros past rows and D. The B of
// P V on vdpbf16ps, whose k (the key) runs over word pairs.
void load_row_pairs(const c10::BFloat16* src, int64_t ld, int64_t rows, int64_t D, int64_t Dp, int64_t cols,
                    uint32_t* dst) {
  const auto* s16 = reinterpret_cast<const uint16_t*>(src);
  for (int64_t u = 0; u < (cols + 1) / 2; ++u) {
    const int64_t r = 2 * u;
    for (int64_t d = 0; d < Dp; ++d) {
      const uint32_t lo = r < rows && d < D ? s16[r * ld + d] : 0u;
      const uint32_t hi = r + 1 < rows && d < D ? s16[(r + 1) * ld + d] : 0u;
      dst[u * Dp + d] = lo | (hi << 16);
    }
  }
}
#endif

// One sequence: its query rows [q0, q0 + Sq) and key rows [k0, k0 + Sk) in the token
// dimension of q and of k/v, and where its lse lives (lse[lse0 + h * lse_head_stride + i]).
// A paged KV cache (pages != null): key j is logical row k0 + j of the sequence, which lives in
// token pages[(k0 + j) / page_rows] * page_rows + (k0 + j) % page_rows of the cache (key_tokens).
struct Seq {
  int64_t q0, Sq, k0, Sk, lse0;
  const int32_t* pages = nullptr;
  int64_t page_rows = 0;
  int64_t offset() const { return Sk - Sq; }  // bottom-right alignment
  // the tokens of keys [j0, j0 + n) (rows of the cache's token dimension) into tok: one
  // division per call, not one per key (a decode tile of 64 keys spent more on 128 divisions
  // than on its dot products)
  void key_tokens(int64_t j0, int64_t n, int64_t* tok) const {
    if (!pages) {
      for (int64_t c = 0; c < n; ++c) tok[c] = k0 + j0 + c;
      return;
    }
    int64_t p = (k0 + j0) / page_rows, o = (k0 + j0) % page_rows;
    for (int64_t c = 0; c < n; ++c) {
      tok[c] = static_cast<int64_t>(pages[p]) * page_rows + o;
      if (++o == page_rows) o = 0, ++p;
    }
  }
};

struct Geometry {
  int64_t Hq, Hk, D, Dp, group, lse_head_stride, max_Sq, max_Skp;
  float scale;
  // the keys a query sees: -left <= rel <= right with rel = j - i - offset (-1: unbounded;
  // causal is right = 0), and the scores' softcap (0: none)
  int64_t left, right;
  float softcap;
  std::vector<Seq> seqs;
  // keys visible to query row i of s: key_begin(s, i) <= j < key_end(s, i)
  int64_t key_end(const Seq& s, int64_t i) const {
    return right < 0 ? s.Sk : std::clamp<int64_t>(i + s.offset() + right + 1, 0, s.Sk);
  }
  int64_t key_begin(const Seq& s, int64_t i) const {
    return left < 0 ? 0 : std::clamp<int64_t>(i + s.offset() - left, 0, s.Sk);
  }
  void finish() {  // the padded sizes of the largest sequence
    max_Sq = 0, max_Skp = kBlockK;
    for (const Seq& s : seqs) max_Sq = std::max(max_Sq, s.Sq), max_Skp = std::max(max_Skp, round_up(s.Sk, kBlockK));
  }
};

// tanh(x) = 1 - 2 / (exp(2x) + 1) on the softmax's fast exp: a tenth of the cost of a
// libm-grade tanh, and within 1e-7 of it in absolute terms (what a capped score needs: the
// cap multiplies an absolute error, and scores meet the softmax as differences)
inline Vf fast_tanh(const Vf& x) {
  const Vf one(1.f);
  return one - Vf(2.f) / ((x + x).exp_u20() + one);
}

// scores tile [bq, kBlockK] for query rows [i0, i0 + bq) and keys [j0, j0 + kBlockK), in
// place: times scale (1 where it is folded into q), softcap (g.softcap * tanh(s / g.softcap);
// with dcap, 1 - tanh^2 is stored there, the cap's derivative, for the backward), then the
// ALiBi bias -slope * |j - i - offset| and the masks (window / causal, padding past Sk).
inline void bias_and_mask(float* S, int64_t bq, int64_t i0, int64_t j0, const Geometry& g, const Seq& s,
                          float slope, float scale = 1.f, float* dcap = nullptr) {
  alignas(64) static thread_local float ramp[kBlockK];
  const bool has_bias = slope != 0.f;
  if (has_bias)
    for (int64_t c = 0; c < kBlockK; ++c) ramp[c] = static_cast<float>(c);
  const float cap = g.softcap;
  for (int64_t r = 0; r < bq; ++r) {
    const int64_t i = i0 + r;
    const int64_t first = g.key_begin(s, i) - j0, end = g.key_end(s, i) - j0;  // columns [first, end) are visible
    float* row = S + r * kBlockK;
    if (scale != 1.f)
      for (int64_t c = 0; c < kBlockK; c += kW) (Vf::loadu(row + c) * Vf(scale)).store(row + c);
    if (cap > 0.f) {
      for (int64_t c = 0; c < kBlockK; c += kW) {
        const Vf t = fast_tanh(Vf::loadu(row + c) * Vf(1.f / cap));
        (t * Vf(cap)).store(row + c);
        if (dcap) (Vf(1.f) - t * t).store(dcap + r * kBlockK + c);
      }
    }
    if (has_bias) {  // rel = base + c over the tile's columns
      const Vf base(static_cast<float>(j0 - i - s.offset())), neg_slope(-slope);
      for (int64_t c = 0; c < kBlockK; c += kW)
        (Vf::loadu(row + c) + neg_slope * (base + Vf::loadu(ramp + c)).abs()).store(row + c);
    }
    for (int64_t c = 0; c < std::clamp<int64_t>(first, 0, kBlockK); ++c) row[c] = kNegInf;
    for (int64_t c = std::max<int64_t>(end, 0); c < kBlockK; ++c) row[c] = kNegInf;
  }
}

inline float slope_of(const float* slopes, bool per_batch, const Geometry& g, int64_t b, int64_t h) {
  return slopes ? slopes[(per_batch ? b * g.Hq : 0) + h] : 0.f;
}

// offsets of each sequence's fp32 K^T / V copies ([Hk, Dp, Skp_s] each) in one buffer
inline std::vector<int64_t> kv_buffer_offsets(const Geometry& g) {
  std::vector<int64_t> off(g.seqs.size() + 1, 0);
  for (size_t s = 0; s < g.seqs.size(); ++s) off[s + 1] = off[s] + g.Hk * g.Dp * round_up(g.seqs[s].Sk, kBlockK);
  return off;
}

// Online softmax over one [bq, kBlockK] score tile: the row maxima m and sums l absorb the
// tile, acc (bq x Dp) is rescaled to the new maxima, and S is overwritten with the tile's
// probabilities (0 in rows that have seen no visible key yet), ready for acc += S V.
inline void softmax_update(float* S, int64_t bq, float* m, float* l, float* acc, int64_t Dp) {
  for (int64_t r = 0; r < bq; ++r) {
    float* row = S + r * kBlockK;
    Vf vmax(m[r]);
    for (int64_t c = 0; c < kBlockK; c += kW) vmax = at::vec::maximum(vmax, Vf::loadu(row + c));
    const float mx = at::vec::vec_reduce_all<float>([](Vf& a, Vf& bb) { return at::vec::maximum(a, bb); }, vmax);
    if (mx == kNegInf) {  // nothing visible yet in this row: exp(-inf) = 0 adds nothing
      std::fill(row, row + kBlockK, 0.f);
      continue;
    }
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
      for (int64_t d = 0; d < Dp; d += kW) (Vf::loadu(acc + r * Dp + d) * Vf(corr)).store(acc + r * Dp + d);
  }
}

// out = acc / l and lse = m + log(l); a row that saw no key returns zeros and lse = -inf
template <typename T>
inline void write_row(T* out, float* lse, const float* acc, float m, float l, int64_t D) {
  const float inv = l > 0.f ? 1.f / l : 0.f;
  for (int64_t d = 0; d < D; ++d) out[d] = static_cast<T>(acc[d] * inv);
  if (lse) *lse = l > 0.f ? m + std::log(l) : kNegInf;
}

// Decoding (a few query rows per sequence over a long cache): a task per (sequence, kv
// head) takes every q head of the group and every query token as its rows, so each key and
// value row is read and converted once, straight from the cache (no padded fp32 copy of
// the whole cache, which would cost more than the attention). Scores are dot products along
// head_dim; the softmax and the P V update are the forward's.
constexpr int64_t kDecodeMaxQ = 4;

// Where a decode tile's key (or value) rows are, as fp32 rows of Dp floats: rows c of a
// contiguous cache are evenly spaced (Strided), a paged cache's are found one by one
// (Gathered, through an array of row addresses). Contiguous caches keep the strided form: an
// address per key cost 5-15% of a decode step (fp32 GQA, bf16) in an A/B against it.
struct Strided {
  const float* base;
  int64_t ld;
  const float* operator[](int64_t c) const { return base + c * ld; }
};
struct Gathered {
  const float* const* row;
  const float* operator[](int64_t c) const { return row[c]; }
};

// rows [0, n) of a contiguous cache (src, row stride ld): read in place when they already are
// fp32 rows of Dp floats (head_dim a multiple of the vector width: a copy measured 1.1-1.8x
// slower), else converted into buf
template <typename T>
inline Strided cache_rows(const T* src, int64_t ld, int64_t n, int64_t D, int64_t Dp, float* buf) {
  if constexpr (std::is_same_v<T, float>) {
    if (D == Dp) return {src, ld};
  }
  load_rows(src, ld, n, D, Dp, 1.f, buf);
  return {buf, Dp};
}

// the same for n rows anywhere (src[c]: a row of a page), converted a run of consecutive rows
// (a page's) at a time; rows[c] receives each row's address
template <typename T>
inline Gathered cache_rows(const T* const* src, int64_t ld, int64_t n, int64_t D, int64_t Dp, float* buf,
                           const float** rows) {
  if constexpr (std::is_same_v<T, float>) {
    if (D == Dp) return {src};  // in place: the row addresses as they are
  }
  for (int64_t c = 0, run; c < n; c += run) {
    for (run = 1; c + run < n && src[c + run] == src[c] + run * ld;) ++run;
    const Strided r = cache_rows(src[c], ld, run, D, Dp, buf + c * Dp);
    for (int64_t i = 0; i < run; ++i) rows[c + i] = r[i];
  }
  return {rows};
}

// S[r][c] = q_r . k_c for the rows q_r = q + r * Dp and the nk key rows k_c = krows[c]
// (fp32, Dp wide; Rows: Strided or Gathered; S rows kBlockK apart). On AVX-512 in groups of 16 keys, every row against
// a group while it is in L1, whose 16 sums are reduced together by a transpose-add tree into
// one vector (45 instructions for 16 scores, where a horizontal sum per score costs ~8 each).
template <typename Rows>
inline void decode_scores(const float* q, int64_t rows, const Rows& krows, int64_t nk, int64_t Dp, float* S) {
  int64_t c = 0;
#if defined(CPU_CAPABILITY_AVX512)
  for (; c + 16 <= nk; c += 16)
    for (int64_t r = 0; r < rows; ++r) {
      const float* qr = q + r * Dp;
      float* srow = S + r * kBlockK;
      __m512 a[16];
      for (int i = 0; i < 16; ++i) a[i] = _mm512_setzero_ps();
      for (int64_t d = 0; d < Dp; d += 16) {
        const __m512 qv = _mm512_loadu_ps(qr + d);
        for (int i = 0; i < 16; ++i) a[i] = _mm512_fmadd_ps(qv, _mm512_loadu_ps(krows[c + i] + d), a[i]);
      }
      __m512 t[8], u[4];
      for (int i = 0; i < 8; ++i)  // per 128-bit lane: [a0+a2, b0+b2, a1+a3, b1+b3] of keys 2i, 2i + 1
        t[i] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * i], a[2 * i + 1]), _mm512_unpackhi_ps(a[2 * i], a[2 * i + 1]));
      for (int i = 0; i < 4; ++i) {  // per 128-bit lane: the lane's sums of keys 4i .. 4i + 3
        const __m512d x = _mm512_castps_pd(t[2 * i]), y = _mm512_castps_pd(t[2 * i + 1]);
        u[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
      }
      // add the four 128-bit lanes: lane j of the result holds keys 4j .. 4j + 3
      const __m512 w01 = _mm512_add_ps(_mm512_shuffle_f32x4(u[0], u[1], 0x88), _mm512_shuffle_f32x4(u[0], u[1], 0xdd));
      const __m512 w23 = _mm512_add_ps(_mm512_shuffle_f32x4(u[2], u[3], 0x88), _mm512_shuffle_f32x4(u[2], u[3], 0xdd));
      const __m512 sums = _mm512_add_ps(_mm512_shuffle_f32x4(w01, w23, 0x88), _mm512_shuffle_f32x4(w01, w23, 0xdd));
      _mm512_storeu_ps(srow + c, sums);
    }
#endif
  for (; c < nk; ++c)
    for (int64_t r = 0; r < rows; ++r) {
      const float* k = krows[c];
      Vf dot(0.f);
      for (int64_t d = 0; d < Dp; d += kW) dot = at::vec::fmadd(Vf::loadu(q + r * Dp + d), Vf::loadu(k + d), dot);
      S[r * kBlockK + c] = at::vec::vec_reduce_all<float>([](Vf& x, Vf& y) { return x + y; }, dot);
    }
}

// a[0, NV kW) += sum over the nk keys of p[c] * v_c[0, NV kW): the accumulators stay in
// registers for the whole block (one load and store of a, not one per key)
constexpr int kPvVecs = kW >= 16 ? 8 : 4;  // accumulators + a broadcast + a load within the registers
template <int NV, typename Rows>
inline void decode_pv(const float* p, const Rows& vrows, int64_t v0, int64_t nk, float* a) {
  Vf acc[NV];
  for (int v = 0; v < NV; ++v) acc[v] = Vf::loadu(a + v * kW);
  for (int64_t c = 0; c < nk; ++c) {
    if (p[c] == 0.f) continue;  // masked keys (the causal edge, or nothing visible)
    const Vf pc(p[c]);
    for (int v = 0; v < NV; ++v) acc[v] = at::vec::fmadd(pc, Vf::loadu(vrows[c] + v0 + v * kW), acc[v]);
  }
  for (int v = 0; v < NV; ++v) acc[v].store(a + v * kW);
}

// (all three kernels) sequence s of g is query rows [s.q0, s.q0 + s.Sq) and key rows
// [s.k0, s.k0 + s.Sk) of the token dimension; lse of its row i, head h at
// lp[s.lse0 + h * g.lse_head_stride + i]
// The arguments of attention_decode_impl and attention_fwd_impl, the same for both:
//   qp [tokens_q, Hq, D]; kp, vp [tokens_k, Hk, D]; slopes [Hq], [B, Hq] when
//   slopes_per_batch, or null; op [tokens_q, Hq, D]; lp the lse, [Hq, tokens_q] or [B, Hq, Sq]
template <typename T>
void attention_decode_impl(const T* qp, const T* kp, const T* vp, const float* slopes, bool slopes_per_batch,
                           const Geometry& g, T* op, float* lp) {
  const int64_t D = g.D, Dp = g.Dp, nseq = static_cast<int64_t>(g.seqs.size());
  const int64_t qrow = g.Hq * D, krow = g.Hk * D;
  // a decode step is often a few microseconds of work: hand a thread at least ~64k
  // multiply-adds, since waking one costs more than that (and far more on a busy machine)
  const int64_t per_task = std::max<int64_t>(1, g.max_Sq * g.group * (g.max_Skp) * Dp * 2);
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / per_task);
  at::parallel_for(0, nseq * g.Hk, grain, [&](int64_t t0, int64_t t1) {
    const int64_t R = g.max_Sq * g.group;  // rows: (token t, head in group) -> r = t * group + gi
    std::vector<float> qt(R * Dp), acc(R * Dp), S(R * kBlockK), m(R), l(R), slope(R), kv(kBlockK * Dp);
    std::vector<const T*> ksrc(kBlockK), vsrc(kBlockK);
    std::vector<int64_t> tok(kBlockK);
    std::vector<const float*> krows(kBlockK), vrows(kBlockK);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / g.Hk, hk = t % g.Hk;
      const Seq& s = g.seqs[b];
      const int64_t rows = s.Sq * g.group;
      if (rows == 0) continue;
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t i = r / g.group, h = hk * g.group + r % g.group;
        load_rows(qp + ((s.q0 + i) * g.Hq + h) * D, qrow, 1, D, Dp, g.scale, qt.data() + r * Dp);
        slope[r] = slope_of(slopes, slopes_per_batch, g, b, h);
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      std::fill(m.begin(), m.end(), kNegInf);
      std::fill(l.begin(), l.end(), 0.f);
      // the keys any row sees: from the first token's window start to the last token's end
      const int64_t j_begin = g.key_begin(s, 0), j_end = g.key_end(s, s.Sq - 1);
      const int64_t first = s.pages ? 0 : (s.k0 * g.Hk + hk) * D;  // a contiguous cache's key 0 of this head
      const T* kbase = kp + first;
      const T* vbase = vp + first;
      for (int64_t j0 = j_begin; j0 < j_end; j0 += kBlockK) {
        const int64_t nk = std::min(kBlockK, s.Sk - j0);
        // one tile: scores, bias and mask, softmax, then P V (V converted after the scores, into
        // the same buffer as K); K and V are the tile's row accessors
        auto tile = [&](const auto& K, auto&& values) {
          decode_scores(qt.data(), rows, K, nk, Dp, S.data());
          for (int64_t r = 0; r < rows; ++r) {
            float* srow = S.data() + r * kBlockK;
            std::fill(srow + nk, srow + kBlockK, 0.f);  // masked below (past Sk)
            bias_and_mask(srow, 1, r / g.group, j0, g, s, slope[r]);
          }
          softmax_update(S.data(), rows, m.data(), l.data(), acc.data(), Dp);
          const auto V = values();
          for (int64_t r = 0; r < rows; ++r) {
            const float* p = S.data() + r * kBlockK;
            float* a = acc.data() + r * Dp;
            int64_t v0 = 0;  // in vectors of head_dim: kPvVecs at a time, then the rest at once
            for (; v0 + kPvVecs <= Dp / kW; v0 += kPvVecs) decode_pv<kPvVecs>(p, V, v0 * kW, nk, a + v0 * kW);
            switch (Dp / kW - v0) {
              case 7: decode_pv<7>(p, V, v0 * kW, nk, a + v0 * kW); break;
              case 6: decode_pv<6>(p, V, v0 * kW, nk, a + v0 * kW); break;
              case 5: decode_pv<5>(p, V, v0 * kW, nk, a + v0 * kW); break;
              case 4: decode_pv<4>(p, V, v0 * kW, nk, a + v0 * kW); break;
              case 3: decode_pv<3>(p, V, v0 * kW, nk, a + v0 * kW); break;
              case 2: decode_pv<2>(p, V, v0 * kW, nk, a + v0 * kW); break;
              case 1: decode_pv<1>(p, V, v0 * kW, nk, a + v0 * kW); break;
              default: break;
            }
          }
        };
        if (s.pages) {  // each key's row in its page
          s.key_tokens(j0, nk, tok.data());
          for (int64_t c = 0; c < nk; ++c) {
            const int64_t at = (tok[c] * g.Hk + hk) * D;
            ksrc[c] = kp + at, vsrc[c] = vp + at;
            // the hardware prefetcher loses the stream at every page: ask for the values (read
            // after the scores) now
            for (int64_t e = 0; e < D * static_cast<int64_t>(sizeof(T)); e += 64)
              __builtin_prefetch(reinterpret_cast<const char*>(vsrc[c]) + e);
          }
          tile(cache_rows(ksrc.data(), krow, nk, D, Dp, kv.data(), krows.data()),
               [&] { return cache_rows(vsrc.data(), krow, nk, D, Dp, kv.data(), vrows.data()); });
        } else {
          tile(cache_rows(kbase + j0 * krow, krow, nk, D, Dp, kv.data()),
               [&] { return cache_rows(vbase + j0 * krow, krow, nk, D, Dp, kv.data()); });
        }
      }
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t i = r / g.group, h = hk * g.group + r % g.group;
        write_row(op + ((s.q0 + i) * g.Hq + h) * D, lp ? lp + s.lse0 + h * g.lse_head_stride + i : nullptr,
                  acc.data() + r * Dp, m[r], l[r], D);
      }
    }
  });
}

template <typename T>
void attention_fwd_impl(const T* qp, const T* kp, const T* vp, const float* slopes, bool slopes_per_batch,
                        const Geometry& g, T* op, float* lp) {  // the arguments: above attention_decode_impl
  // bf16 at the avx512_bf16 level: both GEMMs on vdpbf16ps with bf16 operands as
  // they are (q read in place, K^T and V as word pairs), P rounded to bf16 for P V, as
  // FlashAttention does on GPUs; fp32 sums and softmax. Else everything in fp32.
#ifdef MPTK_BF16_PAIRS
  constexpr bool kBf16 = std::is_same_v<T, c10::BFloat16>;
#else
  constexpr bool kBf16 = false;
#endif
  const int64_t D = g.D, Dp = g.Dp, nseq = static_cast<int64_t>(g.seqs.size());
  const int64_t qrow = g.Hq * D, krow = g.Hk * D;
  // K^T and V of every (sequence, kv head), padded: fp32 key tiles [Skp_s / kBlockK][Dp][kBlockK]
  // (load_key_tiles) and [Skp_s, Dp], or bf16 pairs: key tiles of Dp / 2 words (k-steps along
  // head_dim) and [Skp_s / 2, Dp] (along keys)
  const std::vector<int64_t> buf = kv_buffer_offsets(g);
  std::vector<float> kt(buf.back()), vv(buf.back());
  at::parallel_for(0, nseq * g.Hk, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const Seq& s = g.seqs[t / g.Hk];
      const int64_t h = t % g.Hk, Skp = round_up(s.Sk, kBlockK);
      const int64_t src = (s.k0 * g.Hk + h) * D;  // k[k0, h, 0]
      float* ktp = kt.data() + buf[t / g.Hk] + h * Dp * Skp;
      float* vvp = vv.data() + buf[t / g.Hk] + h * Skp * Dp;
      if constexpr (kBf16) {
#ifdef MPTK_BF16_PAIRS
        // D is even (a multiple of 8): a row of k is D / 2 words
        load_key_tiles(reinterpret_cast<const uint32_t*>(kp + src), krow / 2, s.Sk, D / 2, Dp / 2, Skp,
                       reinterpret_cast<uint32_t*>(ktp));
        load_row_pairs(vp + src, krow, s.Sk, D, Dp, Skp, reinterpret_cast<uint32_t*>(vvp));
#endif
      } else {
        load_key_tiles(kp + src, krow, s.Sk, D, Dp, Skp, ktp);
        load_rows(vp + src, krow, s.Sk, D, Dp, 1.f, vvp);
        std::fill(vvp + s.Sk * Dp, vvp + Skp * Dp, 0.f);
      }
    }
  });
  const int64_t n_qblocks = (g.max_Sq + kBlockQ - 1) / kBlockQ;
  at::parallel_for(0, nseq * g.Hq * n_qblocks, 1, [&](int64_t w0, int64_t w1) {
    std::vector<float> qt(kBf16 ? 0 : kBlockQ * Dp), S(kBlockQ * kBlockK), acc(kBlockQ * Dp), m(kBlockQ), l(kBlockQ);
    std::vector<T> P(kBf16 ? kBlockQ * kBlockK : 0);  // the probabilities rounded for P V
    for (int64_t w = w0; w < w1; ++w) {
      const int64_t qb = w % n_qblocks, h = (w / n_qblocks) % g.Hq, b = w / (n_qblocks * g.Hq);
      const Seq& s = g.seqs[b];
      const int64_t i0 = qb * kBlockQ;
      if (i0 >= s.Sq) continue;  // a shorter sequence of a packed batch
      const int64_t bq = std::min(kBlockQ, s.Sq - i0), Skp = round_up(s.Sk, kBlockK);
      const float* ktp = kt.data() + buf[b] + (h / g.group) * Dp * Skp;
      const float* vvp = vv.data() + buf[b] + (h / g.group) * Skp * Dp;
      const float slope = slope_of(slopes, slopes_per_batch, g, b, h);
      const T* qrows = qp + ((s.q0 + i0) * g.Hq + h) * D;
      // fp32: the softmax scale is folded into q; bf16 reads q in place and scales the scores
      if constexpr (!kBf16) load_rows(qrows, qrow, bq, D, Dp, g.scale, qt.data());
      std::fill(acc.begin(), acc.end(), 0.f);
      std::fill(m.begin(), m.end(), kNegInf);
      std::fill(l.begin(), l.end(), 0.f);
      // the block's first row has the first window start, its last row the last visible key;
      // tiles start on kBlockK multiples (the padded K^T / V copies' columns)
      const int64_t j_begin = g.key_begin(s, i0) / kBlockK * kBlockK, j_end = g.key_end(s, i0 + bq - 1);
      for (int64_t j0 = j_begin; j0 < j_end; j0 += kBlockK) {
        if constexpr (kBf16) {
#ifdef MPTK_BF16_PAIRS
          gemm<Bf16Pairs>(bq, kBlockK, D / 2, qrows, qrow, ktp + j0 * (Dp / 2), kBlockK, S.data(), kBlockK, false);
          bias_and_mask(S.data(), bq, i0, j0, g, s, slope, g.scale);
          softmax_update(S.data(), bq, m.data(), l.data(), acc.data(), Dp);
          round_to_bf16(S.data(), bq * kBlockK, P.data());
          gemm<Bf16Pairs>(bq, Dp, kBlockK / 2, P.data(), kBlockK, vvp + (j0 / 2) * Dp, Dp, acc.data(), Dp, true);
#endif
        } else {
          gemm(bq, kBlockK, Dp, qt.data(), Dp, ktp + j0 * Dp, kBlockK, S.data(), kBlockK, false);
          bias_and_mask(S.data(), bq, i0, j0, g, s, slope);
          softmax_update(S.data(), bq, m.data(), l.data(), acc.data(), Dp);
          gemm(bq, Dp, kBlockK, S.data(), kBlockK, vvp + j0 * Dp, Dp, acc.data(), Dp, true);
        }
      }
      for (int64_t r = 0; r < bq; ++r)
        write_row(op + ((s.q0 + i0 + r) * g.Hq + h) * D, lp ? lp + s.lse0 + h * g.lse_head_stride + i0 + r : nullptr,
                  acc.data() + r * Dp, m[r], l[r], D);
    }
  });
}

// t[c][r] = s[r][c] in O (float, or bf16 rounded to nearest even) for the tile's kBlockK
// columns and its rows r < bq, zeros for bq <= r < rows (rows <= kBlockQ; s rows kBlockK
// apart, t rows kBlockQ apart). AVX-512: 16 x 16 blocks through registers (a scalar copy took
// about as long as the backward's GEMMs).
template <typename O>
inline void transpose_tile(const float* src, int64_t bq, int64_t rows, O* t) {
#if defined(CPU_CAPABILITY_AVX512)
  for (int64_t r0 = 0; r0 < rows; r0 += 16) {
    for (int64_t c0 = 0; c0 < kBlockK; c0 += 16) {
      __m512i v[16];
      for (int i = 0; i < 16; ++i)
        v[i] = r0 + i < bq ? _mm512_loadu_si512(src + (r0 + i) * kBlockK + c0) : _mm512_setzero_si512();
      transpose_16x16_words(v);  // v[j]: column c0 + j, rows r0 .. r0 + 15
      for (int j = 0; j < 16; ++j) {
        O* dst = t + (c0 + j) * kBlockQ + r0;
        if constexpr (std::is_same_v<O, float>) {
          _mm512_storeu_ps(dst, _mm512_castsi512_ps(v[j]));
        } else {
#ifdef MPTK_BF16_PAIRS
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), (__m256i)_mm512_cvtneps_pbh(_mm512_castsi512_ps(v[j])));
#endif
        }
      }
    }
  }
#else
  for (int64_t c = 0; c < kBlockK; ++c) {
    for (int64_t r = 0; r < bq; ++r) t[c * kBlockQ + r] = static_cast<O>(src[r * kBlockK + c]);
    for (int64_t r = bq; r < rows; ++r) t[c * kBlockQ + r] = O(0);
  }
#endif
}

template <typename T>
void attention_bwd_impl(const T* dop,         // [tokens_q, Hq, D]
                        const T* qp,          // [tokens_q, Hq, D]
                        const T* kp,          // [tokens_k, Hk, D]
                        const T* vp,          // [tokens_k, Hk, D]
                        const T* op,          // [tokens_q, Hq, D] the forward's out
                        const float* lp,      // the forward's lse, [Hq, tokens_q] or [B, Hq, Sq]
                        const float* dlp,     // the gradient of lse, lse's layout, or null
                        const float* slopes,  // [Hq], [B, Hq] when slopes_per_batch, or null
                        bool slopes_per_batch,
                        const Geometry& g,
                        T* dqp,               // [tokens_q, Hq, D]
                        T* dkp,               // [tokens_k, Hk, D]
                        T* dvp) {             // [tokens_k, Hk, D]
  // bf16 at the avx512_bf16 level: the five tile GEMMs on vdpbf16ps, q and dO read
  // in place as A, K^T / V^T / K as word pairs, P and dS rounded to bf16 (as FlashAttention
  // does on GPUs), q and dO pairs per query block as the B of dK and dV; fp32 sums, softmax
  // and delta. Else everything in fp32.
#ifdef MPTK_BF16_PAIRS
  constexpr bool kBf16 = std::is_same_v<T, c10::BFloat16>;
  using A16 = std::conditional_t<kBf16, c10::BFloat16, float>;  // the GEMMs' A operand type
  using Dot = std::conditional_t<kBf16, Bf16Pairs, F32Words>;
#else
  constexpr bool kBf16 = false;
  using A16 = float;
  using Dot = F32Words;
#endif
  constexpr int64_t kPer = Dot::kPerWord;  // elements of a GEMM k-step
  const int64_t D = g.D, Dp = g.Dp, nseq = static_cast<int64_t>(g.seqs.size());
  const int64_t krow = g.Hk * D, qrow = g.Hq * D;
  const bool capped = g.softcap > 0.f;
  at::parallel_for(0, nseq * g.Hk, 1, [&](int64_t t0, int64_t t1) {
    const int64_t maxp = g.max_Skp;
    std::vector<float> kt(Dp * maxp), kr(maxp * Dp), vt(Dp * maxp), dk_acc(maxp * Dp), dv_acc(maxp * Dp);
    std::vector<float> qt(kBlockQ * Dp), dot(kBlockQ * Dp), dq_acc(kBlockQ * Dp), S(kBlockQ * kBlockK),
        dP(kBlockQ * kBlockK), delta(kBlockQ), lrow(kBlockQ), dcap(capped ? kBlockQ * kBlockK : 0);
    // transposed tiles (P^T, dS^T: A of dV and dK) and dS (A of dQ), in the GEMMs' A type
    std::vector<A16> sT(kBlockK * kBlockQ), dS16(kBf16 ? kBlockQ * kBlockK : 0);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / g.Hk, hk = t % g.Hk;
      const Seq& s = g.seqs[b];
      const int64_t Skp = round_up(s.Sk, kBlockK);
      const int64_t kbase = (s.k0 * g.Hk + hk) * D;
      if constexpr (kBf16) {
#ifdef MPTK_BF16_PAIRS
        load_key_tiles(reinterpret_cast<const uint32_t*>(kp + kbase), krow / 2, s.Sk, D / 2, Dp / 2, Skp,
                       reinterpret_cast<uint32_t*>(kt.data()));
        load_key_tiles(reinterpret_cast<const uint32_t*>(vp + kbase), krow / 2, s.Sk, D / 2, Dp / 2, Skp,
                       reinterpret_cast<uint32_t*>(vt.data()));
        load_row_pairs(kp + kbase, krow, s.Sk, D, Dp, Skp, reinterpret_cast<uint32_t*>(kr.data()));
#endif
      } else {
        load_key_tiles(kp + kbase, krow, s.Sk, D, Dp, Skp, kt.data());
        load_key_tiles(vp + kbase, krow, s.Sk, D, Dp, Skp, vt.data());
        load_rows(kp + kbase, krow, s.Sk, D, Dp, 1.f, kr.data());
        std::fill(kr.begin() + s.Sk * Dp, kr.begin() + Skp * Dp, 0.f);
      }
      std::fill(dk_acc.begin(), dk_acc.begin() + Skp * Dp, 0.f);
      std::fill(dv_acc.begin(), dv_acc.begin() + Skp * Dp, 0.f);
      for (int64_t h = hk * g.group; h < (hk + 1) * g.group; ++h) {
        const float slope = slope_of(slopes, slopes_per_batch, g, b, h);
        for (int64_t i0 = 0; i0 < s.Sq; i0 += kBlockQ) {
          const int64_t bq = std::min(kBlockQ, s.Sq - i0);
          const int64_t qoff = ((s.q0 + i0) * g.Hq + h) * D;
          // A and B operands of this query block: fp32 copies (q scaled: dK = dS^T q_scaled),
          // or bf16 q and dO in place as A and their row pairs as B (q unscaled: dK scaled at the end)
          const A16* qa;
          const A16* da;
          int64_t lda_q;
          if constexpr (kBf16) {
#ifdef MPTK_BF16_PAIRS
            qa = qp + qoff, da = dop + qoff, lda_q = qrow;
            load_row_pairs(qp + qoff, qrow, bq, D, Dp, kBlockQ, reinterpret_cast<uint32_t*>(qt.data()));
            load_row_pairs(dop + qoff, qrow, bq, D, Dp, kBlockQ, reinterpret_cast<uint32_t*>(dot.data()));
#endif
          } else {
            load_rows(qp + qoff, qrow, bq, D, Dp, g.scale, qt.data());
            load_rows(dop + qoff, qrow, bq, D, Dp, 1.f, dot.data());
            qa = reinterpret_cast<const A16*>(qt.data()), da = reinterpret_cast<const A16*>(dot.data()), lda_q = Dp;
          }
          std::fill(dq_acc.begin(), dq_acc.end(), 0.f);
          for (int64_t r = 0; r < bq; ++r) {  // delta_i = rowsum(dO * O)
            float sum = 0.f;
            for (int64_t d = 0; d < D; ++d)
              sum += static_cast<float>(dop[qoff + r * qrow + d]) * static_cast<float>(op[qoff + r * qrow + d]);
            // a gradient reaching the lse adds dlse * P to dS: the same as lowering delta by it
            delta[r] = sum - (dlp ? dlp[s.lse0 + h * g.lse_head_stride + i0 + r] : 0.f);
            lrow[r] = lp[s.lse0 + h * g.lse_head_stride + i0 + r];
          }
          const int64_t j_begin = g.key_begin(s, i0) / kBlockK * kBlockK, j_end = g.key_end(s, i0 + bq - 1);
          const int64_t wq = (bq + kPer - 1) / kPer;  // k-steps over the block's query rows
          for (int64_t j0 = j_begin; j0 < j_end; j0 += kBlockK) {
            // S = q K^T (the bf16 path scales here, as the forward does)
            gemm<Dot>(bq, kBlockK, kBf16 ? D / 2 : Dp, qa, lda_q, kt.data() + j0 * (kBf16 ? Dp / 2 : Dp), kBlockK, S.data(),
                      kBlockK, false);
            bias_and_mask(S.data(), bq, i0, j0, g, s, slope, kBf16 ? g.scale : 1.f, capped ? dcap.data() : nullptr);
            for (int64_t r = 0; r < bq; ++r) {  // P = exp(S - lse); a row with lse = -inf has P = 0
              float* row = S.data() + r * kBlockK;
              if (lrow[r] == kNegInf) {
                std::fill(row, row + kBlockK, 0.f);
                continue;
              }
              for (int64_t c = 0; c < kBlockK; c += kW) (Vf::loadu(row + c) - Vf(lrow[r])).exp_u20().store(row + c);
            }
            // dP = dO V^T; dS = P * (dP - delta), written over dP
            gemm<Dot>(bq, kBlockK, kBf16 ? D / 2 : Dp, da, lda_q, vt.data() + j0 * (kBf16 ? Dp / 2 : Dp), kBlockK, dP.data(),
                      kBlockK, false);
            for (int64_t r = 0; r < bq; ++r)
              for (int64_t c = 0; c < kBlockK; ++c) dP[r * kBlockK + c] = S[r * kBlockK + c] * (dP[r * kBlockK + c] - delta[r]);
            if (capped)  // through the cap: d(cap * tanh(s / cap)) / ds = 1 - tanh^2
              for (int64_t e = 0; e < bq * kBlockK; ++e) dP[e] *= dcap[e];
            // dV += P^T dO and dK += dS^T q, through a transposed copy of each tile (the query
            // columns past bq zero: a bf16 k-step pairs an odd last row with nothing)
            transpose_tile(S.data(), bq, wq * kPer, sT.data());
            gemm<Dot>(kBlockK, Dp, wq, sT.data(), kBlockQ, dot.data(), Dp, dv_acc.data() + j0 * Dp, Dp, true);
            transpose_tile(dP.data(), bq, wq * kPer, sT.data());
            gemm<Dot>(kBlockK, Dp, wq, sT.data(), kBlockQ, qt.data(), Dp, dk_acc.data() + j0 * Dp, Dp, true);
            // dQ += dS K
            if constexpr (kBf16) {
#ifdef MPTK_BF16_PAIRS
              round_to_bf16(dP.data(), bq * kBlockK, dS16.data());
#endif
              gemm<Dot>(bq, Dp, kBlockK / 2, dS16.data(), kBlockK, kr.data() + (j0 / 2) * Dp, Dp, dq_acc.data(), Dp,
                        true);
            } else {
              gemm<Dot>(bq, Dp, kBlockK, reinterpret_cast<const A16*>(dP.data()), kBlockK, kr.data() + j0 * Dp, Dp,
                        dq_acc.data(), Dp, true);
            }
          }
          for (int64_t r = 0; r < bq; ++r)
            for (int64_t d = 0; d < D; ++d) dqp[qoff + r * qrow + d] = static_cast<T>(dq_acc[r * Dp + d] * g.scale);
        }
      }
      const float dk_scale = kBf16 ? g.scale : 1.f;  // the bf16 path multiplied by unscaled q
      for (int64_t j = 0; j < s.Sk; ++j)
        for (int64_t d = 0; d < D; ++d) {
          dkp[kbase + j * krow + d] = static_cast<T>(dk_acc[j * Dp + d] * dk_scale);
          dvp[kbase + j * krow + d] = static_cast<T>(dv_acc[j * Dp + d]);
        }
    }
  });
}

Geometry geometry(int64_t Hq, int64_t Hk, int64_t D, double softmax_scale, bool causal, int64_t window_left,
                  int64_t window_right, double softcap) {
  Geometry g;
  g.Hq = Hq, g.Hk = Hk, g.D = D;
  g.Dp = round_up(std::max<int64_t>(D, 1), kW);
  g.group = Hq / Hk;
  g.scale = static_cast<float>(softmax_scale);
  g.left = window_left;
  g.right = causal ? 0 : window_right;
  g.softcap = static_cast<float>(softcap);
  return g;
}

// padded batch: q (B, Sq, Hq, D), k (B, Sk, Hk, D), lse (B, Hq, Sq)
Geometry batch_geometry(const at::Tensor& q, const at::Tensor& k, double softmax_scale, bool causal,
                        int64_t window_left, int64_t window_right, double softcap) {
  Geometry g = geometry(q.size(2), k.size(2), q.size(3), softmax_scale, causal, window_left, window_right, softcap);
  const int64_t B = q.size(0), Sq = q.size(1), Sk = k.size(1);
  g.lse_head_stride = Sq;
  for (int64_t b = 0; b < B; ++b) g.seqs.push_back({b * Sq, Sq, b * Sk, Sk, b * g.Hq * Sq});
  g.finish();
  return g;
}

// cu_seqlens: int32 (B + 1,) offsets on the CPU (mptkernels/ops/attention.py has checked them:
// non-decreasing from 0, each length <= its max_seqlen, the last <= the tensor's tokens)
std::vector<int64_t> read_cu_seqlens(const at::Tensor& cu) {
  const at::Tensor c = cu.contiguous();
  const int32_t* p = c.const_data_ptr<int32_t>();
  return std::vector<int64_t>(p, p + c.size(0));
}

// packed: q (total_q, Hq, D), k (total_k, Hk, D), lse (Hq, total_q)
Geometry varlen_geometry(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cu_q, const at::Tensor& cu_k,
                         double softmax_scale, bool causal, int64_t window_left, int64_t window_right,
                         double softcap) {
  const auto cq = read_cu_seqlens(cu_q), ck = read_cu_seqlens(cu_k);
  Geometry g = geometry(q.size(1), k.size(1), q.size(2), softmax_scale, causal, window_left, window_right, softcap);
  g.lse_head_stride = q.size(0);
  for (size_t b = 0; b + 1 < cq.size(); ++b) g.seqs.push_back({cq[b], cq[b + 1] - cq[b], ck[b], ck[b + 1] - ck[b], cq[b]});
  g.finish();
  return g;
}

void run_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& alibi,
             const Geometry& g, at::Tensor& out, float* lse) {
  const float* slopes = alibi ? alibi->const_data_ptr<float>() : nullptr;
  const bool per_batch = alibi && alibi->dim() == 2;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "mptkernels_attention_fwd", [&] {
    auto impl = g.max_Sq <= kDecodeMaxQ ? &attention_decode_impl<scalar_t> : &attention_fwd_impl<scalar_t>;
    impl(q.const_data_ptr<scalar_t>(), k.const_data_ptr<scalar_t>(), v.const_data_ptr<scalar_t>(), slopes, per_batch,
         g, out.mutable_data_ptr<scalar_t>(), lse);
  });
}

void run_bwd(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
             const at::Tensor& out, const at::Tensor& lse, const std::optional<at::Tensor>& dlse,
             const std::optional<at::Tensor>& alibi, const Geometry& g, at::Tensor& dq, at::Tensor& dk,
             at::Tensor& dv) {
  const float* slopes = alibi ? alibi->const_data_ptr<float>() : nullptr;
  const bool per_batch = alibi && alibi->dim() == 2;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "mptkernels_attention_bwd", [&] {
    attention_bwd_impl<scalar_t>(dout.const_data_ptr<scalar_t>(), q.const_data_ptr<scalar_t>(),
                                 k.const_data_ptr<scalar_t>(), v.const_data_ptr<scalar_t>(),
                                 out.const_data_ptr<scalar_t>(), lse.const_data_ptr<float>(),
                                 dlse ? dlse->const_data_ptr<float>() : nullptr, slopes, per_batch, g,
                                 dq.mutable_data_ptr<scalar_t>(), dk.mutable_data_ptr<scalar_t>(),
                                 dv.mutable_data_ptr<scalar_t>());
  });
}

std::tuple<at::Tensor, at::Tensor> attention_fwd_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                     const std::optional<at::Tensor>& alibi_slopes,
                                                     double softmax_scale, bool causal, int64_t window_left,
                                                     int64_t window_right, double softcap) {
  const Geometry g = batch_geometry(q, k, softmax_scale, causal, window_left, window_right, softcap);
  at::Tensor out = at::empty(q.sizes(), q.options());
  at::Tensor lse = at::empty({q.size(0), q.size(2), q.size(1)}, q.options().dtype(at::kFloat));
  if (q.numel() > 0) run_fwd(q, k, v, alibi_slopes, g, out, lse.mutable_data_ptr<float>());
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd_cpu(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const std::optional<at::Tensor>& alibi_slopes, double softmax_scale, bool causal,
    int64_t window_left, int64_t window_right, double softcap, const std::optional<at::Tensor>& dlse) {
  const Geometry g = batch_geometry(q, k, softmax_scale, causal, window_left, window_right, softcap);
  at::Tensor dq = at::empty(q.sizes(), q.options()), dk = at::empty(k.sizes(), k.options()),
             dv = at::empty(v.sizes(), v.options());
  if (q.numel() == 0 || k.numel() == 0) {
    dq.zero_(), dk.zero_(), dv.zero_();
    return {dq, dk, dv};
  }
  run_bwd(dout, q, k, v, out, lse, dlse, alibi_slopes, g, dq, dk, dv);
  return {dq, dk, dv};
}

std::tuple<at::Tensor, at::Tensor> attention_varlen_fwd_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_seqlens_q,
    const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k,
    const std::optional<at::Tensor>& alibi_slopes, double softmax_scale, bool causal, int64_t window_left,
    int64_t window_right, double softcap) {
  const Geometry g =
      varlen_geometry(q, k, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal, window_left, window_right, softcap);
  // rows past cu_seqlens_q[-1] belong to no sequence: zeros (lse -inf), like an empty row
  at::Tensor out = at::zeros(q.sizes(), q.options());
  at::Tensor lse = at::full({q.size(1), q.size(0)}, -std::numeric_limits<double>::infinity(),
                            q.options().dtype(at::kFloat));
  if (q.numel() > 0) run_fwd(q, k, v, alibi_slopes, g, out, lse.mutable_data_ptr<float>());
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_varlen_bwd_cpu(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
    int64_t max_seqlen_k, const std::optional<at::Tensor>& alibi_slopes, double softmax_scale, bool causal,
    int64_t window_left, int64_t window_right, double softcap, const std::optional<at::Tensor>& dlse) {
  const Geometry g =
      varlen_geometry(q, k, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal, window_left, window_right, softcap);
  // tokens outside every sequence get zero gradients
  at::Tensor dq = at::zeros(q.sizes(), q.options()), dk = at::zeros(k.sizes(), k.options()),
             dv = at::zeros(v.sizes(), v.options());
  if (q.numel() > 0 && k.numel() > 0) run_bwd(dout, q, k, v, out, lse, dlse, alibi_slopes, g, dq, dk, dv);
  return {dq, dk, dv};
}

// x rotated by the CPU kernel of apply_rotary (the one implementation of the rotation): token t
// of sequence b at row offsets[b] + t of the cos/sin tables
at::Tensor rotate(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& offsets,
                  bool interleaved) {
  return active_kernels().apply_rotary(x, cos, sin, offsets, 0, interleaved, false);
}

// KV cache (flash_attn_with_kvcache; schema in csrc/registration.cpp): rotates q and the new
// k, writes k, v into the caches at logical rows [cache_seqlens[b], + Sn) of sequence b (all
// writes first, in batch order), then attends q over rows [cache_leftpad[b], cache_seqlens[b]
// + Sn). Sequence b's rows are batch row cache_batch_idx[b] of a contiguous cache, or pages of
// a paged one (Seq::key_tokens). Decoding reads pages in place; a prefill over pages (more
// query tokens than the decode path takes) first gathers them, as it copies K and V anyway.
std::tuple<at::Tensor, at::Tensor> attention_kvcache_cpu(
    const at::Tensor& q, at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& cache_seqlens,
    const std::optional<at::Tensor>& k, const std::optional<at::Tensor>& v,
    const std::optional<at::Tensor>& alibi_slopes, double softmax_scale, bool causal, int64_t window_left,
    int64_t window_right, double softcap, const std::optional<at::Tensor>& rotary_cos,
    const std::optional<at::Tensor>& rotary_sin, bool rotary_interleaved,
    const std::optional<at::Tensor>& cache_batch_idx, const std::optional<at::Tensor>& cache_leftpad,
    const std::optional<at::Tensor>& block_table) {
  const int64_t B = q.size(0), Sq = q.size(1), Hq = q.size(2), D = q.size(3), Sn = k ? k->size(1) : 0;
  const int64_t Hk = k_cache.size(2), rows = k_cache.size(1), Bc = k_cache.size(0);
  const bool paged = block_table.has_value();
  const int64_t capacity = paged ? block_table->size(1) * rows : rows;
  const at::Tensor lens = cache_seqlens.contiguous();
  const int32_t* lp = lens.const_data_ptr<int32_t>();
  const at::Tensor pad_t = cache_leftpad ? cache_leftpad->contiguous() : at::Tensor();
  const at::Tensor idx_t = cache_batch_idx ? cache_batch_idx->contiguous() : at::Tensor();
  const at::Tensor table = paged ? block_table->contiguous() : at::Tensor();
  const int32_t* pad = cache_leftpad ? pad_t.const_data_ptr<int32_t>() : nullptr;
  const int32_t* idx = cache_batch_idx ? idx_t.const_data_ptr<int32_t>() : nullptr;
  // ops/attention.py checked these with messages; again here, so no value reaches memory outside the caches
  std::vector<Seq> logical(B);  // sequence b's rows from its cache's row 0 (writes use these)
  for (int64_t b = 0; b < B; ++b) {
    const int64_t start = pad ? pad[b] : 0, end = lp[b] + Sn;
    TORCH_CHECK(lp[b] >= 0 && end <= capacity && 0 <= start && start <= lp[b],
                "attention_with_kvcache: sequence ", b, "'s rows [", start, ", ", end, ") do not fit the cache");
    Seq& s = logical[b];
    s.k0 = 0;
    if (paged) {
      s.pages = table.const_data_ptr<int32_t>() + b * table.size(1), s.page_rows = rows;
      for (int64_t p = start / rows; p < (end + rows - 1) / rows; ++p)
        TORCH_CHECK(s.pages[p] >= 0 && s.pages[p] < Bc, "attention_with_kvcache: block_table[", b, "][", p,
                    "] = ", s.pages[p], " is not a page of the cache");
    } else {
      const int64_t cb = idx ? idx[b] : b;
      TORCH_CHECK(cb >= 0 && cb < Bc, "attention_with_kvcache: cache_batch_idx[", b, "] = ", cb, " is outside the cache");
      s.k0 = cb * rows;
    }
  }
  at::Tensor qr = q;
  std::optional<at::Tensor> kn = k;
  if (rotary_cos) {
    kn = rotate(*k, *rotary_cos, *rotary_sin, lens, rotary_interleaved);
    if (causal || window_left >= 0 || window_right >= 0)
      qr = rotate(q, *rotary_cos, *rotary_sin, lens, rotary_interleaved);
    else  // every query token at the first new token's position: the tokens as heads of one
      qr = rotate(q.reshape({B, 1, Sq * Hq, D}), *rotary_cos, *rotary_sin, lens, rotary_interleaved).view(q.sizes());
  }
  if (Sn > 0) {
    const int64_t row_bytes = Hk * D * k_cache.element_size();
    const at::Tensor kc = kn->contiguous(), vc = v->contiguous();
    auto* kdst = static_cast<char*>(k_cache.data_ptr());
    auto* vdst = static_cast<char*>(v_cache.data_ptr());
    const auto* ksrc = static_cast<const char*>(kc.const_data_ptr());
    const auto* vsrc = static_cast<const char*>(vc.const_data_ptr());
    std::vector<int64_t> tok(Sn);
    for (int64_t b = 0; b < B; ++b) {
      logical[b].key_tokens(lp[b], Sn, tok.data());
      for (int64_t t = 0; t < Sn; ++t) {
        const int64_t src = (b * Sn + t) * row_bytes;
        std::memcpy(kdst + tok[t] * row_bytes, ksrc + src, row_bytes);
        std::memcpy(vdst + tok[t] * row_bytes, vsrc + src, row_bytes);
      }
    }
  }
  Geometry g = geometry(Hq, Hk, D, softmax_scale, causal, window_left, window_right, softcap);
  g.lse_head_stride = Sq;
  for (int64_t b = 0; b < B; ++b) {
    Seq s = logical[b];
    const int64_t start = pad ? pad[b] : 0;
    s.q0 = b * Sq, s.Sq = Sq, s.Sk = lp[b] + Sn - start, s.lse0 = b * Hq * Sq;
    s.k0 += start;
    g.seqs.push_back(s);
  }
  g.finish();
  at::Tensor out = at::empty(q.sizes(), q.options());
  at::Tensor lse = at::empty({B, Hq, Sq}, q.options().dtype(at::kFloat));
  if (q.numel() == 0) return {out, lse};
  if (paged && g.max_Sq > kDecodeMaxQ) {  // the prefill path reads rows in place: gather each sequence's pages
    std::vector<int64_t> tokens;
    for (Seq& s : g.seqs) {
      const int64_t first = static_cast<int64_t>(tokens.size());
      tokens.resize(first + s.Sk);
      s.key_tokens(0, s.Sk, tokens.data() + first);
      s.pages = nullptr, s.k0 = first;
    }
    const at::Tensor where = at::tensor(tokens, q.options().dtype(at::kLong));
    const at::Tensor kg = k_cache.view({-1, Hk, D}).index_select(0, where);
    const at::Tensor vg = v_cache.view({-1, Hk, D}).index_select(0, where);
    run_fwd(qr.contiguous(), kg, vg, alibi_slopes, g, out, lse.mutable_data_ptr<float>());
  } else {
    run_fwd(qr.contiguous(), k_cache, v_cache, alibi_slopes, g, out, lse.mutable_data_ptr<float>());
  }
  return {out, lse};
}

}  // namespace

// this level's entries of the kernel table (cpu/kernels.h)
void add_attention(Kernels& k) {
  k.attention_fwd = &attention_fwd_cpu;
  k.attention_bwd = &attention_bwd_cpu;
  k.attention_varlen_fwd = &attention_varlen_fwd_cpu;
  k.attention_varlen_bwd = &attention_varlen_bwd_cpu;
  k.attention_with_kvcache = &attention_kvcache_cpu;
}

}  // namespace mptk::cpu::CPU_CAPABILITY

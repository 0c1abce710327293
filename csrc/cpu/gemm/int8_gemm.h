// The GEMM family's int8 GEMM core (see gemm.h): C (M, N) = a (M, K) @ b (N, K)^T exact in
// int32, each run of results handed to an epilogue while in cache (int8_linear.cpp: int8_mm's
// int32 store, int8_linear's scales + bias + activation). Two designs: with AVX512-VNNI and 16
// or more rows, outer products on 64-row panels of b packed per task (vpdpbusd, no horizontal
// sums); otherwise register-blocked dot products of MR rows of a with NR rows of b (vpdpbusd
// or vpmaddwd), whose lanes are summed once per output at the end of K. Templates on the
// epilogue, so it inlines into the tiles.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "cpu/gemm/gemm.h"
#include "cpu/gemm/panel_gemm.h"  // pack_words_x64

namespace mptk::cpu::CPU_CAPABILITY {
namespace {  // internal to each including file: see gemm.h

// ---------------------------------------------------------------- int8 GEMM core
// Three microkernels, by what the build enables:
// * AVX512-VNNI: vpdpbusd multiplies 64 u8 x s8 pairs into 16 int32 lanes (4 products per
//   lane, no saturation). A is shifted to unsigned (a + 128 in [1, 255]) and the shift taken
//   back out exactly at the end: sum((a + 128) b) - 128 sum(b), with sum(b) per B row
//   precomputed. Operands stay 8-bit (half the bytes of the int16 path).
// * AVX-512BW / AVX2: both operands widened to int16, vpmaddwd (32 / 16 pairs per
//   instruction) plus an add.
// * otherwise scalar.
#if defined(CPU_CAPABILITY_AVX512) && defined(__AVX512VNNI__)
#define MPTK_INT8_VNNI 1
using Elem = int8_t;       // B as is; A stored as uint8 in int8 storage (a + 128)
constexpr int64_t kKStep = 64;
constexpr int kMR = 4, kNR = 4;
using VI = __m512i;
inline VI vzero() { return _mm512_setzero_si512(); }
inline VI vload(const Elem* p) { return _mm512_loadu_si512(p); }
inline VI vdot(VI acc, VI a, VI b) { return _mm512_dpbusd_epi32(acc, a, b); }
inline int32_t vsum(VI v) { return _mm512_reduce_add_epi32(v); }
#elif defined(CPU_CAPABILITY_AVX512)
using Elem = int16_t;
constexpr int64_t kKStep = 32;  // int16 per zmm
constexpr int kMR = 4, kNR = 4;  // 16 accumulators + 4 A + 1 B of 32 registers
using VI = __m512i;
inline VI vzero() { return _mm512_setzero_si512(); }
inline VI vload(const Elem* p) { return _mm512_loadu_si512(p); }
inline VI vdot(VI acc, VI a, VI b) { return _mm512_add_epi32(acc, _mm512_madd_epi16(a, b)); }
inline int32_t vsum(VI v) { return _mm512_reduce_add_epi32(v); }
#elif defined(CPU_CAPABILITY_AVX2)
using Elem = int16_t;
constexpr int64_t kKStep = 16;
constexpr int kMR = 2, kNR = 4;  // 8 accumulators + 2 A + 1 B of 16 registers
using VI = __m256i;
inline VI vzero() { return _mm256_setzero_si256(); }
inline VI vload(const Elem* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
inline VI vdot(VI acc, VI a, VI b) { return _mm256_add_epi32(acc, _mm256_madd_epi16(a, b)); }
inline int32_t vsum(VI v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
  return _mm_cvtsi128_si32(s);
}
#else
using Elem = int16_t;
constexpr int64_t kKStep = 8;
constexpr int kMR = 1, kNR = 1;
#endif

#if defined(CPU_CAPABILITY_AVX512)
// the sums of four accumulators' lanes at once: [sum(a), sum(b), sum(c), sum(d)]
inline __m128i vsum4(__m512i a, __m512i b, __m512i c, __m512i d) {
  const __m512i ab = _mm512_add_epi32(_mm512_unpacklo_epi32(a, b), _mm512_unpackhi_epi32(a, b));
  const __m512i cd = _mm512_add_epi32(_mm512_unpacklo_epi32(c, d), _mm512_unpackhi_epi32(c, d));
  const __m512i abcd = _mm512_add_epi32(_mm512_unpacklo_epi64(ab, cd), _mm512_unpackhi_epi64(ab, cd));
  const __m256i s = _mm256_add_epi32(_mm512_castsi512_si256(abcd), _mm512_extracti64x4_epi64(abcd, 1));
  return _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
}
#endif

#ifdef MPTK_INT8_VNNI
constexpr int32_t kAShift = 128;
#else
constexpr int32_t kAShift = 0;
#endif

// one row of pack_int8 (a function of its own with restrict pointers: inside the
// parallel_for lambda GCC reloaded the captured sizes after every byte store, which may alias
// them, and never vectorised)
inline void pack_int8_row(const int8_t* __restrict s,  // [K]
                          Elem* __restrict d,          // [Kp]
                          int64_t K, int64_t Kp, int32_t shift) {
  if constexpr (std::is_same_v<Elem, int8_t>) {
    // shift is 0 or 128, and adding 128 to an int8 flips its top bit
    const int8_t flip = shift ? static_cast<int8_t>(0x80) : int8_t(0);
    for (int64_t k = 0; k < K; ++k) d[k] = static_cast<int8_t>(s[k] ^ flip);
  } else {
    for (int64_t k = 0; k < K; ++k) d[k] = static_cast<Elem>(s[k] + shift);
  }
  for (int64_t k = K; k < Kp; ++k) d[k] = 0;
}

// int8 (rows, K) -> the microkernel's operand layout (rows, Kp), zero-padded along K:
// Elem-typed copies, A shifted by `shift` (padding stays 0 in the shifted domain too, so it
// adds nothing: the shift correction below only counts real columns of B)
inline at::Tensor pack_int8(const at::Tensor& t, int64_t Kp, int32_t shift) {  // t: [rows, K] -> [rows, Kp]
  const int64_t R = t.size(0), K = t.size(1);
  at::Tensor out = at::empty({R, Kp}, t.options().dtype(std::is_same_v<Elem, int8_t> ? at::kChar : at::kShort));
  const at::Tensor tc = t.contiguous();
  const int8_t* src = tc.const_data_ptr<int8_t>();
  Elem* dst = static_cast<Elem*>(out.data_ptr());
  at::parallel_for(0, R, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) pack_int8_row(src + r * K, dst + r * Kp, K, Kp, shift);
  });
  return out;
}

// An int8 GEMM hands its exact int32 results to an epilogue epi(m, n0, values, count):
// outputs (m, n0), ..., (m, n0 + count - 1) of C, count <= kPanelMaxRun. emit hands over one.
constexpr int64_t kPanelMaxRun = 64;
template <typename Epi>
inline void emit(Epi& epi, int64_t m, int64_t n, int32_t v) {
  epi(m, n, &v, 1);
}

// C tile [MR x NR] = A rows [m0, m0 + MR) . B rows [n0, n0 + NR) over Kp (exact int32),
// handed to epi. corr[n] undoes A's shift.
template <int MR, int NR, typename Epi>
MPTK_NOINLINE MPTK_FLATTEN void int8_tile(const Elem* A,         // [M, Kp] packed
                                            const Elem* B,         // [N, Kp] packed
                                            const int32_t* corr,   // [N]
                                            int64_t Kp, int64_t m0, int64_t n0, Epi& epi) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  if constexpr (MR == 4 && NR == 4) {
    // the full tile spelled out: with an array of accumulators GCC shuffles every one of
    // them through a register copy per step (3 moves per multiply-add, measured 2x slower)
    const Elem *a0 = A + m0 * Kp, *a1 = a0 + Kp, *a2 = a1 + Kp, *a3 = a2 + Kp;
    const Elem *b0 = B + n0 * Kp, *b1 = b0 + Kp, *b2 = b1 + Kp, *b3 = b2 + Kp;
    VI c00 = vzero(), c01 = vzero(), c02 = vzero(), c03 = vzero(), c10 = vzero(), c11 = vzero(), c12 = vzero(),
       c13 = vzero(), c20 = vzero(), c21 = vzero(), c22 = vzero(), c23 = vzero(), c30 = vzero(), c31 = vzero(),
       c32 = vzero(), c33 = vzero();
    for (int64_t k = 0; k < Kp; k += kKStep) {
      const VI x0 = vload(a0 + k), x1 = vload(a1 + k), x2 = vload(a2 + k), x3 = vload(a3 + k);
      VI y = vload(b0 + k);
      c00 = vdot(c00, x0, y), c10 = vdot(c10, x1, y), c20 = vdot(c20, x2, y), c30 = vdot(c30, x3, y);
      y = vload(b1 + k);
      c01 = vdot(c01, x0, y), c11 = vdot(c11, x1, y), c21 = vdot(c21, x2, y), c31 = vdot(c31, x3, y);
      y = vload(b2 + k);
      c02 = vdot(c02, x0, y), c12 = vdot(c12, x1, y), c22 = vdot(c22, x2, y), c32 = vdot(c32, x3, y);
      y = vload(b3 + k);
      c03 = vdot(c03, x0, y), c13 = vdot(c13, x1, y), c23 = vdot(c23, x2, y), c33 = vdot(c33, x3, y);
    }
#if defined(CPU_CAPABILITY_AVX512)
    // the 16 lane sums four accumulators at a time (one shuffle tree, not four)
    const VI c[4][4] = {{c00, c01, c02, c03}, {c10, c11, c12, c13}, {c20, c21, c22, c23}, {c30, c31, c32, c33}};
    alignas(16) int32_t sums[4];
    for (int r = 0; r < 4; ++r) {
      _mm_store_si128(reinterpret_cast<__m128i*>(sums), vsum4(c[r][0], c[r][1], c[r][2], c[r][3]));
      for (int cc = 0; cc < 4; ++cc) sums[cc] -= corr[n0 + cc];
      epi(m0 + r, n0, sums, 4);
    }
#else
    const VI c[4][4] = {{c00, c01, c02, c03}, {c10, c11, c12, c13}, {c20, c21, c22, c23}, {c30, c31, c32, c33}};
    for (int r = 0; r < 4; ++r)
      for (int cc = 0; cc < 4; ++cc) emit(epi, m0 + r, n0 + cc, vsum(c[r][cc]) - corr[n0 + cc]);
#endif
    return;
  }
  if constexpr (MR == 2 && NR == 4) {  // AVX2's full tile, spelled out for the same reason
    const Elem *a0 = A + m0 * Kp, *a1 = a0 + Kp;
    const Elem *b0 = B + n0 * Kp, *b1 = b0 + Kp, *b2 = b1 + Kp, *b3 = b2 + Kp;
    VI c00 = vzero(), c01 = vzero(), c02 = vzero(), c03 = vzero(), c10 = vzero(), c11 = vzero(), c12 = vzero(),
       c13 = vzero();
    for (int64_t k = 0; k < Kp; k += kKStep) {
      const VI x0 = vload(a0 + k), x1 = vload(a1 + k);
      VI y = vload(b0 + k);
      c00 = vdot(c00, x0, y), c10 = vdot(c10, x1, y);
      y = vload(b1 + k);
      c01 = vdot(c01, x0, y), c11 = vdot(c11, x1, y);
      y = vload(b2 + k);
      c02 = vdot(c02, x0, y), c12 = vdot(c12, x1, y);
      y = vload(b3 + k);
      c03 = vdot(c03, x0, y), c13 = vdot(c13, x1, y);
    }
    const VI c[2][4] = {{c00, c01, c02, c03}, {c10, c11, c12, c13}};
    for (int r = 0; r < 2; ++r)
      for (int cc = 0; cc < 4; ++cc) emit(epi, m0 + r, n0 + cc, vsum(c[r][cc]) - corr[n0 + cc]);
    return;
  }
  VI acc[MR][NR];
  for (int r = 0; r < MR; ++r)
    for (int c = 0; c < NR; ++c) acc[r][c] = vzero();
  const Elem* a = A + m0 * Kp;
  const Elem* b = B + n0 * Kp;
  for (int64_t k = 0; k < Kp; k += kKStep) {
    VI av[MR];
    for (int r = 0; r < MR; ++r) av[r] = vload(a + r * Kp + k);
    for (int c = 0; c < NR; ++c) {
      const VI bv = vload(b + c * Kp + k);
      for (int r = 0; r < MR; ++r) acc[r][c] = vdot(acc[r][c], av[r], bv);
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int c = 0; c < NR; ++c) emit(epi, m0 + r, n0 + c, vsum(acc[r][c]) - corr[n0 + c]);
#else
  for (int r = 0; r < MR; ++r)
    for (int c = 0; c < NR; ++c) {
      int32_t s = 0;
      for (int64_t k = 0; k < Kp; ++k) s += int32_t(A[(m0 + r) * Kp + k]) * int32_t(B[(n0 + c) * Kp + k]);
      emit(epi, m0 + r, n0 + c, s - corr[n0 + c]);
    }
#endif
}

#ifdef MPTK_INT8_VNNI
// ---- many rows of A, VNNI: outer products on panels of B
// The dot-product tiles above sum each accumulator's lanes at the end and read 4 B rows from
// L2 per 16 multiply-adds (67% of vpdpbusd's peak at 512x2048x2048). Here each task packs 64
// rows of B (a panel) into [Kp/4][64][4] (4 consecutive k of 64 rows per 256 bytes, via
// 16x16 transposes of 4-byte words), and a 6 x 64 tile of C stays in 24 registers: per 4
// k-steps, 4 vector loads of the panel and 6 broadcasts of 4 bytes of A feed 24 vpdpbusd,
// and the lanes are the 64 outputs (no horizontal sums). K goes in blocks of kPanelKc so the
// panel's block stays in L1 while the rows of A pass; partial sums between blocks wait in a
// per-task buffer. Measured 94% of vpdpbusd's peak on one core (the bench in docs/benchmarks.md).
constexpr int64_t kPanel = kPanelMaxRun;  // B rows per panel: four vectors of 16 int32 outputs
static_assert(kPanel == 64, "pack_words_x64 packs 64 rows");
constexpr int kPanelMR = 6;            // A rows per tile: 6 x 4 = 24 accumulators of 32 registers
constexpr int64_t kPanelKc = 2048;     // k per block: 128 KB of panel (L2; 1024 or 512 measured no faster)
constexpr int64_t kPanelMChunk = 192;  // A rows per task (several tasks per panel when N is small)
constexpr int64_t kPanelMinRows = 16;  // fewer rows: the dot-product tiles (no panel packing)

// rows [n0, n0 + 64) of B (N, K) -> P[Kp/4][64][4] (zeros past N and K), and
// corr[j] = 128 * sum_k B[n0 + j][k] (what A's +128 shift adds)
inline void pack_panel(const int8_t* B,  // [N, K]
                       int64_t N, int64_t K, int64_t n0, int64_t Kp,
                       int8_t* P,       // [Kp / 4, 64, 4]
                       int32_t* corr) {  // [64]
  const int64_t rows = std::min<int64_t>(kPanel, N - n0), K64 = K / 64 * 64;
  // words of 4 int8 k-steps, 16 words (64 k) per transpose
  pack_words_x64(reinterpret_cast<const char*>(B + n0 * K), K, rows, K64 / 4, reinterpret_cast<char*>(P));
  for (int64_t k4 = K64 / 4; k4 < Kp / 4; ++k4)  // the last k (and the padding) one byte at a time
    for (int64_t j = 0; j < kPanel; ++j)
      for (int64_t c = 0; c < 4; ++c) {
        const int64_t k = k4 * 4 + c;
        P[(k4 * kPanel + j) * 4 + c] = (j < rows && k < K) ? B[(n0 + j) * K + k] : int8_t(0);
      }
  const __m512i shift = _mm512_set1_epi8(static_cast<char>(kAShift));
  for (int g = 0; g < 4; ++g) {
    __m512i c = _mm512_setzero_si512();
    for (int64_t k4 = 0; k4 < Kp / 4; ++k4)
      c = _mm512_dpbusd_epi32(c, shift, _mm512_loadu_si512(P + (k4 * kPanel + g * 16) * 4));
    _mm512_storeu_si512(corr + g * 16, c);
  }
}

// C rows [m, m + MR) x the panel's 64 columns, over k4 in [k4a, k4b): accumulators start from
// -corr (first block) or the partial sums in part and go back to part; after the last block
// also to epi. A is shifted (uint8 in int8 storage), row stride lda.
template <int MR, typename Epi>
inline void panel_tile(const Elem* A,       // [MR, lda] shifted
                       int64_t lda,
                       const int8_t* P,     // [Kp / 4, 64, 4] packed panel
                       int64_t k4a, int64_t k4b,
                       int32_t* part,       // [MR, 64] partial sums
                       const int32_t* corr,  // [64]
                       bool first, bool last, int64_t m, int64_t n0, int64_t cols, Epi& epi) {
  __m512i acc[MR][4];
  for (int r = 0; r < MR; ++r)
    for (int c = 0; c < 4; ++c)
      acc[r][c] = first ? _mm512_sub_epi32(_mm512_setzero_si512(), _mm512_loadu_si512(corr + c * 16))
                        : _mm512_loadu_si512(part + r * kPanel + c * 16);
  const int8_t* p = P + k4a * kPanel * 4;
  for (int64_t k4 = k4a; k4 < k4b; ++k4, p += kPanel * 4) {
    const __m512i b0 = _mm512_loadu_si512(p), b1 = _mm512_loadu_si512(p + 64), b2 = _mm512_loadu_si512(p + 128),
                  b3 = _mm512_loadu_si512(p + 192);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      int32_t word;
      std::memcpy(&word, A + r * lda + k4 * 4, 4);
      const __m512i a = _mm512_set1_epi32(word);
      acc[r][0] = _mm512_dpbusd_epi32(acc[r][0], a, b0);
      acc[r][1] = _mm512_dpbusd_epi32(acc[r][1], a, b1);
      acc[r][2] = _mm512_dpbusd_epi32(acc[r][2], a, b2);
      acc[r][3] = _mm512_dpbusd_epi32(acc[r][3], a, b3);
    }
  }
  // through part in every case: an accumulator read after a call (epi) or on one branch only
  // makes GCC keep the whole array in memory
  for (int r = 0; r < MR; ++r)
    for (int c = 0; c < 4; ++c) _mm512_storeu_si512(part + r * kPanel + c * 16, acc[r][c]);
  if (last)
    for (int r = 0; r < MR; ++r) epi(m + r, n0, part + r * kPanel, cols);
}

template <typename Epi>
void int8_gemm_panels(const at::Tensor& a,  // [M, K] int8
                      const at::Tensor& b,  // [N, K] int8
                      Epi& epi) {
  const int64_t M = a.size(0), N = b.size(0), K = a.size(1);
  const int64_t Kp = (K + 3) / 4 * 4;
  const at::Tensor A = pack_int8(a, Kp, kAShift);
  const at::Tensor bc = b.contiguous();
  const Elem* Ap = static_cast<const Elem*>(A.const_data_ptr());
  const int8_t* Bp = bc.const_data_ptr<int8_t>();
  const int64_t n_panels = (N + kPanel - 1) / kPanel, n_chunks = (M + kPanelMChunk - 1) / kPanelMChunk;
  // tasks run panel-major, so the chunks of one panel go to one thread and it packs the
  // panel once (a thread repacks only where its range starts inside a panel)
  at::parallel_for(0, n_panels * n_chunks, 1, [&](int64_t t0, int64_t t1) {
    std::vector<int8_t> P(Kp * kPanel);
    std::vector<int32_t> part(kPanelMChunk * kPanel);
    alignas(64) int32_t corr[kPanel];
    int64_t packed = -1;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t panel = t / n_chunks, n0 = panel * kPanel, cols = std::min(kPanel, N - n0);
      if (panel != packed) pack_panel(Bp, N, K, n0, Kp, P.data(), corr), packed = panel;
      const int64_t mb = t % n_chunks * kPanelMChunk, me = std::min(M, mb + kPanelMChunk);
      for (int64_t k4a = 0; k4a < Kp / 4; k4a += kPanelKc / 4) {
        const int64_t k4b = std::min(Kp / 4, k4a + kPanelKc / 4);
        const bool first = k4a == 0, last = k4b == Kp / 4;
        int64_t m = mb;
        for (; m + kPanelMR <= me; m += kPanelMR)
          panel_tile<kPanelMR>(Ap + m * Kp, Kp, P.data(), k4a, k4b, part.data() + (m - mb) * kPanel, corr, first,
                               last, m, n0, cols, epi);
        for (; m < me; ++m)  // the last rows one at a time
          panel_tile<1>(Ap + m * Kp, Kp, P.data(), k4a, k4b, part.data() + (m - mb) * kPanel, corr, first, last, m,
                        n0, cols, epi);
      }
    }
  });
}
#endif

// Runs the whole (M, N) product in tiles. Parallel over groups of B rows; inside a group,
// each MR-row strip of A (in L1) meets every NR-row panel of the group (the group's B, 64
// rows, stays in L2), so A is read from memory once per group rather than once per panel.
template <typename Epi>
void int8_gemm(const at::Tensor& a,  // [M, K] int8
               const at::Tensor& b,  // [N, K] int8
               Epi epi) {
  const int64_t M = a.size(0), N = b.size(0), K = a.size(1);
#ifdef MPTK_INT8_VNNI
  if (M >= kPanelMinRows) return int8_gemm_panels(a, b, epi);
#endif
  const int64_t Kp = (K + kKStep - 1) / kKStep * kKStep;
  const at::Tensor A = pack_int8(a, Kp, kAShift);
  // an int8 B whose rows are already whole vectors is the operand as is (a weight usually is)
  const bool b_as_is = std::is_same_v<Elem, int8_t> && Kp == K && b.is_contiguous();
  const at::Tensor B = b_as_is ? b : pack_int8(b, Kp, 0);
  const Elem* Ap = static_cast<const Elem*>(A.const_data_ptr());
  const Elem* Bp = static_cast<const Elem*>(B.const_data_ptr());
  // corr[n] = shift * sum_k b[n][k]
  std::vector<int32_t> corr(N, 0);
  if (kAShift != 0) {
    const at::Tensor bc = b.contiguous();
    const int8_t* bp = bc.const_data_ptr<int8_t>();
    at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) {
      for (int64_t n = n0; n < n1; ++n) {
        int32_t s = 0;
        for (int64_t k = 0; k < K; ++k) s += bp[n * K + k];
        corr[n] = kAShift * s;
      }
    });
  }
  const int32_t* cp = corr.data();
  constexpr int64_t kGroup = 16 * kNR;  // B rows per task
  const int64_t n_groups = (N + kGroup - 1) / kGroup;
  at::parallel_for(0, n_groups, 1, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) {
      const int64_t nb = g * kGroup, ne = std::min(N, nb + kGroup);
      const int64_t ne_full = nb + (ne - nb) / kNR * kNR;
      int64_t m = 0;
      for (; m + kMR <= M; m += kMR)
        for (int64_t n0 = nb; n0 < ne_full; n0 += kNR) int8_tile<kMR, kNR>(Ap, Bp, cp, Kp, m, n0, epi);
      for (; m < M; ++m)
        for (int64_t n0 = nb; n0 < ne_full; n0 += kNR) int8_tile<1, kNR>(Ap, Bp, cp, Kp, m, n0, epi);
      for (int64_t n = ne_full; n < ne; ++n)
        for (m = 0; m < M; ++m) int8_tile<1, 1>(Ap, Bp, cp, Kp, m, n, epi);
    }
  });
}

}  // namespace
}  // namespace mptk::cpu::CPU_CAPABILITY

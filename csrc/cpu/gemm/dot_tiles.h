// The GEMM family's dot-product tiles (see gemm.h), for few rows of x: fp32 x against fp32
// or 16-bit weights (widened in registers), or, at the avx512_bf16 level, bf16
// against bf16 on vdpbf16ps. Used by the linears with few rows (decoding: the weight is
// streamed once) and by the weight-only int8 linear on converted weight blocks. Templates,
// so the tiles are compiled, unrolled and inlined in the file that runs them.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "cpu/gemm/gemm.h"

namespace mptk::cpu::CPU_CAPABILITY {
namespace {  // internal to each including file: see gemm.h

// ---------------------------------------------------------------- dot-product tiles
// out[m][n] = scale[n] * dot(x row m, w row n) + bias[n] for few rows of x: MR rows of x and
// NR rows of w at a time, MR x NR vector accumulators summed once at the end, so each operand
// vector loaded feeds MR or NR FMAs. Used for fp32 linears with few rows (decoding: the
// weight is streamed once) and by the weight-only int8 linear on converted weight blocks.
#if defined(CPU_CAPABILITY_AVX512)
constexpr int kDotMR = 4, kDotNR = 4;  // 16 accumulators + 4 x + 1 w of 32 registers
constexpr int kVecRegs = 32;
#else
constexpr int kDotMR = 2, kDotNR = 4;  // 8 + 2 + 1 of 16
constexpr int kVecRegs = 16;
#endif
constexpr int64_t kDotMaxRows = 40;  // fp32 linears with fewer rows use the dot tiles (measured)

// One vector of weights as fp32: 16-bit weights are widened in registers, so decoding reads
// 2 bytes per weight (widening the whole weight first would write and re-read 4)
inline Vf load_w(const float* p) { return Vf::loadu(p); }
inline Vf load_w(const c10::BFloat16* p) {
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
#elif defined(CPU_CAPABILITY_AVX2)
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16));
#else
  float buf[kWf];
  for (int64_t i = 0; i < kWf; ++i) buf[i] = static_cast<float>(p[i]);
  return Vf::loadu(buf);
#endif
}
inline Vf load_w(const c10::Half* p) {
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p));
#elif defined(CPU_CAPABILITY_AVX2)
  return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p));
#else
  float buf[kWf];
  for (int64_t i = 0; i < kWf; ++i) buf[i] = static_cast<float>(p[i]);
  return Vf::loadu(buf);
#endif
}
// the last rem (< kWf) weights, zero-filled
template <typename W>
inline Vf load_w(const W* p, int rem) {
  float buf[kWf] = {};
  for (int i = 0; i < rem; ++i) buf[i] = static_cast<float>(p[i]);
  return Vf::loadu(buf);
}

// The operands of the dot tiles: a k-step's vectors of x and w, and their multiply-add.
// DotF32<W>: fp32 x against a weight of W (fp32, or 16-bit widened in registers), FMA.
template <typename W>
struct DotF32 {
  using XE = float;
  using WE = W;
  using V = Vf;
  static constexpr int64_t kStep = kWf;
  static Vf zero() { return Vf(0.f); }
  static Vf x(const float* p) { return Vf::loadu(p); }
  static Vf x(const float* p, int rem) { return Vf::loadu(p, rem); }
  static Vf w(const W* p) { return load_w(p); }
  static Vf w(const W* p, int rem) { return load_w(p, rem); }
  static Vf madd(const Vf& acc, const Vf& a, const Vf& b) { return at::vec::fmadd(a, b, acc); }
  static float sum(const Vf& v) { return at::vec::vec_reduce_all<float>([](Vf& a, Vf& b) { return a + b; }, v); }
};
#ifdef MPTK_BF16_PAIRS
// DotBf16: bf16 x and weight as they are, 32 k per vdpbf16ps (exact products, fp32 sums, as
// the bf16 panel GEMM): a quarter of the instructions of widening both to fp32, so a bf16
// linear with few rows runs at the speed of reading its weight.
struct DotBf16 {
  using XE = c10::BFloat16;
  using WE = c10::BFloat16;
  using V = __m512;
  static constexpr int64_t kStep = 32;
  static __m512 zero() { return _mm512_setzero_ps(); }
  static __m512 x(const c10::BFloat16* p) { return _mm512_castsi512_ps(_mm512_loadu_si512(p)); }
  static __m512 x(const c10::BFloat16* p, int rem) {  // zero-filled past rem
    return _mm512_castsi512_ps(_mm512_maskz_loadu_epi16(_cvtu32_mask32((1u << rem) - 1u), p));
  }
  static __m512 w(const c10::BFloat16* p) { return x(p); }
  static __m512 w(const c10::BFloat16* p, int rem) { return x(p, rem); }
  static __m512 madd(__m512 acc, __m512 a, __m512 b) { return Bf16Pairs::madd(acc, a, b); }
  static float sum(__m512 v) { return _mm512_reduce_add_ps(v); }
};
#endif

// rows [m0, m0 + MR) of x (stride ldx) against rows [0, NR) of w (stride ldw) over K, with
// the operands of Ops; scale and bias may be null; w's row c is output column n = n0 + c *
// nstep: the result goes to out[m][n] (row stride ldo), scaled by scale[n], plus bias[n]
template <int MR, int NR, typename T, typename Ops>
MPTK_NOINLINE void dot_tile(const typename Ops::XE* x,  // [>= m0 + MR, ldx]
                            int64_t ldx,
                            const typename Ops::WE* w,  // [NR, ldw]
                            int64_t ldw, int64_t K,
                            int64_t m0, int64_t n0,
                            const float* scale,  // [> n0 + (NR - 1) nstep] or null
                            const float* bias,   // [> n0 + (NR - 1) nstep] or null
                            T* out,              // [>= m0 + MR, ldo]
                            int64_t ldo,
                            int64_t nstep = 1) {  // output columns n0, n0 + nstep, ..
  // one or two rows of x give only NR or 2 NR independent sums: a second bank of accumulators
  // for alternate k-steps keeps twice as many multiply-adds in flight (a single bf16 row was
  // slower than 4 rows without it: latency-bound)
  constexpr int kBanks = MR <= 2 && 2 * MR * NR + MR + 1 <= kVecRegs ? 2 : 1;
  typename Ops::V acc[kBanks][MR][NR];
  for (int b = 0; b < kBanks; ++b)
    for (int r = 0; r < MR; ++r)
      for (int c = 0; c < NR; ++c) acc[b][r][c] = Ops::zero();
  const auto* xr = x + m0 * ldx;
  int64_t k = 0;
  for (; k + Ops::kStep <= K;) {
#pragma GCC unroll 2
    for (int b = 0; b < kBanks; ++b, k += Ops::kStep) {
      if (kBanks > 1 && k + Ops::kStep > K) break;  // an odd number of whole steps
      typename Ops::V xv[MR];
      for (int r = 0; r < MR; ++r) xv[r] = Ops::x(xr + r * ldx + k);
      for (int c = 0; c < NR; ++c) {
        const auto wv = Ops::w(w + c * ldw + k);
        for (int r = 0; r < MR; ++r) acc[b][r][c] = Ops::madd(acc[b][r][c], xv[r], wv);
      }
    }
  }
  if (k < K) {  // the last partial step, zero-filled
    const int rem = static_cast<int>(K - k);
    typename Ops::V xv[MR];
    for (int r = 0; r < MR; ++r) xv[r] = Ops::x(xr + r * ldx + k, rem);
    for (int c = 0; c < NR; ++c) {
      const auto wv = Ops::w(w + c * ldw + k, rem);
      for (int r = 0; r < MR; ++r) acc[0][r][c] = Ops::madd(acc[0][r][c], xv[r], wv);
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int c = 0; c < NR; ++c) {
      float sum = Ops::sum(acc[0][r][c]);
      if constexpr (kBanks == 2) sum += Ops::sum(acc[1][r][c]);
      const int64_t n = n0 + c * nstep;
      // one fma, written out: the compiler may contract a * b + c in one unrolled position and
      // not in another, and a row's result would then depend on where it lands in a tile
      out[(m0 + r) * ldo + n] = static_cast<T>(std::fma(sum, scale ? scale[n] : 1.f, bias ? bias[n] : 0.f));
    }
}

// rows [m0, m1) of x against NR rows of w (output columns n0 ..)
template <int NR, typename T, typename Ops>
inline void dot_rows(const typename Ops::XE* x,  // [>= m1, ldx]
                     int64_t ldx,
                     const typename Ops::WE* w,  // [NR, ldw]
                     int64_t ldw, int64_t K,
                     int64_t m0, int64_t m1, int64_t n0,
                     const float* scale,  // [> n0 + (NR - 1) nstep] or null
                     const float* bias,   // [> n0 + (NR - 1) nstep] or null
                     T* out,              // [>= m1, ldo]
                     int64_t ldo,
                     int64_t nstep = 1) {  // w's rows are columns n0, n0 + nstep, .. of out
  int64_t m = m0;
  for (; m + kDotMR <= m1; m += kDotMR)
    dot_tile<kDotMR, NR, T, Ops>(x, ldx, w, ldw, K, m, n0, scale, bias, out, ldo, nstep);
  // the last rows in one tile, so the weight rows are read once more, not once per row
  if (kDotMR > 3 && m1 - m == 3) dot_tile<3, NR, T, Ops>(x, ldx, w, ldw, K, m, n0, scale, bias, out, ldo, nstep);
  else if (kDotMR > 2 && m1 - m == 2) dot_tile<2, NR, T, Ops>(x, ldx, w, ldw, K, m, n0, scale, bias, out, ldo, nstep);
  else if (m1 - m == 1) dot_tile<1, NR, T, Ops>(x, ldx, w, ldw, K, m, n0, scale, bias, out, ldo, nstep);
}

// out (M, N) fp32 = x (M, K) @ w (N, K)^T for few rows, parallel over blocks of w rows
template <typename Ops>
void dot_gemm(const typename Ops::XE* x,  // [M, K]
              const typename Ops::WE* w,  // [N, K]
              float* out,                 // [M, N]
              int64_t M, int64_t N, int64_t K) {
  // Each task's rows [r0, r1) are cut into kDotNR equal parts and a tile takes one row from
  // each part, so a thread reads kDotNR sequential streams far apart, not kDotNR adjacent
  // rows (one stream). Measured on Zen 5 (2 threads, 4K pages, MPT-125M's GEMV sequence,
  // interleaved A/B): bf16 1.12-1.20x, fp32 1.02-1.08x, M = 2..16 rows of x 1.09-1.21x,
  // 39 rows even; a plain read of 4 streams a thread is ~9% faster than of 1. Each output
  // element's arithmetic is the same wherever its row lands in a tile.
  at::parallel_for(0, (N + kDotNR - 1) / kDotNR, 16, [&](int64_t b0, int64_t b1) {
    const int64_t r0 = b0 * kDotNR, r1 = std::min(N, b1 * kDotNR), q = (r1 - r0) / kDotNR;
    for (int64_t j = 0; j < q; ++j)
      dot_rows<kDotNR, float, Ops>(x, K, w + (r0 + j) * K, q * K, K, 0, M, r0 + j, nullptr, nullptr, out, N, q);
    for (int64_t n = r0 + kDotNR * q; n < r1; ++n)  // the last (r1 - r0) % kDotNR rows
      dot_rows<1, float, Ops>(x, K, w + n * K, K, K, 0, M, n, nullptr, nullptr, out, N);
  });
}

}  // namespace
}  // namespace mptk::cpu::CPU_CAPABILITY

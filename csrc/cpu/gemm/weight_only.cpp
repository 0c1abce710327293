// The GEMM family's weight-only int8 linear on the CPU (see gemm.h): out = x @ (w_int8 *
// w_scale)^T + bias for decoding and small batches: with a few rows of x the int8 weight is
// read one row at a time and widened in registers; with more it is converted a few rows at a
// time into a block that stays in L1 and run through the dot tiles (dot_tiles.h): fp32, or
// bf16 on vdpbf16ps for bf16 x at the avx512_bf16 level.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <type_traits>
#include <vector>

#include "cpu/gemm/dot_tiles.h"
#include "cpu/gemm/gemm.h"
#include "cpu/kernels.h"

namespace mptk::cpu::CPU_CAPABILITY {
namespace {

// ---------------------------------------------------------------- weight-only int8
// More rows: each task converts kDotNR weight rows at a time to fp32 (a block that stays in
// L1), then runs the dot tiles (dot_tiles.h) over them and the rows of x. Rows of x go in
// chunks of kWoMChunk (their fp32 copy stays in L2 while the task's weight blocks pass); with
// M <= kWoMChunk (small batches) each weight byte is read from memory and converted once. The per-row scale is applied to
// the sums (x @ (w * s)^T = (x @ w^T) * s; int8 values are exact in fp32). Measured 1.4-9.8x
// MKL's F.linear with the fp32 weight at M = 1..2048 (docs/benchmarks.md); the earlier
// design (dequantised chunks of the weight through sgemm above 8 rows) was 0.65-1.06x.
constexpr int64_t kWoMChunk = 64;

// One vector of int8 weights as fp32, widened in registers (1 byte read per weight)
inline Vf load_i8(const int8_t* p) {
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p)));
#elif defined(CPU_CAPABILITY_AVX2)
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)p)));
#else
  float buf[kWf];
  for (int64_t i = 0; i < kWf; ++i) buf[i] = static_cast<float>(p[i]);
  return Vf::loadu(buf);
#endif
}

// Rows of x up to this many read the int8 weight straight from memory, whole weight rows at
// a time: each chunk of kWoBanks vectors is widened once and multiplied into every row of x
// (fp32 copies, in L1). Each weight row is read as one sequential stream: measured on Zen 5
// (1 thread, a 77 MB weight), 21-34 GB/s against 11-20 for the dot tiles' 4 interleaved rows
// of 16 bytes a step. A step takes wo_spread(MR) rows from as many equal parts of the task's
// range (streams far apart, as the dot tiles' rows, dot_gemm): 1.13-1.22x for 1-2 rows of x
// (MPT-125M's int8 GEMVs, 2 threads, interleaved A/B). More rows of x go through the
// converted blocks below (each weight vector is then widened once per kWoMChunk rows).
constexpr int64_t kWoDirectRows = 4;
constexpr int kWoBanks = 4;  // vectors a chunk: independent sums per row of x (FMA latency)
// rows a step: MR x S x kWoBanks accumulators in half the vector registers, at most 4
constexpr int wo_spread(int MR) {
  const int s = kVecRegs / 2 / (MR * kWoBanks);
  return s < 1 ? 1 : s > 4 ? 4 : s;
}

template <int MR, int S, typename T>
void wo_rows(const float* x,        // [MR, K] fp32
             const int8_t* w,       // [N, K]
             const float* scale,    // [N]
             const float* bias,     // [N] or null
             int64_t n0, int64_t n1,
             int64_t q,             // a step's rows: n, n + q, .. n + (S - 1) q
             int64_t N, int64_t K,
             T* out) {              // [MR, N]
  constexpr int64_t kChunk = kWoBanks * kWf;
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* r[S];
    for (int s = 0; s < S; ++s) r[s] = w + (n + s * q) * K;
    Vf acc[MR][S][kWoBanks];
    for (int m = 0; m < MR; ++m)
      for (int s = 0; s < S; ++s)
        for (int b = 0; b < kWoBanks; ++b) acc[m][s][b] = Vf(0.f);
    int64_t k = 0;
    for (; k + kChunk <= K; k += kChunk) {
      for (int s = 0; s < S; ++s) {
        Vf wv[kWoBanks];
        for (int b = 0; b < kWoBanks; ++b) wv[b] = load_i8(r[s] + k + b * kWf);
        for (int m = 0; m < MR; ++m)
          for (int b = 0; b < kWoBanks; ++b) acc[m][s][b] = at::vec::fmadd(Vf::loadu(x + m * K + k + b * kWf), wv[b], acc[m][s][b]);
      }
    }
    for (; k < K; k += kWf) {  // the last vectors, the final one zero-filled past K
      const int rem = static_cast<int>(std::min<int64_t>(kWf, K - k));
      for (int s = 0; s < S; ++s) {
        Vf wv;
        if (rem == kWf) {
          wv = load_i8(r[s] + k);
        } else {
          float buf[kWf] = {};
          for (int i = 0; i < rem; ++i) buf[i] = static_cast<float>(r[s][k + i]);
          wv = Vf::loadu(buf);
        }
        for (int m = 0; m < MR; ++m) acc[m][s][0] = at::vec::fmadd(Vf::loadu(x + m * K + k, rem), wv, acc[m][s][0]);
      }
    }
    for (int m = 0; m < MR; ++m)
      for (int s = 0; s < S; ++s) {
        Vf t = acc[m][s][0];
        for (int b = 1; b < kWoBanks; ++b) t = t + acc[m][s][b];
        const float sum = at::vec::vec_reduce_all<float>([](Vf& a, Vf& c) { return a + c; }, t);
        const int64_t c = n + s * q;
        out[m * N + c] = static_cast<T>(std::fma(sum, scale[c], bias ? bias[c] : 0.f));  // as dot_tile
      }
  }
}

// rows [n0, n1) of the weight against MR rows of x: S rows a step, one from each of S equal
// parts of the range, then the last (n1 - n0) % S one at a time (the same sums either way)
template <int MR, int S, typename T>
void wo_range(const float* x, const int8_t* w, const float* scale, const float* bias, int64_t n0, int64_t n1,
              int64_t N, int64_t K, T* out) {
  const int64_t q = (n1 - n0) / S;
  if (S > 1 && q > 0) wo_rows<MR, S, T>(x, w, scale, bias, n0, n0 + q, q, N, K, out);
  wo_rows<MR, 1, T>(x, w, scale, bias, n0 + (S > 1 ? S * q : 0), n1, 0, N, K, out);
}

template <typename T>
void weight_only_gemm(const T* x,           // [M, K]
                      const int8_t* w,      // [N, K]
                      const float* scale,   // [N]
                      const float* bias,    // [N] or null
                      int64_t M, int64_t N, int64_t K,
                      T* out) {             // [M, N]
  if (M <= kWoDirectRows) {  // decoding: x in fp32 (a few rows), the int8 weight as it is
    std::vector<float> xf(M * K);
    for (int64_t i = 0; i < M * K; ++i) xf[i] = static_cast<float>(x[i]);
    at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) {
      switch (M) {
        case 1: wo_range<1, wo_spread(1), T>(xf.data(), w, scale, bias, n0, n1, N, K, out); break;
        case 2: wo_range<2, wo_spread(2), T>(xf.data(), w, scale, bias, n0, n1, N, K, out); break;
        case 3: wo_range<3, wo_spread(3), T>(xf.data(), w, scale, bias, n0, n1, N, K, out); break;
        default: wo_range<4, wo_spread(4), T>(xf.data(), w, scale, bias, n0, n1, N, K, out); break;
      }
    });
    return;
  }
#ifdef MPTK_BF16_PAIRS
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    // bf16 x as it is against the weight rows converted to bf16 (int8 values are exact in
    // bf16): the vdpbf16ps dot tiles, a quarter of the instructions of the fp32 ones
    at::parallel_for(0, (N + kDotNR - 1) / kDotNR, 16, [&](int64_t b0, int64_t b1) {
      std::vector<c10::BFloat16> wb(kDotNR * K);
      for (int64_t mc = 0; mc < M; mc += kWoMChunk) {
        const int64_t mc_end = std::min(M, mc + kWoMChunk);
        for (int64_t b = b0; b < b1; ++b) {
          const int64_t n0 = b * kDotNR, rows = std::min<int64_t>(kDotNR, N - n0);
          for (int64_t c = 0; c < rows; ++c) {
            const int8_t* src = w + (n0 + c) * K;
            c10::BFloat16* dst = wb.data() + c * K;
            int64_t k = 0;
            for (; k + 16 <= K; k += 16) {
              // an int8 value's fp32 has at most 7 significant bits: its top half is its bf16, exactly
              const __m512i f = _mm512_castps_si512(
                  _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(src + k)))));
              _mm256_storeu_si256((__m256i*)(dst + k), _mm512_cvtepi32_epi16(_mm512_srli_epi32(f, 16)));
            }
            for (; k < K; ++k) dst[k] = static_cast<c10::BFloat16>(static_cast<float>(src[k]));
          }
          if (rows == kDotNR) {
            dot_rows<kDotNR, T, DotBf16>(x, K, wb.data(), K, K, mc, mc_end, n0, scale, bias, out, N);
          } else {
            for (int64_t c = 0; c < rows; ++c)
              dot_rows<1, T, DotBf16>(x, K, wb.data() + c * K, K, K, mc, mc_end, n0 + c, scale, bias, out, N);
          }
        }
      }
    });
    return;
  }
#endif
  const int64_t Kp = (K + kWf - 1) / kWf * kWf;
  at::Tensor xf_t = at::empty({M, Kp}, at::TensorOptions().dtype(at::kFloat));
  float* xf = xf_t.mutable_data_ptr<float>();  // x in fp32, rows padded with zeros
  at::parallel_for(0, M, 64, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      for (int64_t k = 0; k < K; ++k) xf[m * Kp + k] = static_cast<float>(x[m * K + k]);
      for (int64_t k = K; k < Kp; ++k) xf[m * Kp + k] = 0.f;
    }
  });
  at::parallel_for(0, (N + kDotNR - 1) / kDotNR, 16, [&](int64_t b0, int64_t b1) {
    std::vector<float> wb(kDotNR * Kp, 0.f);  // the padding stays zero
    for (int64_t mc = 0; mc < M; mc += kWoMChunk) {
      const int64_t mc_end = std::min(M, mc + kWoMChunk);
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t n0 = b * kDotNR, rows = std::min<int64_t>(kDotNR, N - n0);
        for (int64_t c = 0; c < rows; ++c)
          for (int64_t k = 0; k < K; ++k) wb[c * Kp + k] = static_cast<float>(w[(n0 + c) * K + k]);
        if (rows == kDotNR) {
          dot_rows<kDotNR, T, DotF32<float>>(xf, Kp, wb.data(), Kp, Kp, mc, mc_end, n0, scale, bias, out, N);
        } else {
          for (int64_t c = 0; c < rows; ++c)
            dot_rows<1, T, DotF32<float>>(xf, Kp, wb.data() + c * Kp, Kp, Kp, mc, mc_end, n0 + c, scale, bias, out, N);
        }
      }
    }
  });
}

at::Tensor weight_only_int8_linear_cpu(const at::Tensor& x, const at::Tensor& w_int8, const at::Tensor& w_scale,
                                       const std::optional<at::Tensor>& bias) {
  const int64_t M = x.size(0), N = w_int8.size(0), K = x.size(1);
  at::Tensor out = at::empty({M, N}, x.options());
  if (out.numel() == 0) return out;
  const at::Tensor ws = w_scale.contiguous();
  at::Tensor bias32 = bias ? bias->to(at::kFloat).contiguous() : at::Tensor();
  const float* bp = bias ? bias32.const_data_ptr<float>() : nullptr;
  const at::Tensor xc = x.contiguous(), wc = w_int8.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "mptkernels_wo_int8_linear", [&] {
    weight_only_gemm<scalar_t>(xc.const_data_ptr<scalar_t>(), wc.const_data_ptr<int8_t>(), ws.const_data_ptr<float>(),
                               bp, M, N, K, out.mutable_data_ptr<scalar_t>());
  });
  return out;
}

}  // namespace

// this level's entries of the kernel table (cpu/kernels.h)
void add_weight_only(Kernels& k) {
  k.weight_only_int8_linear = &weight_only_int8_linear_cpu;
}

}  // namespace mptk::cpu::CPU_CAPABILITY

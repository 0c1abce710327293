// The GEMM family on the CPU: linear with a fused bias + activation epilogue, row-wise int8
// quantisation, an exact int8 GEMM core, W8A8 and weight-only int8 linears.
//
// Floating GEMMs are ours (MKL's sgemm runs AVX2 code on AMD CPUs): dot-product tiles for
// few rows, AVX-512 panels for more, both in fp32 or, where the build host has AVX512-BF16,
// on bf16 operands with vdpbf16ps. Other 16-bit inputs are widened to fp32 (on CPUs without
// native bf16, PyTorch's bf16 matmul is ~350x slower than sgemm) and the result rounded once
// in the epilogue (bias, activation, the pre-activation copy the gelus' backward needs),
// vectorised, on each block of the product while it is in cache. The bf16 backward uses
// oneDNN's native bf16 matmul where the CPU has it (see linear_bwd_bf16).
//
// int8: torch._int_mm runs 12-40x slower than sgemm on AVX2 machines, so the int8 product has
// its own kernel, exact in int32 (the lanes overflow only past K ~ 130k, which is checked).
// Two designs (see below): with AVX512-VNNI and 16 or more rows, outer products on 64-row
// panels of B packed per task (vpdpbusd, no horizontal sums); otherwise register-blocked dot
// products of MR rows of A with NR rows of B (vpdpbusd or vpmaddwd), whose lanes are summed
// once per output at the end of K. Results reach the epilogue (int32 store, or scale + bias
// + activation + rounding for int8_linear) a row-run at a time, while still in cache.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/add.h>
#include <ATen/ops/clamp_min.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/gelu.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <optional>
#include <string_view>
#include <vector>

#include "common/cpu_vec.h"

namespace mptk::cpu {
namespace {

using Vf = Vectorized<float>;
constexpr int64_t kWf = Vf::size();

// the dtypes of x that the fp32-accumulating epilogues serve (float64 takes plain ATen)
#define MPTK_DISPATCH_F32_F16_BF16(TYPE, NAME, ...)                \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                                     AT_DISPATCH_CASE_REDUCED_FLOATING_TYPES(__VA_ARGS__))

// ---------------------------------------------------------------- activations
enum class Act { kNone, kRelu, kGelu, kGeluTanh };

Act parse_activation(std::string_view a, const char* op) {
  if (a == "none") return Act::kNone;
  if (a == "relu") return Act::kRelu;
  if (a == "gelu") return Act::kGelu;
  if (a == "gelu_tanh") return Act::kGeluTanh;
  TORCH_CHECK(false, op, ": activation must be \"none\", \"relu\", \"gelu\" or \"gelu_tanh\", got \"", a, "\"");
}

constexpr float kInvSqrt2 = 0.70710678118654752f;
constexpr float kSqrt2OverPi = 0.79788456080286536f;
constexpr float kInvSqrt2Pi = 0.39894228040143268f;
constexpr float kTanhCoef = 0.044715f;

inline Vf act_fwd(const Vf& h, Act a) {
  switch (a) {
    case Act::kRelu: return at::vec::clamp_min(h, Vf(0.f));
    case Act::kGelu: return h * Vf(0.5f) * (Vf(1.f) + (h * Vf(kInvSqrt2)).erf());
    case Act::kGeluTanh: {  // h (1 + tanh u) / 2 = h sigmoid(2u): one exp, a third of tanh's cost
      const Vf u = Vf(kSqrt2OverPi) * (h + Vf(kTanhCoef) * h * h * h);
      return h / (Vf(1.f) + (Vf(-2.f) * u).exp());
    }
    default: return h;
  }
}

// d act / d h at h, a vector at a time (relu: s is the output)
inline Vf act_grad(const Vf& s, Act a) {
  switch (a) {
    case Act::kRelu: return Vf::blendv(Vf(0.f), Vf(1.f), s > Vf(0.f));
    case Act::kGelu:
      return Vf(0.5f) * (Vf(1.f) + (s * Vf(kInvSqrt2)).erf()) +
             s * Vf(kInvSqrt2Pi) * (Vf(-0.5f) * s * s).exp();
    case Act::kGeluTanh: {
      const Vf t = (Vf(kSqrt2OverPi) * (s + Vf(kTanhCoef) * s * s * s)).tanh();
      return Vf(0.5f) * (Vf(1.f) + t) +
             Vf(0.5f) * s * (Vf(1.f) - t * t) * Vf(kSqrt2OverPi) * (Vf(1.f) + Vf(3.f * kTanhCoef) * s * s);
    }
    default: return Vf(1.f);
  }
}

inline float act_grad(float s, Act a) {  // d act / d h at h (relu: s is the output)
  switch (a) {
    case Act::kRelu: return s > 0.f ? 1.f : 0.f;
    case Act::kGelu: return 0.5f * (1.f + std::erf(s * kInvSqrt2)) + s * kInvSqrt2Pi * std::exp(-0.5f * s * s);
    case Act::kGeluTanh: {
      const float t = std::tanh(kSqrt2OverPi * (s + kTanhCoef * s * s * s));
      return 0.5f * (1.f + t) + 0.5f * s * (1.f - t * t) * kSqrt2OverPi * (1.f + 3.f * kTanhCoef * s * s);
    }
    default: return 1.f;
  }
}

// ---------------------------------------------------------------- argument checks
void check_2d(const at::Tensor& t, const char* name, const char* op) {
  TORCH_CHECK(t.dim() == 2, op, ": ", name, " must be 2-D, got shape ", t.sizes());
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be on the CPU here, got ", t.device());
}

void check_float(const at::Tensor& t, const char* name, const char* op) {
  const auto dt = t.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16 || dt == at::kDouble, op, ": ", name,
              " must be float32, float16, bfloat16 or float64, got ", dt);
}

void check_bias(const std::optional<at::Tensor>& bias, int64_t N, const char* op) {
  if (!bias) return;
  TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N, op, ": bias must be (", N, ",), got ", bias->sizes());
  check_float(*bias, "bias", op);
  TORCH_CHECK(bias->device().is_cpu(), op, ": bias must be on the CPU here, got ", bias->device());
}

void check_int8_weight(const at::Tensor& w, const at::Tensor& scale, int64_t K, const char* op) {
  check_2d(w, "w_int8", op);
  TORCH_CHECK(w.scalar_type() == at::kChar, op, ": w_int8 must be int8 (quantize_rowwise of the weight), got ",
              w.scalar_type());
  TORCH_CHECK(w.size(1) == K, op, ": w_int8 is (N, K) = ", w.sizes(), " but x has K = ", K);
  TORCH_CHECK(scale.dim() == 1 && scale.size(0) == w.size(0) && scale.scalar_type() == at::kFloat, op,
              ": w_scale must be float32 (", w.size(0), ",), got ", scale.scalar_type(), " ", scale.sizes());
}

// fp32 (or fp64) contiguous view of t
at::Tensor wide(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? t.contiguous() : t.to(at::kFloat).contiguous();
}

// ---------------------------------------------------------------- linear
// One row of N outputs: h (fp32, in place) += bias; preact (x's dtype) = h if wanted;
// out = act(h) rounded to T. A chunk (two fp32 vectors: one 16-bit vector) at a time, so
// 16-bit outputs round in registers (element-wise scalar rounding cost 10x the GELU itself).
template <typename T>
inline void epilogue_row(float* h, const float* bias, Act act, T* out, T* preact, int64_t N) {
  using IO = ChunkIO<T, float>;
  int64_t n = 0;
  for (; n + IO::kChunk <= N; n += IO::kChunk) {
    Vf lo = Vf::loadu(h + n), hi = Vf::loadu(h + n + kWf);
    if (bias) {
      lo = lo + Vf::loadu(bias + n);
      hi = hi + Vf::loadu(bias + n + kWf);
    }
    if (preact) IO::store(preact + n, lo, hi);
    IO::store(out + n, act_fwd(lo, act), act_fwd(hi, act));
  }
  for (; n < N; n += kWf) {  // the tail (< 2 vectors) through a padded vector
    const int rem = static_cast<int>(std::min<int64_t>(kWf, N - n));
    alignas(64) float tmp[kWf] = {};
    for (int i = 0; i < rem; ++i) tmp[i] = h[n + i] + (bias ? bias[n + i] : 0.f);
    if (preact)
      for (int i = 0; i < rem; ++i) preact[n + i] = static_cast<T>(tmp[i]);
    act_fwd(Vf::loadu(tmp), act).store(tmp);
    for (int i = 0; i < rem; ++i) out[n + i] = static_cast<T>(tmp[i]);
  }
}

// h (M, N) fp32: epilogue_row over every row, in parallel
template <typename T>
void linear_epilogue(float* h, const float* bias, Act act, T* out, T* preact, int64_t M, int64_t N) {
  at::parallel_for(0, M, std::max<int64_t>(1, 16384 / std::max<int64_t>(N, 1)), [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m)
      epilogue_row(h + m * N, bias, act, out + m * N, preact ? preact + m * N : nullptr, N);
  });
}

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
// the operands of Ops; scale and bias may be null; the results go to out[m][n0 + c] (row
// stride ldo)
template <int MR, int NR, typename T, typename Ops>
inline void dot_tile(const typename Ops::XE* x, int64_t ldx, const typename Ops::WE* w, int64_t ldw, int64_t K,
                     int64_t m0, int64_t n0, const float* scale, const float* bias, T* out, int64_t ldo) {
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
      const int64_t n = n0 + c;
      out[(m0 + r) * ldo + n] = static_cast<T>(sum * (scale ? scale[n] : 1.f) + (bias ? bias[n] : 0.f));
    }
}

// rows [m0, m1) of x against NR rows of w (output columns n0 ..)
template <int NR, typename T, typename Ops>
inline void dot_rows(const typename Ops::XE* x, int64_t ldx, const typename Ops::WE* w, int64_t ldw, int64_t K,
                     int64_t m0, int64_t m1, int64_t n0, const float* scale, const float* bias, T* out, int64_t ldo) {
  int64_t m = m0;
  for (; m + kDotMR <= m1; m += kDotMR)
    dot_tile<kDotMR, NR, T, Ops>(x, ldx, w, ldw, K, m, n0, scale, bias, out, ldo);
  // the last rows in one tile, so the weight rows are read once more, not once per row
  if (kDotMR > 3 && m1 - m == 3) dot_tile<3, NR, T, Ops>(x, ldx, w, ldw, K, m, n0, scale, bias, out, ldo);
  else if (kDotMR > 2 && m1 - m == 2) dot_tile<2, NR, T, Ops>(x, ldx, w, ldw, K, m, n0, scale, bias, out, ldo);
  else if (m1 - m == 1) dot_tile<1, NR, T, Ops>(x, ldx, w, ldw, K, m, n0, scale, bias, out, ldo);
}

// out (M, N) fp32 = x (M, K) @ w (N, K)^T for few rows, parallel over blocks of w rows
template <typename Ops>
void dot_gemm(const typename Ops::XE* x, const typename Ops::WE* w, float* out, int64_t M, int64_t N, int64_t K) {
  at::parallel_for(0, (N + kDotNR - 1) / kDotNR, 16, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n0 = b * kDotNR, rows = std::min<int64_t>(kDotNR, N - n0);
      if (rows == kDotNR) {
        dot_rows<kDotNR, float, Ops>(x, K, w + n0 * K, K, K, 0, M, n0, nullptr, nullptr, out, N);
      } else {
        for (int64_t c = 0; c < rows; ++c)
          dot_rows<1, float, Ops>(x, K, w + (n0 + c) * K, K, K, 0, M, n0 + c, nullptr, nullptr, out, N);
      }
    }
  });
}

#if defined(CPU_CAPABILITY_AVX512)

// A panel of 64 rows of a row-major matrix of 4-byte words (fp32 values, or 4 int8 k-steps)
// -> P[w][64], word-major, for words [0, words) (a multiple of 16), 16x16 transposes at a
// time. src: row 0, stride: bytes per row; rows past `rows` read as zeros.
inline void pack_words_x64(const char* src, int64_t stride, int64_t rows, int64_t words, char* P) {
  for (int g = 0; g < 4; ++g) {
    for (int64_t w = 0; w < words; w += 16) {
      __m512i r[16];
      for (int i = 0; i < 16; ++i)
        r[i] = g * 16 + i < rows ? _mm512_loadu_si512(src + (g * 16 + i) * stride + w * 4) : _mm512_setzero_si512();
      transpose_16x16_words(r);
      for (int i = 0; i < 16; ++i) _mm512_storeu_si512(P + ((w + i) * 64 + g * 16) * 4, r[i]);
    }
  }
}

// ---------------------------------------------------------------- panel GEMM (AVX-512): fp32, bf16
// MKL's sgemm, which at::mm calls, runs its AVX2 code on AMD CPUs (0.2 TFLOP/s on the 2-core
// EPYC here); this kernel reaches about twice that. The design of the int8 panels below:
// each task packs 64 columns of B (a panel) word-major as P[w][64] (a word: one fp32 k-step,
// or two bf16 ones for vdpbf16ps), and a 6 x 64 tile of C stays in 24 registers: per word, 4
// vector loads of the panel and 6 broadcasts of A feed 24 multiply-adds. K goes in blocks of
// kSgemmKc words (the panel's block stays in L1); C itself holds the partial sums between
// blocks. Rows of A go in chunks (several tasks per panel when N is small). A K far larger
// than M and N takes sgemm_split_k instead.
constexpr int64_t kSgemmPanel = 64;    // pack_words_x64's width
constexpr int kSgemmMR = 6;
constexpr int64_t kSgemmKc = 128;      // words per block: 32 KB of panel (256 and 512 measured no faster)
constexpr int64_t kSgemmMChunk = 192;
constexpr int64_t kSgemmBResident = 1 << 20;  // packed B up to this many bytes: chunk-major (L2 is 1 MB here)
constexpr int64_t kSgemmMinRows = 16;  // fewer rows: dot tiles or at::mm (packing B costs more than it saves)
constexpr int64_t kSplitKRatio = 16;   // K words >= this x max(M, N): sgemm_split_k
constexpr int64_t kSplitKParts = 8;    // its K ranges (threads share them out)

// Word-major panels: P[w][0..64) holds word w (a k-step: one fp32 value, or a pair of bf16
// values for vdpbf16ps) of the 64 output columns [n0, n0 + 64), zeros past N.
// From a (N, W-word) row-major B (a weight: op(B) = B^T), transposed 16x16 at a time:
// (ldw: words per row of B; the panel takes words [0, W) from B, which may point into a row)
void pack_panel_nk(const char* B, int64_t ldw, int64_t N, int64_t W, int64_t n0, float* P) {
  const int64_t cols = std::min(kSgemmPanel, N - n0), W16 = W / 16 * 16;
  pack_words_x64(B + n0 * ldw * 4, ldw * 4, cols, W16, reinterpret_cast<char*>(P));
  for (int64_t w = W16; w < W; ++w)
    for (int64_t j = 0; j < kSgemmPanel; ++j) {
      float word = 0.f;
      if (j < cols) std::memcpy(&word, B + ((n0 + j) * ldw + w) * 4, 4);
      P[w * kSgemmPanel + j] = word;
    }
}

// from a (K, N) row-major fp32 B (op(B) = B): a copy of 64 columns per row
void pack_panel_kn(const float* B, int64_t N, int64_t K, int64_t n0, float* P) {
  const int64_t cols = std::min(kSgemmPanel, N - n0);
  for (int64_t k = 0; k < K; ++k) {
    std::memcpy(P + k * kSgemmPanel, B + k * N + n0, cols * sizeof(float));
    std::fill(P + k * kSgemmPanel + cols, P + (k + 1) * kSgemmPanel, 0.f);
  }
}

// The multiply-add of a panel GEMM, per element type: fp32 (one k per word, FMA) and, where
// the build has AVX512-BF16, bf16 (Bf16Pairs in common/cpu_vec.h: two k per word, vdpbf16ps,
// products exact in fp32, fp32 accumulation, so a bf16 linear is one rounding at the end,
// like the fp32 path).
struct F32Dot {
  using E = float;
  static constexpr int64_t kPerWord = 1;
  static __m512 bcast(const float* a) { return _mm512_set1_ps(*a); }
  static __m512 madd(__m512 acc, __m512 a, __m512 b) { return _mm512_fmadd_ps(a, b, acc); }
};

// C rows [0, MR) x 64 columns (only those `mask` keeps are stored) += A rows . P over words
// [w0, w1) (A's row stride lda in elements); the first block starts from zero instead of C
template <int MR, typename Dot>
inline void sgemm_tile(const typename Dot::E* A, int64_t lda, const float* P, int64_t w0, int64_t w1, float* C,
                       int64_t ldc, const __mmask16 mask[4], bool first) {
  __m512 acc[MR][4];
  for (int r = 0; r < MR; ++r)
    for (int c = 0; c < 4; ++c)
      acc[r][c] = first ? _mm512_setzero_ps() : _mm512_maskz_loadu_ps(mask[c], C + r * ldc + c * 16);
  for (int64_t w = w0; w < w1; ++w) {
    const float* p = P + w * kSgemmPanel;
    const __m512 b0 = _mm512_loadu_ps(p), b1 = _mm512_loadu_ps(p + 16), b2 = _mm512_loadu_ps(p + 32),
                 b3 = _mm512_loadu_ps(p + 48);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const __m512 a = Dot::bcast(A + r * lda + w * Dot::kPerWord);
      acc[r][0] = Dot::madd(acc[r][0], a, b0);
      acc[r][1] = Dot::madd(acc[r][1], a, b1);
      acc[r][2] = Dot::madd(acc[r][2], a, b2);
      acc[r][3] = Dot::madd(acc[r][3], a, b3);
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int c = 0; c < 4; ++c) _mm512_mask_storeu_ps(C + r * ldc + c * 16, mask[c], acc[r][c]);
}

// C (M, N) fp32 = A (M, K) @ op(B), A and B of Dot's element type and contiguous; op(B) =
// B^T for a (N, K) B (b_nk), else (fp32 only) B (K, N). K a whole number of words.
// With an epilogue epi(m0, m1, n0, cols, c, ldc) instead of a C, each finished block of the
// product (rows [m0, m1), columns [n0, n0 + cols), c at its first element, row stride ldc) is
// handed to epi while in cache: the sums live in a per-task block of kSgemmMChunk x 64, and
// no fp32 (M, N) is written to memory and read back.
template <typename Dot>
void sgemm_split_k(const typename Dot::E* A, const typename Dot::E* B, bool b_nk, float* C, int64_t M, int64_t N,
                   int64_t K);

template <typename Dot, typename Epi = std::nullptr_t>
void sgemm(const typename Dot::E* A, const typename Dot::E* B, bool b_nk, float* C, int64_t M, int64_t N,
           int64_t K, const Epi& epi = nullptr) {
  constexpr bool kEpi = !std::is_same_v<Epi, std::nullptr_t>;
  const int64_t W = K / Dot::kPerWord;
  if (W >= kSplitKRatio * std::max(M, N)) {
    if constexpr (kEpi) {  // rare shapes: the whole product first, then the epilogue by rows
      at::Tensor tmp = at::empty({M, N}, at::TensorOptions().dtype(at::kFloat));
      float* c = tmp.mutable_data_ptr<float>();
      sgemm_split_k<Dot>(A, B, b_nk, c, M, N, K);
      at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) { epi(m0, m1, 0, N, c + m0 * N, N); });
    } else {
      sgemm_split_k<Dot>(A, B, b_nk, C, M, N, K);
    }
    return;
  }
  const int64_t n_panels = (N + kSgemmPanel - 1) / kSgemmPanel, n_chunks = (M + kSgemmMChunk - 1) / kSgemmMChunk;
  // Panel-major tasks: a thread packs a panel once for all the chunks of it that it runs, and
  // streams A once per panel. When B is small and A tall (an LM head's dw: A = dpre^T, 50k
  // rows), chunk-major instead: each thread packs every panel once (all of them stay in L2)
  // and reads each chunk of A from memory once, for all the panels.
  const bool a_major = n_chunks > n_panels && W * n_panels * kSgemmPanel * 4 <= kSgemmBResident;
  at::parallel_for(0, n_panels * n_chunks, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> P((a_major ? n_panels : 1) * W * kSgemmPanel);
    std::vector<float> block(kEpi ? kSgemmMChunk * kSgemmPanel : 0);
    std::vector<char> packed(a_major ? n_panels : 1, 0);
    int64_t last = -1;  // panel-major: the panel P holds
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t panel = a_major ? t % n_panels : t / n_chunks, chunk = a_major ? t / n_panels : t % n_chunks;
      const int64_t n0 = panel * kSgemmPanel, cols = std::min(kSgemmPanel, N - n0);
      float* Pp = P.data() + (a_major ? panel * W * kSgemmPanel : 0);
      if (a_major ? !packed[panel] : panel != last) {
        if (b_nk) {
          pack_panel_nk(reinterpret_cast<const char*>(B), W, N, W, n0, Pp);
        } else {
          if constexpr (std::is_same_v<typename Dot::E, float>) pack_panel_kn(B, N, K, n0, Pp);
        }
        if (a_major) packed[panel] = 1;
        last = panel;
      }
      __mmask16 mask[4];
      for (int c = 0; c < 4; ++c) {
        const int64_t valid = std::clamp<int64_t>(cols - c * 16, 0, 16);
        mask[c] = static_cast<__mmask16>((1u << valid) - 1u);
      }
      const int64_t mb = chunk * kSgemmMChunk, me = std::min(M, mb + kSgemmMChunk);
      float* Cb = kEpi ? block.data() : C + mb * N + n0;  // row mb, column n0
      const int64_t ldc = kEpi ? kSgemmPanel : N;
      for (int64_t w0 = 0; w0 < W; w0 += kSgemmKc) {
        const int64_t w1 = std::min(W, w0 + kSgemmKc);
        int64_t m = mb;
        for (; m + kSgemmMR <= me; m += kSgemmMR)
          sgemm_tile<kSgemmMR, Dot>(A + m * K, K, Pp, w0, w1, Cb + (m - mb) * ldc, ldc, mask, w0 == 0);
        for (; m < me; ++m) sgemm_tile<1, Dot>(A + m * K, K, Pp, w0, w1, Cb + (m - mb) * ldc, ldc, mask, w0 == 0);
      }
      if constexpr (kEpi) epi(mb, me, n0, cols, block.data(), kSgemmPanel);
    }
  });
}

// K far larger than M and N (an LM head's dx: K = vocab): the tasks above would each stream
// their rows of A once per panel. Here K is cut into kSplitKParts ranges, shared out over the
// threads; a range is walked a block at a time: every panel's block is packed (N x kSgemmKc
// words, in L2), then each 6-row tile of A (in L1) meets every panel, so A is read once. Each
// range sums into its own (M, N) buffer (the first into C), added at the end in a fixed order:
// the result does not depend on the thread count.
template <typename Dot>
void sgemm_split_k(const typename Dot::E* A, const typename Dot::E* B, bool b_nk, float* C, int64_t M, int64_t N,
                   int64_t K) {
  const int64_t W = K / Dot::kPerWord, n_panels = (N + kSgemmPanel - 1) / kSgemmPanel;
  const int64_t n_blocks = (W + kSgemmKc - 1) / kSgemmKc;
  // a fixed number of parts, not one per thread: the sums do not depend on the thread count
  const int64_t parts = std::min<int64_t>(kSplitKParts, n_blocks);
  // uninitialised: each range's first block writes its buffer whole
  const at::Tensor extra_t = at::empty({(parts - 1) * M * N}, at::TensorOptions().dtype(at::kFloat));
  float* extra = extra_t.mutable_data_ptr<float>();
  at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
    std::vector<float> P(n_panels * kSgemmKc * kSgemmPanel);
    for (int64_t part = p0; part < p1; ++part) {
      float* Cp = part == 0 ? C : extra + (part - 1) * M * N;
      const int64_t b_begin = n_blocks * part / parts, b_end = n_blocks * (part + 1) / parts;
      for (int64_t blk = b_begin; blk < b_end; ++blk) {
        const int64_t w0 = blk * kSgemmKc, nw = std::min(kSgemmKc, W - w0);
        for (int64_t panel = 0; panel < n_panels; ++panel) {
          float* Pp = P.data() + panel * kSgemmKc * kSgemmPanel;
          if (b_nk) {
            pack_panel_nk(reinterpret_cast<const char*>(B) + w0 * 4, W, N, nw, panel * kSgemmPanel, Pp);
          } else {
            if constexpr (std::is_same_v<typename Dot::E, float>) pack_panel_kn(B + w0 * N, N, nw, panel * kSgemmPanel, Pp);
          }
        }
        const bool first = blk == b_begin;
        auto tiles = [&](auto mr, int64_t m) {
          for (int64_t panel = 0; panel < n_panels; ++panel) {
            const int64_t n0 = panel * kSgemmPanel, cols = std::min(kSgemmPanel, N - n0);
            __mmask16 mask[4];
            for (int c = 0; c < 4; ++c)
              mask[c] = static_cast<__mmask16>((1u << std::clamp<int64_t>(cols - c * 16, 0, 16)) - 1u);
            // the panel block starts at word 0 of Pp: shift A instead
            sgemm_tile<decltype(mr)::value, Dot>(A + m * K + w0 * Dot::kPerWord, K,
                                                 P.data() + panel * kSgemmKc * kSgemmPanel, 0, nw, Cp + m * N + n0, N,
                                                 mask, first);
          }
        };
        int64_t m = 0;
        for (; m + kSgemmMR <= M; m += kSgemmMR) tiles(std::integral_constant<int, kSgemmMR>{}, m);
        for (; m < M; ++m) tiles(std::integral_constant<int, 1>{}, m);
      }
    }
  });
  // C += the other parts, row-parallel, parts in order
  at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
    for (int64_t part = 1; part < parts; ++part) {
      const float* src = extra + (part - 1) * M * N;
      for (int64_t i = m0 * N; i < m1 * N; ++i) C[i] += src[i];
    }
  });
}
#endif

// a contiguous fp32 (M, N) -> its transpose (N, M), contiguous. AVX-512: 16 x 16 blocks
// through registers, parallel over column strips (an LM head's dpre, 512 x 50k: 18 ms through
// ATen's copy, about 5 ms here); else ATen's copy.
at::Tensor transpose_f32(const at::Tensor& a) {
  const int64_t M = a.size(0), N = a.size(1);
#if defined(CPU_CAPABILITY_AVX512)
  at::Tensor t = at::empty({N, M}, a.options());
  const float* src = a.const_data_ptr<float>();
  float* dst = t.mutable_data_ptr<float>();
  const int64_t M16 = M / 16 * 16, N16 = N / 16 * 16;
  at::parallel_for(0, (N + 15) / 16, 16, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n0 = b * 16;
      if (n0 < N16) {
        for (int64_t m0 = 0; m0 < M16; m0 += 16) {
          __m512i v[16];
          for (int i = 0; i < 16; ++i) v[i] = _mm512_loadu_si512(src + (m0 + i) * N + n0);
          transpose_16x16_words(v);  // v[j]: column n0 + j, rows m0 .. m0 + 15
          for (int j = 0; j < 16; ++j) _mm512_storeu_si512(dst + (n0 + j) * M + m0, v[j]);
        }
        for (int64_t m = M16; m < M; ++m)
          for (int64_t j = 0; j < 16; ++j) dst[(n0 + j) * M + m] = src[m * N + n0 + j];
      } else {  // the last columns (N % 16)
        for (int64_t n = n0; n < N; ++n)
          for (int64_t m = 0; m < M; ++m) dst[n * M + m] = src[m * N + n];
      }
    }
  });
  return t;
#else
  return a.t().contiguous();
#endif
}

// fp32 A (M, K) @ op(B): B^T of a (N, K) B when b_nk, else a (K, N) B; fp32 (M, N)
at::Tensor mm_f32(const at::Tensor& a, const at::Tensor& b, bool b_nk) {
  const int64_t M = a.size(0), K = a.size(1), N = b_nk ? b.size(0) : b.size(1);
  if (b_nk && M < kDotMaxRows && M > 0 && K > 0 && N > 0) {  // decoding: stream the weight once
    const at::Tensor ac = a.contiguous(), bc = b.contiguous();
    at::Tensor c = at::empty({M, N}, a.options());
    dot_gemm<DotF32<float>>(ac.const_data_ptr<float>(), bc.const_data_ptr<float>(), c.mutable_data_ptr<float>(), M,
                            N, K);
    return c;
  }
#if defined(CPU_CAPABILITY_AVX512)
  if (M >= kSgemmMinRows && K > 0 && N > 0) {
    const at::Tensor ac = a.contiguous(), bc = b.contiguous();
    at::Tensor c = at::empty({M, N}, a.options());
    sgemm<F32Dot>(ac.const_data_ptr<float>(), bc.const_data_ptr<float>(), b_nk, c.mutable_data_ptr<float>(), M, N,
                  K);
    return c;
  }
#endif
  return at::mm(a, b_nk ? b.t() : b);
}

#ifdef MPTK_BF16_PAIRS
// 32 bf16 (a masked load) as two fp32 vectors, and back rounded to nearest even: ATen's conversions
inline void bf16x32_to_f32(__m512i v, __m512& lo, __m512& hi) {
  std::tie(lo, hi) = at::vec::convert_to_float<c10::BFloat16>(Vectorized<c10::BFloat16>(v));
}
inline __m512i f32_to_bf16x32(__m512 lo, __m512 hi) {
  return at::vec::convert_from_float<c10::BFloat16>(Vf(lo), Vf(hi));
}

// The backward of a bf16 linear where the CPU has AVX512-BF16, so that oneDNN's bf16 matmul
// (at::mm) is native (0.9-1.0 TFLOP/s here, ahead of our panels in the (M, N) @ (N, K) and
// transposed layouts of the backward). One pass over dout (and the saved tensor) makes dpre =
// dout * act'(h) rounded to bf16, as PyTorch's bf16 autograd rounds it, and sums db in fp32
// from the unrounded values: per fixed block of rows, then the blocks in order, so the result
// does not depend on the thread count.
template <Act A>
void bf16_dpre_pass(const uint16_t* d, const uint16_t* s, uint16_t* dpre, float* part, int64_t M, int64_t N) {
  constexpr int64_t kRows = 64;  // rows per block of db terms
  at::parallel_for(0, (M + kRows - 1) / kRows, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t blk = b0; blk < b1; ++blk) {
      for (int64_t m = blk * kRows; m < std::min(M, (blk + 1) * kRows); ++m) {
        for (int64_t n = 0; n < N; n += 32) {
          const int64_t cols = std::min<int64_t>(32, N - n), off = m * N + n;
          const __mmask32 mk = _cvtu32_mask32(static_cast<uint32_t>((uint64_t{1} << cols) - 1u));
          __m512 lo, hi;
          bf16x32_to_f32(_mm512_maskz_loadu_epi16(mk, d + off), lo, hi);
          if constexpr (A != Act::kNone) {
            __m512 slo, shi;
            bf16x32_to_f32(_mm512_maskz_loadu_epi16(mk, s + off), slo, shi);
            lo = _mm512_mul_ps(lo, act_grad(Vf(slo), A));
            hi = _mm512_mul_ps(hi, act_grad(Vf(shi), A));
            _mm512_mask_storeu_epi16(dpre + off, mk, f32_to_bf16x32(lo, hi));
          }
          if (part) {  // masked-off lanes hold zeros
            float* pr = part + blk * N + n;
            const __mmask16 m_lo = static_cast<__mmask16>(mk), m_hi = static_cast<__mmask16>(mk >> 16);
            _mm512_mask_storeu_ps(pr, m_lo, _mm512_add_ps(_mm512_maskz_loadu_ps(m_lo, pr), lo));
            _mm512_mask_storeu_ps(pr + 16, m_hi, _mm512_add_ps(_mm512_maskz_loadu_ps(m_hi, pr + 16), hi));
          }
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_bwd_bf16(const at::Tensor& dout, const at::Tensor& x,
                                                               const at::Tensor& weight, const at::Tensor& saved,
                                                               Act act, bool has_bias) {
  const int64_t M = x.size(0), N = weight.size(0);
  const at::Tensor d = dout.contiguous();
  at::Tensor dpre = d, db = at::empty({0}, d.options().dtype(at::kFloat));
  if (act != Act::kNone || has_bias) {
    const at::Tensor sv = act == Act::kNone ? at::Tensor() : saved.contiguous();
    if (act != Act::kNone) dpre = at::empty({M, N}, d.options());
    const int64_t n_blocks = (M + 63) / 64;
    at::Tensor part = at::zeros({has_bias ? n_blocks : 0, N}, d.options().dtype(at::kFloat));
    const auto* dp = reinterpret_cast<const uint16_t*>(d.const_data_ptr<c10::BFloat16>());
    const auto* sp = sv.defined() ? reinterpret_cast<const uint16_t*>(sv.const_data_ptr<c10::BFloat16>()) : nullptr;
    auto* op = act == Act::kNone ? nullptr : reinterpret_cast<uint16_t*>(dpre.mutable_data_ptr<c10::BFloat16>());
    float* pp = has_bias ? part.mutable_data_ptr<float>() : nullptr;
    switch (act) {  // the activation a compile-time constant in the loop
      case Act::kRelu: bf16_dpre_pass<Act::kRelu>(dp, sp, op, pp, M, N); break;
      case Act::kGelu: bf16_dpre_pass<Act::kGelu>(dp, sp, op, pp, M, N); break;
      case Act::kGeluTanh: bf16_dpre_pass<Act::kGeluTanh>(dp, sp, op, pp, M, N); break;
      default: bf16_dpre_pass<Act::kNone>(dp, sp, op, pp, M, N);
    }
    if (has_bias) {
      db = at::empty({N}, d.options().dtype(at::kFloat));
      float* dbp = db.mutable_data_ptr<float>();
      at::parallel_for(0, N, 1024, [&](int64_t n0, int64_t n1) {
        for (int64_t n = n0; n < n1; ++n) {
          float acc = 0.f;
          for (int64_t blk = 0; blk < n_blocks; ++blk) acc += pp[blk * N + n];
          dbp[n] = acc;
        }
      });
    }
  }
  return {at::mm(dpre, weight), at::mm(dpre.t(), x), db};
}
#endif

std::tuple<at::Tensor, at::Tensor> linear_fwd_cpu(const at::Tensor& x, const at::Tensor& weight,
                                                  const std::optional<at::Tensor>& bias, c10::string_view activation) {
  const char* op = "linear";
  check_2d(x, "x", op);
  check_2d(weight, "weight", op);
  check_float(x, "x", op);
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), op, ": weight must have x's dtype ", x.scalar_type(), ", got ",
              weight.scalar_type());
  TORCH_CHECK(weight.size(1) == x.size(1), op, ": weight is (N, K) = ", weight.sizes(), " but x has K = ", x.size(1));
  const int64_t M = x.size(0), N = weight.size(0);
  check_bias(bias, N, op);
  const Act act = parse_activation(std::string_view(activation.data(), activation.size()), op);
  const bool keep_preact = act == Act::kGelu || act == Act::kGeluTanh;
  if (x.scalar_type() == at::kDouble) {  // float64: plain ATen (a reference-precision path)
    at::Tensor h = at::mm(x, weight.t());
    if (bias) h = at::add(h, bias->to(at::kDouble));
    at::Tensor out = act == Act::kRelu ? h.clamp_min(0) : act == Act::kGelu ? at::gelu(h)
                     : act == Act::kGeluTanh ? at::gelu(h, "tanh") : h.clone();
    return {out, keep_preact ? h : at::empty({0}, x.options())};
  }
  const int64_t K = x.size(1);
  const bool any = M > 0 && N > 0 && K > 0;
  at::Tensor bias32 = bias ? bias->to(at::kFloat).contiguous() : at::Tensor();
  const float* bp = bias ? bias32.const_data_ptr<float>() : nullptr;
  at::Tensor preact = keep_preact ? at::empty({M, N}, x.options()) : at::empty({0}, x.options());
#if defined(CPU_CAPABILITY_AVX512)
  if (any && M >= kDotMaxRows) {
    // the panel GEMM, whose epilogue writes out (and preact) from each finished block: bf16
    // straight into vdpbf16ps (even K), else fp32 (16-bit inputs widened first)
    at::Tensor out = at::empty({M, N}, x.options());
    MPTK_DISPATCH_F32_F16_BF16(x.scalar_type(), "mptkernels_linear_fwd_panels", [&] {
      scalar_t* o = out.mutable_data_ptr<scalar_t>();
      scalar_t* pr = keep_preact ? preact.mutable_data_ptr<scalar_t>() : nullptr;
      auto epi = [&](int64_t m0, int64_t m1, int64_t n0, int64_t cols, float* c, int64_t ldc) {
        for (int64_t m = m0; m < m1; ++m)
          epilogue_row<scalar_t>(c + (m - m0) * ldc, bp ? bp + n0 : nullptr, act, o + m * N + n0,
                                 pr ? pr + m * N + n0 : nullptr, cols);
      };
#ifdef MPTK_BF16_PAIRS
      if (x.scalar_type() == at::kBFloat16 && K % 2 == 0) {
        const at::Tensor xc = x.contiguous(), wc = weight.contiguous();
        sgemm<Bf16Pairs>(xc.const_data_ptr<c10::BFloat16>(), wc.const_data_ptr<c10::BFloat16>(), /*b_nk=*/true, nullptr,
                       M, N, K, epi);
        return;
      }
#endif
      const at::Tensor xf = wide(x), wf = wide(weight);
      sgemm<F32Dot>(xf.const_data_ptr<float>(), wf.const_data_ptr<float>(), /*b_nk=*/true, nullptr, M, N, K, epi);
    });
    return {out, preact};
  }
#endif
  // few rows (dot tiles: the weight streamed once), or no AVX-512: the product in fp32, then
  // the epilogue in one pass
  at::Tensor h;  // fp32 (M, N)
#ifdef MPTK_BF16_PAIRS
  if (x.scalar_type() == at::kBFloat16 && any) {  // bf16 straight into vdpbf16ps
    const at::Tensor xc = x.contiguous(), wc = weight.contiguous();
    h = at::empty({M, N}, x.options().dtype(at::kFloat));
    dot_gemm<DotBf16>(xc.const_data_ptr<c10::BFloat16>(), wc.const_data_ptr<c10::BFloat16>(),
                      h.mutable_data_ptr<float>(), M, N, K);
  }
#endif
  if (!h.defined() && x.scalar_type() != at::kFloat && M < kDotMaxRows && any) {
    // 16-bit weights are widened in registers as the dot tiles read them
    const at::Tensor xf = wide(x), wc = weight.contiguous();
    h = at::empty({M, N}, x.options().dtype(at::kFloat));
    AT_DISPATCH_REDUCED_FLOATING_TYPES(x.scalar_type(), "mptkernels_linear_dot16", [&] {
      dot_gemm<DotF32<scalar_t>>(xf.const_data_ptr<float>(), wc.const_data_ptr<scalar_t>(),
                                 h.mutable_data_ptr<float>(), M, N, K);
    });
  }
  if (!h.defined()) h = mm_f32(wide(x), wide(weight), /*b_nk=*/true);
  at::Tensor out = x.scalar_type() == at::kFloat ? h : at::empty({M, N}, x.options());
  if (x.scalar_type() == at::kFloat && !bias && act == Act::kNone) return {out, preact};  // the product is it
  MPTK_DISPATCH_F32_F16_BF16(x.scalar_type(), "mptkernels_linear_fwd", [&] {
    linear_epilogue<scalar_t>(h.mutable_data_ptr<float>(), bp, act, out.mutable_data_ptr<scalar_t>(),
                              keep_preact ? preact.mutable_data_ptr<scalar_t>() : nullptr, M, N);
  });
  return {out, preact};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_bwd_cpu(const at::Tensor& dout, const at::Tensor& x,
                                                              const at::Tensor& weight, const at::Tensor& saved,
                                                              c10::string_view activation, bool has_bias) {
  const char* op = "linear_bwd";
  check_2d(x, "x", op);
  check_2d(weight, "weight", op);
  const int64_t M = x.size(0), N = weight.size(0);
  TORCH_CHECK(dout.dim() == 2 && dout.size(0) == M && dout.size(1) == N, op, ": dout must be (", M, ", ", N,
              "), got ", dout.sizes());
  const Act act = parse_activation(std::string_view(activation.data(), activation.size()), op);
  const bool is_double = x.scalar_type() == at::kDouble;
  if (act != Act::kNone) {
    TORCH_CHECK(saved.dim() == 2 && saved.size(0) == M && saved.size(1) == N, op, ": saved must be (", M, ", ", N,
                ") for activation ", activation, ", got ", saved.sizes());
  }
#ifdef MPTK_BF16_PAIRS
  if (x.scalar_type() == at::kBFloat16) return linear_bwd_bf16(dout, x, weight, saved, act, has_bias);
#endif
  // dpre = dout * act'(h) in one pass into a new tensor; without an activation dout as is
  at::Tensor dpre = is_double ? dout.contiguous() : dout.to(at::kFloat).contiguous();
  if (act != Act::kNone) {
    const at::Tensor s = is_double ? saved.contiguous() : saved.to(at::kFloat).contiguous();
    const at::Tensor d_in = dpre;
    dpre = at::empty_like(d_in);
    AT_DISPATCH_FLOATING_TYPES(dpre.scalar_type(), "mptkernels_linear_bwd", [&] {
      const scalar_t* d = d_in.const_data_ptr<scalar_t>();
      const scalar_t* sp = s.const_data_ptr<scalar_t>();
      scalar_t* o = dpre.mutable_data_ptr<scalar_t>();
      at::parallel_for(0, M * N, 16384, [&](int64_t i0, int64_t i1) {
        int64_t i = i0;
        if constexpr (std::is_same_v<scalar_t, float>)
          for (; i + kWf <= i1; i += kWf) (Vf::loadu(d + i) * act_grad(Vf::loadu(sp + i), act)).store(o + i);
        for (; i < i1; ++i) o[i] = d[i] * static_cast<scalar_t>(act_grad(static_cast<float>(sp[i]), act));
      });
    });
  }
  at::Tensor dx, dw;
  if (is_double) {
    dx = at::mm(dpre, weight);
    dw = at::mm(dpre.t(), x);
  } else {
    dx = mm_f32(dpre, wide(weight), /*b_nk=*/false).to(x.scalar_type());      // (M, N) @ (N, K)
    dw = mm_f32(transpose_f32(dpre), wide(x), /*b_nk=*/false).to(weight.scalar_type());  // (N, M) @ (M, K)
  }
  at::Tensor db = has_bias ? dpre.sum(0) : at::empty({0}, dpre.options());
  return {dx, dw, db};
}

// ---------------------------------------------------------------- quantize_rowwise
// a row of x as fp32: itself when it already is, else widened into buf
template <typename T>
const float* xr_as_float(const T* xr, float* buf, int64_t K) {
  if constexpr (std::is_same_v<T, float>) {
    return xr;
  } else {
    for (int64_t k = 0; k < K; ++k) buf[k] = static_cast<float>(xr[k]);
    return buf;
  }
}

// a rounded, clamped quotient as int8; NaN (a NaN element: casting it is undefined) becomes 0,
// as the AVX-512 conversion, the CUDA kernel and the reference give
inline int8_t nan_to_zero_int8(float r) { return std::isnan(r) ? int8_t(0) : static_cast<int8_t>(r); }

template <typename T>
void quantize_rows(const T* x, int64_t M, int64_t K, int8_t* q, float* scale) {
  at::parallel_for(0, M, std::max<int64_t>(1, 16384 / std::max<int64_t>(K, 1)), [&](int64_t m0, int64_t m1) {
    std::vector<float> wide_row(std::is_same_v<T, float> ? 0 : K);
    for (int64_t m = m0; m < m1; ++m) {
      const T* xr = x + m * K;
      const float* row = xr_as_float(xr, wide_row.data(), K);
      Vf vmax(0.f);
      int64_t k = 0;
      for (; k + kWf <= K; k += kWf) vmax = at::vec::maximum(vmax, Vf::loadu(row + k).abs());
      float absmax = at::vec::vec_reduce_all<float>([](Vf& a, Vf& b) { return at::vec::maximum(a, b); }, vmax);
      // NaN-propagating like the vector maximum and torch's amax (std::max would drop a NaN)
      for (; k < K; ++k) {
        const float a = std::fabs(row[k]);
        absmax = std::isnan(a) || std::isnan(absmax) ? a + absmax : std::max(absmax, a);
      }
      const float s = absmax > 0.f ? absmax / 127.f : 1.f;
      scale[m] = s;
      // x / s (IEEE division, as the reference), rounded half to even, clamped
      const Vf vs(s), lo(-127.f), hi(127.f);
      int8_t* qr = q + m * K;
      for (k = 0; k + kWf <= K; k += kWf) {
        const Vf r = at::vec::clamp(Vf::loadu(row + k) / vs, lo, hi).round();
#if defined(CPU_CAPABILITY_AVX512)
        // exact small integers: convert and narrow to 16 bytes in two instructions
        _mm_storeu_si128(reinterpret_cast<__m128i*>(qr + k), _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(r)));
#else
        alignas(64) float tmp[kWf];
        r.store(tmp);
        for (int64_t i = 0; i < kWf; ++i) qr[k + i] = nan_to_zero_int8(tmp[i]);
#endif
      }
      for (; k < K; ++k) qr[k] = nan_to_zero_int8(std::clamp(std::nearbyint(row[k] / s), -127.f, 127.f));
    }
  });
}

std::tuple<at::Tensor, at::Tensor> quantize_rowwise_cpu(const at::Tensor& x) {
  const char* op = "quantize_rowwise";
  check_2d(x, "x", op);
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16, op,
              ": x must be float32, float16 or bfloat16, got ", x.scalar_type());
  const at::Tensor xc = x.contiguous();
  const int64_t M = x.size(0), K = x.size(1);
  at::Tensor q = at::empty({M, K}, x.options().dtype(at::kChar));
  at::Tensor scale = at::empty({M}, x.options().dtype(at::kFloat));
  if (M == 0) return {q, scale};
  if (K == 0) return {q, scale.fill_(1.0)};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "mptkernels_quantize_rowwise", [&] {
    quantize_rows<scalar_t>(xc.const_data_ptr<scalar_t>(), M, K, q.mutable_data_ptr<int8_t>(),
                            scale.mutable_data_ptr<float>());
  });
  return {q, scale};
}

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
inline void pack_int8_row(const int8_t* __restrict s, Elem* __restrict d, int64_t K, int64_t Kp, int32_t shift) {
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
at::Tensor pack_int8(const at::Tensor& t, int64_t Kp, int32_t shift) {
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
inline void int8_tile(const Elem* A, const Elem* B, const int32_t* corr, int64_t Kp, int64_t m0, int64_t n0,
                      Epi& epi) {
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
void pack_panel(const int8_t* B, int64_t N, int64_t K, int64_t n0, int64_t Kp, int8_t* P, int32_t* corr) {
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
inline void panel_tile(const Elem* A, int64_t lda, const int8_t* P, int64_t k4a, int64_t k4b, int32_t* part,
                       const int32_t* corr, bool first, bool last, int64_t m, int64_t n0, int64_t cols, Epi& epi) {
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
void int8_gemm_panels(const at::Tensor& a, const at::Tensor& b, Epi& epi) {
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
void int8_gemm(const at::Tensor& a, const at::Tensor& b, Epi epi) {
  const int64_t M = a.size(0), N = b.size(0), K = a.size(1);
  TORCH_CHECK(K <= 130000, "int8 GEMM: K = ", K, " could overflow the int32 accumulators (K <= 130000)");
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

void check_int8_operand(const at::Tensor& t, const char* name, const char* op) {
  check_2d(t, name, op);
  TORCH_CHECK(t.scalar_type() == at::kChar, op, ": ", name, " must be int8, got ", t.scalar_type());
}

at::Tensor int8_mm_cpu(const at::Tensor& a, const at::Tensor& b) {
  const char* op = "int8_mm";
  check_int8_operand(a, "a", op);
  check_int8_operand(b, "b", op);
  TORCH_CHECK(a.size(1) == b.size(1), op, ": a is (M, K) = ", a.sizes(), " and b (N, K) = ", b.sizes(),
              "; their K must match");
  at::Tensor c = at::empty({a.size(0), b.size(0)}, a.options().dtype(at::kInt));
  if (c.numel() == 0) return c;
  if (a.size(1) == 0) return c.zero_();
  int32_t* cp = c.mutable_data_ptr<int32_t>();
  const int64_t N = b.size(0);
  int8_gemm(a, b, [cp, N](int64_t m, int64_t n0, const int32_t* v, int64_t count) {
    std::memcpy(cp + m * N + n0, v, count * sizeof(int32_t));
  });
  return c;
}

at::Tensor int8_linear_cpu(const at::Tensor& x, const at::Tensor& w_int8, const at::Tensor& w_scale,
                           const std::optional<at::Tensor>& bias, c10::string_view activation) {
  const char* op = "int8_linear";
  check_2d(x, "x", op);
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16, op,
              ": x must be float32, float16 or bfloat16, got ", x.scalar_type());
  check_int8_weight(w_int8, w_scale, x.size(1), op);
  const int64_t M = x.size(0), N = w_int8.size(0);
  check_bias(bias, N, op);
  const Act act = parse_activation(std::string_view(activation.data(), activation.size()), op);
  at::Tensor out = at::empty({M, N}, x.options());
  if (out.numel() == 0) return out;
  auto [xq, xs] = quantize_rowwise_cpu(x);
  const float* xsp = xs.const_data_ptr<float>();
  const at::Tensor ws = w_scale.contiguous();
  const float* wsp = ws.const_data_ptr<float>();
  at::Tensor bias32 = bias ? bias->to(at::kFloat).contiguous() : at::Tensor();
  const float* bp = bias ? bias32.const_data_ptr<float>() : nullptr;
  MPTK_DISPATCH_F32_F16_BF16(x.scalar_type(), "mptkernels_int8_linear", [&] {
    scalar_t* op_ = out.mutable_data_ptr<scalar_t>();
    if (x.size(1) == 0) {  // no products: the epilogue of zeros
      std::vector<float> zeros(N, 0.f);
      for (int64_t m = 0; m < M; ++m) epilogue_row<scalar_t>(zeros.data(), bp, act, op_ + m * N, nullptr, N);
      return;
    }
    // each run of int32 products is scaled (acc * x_scale * w_scale) and goes through the
    // shared epilogue (bias, activation, rounding) while it is still in cache
    int8_gemm(xq, w_int8, [=](int64_t m, int64_t n0, const int32_t* v, int64_t count) {
      float h[kPanelMaxRun];
      const float xs_m = xsp[m];
      for (int64_t j = 0; j < count; ++j) h[j] = static_cast<float>(v[j]) * xs_m * wsp[n0 + j];
      epilogue_row<scalar_t>(h, bp ? bp + n0 : nullptr, act, op_ + m * N + n0, nullptr, count);
    });
  });
  return out;
}

// ---------------------------------------------------------------- weight-only int8
// Each task converts kDotNR weight rows at a time to fp32 (a block that stays in L1), then
// runs the dot tiles above over them and the rows of x. Rows of x go in chunks of kWoMChunk (their fp32 copy stays
// in L2 while the task's weight blocks pass); with M <= kWoMChunk (decoding, small batches)
// each weight byte is read from memory and converted once. The per-row scale is applied to
// the sums (x @ (w * s)^T = (x @ w^T) * s; int8 values are exact in fp32). Measured 1.4-9.8x
// MKL's F.linear with the fp32 weight at M = 1..2048 (docs/benchmarks.md); the earlier
// design (dequantised chunks of the weight through sgemm above 8 rows) was 0.65-1.06x.
constexpr int64_t kWoMChunk = 64;

template <typename T>
void weight_only_gemm(const T* x, const int8_t* w, const float* scale, const float* bias, int64_t M, int64_t N,
                      int64_t K, T* out) {
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
  const char* op = "weight_only_int8_linear";
  check_2d(x, "x", op);
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16, op,
              ": x must be float32, float16 or bfloat16, got ", x.scalar_type());
  check_int8_weight(w_int8, w_scale, x.size(1), op);
  const int64_t M = x.size(0), N = w_int8.size(0), K = x.size(1);
  check_bias(bias, N, op);
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
}  // namespace mptk::cpu

TORCH_LIBRARY_IMPL(mptkernels_cpu, CPU, m) {
  m.impl("linear_fwd", &mptk::cpu::linear_fwd_cpu);
  m.impl("linear_bwd", &mptk::cpu::linear_bwd_cpu);
  m.impl("quantize_rowwise", &mptk::cpu::quantize_rowwise_cpu);
  m.impl("int8_mm", &mptk::cpu::int8_mm_cpu);
  m.impl("int8_linear", &mptk::cpu::int8_linear_cpu);
  m.impl("weight_only_int8_linear", &mptk::cpu::weight_only_int8_linear_cpu);
}

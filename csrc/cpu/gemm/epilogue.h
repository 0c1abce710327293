// The GEMM family's epilogue (see gemm.h): the activations (relu, exact and tanh GELU) and
// their derivatives, a vector at a time, and the fused pass that turns a row of fp32 sums
// into outputs: + bias, the pre-activation copy the GELUs' backward needs, act, rounding to
// the output dtype. Inline templates: every GEMM calls them on each finished block while it
// is in cache (linear.cpp, int8_linear.cpp), and the backwards call act_grad per vector.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "cpu/gemm/gemm.h"

namespace mptk::cpu::CPU_CAPABILITY {
namespace {  // internal to each including file: see gemm.h

constexpr float kInvSqrt2 = 0.70710678118654752f;
constexpr float kSqrt2OverPi = 0.79788456080286536f;
constexpr float kInvSqrt2Pi = 0.39894228040143268f;
constexpr float kTanhCoef = 0.044715f;

MPTK_ALWAYS_INLINE Vf act_fwd(const Vf& h, Act a) {
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
MPTK_ALWAYS_INLINE Vf act_grad(const Vf& s, Act a) {
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

// ---------------------------------------------------------------- linear
// One row of N outputs: h (fp32, in place) += bias; preact (x's dtype) = h if wanted;
// out = act(h) rounded to T. A chunk (two fp32 vectors: one 16-bit vector) at a time, so
// 16-bit outputs round in registers (element-wise scalar rounding cost 10x the GELU itself).
template <typename T>
MPTK_FLATTEN inline void epilogue_row(float* h,            // [N] fp32 sums, overwritten
                                      const float* bias,   // [N] or null
                                      Act act,
                                      T* out,              // [N]
                                      T* preact,           // [N] or null
                                      int64_t N) {
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
void linear_epilogue(float* h,            // [M, N] fp32 sums, overwritten
                     const float* bias,   // [N] or null
                     Act act,
                     T* out,              // [M, N]
                     T* preact,           // [M, N] or null
                     int64_t M, int64_t N) {
  at::parallel_for(0, M, std::max<int64_t>(1, 16384 / std::max<int64_t>(N, 1)), [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m)
      epilogue_row(h + m * N, bias, act, out + m * N, preact ? preact + m * N : nullptr, N);
  });
}

}  // namespace
}  // namespace mptk::cpu::CPU_CAPABILITY

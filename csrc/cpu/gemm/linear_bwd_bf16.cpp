// The GEMM family's bf16 linear backward (see gemm.h), where the CPU has AVX512-BF16 (the
// file is empty otherwise): dx and dw on oneDNN's native bf16 matmul, after one fused pass
// over dout that makes dpre = dout * act'(h) in bf16 and the bias gradient's partial sums.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <cstdint>
#include <tuple>

#include "cpu/gemm/epilogue.h"
#include "cpu/gemm/gemm.h"

#ifdef MPTK_BF16_PAIRS
namespace mptk::cpu::CPU_CAPABILITY {
namespace {

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
void bf16_dpre_pass(const uint16_t* d,  // [M, N] bf16 dout
                    const uint16_t* s,  // [M, N] bf16 saved pre-activation, or null without A
                    uint16_t* dpre,     // [M, N] bf16, or null without A
                    float* part,        // [ceil(M / 64), N] zeros, db's partial sums; or null
                    int64_t M, int64_t N) {
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

}  // namespace

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

}  // namespace mptk::cpu::CPU_CAPABILITY
#endif  // MPTK_BF16_PAIRS

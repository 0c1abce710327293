// The GEMM family's linear (see gemm.h): linear_fwd and linear_bwd on the CPU, and the choice
// of GEMM per shape and dtype. Forward: few rows on the dot tiles (the weight streamed once),
// more on the AVX-512 panels with the epilogue fused per block (bf16 straight into vdpbf16ps
// at the avx512_bf16 level, other 16-bit inputs widened to fp32), else at::mm
// then one epilogue pass; float64 on plain ATen. Backward: dpre = dout * act'(h) in one pass,
// then dx and dw on the same GEMMs (the bf16 backward is linear_bwd_bf16.cpp's).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/add.h>
#include <ATen/ops/clamp_min.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/gelu.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sum.h>

#include <optional>
#include <string_view>
#include <tuple>

#include "common/dispatch.h"
#include "cpu/gemm/dot_tiles.h"
#include "cpu/gemm/epilogue.h"
#include "cpu/gemm/gemm.h"
#include "cpu/gemm/panel_gemm.h"
#include "cpu/kernels.h"

namespace mptk::cpu::CPU_CAPABILITY {
namespace {

// a contiguous fp32 (M, N) -> its transpose (N, M), contiguous. AVX-512: 16 x 16 blocks
// through registers, parallel over column strips (an LM head's dpre, 512 x 50k: 18 ms through
// ATen's copy, about 5 ms here); else ATen's copy.
at::Tensor transpose_f32(const at::Tensor& a) {  // a: [M, N] -> [N, M]
#if defined(CPU_CAPABILITY_AVX512)
  const int64_t M = a.size(0), N = a.size(1);
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

std::tuple<at::Tensor, at::Tensor> linear_fwd_cpu(const at::Tensor& x, const at::Tensor& weight,
                                                  const std::optional<at::Tensor>& bias, c10::string_view activation) {
  const char* op = "linear";
  const int64_t M = x.size(0), N = weight.size(0);
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
    dispatch_dtype(kFloatHalfBf16, x.scalar_type(), op, [&](auto tag) {
      using scalar_t = decltype(tag);
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
  dispatch_dtype(kFloatHalfBf16, x.scalar_type(), op, [&](auto tag) {
    using scalar_t = decltype(tag);
    linear_epilogue<scalar_t>(h.mutable_data_ptr<float>(), bp, act, out.mutable_data_ptr<scalar_t>(),
                              keep_preact ? preact.mutable_data_ptr<scalar_t>() : nullptr, M, N);
  });
  return {out, preact};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_bwd_cpu(const at::Tensor& dout, const at::Tensor& x,
                                                              const at::Tensor& weight, const at::Tensor& saved,
                                                              c10::string_view activation, bool has_bias) {
  const char* op = "linear_bwd";
  const int64_t M = x.size(0), N = weight.size(0);
  const Act act = parse_activation(std::string_view(activation.data(), activation.size()), op);
  const bool is_double = x.scalar_type() == at::kDouble;
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

}  // namespace

// this level's entries of the kernel table (cpu/kernels.h)
void add_linear(Kernels& k) {
  k.linear_fwd = &linear_fwd_cpu;
  k.linear_bwd = &linear_bwd_cpu;
}

}  // namespace mptk::cpu::CPU_CAPABILITY

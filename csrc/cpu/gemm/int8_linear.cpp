// The GEMM family's int8 ops on the CPU (see gemm.h): int8_mm (a (M, K) @ b (N, K)^T, exact
// int32) and int8_linear (W8A8: x quantised per row, the int8 GEMM, then per run of int32
// results the scales x_scale * w_scale and the shared epilogue: bias, activation, rounding),
// both on the core of int8_gemm.h.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <cstdint>
#include <cstring>
#include <optional>
#include <string_view>
#include <vector>

#include "common/dispatch.h"
#include "cpu/gemm/epilogue.h"
#include "cpu/gemm/gemm.h"
#include "cpu/gemm/int8_gemm.h"
#include "cpu/kernels.h"

namespace mptk::cpu::CPU_CAPABILITY {
namespace {

at::Tensor int8_mm_cpu(const at::Tensor& a, const at::Tensor& b) {
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
  const int64_t M = x.size(0), N = w_int8.size(0);
  const Act act = parse_activation(std::string_view(activation.data(), activation.size()), op);
  at::Tensor out = at::empty({M, N}, x.options());
  if (out.numel() == 0) return out;
  auto [xq, xs] = quantize_rowwise_cpu(x);
  const float* xsp = xs.const_data_ptr<float>();
  const at::Tensor ws = w_scale.contiguous();
  const float* wsp = ws.const_data_ptr<float>();
  at::Tensor bias32 = bias ? bias->to(at::kFloat).contiguous() : at::Tensor();
  const float* bp = bias ? bias32.const_data_ptr<float>() : nullptr;
  dispatch_dtype(kFloatHalfBf16, x.scalar_type(), op, [&](auto tag) {
    using scalar_t = decltype(tag);
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

}  // namespace

// this level's entries of the kernel table (cpu/kernels.h)
void add_int8_linear(Kernels& k) {
  k.int8_mm = &int8_mm_cpu;
  k.int8_linear = &int8_linear_cpu;
}

}  // namespace mptk::cpu::CPU_CAPABILITY

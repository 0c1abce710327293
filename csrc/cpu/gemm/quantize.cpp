// The GEMM family's quantize_rowwise on the CPU (see gemm.h): symmetric per-row int8,
// scale = absmax / 127 (1 for an all-zero row), q = round-half-even(x / scale) clamped to
// [-127, 127], bit for bit the reference's. Also int8_linear's quantisation of x
// (int8_linear.cpp calls quantize_rowwise_cpu).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>
#include <type_traits>
#include <vector>

#include "cpu/gemm/gemm.h"
#include "cpu/kernels.h"

namespace mptk::cpu::CPU_CAPABILITY {
namespace {

// a row of x as fp32: itself when it already is, else widened into buf
template <typename T>
const float* xr_as_float(const T* xr,  // [K]
                         float* buf,   // [K] scratch, unused for fp32
                         int64_t K) {
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
void quantize_rows(const T* x,  // [M, K]
                   int64_t M, int64_t K,
                   int8_t* q,     // [M, K]
                   float* scale)  // [M]
{
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

}  // namespace

std::tuple<at::Tensor, at::Tensor> quantize_rowwise_cpu(const at::Tensor& x) {
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

// this level's entries of the kernel table (cpu/kernels.h)
void add_quantize(Kernels& k) {
  k.quantize_rowwise = &quantize_rowwise_cpu;
}

}  // namespace mptk::cpu::CPU_CAPABILITY

// Rotary position embedding in CUDA C++: the CUDA kernel of the rotary op of
// csrc/registration.cpp.
//
// A block row (threadIdx.y) per token, its threads spread over (head, unit) where a unit
// is one 16-byte vector of x: non-interleaved, a unit pairs the vector at feature f of the
// first half with the one at f + rotary_dim/2; interleaved, a unit is VEC/2 adjacent
// (even, odd) pairs. Features past rotary_dim are copied a vector at a time. The token's
// cos/sin row is shared by all its heads (L1 hits after the first). When the head layout
// does not allow 16-byte vectors (odd strides, rotary_dim or head_dim, unaligned data) the
// same kernel runs a pair (or one feature) at a time with scalar loads.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include "common/dispatch.h"

#include <cuda_runtime.h>

#include <climits>
#include <cstdint>
#include <optional>
#include <type_traits>

#include "common/cuda_launch.cuh"
#include "common/cuda_pack.cuh"

namespace mptk::cuda {
namespace {

// V elements as float; ALIGNED: one packed access, else V scalar ones
template <int V, bool ALIGNED, typename U>
__device__ __forceinline__ void load(const U* __restrict__ p, float (&out)[V]) {
  if constexpr (ALIGNED) {
    const Pack<U, V> a = *reinterpret_cast<const Pack<U, V>*>(p);
#pragma unroll
    for (int k = 0; k < V; ++k) out[k] = static_cast<float>(a.v[k]);
  } else {
#pragma unroll
    for (int k = 0; k < V; ++k) out[k] = static_cast<float>(p[k]);
  }
}

template <int V, bool ALIGNED, typename T>
__device__ __forceinline__ void store(T* __restrict__ p, const float (&in)[V]) {
  if constexpr (ALIGNED) {
    Pack<T, V> a;
#pragma unroll
    for (int k = 0; k < V; ++k) a.v[k] = static_cast<T>(in[k]);
    *reinterpret_cast<Pack<T, V>*>(p) = a;
  } else {
#pragma unroll
    for (int k = 0; k < V; ++k) p[k] = static_cast<T>(in[k]);
  }
}

// VEC: features per unit. ALIGNED: units are moved as packs (the host checked alignment);
// the scalar variants are VEC = 1 (halves) and VEC = 2, unaligned (pairs), whose copied
// tail goes one feature at a time.
template <typename T, int VEC, bool ALIGNED, bool INTERLEAVED>
__global__ void __launch_bounds__(256)
    rotary_kernel(const T* __restrict__ x,          // [B, S, H, D], strides (sb, ss, sh, 1)
                  const float* __restrict__ cos_t,  // [max_seqlen, half]
                  const float* __restrict__ sin_t,  // [max_seqlen, half]
                  const int* __restrict__ offsets,  // [B], or null: every sequence starts at `offset`
                  T* __restrict__ out,              // [B, S, H, D], contiguous
                  int64_t n_tok, int S, int H, int D, int half, int64_t max_seqlen, int64_t offset, int64_t sb,
                  int64_t ss, int64_t sh, bool conjugate) {
  constexpr int CV = ALIGNED ? VEC : 1;  // features per copied unit
  const int64_t tok = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  if (tok >= n_tok) return;  // no barrier in this kernel
  const int64_t bi = tok / S;
  const int si = static_cast<int>(tok - bi * S);
  const int64_t pos = si + (offsets ? static_cast<int64_t>(offsets[bi]) : offset);
  // A position outside the table (possible only with tensor offsets, which the host does
  // not read) turns the rotated features into NaN: visible, and no host sync or trap.
  const bool valid = pos >= 0 && pos < max_seqlen;
  const float* crow = cos_t + (valid ? pos : 0) * half;  // [half]
  const float* srow = sin_t + (valid ? pos : 0) * half;  // [half]
  const float sign = conjugate ? -1.f : 1.f;
  const int rot = 2 * half;
  const int n_rot = (INTERLEAVED ? rot : half) / VEC;
  const int units = n_rot + (D - rot) / CV;
  const T* xt = x + bi * sb + si * ss;
  T* ot = out + tok * H * D;

  for (int k = threadIdx.x; k < H * units; k += blockDim.x) {
    const int h = k / units, u = k - h * units;
    const T* xh = xt + h * sh;  // [D]
    T* oh = ot + static_cast<int64_t>(h) * D;  // [D]
    if (u < n_rot) {
      constexpr int NC = INTERLEAVED ? VEC / 2 : VEC;  // cos/sin values per unit
      const int f = u * VEC;
      const int fc = INTERLEAVED ? f / 2 : f;
      float c[NC], sn[NC];
      if (valid) {
        load<NC, ALIGNED>(crow + fc, c);
        load<NC, ALIGNED>(srow + fc, sn);
      } else {
#pragma unroll
        for (int i = 0; i < NC; ++i) c[i] = sn[i] = __int_as_float(0x7fc00000);  // NaN
      }
      if constexpr (INTERLEAVED) {
        float a[VEC], o[VEC];
        load<VEC, ALIGNED>(xh + f, a);
#pragma unroll
        for (int i = 0; i < VEC / 2; ++i) {
          const float s = sign * sn[i];
          o[2 * i] = a[2 * i] * c[i] - a[2 * i + 1] * s;
          o[2 * i + 1] = a[2 * i] * s + a[2 * i + 1] * c[i];
        }
        store<VEC, ALIGNED>(oh + f, o);
      } else {
        float a1[VEC], a2[VEC], o1[VEC], o2[VEC];
        load<VEC, ALIGNED>(xh + f, a1);
        load<VEC, ALIGNED>(xh + f + half, a2);
#pragma unroll
        for (int i = 0; i < VEC; ++i) {
          const float s = sign * sn[i];
          o1[i] = a1[i] * c[i] - a2[i] * s;
          o2[i] = a1[i] * s + a2[i] * c[i];
        }
        store<VEC, ALIGNED>(oh + f, o1);
        store<VEC, ALIGNED>(oh + f + half, o2);
      }
    } else {
      // pass-through features: copied bit for bit
      const int f = rot + (u - n_rot) * CV;
      *reinterpret_cast<Pack<T, CV>*>(oh + f) = *reinterpret_cast<const Pack<T, CV>*>(xh + f);
    }
  }
}

template <typename T, int VEC, bool ALIGNED, bool INTERLEAVED>
void launch_rotary(const T* x, const float* cos_t, const float* sin_t, const int* offsets, T* out, int64_t B, int S,
                   int H, int D, int half, int64_t max_seqlen, int64_t offset, int64_t sb, int64_t ss, int64_t sh,
                   bool conjugate, cudaStream_t stream) {
  constexpr int CV = ALIGNED ? VEC : 1;
  const int units = (INTERLEAVED ? 2 * half : half) / VEC + (D - 2 * half) / CV;
  const int64_t work = static_cast<int64_t>(H) * units;  // threads' worth of work per token
  // 256 threads a block: one token's units when there are that many, else several tokens
  const int bx = static_cast<int>(std::min<int64_t>(256, round_up32(work)));
  const int by = 256 / bx;
  const int64_t n_tok = B * S;
  const int64_t blocks = ceil_div(n_tok, by);
  TORCH_CHECK(blocks <= INT_MAX && work <= INT_MAX, "rotary: x has too many tokens or heads: (", B, ", ", S, ", ", H,
              ", ", D, ")");
  rotary_kernel<T, VEC, ALIGNED, INTERLEAVED><<<static_cast<unsigned>(blocks), dim3(bx, by), 0, stream>>>(
      x, cos_t, sin_t, offsets, out, n_tok, S, H, D, half, max_seqlen, offset, sb, ss, sh, conjugate);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor rotary_cuda(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                       const std::optional<at::Tensor>& seqlen_offsets, int64_t seqlen_offset, bool interleaved,
                       bool conjugate) {
  // the arguments were checked by mptkernels/ops/rotary.py; what is left is this kernel's
  // own limit, its int indexing
  const int64_t B = x.size(0), S = x.size(1), H = x.size(2), D = x.size(3);
  const int64_t half = cos.size(1), max_seqlen = cos.size(0);
  TORCH_CHECK(S < INT_MAX && H < INT_MAX && D < INT_MAX, "rotary: x's shape ", x.sizes(), " is too large");
  const bool has_offsets = seqlen_offsets.has_value() && seqlen_offsets->defined();
  const int* offsets = has_offsets ? seqlen_offsets->const_data_ptr<int>() : nullptr;

  c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty({B, S, H, D}, x.options());
  if (out.numel() == 0) return out;
  // a size-1 dim's stride never multiplies a nonzero index: ignore it for alignment
  const int64_t sb = B > 1 ? x.stride(0) : 0, ss = S > 1 ? x.stride(1) : 0, sh = H > 1 ? x.stride(2) : 0;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  auto run = [&](auto tag) {
    using T = decltype(tag);
    constexpr int VEC = 16 / sizeof(T);
    const T* xp = x.const_data_ptr<T>();
    const float* cp = cos.const_data_ptr<float>();
    const float* sp = sin.const_data_ptr<float>();
    T* op = out.mutable_data_ptr<T>();
    // 16-byte units need every unit start (token base, half or pair group, tail) on a
    // vector boundary, and cos/sin rows whose unit slices are aligned too
    const bool vec = aligned16(xp) && aligned16(cp) && aligned16(sp) && sb % VEC == 0 && ss % VEC == 0 &&
                     sh % VEC == 0 && D % VEC == 0 && (interleaved ? (2 * half) % VEC == 0 : half % VEC == 0);
    const auto args = [&](auto launch) {
      launch(xp, cp, sp, offsets, op, B, static_cast<int>(S), static_cast<int>(H), static_cast<int>(D),
             static_cast<int>(half), max_seqlen, seqlen_offset, sb, ss, sh, conjugate, stream);
    };
    if (interleaved) {
      if (vec) args(launch_rotary<T, VEC, true, true>);
      else args(launch_rotary<T, 2, false, true>);
    } else {
      if (vec) args(launch_rotary<T, VEC, true, false>);
      else args(launch_rotary<T, 1, true, false>);
    }
  };
  dispatch_dtype(kFloatHalfBf16, x.scalar_type(), "rotary", run);
  return out;
}

}  // namespace
}  // namespace mptk::cuda

TORCH_LIBRARY_IMPL(mptkernels_cuda, CUDA, m) { m.impl("apply_rotary", &mptk::cuda::rotary_cuda); }

// quantize_rowwise in CUDA C++ (the GEMM family's quantiser; schema in csrc/registration.cpp).
//
// quantize_rowwise: symmetric per-row int8 quantisation, bit for bit the reference's
// (mptkernels/reference.py): scale = absmax / 127 as an IEEE fp32 division (1 for an
// all-zero row), q = round-half-even(x / scale) (IEEE division again, never a reciprocal
// multiply) clamped to [-127, 127].
//
// A block per row (a warp per row, several rows per block, for short rows). x is read from
// memory once: each thread keeps the 16-byte vectors j * blockDim.x + threadIdx.x of its
// row in registers, the row's absmax is reduced (warp max, then shared memory across
// warps), and the cached vectors are quantised and stored as 4-byte (fp32) or 8-byte
// (fp16/bf16) int8 packs. A row's elements before its first 16-byte boundary (any row
// stride and storage offset is allowed) and after its last full vector are one element per
// thread, kept in registers too. Rows longer than the register cache (16 vectors a thread
// at 512 threads: 32768 fp32 or 65536 fp16/bf16 elements) are walked twice instead, the
// second walk re-reading the row from L2.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/ones.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <tuple>

#include "common/cuda_launch.cuh"
#include "common/cuda_pack.cuh"
#include "common/dispatch.h"

namespace mptk::cuda {
namespace {

// |v| as fp32 bits: unsigned order is the order of magnitudes, with NaN above inf, so an
// unsigned max is an absmax that propagates NaN like torch's amax
__device__ __forceinline__ unsigned abs_bits(float v) { return __float_as_uint(v) & 0x7fffffffu; }

// round-half-even(v / s) clamped to [-127, 127]: cvt.rni is rintf's rounding, saturating
// (so +-inf quotients clamp) and NaN -> 0 (torch's cast of a NaN quotient on CUDA)
__device__ __forceinline__ int8_t quant(float v, float s) {
  const int i = __float2int_rn(__fdiv_rn(v, s));
  return static_cast<int8_t>(min(127, max(-127, i)));
}

// NV > 0: each thread caches up to NV vectors (the host keeps a row's vectors within
// NV * blockDim.x). NV == 0: no cache, the row is read twice.
template <typename T, int NV>
__global__ void __launch_bounds__(NV > 4 ? 512 : 1024)
    quantize_rowwise_kernel(const T* __restrict__ x,  // [M, K], row m at x + m * ldx, stride(1) == 1
                            int8_t* __restrict__ q,  // [M, K], contiguous
                            float* __restrict__ scale,  // [M]
                            int64_t M, int K, int64_t ldx) {
  constexpr int VEC = 16 / sizeof(T);
  using TP = Pack<T, VEC>;
  using QP = Pack<int8_t, VEC>;
  __shared__ unsigned red[32];
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  if (row >= M) return;  // blockDim.y > 1 only for warp-per-row blocks: no barrier below
  const int tid = threadIdx.x, nt = blockDim.x;
  const T* xr = x + row * ldx;  // [K]
  int8_t* qr = q + row * K;  // [K]
  // head elements up to the row's first 16-byte boundary, nvec aligned vectors, a tail
  const int head = min(K, static_cast<int>((16 - (reinterpret_cast<uintptr_t>(xr) & 15)) % 16 / sizeof(T)));
  const int nvec = (K - head) / VEC;
  const int tail = K - head - nvec * VEC;
  const T* xv = xr + head;  // [nvec * VEC + tail], 16-byte aligned
  int8_t* qv = qr + head;
  const bool qpack = reinterpret_cast<uintptr_t>(qv) % VEC == 0;  // packed int8 stores

  // loads first, then the uses: a thread's share of the row in flight at once
  const float fh = tid < head ? static_cast<float>(xr[tid]) : 0.f;
  const float ft = tid < tail ? static_cast<float>(xv[nvec * VEC + tid]) : 0.f;
  TP cache[NV > 0 ? NV : 1];
  if constexpr (NV > 0) {
#pragma unroll
    for (int j = 0; j < NV; ++j) {
      if (j * nt + tid < nvec) cache[j] = ld<T, VEC>(xv + (j * nt + tid) * VEC);
    }
  }
  unsigned m = max(abs_bits(fh), abs_bits(ft));
  if constexpr (NV > 0) {
#pragma unroll
    for (int j = 0; j < NV; ++j) {
      if (j * nt + tid < nvec) {
#pragma unroll
        for (int k = 0; k < VEC; ++k) m = max(m, abs_bits(static_cast<float>(cache[j].v[k])));
      }
    }
  } else {
    for (int v = tid; v < nvec; v += nt) {
      const TP a = ld<T, VEC>(xv + v * VEC);
#pragma unroll
      for (int k = 0; k < VEC; ++k) m = max(m, abs_bits(static_cast<float>(a.v[k])));
    }
  }
  const float amax = __uint_as_float(row_reduce(m, red, 0u, Max{}));
  // as the reference's torch.where(absmax > 0, absmax / 127, 1): a NaN absmax gives 1
  const float s = amax > 0.f ? __fdiv_rn(amax, 127.f) : 1.f;
  if (tid == 0) scale[row] = s;

  auto emit = [&](int v, TP a) {
    QP o;
#pragma unroll
    for (int k = 0; k < VEC; ++k) o.v[k] = quant(static_cast<float>(a.v[k]), s);
    if (qpack) {
      *reinterpret_cast<QP*>(qv + v * VEC) = o;
    } else {
#pragma unroll
      for (int k = 0; k < VEC; ++k) qv[v * VEC + k] = o.v[k];
    }
  };
  if constexpr (NV > 0) {
#pragma unroll
    for (int j = 0; j < NV; ++j) {
      opaque(cache[j]);
      if (j * nt + tid < nvec) emit(j * nt + tid, cache[j]);
    }
  } else {
    for (int v = tid; v < nvec; v += nt) emit(v, ld<T, VEC>(xv + v * VEC));  // second read, from L2
  }
  if (tid < head) qr[tid] = quant(fh, s);
  if (tid < tail) qv[nvec * VEC + tid] = quant(ft, s);
}

// ------------------------------------------------------------------------------------
// Host side
// ------------------------------------------------------------------------------------

template <typename T>
void launch_quantize_rowwise(const T* x, int8_t* q, float* scale, int64_t M, int K, int64_t ldx,
                             cudaStream_t stream) {
  constexpr int VEC = 16 / sizeof(T);
  // 4 cached vectors a thread up to 4096 vectors a row, 16 up to 8192, beyond that the row
  // is read twice (common/cuda_launch.cuh)
  const RowBlock rb = row_block(std::max<int64_t>(K / VEC, 1));  // a row's vectors, at most
  const int64_t blocks = ceil_div(M, rb.rpb);
  TORCH_CHECK(blocks <= INT_MAX, "quantize_rowwise: x has too many rows: ", M);
  auto kernel = rb.nv == 4    ? quantize_rowwise_kernel<T, 4>
                : rb.nv == 16 ? quantize_rowwise_kernel<T, 16>
                              : quantize_rowwise_kernel<T, 0>;
  kernel<<<static_cast<unsigned>(blocks), dim3(rb.tpr, rb.rpb), 0, stream>>>(x, q, scale, M, K, ldx);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor> quantize_rowwise_cuda(const at::Tensor& x) {
  constexpr const char* op = "quantize_rowwise";
  // the arguments were checked by mptkernels/ops/gemm.py (a 2-D float x whose last dim has
  // stride 1; rows may have any stride, padded or even overlapping: x is only read); what is
  // left is this kernel's own limits, its int column index and the alignment it reads at
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(K < INT_MAX, op, ": x has too many columns: ", x.sizes());

  c10::cuda::CUDAGuard guard(x.device());
  at::Tensor q = at::empty({M, K}, x.options().dtype(at::kChar));
  if (M == 0 || K == 0) {
    // nothing to read: an empty row's absmax is 0, so its scale is 1
    return {q, at::ones({M}, x.options().dtype(at::kFloat))};
  }
  at::Tensor scale = at::empty({M}, x.options().dtype(at::kFloat));
  TORCH_CHECK(reinterpret_cast<uintptr_t>(x.const_data_ptr()) % x.element_size() == 0, op,
              ": x's data must be aligned to its element size");
  const int64_t ldx = M > 1 ? x.stride(0) : 0;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  auto run = [&](auto tag) {
    using T = decltype(tag);
    launch_quantize_rowwise<T>(x.const_data_ptr<T>(), q.mutable_data_ptr<int8_t>(), scale.mutable_data_ptr<float>(), M,
                               static_cast<int>(K), ldx, stream);
  };
  dispatch_dtype(kFloatHalfBf16, x.scalar_type(), op, run);
  return {q, scale};
}

}  // namespace
}  // namespace mptk::cuda

TORCH_LIBRARY_IMPL(mptkernels_cuda, CUDA, m) { m.impl("quantize_rowwise", &mptk::cuda::quantize_rowwise_cuda); }

// LayerNorm / RMSNorm (+ fused residual add) forward and backward in CUDA C++: the
// layer_norm_fwd / layer_norm_bwd ops of csrc/registration.cpp (namespace mptkernels_cuda).
//
// Forward: a row per block (a warp per row, several rows per block, for short rows).
// Each thread owns the 16-byte vectors j * blockDim.x + threadIdx.x of its row and keeps
// them in registers as the rounded s in x's dtype, so x (and residual) are read once and y
// (and residual_out) written once; rows too long for the register budget (float32 past
// 32768 columns, the scalar path past 4096) are walked three times instead, the later
// walks re-reading from L2. Statistics are two-pass (mean, then centred variance).
//
// Backward: persistent blocks, each owning a contiguous range of rows, accumulate the
// dweight/dbias column sums of the columns they own in registers and write one row of a
// (blocks, N) fp32 buffer that a second kernel sums in a fixed order: deterministic, no
// atomics. Rows whose register footprint would not fit (past 8192 columns, 4096 on the
// scalar path) compute dx alone and a column kernel re-reads dy and s for dweight/dbias.
//
// Vector loads need N divisible by the vector width and 16-byte aligned base pointers;
// otherwise the same kernels run with one element per "vector".
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
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
#include <tuple>
#include <type_traits>

#include "common/cuda_launch.cuh"
#include "common/cuda_pack.cuh"

namespace mptk::cuda {
namespace {

template <typename U>
__device__ __forceinline__ float f32(U v) {
  return static_cast<float>(v);
}

// the value as it would be after a round trip through T
template <typename T>
__device__ __forceinline__ float round_to(float v) {
  return static_cast<float>(static_cast<T>(v));
}

// s = x (+ residual, summed in fp32 and rounded to T); store_s writes it to s_out
template <typename T, int VEC>
__device__ __forceinline__ Pack<T, VEC> load_s(const T* __restrict__ x, const T* __restrict__ res,
                                               T* __restrict__ s_out, bool store_s) {
  Pack<T, VEC> a = ld<T, VEC>(x);
  if (res) {
    const Pack<T, VEC> r = ld<T, VEC>(res);
#pragma unroll
    for (int k = 0; k < VEC; ++k) a.v[k] = static_cast<T>(f32(a.v[k]) + f32(r.v[k]));
    if (store_s) st<T, VEC>(s_out, a);
  }
  return a;
}

// Forward. NV > 0: up to NV vectors per thread cached in registers (the host guarantees
// N / VEC <= NV * blockDim.x). NV == 0: no cache, the row is re-read by each walk (s is
// recomputed from x and residual rather than read back from residual_out, which keeps
// every load of the kernel on data it never writes).
template <typename T, typename W, int VEC, int NV>
__global__ void __launch_bounds__(NV > 4 ? 512 : 1024)
    ln_fwd_kernel(const T* __restrict__ x,  // [M, N]
                  const T* __restrict__ res,  // [M, N] or null
                  const W* __restrict__ w,  // [N] or null
                  const W* __restrict__ b,  // [N] or null
                  T* __restrict__ y,  // [M, N]
                  T* __restrict__ s_out,  // [M, N], null iff res is
                  float* __restrict__ mean,  // [M], null for RMSNorm
                  float* __restrict__ rstd,  // [M]
                  int M, int N, float inv_n, float eps, float w_off, bool rms,
                  bool cast_before) {
  using TP = Pack<T, VEC>;
  using WP = Pack<W, VEC>;
  __shared__ float red[2][32];
  const int row = blockIdx.x * blockDim.y + threadIdx.y;
  if (row >= M) return;  // blockDim.y > 1 only for warp-per-row blocks: no barrier below
  const int tid = threadIdx.x, nt = blockDim.x, nvec = N / VEC;
  const int64_t off = static_cast<int64_t>(row) * N;
  const T* xr = x + off;
  const T* rr = res ? res + off : nullptr;
  T* sr = res ? s_out + off : nullptr;
  T* yr = y + off;

  // walk 1: s and its sum (of squares for RMSNorm)
  TP cache[NV > 0 ? NV : 1];
  float acc = 0.f;
  if constexpr (NV > 0) {
    // Loads are issued a group at a time before any of them is used, so a thread keeps
    // several in flight (a use inside each bounds check would serialise them); the group
    // bounds the registers the residual needs on top of the cache.
    constexpr int G = NV < 4 ? NV : NV > 4 ? 2 : 4;
#pragma unroll
    for (int j0 = 0; j0 < NV; j0 += G) {
#pragma unroll
      for (int j = j0; j < j0 + G; ++j) {
        if (j * nt + tid < nvec) cache[j] = ld<T, VEC>(xr + (j * nt + tid) * VEC);
      }
      if (res) {
        TP r[G];
#pragma unroll
        for (int j = j0; j < j0 + G; ++j) {
          if (j * nt + tid < nvec) r[j - j0] = ld<T, VEC>(rr + (j * nt + tid) * VEC);
        }
#pragma unroll
        for (int j = j0; j < j0 + G; ++j) {
          if (j * nt + tid < nvec) {
#pragma unroll
            for (int k = 0; k < VEC; ++k) cache[j].v[k] = static_cast<T>(f32(cache[j].v[k]) + f32(r[j - j0].v[k]));
            st<T, VEC>(sr + (j * nt + tid) * VEC, cache[j]);
          }
        }
      }
    }
#pragma unroll
    for (int j = 0; j < NV; ++j) {
      if (j * nt + tid < nvec) {
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          const float f = f32(cache[j].v[k]);
          acc += rms ? f * f : f;
        }
      }
    }
  } else {
    for (int v = tid; v < nvec; v += nt) {
      const TP a = load_s<T, VEC>(xr + v * VEC, rr ? rr + v * VEC : nullptr, sr ? sr + v * VEC : nullptr, true);
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const float f = f32(a.v[k]);
        acc += rms ? f * f : f;
      }
    }
  }
  acc = row_reduce(acc, red[0], 0.f, Sum{});
  if constexpr (NV > 0) {
#pragma unroll
    for (int j = 0; j < NV; ++j) opaque(cache[j]);
  }

  // walk 2 (LayerNorm): centred variance; two-pass so rows with a large mean keep precision
  float mu = 0.f, var;
  if (rms) {
    var = acc * inv_n;
  } else {
    mu = acc * inv_n;
    float sq = 0.f;
    if constexpr (NV > 0) {
#pragma unroll
      for (int j = 0; j < NV; ++j) {
        if (j * nt + tid < nvec) {
#pragma unroll
          for (int k = 0; k < VEC; ++k) {
            const float d = f32(cache[j].v[k]) - mu;
            sq += d * d;
          }
        }
      }
    } else {
      for (int v = tid; v < nvec; v += nt) {
        const TP a = load_s<T, VEC>(xr + v * VEC, rr ? rr + v * VEC : nullptr, nullptr, false);
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          const float d = f32(a.v[k]) - mu;
          sq += d * d;
        }
      }
    }
    var = row_reduce(sq, red[1], 0.f, Sum{}) * inv_n;
    if constexpr (NV > 0) {
#pragma unroll
      for (int j = 0; j < NV; ++j) opaque(cache[j]);
    }
  }
  const float rs = rsqrtf(var + eps);
  if (tid == 0) {
    if (!rms) mean[row] = mu;
    rstd[row] = rs;
  }

  // walk 3: y = xhat * (w + w_off) + b
  auto emit = [&](int v, const TP& a) {
    WP wv, bv;
    if (w) wv = ld<W, VEC>(w + v * VEC);
    if (b) bv = ld<W, VEC>(b + v * VEC);
    TP o;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      float h = (f32(a.v[k]) - mu) * rs;
      if (cast_before) h = round_to<T>(h);
      if (w) h *= f32(wv.v[k]) + w_off;
      if (b) h += f32(bv.v[k]);
      o.v[k] = static_cast<T>(h);
    }
    st<T, VEC>(yr + v * VEC, o);
  };
  if constexpr (NV > 0) {
#pragma unroll
    for (int j = 0; j < NV; ++j) {
      const int v = j * nt + tid;
      if (v < nvec) emit(v, cache[j]);
    }
  } else {
    for (int v = tid; v < nvec; v += nt)
      emit(v, load_s<T, VEC>(xr + v * VEC, rr ? rr + v * VEC : nullptr, nullptr, false));
  }
}

// Backward over the rows [M * blockIdx.x / gridDim.x, M * (blockIdx.x + 1) / gridDim.x).
// NV > 0: each thread owns up to NV vectors of columns (N / VEC <= NV * blockDim.x),
// caches the row's dy and s there between the two walks, and sums its columns' dweight /
// dbias terms over all the block's rows in registers, written once to the partial rows.
// NV == 0: dx only (the host runs one row per block and a column kernel for dw/db).
template <typename T, typename W, int VEC, int NV>
__global__ void __launch_bounds__(1024)
    ln_bwd_kernel(const T* __restrict__ dy,  // [M, N]
                  const T* __restrict__ dres,  // [M, N] or null
                  const T* __restrict__ s,  // [M, N]
                  const W* __restrict__ w,  // [N] or null
                  const float* __restrict__ mean,  // [M], null for RMSNorm
                  const float* __restrict__ rstd,  // [M]
                  T* __restrict__ dx,  // [M, N]
                  float* __restrict__ dw_part,  // [gridDim.x, N] or null
                  float* __restrict__ db_part,  // [gridDim.x, N] or null
                  int M, int N, float inv_n, float w_off, bool rms,
                  bool cast_before) {
  using TP = Pack<T, VEC>;
  using WP = Pack<W, VEC>;
  constexpr int NC = NV > 0 ? NV : 1;
  __shared__ float2 red[2][32];
  const int tid = threadIdx.x, nt = blockDim.x, nvec = N / VEC;
  const int64_t r0 = static_cast<int64_t>(M) * blockIdx.x / gridDim.x;
  const int64_t r1 = static_cast<int64_t>(M) * (blockIdx.x + 1) / gridDim.x;

  // (w + w_off) of the owned columns: the same for every row, so loaded once
  float weff[NC][VEC], accw[NC][VEC], accb[NC][VEC];
  if constexpr (NV > 0) {
#pragma unroll
    for (int j = 0; j < NV; ++j) {
      const int v = j * nt + tid;
      WP p;
      if (w && v < nvec) p = ld<W, VEC>(w + v * VEC);
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        weff[j][k] = (w && v < nvec) ? f32(p.v[k]) + w_off : 1.f;
        accw[j][k] = 0.f;
        accb[j][k] = 0.f;
      }
    }
  }

  for (int64_t r = r0; r < r1; ++r) {
    const int64_t off = r * N;
    const float mu = rms ? 0.f : mean[r];
    const float rs = rstd[r];
    const T* dyr = dy + off;
    const T* sr = s + off;
    float sg = 0.f, sgx = 0.f;
    if constexpr (NV > 0) {
      // all loads first, then the uses: the thread's share of the row in flight at once
      TP cdy[NV], cs[NV], dr[NV];
#pragma unroll
      for (int j = 0; j < NV; ++j) {
        const int v = j * nt + tid;
        if (v < nvec) {
          cdy[j] = ld<T, VEC>(dyr + v * VEC);
          cs[j] = ld<T, VEC>(sr + v * VEC);
        }
      }
#pragma unroll
      for (int j = 0; j < NV; ++j) {
        if (j * nt + tid < nvec) {
#pragma unroll
          for (int k = 0; k < VEC; ++k) {
            const float xh = (f32(cs[j].v[k]) - mu) * rs;
            const float d = f32(cdy[j].v[k]);
            const float g = d * weff[j][k];
            sg += g;
            sgx += g * xh;
            accw[j][k] += d * (cast_before ? round_to<T>(xh) : xh);
            accb[j][k] += d;
          }
        }
      }
      const float2 t = row_reduce(make_float2(sg, sgx), red[r & 1], make_float2(0.f, 0.f), Sum{});
      const float cg = rms ? 0.f : t.x * inv_n, cgx = t.y * inv_n;
#pragma unroll
      for (int j = 0; j < NV; ++j) {
        opaque(cdy[j]);
        opaque(cs[j]);
      }
      if (dres) {
#pragma unroll
        for (int j = 0; j < NV; ++j) {
          if (j * nt + tid < nvec) dr[j] = ld<T, VEC>(dres + off + (j * nt + tid) * VEC);
        }
      }
#pragma unroll
      for (int j = 0; j < NV; ++j) {
        const int v = j * nt + tid;
        if (v < nvec) {
          TP o;
#pragma unroll
          for (int k = 0; k < VEC; ++k) {
            const float xh = (f32(cs[j].v[k]) - mu) * rs;
            const float g = f32(cdy[j].v[k]) * weff[j][k];
            float d = rs * (g - cg - xh * cgx);
            if (dres) d += f32(dr[j].v[k]);
            o.v[k] = static_cast<T>(d);
          }
          st<T, VEC>(dx + off + v * VEC, o);
        }
      }
    } else {
      for (int v = tid; v < nvec; v += nt) {
        const TP a = ld<T, VEC>(sr + v * VEC), e = ld<T, VEC>(dyr + v * VEC);
        WP p;
        if (w) p = ld<W, VEC>(w + v * VEC);
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          const float xh = (f32(a.v[k]) - mu) * rs;
          const float g = f32(e.v[k]) * (w ? f32(p.v[k]) + w_off : 1.f);
          sg += g;
          sgx += g * xh;
        }
      }
      const float2 t = row_reduce(make_float2(sg, sgx), red[r & 1], make_float2(0.f, 0.f), Sum{});
      const float cg = rms ? 0.f : t.x * inv_n, cgx = t.y * inv_n;
      for (int v = tid; v < nvec; v += nt) {
        const TP a = ld<T, VEC>(sr + v * VEC), e = ld<T, VEC>(dyr + v * VEC);
        WP p;
        TP dr, o;
        if (w) p = ld<W, VEC>(w + v * VEC);
        if (dres) dr = ld<T, VEC>(dres + off + v * VEC);
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          const float xh = (f32(a.v[k]) - mu) * rs;
          const float g = f32(e.v[k]) * (w ? f32(p.v[k]) + w_off : 1.f);
          float d = rs * (g - cg - xh * cgx);
          if (dres) d += f32(dr.v[k]);
          o.v[k] = static_cast<T>(d);
        }
        st<T, VEC>(dx + off + v * VEC, o);
      }
    }
  }

  if constexpr (NV > 0) {
    const int64_t prow = static_cast<int64_t>(blockIdx.x) * N;
#pragma unroll
    for (int j = 0; j < NV; ++j) {
      const int v = j * nt + tid;
      if (v < nvec) {
        Pack<float, VEC> pw, pb;
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          pw.v[k] = accw[j][k];
          pb.v[k] = accb[j][k];
        }
        if (dw_part) st<float, VEC>(dw_part + prow + v * VEC, pw);
        if (db_part) st<float, VEC>(db_part + prow + v * VEC, pb);
      }
    }
  }
}

// Column tile of the two small column kernels: 32 columns (one per lane, coalesced) by
// kColLanes row lanes, reduced over the lanes through shared memory in a fixed order.
constexpr int kColLanes = 16;

// dweight/dbias partials for rows too long for ln_bwd_kernel's register accumulators:
// block (x, y) sums the rows [M * y / gridDim.y, M * (y + 1) / gridDim.y) of its columns.
template <typename T>
__global__ void __launch_bounds__(32 * kColLanes)
    ln_bwd_cols_kernel(const T* __restrict__ dy,  // [M, N]
                       const T* __restrict__ s,  // [M, N]
                       const float* __restrict__ mean,  // [M] or null
                       const float* __restrict__ rstd,  // [M]
                       float* __restrict__ dw_part,  // [gridDim.y, N] or null
                       float* __restrict__ db_part,  // [gridDim.y, N] or null
                       int M, int N, bool cast_before) {
  __shared__ float sw[kColLanes][33], sb[kColLanes][33];
  const int c = blockIdx.x * 32 + threadIdx.x;
  const int64_t r0 = static_cast<int64_t>(M) * blockIdx.y / gridDim.y;
  const int64_t r1 = static_cast<int64_t>(M) * (blockIdx.y + 1) / gridDim.y;
  float aw = 0.f, ab = 0.f;
  if (c < N) {
#pragma unroll 4
    for (int64_t r = r0 + threadIdx.y; r < r1; r += kColLanes) {
      const float d = f32(dy[r * N + c]);
      float xh = (f32(s[r * N + c]) - (mean ? mean[r] : 0.f)) * rstd[r];
      if (cast_before) xh = round_to<T>(xh);
      aw += d * xh;
      ab += d;
    }
  }
  sw[threadIdx.y][threadIdx.x] = aw;
  sb[threadIdx.y][threadIdx.x] = ab;
  __syncthreads();
  if (threadIdx.y == 0 && c < N) {
    float tw = 0.f, tb = 0.f;
#pragma unroll
    for (int i = 0; i < kColLanes; ++i) {
      tw += sw[i][threadIdx.x];
      tb += sb[i][threadIdx.x];
    }
    const int64_t o = static_cast<int64_t>(blockIdx.y) * N + c;
    if (dw_part) dw_part[o] = tw;
    if (db_part) db_part[o] = tb;
  }
}

// out[c] = sum over g of part[g, c], in a fixed order, rounded once to W
template <typename W>
__global__ void __launch_bounds__(32 * kColLanes)
    colsum_kernel(const float* __restrict__ part,  // [G, N]
                  W* __restrict__ out,  // [N]
                  int G, int N) {
  __shared__ float sm[kColLanes][33];
  const int c = blockIdx.x * 32 + threadIdx.x;
  float a = 0.f;
  if (c < N)
    for (int g = threadIdx.y; g < G; g += kColLanes) a += part[static_cast<int64_t>(g) * N + c];
  sm[threadIdx.y][threadIdx.x] = a;
  __syncthreads();
  if (threadIdx.y == 0 && c < N) {
    float t = 0.f;
#pragma unroll
    for (int i = 0; i < kColLanes; ++i) t += sm[i][threadIdx.x];
    out[c] = static_cast<W>(t);
  }
}

// ------------------------------------------------------------------------------------
// Host side
// ------------------------------------------------------------------------------------

inline int sm_count() {
  int dev = 0, n = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev));
  return n;
}

inline const at::Tensor* present(const std::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? &*t : nullptr;
}

// The arguments were checked by mptkernels/ops/layer_norm.py; what is left is this kernel's
// own limit, the int row index (the columns are capped there by MAX_COLS)
void check_int_rows(const at::Tensor& t, const char* op) {
  TORCH_CHECK(t.size(0) < INT_MAX, op, ": ", t.size(0), " rows exceed the CUDA kernel's int row index");
}

template <typename T, typename W, int VEC>
void launch_fwd(const T* x, const T* res, const W* w, const W* b, T* y, T* s_out, float* mean, float* rstd, int M,
                int N, float eps, float w_off, bool rms, bool cast_before, cudaStream_t stream) {
  // 4 or 16 cached vectors per thread (common/cuda_launch.cuh); scalar-path rows past 4096
  // are re-read rather than cached by 16 (not worth another instantiation)
  const RowBlock rb = row_block(N / VEC, /*allow_nv16=*/VEC != 1);
  const dim3 block(rb.tpr, rb.rpb), grid(ceil_div(M, rb.rpb));
  auto kernel = rb.nv == 4    ? ln_fwd_kernel<T, W, VEC, 4>
                : rb.nv == 16 ? ln_fwd_kernel<T, W, VEC, VEC == 1 ? 0 : 16>
                              : ln_fwd_kernel<T, W, VEC, 0>;
  kernel<<<grid, block, 0, stream>>>(x, res, w, b, y, s_out, mean, rstd, M, N, 1.f / N, eps, w_off, rms,
                                     cast_before);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> layer_norm_fwd_cuda(
    const at::Tensor& x, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& residual, double eps, bool rms_norm, double weight_offset,
    bool cast_before_weight) {
  constexpr const char* op = "layer_norm_fwd (CUDA)";
  check_int_rows(x, op);
  const at::Tensor* w = present(weight);
  const at::Tensor* b = present(bias);
  const at::Tensor* res = present(residual);
  const int64_t M = x.size(0), N = x.size(1);

  c10::cuda::CUDAGuard guard(x.device());
  const auto stats_opts = x.options().dtype(at::kFloat);
  at::Tensor y = at::empty({M, N}, x.options());
  at::Tensor s_out = res ? at::empty({M, N}, x.options()) : at::empty({0}, x.options());
  at::Tensor mean = at::empty({rms_norm ? 0 : M}, stats_opts);
  at::Tensor rstd = at::empty({M}, stats_opts);
  if (M == 0) return {y, s_out, mean, rstd};

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::ScalarType wt = mptk::norm_param_dtype(x, weight, bias);
  dispatch_dtype_and_param(kFloatHalfBf16, x.scalar_type(), wt, op, [&](auto t_tag, auto w_tag) {
    using T = decltype(t_tag);
    using W = decltype(w_tag);
    constexpr int VEC = 16 / sizeof(T);
    const T* xp = x.const_data_ptr<T>();
    const T* rp = res ? res->const_data_ptr<T>() : nullptr;
    const W* wp = w ? w->const_data_ptr<W>() : nullptr;
    const W* bp = b ? b->const_data_ptr<W>() : nullptr;
    T* yp = y.mutable_data_ptr<T>();
    T* sp = res ? s_out.mutable_data_ptr<T>() : nullptr;
    float* mp = rms_norm ? nullptr : mean.mutable_data_ptr<float>();
    float* rsp = rstd.mutable_data_ptr<float>();
    const bool vec = N % VEC == 0 && aligned16(xp) && (!rp || aligned16(rp)) && (!wp || aligned16(wp)) &&
                     (!bp || aligned16(bp)) && aligned16(yp) && (!sp || aligned16(sp));
    auto run = [&](auto v) {
      launch_fwd<T, W, decltype(v)::value>(xp, rp, wp, bp, yp, sp, mp, rsp, static_cast<int>(M), static_cast<int>(N),
                                           static_cast<float>(eps), static_cast<float>(weight_offset), rms_norm,
                                           cast_before_weight, stream);
    };
    if (vec) run(std::integral_constant<int, VEC>{});
    else run(std::integral_constant<int, 1>{});
  });
  return {y, s_out, mean, rstd};
}

template <typename W>
void launch_colsum(const at::Tensor& part, at::Tensor& out, cudaStream_t stream) {
  const int G = static_cast<int>(part.size(0)), N = static_cast<int>(part.size(1));
  colsum_kernel<W><<<ceil_div(N, 32), dim3(32, kColLanes), 0, stream>>>(part.const_data_ptr<float>(),
                                                                         out.mutable_data_ptr<W>(), G, N);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, typename W, int VEC>
void launch_bwd(const T* dy, const T* dres, const T* s, const W* w, const float* mean, const float* rstd, T* dx,
                at::Tensor* dweight, at::Tensor* dbias, const at::TensorOptions& part_opts, int M, int N,
                float w_off, bool rms, bool cast_before, cudaStream_t stream) {
  // 8 columns per thread (4 on the scalar path, whose per-element addressing costs more
  // registers): with the dy/s caches and the three per-column arrays this stays inside the
  // 64 registers that 1024-thread blocks allow
  constexpr int kVecs = VEC == 1 ? 4 : 8 / VEC;
  const int nvec = N / VEC;
  const int tpr_fused = round_up32(ceil_div(nvec, kVecs));
  if (tpr_fused <= 1024) {
    auto kernel = ln_bwd_kernel<T, W, VEC, kVecs>;
    int per_sm = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, tpr_fused, 0));
    const int G = static_cast<int>(std::min<int64_t>(M, static_cast<int64_t>(std::max(per_sm, 1)) * sm_count()));
    at::Tensor dw_part = dweight ? at::empty({G, N}, part_opts) : at::Tensor();
    at::Tensor db_part = dbias ? at::empty({G, N}, part_opts) : at::Tensor();
    kernel<<<G, tpr_fused, 0, stream>>>(dy, dres, s, w, mean, rstd, dx,
                                        dweight ? dw_part.mutable_data_ptr<float>() : nullptr,
                                        dbias ? db_part.mutable_data_ptr<float>() : nullptr, M, N, 1.f / N, w_off, rms,
                                        cast_before);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (dweight) launch_colsum<W>(dw_part, *dweight, stream);
    if (dbias) launch_colsum<W>(db_part, *dbias, stream);
    return;
  }
  // long rows: dx a row per block, then dweight/dbias from a column pass over dy and s
  ln_bwd_kernel<T, W, VEC, 0><<<M, std::min(1024, round_up32(nvec)), 0, stream>>>(
      dy, dres, s, w, mean, rstd, dx, nullptr, nullptr, M, N, 1.f / N, w_off, rms, cast_before);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (!dweight && !dbias) return;
  const int col_blocks = ceil_div(N, 32);
  // about 8 blocks per SM in all, each with at least 64 rows to sum
  const int Gr = std::max(1, std::min(ceil_div(M, 64), ceil_div(8 * sm_count(), col_blocks)));
  at::Tensor dw_part = dweight ? at::empty({Gr, N}, part_opts) : at::Tensor();
  at::Tensor db_part = dbias ? at::empty({Gr, N}, part_opts) : at::Tensor();
  ln_bwd_cols_kernel<T><<<dim3(col_blocks, Gr), dim3(32, kColLanes), 0, stream>>>(
      dy, s, mean, rstd, dweight ? dw_part.mutable_data_ptr<float>() : nullptr,
      dbias ? db_part.mutable_data_ptr<float>() : nullptr, M, N, cast_before);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (dweight) launch_colsum<W>(dw_part, *dweight, stream);
  if (dbias) launch_colsum<W>(db_part, *dbias, stream);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_bwd_cuda(
    const at::Tensor& dy, const std::optional<at::Tensor>& dresidual_out, const at::Tensor& s,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, const at::Tensor& mean,
    const at::Tensor& rstd, bool rms_norm, double weight_offset, bool cast_before_weight) {
  constexpr const char* op = "layer_norm_bwd (CUDA)";
  check_int_rows(s, op);
  const at::Tensor* dres = present(dresidual_out);
  const at::Tensor* w = present(weight);
  const at::Tensor* b = present(bias);
  const int64_t M = s.size(0), N = s.size(1);

  c10::cuda::CUDAGuard guard(s.device());
  at::Tensor dx = at::empty({M, N}, s.options());
  if (M == 0) {
    return {dx, w ? at::zeros({N}, w->options()) : at::empty({0}, s.options()),
            b ? at::zeros({N}, b->options()) : at::empty({0}, s.options())};
  }
  at::Tensor dweight = w ? at::empty({N}, w->options()) : at::empty({0}, s.options());
  at::Tensor dbias = b ? at::empty({N}, b->options()) : at::empty({0}, s.options());

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::ScalarType wt = mptk::norm_param_dtype(s, weight, bias);
  dispatch_dtype_and_param(kFloatHalfBf16, s.scalar_type(), wt, op, [&](auto t_tag, auto w_tag) {
    using T = decltype(t_tag);
    using W = decltype(w_tag);
    constexpr int VEC = 16 / sizeof(T);
    const T* dyp = dy.const_data_ptr<T>();
    const T* drp = dres ? dres->const_data_ptr<T>() : nullptr;
    const T* sp = s.const_data_ptr<T>();
    const W* wp = w ? w->const_data_ptr<W>() : nullptr;
    const float* mp = rms_norm ? nullptr : mean.const_data_ptr<float>();
    const float* rsp = rstd.const_data_ptr<float>();
    T* dxp = dx.mutable_data_ptr<T>();
    const bool vec = N % VEC == 0 && aligned16(dyp) && (!drp || aligned16(drp)) && aligned16(sp) &&
                     (!wp || aligned16(wp)) && aligned16(dxp);
    auto run = [&](auto v) {
      launch_bwd<T, W, decltype(v)::value>(dyp, drp, sp, wp, mp, rsp, dxp, w ? &dweight : nullptr,
                                           b ? &dbias : nullptr, s.options().dtype(at::kFloat), static_cast<int>(M),
                                           static_cast<int>(N), static_cast<float>(weight_offset), rms_norm,
                                           cast_before_weight, stream);
    };
    if (vec) run(std::integral_constant<int, VEC>{});
    else run(std::integral_constant<int, 1>{});
  });
  return {dx, dweight, dbias};
}

}  // namespace
}  // namespace mptk::cuda

TORCH_LIBRARY_IMPL(mptkernels_cuda, CUDA, m) {
  m.impl("layer_norm_fwd", &mptk::cuda::layer_norm_fwd_cuda);
  m.impl("layer_norm_bwd", &mptk::cuda::layer_norm_bwd_cuda);
}

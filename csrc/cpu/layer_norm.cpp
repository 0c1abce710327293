// LayerNorm / RMSNorm (+ fused residual add) forward and backward on the CPU.
// Rows are independent: parallel over rows (at::parallel_for), vectorised along the row
// (at::vec, two accumulator registers per chunk). A row is walked three times (sum,
// centred variance, output) but after the first walk it sits in L1/L2, so memory traffic
// is one read of x (+ residual) and one write of y (+ residual_out): the fusion's point.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>

#include <cmath>
#include <optional>
#include <tuple>
#include <vector>

#include "common/cpu_vec.h"
#include "common/dispatch.h"
#include "cpu/kernels.h"

namespace mptk::cpu::CPU_CAPABILITY {
namespace {

template <typename A>
inline A hsum(const Vectorized<A>& v) {
  alignas(64) A buf[Vectorized<A>::size()];
  v.store(buf);
  A s = 0;
  for (int i = 0; i < Vectorized<A>::size(); ++i) s += buf[i];
  return s;
}

template <typename T, typename W>
struct NormKernel {
  using A = acc_type_t<T>;
  using V = Vectorized<A>;
  using IO = ChunkIO<T, A>;
  using WIO = ChunkIO<W, A>;
  static constexpr int64_t K = IO::kChunk;

  // One row forward: writes y, s_out (if residual), mean, rstd. sbuf [N] is scratch that
  // holds the row's s in A after walk 1, so walks 2 and 3 neither re-read memory nor
  // convert dtypes again.
  static void fwd_row(const T* __restrict__ x,    // [N]
                      const T* __restrict__ res,  // [N] or nullptr
                      const A* __restrict__ w,    // [N] weight + offset in A, or nullptr
                      const A* __restrict__ b,    // [N] bias in A, or nullptr
                      T* __restrict__ y,          // [N]
                      T* __restrict__ s_out,      // [N] or nullptr (when res is)
                      A* __restrict__ sbuf,       // [N] scratch
                      const T* next_x,            // [N] the next row's x (and res), or nullptr:
                      const T* next_res,          //     prefetched while this row is normalised
                      A* mean_out, A* rstd_out, int64_t N, A eps, bool rms, bool cast_before, bool stream) {
    // walk 1: s = x + res rounded to T (stored, and normalised, as the unfused code would)
    V acc0(0), acc1(0);
    A tail = 0;
    int64_t j = 0;
    for (; j + K <= N; j += K) {
      V a, c;
      IO::load(x + j, a, c);
      if (res) {
        V ra, rc;
        IO::load(res + j, ra, rc);
        a = a + ra;
        c = c + rc;
        IO::store_rounded(s_out + j, a, c, stream);
      }
      a.store(sbuf + j);
      c.store(sbuf + j + V::size());
      if (rms) {
        acc0 = at::vec::fmadd(a, a, acc0);
        acc1 = at::vec::fmadd(c, c, acc1);
      } else {
        acc0 = acc0 + a;
        acc1 = acc1 + c;
      }
    }
    for (; j < N; ++j) {
      A v = static_cast<A>(x[j]);
      if (res) {
        v = round_to<T>(v + static_cast<A>(res[j]));
        s_out[j] = static_cast<T>(v);
      }
      sbuf[j] = v;
      tail += rms ? v * v : v;
    }
    const A total = hsum(acc0 + acc1) + tail;
    A mu = 0, rstd;
    if (rms) {
      rstd = A(1) / std::sqrt(total / N + eps);
    } else {
      // walk 2: centred variance (two-pass: no cancellation for rows with a large mean)
      mu = total / N;
      const V vmu(mu);
      V v0(0), v1(0);
      A vt = 0;
      for (j = 0; j + K <= N; j += K) {
        const V a = V::loadu(sbuf + j) - vmu;
        const V c = V::loadu(sbuf + j + V::size()) - vmu;
        v0 = at::vec::fmadd(a, a, v0);
        v1 = at::vec::fmadd(c, c, v1);
      }
      for (; j < N; ++j) {
        const A d = sbuf[j] - mu;
        vt += d * d;
      }
      rstd = A(1) / std::sqrt((hsum(v0 + v1) + vt) / N + eps);
      *mean_out = mu;
    }
    *rstd_out = rstd;
    // walk 3: y = xhat * (w + off) + b. Walks 2-3 work from sbuf in cache, so memory would
    // idle; prefetching the next row here overlaps its reads with this row's arithmetic.
    const V vmu(mu), vrstd(rstd);
    for (j = 0; j + K <= N; j += K) {
      if (next_x) {
        for (size_t line = 0; line < K * sizeof(T); line += 64) {  // every cache line of the chunk
          __builtin_prefetch(reinterpret_cast<const char*>(next_x + j) + line);
          if (next_res) __builtin_prefetch(reinterpret_cast<const char*>(next_res + j) + line);
        }
      }
      V a = (V::loadu(sbuf + j) - vmu) * vrstd;
      V c = (V::loadu(sbuf + j + V::size()) - vmu) * vrstd;
      if (cast_before) IO::round(a, c);
      if (w) {
        a = a * V::loadu(w + j);
        c = c * V::loadu(w + j + V::size());
      }
      if (b) {
        a = a + V::loadu(b + j);
        c = c + V::loadu(b + j + V::size());
      }
      IO::store(y + j, a, c, stream);
    }
    for (; j < N; ++j) {
      A v = (sbuf[j] - mu) * rstd;
      if (cast_before) v = round_to<T>(v);
      if (w) v *= w[j];
      if (b) v += b[j];
      y[j] = static_cast<T>(v);
    }
  }

  // One row backward; adds this row's dweight/dbias terms into dw_acc/db_acc. xbuf/gbuf
  // [N] are scratch holding xhat and g = dy * (w + off) between the two walks.
  static void bwd_row(const T* __restrict__ dy,    // [N]
                      const T* __restrict__ dres,  // [N] or nullptr
                      const T* __restrict__ s,     // [N]
                      const W* __restrict__ w,     // [N] or nullptr
                      T* __restrict__ dx,          // [N]
                      A* __restrict__ dw_acc,      // [N] or nullptr
                      A* __restrict__ db_acc,      // [N] or nullptr
                      A* __restrict__ xbuf,        // [N] scratch
                      A* __restrict__ gbuf,        // [N] scratch
                      const T* next_dy,            // [N] the next row's dy and s, or nullptr:
                      const T* next_s,             //     prefetched during walk 2
                      A mu, A rstd, int64_t N, bool rms, A off, bool cast_before, bool stream) {
    const V vmu(mu), vrstd(rstd), voff(off);
    // walk 1: the two row means the gradient needs, and the weight/bias partial sums
    V sg0(0), sg1(0), sgx0(0), sgx1(0);
    A sg_t = 0, sgx_t = 0;
    int64_t j = 0;
    for (; j + K <= N; j += K) {
      V a, c, ga, gc;
      IO::load(s + j, a, c);
      IO::load(dy + j, ga, gc);
      a = (a - vmu) * vrstd;
      c = (c - vmu) * vrstd;
      if (dw_acc) {
        V xa = a, xc = c;
        if (cast_before) IO::round(xa, xc);
        at::vec::fmadd(ga, xa, V::loadu(dw_acc + j)).store(dw_acc + j);
        at::vec::fmadd(gc, xc, V::loadu(dw_acc + j + V::size())).store(dw_acc + j + V::size());
      }
      if (db_acc) {
        (ga + V::loadu(db_acc + j)).store(db_acc + j);
        (gc + V::loadu(db_acc + j + V::size())).store(db_acc + j + V::size());
      }
      if (w) {
        V wa, wc;
        WIO::load(w + j, wa, wc);
        ga = ga * (wa + voff);
        gc = gc * (wc + voff);
      }
      a.store(xbuf + j);
      c.store(xbuf + j + V::size());
      ga.store(gbuf + j);
      gc.store(gbuf + j + V::size());
      sg0 = sg0 + ga;
      sg1 = sg1 + gc;
      sgx0 = at::vec::fmadd(ga, a, sgx0);
      sgx1 = at::vec::fmadd(gc, c, sgx1);
    }
    for (; j < N; ++j) {
      const A xh = (static_cast<A>(s[j]) - mu) * rstd;
      A g = static_cast<A>(dy[j]);
      if (dw_acc) dw_acc[j] += g * (cast_before ? round_to<T>(xh) : xh);
      if (db_acc) db_acc[j] += g;
      if (w) g *= static_cast<A>(w[j]) + off;
      xbuf[j] = xh;
      gbuf[j] = g;
      sg_t += g;
      sgx_t += g * xh;
    }
    const A c_gx = (hsum(sgx0 + sgx1) + sgx_t) / N;
    const A c_g = rms ? A(0) : (hsum(sg0 + sg1) + sg_t) / N;
    const V vc_gx(c_gx), vc_g(c_g);
    // walk 2: dx = rstd * (g - mean(g) - xhat * mean(g * xhat)) (+ dresidual_out)
    for (j = 0; j + K <= N; j += K) {
      if (next_dy) {
        for (size_t line = 0; line < K * sizeof(T); line += 64) {
          __builtin_prefetch(reinterpret_cast<const char*>(next_dy + j) + line);
          __builtin_prefetch(reinterpret_cast<const char*>(next_s + j) + line);
        }
      }
      V da = (V::loadu(gbuf + j) - vc_g - V::loadu(xbuf + j) * vc_gx) * vrstd;
      V dc = (V::loadu(gbuf + j + V::size()) - vc_g - V::loadu(xbuf + j + V::size()) * vc_gx) * vrstd;
      if (dres) {
        V ra, rc;
        IO::load(dres + j, ra, rc);
        da = da + ra;
        dc = dc + rc;
      }
      IO::store(dx + j, da, dc, stream);
    }
    for (; j < N; ++j) {
      A d = (gbuf[j] - c_g - xbuf[j] * c_gx) * rstd;
      if (dres) d += static_cast<A>(dres[j]);
      dx[j] = static_cast<T>(d);
    }
  }
};

// rows per parallel task: enough elements that a task outweighs its scheduling cost
inline int64_t row_grain(int64_t N) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(N, 1)); }

template <typename T, typename W>
void fwd_impl(const at::Tensor& x, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
              const std::optional<at::Tensor>& residual, at::Tensor& y, at::Tensor& s_out, at::Tensor& mean,
              at::Tensor& rstd, double eps, bool rms, double off, bool cast_before) {
  using Kern = NormKernel<T, W>;
  using A = typename Kern::A;
  const int64_t M = x.size(0), N = x.size(1);
  const T* xp = x.const_data_ptr<T>();
  const T* rp = residual ? residual->const_data_ptr<T>() : nullptr;
  const W* wp = weight ? weight->const_data_ptr<W>() : nullptr;
  const W* bp = bias ? bias->const_data_ptr<W>() : nullptr;
  T* yp = y.mutable_data_ptr<T>();
  T* sp = residual ? s_out.mutable_data_ptr<T>() : nullptr;
  A* mp = rms ? nullptr : mean.mutable_data_ptr<A>();
  A* rsp = rstd.mutable_data_ptr<A>();
  const bool stream = x.numel() * static_cast<int64_t>(sizeof(T)) >= kStreamBytes;
  at::parallel_for(0, M, row_grain(N), [&](int64_t begin, int64_t end) {
    // weight (+ offset) and bias converted once per task, not once per row
    std::vector<A> sbuf(N), wbuf(wp ? N : 0), bbuf(bp ? N : 0);
    for (int64_t j = 0; j < static_cast<int64_t>(wbuf.size()); ++j) wbuf[j] = static_cast<A>(wp[j]) + static_cast<A>(off);
    for (int64_t j = 0; j < static_cast<int64_t>(bbuf.size()); ++j) bbuf[j] = static_cast<A>(bp[j]);
    for (int64_t i = begin; i < end; ++i) {
      const bool more = i + 1 < end;
      Kern::fwd_row(xp + i * N, rp ? rp + i * N : nullptr, wp ? wbuf.data() : nullptr, bp ? bbuf.data() : nullptr,
                    yp + i * N, sp ? sp + i * N : nullptr, sbuf.data(), more ? xp + (i + 1) * N : nullptr,
                    more && rp ? rp + (i + 1) * N : nullptr, mp ? mp + i : nullptr, rsp + i, N,
                    static_cast<A>(eps), rms, cast_before, stream);
    }
    stream_fence();
  });
}

template <typename T, typename W>
void bwd_impl(const at::Tensor& dy, const std::optional<at::Tensor>& dres, const at::Tensor& s,
              const std::optional<at::Tensor>& weight, const at::Tensor& mean, const at::Tensor& rstd, at::Tensor& dx,
              at::Tensor& dweight, at::Tensor& dbias, bool has_bias, bool rms, double off, bool cast_before) {
  using Kern = NormKernel<T, W>;
  using A = typename Kern::A;
  const int64_t M = s.size(0), N = s.size(1);
  const bool need_dw = weight.has_value(), need_db = has_bias;
  // Fixed row blocks, each with its own dweight/dbias partial row, summed in block order:
  // the result does not depend on which thread ran which block (bitwise reproducible).
  const int64_t n_blocks = std::max<int64_t>(1, std::min<int64_t>(M, at::get_num_threads()));
  const int64_t rows_per_block = (M + n_blocks - 1) / std::max<int64_t>(n_blocks, 1);
  auto acc_opts = s.options().dtype(c10::CppTypeToScalarType<A>::value);
  at::Tensor dw_part = need_dw ? at::zeros({n_blocks, N}, acc_opts) : at::Tensor();
  at::Tensor db_part = need_db ? at::zeros({n_blocks, N}, acc_opts) : at::Tensor();
  const T* dyp = dy.const_data_ptr<T>();
  const T* drp = dres ? dres->const_data_ptr<T>() : nullptr;
  const T* sp = s.const_data_ptr<T>();
  const W* wp = weight ? weight->const_data_ptr<W>() : nullptr;
  const A* mp = rms ? nullptr : mean.const_data_ptr<A>();
  const A* rsp = rstd.const_data_ptr<A>();
  T* dxp = dx.mutable_data_ptr<T>();
  A* dwp = need_dw ? dw_part.mutable_data_ptr<A>() : nullptr;
  A* dbp = need_db ? db_part.mutable_data_ptr<A>() : nullptr;
  const bool stream = s.numel() * static_cast<int64_t>(sizeof(T)) >= kStreamBytes;
  at::parallel_for(0, n_blocks, 1, [&](int64_t b0, int64_t b1) {
    std::vector<A> xbuf(N), gbuf(N);
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t r1 = std::min(M, (blk + 1) * rows_per_block);
      for (int64_t i = blk * rows_per_block; i < r1; ++i) {
        const bool more = i + 1 < r1;
        Kern::bwd_row(dyp + i * N, drp ? drp + i * N : nullptr, sp + i * N, wp, dxp + i * N,
                      dwp ? dwp + blk * N : nullptr, dbp ? dbp + blk * N : nullptr, xbuf.data(), gbuf.data(),
                      more ? dyp + (i + 1) * N : nullptr, more ? sp + (i + 1) * N : nullptr, mp ? mp[i] : A(0),
                      rsp[i], N, rms, static_cast<A>(off), cast_before, stream);
      }
    }
    stream_fence();
  });
  if (need_dw) dweight.copy_(dw_part.sum(0));
  if (need_db) dbias.copy_(db_part.sum(0));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> layer_norm_fwd_cpu(
    const at::Tensor& x, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& residual, double eps, bool rms_norm, double weight_offset,
    bool cast_before_weight) {
  const int64_t M = x.size(0);
  auto stats_opts = x.options().dtype(x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat);
  at::Tensor y = at::empty_like(x);
  at::Tensor s_out = residual ? at::empty_like(x) : at::empty({0}, x.options());
  at::Tensor mean = at::empty({rms_norm ? 0 : M}, stats_opts);
  at::Tensor rstd = at::empty({M}, stats_opts);
  const at::ScalarType wt = norm_param_dtype(x, weight, bias);
  dispatch_dtype_and_param(kFloatDoubleHalfBf16, x.scalar_type(), wt, "layer_norm_fwd", [&](auto t_tag, auto w_tag) {
    using T = decltype(t_tag);
    using W = decltype(w_tag);
    fwd_impl<T, W>(x, weight, bias, residual, y, s_out, mean, rstd, eps, rms_norm, weight_offset, cast_before_weight);
  });
  return {y, s_out, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_bwd_cpu(
    const at::Tensor& dy, const std::optional<at::Tensor>& dresidual_out, const at::Tensor& s,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, const at::Tensor& mean,
    const at::Tensor& rstd, bool rms_norm, double weight_offset, bool cast_before_weight) {
  at::Tensor dx = at::empty_like(s);
  at::Tensor dweight = weight ? at::empty_like(*weight) : at::empty({0}, s.options());
  at::Tensor dbias = bias ? at::empty_like(*bias) : at::empty({0}, s.options());
  const at::ScalarType wt = norm_param_dtype(s, weight, bias);
  dispatch_dtype_and_param(kFloatDoubleHalfBf16, s.scalar_type(), wt, "layer_norm_bwd", [&](auto t_tag, auto w_tag) {
    using T = decltype(t_tag);
    using W = decltype(w_tag);
    bwd_impl<T, W>(dy, dresidual_out, s, weight, mean, rstd, dx, dweight, dbias, bias.has_value(), rms_norm,
                   weight_offset, cast_before_weight);
  });
  return {dx, dweight, dbias};
}

}  // namespace

// this level's entries of the kernel table (cpu/kernels.h)
void add_layer_norm(Kernels& k) {
  k.layer_norm_fwd = &layer_norm_fwd_cpu;
  k.layer_norm_bwd = &layer_norm_bwd_cpu;
}

}  // namespace mptk::cpu::CPU_CAPABILITY

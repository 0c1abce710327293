// linear_cross_entropy on the CPU: the loss of cross_entropy(x @ weight^T + bias) computed in
// chunks of rows, so the (N, V) logits never exist (Liger-Kernel's fused linear cross entropy).
// Per chunk of `chunk_rows` rows:
//   logits_c = x_c @ W^T                             into one chunk buffer (the bias is added
//                                                    by the row pass as it reads the row)
//   row pass (parallel over rows, at::vec):          walk 1 reads the row once for max + sum-exp
//                                                    (block by block: the block's max, then its
//                                                    exp-sum from an L1 copy); walk 2 overwrites
//                                                    the row in place with dlogits (the buffer
//                                                    becomes dlogits)
//   dx_c = dlogits_c @ W, dW += dlogits_c^T @ x_c, dbias += colsum(dlogits_c)
// So memory beyond the inputs, the loss and the gradients is the chunk buffer (chunk_rows x V in
// x's dtype) and the (N,) row losses. GEMMs run in x's dtype with fp32 accumulation: fp32
// logits and dx on our AVX-512 panel GEMM (cpu/gemm/panel_gemm.h; MKL's sgemm, which ATen
// calls, runs its AVX2 code on AMD CPUs at half its rate), dW (accumulated over the chunks:
// beta = 1) and the other dtypes on ATen's (MKL; oneDNN's native bf16); the softmax, loss and
// dlogits maths in float32 (float64 for float64).
// The chunk size is the caller's (mptkernels/ops/cross_entropy.py, chunk_rows()).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>

#include <array>
#include <cstdarg>
#include <cstdio>
#include <atomic>
#include <cmath>
#include <limits>
#include <optional>
#include <string_view>
#include <tuple>

#include "common/cpu_vec.h"
#include "common/dispatch.h"
#include "cpu/gemm/panel_gemm.h"
#include "cpu/kernels.h"

namespace mptk::cpu::CPU_CAPABILITY {
namespace {

enum class Reduction { kNone, kMean, kSum };

// An error, formatted with snprintf: TORCH_CHECK's message templates (c10::str of the argument
// types) would be instantiated in this level's object, shared (weak) code the linker may take
// from an AVX level (tests/test_cpu_isa.py checks that no shared function has AVX code)
[[noreturn]] __attribute__((format(printf, 1, 2))) void fail(const char* fmt, ...) {
  char msg[512];
  va_list args;
  va_start(args, fmt);
  std::vsnprintf(msg, sizeof msg, fmt, args);
  va_end(args);
  c10::detail::torchCheckFail(__func__, __FILE__, static_cast<uint32_t>(__LINE__), static_cast<const char*>(msg));
}

Reduction parse_reduction(std::string_view r) {
  if (r == "mean") return Reduction::kMean;
  if (r == "sum") return Reduction::kSum;
  if (r != "none")
    fail("linear_cross_entropy: reduction must be 'mean', 'sum' or 'none', got '%.*s'", static_cast<int>(r.size()),
         r.data());
  return Reduction::kNone;
}

template <typename A>
MPTK_ALWAYS_INLINE A hreduce(const Vectorized<A>& v, bool max) {
  alignas(64) A buf[Vectorized<A>::size()];
  v.store(buf);
  A s = buf[0];
  for (int i = 1; i < Vectorized<A>::size(); ++i) s = max ? std::max(s, buf[i]) : s + buf[i];
  return s;
}

struct Options {
  int64_t ignore_index;
  double label_smoothing;  // eps: target weight 1 - eps, every class eps / V
  double softcap;          // c > 0: s = c * tanh(z / c); 0: s = z
  double z_loss;           // + z_loss * lse^2 per row
};

// The row pass over one chunk. T: the buffer's dtype (x's); A: the maths' (float or double).
template <typename T>
struct RowPass {
  using A = acc_type_t<T>;
  using V = Vectorized<A>;
  using IO = ChunkIO<T, A>;
  static constexpr int64_t K = IO::kChunk;
  // walk 1 works on blocks of this many logits: the block's max, then its exp-sum from L1
  static constexpr int64_t kBlock = 1024;

  // The softcap from u = z / c: s = c tanh(u) and ds/dz = 1 - tanh(u)^2, both from
  // em = expm1(-2|u|) (tanh|u| = -em / (2 + em), 1 - tanh^2 = 4 (1 + em) / (2 + em)^2): exact
  // where tanh saturates, where 1 - s^2 / c^2 from a rounded s would lose every bit.
  static MPTK_ALWAYS_INLINE void cap(const V& z, const V& c, const V& inv_c, V& s, V& ds) {
    const V u = z * inv_c, em = (u.abs() * V(A(-2))).expm1(), den = V(A(2)) + em;
    s = (c * (V(A(0)) - em) / den).copysign(u);
    ds = V(A(4)) * (V(A(1)) + em) / (den * den);
  }
  static MPTK_ALWAYS_INLINE void cap(A z, A c, A inv_c, A& s, A& ds) {
    const A u = z * inv_c, em = std::expm1(A(-2) * std::abs(u)), den = A(2) + em;
    s = std::copysign(c * -em / den, u);
    ds = A(4) * (A(1) + em) / (den * den);
  }

  // One row: logits z (V,) in place -> dlogits when `grad` (scaled by `scale`; the maths as
  // documented in registration.cpp). Returns the row's loss. Walk 1 reads z once, walk 2
  // reads it again and writes dlogits over it.
  MPTK_FLATTEN static A row(T* __restrict__ z,        // [Vn] x_i @ W^T, then dlogits
                            const T* __restrict__ bias,  // [Vn] added to z, or nullptr
                            int64_t Vn, int64_t t, const Options& o, bool grad, A scale) {
    const bool has_cap = o.softcap > 0;
    const A c = static_cast<A>(o.softcap), inv_c = has_cap ? A(1) / c : A(0);
    const V vc(c), vinv_c(inv_c);
    A M = -std::numeric_limits<A>::infinity(), S = 0, sum_s = 0;
    for (int64_t b0 = 0; b0 < Vn; b0 += kBlock) {
      const int64_t b1 = std::min(Vn, b0 + kBlock);
      // the block's max and sum (s kept in an L1 scratch when capped: the exp walk re-reads it)
      alignas(64) A sbuf[kBlock];
      V vmax(-std::numeric_limits<A>::infinity()), vsum(0);
      A smax = -std::numeric_limits<A>::infinity(), ssum = 0;
      int64_t j = b0;
      for (; j + K <= b1; j += K) {
        V lo, hi;
        IO::load(z + j, lo, hi);
        if (bias) {
          V blo, bhi;
          IO::load(bias + j, blo, bhi);
          lo = lo + blo;
          hi = hi + bhi;
        }
        if (has_cap) {
          V d;
          cap(lo, vc, vinv_c, lo, d);
          cap(hi, vc, vinv_c, hi, d);
        }
        lo.store(sbuf + (j - b0));
        hi.store(sbuf + (j - b0) + V::size());
        vmax = at::vec::maximum(vmax, at::vec::maximum(lo, hi));
        vsum = vsum + lo + hi;
      }
      for (; j < b1; ++j) {
        A v = static_cast<A>(z[j]) + (bias ? static_cast<A>(bias[j]) : A(0)), d;
        if (has_cap) cap(v, c, inv_c, v, d);
        sbuf[j - b0] = v;
        smax = std::max(smax, v);
        ssum += v;
      }
      const A m = std::max(smax, hreduce(vmax, true));
      sum_s += ssum + hreduce(vsum, false);
      V ve(0);
      A se = 0;
      const int64_t n = b1 - b0;
      int64_t k = 0;
      for (; k + V::size() <= n; k += V::size()) ve = ve + (V::loadu(sbuf + k) - V(m)).exp();
      for (; k < n; ++k) se += std::exp(sbuf[k] - m);
      se += hreduce(ve, false);
      if (m > M) {
        S = S * std::exp(M - m) + se;
        M = m;
      } else {
        S += se * std::exp(m - M);
      }
    }
    const A lse = M + std::log(S);
    const A eps = static_cast<A>(o.label_smoothing), zl = static_cast<A>(o.z_loss);
    A s_t = static_cast<A>(z[t]) + (bias ? static_cast<A>(bias[t]) : A(0)), ds_t = 1;
    if (has_cap) cap(s_t, c, inv_c, s_t, ds_t);
    // as differences from lse (each exact where it should be 0, e.g. V = 1)
    const A loss = (A(1) - eps) * (lse - s_t) + eps * (lse - sum_s / static_cast<A>(Vn)) + zl * lse * lse;
    if (grad) {
      // ds_j = p_j - eps / V - (1 - eps) [j = t] + 2 z_loss lse p_j (the z-loss term last: with
      // p_t near 1, p_t - 1 first keeps its few bits exact); dz_j = ds_j * ds/dz
      const A pk = A(2) * zl * lse, off = eps / static_cast<A>(Vn);
      const A p_t = std::exp(s_t - lse);
      const A d_t = ((p_t - off - (A(1) - eps)) + p_t * pk) * ds_t * scale;
      const V vlse(lse), vpk(pk), vnoff(-off), vscale(scale);
      int64_t j = 0;
      for (; j + K <= Vn; j += K) {
        V lo, hi, dlo(A(1)), dhi(A(1));
        IO::load(z + j, lo, hi);
        if (bias) {
          V blo, bhi;
          IO::load(bias + j, blo, bhi);
          lo = lo + blo;
          hi = hi + bhi;
        }
        if (has_cap) {
          cap(lo, vc, vinv_c, lo, dlo);
          cap(hi, vc, vinv_c, hi, dhi);
        }
        const V plo = (lo - vlse).exp(), phi = (hi - vlse).exp();
        const V glo = at::vec::fmadd(plo, vpk, plo + vnoff), ghi = at::vec::fmadd(phi, vpk, phi + vnoff);
        IO::store(z + j, glo * dlo * vscale, ghi * dhi * vscale);
      }
      for (; j < Vn; ++j) {
        A s = static_cast<A>(z[j]) + (bias ? static_cast<A>(bias[j]) : A(0)), ds = 1;
        if (has_cap) cap(s, c, inv_c, s, ds);
        const A p = std::exp(s - lse);
        z[j] = static_cast<T>(((p - off) + p * pk) * ds * scale);
      }
      z[t] = static_cast<T>(d_t);
    }
    return loss;
  }
};

// Our AVX-512 fp32 panel GEMM (cpu/gemm/panel_gemm.h) for an fp32 product with enough rows:
// C (M, N) = A (M, K) @ op(B), op(B) = B^T for a (N, K) B (b_nk), else B (K, N); all contiguous,
// C a row range of a contiguous tensor. Elsewhere ATen's GEMM.
template <typename T>
bool own_gemm_for(int64_t M, int64_t N, int64_t K) {
#if defined(CPU_CAPABILITY_AVX512)
  return std::is_same_v<T, float> && M >= kSgemmMinRows && N > 0 && K > 0;
#else
  return false;
#endif
}

inline void own_mm_f32(const at::Tensor& a, const at::Tensor& b, bool b_nk, at::Tensor& c) {
#if defined(CPU_CAPABILITY_AVX512)
  sgemm<F32Dot>(a.const_data_ptr<float>(), b.const_data_ptr<float>(), b_nk, c.mutable_data_ptr<float>(), c.size(0),
                c.size(1), a.size(1));
#else
  fail("linear_cross_entropy: the panel GEMM is AVX-512 only");
#endif
}

// The chunk loop, shared by the forward (row_scale: one scale for every row) and the backward
// of reduction "none" (grad_rows: each row's incoming gradient). Writes per-row losses into
// loss_rows (N,) A when defined; dx (N, H), dw (V, H) in x's dtype, db32 (V,) A when defined.
template <typename T>
void chunk_loop(const at::Tensor& x, const at::Tensor& w, const at::Tensor& target, const OptTensor& bias,
                const Options& o, int64_t chunk_rows, double row_scale, const at::Tensor& grad_rows,
                const at::Tensor& loss_rows, const at::Tensor& dx, const at::Tensor& dw, const at::Tensor& db32) {
  using A = acc_type_t<T>;
  const int64_t N = x.size(0), Vn = w.size(0), H = x.size(1);
  const T* bp = bias ? bias->const_data_ptr<T>() : nullptr;
  const bool need_dlogits = dx.defined() || dw.defined() || db32.defined();
  const int64_t rows_max = std::max<int64_t>(1, std::min(chunk_rows, N));
  at::Tensor buf = at::empty({rows_max, Vn}, x.options());  // logits, then dlogits, of a chunk
  const at::Tensor wt = w.t();
  const int64_t* tgt = target.const_data_ptr<int64_t>();
  const A* gr = grad_rows.defined() ? grad_rows.const_data_ptr<A>() : nullptr;
  A* lr = loss_rows.defined() ? loss_rows.mutable_data_ptr<A>() : nullptr;
  auto own_gemm = [](int64_t M, int64_t N, int64_t K) { return own_gemm_for<T>(M, N, K); };
  auto own_mm = [](const at::Tensor& a, const at::Tensor& b, bool b_nk, at::Tensor& c) { own_mm_f32(a, b, b_nk, c); };
  std::atomic<int64_t> bad{-1};
  bool first_dw = true;
  for (int64_t r0 = 0; r0 < N; r0 += rows_max) {
    const int64_t rows = std::min(rows_max, N - r0);
    at::Tensor lc = buf.narrow(0, 0, rows);
    const at::Tensor xc = x.narrow(0, r0, rows);
    // logits without the bias (the row pass adds it): fp32 on our AVX-512 panel GEMM (about
    // twice MKL's sgemm on AMD CPUs, which ATen calls), else ATen's GEMM (oneDNN for bf16)
    if (own_gemm(rows, Vn, H)) {
      own_mm(xc, w, /*b_nk=*/true, lc);
    } else {
      at::mm_out(lc, xc, wt);
    }
    T* base = lc.mutable_data_ptr<T>();
    at::parallel_for(0, rows, 1, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t r = r0 + i;
        const int64_t t = tgt[r];
        T* z = base + i * Vn;
        const A scale = gr ? gr[r] : static_cast<A>(row_scale);
        if (t == o.ignore_index || t < 0 || t >= Vn) {
          if (t != o.ignore_index) bad.store(r);  // refused below, after the pass
          if (need_dlogits) std::fill(z, z + Vn, T(0));
          if (lr) lr[r] = 0;
          continue;
        }
        const A l = RowPass<T>::row(z, bp, Vn, t, o, need_dlogits, scale);
        if (lr) lr[r] = l;
      }
    });
    const int64_t b = bad.load();
    if (b >= 0)
      fail("linear_cross_entropy: target[%lld] = %lld is out of range: expected 0 <= target < %lld or ignore_index "
           "(%lld)", static_cast<long long>(b), static_cast<long long>(tgt[b]), static_cast<long long>(Vn),
           static_cast<long long>(o.ignore_index));
    if (!need_dlogits) continue;
    if (dx.defined()) {
      at::Tensor dxc = dx.narrow(0, r0, rows);
      if (own_gemm(rows, H, Vn)) {
        own_mm(lc, w, /*b_nk=*/false, dxc);  // K = V: the panel GEMM's split-K path
      } else {
        at::mm_out(dxc, lc, w);
      }
    }
    if (dw.defined()) {
      if (first_dw) {
        at::Tensor dwm = dw;
        at::mm_out(dwm, lc.t(), xc);
      } else {
        dw.addmm_(lc.t(), xc);
      }
      first_dw = false;
    }
    if (db32.defined()) db32.add_(at::sum(lc, at::IntArrayRef{0}, false, db32.scalar_type()));
  }
  if (dw.defined() && first_dw) dw.zero_();  // no rows
}

at::ScalarType acc_scalar(const at::Tensor& x) { return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

int64_t count_valid(const at::Tensor& target, int64_t ignore_index) {
  const int64_t* t = target.const_data_ptr<int64_t>();
  int64_t n = 0;
  for (int64_t i = 0; i < target.numel(); ++i) n += t[i] != ignore_index;
  return n;
}

Tensors4 linear_cross_entropy_fwd_cpu(const Tensor& x, const Tensor& weight, const Tensor& target,
                                      const OptTensor& bias, int64_t ignore_index, std::string_view reduction,
                                      double label_smoothing, double logit_softcap, double z_loss,
                                      std::array<bool, 3> output_mask, int64_t chunk_rows) {
  const Reduction red = parse_reduction(reduction);
  if (chunk_rows <= 0) fail("linear_cross_entropy: chunk_rows must be positive, got %lld", static_cast<long long>(chunk_rows));
  const at::Tensor xc = x.contiguous(), wc = weight.contiguous(), tc = target.contiguous();
  const OptTensor bc = bias ? OptTensor(bias->contiguous()) : std::nullopt;
  const int64_t N = xc.size(0);
  const auto acc = acc_scalar(x);
  const Options o{ignore_index, label_smoothing, logit_softcap, z_loss};
  at::Tensor loss_rows = at::empty({N}, x.options().dtype(acc));
  at::Tensor dx = output_mask[0] ? at::empty_like(xc) : at::Tensor();
  at::Tensor dw = output_mask[1] ? at::empty_like(wc) : at::Tensor();
  at::Tensor db32 = output_mask[2] && bc ? at::zeros({wc.size(0)}, x.options().dtype(acc)) : at::Tensor();
  const int64_t n_valid = count_valid(tc, ignore_index);
  // the gradients are those of the returned loss (of loss.sum() for "none")
  const double scale = red == Reduction::kMean ? 1.0 / static_cast<double>(n_valid) : 1.0;
  dispatch_dtype(kFloatDoubleHalfBf16, x.scalar_type(), "linear_cross_entropy_fwd", [&](auto tag) {
    using T = decltype(tag);
    chunk_loop<T>(xc, wc, tc, bc, o, chunk_rows, n_valid > 0 ? scale : 0.0, at::Tensor(), loss_rows, dx, dw, db32);
  });
  at::Tensor loss;
  if (red == Reduction::kNone) {
    loss = loss_rows;
  } else {
    // summed in float64 (deterministic and exact enough whatever N); mean over the valid rows
    // (0 valid rows: NaN, as F.cross_entropy)
    loss = loss_rows.sum(at::kDouble);
    if (red == Reduction::kMean) loss = loss.div(static_cast<double>(n_valid));
    loss = loss.to(acc);
  }
  auto empty = [&] { return at::empty({0}, x.options()); };
  return {loss, dx.defined() ? dx : empty(), dw.defined() ? dw : empty(),
          db32.defined() ? db32.to(bc->scalar_type()) : empty()};
}

Tensors3 linear_cross_entropy_bwd_cpu(const Tensor& grad_loss, const Tensor& x, const Tensor& weight,
                                      const Tensor& target, const OptTensor& bias, const Tensor& dx,
                                      const Tensor& dweight, const Tensor& dbias, int64_t ignore_index,
                                      std::string_view reduction, double label_smoothing, double logit_softcap,
                                      double z_loss, std::array<bool, 3> output_mask, int64_t chunk_rows) {
  const Reduction red = parse_reduction(reduction);
  auto empty = [&] { return at::empty({0}, x.options()); };
  const bool want[3] = {output_mask[0], output_mask[1], output_mask[2] && bias.has_value()};
  const at::Tensor* saved[3] = {&dx, &dweight, &dbias};
  const at::Tensor* like[3] = {&x, &weight, bias ? &*bias : nullptr};
  // "mean"/"sum": the forward's gradients, times the scalar grad_loss; one the forward did not
  // compute (an empty tensor) is computed here by running the chunks again, as for "none"
  bool rerun[3] = {false, false, false};
  for (int i = 0; i < 3; ++i) rerun[i] = want[i] && (red == Reduction::kNone || saved[i]->sizes() != like[i]->sizes());
  at::Tensor out[3];
  for (int i = 0; i < 3; ++i)
    if (want[i] && !rerun[i]) out[i] = at::mul(*saved[i], grad_loss);
  if (rerun[0] || rerun[1] || rerun[2]) {
    if (chunk_rows <= 0) fail("linear_cross_entropy: chunk_rows must be positive, got %lld", static_cast<long long>(chunk_rows));
    const at::Tensor xc = x.contiguous(), wc = weight.contiguous(), tc = target.contiguous();
    const OptTensor bc = bias ? OptTensor(bias->contiguous()) : std::nullopt;
    const auto acc = acc_scalar(x);
    const Options o{ignore_index, label_smoothing, logit_softcap, z_loss};
    at::Tensor g;  // each row's gradient ("none"), else one scale for every row
    double scale = 1.0;
    if (red == Reduction::kNone) {
      g = grad_loss.to(acc).contiguous();
    } else {
      const int64_t n_valid = count_valid(tc, ignore_index);
      scale = grad_loss.item<double>() * (red == Reduction::kMean ? (n_valid > 0 ? 1.0 / n_valid : 0.0) : 1.0);
    }
    at::Tensor gx = rerun[0] ? at::empty_like(xc) : at::Tensor();
    at::Tensor gw = rerun[1] ? at::empty_like(wc) : at::Tensor();
    at::Tensor gb32 = rerun[2] ? at::zeros({wc.size(0)}, x.options().dtype(acc)) : at::Tensor();
    dispatch_dtype(kFloatDoubleHalfBf16, x.scalar_type(), "linear_cross_entropy_bwd", [&](auto tag) {
      using T = decltype(tag);
      chunk_loop<T>(xc, wc, tc, bc, o, chunk_rows, scale, g, at::Tensor(), gx, gw, gb32);
    });
    if (rerun[0]) out[0] = gx;
    if (rerun[1]) out[1] = gw;
    if (rerun[2]) out[2] = gb32.to(bc->scalar_type());
  }
  return {out[0].defined() ? out[0] : empty(), out[1].defined() ? out[1] : empty(),
          out[2].defined() ? out[2] : empty()};
}

}  // namespace

void add_cross_entropy(Kernels& k) {
  k.linear_cross_entropy_fwd = &linear_cross_entropy_fwd_cpu;
  k.linear_cross_entropy_bwd = &linear_cross_entropy_bwd_cpu;
}

}  // namespace mptk::cpu::CPU_CAPABILITY

// SwiGLU / GeGLU on the CPU: out = act(gate) * up, and its gradient, which recomputes act(gate)
// from the inputs (the forward saves nothing else, as Liger-Kernel's swiglu/geglu do).
// Elementwise and memory-bound: the forward reads gate and up once and writes out; the backward
// reads dout, gate and up once and writes dgate and dup, in one pass. Rows are split into
// segments of kSegment elements and the (row, segment) pairs are shared out by
// at::parallel_for, so one long row and many short ones both use every core; each segment is
// vectorised with at::vec (a chunk of two fp32 vectors, one 16-bit vector, at a time), the
// activation's maths in fp32 (fp64 for fp64) and each output rounded once. A segment's tail
// (< one chunk) goes through a zero-padded chunk, so it runs the same vector maths.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <string_view>
#include <tuple>
#include <type_traits>

#include "common/cpu_vec.h"
#include "common/dispatch.h"
#include "cpu/kernels.h"

namespace mptk::cpu::CPU_CAPABILITY {
namespace {

// elements of a row per parallel task (a multiple of every level's chunk), and elements per
// at::parallel_for grain: a task moves tens of KB, enough to amortise its scheduling
constexpr int64_t kSegment = 4096;
constexpr int64_t kGrainElems = 32768;

enum class GluAct { kSilu, kGelu, kGeluTanh };

GluAct parse_act(std::string_view a, const char* op) {
  if (a == "silu") return GluAct::kSilu;
  if (a == "gelu") return GluAct::kGelu;
  if (a == "gelu_tanh") return GluAct::kGeluTanh;
  TORCH_CHECK(false, op, ": activation must be silu, gelu or gelu_tanh, got '", a, "'");
}

// act(g) and its derivative, a vector at a time, in A (float, or double for double)
template <GluAct kAct, typename A>
struct GluMath {
  using V = Vectorized<A>;
  static constexpr A kInvSqrt2 = A(0.70710678118654752440);
  static constexpr A kInvSqrt2Pi = A(0.39894228040143267794);
  static constexpr A kSqrt2OverPi = A(0.79788456080286535588);
  static constexpr A kTanhCoef = A(0.044715);

  // silu: g * sigmoid(g); gelu: g * Phi(g); gelu_tanh: g (1 + tanh u) / 2 = g * sigmoid(2u)
  // (one exp, a third of tanh's cost). exp overflowing to inf gives act = -0, never NaN.
  static MPTK_ALWAYS_INLINE V sigmoid_of_neg_exp(const V& e) { return V(A(1)) / (V(A(1)) + e); }

  static MPTK_ALWAYS_INLINE V fwd(const V& g) {
    if constexpr (kAct == GluAct::kSilu) {
      return g / (V(A(1)) + g.neg().exp());
    } else if constexpr (kAct == GluAct::kGelu) {
      return g * V(A(0.5)) * (V(A(1)) + (g * V(kInvSqrt2)).erf());
    } else {
      const V u = V(kSqrt2OverPi) * (g + V(kTanhCoef) * g * g * g);
      return g / (V(A(1)) + (V(A(-2)) * u).exp());
    }
  }

  // a = act(g), da = act'(g)
  static MPTK_ALWAYS_INLINE void both(const V& g, V& a, V& da) {
    if constexpr (kAct == GluAct::kSilu) {  // s (1 + g (1 - s)), s = sigmoid(g)
      const V s = sigmoid_of_neg_exp(g.neg().exp());
      a = g * s;
      da = s + a * (V(A(1)) - s);
    } else if constexpr (kAct == GluAct::kGelu) {  // Phi(g) + g phi(g)
      const V cdf = V(A(0.5)) * (V(A(1)) + (g * V(kInvSqrt2)).erf());
      a = g * cdf;
      da = cdf + g * V(kInvSqrt2Pi) * (V(A(-0.5)) * g * g).exp();
    } else {  // p + 2 g p (1 - p) du/dg, p = sigmoid(2u) = (1 + tanh u) / 2
      const V u = V(kSqrt2OverPi) * (g + V(kTanhCoef) * g * g * g);
      const V du = V(kSqrt2OverPi) * (V(A(1)) + V(A(3) * kTanhCoef) * g * g);
      const V p = sigmoid_of_neg_exp((V(A(-2)) * u).exp());
      a = g * p;
      da = p + V(A(2)) * a * (V(A(1)) - p) * du;
    }
  }
};

template <typename T, GluAct kAct>
struct GluKernel {
  using A = acc_type_t<T>;
  using V = Vectorized<A>;
  using IO = ChunkIO<T, A>;
  using F = GluMath<kAct, A>;
  static constexpr int64_t K = IO::kChunk;
  static constexpr int kV = V::size();

  // n elements of one row: out = act(g) * u
  static MPTK_FLATTEN void fwd_segment(const T* __restrict__ g,  // [n]
                                       const T* __restrict__ u,  // [n]
                                       T* __restrict__ out,      // [n]
                                       int64_t n, bool stream) {
    int64_t j = 0;
    for (; j + K <= n; j += K) {
      V g0, g1, u0, u1;
      IO::load(g + j, g0, g1);
      IO::load(u + j, u0, u1);
      IO::store(out + j, F::fwd(g0) * u0, F::fwd(g1) * u1, stream);
    }
    if (j < n) {  // the tail through a zero-padded chunk
      const int64_t r = n - j;
      alignas(64) A gb[K] = {}, ub[K] = {}, ob[K];
      for (int64_t i = 0; i < r; ++i) {
        gb[i] = static_cast<A>(g[j + i]);
        ub[i] = static_cast<A>(u[j + i]);
      }
      (F::fwd(V::loadu(gb)) * V::loadu(ub)).store(ob);
      (F::fwd(V::loadu(gb + kV)) * V::loadu(ub + kV)).store(ob + kV);
      for (int64_t i = 0; i < r; ++i) out[j + i] = static_cast<T>(ob[i]);
    }
  }

  // n elements of one row: dgate = dout * up * act'(g), dup = dout * act(g)
  static MPTK_FLATTEN void bwd_segment(const T* __restrict__ dout,  // [n]
                                       const T* __restrict__ g,     // [n]
                                       const T* __restrict__ u,     // [n]
                                       T* __restrict__ dg,          // [n]
                                       T* __restrict__ du,          // [n]
                                       int64_t n, bool stream) {
    int64_t j = 0;
    for (; j + K <= n; j += K) {
      V d0, d1, g0, g1, u0, u1, a0, a1, da0, da1;
      IO::load(dout + j, d0, d1);
      IO::load(g + j, g0, g1);
      IO::load(u + j, u0, u1);
      F::both(g0, a0, da0);
      F::both(g1, a1, da1);
      IO::store(dg + j, d0 * u0 * da0, d1 * u1 * da1, stream);
      IO::store(du + j, d0 * a0, d1 * a1, stream);
    }
    if (j < n) {
      const int64_t r = n - j;
      alignas(64) A db[K] = {}, gb[K] = {}, ub[K] = {}, ob[K], pb[K];
      for (int64_t i = 0; i < r; ++i) {
        db[i] = static_cast<A>(dout[j + i]);
        gb[i] = static_cast<A>(g[j + i]);
        ub[i] = static_cast<A>(u[j + i]);
      }
      for (int h = 0; h < 2; ++h) {
        const V d = V::loadu(db + h * kV), uu = V::loadu(ub + h * kV);
        V a, da;
        F::both(V::loadu(gb + h * kV), a, da);
        (d * uu * da).store(ob + h * kV);
        (d * a).store(pb + h * kV);
      }
      for (int64_t i = 0; i < r; ++i) {
        dg[j + i] = static_cast<T>(ob[i]);
        du[j + i] = static_cast<T>(pb[i]);
      }
    }
  }

  // f(row, first column, length) over every segment of an M x N problem, in parallel
  template <typename Seg>
  static void for_segments(int64_t M, int64_t N, const Seg& f) {
    const int64_t per_row = (N + kSegment - 1) / kSegment;
    const int64_t grain = std::max<int64_t>(1, kGrainElems / std::min(N, kSegment));
    at::parallel_for(0, M * per_row, grain, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t m = t / per_row, c0 = (t % per_row) * kSegment;
        f(m, c0, std::min(kSegment, N - c0));
      }
      stream_fence();
    });
  }

  static void fwd(const at::Tensor& gate, const at::Tensor& up, at::Tensor& out) {
    const int64_t M = gate.size(0), N = gate.size(1);
    const int64_t sg = gate.stride(0), su = up.stride(0);
    const T* gp = gate.const_data_ptr<T>();
    const T* up_ = up.const_data_ptr<T>();
    T* op = out.mutable_data_ptr<T>();
    const bool stream = out.numel() * static_cast<int64_t>(sizeof(T)) >= kStreamBytes;
    for_segments(M, N, [&](int64_t m, int64_t c0, int64_t n) {
      fwd_segment(gp + m * sg + c0, up_ + m * su + c0, op + m * N + c0, n, stream);
    });
  }

  static void bwd(const at::Tensor& dout, const at::Tensor& gate, const at::Tensor& up, at::Tensor& dgate,
                  at::Tensor& dup) {
    const int64_t M = gate.size(0), N = gate.size(1);
    const int64_t sd = dout.stride(0), sg = gate.stride(0), su = up.stride(0);
    const T* dp = dout.const_data_ptr<T>();
    const T* gp = gate.const_data_ptr<T>();
    const T* up_ = up.const_data_ptr<T>();
    T* dgp = dgate.mutable_data_ptr<T>();
    T* dup_ = dup.mutable_data_ptr<T>();
    const bool stream = 2 * dgate.numel() * static_cast<int64_t>(sizeof(T)) >= kStreamBytes;
    for_segments(M, N, [&](int64_t m, int64_t c0, int64_t n) {
      bwd_segment(dp + m * sd + c0, gp + m * sg + c0, up_ + m * su + c0, dgp + m * N + c0, dup_ + m * N + c0, n,
                  stream);
    });
  }
};

// f(T{}, integral_constant<GluAct>{}) for the dtype and activation of a call
template <typename F>
void dispatch_glu(at::ScalarType dtype, GluAct act, const char* op, F&& f) {
  dispatch_dtype(kFloatDoubleHalfBf16, dtype, op, [&](auto tag) {
    switch (act) {
      case GluAct::kSilu: f(tag, std::integral_constant<GluAct, GluAct::kSilu>{}); break;
      case GluAct::kGelu: f(tag, std::integral_constant<GluAct, GluAct::kGelu>{}); break;
      case GluAct::kGeluTanh: f(tag, std::integral_constant<GluAct, GluAct::kGeluTanh>{}); break;
    }
  });
}

// gate, up: (M, N), unit stride along N, any row stride (a chunk() of a fused projection);
// checked in mptkernels/ops/glu.py. Outputs are new contiguous tensors.
at::Tensor glu_fwd_cpu(const at::Tensor& gate, const at::Tensor& up, std::string_view activation) {
  const GluAct act = parse_act(activation, "glu_fwd");
  at::Tensor out = at::empty(gate.sizes(), gate.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;
  dispatch_glu(gate.scalar_type(), act, "glu_fwd", [&](auto t_tag, auto a_tag) {
    GluKernel<decltype(t_tag), decltype(a_tag)::value>::fwd(gate, up, out);
  });
  return out;
}

Tensors2 glu_bwd_cpu(const at::Tensor& dout, const at::Tensor& gate, const at::Tensor& up,
                     std::string_view activation) {
  const GluAct act = parse_act(activation, "glu_bwd");
  const auto opts = gate.options().memory_format(at::MemoryFormat::Contiguous);
  at::Tensor dgate = at::empty(gate.sizes(), opts), dup = at::empty(gate.sizes(), opts);
  if (dgate.numel() == 0) return {dgate, dup};
  dispatch_glu(gate.scalar_type(), act, "glu_bwd", [&](auto t_tag, auto a_tag) {
    GluKernel<decltype(t_tag), decltype(a_tag)::value>::bwd(dout, gate, up, dgate, dup);
  });
  return {dgate, dup};
}

}  // namespace

// this level's entries of the kernel table (cpu/kernels.h)
void add_glu(Kernels& k) {
  k.glu_fwd = &glu_fwd_cpu;
  k.glu_bwd = &glu_bwd_cpu;
}

}  // namespace mptk::cpu::CPU_CAPABILITY

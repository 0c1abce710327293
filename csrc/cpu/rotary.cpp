// Rotary position embedding on the CPU. Parallel over (batch, seqlen) tokens; each token's
// cos/sin row is loaded once and applied to all of its heads. The non-interleaved (halves)
// layout vectorises directly; the interleaved (pairs) layout runs as a scalar loop the
// compiler vectorises where it can (its strided pairs would need a shuffle per chunk).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <atomic>
#include <optional>

#include "common/cpu_vec.h"
#include "cpu/kernels.h"

namespace mptk::cpu::CPU_CAPABILITY {
namespace {

template <typename T>
void rotary_impl(const at::Tensor& x,     // [B, S, H, D], strides (sb, ss, sh, 1)
                 const float* cos,        // [max_seqlen, half]
                 const float* sin,        // [max_seqlen, half]
                 const int32_t* offsets,  // [B], or null: every sequence starts at offset
                 int64_t offset, int64_t max_seqlen, int64_t half, bool interleaved, bool conjugate,
                 at::Tensor& out) {       // [B, S, H, D], contiguous
  using A = acc_type_t<T>;
  using IO = ChunkIO<T, A>;
  using CIO = ChunkIO<float, A>;
  using V = Vectorized<A>;
  constexpr int64_t K = IO::kChunk;
  const int64_t B = x.size(0), S = x.size(1), H = x.size(2), D = x.size(3);
  const int64_t sb = x.stride(0), ss = x.stride(1), sh = x.stride(2);
  const T* xp = x.const_data_ptr<T>();
  T* op = out.mutable_data_ptr<T>();
  const A sign = conjugate ? A(-1) : A(1);
  const V vsign(sign);
  // a bad tensor offset is reported after the parallel region (no throwing inside it); a
  // flag of its own, since any int64 (negative ones too) can be the bad position
  std::atomic<bool> bad{false};
  std::atomic<int64_t> bad_pos{0};
  at::parallel_for(0, B * S, std::max<int64_t>(1, 4096 / std::max<int64_t>(H * D, 1)), [&](int64_t t0, int64_t t1) {
    for (int64_t bt = t0; bt < t1; ++bt) {
      const int64_t b = bt / S, t = bt % S;
      const int64_t pos = t + (offsets ? offsets[b] : offset);
      if (pos < 0 || pos >= max_seqlen) {
        bad_pos.store(pos);
        bad.store(true);
        continue;
      }
      const float* c = cos + pos * half;  // [half]
      const float* s = sin + pos * half;  // [half]
      for (int64_t h = 0; h < H; ++h) {
        const T* xr = xp + b * sb + t * ss + h * sh;  // [D]
        T* orow = op + ((b * S + t) * H + h) * D;     // [D]
        int64_t i = 0;
        if (!interleaved) {
          for (; i + K <= half; i += K) {
            V x1a, x1b, x2a, x2b, ca, cb, sa, sbv;
            IO::load(xr + i, x1a, x1b);
            IO::load(xr + half + i, x2a, x2b);
            CIO::load(c + i, ca, cb);
            CIO::load(s + i, sa, sbv);
            sa = sa * vsign;
            sbv = sbv * vsign;
            IO::store(orow + i, x1a * ca - x2a * sa, x1b * cb - x2b * sbv);
            IO::store(orow + half + i, x1a * sa + x2a * ca, x1b * sbv + x2b * cb);
          }
          for (; i < half; ++i) {
            const A x1 = static_cast<A>(xr[i]), x2 = static_cast<A>(xr[half + i]);
            const A ci = c[i], si = sign * s[i];
            orow[i] = static_cast<T>(x1 * ci - x2 * si);
            orow[half + i] = static_cast<T>(x1 * si + x2 * ci);
          }
        } else {
          for (; i < half; ++i) {
            const A x1 = static_cast<A>(xr[2 * i]), x2 = static_cast<A>(xr[2 * i + 1]);
            const A ci = c[i], si = sign * s[i];
            orow[2 * i] = static_cast<T>(x1 * ci - x2 * si);
            orow[2 * i + 1] = static_cast<T>(x1 * si + x2 * ci);
          }
        }
        for (int64_t j = 2 * half; j < D; ++j) orow[j] = xr[j];  // features past rotary_dim pass through
      }
    }
  });
  TORCH_CHECK(!bad.load(), "rotary: seqlen_offsets puts a token at position ", bad_pos.load(),
              ", outside the cos/sin table of ", max_seqlen, " rows");
}

at::Tensor rotary_cpu(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                      const std::optional<at::Tensor>& seqlen_offsets, int64_t seqlen_offset, bool interleaved,
                      bool conjugate) {
  const int64_t half = cos.size(1);
  const bool has_offsets = seqlen_offsets.has_value() && seqlen_offsets->defined();
  const int32_t* offsets = has_offsets ? seqlen_offsets->const_data_ptr<int32_t>() : nullptr;
  at::Tensor out = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "mptkernels_rotary", [&] {
    rotary_impl<scalar_t>(x, cos.const_data_ptr<float>(), sin.const_data_ptr<float>(), offsets, seqlen_offset,
                          cos.size(0), half, interleaved, conjugate, out);
  });
  return out;
}

}  // namespace

// this level's entries of the kernel table (cpu/kernels.h)
void add_rotary(Kernels& k) {
  k.apply_rotary = &rotary_cpu;
}

}  // namespace mptk::cpu::CPU_CAPABILITY

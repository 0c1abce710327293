// Argument checks shared by the C++ kernels of every device. The Python layer
// (mptkernels/ops/) checks first with user-facing names; these guard direct
// torch.ops.mptkernels.* calls, so a bad call errors instead of reading out of bounds.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <optional>

namespace mptk {

// Calls f(T{}) with T float, at::Half or at::BFloat16 as t says (the dtypes the CUDA kernels
// take); any other dtype is an error naming op.
template <typename F>
void dispatch_float_half_bf16(at::ScalarType t, const char* op, F&& f) {
  switch (t) {
    case at::kFloat:
      f(float{});
      break;
    case at::kHalf:
      f(at::Half{});
      break;
    case at::kBFloat16:
      f(at::BFloat16{});
      break;
    default:
      TORCH_CHECK(false, op, ": unsupported dtype ", t, " (expected float32, float16 or bfloat16)");
  }
}

inline bool is_norm_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble;
}

// a (rows, cols) tensor with the same shape, dtype and device as ref, contiguous
inline void check_same_layout(const at::Tensor& t, const at::Tensor& ref, const char* name, const char* ref_name) {
  TORCH_CHECK(t.sizes() == ref.sizes(), name, ": expected shape ", ref.sizes(), " (as ", ref_name, "), got ",
              t.sizes());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), name, ": expected dtype ", ref.scalar_type(), " (as ",
              ref_name, "), got ", t.scalar_type());
  TORCH_CHECK(t.device() == ref.device(), name, ": expected device ", ref.device(), ", got ", t.device());
  TORCH_CHECK(t.is_contiguous(), name, ": expected a contiguous tensor");
}

inline void check_norm_args(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                            const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual,
                            const char* op) {
  TORCH_CHECK(x.dim() == 2, op, ": x must be 2-D (rows, cols), got shape ", x.sizes());
  TORCH_CHECK(x.is_contiguous(), op, ": x must be contiguous");
  TORCH_CHECK(is_norm_dtype(x.scalar_type()), op, ": x must be float32, float16, bfloat16 or float64, got ",
              x.scalar_type());
  const int64_t N = x.size(1);
  for (auto [t, name] : {std::pair{&weight, "weight"}, std::pair{&bias, "bias"}}) {
    if (!t->has_value()) continue;
    const at::Tensor& w = t->value();
    TORCH_CHECK(w.dim() == 1 && w.size(0) == N, op, ": ", name, " must have shape (", N, ",), got ", w.sizes());
    TORCH_CHECK(w.scalar_type() == x.scalar_type() || w.scalar_type() == at::kFloat, op, ": ", name,
                " must be float32 or x's dtype ", x.scalar_type(), ", got ", w.scalar_type());
    TORCH_CHECK(w.device() == x.device(), op, ": ", name, " must be on ", x.device(), ", got ", w.device());
    TORCH_CHECK(w.is_contiguous(), op, ": ", name, " must be contiguous");
  }
  if (weight && bias) {
    TORCH_CHECK(weight->scalar_type() == bias->scalar_type(), op, ": bias dtype ", bias->scalar_type(),
                " must equal weight dtype ", weight->scalar_type());
  }
  if (residual) check_same_layout(*residual, x, "residual", "x");
}

inline void check_norm_stats(const at::Tensor& s, const at::Tensor& mean, const at::Tensor& rstd, bool rms_norm) {
  const auto stats_t = s.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(rstd.dim() == 1 && rstd.size(0) == s.size(0) && rstd.scalar_type() == stats_t && rstd.is_contiguous() &&
                  rstd.device() == s.device(),
              "rstd: expected a contiguous (", s.size(0), ",) ", stats_t, " tensor on ", s.device(), ", got ", rstd.sizes(), " ",
              rstd.scalar_type());
  if (!rms_norm) {
    TORCH_CHECK(mean.dim() == 1 && mean.size(0) == s.size(0) && mean.scalar_type() == stats_t &&
                    mean.is_contiguous() && mean.device() == s.device(),
                "mean: expected a contiguous (", s.size(0), ",) ", stats_t, " tensor on ", s.device(), ", got ", mean.sizes(), " ",
                mean.scalar_type());
  }
}

// rotary(x, cos, sin, seqlen_offsets, seqlen_offset, ...): x (B, S, H, D) with a unit-stride
// last dim; cos/sin (max_seqlen, rotary_dim/2) float32 contiguous; offsets (B,) int32.
inline void check_rotary_args(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                              const std::optional<at::Tensor>& seqlen_offsets, int64_t seqlen_offset,
                              bool allow_double) {
  TORCH_CHECK(x.dim() == 4, "rotary: x must be (batch, seqlen, heads, head_dim), got shape ", x.sizes());
  const auto t = x.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || (allow_double && t == at::kDouble),
              "rotary: x must be float32, float16 or bfloat16", allow_double ? " (or float64)" : "", ", got ", t);
  TORCH_CHECK(x.stride(3) == 1 || x.size(3) <= 1 || x.numel() == 0, "rotary: x's last dim (head_dim) must have stride 1, got strides ",
              x.strides());
  for (auto [c, name] : {std::pair{&cos, "cos"}, std::pair{&sin, "sin"}}) {
    TORCH_CHECK(c->dim() == 2 && c->scalar_type() == at::kFloat && c->is_contiguous(), "rotary: ", name,
                " must be a contiguous float32 (max_seqlen, rotary_dim/2) tensor, got ", c->scalar_type(), " ",
                c->sizes());
    TORCH_CHECK(c->device() == x.device(), "rotary: ", name, " must be on ", x.device(), ", got ", c->device());
  }
  TORCH_CHECK(cos.sizes() == sin.sizes(), "rotary: sin shape ", sin.sizes(), " must equal cos shape ", cos.sizes());
  TORCH_CHECK(2 * cos.size(1) <= x.size(3), "rotary: rotary_dim 2*cos.size(1) = ", 2 * cos.size(1),
              " exceeds head_dim ", x.size(3));
  if (seqlen_offsets.has_value() && seqlen_offsets->defined()) {
    const at::Tensor& o = *seqlen_offsets;
    TORCH_CHECK(o.dim() == 1 && o.size(0) == x.size(0) && o.scalar_type() == at::kInt && o.is_contiguous(),
                "rotary: seqlen_offsets must be a contiguous int32 (", x.size(0), ",) tensor, got ", o.scalar_type(),
                " ", o.sizes());
    TORCH_CHECK(o.device() == x.device(), "rotary: seqlen_offsets must be on ", x.device(), ", got ", o.device());
  } else if (x.numel() > 0) {
    TORCH_CHECK(seqlen_offset >= 0 && seqlen_offset + x.size(1) <= cos.size(0), "rotary: seqlen_offset ",
                seqlen_offset, " puts positions [", seqlen_offset, ", ", seqlen_offset + x.size(1),
                ") outside the cos/sin table of ", cos.size(0), " rows");
  }
}

// attention_fwd/bwd: q (B, Sq, Hq, D), k and v (B, Sk, Hk, D), one float dtype, contiguous,
// Hq % Hk == 0, D a multiple of 8 up to 256; alibi_slopes float32 (Hq,) or (B, Hq).
constexpr int64_t kMaxHeadDim = 256;
inline void check_attention_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const std::optional<at::Tensor>& alibi_slopes, const char* op) {
  for (auto [t, name] : {std::pair{&q, "q"}, std::pair{&k, "k"}, std::pair{&v, "v"}}) {
    TORCH_CHECK(t->dim() == 4, op, ": ", name, " must be (batch, seqlen, heads, head_dim), got shape ", t->sizes());
    TORCH_CHECK(t->is_contiguous(), op, ": ", name, " must be contiguous");
    TORCH_CHECK(t->device() == q.device(), op, ": ", name, " must be on ", q.device(), ", got ", t->device());
  }
  const auto dt = q.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16, op,
              ": q must be float32, float16 or bfloat16, got ", dt);
  TORCH_CHECK(k.scalar_type() == dt && v.scalar_type() == dt, op, ": k and v must have q's dtype ", dt);
  TORCH_CHECK(k.sizes() == v.sizes(), op, ": k ", k.sizes(), " and v ", v.sizes(), " must have one shape");
  TORCH_CHECK(k.size(0) == q.size(0) && k.size(3) == q.size(3), op, ": k/v ", k.sizes(),
              " must match q ", q.sizes(), " in batch and head_dim");
  TORCH_CHECK(k.size(2) > 0 && q.size(2) % k.size(2) == 0, op, ": q heads (", q.size(2),
              ") must be a multiple of k/v heads (", k.size(2), ")");
  TORCH_CHECK(q.size(3) % 8 == 0 && q.size(3) <= kMaxHeadDim && q.size(3) > 0, op,
              ": head_dim must be a multiple of 8 up to ", kMaxHeadDim, ", got ", q.size(3));
  if (alibi_slopes) {
    const at::Tensor& s = *alibi_slopes;
    const bool ok_shape = (s.dim() == 1 && s.size(0) == q.size(2)) ||
                          (s.dim() == 2 && s.size(0) == q.size(0) && s.size(1) == q.size(2));
    TORCH_CHECK(ok_shape && s.scalar_type() == at::kFloat && s.is_contiguous(), op,
                ": alibi_slopes must be a contiguous float32 (", q.size(2), ",) or (", q.size(0), ", ", q.size(2),
                ") tensor, got ", s.scalar_type(), " ", s.sizes());
    TORCH_CHECK(s.device() == q.device(), op, ": alibi_slopes must be on ", q.device(), ", got ", s.device());
  }
}

}  // namespace mptk

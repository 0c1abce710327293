// Runtime dtypes -> template arguments, for the C++ kernels of every device (g++ and nvcc
// both compile this header), in the spirit of flash-attn's static_switch.h: one place that
// names which dtypes an op instantiates, and one error for any other.
//
//   dispatch_dtype(kFloatHalfBf16, x.scalar_type(), "rotary", [&](auto tag) {
//     using T = decltype(tag);  // float, at::Half or at::BFloat16
//     ...
//   });
//   // the norms: T from x, W the parameters' dtype, which is x's or float32
//   dispatch_dtype_and_param(kFloatHalfBf16, x.scalar_type(), w.scalar_type(), "layer_norm_fwd",
//                            [&](auto t_tag, auto w_tag) { using T = decltype(t_tag); using W = decltype(w_tag); });
//
// The callable gets value-initialised tags (T{}), so its body can name the types; a dtype
// outside the list is a c10::Error naming the op and the dtype. Plain ATen AT_DISPATCH_*
// serves where no such rule is needed.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <optional>
#include <string>
#include <type_traits>

namespace mptk {

// the element types an op instantiates, as a value to pass
template <typename... Ts>
struct DtypeList {};

inline constexpr DtypeList<float, at::Half, at::BFloat16> kFloatHalfBf16{};  // the CUDA kernels, the int8 ops
inline constexpr DtypeList<float, double, at::Half, at::BFloat16> kFloatDoubleHalfBf16{};  // the CPU norms

namespace detail {

template <typename T>
constexpr const char* dtype_name() {
  if constexpr (std::is_same_v<T, float>) return "float32";
  else if constexpr (std::is_same_v<T, double>) return "float64";
  else if constexpr (std::is_same_v<T, at::Half>) return "float16";
  else return "bfloat16";
}

// "float32, float16 or bfloat16"
template <typename... Ts>
std::string dtype_names() {
  const char* names[] = {dtype_name<Ts>()...};
  std::string s;
  const size_t n = sizeof...(Ts);
  for (size_t i = 0; i < n; ++i) s += std::string(i == 0 ? "" : i + 1 == n ? " or " : ", ") + names[i];
  return s;
}

}  // namespace detail

// Calls f(T{}) for the T of `list` whose dtype is t; any other dtype is an error naming op.
template <typename... Ts, typename F>
void dispatch_dtype(DtypeList<Ts...>, at::ScalarType t, const char* op, F&& f) {
  const bool found = ((t == c10::CppTypeToScalarType<Ts>::value ? (f(Ts{}), true) : false) || ...);
  TORCH_CHECK(found, op, ": unsupported dtype ", t, " (expected ", detail::dtype_names<Ts...>(), ")");
}

// Calls f(T{}, W{}): T as dispatch_dtype gives it for t; W the dtype of the op's parameters
// (a norm's weight and bias), `param`, which must be t (W = T) or float32 (W = float).
template <typename... Ts, typename F>
void dispatch_dtype_and_param(DtypeList<Ts...> list, at::ScalarType t, at::ScalarType param, const char* op, F&& f) {
  dispatch_dtype(list, t, op, [&](auto tag) {
    using T = decltype(tag);
    if (param == t) {
      f(T{}, T{});
    } else {
      TORCH_CHECK(param == at::kFloat, op, ": unsupported parameter dtype ", param, " for input dtype ", t,
                  " (expected ", detail::dtype_name<T>(), " or float32)");
      f(T{}, float{});
    }
  });
}

// The `param` of dispatch_dtype_and_param for a norm: weight's dtype, else bias's, else
// (neither given) x's. mptkernels/ops/layer_norm.py keeps it x's or float32.
inline at::ScalarType norm_param_dtype(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                                       const std::optional<at::Tensor>& bias) {
  for (const auto* p : {&weight, &bias})
    if (p->has_value() && (*p)->defined()) return (*p)->scalar_type();
  return x.scalar_type();
}

}  // namespace mptk

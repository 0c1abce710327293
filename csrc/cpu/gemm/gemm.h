// The GEMM family on the CPU: linear with a fused bias + activation epilogue, row-wise int8
// quantisation, an exact int8 GEMM core, W8A8 and weight-only int8 linears. This header holds
// what the family's files share; the files, by role:
//   epilogue.h         activations and the fused epilogue (bias, activation, rounding) of a row
//   dot_tiles.h        register-blocked dot products for few rows (fp32, or bf16 on vdpbf16ps)
//   panel_gemm.h       the AVX-512 panel GEMM for more rows (fp32, or bf16 on vdpbf16ps)
//   int8_gemm.h        the exact int8 GEMM core (VNNI panels, or dot-product tiles)
//   linear.cpp         linear_fwd / linear_bwd: the choice of GEMM per shape and dtype
//   linear_bwd_bf16.cpp  the bf16 backward where the CPU has AVX512-BF16 (oneDNN + one fused pass)
//   quantize.cpp       quantize_rowwise
//   int8_linear.cpp    int8_mm and int8_linear (W8A8)
//   weight_only.cpp    weight_only_int8_linear (int8 weight converted a block at a time)
// The kernels are templates and inline functions in the headers, in an anonymous namespace:
// each file that includes them compiles its own internal copy, as when the family was one
// file (GCC inlines internal functions more readily than inline ones shared between files).
// Where GCC's choice still followed the size of the file (its inline-unit-growth budget,
// smaller for a smaller file), the headers pin it (common/cpu_vec.h): act_fwd / act_grad
// always inlined, epilogue_row and int8_tile flattened (the activation's erf and exp inlined
// into them), dot_tile kept out of line. Checked by instruction counts (valgrind) of every
// op against the single-file build. The .cpp files share only what runs once per op
// (declared below).
//
// Floating GEMMs are ours (MKL's sgemm runs AVX2 code on AMD CPUs): dot-product tiles for
// few rows, AVX-512 panels for more, both in fp32 or, at the avx512_bf16 level,
// on bf16 operands with vdpbf16ps. Other 16-bit inputs are widened to fp32 (on CPUs without
// native bf16, PyTorch's bf16 matmul is ~350x slower than sgemm) and the result rounded once
// in the epilogue (bias, activation, the pre-activation copy the gelus' backward needs),
// vectorised, on each block of the product while it is in cache. The bf16 backward uses
// oneDNN's native bf16 matmul where the CPU has it (see linear_bwd_bf16).
//
// int8: torch._int_mm runs 12-40x slower than sgemm on AVX2 machines, so the int8 product has
// its own kernel, exact in int32 (the lanes overflow only past K ~ 130k: ops/gemm.py refuses
// K > INT8_MAX_K before a kernel runs).
// Results reach the epilogue (int32 store, or scale + bias + activation + rounding for
// int8_linear) a row-run at a time, while still in cache.
//
// Every file of the family is compiled once per CPU ISA level (cpu/kernels.h); the
// avx512_bf16 level adds AVX512-VNNI and AVX512-BF16, the only level where vpdpbusd and
// vdpbf16ps appear.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <string_view>
#include <tuple>

#include "common/cpu_vec.h"

namespace mptk::cpu::CPU_CAPABILITY {

using Vf = Vectorized<float>;
constexpr int64_t kWf = Vf::size();

// ---------------------------------------------------------------- activations
enum class Act { kNone, kRelu, kGelu, kGeluTanh };

inline Act parse_activation(std::string_view a, const char* op) {
  if (a == "none") return Act::kNone;
  if (a == "relu") return Act::kRelu;
  if (a == "gelu") return Act::kGelu;
  if (a == "gelu_tanh") return Act::kGeluTanh;
  TORCH_CHECK(false, op, ": activation must be \"none\", \"relu\", \"gelu\" or \"gelu_tanh\", got \"", a, "\"");
}

// fp32 (or fp64) contiguous view of t
inline at::Tensor wide(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? t.contiguous() : t.to(at::kFloat).contiguous();
}

// ---------------------------------------------------------------- entry points between files
// quantize.cpp: x (M, K) float32/float16/bfloat16 -> (q (M, K) int8, scale (M,) float32);
// the quantize_rowwise op, and int8_linear's quantisation of x
std::tuple<at::Tensor, at::Tensor> quantize_rowwise_cpu(const at::Tensor& x);

#ifdef MPTK_BF16_PAIRS
// linear_bwd_bf16.cpp: (dx (M, K), dw (N, K), db (N,) float32 or empty) of a bf16 linear from
// dout (M, N), x (M, K), weight (N, K) and saved (M, N, the pre-activation; any if act is none)
std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_bwd_bf16(const at::Tensor& dout, const at::Tensor& x,
                                                               const at::Tensor& weight, const at::Tensor& saved,
                                                               Act act, bool has_bias);
#endif

}  // namespace mptk::cpu::CPU_CAPABILITY

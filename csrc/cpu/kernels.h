// The C++ CPU kernels as a table: one table per CPU ISA level, the level chosen when _C loads.
//
// Every kernel file (csrc/cpu/*.cpp, csrc/cpu/gemm/*.cpp) is compiled once per level
// (CMakeLists.txt names the levels and their flags), each time into its own namespace
// mptk::cpu::<CPU_CAPABILITY> (DEFAULT, AVX2, AVX512, AVX512_BF16), as PyTorch compiles its own
// CPU kernels; at::vec takes its vector width from the same CPU_CAPABILITY macros. A file ends
// with add_<family>(Kernels&), which fills its ops' entries with that level's functions.
// csrc/cpu/isa.cpp detects what the CPU runs, builds the table of the level in use, and
// registers one forwarding kernel per op (mptkernels_cpu::<op>) that calls the table's entry.
// The entries' signatures are the op schemas of csrc/registration.cpp.
#pragma once

#include <ATen/core/Tensor.h>

#include <array>
#include <optional>
#include <string_view>
#include <tuple>

namespace mptk::cpu {

using Tensor = at::Tensor;
using OptTensor = std::optional<at::Tensor>;
using Tensors2 = std::tuple<at::Tensor, at::Tensor>;
using Tensors3 = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
using Tensors4 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

struct Kernels {
  Tensors4 (*layer_norm_fwd)(const Tensor& x, const OptTensor& weight, const OptTensor& bias,
                             const OptTensor& residual, double eps, bool rms_norm, double weight_offset,
                             bool cast_before_weight);
  Tensors3 (*layer_norm_bwd)(const Tensor& dy, const OptTensor& dresidual_out, const Tensor& s,
                             const OptTensor& weight, const OptTensor& bias, const Tensor& mean, const Tensor& rstd,
                             bool rms_norm, double weight_offset, bool cast_before_weight);
  Tensor (*apply_rotary)(const Tensor& x, const Tensor& cos, const Tensor& sin, const OptTensor& seqlen_offsets,
                         int64_t seqlen_offset, bool interleaved, bool conjugate);
  Tensors2 (*attention_fwd)(const Tensor& q, const Tensor& k, const Tensor& v, const OptTensor& alibi_slopes,
                            double softmax_scale, bool causal, int64_t window_left, int64_t window_right,
                            double softcap);
  Tensors3 (*attention_bwd)(const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v,
                            const Tensor& out, const Tensor& lse, const OptTensor& alibi_slopes,
                            double softmax_scale, bool causal, int64_t window_left, int64_t window_right,
                            double softcap, const OptTensor& dlse);
  Tensors2 (*attention_varlen_fwd)(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& cu_seqlens_q,
                                   const Tensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k,
                                   const OptTensor& alibi_slopes, double softmax_scale, bool causal,
                                   int64_t window_left, int64_t window_right, double softcap);
  Tensors3 (*attention_varlen_bwd)(const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v,
                                   const Tensor& out, const Tensor& lse, const Tensor& cu_seqlens_q,
                                   const Tensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k,
                                   const OptTensor& alibi_slopes, double softmax_scale, bool causal,
                                   int64_t window_left, int64_t window_right, double softcap, const OptTensor& dlse);
  Tensors2 (*attention_with_kvcache)(const Tensor& q, Tensor& k_cache, Tensor& v_cache, const Tensor& cache_seqlens,
                                     const OptTensor& k, const OptTensor& v, const OptTensor& alibi_slopes,
                                     double softmax_scale, bool causal, int64_t window_left, int64_t window_right,
                                     double softcap, const OptTensor& rotary_cos, const OptTensor& rotary_sin,
                                     bool rotary_interleaved, const OptTensor& cache_batch_idx,
                                     const OptTensor& cache_leftpad, const OptTensor& block_table);
  Tensors2 (*linear_fwd)(const Tensor& x, const Tensor& weight, const OptTensor& bias, std::string_view activation);
  Tensors3 (*linear_bwd)(const Tensor& dout, const Tensor& x, const Tensor& weight, const Tensor& saved,
                         std::string_view activation, bool has_bias);
  Tensors2 (*quantize_rowwise)(const Tensor& x);
  Tensor (*int8_mm)(const Tensor& a, const Tensor& b);
  Tensor (*int8_linear)(const Tensor& x, const Tensor& w_int8, const Tensor& w_scale, const OptTensor& bias,
                        std::string_view activation);
  Tensor (*weight_only_int8_linear)(const Tensor& x, const Tensor& w_int8, const Tensor& w_scale,
                                    const OptTensor& bias);
  // GLU family (glu.cpp)
  Tensor (*glu_fwd)(const Tensor& gate, const Tensor& up, std::string_view activation);
  Tensors2 (*glu_bwd)(const Tensor& dout, const Tensor& gate, const Tensor& up, std::string_view activation);
  // ---- cross_entropy family (cross_entropy.cpp)
  Tensors4 (*linear_cross_entropy_fwd)(const Tensor& x, const Tensor& weight, const Tensor& target,
                                       const OptTensor& bias, int64_t ignore_index, std::string_view reduction,
                                       double label_smoothing, double logit_softcap, double z_loss,
                                       std::array<bool, 3> output_mask, int64_t chunk_rows);
  Tensors3 (*linear_cross_entropy_bwd)(const Tensor& grad_loss, const Tensor& x, const Tensor& weight,
                                       const Tensor& target, const OptTensor& bias, const Tensor& dx,
                                       const Tensor& dweight, const Tensor& dbias, int64_t ignore_index,
                                       std::string_view reduction, double label_smoothing, double logit_softcap,
                                       double z_loss, std::array<bool, 3> output_mask, int64_t chunk_rows);
};

// The table of the level in use, for a kernel that runs another op's kernel (attention_with_kvcache
// rotates with apply_rotary's): a plain call into isa.cpp, where the code shared by the levels lives
// (going through the dispatcher from a level's file would instantiate torch's boxing templates there,
// shared code that the linker may take from an AVX level).
const Kernels& active_kernels();

}  // namespace mptk::cpu

// Run-time choice of the CPU kernels' ISA level (see cpu/kernels.h).
//
// The levels, lowest first; a level runs on a CPU that has every instruction set it names:
//   default       x86-64 baseline (SSE2), or whatever the compiler targets on other CPUs
//   avx2          AVX2, FMA, F16C
//   avx512        AVX-512 F/BW/VL/DQ (+ FMA, F16C)
//   avx512_bf16   avx512 + AVX512-VNNI (int8 GEMMs on vpdpbusd) + AVX512-BF16 (bf16 GEMMs and
//                 attention tiles on vdpbf16ps)
// When _C loads, the highest level built that this CPU runs is used. mptkernels/_loader.py
// then applies MPTK_CPU_ISA (a cap) through mptkernels_isa::cpu_isa; mptkernels.cpu_isa() calls
// it too. A cap above what the CPU runs is lowered to what it runs, so no level can be chosen
// that would stop on an illegal instruction.
#include <torch/library.h>

#include <array>
#include <atomic>
#include <string>
#include <vector>

#include "cpu/kernels.h"

// each level's fillers, defined by the kernel files compiled for that level (CMakeLists.txt)
#define MPTK_DECLARE_FILLERS(L)                                                                \
  namespace mptk::cpu::L {                                                                     \
  void add_layer_norm(Kernels&);                                                               \
  void add_rotary(Kernels&);                                                                   \
  void add_attention(Kernels&);                                                                \
  void add_linear(Kernels&);                                                                   \
  void add_quantize(Kernels&);                                                                 \
  void add_int8_linear(Kernels&);                                                              \
  void add_weight_only(Kernels&);                                                              \
  void add_glu(Kernels&);                                                                      \
  void add_cross_entropy(Kernels&);                                                            \
  }
MPTK_DECLARE_FILLERS(DEFAULT)
#ifdef MPTK_CPU_X86_LEVELS
MPTK_DECLARE_FILLERS(AVX2)
MPTK_DECLARE_FILLERS(AVX512)
MPTK_DECLARE_FILLERS(AVX512_BF16)
#endif

namespace mptk::cpu {
namespace {

enum Level { kDefault, kAvx2, kAvx512, kAvx512Bf16, kNumLevels };
constexpr std::array<const char*, kNumLevels> kNames = {"default", "avx2", "avx512", "avx512_bf16"};
#ifdef MPTK_CPU_X86_LEVELS
constexpr int kBuilt = kNumLevels;
#else
constexpr int kBuilt = 1;  // not x86-64: the default level only
#endif

// the norms, rotary and the GLUs use nothing of VNNI or BF16: their avx512 build serves
// avx512_bf16 too (CMakeLists.txt compiles them for the three lower levels only)
#define MPTK_FILL(NORMS, GEMMS)   \
  NORMS::add_layer_norm(k);       \
  NORMS::add_rotary(k);           \
  GEMMS::add_attention(k);        \
  GEMMS::add_linear(k);           \
  GEMMS::add_quantize(k);         \
  GEMMS::add_int8_linear(k);      \
  GEMMS::add_weight_only(k);      \
  NORMS::add_glu(k);              \
  NORMS::add_cross_entropy(k)  /* cross_entropy: at::vec rows + ATen GEMMs, no VNNI/BF16 of its own */

// the highest level this CPU (and its OS: libgcc checks the saved register state) runs
Level cpu_level() {
#ifdef MPTK_CPU_X86_LEVELS
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                    __builtin_cpu_supports("f16c");
  const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  if (avx512 && __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512bf16")) return kAvx512Bf16;
  if (avx512) return kAvx512;
  if (avx2) return kAvx2;
#endif
  return kDefault;
}

// The tables of the levels this CPU runs; a level's filler is code of that level (its
// compiler may store the pointers with that level's vector instructions), so the levels above
// are never touched.
std::array<Kernels, kNumLevels> make_tables(Level cpu) {
  std::array<Kernels, kNumLevels> tables{};
  for (int l = 0; l <= cpu; ++l) {
    Kernels& k = tables[l];
    switch (l) {
      case kDefault: MPTK_FILL(DEFAULT, DEFAULT); break;
#ifdef MPTK_CPU_X86_LEVELS
      case kAvx2: MPTK_FILL(AVX2, AVX2); break;
      case kAvx512: MPTK_FILL(AVX512, AVX512); break;
      case kAvx512Bf16: MPTK_FILL(AVX512, AVX512_BF16); break;
#endif
    }
  }
  return tables;
}

const Level kCpuLevel = cpu_level();
const std::array<Kernels, kNumLevels> kTables = make_tables(kCpuLevel);
std::atomic<int> g_level{kCpuLevel};

// mptkernels_isa::cpu_isa(cap): with a cap ("auto" = none), use the highest level <= cap that
// this CPU runs; returns [level in use, highest level this CPU runs].
std::vector<std::string> cpu_isa(std::optional<std::string> cap) {
  if (cap) {
    int want = -1;
    if (*cap == "auto") want = kNumLevels - 1;
    for (int l = 0; l < kBuilt; ++l)
      if (*cap == kNames[l]) want = l;
    if (want < 0) {
      std::string names = "auto";
      for (int l = 0; l < kBuilt; ++l) names += std::string(", ") + kNames[l];
      TORCH_CHECK(false, "CPU ISA level must be one of ", names, "; got '", *cap, "'");
    }
    g_level.store(std::min<int>(want, kCpuLevel));
  }
  return {kNames[g_level.load()], kNames[kCpuLevel]};
}

// The kernel registered for op `Entry`: calls that entry of the table in use.
template <auto Entry>
struct Forward;
template <typename R, typename... A, R (*Kernels::*Entry)(A...)>
struct Forward<Entry> {
  static R call(A... a) { return (kTables[g_level.load(std::memory_order_relaxed)].*Entry)(std::forward<A>(a)...); }
};

}  // namespace

const Kernels& active_kernels() { return kTables[g_level.load(std::memory_order_relaxed)]; }
}  // namespace mptk::cpu

TORCH_LIBRARY(mptkernels_isa, m) { m.def("cpu_isa(str? cap=None) -> str[]", &mptk::cpu::cpu_isa); }

#define MPTK_IMPL(op) m.impl(#op, &mptk::cpu::Forward<&mptk::cpu::Kernels::op>::call)
TORCH_LIBRARY_IMPL(mptkernels_cpu, CPU, m) {
  MPTK_IMPL(layer_norm_fwd);
  MPTK_IMPL(layer_norm_bwd);
  MPTK_IMPL(apply_rotary);
  MPTK_IMPL(attention_fwd);
  MPTK_IMPL(attention_bwd);
  MPTK_IMPL(attention_varlen_fwd);
  MPTK_IMPL(attention_varlen_bwd);
  MPTK_IMPL(attention_with_kvcache);
  MPTK_IMPL(linear_fwd);
  MPTK_IMPL(linear_bwd);
  MPTK_IMPL(quantize_rowwise);
  MPTK_IMPL(int8_mm);
  MPTK_IMPL(int8_linear);
  MPTK_IMPL(weight_only_int8_linear);
  MPTK_IMPL(glu_fwd);
  MPTK_IMPL(glu_bwd);
  // cross_entropy family
  MPTK_IMPL(linear_cross_entropy_fwd);
  MPTK_IMPL(linear_cross_entropy_bwd);
}

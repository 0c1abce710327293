// Vector loads/stores of any supported dtype as accumulation-type vectors, for the CPU
// kernels. A "chunk" is two Vectorized<acc_t> (kChunk elements): that is exactly one
// Vectorized<BFloat16/Half>, so reduced types convert in whole registers, no partial stores.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/OpMathType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>
#endif

// Inlining that the CPU kernels pin, where GCC's choice would otherwise depend on how much
// else the file holds (its inline-unit-growth budget): a per-vector helper always inlined;
// everything a short per-row function calls inlined into it (FLATTEN: at::vec's erf and exp
// too); a tile whose loop is the whole work kept out of line (its own registers). See
// csrc/cpu/gemm/gemm.h.
#define MPTK_ALWAYS_INLINE inline __attribute__((always_inline))
#define MPTK_FLATTEN __attribute__((flatten))
#define MPTK_NOINLINE __attribute__((noinline))

namespace mptk::cpu::CPU_CAPABILITY {

using at::vec::Vectorized;

template <typename T>
using acc_type_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

// T: storage dtype; A: accumulation dtype (float, or double for double)
template <typename T, typename A>
struct ChunkIO {
  using V = Vectorized<A>;
  static constexpr int kChunk = 2 * V::size();
  // bytes of one vector register; a streamed store needs its address aligned to it
  // (a chunk of a reduced type is one register, of float/double two)
  static constexpr uintptr_t kRegBytes = sizeof(A) * V::size();

  static inline void load(const T* p, V& lo, V& hi) {
    if constexpr (std::is_same_v<T, A>) {
      lo = V::loadu(p);
      hi = V::loadu(p + V::size());
    } else if constexpr (std::is_same_v<A, float>) {  // reduced -> float
      static_assert(Vectorized<T>::size() == kChunk);
      std::tie(lo, hi) = at::vec::convert_to_float<T>(Vectorized<T>::loadu(p));
    } else {  // float -> double (a float32 weight under a float64 input)
      for (int i = 0; i < kChunk; ++i) buf()[i] = static_cast<A>(p[i]);
      lo = V::loadu(buf());
      hi = V::loadu(buf() + V::size());
    }
  }

  static inline void store(T* p, const V& lo, const V& hi) {
    if constexpr (std::is_same_v<T, A>) {
      lo.store(p);
      hi.store(p + V::size());
    } else {
      static_assert(std::is_same_v<A, float>, "only float accumulators round to reduced types");
      at::vec::convert_from_float<T>(lo, hi).store(p);
    }
  }

  // Store bypassing the cache (non-temporal) when `stream` and the address allows. For
  // outputs far larger than the cache this skips the read-for-ownership of every written
  // line, a third of a memory-bound kernel's traffic. Callers _mm_sfence() (stream_fence)
  // before the data is read by another thread.
  static inline void store(T* p, const V& lo, const V& hi, bool stream) {
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
    if (stream && reinterpret_cast<uintptr_t>(p) % kRegBytes == 0) {
      if constexpr (std::is_same_v<T, A>) {
        stream_reg(p, lo);
        stream_reg(p + V::size(), hi);
      } else {
        stream_reg(p, at::vec::convert_from_float<T>(lo, hi));
      }
      return;
    }
#endif
    store(p, lo, hi);
  }

  // store, then replace lo/hi by the stored (rounded) values
  static inline void store_rounded(T* p, V& lo, V& hi, bool stream) {
    if constexpr (std::is_same_v<T, A>) {
      store(p, lo, hi, stream);
    } else {
      auto packed = at::vec::convert_from_float<T>(lo, hi);
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
      if (stream && reinterpret_cast<uintptr_t>(p) % kRegBytes == 0) {
        stream_reg(p, packed);
      } else {
        packed.store(p);
      }
#else
      packed.store(p);
#endif
      std::tie(lo, hi) = at::vec::convert_to_float<T>(packed);
    }
  }

  // round to T and back: what a value becomes once stored in T
  static inline void round(V& lo, V& hi) {
    if constexpr (!std::is_same_v<T, A>) {
      std::tie(lo, hi) = at::vec::convert_to_float<T>(at::vec::convert_from_float<T>(lo, hi));
    }
  }

 private:
#if defined(CPU_CAPABILITY_AVX512)
  template <typename R>
  static inline void stream_reg(void* p, const R& r) {
    if constexpr (std::is_same_v<R, Vectorized<float>>) _mm512_stream_ps(static_cast<float*>(p), r);
    else if constexpr (std::is_same_v<R, Vectorized<double>>) _mm512_stream_pd(static_cast<double*>(p), r);
    else _mm512_stream_si512(static_cast<__m512i*>(p), r);
  }
#elif defined(CPU_CAPABILITY_AVX2)
  template <typename R>
  static inline void stream_reg(void* p, const R& r) {
    if constexpr (std::is_same_v<R, Vectorized<float>>) _mm256_stream_ps(static_cast<float*>(p), r);
    else if constexpr (std::is_same_v<R, Vectorized<double>>) _mm256_stream_pd(static_cast<double*>(p), r);
    else _mm256_stream_si256(static_cast<__m256i*>(p), r);
  }
#endif
  static inline A* buf() {
    alignas(64) static thread_local A b[kChunk];
    return b;
  }
};

// make streamed stores visible before the parallel region ends
inline void stream_fence() {
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
  _mm_sfence();
#endif
}

// outputs bigger than this go around the cache (about an L3 slice: smaller ones are
// likely read again soon, by the next op, from the cache)
constexpr int64_t kStreamBytes = 8 << 20;

template <typename T, typename A>
inline A round_to(A v) {
  return static_cast<A>(static_cast<T>(v));
}

#if defined(CPU_CAPABILITY_AVX512)
// (used by the GEMM's panel packing and the attention backward's transposed tiles)
// r[i] (row i of a 16x16 matrix of 32-bit words) -> r[i] = column i
inline void transpose_16x16_words(__m512i r[16]) {
  __m512i t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  for (int i = 0; i < 8; ++i) {  // 128-bit lanes: first pairs of 4 rows, then of 8
    const int j = (i / 4) * 8 + i % 4;
    t[j] = _mm512_shuffle_i32x4(r[j], r[j + 4], 0x88);
    t[j + 4] = _mm512_shuffle_i32x4(r[j], r[j + 4], 0xdd);
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0x88);
    r[i + 8] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0xdd);
    r[i + 4] = _mm512_shuffle_i32x4(t[i + 4], t[i + 12], 0x88);
    r[i + 12] = _mm512_shuffle_i32x4(t[i + 4], t[i + 12], 0xdd);
  }
}
#endif

#if defined(CPU_CAPABILITY_AVX512) && defined(__AVX512BF16__)
// The avx512_bf16 level (CMakeLists.txt compiles the GEMM and attention files with -mavx512bf16)
#define MPTK_BF16_PAIRS 1
// The multiply-add of the GEMM tiles (csrc/cpu/gemm/, attention.cpp) on bf16 operands: a
// k-step is a 32-bit word holding two bf16 values of consecutive k; A's word is broadcast,
// and vdpbf16ps adds both exact products into fp32 lanes (bf16 subnormals read as zero).
struct Bf16Pairs {
  using E = c10::BFloat16;
  static constexpr int64_t kPerWord = 2;
  static inline __m512 bcast(const c10::BFloat16* a) {
    int32_t word;
    std::memcpy(&word, a, 4);
    return _mm512_castsi512_ps(_mm512_set1_epi32(word));
  }
  static inline __m512 madd(__m512 acc, __m512 a, __m512 b) {
    return _mm512_dpbf16_ps(acc, (__m512bh)a, (__m512bh)b);
  }
};
#endif

}  // namespace mptk::cpu::CPU_CAPABILITY

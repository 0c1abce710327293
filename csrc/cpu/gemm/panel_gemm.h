// The GEMM family's panel GEMM (see gemm.h), AVX-512 only: C = A @ op(B) on 64-column
// panels of B packed word-major, in fp32 (FMA) or, at the avx512_bf16 level, on
// bf16 pairs (vdpbf16ps), with an optional epilogue on each finished block; a split-K variant
// for K far larger than M and N. Also the 16x16-transposing panel packer the int8 VNNI panels
// share (int8_gemm.h). Templates and inline functions, so the tiles inline into the callers
// (linear.cpp).
#pragma once

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "cpu/gemm/gemm.h"

namespace mptk::cpu::CPU_CAPABILITY {
namespace {  // internal to each including file: see gemm.h

#if defined(CPU_CAPABILITY_AVX512)

// A panel of 64 rows of a row-major matrix of 4-byte words (fp32 values, or 4 int8 k-steps)
// -> P[w][64], word-major, for words [0, words) (a multiple of 16), 16x16 transposes at a
// time. src: row 0, stride: bytes per row; rows past `rows` read as zeros.
inline void pack_words_x64(const char* src,  // [rows, stride bytes]
                           int64_t stride, int64_t rows, int64_t words,
                           char* P) {  // [words, 64] 4-byte words
  for (int g = 0; g < 4; ++g) {
    for (int64_t w = 0; w < words; w += 16) {
      __m512i r[16];
      for (int i = 0; i < 16; ++i)
        r[i] = g * 16 + i < rows ? _mm512_loadu_si512(src + (g * 16 + i) * stride + w * 4) : _mm512_setzero_si512();
      transpose_16x16_words(r);
      for (int i = 0; i < 16; ++i) _mm512_storeu_si512(P + ((w + i) * 64 + g * 16) * 4, r[i]);
    }
  }
}

// ---------------------------------------------------------------- panel GEMM (AVX-512): fp32, bf16
// MKL's sgemm, which at::mm calls, runs its AVX2 code on AMD CPUs (0.2 TFLOP/s on the 2-core
// EPYC here); this kernel reaches about twice that. The design of the int8 panels (int8_gemm.h):
// each task packs 64 columns of B (a panel) word-major as P[w][64] (a word: one fp32 k-step,
// or two bf16 ones for vdpbf16ps), and a 6 x 64 tile of C stays in 24 registers: per word, 4
// vector loads of the panel and 6 broadcasts of A feed 24 multiply-adds. K goes in blocks of
// kSgemmKc words (the panel's block stays in L1); C itself holds the partial sums between
// blocks. Rows of A go in chunks (several tasks per panel when N is small). A K far larger
// than M and N takes sgemm_split_k instead.
constexpr int64_t kSgemmPanel = 64;    // pack_words_x64's width
constexpr int kSgemmMR = 6;
constexpr int64_t kSgemmKc = 128;      // words per block: 32 KB of panel (256 and 512 measured no faster)
constexpr int64_t kSgemmMChunk = 192;
constexpr int64_t kSgemmBResident = 1 << 20;  // packed B up to this many bytes: chunk-major (L2 is 1 MB here)
constexpr int64_t kSgemmMinRows = 16;  // fewer rows: dot tiles or at::mm (packing B costs more than it saves)
constexpr int64_t kSplitKRatio = 16;   // K words >= this x max(M, N): sgemm_split_k
constexpr int64_t kSplitKParts = 8;    // its K ranges (threads share them out)

// Word-major panels: P[w][0..64) holds word w (a k-step: one fp32 value, or a pair of bf16
// values for vdpbf16ps) of the 64 output columns [n0, n0 + 64), zeros past N.
// From a (N, W-word) row-major B (a weight: op(B) = B^T), transposed 16x16 at a time:
// (ldw: words per row of B; the panel takes words [0, W) from B, which may point into a row)
inline void pack_panel_nk(const char* B,  // [N, ldw] 4-byte words
                          int64_t ldw, int64_t N, int64_t W, int64_t n0,
                          float* P) {  // [W, 64]
  const int64_t cols = std::min(kSgemmPanel, N - n0), W16 = W / 16 * 16;
  pack_words_x64(B + n0 * ldw * 4, ldw * 4, cols, W16, reinterpret_cast<char*>(P));
  for (int64_t w = W16; w < W; ++w)
    for (int64_t j = 0; j < kSgemmPanel; ++j) {
      float word = 0.f;
      if (j < cols) std::memcpy(&word, B + ((n0 + j) * ldw + w) * 4, 4);
      P[w * kSgemmPanel + j] = word;
    }
}

// from a (K, N) row-major fp32 B (op(B) = B): a copy of 64 columns per row
inline void pack_panel_kn(const float* B,  // [K, N]
                          int64_t N, int64_t K, int64_t n0,
                          float* P) {  // [K, 64]
  const int64_t cols = std::min(kSgemmPanel, N - n0);
  for (int64_t k = 0; k < K; ++k) {
    std::memcpy(P + k * kSgemmPanel, B + k * N + n0, cols * sizeof(float));
    std::fill(P + k * kSgemmPanel + cols, P + (k + 1) * kSgemmPanel, 0.f);
  }
}

// The multiply-add of a panel GEMM, per element type: fp32 (one k per word, FMA) and, where
// the build has AVX512-BF16, bf16 (Bf16Pairs in common/cpu_vec.h: two k per word, vdpbf16ps,
// products exact in fp32, fp32 accumulation, so a bf16 linear is one rounding at the end,
// like the fp32 path).
struct F32Dot {
  using E = float;
  static constexpr int64_t kPerWord = 1;
  static __m512 bcast(const float* a) { return _mm512_set1_ps(*a); }
  static __m512 madd(__m512 acc, __m512 a, __m512 b) { return _mm512_fmadd_ps(a, b, acc); }
};

// C rows [0, MR) x 64 columns (only those `mask` keeps are stored) += A rows . P over words
// [w0, w1) (A's row stride lda in elements); the first block starts from zero instead of C
template <int MR, typename Dot>
inline void sgemm_tile(const typename Dot::E* A,  // [MR, lda]
                       int64_t lda,
                       const float* P,  // [>= w1, 64] a packed panel
                       int64_t w0, int64_t w1,
                       float* C,  // [MR, ldc], 64 columns
                       int64_t ldc,
                       const __mmask16 mask[4],  // [4] the columns kept, 16 a vector
                       bool first) {
  __m512 acc[MR][4];
  for (int r = 0; r < MR; ++r)
    for (int c = 0; c < 4; ++c)
      acc[r][c] = first ? _mm512_setzero_ps() : _mm512_maskz_loadu_ps(mask[c], C + r * ldc + c * 16);
  for (int64_t w = w0; w < w1; ++w) {
    const float* p = P + w * kSgemmPanel;
    const __m512 b0 = _mm512_loadu_ps(p), b1 = _mm512_loadu_ps(p + 16), b2 = _mm512_loadu_ps(p + 32),
                 b3 = _mm512_loadu_ps(p + 48);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const __m512 a = Dot::bcast(A + r * lda + w * Dot::kPerWord);
      acc[r][0] = Dot::madd(acc[r][0], a, b0);
      acc[r][1] = Dot::madd(acc[r][1], a, b1);
      acc[r][2] = Dot::madd(acc[r][2], a, b2);
      acc[r][3] = Dot::madd(acc[r][3], a, b3);
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int c = 0; c < 4; ++c) _mm512_mask_storeu_ps(C + r * ldc + c * 16, mask[c], acc[r][c]);
}

// C (M, N) fp32 = A (M, K) @ op(B), A and B of Dot's element type and contiguous; op(B) =
// B^T for a (N, K) B (b_nk), else (fp32 only) B (K, N). K a whole number of words.
// With an epilogue epi(m0, m1, n0, cols, c, ldc) instead of a C, each finished block of the
// product (rows [m0, m1), columns [n0, n0 + cols), c at its first element, row stride ldc) is
// handed to epi while in cache: the sums live in a per-task block of kSgemmMChunk x 64, and
// no fp32 (M, N) is written to memory and read back.
template <typename Dot>
void sgemm_split_k(const typename Dot::E* A,  // [M, K]
                   const typename Dot::E* B,  // [N, K] when b_nk, else [K, N]
                   bool b_nk,
                   float* C,  // [M, N]
                   int64_t M, int64_t N, int64_t K);

template <typename Dot, typename Epi = std::nullptr_t>
void sgemm(const typename Dot::E* A,  // [M, K]
           const typename Dot::E* B,  // [N, K] when b_nk, else [K, N]
           bool b_nk,
           float* C,  // [M, N], or null with an epi
           int64_t M, int64_t N, int64_t K, const Epi& epi = nullptr) {
  constexpr bool kEpi = !std::is_same_v<Epi, std::nullptr_t>;
  const int64_t W = K / Dot::kPerWord;
  if (W >= kSplitKRatio * std::max(M, N)) {
    if constexpr (kEpi) {  // rare shapes: the whole product first, then the epilogue by rows
      at::Tensor tmp = at::empty({M, N}, at::TensorOptions().dtype(at::kFloat));
      float* c = tmp.mutable_data_ptr<float>();
      sgemm_split_k<Dot>(A, B, b_nk, c, M, N, K);
      at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) { epi(m0, m1, 0, N, c + m0 * N, N); });
    } else {
      sgemm_split_k<Dot>(A, B, b_nk, C, M, N, K);
    }
    return;
  }
  const int64_t n_panels = (N + kSgemmPanel - 1) / kSgemmPanel, n_chunks = (M + kSgemmMChunk - 1) / kSgemmMChunk;
  // Panel-major tasks: a thread packs a panel once for all the chunks of it that it runs, and
  // streams A once per panel. When B is small and A tall (an LM head's dw: A = dpre^T, 50k
  // rows), chunk-major instead: each thread packs every panel once (all of them stay in L2)
  // and reads each chunk of A from memory once, for all the panels.
  const bool a_major = n_chunks > n_panels && W * n_panels * kSgemmPanel * 4 <= kSgemmBResident;
  at::parallel_for(0, n_panels * n_chunks, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> P((a_major ? n_panels : 1) * W * kSgemmPanel);
    std::vector<float> block(kEpi ? kSgemmMChunk * kSgemmPanel : 0);
    std::vector<char> packed(a_major ? n_panels : 1, 0);
    int64_t last = -1;  // panel-major: the panel P holds
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t panel = a_major ? t % n_panels : t / n_chunks, chunk = a_major ? t / n_panels : t % n_chunks;
      const int64_t n0 = panel * kSgemmPanel, cols = std::min(kSgemmPanel, N - n0);
      float* Pp = P.data() + (a_major ? panel * W * kSgemmPanel : 0);
      if (a_major ? !packed[panel] : panel != last) {
        if (b_nk) {
          pack_panel_nk(reinterpret_cast<const char*>(B), W, N, W, n0, Pp);
        } else {
          if constexpr (std::is_same_v<typename Dot::E, float>) pack_panel_kn(B, N, K, n0, Pp);
        }
        if (a_major) packed[panel] = 1;
        last = panel;
      }
      __mmask16 mask[4];
      for (int c = 0; c < 4; ++c) {
        const int64_t valid = std::clamp<int64_t>(cols - c * 16, 0, 16);
        mask[c] = static_cast<__mmask16>((1u << valid) - 1u);
      }
      const int64_t mb = chunk * kSgemmMChunk, me = std::min(M, mb + kSgemmMChunk);
      float* Cb = kEpi ? block.data() : C + mb * N + n0;  // row mb, column n0
      const int64_t ldc = kEpi ? kSgemmPanel : N;
      for (int64_t w0 = 0; w0 < W; w0 += kSgemmKc) {
        const int64_t w1 = std::min(W, w0 + kSgemmKc);
        int64_t m = mb;
        for (; m + kSgemmMR <= me; m += kSgemmMR)
          sgemm_tile<kSgemmMR, Dot>(A + m * K, K, Pp, w0, w1, Cb + (m - mb) * ldc, ldc, mask, w0 == 0);
        for (; m < me; ++m) sgemm_tile<1, Dot>(A + m * K, K, Pp, w0, w1, Cb + (m - mb) * ldc, ldc, mask, w0 == 0);
      }
      if constexpr (kEpi) epi(mb, me, n0, cols, block.data(), kSgemmPanel);
    }
  });
}

// K far larger than M and N (an LM head's dx: K = vocab): the tasks above would each stream
// their rows of A once per panel. Here K is cut into kSplitKParts ranges, shared out over the
// threads; a range is walked a block at a time: every panel's block is packed (N x kSgemmKc
// words, in L2), then each 6-row tile of A (in L1) meets every panel, so A is read once. Each
// range sums into its own (M, N) buffer (the first into C), added at the end in a fixed order:
// the result does not depend on the thread count.
template <typename Dot>
void sgemm_split_k(const typename Dot::E* A,  // [M, K]
                   const typename Dot::E* B,  // [N, K] when b_nk, else [K, N]
                   bool b_nk,
                   float* C,  // [M, N]
                   int64_t M, int64_t N, int64_t K) {
  const int64_t W = K / Dot::kPerWord, n_panels = (N + kSgemmPanel - 1) / kSgemmPanel;
  const int64_t n_blocks = (W + kSgemmKc - 1) / kSgemmKc;
  // a fixed number of parts, not one per thread: the sums do not depend on the thread count
  const int64_t parts = std::min<int64_t>(kSplitKParts, n_blocks);
  // uninitialised: each range's first block writes its buffer whole
  const at::Tensor extra_t = at::empty({(parts - 1) * M * N}, at::TensorOptions().dtype(at::kFloat));
  float* extra = extra_t.mutable_data_ptr<float>();
  at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
    std::vector<float> P(n_panels * kSgemmKc * kSgemmPanel);
    for (int64_t part = p0; part < p1; ++part) {
      float* Cp = part == 0 ? C : extra + (part - 1) * M * N;
      const int64_t b_begin = n_blocks * part / parts, b_end = n_blocks * (part + 1) / parts;
      for (int64_t blk = b_begin; blk < b_end; ++blk) {
        const int64_t w0 = blk * kSgemmKc, nw = std::min(kSgemmKc, W - w0);
        for (int64_t panel = 0; panel < n_panels; ++panel) {
          float* Pp = P.data() + panel * kSgemmKc * kSgemmPanel;
          if (b_nk) {
            pack_panel_nk(reinterpret_cast<const char*>(B) + w0 * 4, W, N, nw, panel * kSgemmPanel, Pp);
          } else {
            if constexpr (std::is_same_v<typename Dot::E, float>) pack_panel_kn(B + w0 * N, N, nw, panel * kSgemmPanel, Pp);
          }
        }
        const bool first = blk == b_begin;
        auto tiles = [&](auto mr, int64_t m) {
          for (int64_t panel = 0; panel < n_panels; ++panel) {
            const int64_t n0 = panel * kSgemmPanel, cols = std::min(kSgemmPanel, N - n0);
            __mmask16 mask[4];
            for (int c = 0; c < 4; ++c)
              mask[c] = static_cast<__mmask16>((1u << std::clamp<int64_t>(cols - c * 16, 0, 16)) - 1u);
            // the panel block starts at word 0 of Pp: shift A instead
            sgemm_tile<decltype(mr)::value, Dot>(A + m * K + w0 * Dot::kPerWord, K,
                                                 P.data() + panel * kSgemmKc * kSgemmPanel, 0, nw, Cp + m * N + n0, N,
                                                 mask, first);
          }
        };
        int64_t m = 0;
        for (; m + kSgemmMR <= M; m += kSgemmMR) tiles(std::integral_constant<int, kSgemmMR>{}, m);
        for (; m < M; ++m) tiles(std::integral_constant<int, 1>{}, m);
      }
    }
  });
  // C += the other parts, row-parallel, parts in order
  at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
    for (int64_t part = 1; part < parts; ++part) {
      const float* src = extra + (part - 1) * M * N;
      for (int64_t i = m0 * N; i < m1 * N; ++i) C[i] += src[i];
    }
  });
}
#endif  // CPU_CAPABILITY_AVX512

}  // namespace
}  // namespace mptk::cpu::CPU_CAPABILITY

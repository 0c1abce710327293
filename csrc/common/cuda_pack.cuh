// Vectorised global-memory access for the CUDA kernels: V elements of U moved as one load or
// store (16 bytes at most per access), and a register barrier for cached packs.
#pragma once

#include <cstdint>

namespace mptk::cuda {

// V elements moved as one access, aligned to its size but at most 16 bytes (so a 32-byte
// pack, e.g. 8 fp32 values beside 8 half ones, becomes two 16-byte accesses)
template <typename U, int V>
struct alignas(sizeof(U) * V > 16 ? 16 : sizeof(U) * V) Pack {
  U v[V];
};

template <typename U, int V>
__device__ __forceinline__ Pack<U, V> ld(const U* p) {
  return *reinterpret_cast<const Pack<U, V>*>(p);
}

template <typename U, int V>
__device__ __forceinline__ void st(U* p, const Pack<U, V>& v) {
  *reinterpret_cast<Pack<U, V>*>(p) = v;
}

// Hides a cached pack's value from the optimiser: a 16-bit row cached in registers and
// widened to fp32 for a first walk would otherwise keep the fp32 copy alive (twice the
// registers) until a later walk; with the barrier each walk widens again.
template <typename U, int V>
__device__ __forceinline__ void opaque(Pack<U, V>& p) {
  if constexpr (sizeof(U) == 2 && V % 2 == 0) {
    uint32_t* w = reinterpret_cast<uint32_t*>(&p);
#pragma unroll
    for (int i = 0; i < V / 2; ++i) asm volatile("" : "+r"(w[i]));
  }
}

}  // namespace mptk::cuda

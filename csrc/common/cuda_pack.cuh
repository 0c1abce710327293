// Device helpers shared by the CUDA kernels: vectorised global-memory access (V elements of U
// moved as one load or store, 16 bytes at most per access), a register barrier for cached
// packs, and reductions over the threads of a row.
#pragma once

#include <cstdint>
#include <type_traits>

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

// ---- Reductions over the threads of a row ----------------------------------------------
// Sum and Max combine float, unsigned and float2 (two sums with one barrier).

struct Sum {
  __device__ __forceinline__ float operator()(float a, float b) const { return a + b; }
  __device__ __forceinline__ float2 operator()(float2 a, float2 b) const {
    return make_float2(a.x + b.x, a.y + b.y);
  }
};

struct Max {
  __device__ __forceinline__ unsigned operator()(unsigned a, unsigned b) const { return max(a, b); }
};

__device__ __forceinline__ float shfl_xor(float v, int o) { return __shfl_xor_sync(0xffffffffu, v, o); }
__device__ __forceinline__ unsigned shfl_xor(unsigned v, int o) { return __shfl_xor_sync(0xffffffffu, v, o); }
__device__ __forceinline__ float2 shfl_xor(float2 v, int o) {
  return make_float2(shfl_xor(v.x, o), shfl_xor(v.y, o));
}

// over the 32 lanes of a warp, returned to all of them
template <typename T, typename Op>
__device__ __forceinline__ T warp_reduce(T v, Op op) {
#if __CUDA_ARCH__ >= 800
  if constexpr (std::is_same_v<T, unsigned> && std::is_same_v<Op, Max>) {
    return __reduce_max_sync(0xffffffffu, v);  // one instruction instead of five shuffles
  } else
#endif
  {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = op(v, shfl_xor(v, o));
    return v;
  }
}

// Over the threads of a row (threadIdx.x), returned to every one of them; identity is Op's
// (0 for Sum and for Max of unsigned). The host keeps blockDim.x a multiple of 32 (full
// warps for the shuffles) and uses blockDim.y > 1 only with blockDim.x == 32, where a warp
// is the whole row and there is no __syncthreads (so threads of rows past M may leave
// early). buf must not be reused by the next reduction until a later __syncthreads:
// callers alternate buffers.
template <typename T, typename Op>
__device__ __forceinline__ T row_reduce(T v, T* buf /* [32] */, T identity, Op op) {
  v = warp_reduce(v, op);
  if (blockDim.x == 32) return v;
  const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5;
  if (lane == 0) buf[wid] = v;
  __syncthreads();
  return warp_reduce(lane < static_cast<int>(blockDim.x >> 5) ? buf[lane] : identity, op);
}

}  // namespace mptk::cuda

// Host-side helpers shared by the CUDA launchers (csrc/cuda/*.cu): grid arithmetic, the
// 16-byte alignment test of the vectorised paths, and the block shape of the row kernels
// that cache their row in registers (layer_norm's forward, quantize_rowwise).
#pragma once

#include <cstdint>
#include <type_traits>

namespace mptk::cuda {

// a / b rounded up (a >= 0, b > 0), in the wider of the two types
template <typename A, typename B>
constexpr std::common_type_t<A, B> ceil_div(A a, B b) {
  return (a + b - 1) / b;
}

// a rounded up to whole warps
template <typename A>
constexpr A round_up32(A a) {
  return ceil_div(a, A{32}) * 32;
}

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// The block of a kernel that keeps a row's vectors in registers, nv per thread: threads
// blockDim.x = tpr (whole warps) per row, rpb rows per block.
struct RowBlock {
  int tpr;  // threads per row
  int nv;   // vectors cached per thread: 4, 16, or 0 (none: the row is re-read from L2)
  int rpb;  // rows per block
};

// For rows of nvec vectors: four cached vectors per thread (16 registers, 1024-thread blocks
// allowed) cover most rows with enough loads in flight per thread and few idle lanes on
// short rows; longer rows take sixteen (64 registers, so at most 512 threads) when
// allow_nv16; longer still (or without allow_nv16) 1024 threads that re-read the row. A row
// of one warp shares its block with three more rows.
inline RowBlock row_block(int64_t nvec, bool allow_nv16 = true) {
  RowBlock rb{static_cast<int>(round_up32(ceil_div(nvec, 4))), 4, 1};
  if (rb.tpr > 1024) {
    rb.tpr = static_cast<int>(round_up32(ceil_div(nvec, 16)));
    rb.nv = 16;
    if (rb.tpr > 512 || !allow_nv16) {
      rb.tpr = 1024;
      rb.nv = 0;
    }
  }
  rb.rpb = rb.tpr == 32 ? 4 : 1;  // warp-per-row blocks take several rows
  return rb;
}

}  // namespace mptk::cuda

// Internal to the kernel sources: declarations of one instruction-set variant.
//
// Every kernel source is compiled once per instruction set (see CMakeLists.txt), each time with
// LMLAB_ISA_NS naming the variant (avx512, avx2, neon, portable) and that variant's compiler flags. All code
// in a kernel source lives in namespace lmlab::LMLAB_ISA_NS, so the variants never share a symbol: an
// AVX-512 copy of a function can never be linked into the portable path. For the same reason kernel
// sources use no standard-library templates that could be emitted out of line (containers,
// algorithms); they allocate scratch with aligned_alloc/free.
#pragma once

#include "kernels.h"

#ifndef LMLAB_ISA_NS
#error "LMLAB_ISA_NS must name the instruction-set variant being compiled"
#endif

namespace lmlab {
namespace LMLAB_ISA_NS {

#define LMLAB_KERNEL_DECLARE(ret, name, params) ret name params;
LMLAB_KERNEL_LIST(LMLAB_KERNEL_DECLARE)
#undef LMLAB_KERNEL_DECLARE

// General matrix product behind the linear layers (matmul); attention keeps its own head-sized tiles:
//   C (M, N) = alpha * op(A) (M, K) . op(B) (K, N)  [+ C if accumulate]
// with op(A)[m, k] = A[m * rsA + k * csA] and op(B)[k, n] = B[k * rsB + n * csB] (general strides
// express transposes), C row-major with leading dimension ldc. `parallel` spreads the output tiles over
// the OpenMP team (pass false when already inside a parallel region). Each C element is reduced over
// k in the same order whatever the thread count.
void gemm(idx_t M, idx_t N, idx_t K, float alpha, const float* A, idx_t rsA, idx_t csA,
          const float* B, idx_t rsB, idx_t csB, float* C, idx_t ldc, bool accumulate,
          bool parallel);

// Rows per chunk for reductions across rows (bias and layernorm weight gradients, embedding
// position gradients): a constant, so partial sums and their order do not depend on the thread count.
constexpr idx_t kRowChunk = 64;

}  // namespace LMLAB_ISA_NS

}  // namespace lmlab

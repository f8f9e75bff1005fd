// Internal to cpp/gemm.cpp and cpp/matmul.cpp: the parts of the matrix product that only matmul
// needs beyond the general gemm declared in isa.h.
#pragma once

#include "isa.h"

namespace lmlab {
namespace LMLAB_ISA_NS {

// gemm with the first write of each C row fused with a row vector: C (M, N) = bias (N) broadcast
// over rows + alpha * op(A) . op(B). Saves matmul_forward a second pass over its output; bias may be
// null (then it is gemm with accumulate = false). Thread-count independent like gemm.
void gemm_bias(idx_t M, idx_t N, idx_t K, float alpha, const float* A, idx_t rsA, idx_t csA,
               const float* B, idx_t rsB, idx_t csB, float* C, idx_t ldc, const float* bias,
               bool parallel);

// The plain triple loop: each C element reduced over k in ascending order. The oracle the tuned
// path is tested against, and its fallback when scratch memory cannot be had.
void gemm_reference(idx_t M, idx_t N, idx_t K, float alpha, const float* A, idx_t rsA, idx_t csA,
                    const float* B, idx_t rsB, idx_t csB, float* C, idx_t ldc, bool accumulate,
                    bool parallel);

}  // namespace LMLAB_ISA_NS
}  // namespace lmlab

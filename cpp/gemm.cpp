// gemm: the general matrix product behind matmul and attention.
// Reference implementation: a plain triple loop, parallel over rows of C, each element reduced over k
// in ascending order. It is the oracle the tuned path is tested against and the fallback.
#include "isa.h"

namespace lmlab {
namespace LMLAB_ISA_NS {

void gemm(idx_t M, idx_t N, idx_t K, float alpha, const float* A, idx_t rsA, idx_t csA,
          const float* B, idx_t rsB, idx_t csB, float* C, idx_t ldc, bool accumulate,
          bool parallel) {
#pragma omp parallel for schedule(static) if (parallel)
    for (idx_t m = 0; m < M; m++) {
        for (idx_t n = 0; n < N; n++) {
            float acc = 0.0f;
            for (idx_t k = 0; k < K; k++) acc += A[m * rsA + k * csA] * B[k * rsB + n * csB];
            float* c = &C[m * ldc + n];
            *c = accumulate ? *c + alpha * acc : alpha * acc;
        }
    }
}

}  // namespace LMLAB_ISA_NS
}  // namespace lmlab

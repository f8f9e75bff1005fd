// matmul: the linear layer, out = inp . weight^T + bias, and its backward.
// Shapes: inp (N, C), weight (OC, C), bias (OC), out (N, OC).
#include "isa.h"

namespace lmlab {
namespace LMLAB_ISA_NS {

void matmul_forward(float* out, const float* inp, const float* weight, const float* bias, idx_t N,
                    idx_t C, idx_t OC) {
    // out (N, OC) = inp (N, C) . weight^T: op(B)[k, o] = weight[o * C + k]
    gemm(N, OC, C, 1.0f, inp, C, 1, weight, 1, C, out, OC, false, true);
    if (bias != nullptr) {
#pragma omp parallel for schedule(static)
        for (idx_t n = 0; n < N; n++)
            for (idx_t o = 0; o < OC; o++) out[n * OC + o] += bias[o];
    }
}

void matmul_backward(float* dinp, float* dweight, float* dbias, const float* dout, const float* inp,
                     const float* weight, idx_t N, idx_t C, idx_t OC) {
    // dinp (N, C) += dout (N, OC) . weight (OC, C)
    if (dinp != nullptr) gemm(N, C, OC, 1.0f, dout, OC, 1, weight, C, 1, dinp, C, true, true);
    // dweight (OC, C) += dout^T (OC, N) . inp (N, C)
    if (dweight != nullptr) gemm(OC, C, N, 1.0f, dout, 1, OC, inp, C, 1, dweight, C, true, true);
    if (dbias != nullptr) {
        // Each output channel sums its column in chunk order, so the result is thread-count free.
#pragma omp parallel for schedule(static)
        for (idx_t o = 0; o < OC; o++) {
            float total = 0.0f;
            for (idx_t n0 = 0; n0 < N; n0 += kRowChunk) {
                float part = 0.0f;
                idx_t n1 = n0 + kRowChunk < N ? n0 + kRowChunk : N;
                for (idx_t n = n0; n < n1; n++) part += dout[n * OC + o];
                total += part;
            }
            dbias[o] += total;
        }
    }
}

}  // namespace LMLAB_ISA_NS
}  // namespace lmlab

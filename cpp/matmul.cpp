// matmul: the linear layer, out = inp . weight^T + bias, and its backward.
// Shapes: inp (N, C), weight (OC, C), bias (OC), out (N, OC); dout (N, OC).
// Both products go through gemm (cpp/gemm.h), which packs the transposes away.
#include "gemm.h"
#include "isa.h"

namespace lmlab {
namespace LMLAB_ISA_NS {

void matmul_forward(float* out, const float* inp, const float* weight, const float* bias, idx_t N,
                    idx_t C, idx_t OC, Precision precision) {
    // out (N, OC) = inp (N, C) . weight^T (C, OC). The bias is the init of each output tile, not a
    // second pass over out.
    gemm(precision, N, OC, C, 1.0f, Operand::rows(inp, C), Operand::transpose_of(weight, C),
         Output::with_bias(out, OC, bias), true);
}

namespace {

// Columns of dout per parallel task of the bias gradient: a few cache lines, so each task reads
// whole lines of every row.
constexpr idx_t kBiasColumns = 64;

// dbias (OC) += column sums of dout (N, OC). Each column is summed in fixed chunks of kRowChunk rows
// whose partial sums are added in chunk order; threads take disjoint column blocks, so the result
// does not depend on the thread count. Within a block, the rows run in the inner loop's vector lanes.
void bias_gradient(float* dbias, const float* dout, idx_t N, idx_t OC) {
    const idx_t blocks = (OC + kBiasColumns - 1) / kBiasColumns;
#pragma omp parallel for schedule(static) if (N * OC >= 65536)
    for (idx_t blk = 0; blk < blocks; blk++) {
        const idx_t o0 = blk * kBiasColumns;
        const idx_t width = OC - o0 < kBiasColumns ? OC - o0 : kBiasColumns;
        float total[kBiasColumns], part[kBiasColumns];
        for (idx_t j = 0; j < width; j++) total[j] = 0.0f;
        for (idx_t n0 = 0; n0 < N; n0 += kRowChunk) {
            const idx_t n1 = n0 + kRowChunk < N ? n0 + kRowChunk : N;
            for (idx_t j = 0; j < width; j++) part[j] = 0.0f;
            for (idx_t n = n0; n < n1; n++) {
                const float* row = dout + n * OC + o0;
#pragma omp simd
                for (idx_t j = 0; j < width; j++) part[j] += row[j];
            }
            for (idx_t j = 0; j < width; j++) total[j] += part[j];
        }
        for (idx_t j = 0; j < width; j++) dbias[o0 + j] += total[j];
    }
}

}  // namespace

void matmul_backward(float* dinp, float* dweight, float* dbias, const float* dout, const float* inp,
                     const float* weight, idx_t N, idx_t C, idx_t OC, Precision precision,
                     bool accumulate) {
    // dinp (N, C) (+)= dout (N, OC) . weight (OC, C)
    if (dinp != nullptr)
        gemm(precision, N, C, OC, 1.0f, Operand::rows(dout, OC), Operand::rows(weight, C),
             Output::write(dinp, C, accumulate), true);
    // dweight (OC, C) += dout^T (OC, N) . inp (N, C): the long reduction runs over the N rows, in
    // slices of fixed depth, so its order is the same for any thread count.
    if (dweight != nullptr)
        gemm(precision, OC, C, N, 1.0f, Operand::transpose_of(dout, OC), Operand::rows(inp, C),
             Output::add_to(dweight, C), true);
    if (dbias != nullptr) bias_gradient(dbias, dout, N, OC);
}

}  // namespace LMLAB_ISA_NS
}  // namespace lmlab

// The residual add, forward and backward: out = a + b, and its gradient to both operands.
// Shapes: a, b, out, dout, da, db (N), any layout (elementwise).
#include "isa.h"
#include "simd.h"

namespace lmlab {
namespace LMLAB_ISA_NS {

void residual_forward(float* out, const float* a, const float* b, idx_t N) {
    parallel_blocks(N, [=](idx_t i0, idx_t i1) {
        LMLAB_SIMD
        for (idx_t i = i0; i < i1; i += kW)
            vstore_n(out + i, vadd(vload_n(a + i, i1 - i, 0.0f), vload_n(b + i, i1 - i, 0.0f)), i1 - i);
    });
}

// da += dout; db += dout (input gradients that accumulate: the residual stream sums its branches).
void residual_backward(float* da, float* db, const float* dout, idx_t N) {
    parallel_blocks(N, [=](idx_t i0, idx_t i1) {
        if (da != nullptr) add_row(da + i0, dout + i0, i1 - i0);
        if (db != nullptr) add_row(db + i0, dout + i0, i1 - i0);
    });
}

}  // namespace LMLAB_ISA_NS
}  // namespace lmlab

// Token + position embedding, forward and backward.
// Shapes: tokens (B, T); wte (V, C); wpe (maxT, C); out, dout (B, T, C).
#include "isa.h"
#include "simd.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace lmlab {
namespace LMLAB_ISA_NS {

void embedding_forward(float* out, const std::int32_t* tokens, const float* wte, const float* wpe,
                       idx_t B, idx_t T, idx_t C) {
#pragma omp parallel for collapse(2) schedule(static)
    for (idx_t b = 0; b < B; b++)
        for (idx_t t = 0; t < T; t++) {
            float* o = out + (b * T + t) * C;
            const float* tok = wte + (idx_t)tokens[b * T + t] * C;
            const float* pos = wpe + t * C;
            LMLAB_SIMD
            for (idx_t c = 0; c < C; c += kW)
                vstore_n(o + c, vadd(vload_n(tok + c, C - c, 0.0f), vload_n(pos + c, C - c, 0.0f)), C - c);
        }
}

void embedding_backward(float* dwte, float* dwpe, const float* dout, const std::int32_t* tokens,
                        idx_t B, idx_t T, idx_t C) {
    if (dwte != nullptr) {
        // Scatter-add without races or order changes: each thread owns a slice of channels (whole
        // cache lines) and walks every (b, t) in order, so a token seen several times is summed in
        // the same order for any thread count, and each row slice is read and written contiguously.
#pragma omp parallel
        {
            idx_t nth = 1, tid = 0;
#ifdef _OPENMP
            nth = omp_get_num_threads();
            tid = omp_get_thread_num();
#endif
            const idx_t lines = (C + 15) / 16, per = (lines + nth - 1) / nth;
            const idx_t c0 = tid * per * 16 < C ? tid * per * 16 : C;
            const idx_t c1 = (tid + 1) * per * 16 < C ? (tid + 1) * per * 16 : C;
            if (c1 > c0)
                for (idx_t bt = 0; bt < B * T; bt++)
                    add_row(dwte + (idx_t)tokens[bt] * C + c0, dout + bt * C + c0, c1 - c0);
        }
    }
    if (dwpe != nullptr) {
        // Each position sums its B rows in order.
#pragma omp parallel for schedule(static)
        for (idx_t t = 0; t < T; t++)
            for (idx_t b = 0; b < B; b++) add_row(dwpe + t * C, dout + (b * T + t) * C, C);
    }
}

}  // namespace LMLAB_ISA_NS
}  // namespace lmlab

// Token + position embedding and the residual add, each with its backward.
// Shapes: tokens (B, T); wte (V, C); wpe (maxT, C); out (B, T, C).
#include "isa.h"

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
            for (idx_t c = 0; c < C; c++) o[c] = tok[c] + pos[c];
        }
}

void embedding_backward(float* dwte, float* dwpe, const float* dout, const std::int32_t* tokens,
                        idx_t B, idx_t T, idx_t C) {
    // Scatter-add without races or order changes: each thread owns a slice of channels and walks
    // every (b, t) in order, so repeated tokens are summed in the same order for any thread count.
#pragma omp parallel for schedule(static)
    for (idx_t c = 0; c < C; c++) {
        for (idx_t bt = 0; bt < B * T; bt++) {
            float g = dout[bt * C + c];
            if (dwte != nullptr) dwte[(idx_t)tokens[bt] * C + c] += g;
            if (dwpe != nullptr) dwpe[(bt % T) * C + c] += g;
        }
    }
}

void residual_forward(float* out, const float* a, const float* b, idx_t N) {
#pragma omp parallel for schedule(static)
    for (idx_t i = 0; i < N; i++) out[i] = a[i] + b[i];
}

void residual_backward(float* da, float* db, const float* dout, idx_t N) {
#pragma omp parallel for schedule(static)
    for (idx_t i = 0; i < N; i++) {
        da[i] += dout[i];
        db[i] += dout[i];
    }
}

}  // namespace LMLAB_ISA_NS
}  // namespace lmlab

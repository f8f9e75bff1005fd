// Causal multi-head self-attention, forward and backward.
// Shapes: qkv (B, T, 3C) = [q | k | v], each split into NH heads of HS = C / NH; out (B, T, C);
// att (B, NH, T, T) the cached probabilities (zero above the diagonal).
// Reference implementation: parallel over (b, h, t) rows in the forward and (b, h) in the backward.
#include <cmath>

#include "isa.h"

namespace lmlab {
namespace LMLAB_ISA_NS {

void attention_forward(float* out, float* att, const float* qkv, idx_t B, idx_t T, idx_t C,
                       idx_t NH) {
    const idx_t C3 = 3 * C, HS = C / NH;
    const float scale = 1.0f / std::sqrt((float)HS);
#pragma omp parallel for collapse(3) schedule(static)
    for (idx_t b = 0; b < B; b++)
        for (idx_t h = 0; h < NH; h++)
            for (idx_t t = 0; t < T; t++) {
                const float* q = qkv + b * T * C3 + t * C3 + h * HS;
                float* a = att + ((b * NH + h) * T + t) * T;
                float maxval = -INFINITY;
                for (idx_t s = 0; s <= t; s++) {
                    const float* k = qkv + b * T * C3 + s * C3 + C + h * HS;
                    float dot = 0.0f;
                    for (idx_t i = 0; i < HS; i++) dot += q[i] * k[i];
                    a[s] = dot * scale;
                    maxval = a[s] > maxval ? a[s] : maxval;
                }
                float sum = 0.0f;
                for (idx_t s = 0; s <= t; s++) {
                    a[s] = std::exp(a[s] - maxval);
                    sum += a[s];
                }
                float inv = 1.0f / sum;
                for (idx_t s = 0; s <= t; s++) a[s] *= inv;
                for (idx_t s = t + 1; s < T; s++) a[s] = 0.0f;
                float* o = out + b * T * C + t * C + h * HS;
                for (idx_t i = 0; i < HS; i++) o[i] = 0.0f;
                for (idx_t s = 0; s <= t; s++) {
                    const float* v = qkv + b * T * C3 + s * C3 + 2 * C + h * HS;
                    for (idx_t i = 0; i < HS; i++) o[i] += a[s] * v[i];
                }
            }
}

void attention_backward(float* dqkv, const float* dout, const float* qkv, const float* att, idx_t B,
                        idx_t T, idx_t C, idx_t NH) {
    const idx_t C3 = 3 * C, HS = C / NH;
    const float scale = 1.0f / std::sqrt((float)HS);
    // Each (b, h) writes only its own head's slice of dqkv, so heads run in parallel without races.
#pragma omp parallel for collapse(2) schedule(static)
    for (idx_t b = 0; b < B; b++)
        for (idx_t h = 0; h < NH; h++) {
            const float* base = qkv + b * T * C3;
            float* dbase = dqkv + b * T * C3;
            for (idx_t t = 0; t < T; t++) {
                const float* a = att + ((b * NH + h) * T + t) * T;
                const float* dy = dout + b * T * C + t * C + h * HS;
                // Softmax backward in O(T) per row: dpre = a * (da - sum_s a*da).
                float dot = 0.0f;
                for (idx_t s = 0; s <= t; s++) {
                    const float* v = base + s * C3 + 2 * C + h * HS;
                    float da = 0.0f;
                    for (idx_t i = 0; i < HS; i++) da += dy[i] * v[i];
                    dot += a[s] * da;
                }
                const float* q = base + t * C3 + h * HS;
                float* dq = dbase + t * C3 + h * HS;
                for (idx_t s = 0; s <= t; s++) {
                    const float* k = base + s * C3 + C + h * HS;
                    const float* v = base + s * C3 + 2 * C + h * HS;
                    float* dk = dbase + s * C3 + C + h * HS;
                    float* dv = dbase + s * C3 + 2 * C + h * HS;
                    float da = 0.0f;
                    for (idx_t i = 0; i < HS; i++) da += dy[i] * v[i];
                    float dpre = a[s] * (da - dot) * scale;
                    for (idx_t i = 0; i < HS; i++) {
                        dv[i] += a[s] * dy[i];
                        dq[i] += dpre * k[i];
                        dk[i] += dpre * q[i];
                    }
                }
            }
        }
}

}  // namespace LMLAB_ISA_NS
}  // namespace lmlab

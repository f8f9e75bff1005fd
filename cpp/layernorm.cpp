// layernorm over the last dimension, and its backward.
// Shapes: inp, out (N, C); weight, bias (C); mean, rstd (N).
#include <cmath>

#include "isa.h"

namespace lmlab {
namespace LMLAB_ISA_NS {

void layernorm_forward(float* out, float* mean, float* rstd, const float* inp, const float* weight,
                       const float* bias, idx_t N, idx_t C) {
    const float eps = 1e-5f;
#pragma omp parallel for schedule(static)
    for (idx_t n = 0; n < N; n++) {
        const float* x = inp + n * C;
        float m = 0.0f;
        for (idx_t c = 0; c < C; c++) m += x[c];
        m /= (float)C;
        // Two-pass variance: exact for rows with a large mean and a tiny spread.
        float var = 0.0f;
        for (idx_t c = 0; c < C; c++) var += (x[c] - m) * (x[c] - m);
        var /= (float)C;
        float s = 1.0f / std::sqrt(var + eps);
        float* o = out + n * C;
        for (idx_t c = 0; c < C; c++) o[c] = (x[c] - m) * s * weight[c] + bias[c];
        mean[n] = m;
        rstd[n] = s;
    }
}

void layernorm_backward(float* dinp, float* dweight, float* dbias, const float* dout, const float* inp,
                        const float* weight, const float* mean, const float* rstd, idx_t N, idx_t C) {
#pragma omp parallel for schedule(static)
    for (idx_t n = 0; n < N; n++) {
        const float* x = inp + n * C;
        const float* dy = dout + n * C;
        float m = mean[n], s = rstd[n];
        float dnorm_mean = 0.0f, dnorm_norm_mean = 0.0f;
        for (idx_t c = 0; c < C; c++) {
            float norm = (x[c] - m) * s;
            float dnorm = weight[c] * dy[c];
            dnorm_mean += dnorm;
            dnorm_norm_mean += dnorm * norm;
        }
        dnorm_mean /= (float)C;
        dnorm_norm_mean /= (float)C;
        float* dx = dinp + n * C;
        for (idx_t c = 0; c < C; c++) {
            float norm = (x[c] - m) * s;
            float dnorm = weight[c] * dy[c];
            dx[c] += (dnorm - dnorm_mean - norm * dnorm_norm_mean) * s;
        }
    }
    if (dweight == nullptr && dbias == nullptr) return;
    // Weight and bias gradients reduce over rows: each channel sums its column chunk by chunk.
#pragma omp parallel for schedule(static)
    for (idx_t c = 0; c < C; c++) {
        float dw = 0.0f, db = 0.0f;
        for (idx_t n0 = 0; n0 < N; n0 += kRowChunk) {
            float pw = 0.0f, pb = 0.0f;
            idx_t n1 = n0 + kRowChunk < N ? n0 + kRowChunk : N;
            for (idx_t n = n0; n < n1; n++) {
                float dy = dout[n * C + c];
                pw += dy * (inp[n * C + c] - mean[n]) * rstd[n];
                pb += dy;
            }
            dw += pw;
            db += pb;
        }
        if (dweight != nullptr) dweight[c] += dw;
        if (dbias != nullptr) dbias[c] += db;
    }
}

}  // namespace LMLAB_ISA_NS
}  // namespace lmlab

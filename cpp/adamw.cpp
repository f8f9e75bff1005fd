// AdamW over the flat parameter buffer, and the sum of squares behind the global gradient norm.
#include <cmath>

#include "isa.h"

namespace lmlab {
namespace LMLAB_ISA_NS {

void adamw_update(float* params, float* m, float* v, const float* grads, const float* decay_mask,
                  idx_t n, float lr, float beta1, float beta2, float eps, float weight_decay,
                  float grad_scale, idx_t t) {
    // Per-step constants hoisted out of the loop: no pow per element.
    const float bias1 = 1.0f / (1.0f - (float)std::pow((double)beta1, (double)t));
    const float bias2 = 1.0f / (1.0f - (float)std::pow((double)beta2, (double)t));
#pragma omp parallel for schedule(static)
    for (idx_t i = 0; i < n; i++) {
        float g = grads[i] * grad_scale;
        float mi = beta1 * m[i] + (1.0f - beta1) * g;
        float vi = beta2 * v[i] + (1.0f - beta2) * g * g;
        m[i] = mi;
        v[i] = vi;
        float decay = decay_mask != nullptr ? decay_mask[i] * weight_decay : weight_decay;
        params[i] -= lr * ((mi * bias1) / (std::sqrt(vi * bias2) + eps) + decay * params[i]);
    }
}

double sum_squares(const float* x, idx_t n) {
    // Fixed-size chunks summed in order: the same total for any thread count.
    const idx_t chunk = 4096;
    const idx_t nchunks = (n + chunk - 1) / chunk;
    double total = 0.0;
#pragma omp parallel for ordered schedule(static)
    for (idx_t j = 0; j < nchunks; j++) {
        double part = 0.0;
        idx_t end = (j + 1) * chunk < n ? (j + 1) * chunk : n;
        for (idx_t i = j * chunk; i < end; i++) part += (double)x[i] * (double)x[i];
#pragma omp ordered
        total += part;
    }
    return total;
}

}  // namespace LMLAB_ISA_NS
}  // namespace lmlab

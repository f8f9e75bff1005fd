// softmax and the fused softmax + cross-entropy, each with its backward.
// Shapes: logits, probs (N, V); targets, losses, lse, weights (N).
#include <cmath>

#include "isa.h"

namespace lmlab {
namespace LMLAB_ISA_NS {

void softmax_forward(float* probs, const float* logits, idx_t N, idx_t V) {
#pragma omp parallel for schedule(static)
    for (idx_t n = 0; n < N; n++) {
        const float* x = logits + n * V;
        float* p = probs + n * V;
        // Subtracting the row maximum keeps exp from overflowing on large logits.
        float maxval = -INFINITY;
        for (idx_t v = 0; v < V; v++) maxval = x[v] > maxval ? x[v] : maxval;
        float sum = 0.0f;
        for (idx_t v = 0; v < V; v++) {
            p[v] = std::exp(x[v] - maxval);
            sum += p[v];
        }
        float inv = 1.0f / sum;
        for (idx_t v = 0; v < V; v++) p[v] *= inv;
    }
}

void softmax_backward(float* dlogits, const float* dprobs, const float* probs, idx_t N, idx_t V) {
#pragma omp parallel for schedule(static)
    for (idx_t n = 0; n < N; n++) {
        const float* dp = dprobs + n * V;
        const float* p = probs + n * V;
        float dot = 0.0f;
        for (idx_t v = 0; v < V; v++) dot += dp[v] * p[v];
        float* dx = dlogits + n * V;
        for (idx_t v = 0; v < V; v++) dx[v] += p[v] * (dp[v] - dot);
    }
}

void crossentropy_forward(float* losses, float* lse, const float* logits,
                          const std::int32_t* targets, idx_t N, idx_t V) {
#pragma omp parallel for schedule(static)
    for (idx_t n = 0; n < N; n++) {
        const float* x = logits + n * V;
        float maxval = -INFINITY;
        for (idx_t v = 0; v < V; v++) maxval = x[v] > maxval ? x[v] : maxval;
        float sum = 0.0f;
        for (idx_t v = 0; v < V; v++) sum += std::exp(x[v] - maxval);
        float logsumexp = maxval + std::log(sum);
        lse[n] = logsumexp;
        losses[n] = logsumexp - x[targets[n]];
    }
}

void crossentropy_backward(float* dlogits, const float* logits, const float* lse,
                           const std::int32_t* targets, const float* weights, idx_t N, idx_t V) {
#pragma omp parallel for schedule(static)
    for (idx_t n = 0; n < N; n++) {
        float w = weights[n];
        if (w == 0.0f) continue;  // masked rows (prompt tokens, padding) contribute exactly nothing
        const float* x = logits + n * V;
        float* dx = dlogits + n * V;
        for (idx_t v = 0; v < V; v++) dx[v] += w * std::exp(x[v] - lse[n]);
        dx[targets[n]] -= w;
    }
}

}  // namespace LMLAB_ISA_NS
}  // namespace lmlab

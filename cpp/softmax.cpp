// softmax and the fused softmax + cross-entropy, each with its backward.
// Shapes: logits, probs (N, V); targets, losses, lse, weights (N).
//
// Rows are independent and each is handled whole by one thread, reduced in a fixed lane order, so the
// results do not depend on the thread count. Every row subtracts its maximum before exp (large logits
// cannot overflow) and reads its data at most twice: once for the maximum, once for exp and its sum.
#include <cmath>
#include <cstdlib>

#include "isa.h"
#include "simd.h"

namespace lmlab {
namespace LMLAB_ISA_NS {

namespace {

// Outputs of at least this many floats (16 MiB, beyond the caches of a small machine) are streamed.
constexpr idx_t kStreamFloats = idx_t(1) << 22;

float row_max(const float* x, idx_t V) {
    vf acc = vset(-INFINITY);
    LMLAB_SIMD_REDUCE(max, acc)
    for (idx_t v = 0; v < V; v += kW) acc = vmax(acc, vload_n(x + v, V - v, -INFINITY));
    return vhmax(acc);
}

// sum_v exp(x[v] - shift), also storing each exp into e when kStore. Lanes past the row's end load
// -inf, whose exp is 0. Summed in blocks of kSumBlock whose sums are then added up, so that the
// rounding error grows with kSumBlock / kW + V / kSumBlock additions rather than V / kW (a 50k-token
// vocabulary row would otherwise lose ~1e-4 relative in its sum).
constexpr idx_t kSumBlock = 1024;

template <bool kStore>
float row_sum_exp(float* e, const float* x, float shift, idx_t V) {
    const vf s = vset(shift);
    vf total = vset(0.0f);
    for (idx_t b = 0; b < V; b += kSumBlock) {
        const idx_t end = b + kSumBlock < V ? b + kSumBlock : V;
        vf acc = vset(0.0f);
        LMLAB_SIMD_REDUCE(+, acc)
        for (idx_t v = b; v < end; v += kW) {
            vf ev = vexp(vsub(vload_n(x + v, end - v, -INFINITY), s));
            if (kStore) vstore_n(e + v, ev, end - v);
            acc = vadd(acc, ev);
        }
        total = vadd(total, acc);
    }
    return vhsum(total);
}

// Long rows are taken a block (kSumBlock floats, L1-resident) at a time: the block's maximum, then its
// exps relative to the running maximum, the running sum rescaled whenever a block raises the maximum.
// The row is read from memory once instead of twice. Returns the row maximum; *sum gets the sum of
// exp(x - maximum). With kStore, e[v] = exp(x[v] - block_max[b]) for the running maximum of block b.
constexpr idx_t kMaxBlocks = 64;  // rows up to 65536 long; longer ones use two full passes

template <bool kStore>
float row_max_sum_exp(float* e, float* block_max, const float* x, idx_t V, float* sum) {
    if (V <= kSumBlock || V > kSumBlock * kMaxBlocks) {
        const float m = row_max(x, V);
        *sum = row_sum_exp<kStore>(e, x, m, V);
        if (block_max != nullptr) block_max[0] = m;
        return m;
    }
    float m = -INFINITY, total = 0.0f;
    for (idx_t b = 0, j = 0; b < V; b += kSumBlock, j++) {
        const idx_t len = V - b < kSumBlock ? V - b : kSumBlock;
        const float mb = row_max(x + b, len);
        if (mb > m) {
            total *= std::exp(m - mb);
            m = mb;
        }
        // While every value so far is -inf (masked), m is too: shift by 0 so those exps come out 0.
        total += row_sum_exp<kStore>(kStore ? e + b : nullptr, x + b, m == -INFINITY ? 0.0f : m, len);
        if (block_max != nullptr) block_max[j] = m;
    }
    *sum = total;
    return m;
}

}  // namespace

void softmax_forward(float* probs, const float* logits, idx_t N, idx_t V) {
    // Outputs too large for the caches are streamed out: each row's exps go to a per-thread buffer
    // (L1/L2-resident) and the scaled row is written with non-temporal stores.
    const bool streaming = N * V >= kStreamFloats;
#pragma omp parallel
    {
        float* scratch = nullptr;
        if (streaming) scratch = static_cast<float*>(std::aligned_alloc(64, (V * sizeof(float) + 63) / 64 * 64));
#pragma omp for schedule(static)
        for (idx_t n = 0; n < N; n++) {
            const float* x = logits + n * V;
            float* p = probs + n * V;
            float* e = scratch != nullptr ? scratch : p;  // without a buffer, in place (never fails)
            float block_max[kMaxBlocks], sum;
            const float m = row_max_sum_exp<true>(e, block_max, x, V, &sum);
            // Each block's exps are relative to the maximum when it was summed: scaled to the final
            // one here. A single block (short or very long rows) is already relative to m.
            const float inv = 1.0f / sum;
            const bool one_block = V <= kSumBlock || V > kSumBlock * kMaxBlocks;
            for (idx_t b = 0, j = 0; b < V; b += one_block ? V : kSumBlock, j++) {
                const idx_t len = one_block ? V : (V - b < kSumBlock ? V - b : kSumBlock);
                const float factor = one_block ? inv : std::exp(block_max[j] - m) * inv;
                scale_row(p + b, e + b, vset(factor), len, scratch != nullptr);
            }
        }
        if (scratch != nullptr) {
            vstream_fence();
            std::free(scratch);
        }
    }
}

void softmax_backward(float* dlogits, const float* dprobs, const float* probs, idx_t N, idx_t V) {
#pragma omp parallel for schedule(static)
    for (idx_t n = 0; n < N; n++) {
        const float* dp = dprobs + n * V;
        const float* p = probs + n * V;
        float* dx = dlogits + n * V;
        vf acc = vset(0.0f);
        LMLAB_SIMD_REDUCE(+, acc)
        for (idx_t v = 0; v < V; v += kW)
            acc = vfmadd(vload_n(dp + v, V - v, 0.0f), vload_n(p + v, V - v, 0.0f), acc);
        const vf dot = vset(vhsum(acc));
        LMLAB_SIMD
        for (idx_t v = 0; v < V; v += kW) {
            vf pv = vload_n(p + v, V - v, 0.0f);
            vf g = vmul(pv, vsub(vload_n(dp + v, V - v, 0.0f), dot));
            vstore_n(dx + v, vadd(vload_n(dx + v, V - v, 0.0f), g), V - v);
        }
    }
}

void crossentropy_forward(float* losses, float* lse, const float* logits,
                          const std::int32_t* targets, idx_t N, idx_t V) {
#pragma omp parallel for schedule(static)
    for (idx_t n = 0; n < N; n++) {
        const float* x = logits + n * V;
        float sum;
        const float maxval = row_max_sum_exp<false>(nullptr, nullptr, x, V, &sum);
        const float logsumexp = maxval + std::log(sum);
        lse[n] = logsumexp;
        losses[n] = logsumexp - x[targets[n]];
    }
}

void crossentropy_backward(float* dlogits, const float* logits, const float* lse,
                           const std::int32_t* targets, const float* weights, idx_t N, idx_t V) {
#pragma omp parallel for schedule(static)
    for (idx_t n = 0; n < N; n++) {
        const float w = weights[n];
        if (w == 0.0f) continue;  // masked rows (prompt tokens, padding) contribute exactly nothing
        const float* x = logits + n * V;
        float* dx = dlogits + n * V;
        // softmax(x) = exp(x - lse): the cached log-sum-exp saves the max and sum passes.
        const vf vw = vset(w), shift = vset(lse[n]);
        LMLAB_SIMD
        for (idx_t v = 0; v < V; v += kW) {
            vf p = vexp(vsub(vload_n(x + v, V - v, 0.0f), shift));
            vstore_n(dx + v, vfmadd(vw, p, vload_n(dx + v, V - v, 0.0f)), V - v);
        }
        dx[targets[n]] -= w;
    }
}

}  // namespace LMLAB_ISA_NS
}  // namespace lmlab

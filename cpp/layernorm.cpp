// layernorm over the last dimension, and its backward.
// Shapes: inp, out (N, C); weight, bias (C); mean, rstd (N).
//
// Parallel strategy: rows are independent for the output and the input gradient. The weight and bias
// gradients reduce across rows: rows are cut into chunks of kRowChunk, each chunk's partial sums go to
// its own slot of a scratch buffer (chunks run in parallel), and the slots are then added in chunk
// order, channels in parallel. Neither step depends on the thread count.
#include <cmath>
#include <cstdlib>
#include <new>

#include "isa.h"
#include "simd.h"

namespace lmlab {
namespace LMLAB_ISA_NS {

void layernorm_forward(float* out, float* mean, float* rstd, const float* inp, const float* weight,
                       const float* bias, idx_t N, idx_t C) {
    const float eps = 1e-5f;
#pragma omp parallel for schedule(static)
    for (idx_t n = 0; n < N; n++) {
        const float* x = inp + n * C;
        // Centred on x[0]: for rows whose mean is far larger than their spread, x - x[0] is exact and
        // small, so neither the mean's sum nor the deviations lose anything to the mean's magnitude
        // (the deviation from the mean is (x - x[0]) - shift, never x - an fp32-rounded mean).
        const float x0 = x[0];
        const vf v0 = vset(x0);
        vf acc = vset(0.0f);
        LMLAB_SIMD_REDUCE(+, acc)
        for (idx_t c = 0; c < C; c += kW) acc = vadd(acc, vsub(vload_n(x + c, C - c, x0), v0));
        const float shift = vhsum(acc) / (float)C;
        const vf vshift = vset(shift);
        // Two-pass variance, over the deviations only (lanes past the row dropped).
        vf sq = vset(0.0f);
        LMLAB_SIMD_REDUCE(+, sq)
        for (idx_t c = 0; c < C; c += kW) {
            vf d = vkeep_n(vsub(vsub(vload_n(x + c, C - c, x0), v0), vshift), C - c);
            sq = vfmadd(d, d, sq);
        }
        const float m = x0 + shift;
        const float s = 1.0f / std::sqrt(vhsum(sq) / (float)C + eps);
        const vf vs = vset(s);
        float* o = out + n * C;
        LMLAB_SIMD
        for (idx_t c = 0; c < C; c += kW) {
            vf norm = vmul(vsub(vsub(vload_n(x + c, C - c, x0), v0), vshift), vs);
            vstore_n(o + c, vfmadd(norm, vload_n(weight + c, C - c, 0.0f), vload_n(bias + c, C - c, 0.0f)),
                     C - c);
        }
        mean[n] = m;
        rstd[n] = s;
    }
}

namespace {

// One row of the backward pass: dx += (dnorm - mean(dnorm) - norm * mean(dnorm * norm)) * rstd with
// dnorm = weight * dy, and, when pw is not null, pw += dy * norm and pb += dy (the chunk's partials).
inline void layernorm_backward_row(float* dx, float* pw, float* pb, const float* dy, const float* x,
                                   const float* weight, float m, float s, idx_t C) {
    const vf vm = vset(m), vs = vset(s);
    vf acc_d = vset(0.0f), acc_dn = vset(0.0f);
    LMLAB_SIMD_REDUCE(+, acc_d, acc_dn)
    for (idx_t c = 0; c < C; c += kW) {
        vf norm = vmul(vsub(vload_n(x + c, C - c, m), vm), vs);
        vf dnorm = vmul(vload_n(weight + c, C - c, 0.0f), vload_n(dy + c, C - c, 0.0f));
        acc_d = vadd(acc_d, dnorm);
        acc_dn = vfmadd(dnorm, norm, acc_dn);
    }
    const vf dnorm_mean = vset(vhsum(acc_d) / (float)C);
    const vf dnorm_norm_mean = vset(vhsum(acc_dn) / (float)C);
    LMLAB_SIMD
    for (idx_t c = 0; c < C; c += kW) {
        const idx_t k = C - c;
        vf g = vload_n(dy + c, k, 0.0f);
        vf norm = vmul(vsub(vload_n(x + c, k, m), vm), vs);
        vf dnorm = vmul(vload_n(weight + c, k, 0.0f), g);
        vf t = vsub(vsub(dnorm, dnorm_mean), vmul(norm, dnorm_norm_mean));
        vstore_n(dx + c, vfmadd(t, vs, vload_n(dx + c, k, 0.0f)), k);
        if (pw != nullptr) {
            vstore_n(pw + c, vfmadd(g, norm, vload_n(pw + c, k, 0.0f)), k);
            vstore_n(pb + c, vadd(vload_n(pb + c, k, 0.0f), g), k);
        }
    }
}

// dst[c] += sum over j of src[j * stride + c], j = 0 .. count-1 added in order.
inline void add_partials_in_order(float* dst, const float* src, idx_t count, idx_t stride, idx_t c0,
                                  idx_t c1) {
    LMLAB_SIMD
    for (idx_t c = c0; c < c1; c += kW) {
        vf acc = vset(0.0f);
        for (idx_t j = 0; j < count; j++) acc = vadd(acc, vload_n(src + j * stride + c, c1 - c, 0.0f));
        vstore_n(dst + c, vadd(vload_n(dst + c, c1 - c, 0.0f), acc), c1 - c);
    }
}

}  // namespace

void layernorm_backward(float* dinp, float* dweight, float* dbias, const float* dout, const float* inp,
                        const float* weight, const float* mean, const float* rstd, idx_t N, idx_t C) {
    if (N <= 0 || C <= 0) return;
    const bool want_params = dweight != nullptr || dbias != nullptr;
    const idx_t nchunks = (N + kRowChunk - 1) / kRowChunk;
    // Per chunk: C weight partials then C bias partials. Row stride padded to whole cache lines.
    const idx_t stride = (C + 15) / 16 * 16;
    float* partials = nullptr;
    if (want_params) {
        partials = static_cast<float*>(std::aligned_alloc(64, sizeof(float) * 2 * stride * nchunks));
        if (partials == nullptr) throw std::bad_alloc();
    }
#pragma omp parallel
    {
#pragma omp for schedule(static)
        for (idx_t j = 0; j < nchunks; j++) {
            float *pw = nullptr, *pb = nullptr;
            if (want_params) {
                pw = partials + 2 * stride * j;
                pb = pw + stride;
                for (idx_t c = 0; c < 2 * stride; c++) pw[c] = 0.0f;
            }
            const idx_t n1 = (j + 1) * kRowChunk < N ? (j + 1) * kRowChunk : N;
            for (idx_t n = j * kRowChunk; n < n1; n++)
                layernorm_backward_row(dinp + n * C, pw, pb, dout + n * C, inp + n * C, weight, mean[n],
                                       rstd[n], C);
        }
        if (want_params) {
            // Channels in blocks of 64 (whole cache lines), each block summed over chunks in order.
#pragma omp for schedule(static)
            for (idx_t c0 = 0; c0 < C; c0 += 64) {
                const idx_t c1 = c0 + 64 < C ? c0 + 64 : C;
                if (dweight != nullptr) add_partials_in_order(dweight, partials, nchunks, 2 * stride, c0, c1);
                if (dbias != nullptr) add_partials_in_order(dbias, partials + stride, nchunks, 2 * stride, c0, c1);
            }
        }
    }
    std::free(partials);
}

}  // namespace LMLAB_ISA_NS
}  // namespace lmlab

// AdamW over the flat parameter buffer, and the sum of squares behind the global gradient norm.
// Shapes: params, m, v, grads, decay_mask (n).
#include <cmath>
#include <cstdlib>
#include <new>

#include "isa.h"
#include "simd.h"

namespace lmlab {
namespace LMLAB_ISA_NS {

void adamw_update(float* params, float* m, float* v, const float* grads, const float* decay_mask,
                  idx_t n, float lr, float beta1, float beta2, float eps, float weight_decay,
                  float grad_scale, idx_t t) {
    // Per-step constants hoisted out of the loop: no pow per element.
    const float bias1 = 1.0f / (1.0f - (float)std::pow((double)beta1, (double)t));
    const float bias2 = 1.0f / (1.0f - (float)std::pow((double)beta2, (double)t));
    const vf vb1 = vset(beta1), vb2 = vset(beta2), va1 = vset(1.0f - beta1), va2 = vset(1.0f - beta2);
    const vf vbias1 = vset(bias1), vbias2 = vset(bias2), veps = vset(eps), vlr = vset(lr);
    const vf vwd = vset(weight_decay), vscale = vset(grad_scale);
    parallel_blocks(n, [=](idx_t i0, idx_t i1) {
        for_each_vector(i0, i1, [=](idx_t i, idx_t k) {
            vf g = vmul(vload_n(grads + i, k, 0.0f), vscale);
            vf mi = vfmadd(vb1, vload_n(m + i, k, 0.0f), vmul(va1, g));
            vf vi = vfmadd(vb2, vload_n(v + i, k, 0.0f), vmul(va2, vmul(g, g)));
            vstore_n(m + i, mi, k);
            vstore_n(v + i, vi, k);
            vf decay = decay_mask != nullptr ? vmul(vload_n(decay_mask + i, k, 0.0f), vwd) : vwd;
            vf p = vload_n(params + i, k, 0.0f);
            vf step = vdiv(vmul(mi, vbias1), vadd(vsqrt(vmul(vi, vbias2)), veps));
            vstore_n(params + i, vsub(p, vmul(vlr, vfmadd(decay, p, step))), k);
        });
    });
}

namespace {

// Sum of squares of x[0, n) in double. The lane order is fixed for a variant, so a chunk's sum is too.
double chunk_sum_squares(const float* x, idx_t n) {
#if defined(__AVX512F__)
    __m512d acc0 = _mm512_setzero_pd(), acc1 = _mm512_setzero_pd();
    for (idx_t i = 0; i < n; i += 16) {
        __m512 f = vload_n(x + i, n - i, 0.0f);
        __m512d lo = _mm512_cvtps_pd(_mm512_castps512_ps256(f));
        __m512d hi = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(f), 1)));
        acc0 = _mm512_fmadd_pd(lo, lo, acc0);
        acc1 = _mm512_fmadd_pd(hi, hi, acc1);
    }
    return _mm512_reduce_add_pd(_mm512_add_pd(acc0, acc1));
#elif defined(__AVX2__)
    __m256d acc0 = _mm256_setzero_pd(), acc1 = _mm256_setzero_pd();
    for (idx_t i = 0; i < n; i += 8) {
        __m256 f = vload_n(x + i, n - i, 0.0f);
        __m256d lo = _mm256_cvtps_pd(_mm256_castps256_ps128(f));
        __m256d hi = _mm256_cvtps_pd(_mm256_extractf128_ps(f, 1));
        acc0 = _mm256_fmadd_pd(lo, lo, acc0);
        acc1 = _mm256_fmadd_pd(hi, hi, acc1);
    }
    __m256d s = _mm256_add_pd(acc0, acc1);
    __m128d q = _mm_add_pd(_mm256_castpd256_pd128(s), _mm256_extractf128_pd(s, 1));
    return _mm_cvtsd_f64(_mm_add_sd(q, _mm_unpackhi_pd(q, q)));
#else
    double part = 0.0;
#pragma omp simd reduction(+ : part)
    for (idx_t i = 0; i < n; i++) part += (double)x[i] * (double)x[i];
    return part;
#endif
}

}  // namespace

double sum_squares(const float* x, idx_t n) {
    // Fixed-size chunks, each summed on its own and then added in chunk order: the same total for
    // any thread count.
    const idx_t chunk = 4096;
    const idx_t nchunks = (n + chunk - 1) / chunk;
    if (nchunks == 0) return 0.0;
    double* parts = static_cast<double*>(std::aligned_alloc(64, (sizeof(double) * nchunks + 63) / 64 * 64));
    if (parts == nullptr) throw std::bad_alloc();
#pragma omp parallel for schedule(static)
    for (idx_t j = 0; j < nchunks; j++) {
        const idx_t end = (j + 1) * chunk < n ? (j + 1) * chunk : n;
        parts[j] = chunk_sum_squares(x + j * chunk, end - j * chunk);
    }
    double total = 0.0;
    for (idx_t j = 0; j < nchunks; j++) total += parts[j];
    std::free(parts);
    return total;
}

}  // namespace LMLAB_ISA_NS
}  // namespace lmlab

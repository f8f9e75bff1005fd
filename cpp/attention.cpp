// Causal multi-head self-attention, forward and backward.
// Shapes: qkv (B, T, 3C) = [q | k | v], each split into NH heads of HS = C / NH; out (B, T, C);
// att (B, NH, T, T) the cached probabilities (zero above the diagonal); dout (B, T, C);
// dqkv (B, T, 3C) accumulates.
//
// Strategy. Each (b, h) head is one task (OpenMP, dynamic schedule): a head writes only its own
// slices of out / att / dqkv, so tasks never race, and every output element is reduced inside one
// task in an order fixed by the shapes alone, hence bitwise-identical results for any thread count.
// Inside a head, queries are taken in row blocks of kBlock; causality means block [i0, i0 + m) only
// attends to keys [0, i0 + m), so the products skip every block above the diagonal (the diagonal
// block itself is computed square and its upper half masked, which costs less than ragged tiles).
// All six per-head products are C (+)= alpha * op(A) . B with B's rows contiguous, done by the
// register-tiled product below (measured here 15-20% faster than the general packed gemm of
// cpp/gemm.cpp on these small, strided, causal blocks); the two whose natural B is a transpose
// (S = Q.K^T, dP = dO.V^T) read K^T / V^T from a per-thread copy made once per head.
// Per thread scratch: K^T or V^T and a contiguous K or V (HS x T each) and one block of dP / dS
// (kBlock x T): O(threads * T * (HS + kBlock)), nothing of size T x T.
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <new>
#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__AVX512F__) || defined(__AVX2__)
// GCC 12's AVX-512 intrinsics (max, reduce, extract) build their results from a deliberately
// undefined vector and then warn -Wmaybe-uninitialized about it inside the header; the warning is
// about the header's own code, so it is silenced for the header alone.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop
#else
#include <immintrin.h>
#endif
#endif

#include "isa.h"

namespace lmlab {
namespace LMLAB_ISA_NS {
namespace {

// --- vector layer: kW floats per vector, kMR x kNV vectors of accumulators in the product tile ----

#if defined(__AVX512F__)
constexpr int kW = 16, kMR = 6, kNV = 4;  // 24 accumulators + 4 B vectors + 1 broadcast of 32 zmm
using vec = __m512;
inline vec vload(const float* p) { return _mm512_loadu_ps(p); }
inline void vstore(float* p, vec v) { _mm512_storeu_ps(p, v); }
inline vec vset1(float x) { return _mm512_set1_ps(x); }
inline vec vzero() { return _mm512_setzero_ps(); }
inline vec vadd(vec a, vec b) { return _mm512_add_ps(a, b); }
inline vec vsub(vec a, vec b) { return _mm512_sub_ps(a, b); }
inline vec vmul(vec a, vec b) { return _mm512_mul_ps(a, b); }
inline vec vmax(vec a, vec b) { return _mm512_max_ps(a, b); }
inline vec vfma(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }
inline float hsum(vec v) { return _mm512_reduce_add_ps(v); }
inline float hmax(vec v) { return _mm512_reduce_max_ps(v); }
#elif defined(__AVX2__)
constexpr int kW = 8, kMR = 6, kNV = 2;  // 12 accumulators + 2 B vectors + 1 broadcast of 16 ymm
using vec = __m256;
inline vec vload(const float* p) { return _mm256_loadu_ps(p); }
inline void vstore(float* p, vec v) { _mm256_storeu_ps(p, v); }
inline vec vset1(float x) { return _mm256_set1_ps(x); }
inline vec vzero() { return _mm256_setzero_ps(); }
inline vec vadd(vec a, vec b) { return _mm256_add_ps(a, b); }
inline vec vsub(vec a, vec b) { return _mm256_sub_ps(a, b); }
inline vec vmul(vec a, vec b) { return _mm256_mul_ps(a, b); }
inline vec vmax(vec a, vec b) { return _mm256_max_ps(a, b); }
inline vec vfma(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }
inline float hsum(vec v) {
    __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    x = _mm_add_ps(x, _mm_movehl_ps(x, x));
    return _mm_cvtss_f32(_mm_add_ss(x, _mm_shuffle_ps(x, x, 1)));
}
inline float hmax(vec v) {
    __m128 x = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    x = _mm_max_ps(x, _mm_movehl_ps(x, x));
    return _mm_cvtss_f32(_mm_max_ss(x, _mm_shuffle_ps(x, x, 1)));
}
#else
// Portable: one float per "vector"; the tile is still register-blocked, which is what matters most.
constexpr int kW = 1, kMR = 4, kNV = 4;
using vec = float;
inline vec vload(const float* p) { return *p; }
inline void vstore(float* p, vec v) { *p = v; }
inline vec vset1(float x) { return x; }
inline vec vzero() { return 0.0f; }
inline vec vadd(vec a, vec b) { return a + b; }
inline vec vsub(vec a, vec b) { return a - b; }
inline vec vmul(vec a, vec b) { return a * b; }
inline vec vmax(vec a, vec b) { return a > b ? a : b; }
inline vec vfma(vec a, vec b, vec c) { return a * b + c; }
inline float hsum(vec v) { return v; }
inline float hmax(vec v) { return v; }
#endif

// exp(x) for x <= 0 (softmax arguments after the row maximum is subtracted).
// x = n ln2 + r with n = round(x / ln2), |r| <= ln2 / 2, ln2 split in two so n ln2 is exact enough;
// exp(r) by its degree-7 Taylor polynomial, whose truncation error there (r^8 / 8! < 6e-9) is below
// half an ulp; 2^n built in the exponent field. Below -87, exp(x) < 1.7e-38 is returned as 0, which
// keeps 2^n a normal number (no denormal slow path) and makes exp(-inf) = 0. NaN stays NaN.
#if defined(__AVX512F__) || defined(__AVX2__)
inline vec vexp(vec x) {
    const float kLog2e = 1.44269504088896341f, kLn2Hi = 0.693145751953125f,
                kLn2Lo = 1.42860682030941723e-6f, kLow = -87.0f;
#if defined(__AVX512F__)
    const __mmask16 under = _mm512_cmp_ps_mask(x, vset1(kLow), _CMP_LT_OQ);
    x = _mm512_max_ps(vset1(kLow), x);  // max returns its second operand for NaN: NaN propagates
    const __m512i n = _mm512_cvtps_epi32(_mm512_mul_ps(x, vset1(kLog2e)));
    const vec nf = _mm512_cvtepi32_ps(n);
#else
    const vec under = _mm256_cmp_ps(x, vset1(kLow), _CMP_LT_OQ);
    x = _mm256_max_ps(vset1(kLow), x);
    const __m256i n = _mm256_cvtps_epi32(_mm256_mul_ps(x, vset1(kLog2e)));
    const vec nf = _mm256_cvtepi32_ps(n);
#endif
    vec r = vfma(nf, vset1(-kLn2Hi), x);
    r = vfma(nf, vset1(-kLn2Lo), r);
    vec p = vset1(1.0f / 5040.0f);
    p = vfma(p, r, vset1(1.0f / 720.0f));
    p = vfma(p, r, vset1(1.0f / 120.0f));
    p = vfma(p, r, vset1(1.0f / 24.0f));
    p = vfma(p, r, vset1(1.0f / 6.0f));
    p = vfma(p, r, vset1(0.5f));
    p = vfma(p, r, vset1(1.0f));
    p = vfma(p, r, vset1(1.0f));
#if defined(__AVX512F__)
    const vec two_n = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(n, _mm512_set1_epi32(127)), 23));
    return _mm512_maskz_mul_ps((__mmask16)~under, p, two_n);
#else
    const vec two_n = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n, _mm256_set1_epi32(127)), 23));
    return _mm256_andnot_ps(under, _mm256_mul_ps(p, two_n));
#endif
}
#else
inline vec vexp(vec x) { return std::exp(x); }
#endif

// --- the per-head product -------------------------------------------------------------------------

// One register tile: C[MR x NV*kW] (+)= alpha * A[MR x K] . B[K x NV*kW], where
// A[i, k] = A[i * rsA + k * csA] (any strides, read by broadcast) and B[k, j] = B[k * ldb + j].
// Each C element is one accumulator summed over k in ascending order.
template <int MR, int NV>
void tile(idx_t K, float alpha, const float* A, idx_t rsA, idx_t csA, const float* B, idx_t ldb,
          float* C, idx_t ldc, bool accumulate) {
    vec acc[MR][NV];
    for (int r = 0; r < MR; r++)
        for (int v = 0; v < NV; v++) acc[r][v] = vzero();
    for (idx_t k = 0; k < K; k++) {
        const float* a = A + k * csA;
        const float* b = B + k * ldb;
        vec bv[NV];
        for (int v = 0; v < NV; v++) bv[v] = vload(b + v * kW);
        for (int r = 0; r < MR; r++) {
            const vec ar = vset1(a[r * rsA]);
            for (int v = 0; v < NV; v++) acc[r][v] = vfma(ar, bv[v], acc[r][v]);
        }
    }
    const vec va = vset1(alpha);
    for (int r = 0; r < MR; r++)
        for (int v = 0; v < NV; v++) {
            float* c = C + r * ldc + v * kW;
            const vec x = vmul(va, acc[r][v]);
            vstore(c, accumulate ? vadd(vload(c), x) : x);
        }
}

// The last rows of a strip, M % kMR of them: tile<rows, NV> for the run-time count `rows` < R.
template <int NV, int R>
void tail_rows(idx_t rows, idx_t K, float alpha, const float* A, idx_t rsA, idx_t csA,
               const float* B, idx_t ldb, float* C, idx_t ldc, bool accumulate) {
    if constexpr (R > 1) {
        if (rows == R - 1) tile<R - 1, NV>(K, alpha, A, rsA, csA, B, ldb, C, ldc, accumulate);
        else tail_rows<NV, R - 1>(rows, K, alpha, A, rsA, csA, B, ldb, C, ldc, accumulate);
    }
}

// All row tiles of one column strip of NV vectors.
template <int NV>
void strip(idx_t M, idx_t K, float alpha, const float* A, idx_t rsA, idx_t csA, const float* B,
           idx_t ldb, float* C, idx_t ldc, bool accumulate) {
    idx_t i = 0;
    for (; i + kMR <= M; i += kMR)
        tile<kMR, NV>(K, alpha, A + i * rsA, rsA, csA, B, ldb, C + i * ldc, ldc, accumulate);
    tail_rows<NV, kMR>(M - i, K, alpha, A + i * rsA, rsA, csA, B, ldb, C + i * ldc, ldc, accumulate);
}

// The last whole vectors of the columns, fewer than V of them: strip<nv> for the run-time count nv.
template <int V>
void tail_strips(idx_t nv, idx_t M, idx_t K, float alpha, const float* A, idx_t rsA, idx_t csA,
                 const float* B, idx_t ldb, float* C, idx_t ldc, bool accumulate) {
    if constexpr (V > 1) {
        if (nv == V - 1) strip<V - 1>(M, K, alpha, A, rsA, csA, B, ldb, C, ldc, accumulate);
        else tail_strips<V - 1>(nv, M, K, alpha, A, rsA, csA, B, ldb, C, ldc, accumulate);
    }
}

// C (M x N) (+)= alpha * op(A) (M x K) . B (K x N), B row-major with leading dimension ldb, C with ldc.
// Columns go in strips of kNV vectors (the B strip stays in L1/L2 while A's rows stream past); the
// columns beyond the last whole vector are summed by a scalar loop in the same k order.
void head_gemm(idx_t M, idx_t N, idx_t K, float alpha, const float* A, idx_t rsA, idx_t csA,
               const float* B, idx_t ldb, float* C, idx_t ldc, bool accumulate) {
    const idx_t nvec = N / kW * kW;
    idx_t j = 0;
    for (; j + kNV * kW <= nvec; j += kNV * kW)
        strip<kNV>(M, K, alpha, A, rsA, csA, B + j, ldb, C + j, ldc, accumulate);
    tail_strips<kNV>((nvec - j) / kW, M, K, alpha, A, rsA, csA, B + j, ldb, C + j, ldc, accumulate);
    for (idx_t i = 0; i < M; i++)
        for (j = nvec; j < N; j++) {
            float acc = 0.0f;
            for (idx_t k = 0; k < K; k++) acc += A[i * rsA + k * csA] * B[k * ldb + j];
            float* c = C + i * ldc + j;
            *c = accumulate ? *c + alpha * acc : alpha * acc;
        }
}

// --- helpers shared by forward and backward -------------------------------------------------------

constexpr idx_t kBlock = 64;  // query rows per block

// Below this many multiply-adds per product (B * NH * T^2 * HS / 2) a call runs on one thread: waking
// the team would cost more than it saves (about 20 us of work).
constexpr idx_t kParallelWork = idx_t(1) << 18;

// Leading dimension of the packed K^T / V^T and of dS: whole 64-byte lines, so rows start aligned,
// plus one line, so that consecutive rows (read down a column by the product) do not all map to the
// same few L1 sets when T is a power of two.
inline idx_t padded(idx_t T) { return (T + 15) / 16 * 16 + 16; }

inline idx_t whole_lines(idx_t floats) { return (floats + 15) / 16 * 16; }

// Scratch for every thread of the team about to start, `per_thread` floats each (whole lines).
// Allocated before the parallel region, so that running out of memory is reported (std::bad_alloc,
// a MemoryError in Python) rather than met inside it, where nothing can be thrown.
float* alloc_team_scratch(idx_t per_thread, bool parallel, idx_t* stride) {
    int threads = 1;
#ifdef _OPENMP
    if (parallel) threads = omp_get_max_threads();
#endif
    *stride = whole_lines(per_thread);
    const std::size_t bytes = (std::size_t)(*stride * threads) * sizeof(float);
    float* p = (float*)std::aligned_alloc(64, bytes > 0 ? bytes : 64);
    if (p == nullptr) throw std::bad_alloc();
    return p;
}

inline int thread_id() {
#ifdef _OPENMP
    return omp_get_thread_num();
#else
    return 0;
#endif
}

// dst (HS x ld) = src^T for src rows s < T of HS floats at stride rs: K^T or V^T of one head.
// In strips of 16 source rows, so each destination line is written whole while the 16 source rows
// stay in L1.
void transpose(float* dst, idx_t ld, const float* src, idx_t rs, idx_t T, idx_t HS) {
    for (idx_t s0 = 0; s0 < T; s0 += 16) {
        const idx_t s1 = T - s0 < 16 ? T : s0 + 16;
        for (idx_t d = 0; d < HS; d++)
            for (idx_t s = s0; s < s1; s++) dst[d * ld + s] = src[s * rs + d];
    }
}

// dst (T x HS, rows contiguous) = the head's rows of src at stride rs. The products that stream a
// whole head's K or V as B (O = P V, dQ = dS K) run a few per cent faster from a contiguous copy,
// which the L1 prefetcher follows, than from rows 3C apart.
void gather_rows(float* dst, const float* src, idx_t rs, idx_t T, idx_t HS) {
    for (idx_t s = 0; s < T; s++) std::memcpy(dst + s * HS, src + s * rs, (std::size_t)HS * sizeof(float));
}

// In place softmax of p[0, n): max subtracted first so exp never overflows.
void softmax_row(float* p, idx_t n) {
    const idx_t nv = n / kW * kW;
    vec vm = vset1(-INFINITY);
    for (idx_t s = 0; s < nv; s += kW) vm = vmax(vm, vload(p + s));
    float mx = hmax(vm);
    for (idx_t s = nv; s < n; s++) mx = p[s] > mx ? p[s] : mx;
    const vec vmx = vset1(mx);
    vec vs = vzero();
    for (idx_t s = 0; s < nv; s += kW) {
        const vec e = vexp(vsub(vload(p + s), vmx));
        vstore(p + s, e);
        vs = vadd(vs, e);
    }
    float sum = hsum(vs);
    for (idx_t s = nv; s < n; s++) {
        p[s] = std::exp(p[s] - mx);
        sum += p[s];
    }
    const float inv = 1.0f / sum;
    const vec vinv = vset1(inv);
    for (idx_t s = 0; s < nv; s += kW) vstore(p + s, vmul(vload(p + s), vinv));
    for (idx_t s = nv; s < n; s++) p[s] *= inv;
}

// Softmax backward of one row in O(n): ds[s] = p[s] * (dp[s] - sum_s' p[s'] dp[s']), in place on dp.
void softmax_backward_row(float* dp, const float* p, idx_t n) {
    const idx_t nv = n / kW * kW;
    vec vd = vzero();
    for (idx_t s = 0; s < nv; s += kW) vd = vfma(vload(p + s), vload(dp + s), vd);
    float dot = hsum(vd);
    for (idx_t s = nv; s < n; s++) dot += p[s] * dp[s];
    const vec vdot = vset1(dot);
    for (idx_t s = 0; s < nv; s += kW) vstore(dp + s, vmul(vload(p + s), vsub(vload(dp + s), vdot)));
    for (idx_t s = nv; s < n; s++) dp[s] = p[s] * (dp[s] - dot);
}

}  // namespace

void attention_forward(float* out, float* att, const float* qkv, idx_t B, idx_t T, idx_t C,
                       idx_t NH) {
    const idx_t C3 = 3 * C, HS = C / NH, Tp = padded(T);
    const float scale = 1.0f / std::sqrt((float)HS);
    const bool parallel = B * NH * T * T * HS / 2 >= kParallelWork;
    idx_t stride;
    float* scratch = alloc_team_scratch(whole_lines(HS * Tp) + HS * T, parallel, &stride);
#pragma omp parallel if (parallel)
    {
        float* kt = scratch + thread_id() * stride;  // K^T of the current head
        float* vp = kt + whole_lines(HS * Tp);       // V of the current head, rows contiguous
#pragma omp for collapse(2) schedule(dynamic, 1)
        for (idx_t b = 0; b < B; b++)
            for (idx_t h = 0; h < NH; h++) {
                const float* q = qkv + b * T * C3 + h * HS;
                const float* v = q + 2 * C;
                float* a = att + (b * NH + h) * T * T;
                float* o = out + b * T * C + h * HS;
                transpose(kt, Tp, q + C, C3, T, HS);
                gather_rows(vp, v, C3, T, HS);
                for (idx_t i0 = 0; i0 < T; i0 += kBlock) {
                    const idx_t m = T - i0 < kBlock ? T - i0 : kBlock, kend = i0 + m;
                    float* ab = a + i0 * T;
                    // S = scale * Q K^T for keys [0, kend): the keys this block can see.
                    head_gemm(m, kend, HS, scale, q + i0 * C3, C3, 1, kt, Tp, ab, T, false);
                    for (idx_t r = 0; r < m; r++) {
                        float* row = ab + r * T;
                        const idx_t t = i0 + r;
                        softmax_row(row, t + 1);
                        std::memset(row + t + 1, 0, (std::size_t)(T - t - 1) * sizeof(float));
                    }
                    // O = P V; the zeros above the diagonal make the square diagonal block exact.
                    head_gemm(m, HS, kend, 1.0f, ab, T, 1, vp, HS, o + i0 * C, C, false);
                }
            }
    }
    std::free(scratch);
}

void attention_backward(float* dqkv, const float* dout, const float* qkv, const float* att, idx_t B,
                        idx_t T, idx_t C, idx_t NH) {
    const idx_t C3 = 3 * C, HS = C / NH, Tp = padded(T);
    const float scale = 1.0f / std::sqrt((float)HS);
    const bool parallel = B * NH * T * T * HS / 2 >= kParallelWork;
    idx_t stride;
    float* scratch = alloc_team_scratch(whole_lines(HS * Tp) + kBlock * Tp + HS * T, parallel, &stride);
#pragma omp parallel if (parallel)
    {
        float* vt = scratch + thread_id() * stride;  // V^T of the current head
        float* ds = vt + whole_lines(HS * Tp);       // dP, then dS, of one query block
        float* kp = ds + kBlock * Tp;                // K of the current head, rows contiguous
#pragma omp for collapse(2) schedule(dynamic, 1)
        for (idx_t b = 0; b < B; b++)
            for (idx_t h = 0; h < NH; h++) {
                const float* q = qkv + b * T * C3 + h * HS;
                const float* k = q + C;
                const float* a = att + (b * NH + h) * T * T;
                const float* dy = dout + b * T * C + h * HS;
                float* dq = dqkv + b * T * C3 + h * HS;
                float* dk = dq + C;
                float* dv = dq + 2 * C;
                transpose(vt, Tp, q + 2 * C, C3, T, HS);
                gather_rows(kp, k, C3, T, HS);
                for (idx_t i0 = 0; i0 < T; i0 += kBlock) {
                    const idx_t m = T - i0 < kBlock ? T - i0 : kBlock, kend = i0 + m;
                    const float* ab = a + i0 * T;
                    const float* dyb = dy + i0 * C;
                    // dP = dO V^T, then dS = P * (dP - rowsum(P * dP)) row by row (zero above the
                    // diagonal, so the transposed products below can run over the square block).
                    head_gemm(m, kend, HS, 1.0f, dyb, C, 1, vt, Tp, ds, Tp, false);
                    for (idx_t r = 0; r < m; r++) {
                        const idx_t t = i0 + r;
                        softmax_backward_row(ds + r * Tp, ab + r * T, t + 1);
                        for (idx_t s = t + 1; s < kend; s++) ds[r * Tp + s] = 0.0f;
                    }
                    // dQ += scale dS K; dK += scale dS^T Q; dV += P^T dO. Key rows [0, kend) gather
                    // one partial sum per query block, added in block order.
                    head_gemm(m, HS, kend, scale, ds, Tp, 1, kp, HS, dq + i0 * C3, C3, true);
                    head_gemm(kend, HS, m, scale, ds, 1, Tp, q + i0 * C3, C3, dk, C3, true);
                    head_gemm(kend, HS, m, 1.0f, ab, 1, T, dyb, C, dv, C3, true);
                }
            }
    }
    std::free(scratch);
}

}  // namespace LMLAB_ISA_NS
}  // namespace lmlab

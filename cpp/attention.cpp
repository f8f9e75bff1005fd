// Causal multi-head self-attention, forward and backward.
// Shapes: qkv (B, T, 3C) = [q | k | v], each split into NH heads of HS = C / NH; out (B, T, C);
// stats (B, NH, T, 2) each row's softmax statistics (the maximum score and 1 / sum of exp(score - max)),
// all backward needs to recompute the probabilities, P = exp(S - max) * (1 / sum) bit for bit as the
// forward made them, so no T x T array outlives a query block; dout (B, T, C);
// dqkv (B, T, 3C) accumulates (or is overwritten).
//
// Strategy. Each (b, h) head is one task (OpenMP, dynamic schedule): a head writes only its own
// slices of out / stats / dqkv, so tasks never race, and every output element is reduced inside one
// task in an order fixed by the shapes alone, hence bitwise-identical results for any thread count.
// Inside a head, queries are taken in row blocks of kBlock; causality means block [i0, i0 + m) only
// attends to keys [0, i0 + m), so the products skip every block above the diagonal (the diagonal
// block itself is computed square and its upper half masked, which costs less than ragged tiles).
// The per-head products (two forward, six backward with the recomputed scores) are
// C (+)= alpha * op(A) . B with B's rows contiguous. In fp32 they run on the register-tiled product
// below (faster than the general packed gemm on these small, strided, causal blocks; figures in
// docs/DESIGN.md); in bf16 on gemm (cpp/gemm.h, the native bf16 path where there is one).
// The two whose natural B is a transpose (S = Q.K^T, dP = dO.V^T) read K^T / V^T from a per-thread
// copy made once per head.
// Per thread scratch: K^T, V^T and a contiguous K or V (HS x T each) and a block or two of scores,
// probabilities and dP / dS (kBlock x T): O(threads * T * (HS + kBlock)), nothing of size T x T.
// Backward recomputes each block's scores (one more product) and their exp, instead of reading back
// a stored T x T probability array per head: at T = 256 that array is as large as the MLP's
// activations, and it grows as T^2.
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <new>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "gemm.h"
#include "isa.h"
#include "simd.h"

namespace lmlab {
namespace LMLAB_ISA_NS {
namespace {

// Register tile of the per-head product: kMR rows x kNV vectors of accumulators. AVX-512: 24 of the
// 32 zmm, plus 4 for a row of B and 1 broadcast; AVX2: 12 of 16 ymm; NEON: 24 of 32 q registers;
// portable: 16 scalars.
// Whole-vector loads and stores for the tile: going through simd.h's masked vload_n / vstore_n even
// with a constant full count made GCC 12 keep the accumulators in memory (twice the time).
#if defined(__AVX512F__)
constexpr int kMR = 6, kNV = 4;
inline vf vload(const float* p) { return _mm512_loadu_ps(p); }
inline void vstore(float* p, vf x) { _mm512_storeu_ps(p, x); }
#elif defined(__AVX2__)
constexpr int kMR = 6, kNV = 2;
inline vf vload(const float* p) { return _mm256_loadu_ps(p); }
inline void vstore(float* p, vf x) { _mm256_storeu_ps(p, x); }
#elif defined(LMLAB_NEON)  // 24 of the 32 q registers, as on AVX-512
constexpr int kMR = 6, kNV = 4;
inline vf vload(const float* p) { return vld1q_f32(p); }
inline void vstore(float* p, vf x) { vst1q_f32(p, x); }
#else
constexpr int kMR = 4, kNV = 4;
inline vf vload(const float* p) { return *p; }
inline void vstore(float* p, vf x) { *p = x; }
#endif

// --- the per-head product -------------------------------------------------------------------------

// One register tile: C[MR x (NV-1)*kW + last] (+)= alpha * A[MR x K] . B[K x same], where
// A[i, k] = A[i * rsA + k * csA] (any strides, read by broadcast) and B[k, j] = B[k * ldb + j]; the
// last vector has `last` <= kW lanes (masked loads and stores, so a ragged edge runs the same code).
// Each C element is one accumulator summed over k in ascending order.
template <int MR, int NV, bool PARTIAL>
void tile(idx_t K, float alpha, const float* A, idx_t rsA, idx_t csA, const float* B, idx_t ldb,
          float* C, idx_t ldc, bool accumulate, idx_t last) {
    vf acc[MR][NV];
    for (int r = 0; r < MR; r++)
        for (int v = 0; v < NV; v++) acc[r][v] = vset(0.0f);
    for (idx_t k = 0; k < K; k++) {
        const float* a = A + k * csA;
        const float* b = B + k * ldb;
        vf bv[NV];
        for (int v = 0; v < NV; v++)
            bv[v] = PARTIAL && v == NV - 1 ? vload_n(b + v * kW, last, 0.0f) : vload(b + v * kW);
        for (int r = 0; r < MR; r++) {
            const vf ar = vset(a[r * rsA]);
            for (int v = 0; v < NV; v++) acc[r][v] = vfmadd(ar, bv[v], acc[r][v]);
        }
    }
    const vf va = vset(alpha);
    for (int r = 0; r < MR; r++)
        for (int v = 0; v < NV; v++) {
            float* c = C + r * ldc + v * kW;
            const vf x = vmul(va, acc[r][v]);
            if (PARTIAL && v == NV - 1)
                vstore_n(c, accumulate ? vadd(vload_n(c, last, 0.0f), x) : x, last);
            else
                vstore(c, accumulate ? vadd(vload(c), x) : x);
        }
}

// The last rows of a strip, M % kMR of them: tile<rows, NV> for the run-time count `rows` < R.
template <int NV, bool PARTIAL, int R>
void tail_rows(idx_t rows, idx_t K, float alpha, const float* A, idx_t rsA, idx_t csA,
               const float* B, idx_t ldb, float* C, idx_t ldc, bool accumulate, idx_t last) {
    if constexpr (R > 1) {
        if (rows == R - 1) tile<R - 1, NV, PARTIAL>(K, alpha, A, rsA, csA, B, ldb, C, ldc, accumulate, last);
        else tail_rows<NV, PARTIAL, R - 1>(rows, K, alpha, A, rsA, csA, B, ldb, C, ldc, accumulate, last);
    }
}

// All row tiles of one column strip of NV vectors.
template <int NV, bool PARTIAL>
void strip(idx_t M, idx_t K, float alpha, const float* A, idx_t rsA, idx_t csA, const float* B,
           idx_t ldb, float* C, idx_t ldc, bool accumulate, idx_t last) {
    idx_t i = 0;
    for (; i + kMR <= M; i += kMR)
        tile<kMR, NV, PARTIAL>(K, alpha, A + i * rsA, rsA, csA, B, ldb, C + i * ldc, ldc, accumulate, last);
    tail_rows<NV, PARTIAL, kMR>(M - i, K, alpha, A + i * rsA, rsA, csA, B, ldb, C + i * ldc, ldc, accumulate,
                       last);
}

// The last nv < V vectors of the columns (the final one `last` lanes wide): strip<nv>.
template <int V>
void tail_strips(idx_t nv, idx_t M, idx_t K, float alpha, const float* A, idx_t rsA, idx_t csA,
                 const float* B, idx_t ldb, float* C, idx_t ldc, bool accumulate, idx_t last) {
    if constexpr (V > 1) {
        if (nv == V - 1) strip<V - 1, true>(M, K, alpha, A, rsA, csA, B, ldb, C, ldc, accumulate, last);
        else tail_strips<V - 1>(nv, M, K, alpha, A, rsA, csA, B, ldb, C, ldc, accumulate, last);
    }
}

// C (M x N) (+)= alpha * op(A) (M x K) . B (K x N), B row-major with leading dimension ldb, C with ldc.
// Columns go in strips of kNV vectors (the B strip stays in L1/L2 while A's rows stream past), then
// one strip of the remaining vectors, its last one partial when kW does not divide N.
void head_gemm(idx_t M, idx_t N, idx_t K, float alpha, const float* A, idx_t rsA, idx_t csA,
               const float* B, idx_t ldb, float* C, idx_t ldc, bool accumulate) {
    idx_t j = 0;
    for (; j + kNV * kW <= N; j += kNV * kW)
        strip<kNV, false>(M, K, alpha, A, rsA, csA, B + j, ldb, C + j, ldc, accumulate, kW);
    if (j < N) {
        const idx_t nv = (N - j + kW - 1) / kW, last = N - j - (nv - 1) * kW;
        tail_strips<kNV + 1>(nv, M, K, alpha, A, rsA, csA, B + j, ldb, C + j, ldc, accumulate, last);
    }
}

// One per-head product in the call's precision: fp32 on the register tiles above, bf16 on gemm
// (cpp/gemm.h: the native bf16 path where the CPU has one), serial inside the head's task.
void product(Precision precision, idx_t M, idx_t N, idx_t K, float alpha, const float* A, idx_t rsA,
             idx_t csA, const float* B, idx_t ldb, float* C, idx_t ldc, bool accumulate) {
    if (precision == Precision::bf16)
        gemm(precision, M, N, K, alpha, Operand{A, rsA, csA}, Operand::rows(B, ldb),
             Output::write(C, ldc, accumulate), false);
    else
        head_gemm(M, N, K, alpha, A, rsA, csA, B, ldb, C, ldc, accumulate);
}

// --- helpers shared by forward and backward -------------------------------------------------------

// Query rows per block. A smaller block computes less of the causal upper triangle (the diagonal
// block is computed square) at more per-block cost: 32 measured faster on AVX2 (docs/DESIGN.md);
// the other variants keep 64, not measured at 32.
#if defined(__AVX2__) && !defined(__AVX512F__)
constexpr idx_t kBlock = 32;
#else
constexpr idx_t kBlock = 64;
#endif

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
// A kW x kW block at a time, transposed in registers (vtranspose), so that both the reads and the
// writes are whole vectors; the ragged edges (HS or T not a multiple of kW) element by element.
void transpose(float* dst, idx_t ld, const float* src, idx_t rs, idx_t T, idx_t HS) {
    idx_t s0 = 0;
    for (; s0 + kW <= T; s0 += kW) {
        idx_t d0 = 0;
        for (; d0 + kW <= HS; d0 += kW) {
            vf v[kW];
            for (idx_t i = 0; i < kW; i++) v[i] = vload(src + (s0 + i) * rs + d0);
            vtranspose(v);
            for (idx_t j = 0; j < kW; j++) vstore(dst + (d0 + j) * ld + s0, v[j]);
        }
        for (; d0 < HS; d0++)
            for (idx_t s = s0; s < s0 + kW; s++) dst[d0 * ld + s] = src[s * rs + d0];
    }
    for (idx_t d = 0; d < HS; d++)
        for (idx_t s = s0; s < T; s++) dst[d * ld + s] = src[s * rs + d];
}

// p[0, n) = 0 in vector stores: these rows are short (a head's HS, a block's upper triangle), and a
// memset call per row cost more than the stores themselves.
inline void zero_row(float* p, idx_t n) {
    for (idx_t i = 0; i < n; i += kW) vstore_n(p + i, vset(0.0f), n - i);
}

// dst (T x HS, rows contiguous) = the head's rows of src at stride rs. The products that stream a
// whole head's K or V as B (O = P V, dQ = dS K) read a contiguous copy, which the L1 prefetcher
// follows, rather than rows 3C apart.
void gather_rows(float* dst, const float* src, idx_t rs, idx_t T, idx_t HS) {
    for (idx_t s = 0; s < T; s++) std::memcpy(dst + s * HS, src + s * rs, (std::size_t)HS * sizeof(float));
}

// In place softmax of p[0, n), storing the row's statistics (max, 1 / sum) in stat[0..1]: max
// subtracted first so exp never overflows. Tails are masked vectors (filled with -inf, whose exp is
// 0), so every entry goes through the same vexp. (A log-sum-exp alone would not do: for scores of
// size 1e4 its float32 rounding is 1e-3 absolute, and backward's dS = P (dP - sum P dP) cancels.)
void softmax_row(float* p, idx_t n, float* stat) {
    vf vm = vset(-INFINITY);
    for (idx_t s = 0; s < n; s += kW) vm = vmax(vm, vload_n(p + s, n - s, -INFINITY));
    const float row_max = vhmax(vm);
    const vf mx = vset(row_max);
    vf sum = vset(0.0f);
    for (idx_t s = 0; s < n; s += kW) {
        const vf e = vexp(vsub(vload_n(p + s, n - s, -INFINITY), mx));
        vstore_n(p + s, e, n - s);
        sum = vadd(sum, e);
    }
    const float inv_sum = 1.0f / vhsum(sum);
    scale_row(p, p, vset(inv_sum), n, false);
    stat[0] = row_max;
    stat[1] = inv_sum;
}

// p[0, n) = exp(s - max) * (1 / sum): the row of probabilities recomputed from its scores and
// statistics by the same operations as softmax_row, so bitwise the forward's.
void probabilities_row(float* p, idx_t n, const float* stat) {
    const vf mx = vset(stat[0]);
    for (idx_t s = 0; s < n; s += kW) vstore_n(p + s, vexp(vsub(vload_n(p + s, n - s, 0.0f), mx)), n - s);
    scale_row(p, p, vset(stat[1]), n, false);
}

// Softmax backward of one row in O(n): ds[s] = p[s] * (dp[s] - sum_s' p[s'] dp[s']), in place on dp.
void softmax_backward_row(float* dp, const float* p, idx_t n) {
    vf acc = vset(0.0f);
    for (idx_t s = 0; s < n; s += kW) acc = vfmadd(vload_n(p + s, n - s, 0.0f), vload_n(dp + s, n - s, 0.0f), acc);
    const vf dot = vset(vhsum(acc));
    for (idx_t s = 0; s < n; s += kW)
        vstore_n(dp + s, vmul(vload_n(p + s, n - s, 0.0f), vsub(vload_n(dp + s, n - s, 0.0f), dot)), n - s);
}

// S = scale * Q K^T for query rows [i0, i0 + m) and keys [0, kend) into sb (ld Tp): the keys this
// block can see.
inline void scores_block(Precision precision, idx_t m, idx_t kend, idx_t HS, float scale, const float* qrows,
                         idx_t C3, const float* kt, idx_t Tp, float* sb) {
    product(precision, m, kend, HS, scale, qrows, C3, 1, kt, Tp, sb, Tp, false);
}

}  // namespace

void attention_forward(float* out, float* stats, const float* qkv, idx_t B, idx_t T, idx_t C,
                       idx_t NH, Precision precision) {
    const idx_t C3 = 3 * C, HS = C / NH, Tp = padded(T);
    const float scale = 1.0f / std::sqrt((float)HS);
    const bool parallel = B * NH * T * T * HS / 2 >= kParallelWork;
    idx_t stride;
    float* scratch = alloc_team_scratch(whole_lines(HS * Tp) + whole_lines(HS * T) + kBlock * Tp,
                                        parallel, &stride);
#pragma omp parallel if (parallel)
    {
        float* kt = scratch + thread_id() * stride;  // K^T of the current head
        float* vp = kt + whole_lines(HS * Tp);       // V of the current head, rows contiguous
        float* sb = vp + whole_lines(HS * T);        // scores, then probabilities, of one block
#pragma omp for collapse(2) schedule(dynamic, 1)
        for (idx_t b = 0; b < B; b++)
            for (idx_t h = 0; h < NH; h++) {
                const float* q = qkv + b * T * C3 + h * HS;
                const float* v = q + 2 * C;
                float* st = stats + (b * NH + h) * T * 2;
                float* o = out + b * T * C + h * HS;
                transpose(kt, Tp, q + C, C3, T, HS);
                gather_rows(vp, v, C3, T, HS);
                for (idx_t i0 = 0; i0 < T; i0 += kBlock) {
                    const idx_t m = T - i0 < kBlock ? T - i0 : kBlock, kend = i0 + m;
                    scores_block(precision, m, kend, HS, scale, q + i0 * C3, C3, kt, Tp, sb);
                    for (idx_t r = 0; r < m; r++) {
                        float* row = sb + r * Tp;
                        const idx_t t = i0 + r;
                        softmax_row(row, t + 1, st + 2 * t);
                        zero_row(row + t + 1, kend - t - 1);
                    }
                    // O = P V; the zeros above the diagonal make the square diagonal block exact.
                    product(precision, m, HS, kend, 1.0f, sb, Tp, 1, vp, HS, o + i0 * C, C, false);
                }
            }
    }
    std::free(scratch);
}

void attention_backward(float* dqkv, const float* dout, const float* qkv, const float* stats, idx_t B,
                        idx_t T, idx_t C, idx_t NH, Precision precision, bool accumulate) {
    const idx_t C3 = 3 * C, HS = C / NH, Tp = padded(T);
    const float scale = 1.0f / std::sqrt((float)HS);
    const bool parallel = B * NH * T * T * HS / 2 >= kParallelWork;
    idx_t stride;
    float* scratch = alloc_team_scratch(2 * whole_lines(HS * Tp) + whole_lines(HS * T) + 2 * kBlock * Tp,
                                        parallel, &stride);
#pragma omp parallel if (parallel)
    {
        float* kt = scratch + thread_id() * stride;  // K^T of the current head
        float* vt = kt + whole_lines(HS * Tp);       // V^T of the current head
        float* kp = vt + whole_lines(HS * Tp);       // K of the current head, rows contiguous
        float* pb = kp + whole_lines(HS * T);        // P of one query block, recomputed
        float* ds = pb + kBlock * Tp;                // dP, then dS, of one query block
#pragma omp for collapse(2) schedule(dynamic, 1)
        for (idx_t b = 0; b < B; b++)
            for (idx_t h = 0; h < NH; h++) {
                const float* q = qkv + b * T * C3 + h * HS;
                const float* k = q + C;
                const float* st = stats + (b * NH + h) * T * 2;
                const float* dy = dout + b * T * C + h * HS;
                float* dq = dqkv + b * T * C3 + h * HS;
                float* dk = dq + C;
                float* dv = dq + 2 * C;
                if (!accumulate)  // this head's slice of dqkv, zeroed where it is about to be summed
                    for (idx_t t = 0; t < T; t++) {
                        zero_row(dq + t * C3, HS);
                        zero_row(dk + t * C3, HS);
                        zero_row(dv + t * C3, HS);
                    }
                transpose(kt, Tp, k, C3, T, HS);
                transpose(vt, Tp, q + 2 * C, C3, T, HS);
                gather_rows(kp, k, C3, T, HS);
                for (idx_t i0 = 0; i0 < T; i0 += kBlock) {
                    const idx_t m = T - i0 < kBlock ? T - i0 : kBlock, kend = i0 + m;
                    const float* dyb = dy + i0 * C;
                    // P recomputed rather than kept from the forward pass: O(1) saved per row
                    // instead of O(T^2) per head.
                    scores_block(precision, m, kend, HS, scale, q + i0 * C3, C3, kt, Tp, pb);
                    for (idx_t r = 0; r < m; r++) {
                        const idx_t t = i0 + r;
                        probabilities_row(pb + r * Tp, t + 1, st + 2 * t);
                        zero_row(pb + r * Tp + t + 1, kend - t - 1);
                    }
                    // dP = dO V^T, then dS = P * (dP - rowsum(P * dP)) row by row (zero above the
                    // diagonal, so the transposed products below can run over the square block).
                    product(precision, m, kend, HS, 1.0f, dyb, C, 1, vt, Tp, ds, Tp, false);
                    for (idx_t r = 0; r < m; r++) {
                        const idx_t t = i0 + r;
                        softmax_backward_row(ds + r * Tp, pb + r * Tp, t + 1);
                        zero_row(ds + r * Tp + t + 1, kend - t - 1);
                    }
                    // dQ += scale dS K; dK += scale dS^T Q; dV += P^T dO. Key rows [0, kend) gather
                    // one partial sum per query block, added in block order.
                    product(precision, m, HS, kend, scale, ds, Tp, 1, kp, HS, dq + i0 * C3, C3, true);
                    product(precision, kend, HS, m, scale, ds, 1, Tp, q + i0 * C3, C3, dk, C3, true);
                    product(precision, kend, HS, m, 1.0f, pb, 1, Tp, dyb, C, dv, C3, true);
                }
            }
    }
    std::free(scratch);
}

}  // namespace LMLAB_ISA_NS
}  // namespace lmlab

// gemm: the general matrix product behind matmul and attention.
//   C (M, N) = alpha * op(A) (M, K) . op(B) (K, N)  [+ C]
// op(A)[m, k] = A[m * rsA + k * csA], op(B)[k, n] = B[k * rsB + n * csB], C row-major (ldc).
//
// The tuned path is the classic blocked design (Goto / BLIS):
//   for each NC-wide column block of C:
//     for each KC-deep slice of the reduction:      pack op(B) slice into NR-wide panels (L2)
//       for each MC-tall row block:                 pack op(A) block into MR-tall panels
//         for each MR panel (L1), each NR panel:    micro-kernel: an MR x NR tile of C held in
//                                                   registers, a slice of rank-1 updates
// Packing copies any stride pattern (transposes included) into contiguous, aligned panels and folds
// alpha into A, so one micro-kernel serves every case; edge panels are zero-padded, so edge tiles run
// the very same kernel and only their write-back is partial.
//
// Determinism: every C element is computed by the same micro-kernel instruction sequence over the
// same KC slices in the same order; the slice depth depends on K alone. Threads only divide the
// output (rows or columns of C), so results are bitwise identical for any thread count, and equal to
// a serial call (the attention kernel calls gemm with parallel = false inside its own team).
//
// Each instruction-set build picks its own micro-kernel below: AVX-512 (14 x 32, two zmm wide),
// AVX2+FMA (6 x 16, two ymm wide), and portable C++ the compiler vectorises as it can (4 x 8).
#include <cstdlib>

#include "gemm_internal.h"
#include "isa.h"

#if defined(__AVX512F__) || defined(__AVX2__)
// GCC 12 reports its own _mm512_undefined_ps() placeholders inside the unpack intrinsics as "maybe
// uninitialized" (GCC bug 105593); silence that inside the intrinsics header only.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop
#endif
#ifdef _OPENMP
#include <omp.h>
#endif

namespace lmlab {
namespace LMLAB_ISA_NS {

void gemm_reference(idx_t M, idx_t N, idx_t K, float alpha, const float* A, idx_t rsA, idx_t csA,
                    const float* B, idx_t rsB, idx_t csB, float* C, idx_t ldc, bool accumulate,
                    bool parallel) {
#pragma omp parallel for schedule(static) if (parallel)
    for (idx_t m = 0; m < M; m++) {
        for (idx_t n = 0; n < N; n++) {
            float acc = 0.0f;
            for (idx_t k = 0; k < K; k++) acc += A[m * rsA + k * csA] * B[k * rsB + n * csB];
            float* c = &C[m * ldc + n];
            *c = accumulate ? *c + alpha * acc : alpha * acc;
        }
    }
}

namespace {

// Register tile (MR x NR) and cache blocks. The micro-kernel runs along a row of tiles: one packed A
// micro-panel (MR x KC, 21 KB for AVX-512) is reused from L1 while the B micro-panels stream past it
// from the 2 MB L2, which holds the packed KC x NC slice of B (1.2 MB) that every row block reuses.
// A deep KC matters as much: C is read and written once per slice, and at KC = 384 the GPT widths
// (C = 384, 4C = 1536) need one slice and four.
#if defined(__AVX512F__)
constexpr int MR = 14, NR = 32;
constexpr idx_t KC = 384, MC = 14 * 24, NC = 768;
#elif defined(__AVX2__)
constexpr int MR = 6, NR = 16;
constexpr idx_t KC = 256, MC = 6 * 32, NC = 1024;
#else
constexpr int MR = 4, NR = 8;
constexpr idx_t KC = 256, MC = 4 * 32, NC = 512;
#endif

// Products smaller than this many multiply-adds run on one thread: waking the team costs more.
constexpr double kParallelMinWork = 1 << 18;

inline idx_t ceil_div(idx_t a, idx_t b) { return (a + b - 1) / b; }
inline idx_t min_idx(idx_t a, idx_t b) { return a < b ? a : b; }

// Slice depth: K cut into equal slices of at most KC, a function of K alone (see Determinism).
inline idx_t slice_depth(idx_t K) { return ceil_div(K, ceil_div(K, KC)); }

// Per-thread packing buffers, grown on demand and kept for the thread's lifetime, so repeated calls
// (the attention heads, every training step) never touch the allocator.
struct Scratch {
    float* data = nullptr;
    size_t capacity = 0;  // floats
    Scratch() = default;
    Scratch(const Scratch&) = delete;
    Scratch& operator=(const Scratch&) = delete;
    ~Scratch() { std::free(data); }
    float* get(size_t n) {
        if (n > capacity) {
            std::free(data);
            const size_t bytes = (n * sizeof(float) + 63) / 64 * 64;
            data = static_cast<float*>(std::aligned_alloc(64, bytes));
            capacity = data != nullptr ? n : 0;
        }
        return data;
    }
};
thread_local Scratch tl_pack_a;
thread_local Scratch tl_pack_b;

// --- packing ---------------------------------------------------------------------------------------
// A panel of P lanes (rows of op(A) or columns of op(B)) over kb steps of the reduction:
//   dst[k * P + r] = scale * src[k * sk + r * sr] for r < w, and 0 for w <= r < P.

#if defined(__AVX512F__)
// In-register transpose of a 16 x 16 block: v[i][j] becomes v[j][i].
inline void transpose16(__m512 v[16]) {
    __m512 t[16];
    for (int i = 0; i < 16; i += 2) {
        t[i] = _mm512_unpacklo_ps(v[i], v[i + 1]);
        t[i + 1] = _mm512_unpackhi_ps(v[i], v[i + 1]);
    }
    // u[4g + c] holds, in 128-bit lane L, rows 4g..4g+3 of column c + 4L.
    __m512 u[16];
    for (int g = 0; g < 16; g += 4) {
        const __m512d a = _mm512_castps_pd(t[g]), b = _mm512_castps_pd(t[g + 1]);
        const __m512d c = _mm512_castps_pd(t[g + 2]), d = _mm512_castps_pd(t[g + 3]);
        u[g] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
        u[g + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
        u[g + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
        u[g + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
    }
    for (int c = 0; c < 4; c++) {
        const __m512 even01 = _mm512_shuffle_f32x4(u[c], u[4 + c], 0x88);
        const __m512 odd01 = _mm512_shuffle_f32x4(u[c], u[4 + c], 0xDD);
        const __m512 even23 = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0x88);
        const __m512 odd23 = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0xDD);
        v[c] = _mm512_shuffle_f32x4(even01, even23, 0x88);
        v[c + 8] = _mm512_shuffle_f32x4(even01, even23, 0xDD);
        v[c + 4] = _mm512_shuffle_f32x4(odd01, odd23, 0x88);
        v[c + 12] = _mm512_shuffle_f32x4(odd01, odd23, 0xDD);
    }
}
constexpr int kTransposeBlock = 16;
#elif defined(__AVX2__)
// In-register transpose of an 8 x 8 block: v[i][j] becomes v[j][i].
inline void transpose8(__m256 v[8]) {
    __m256 t[8], u[8];
    for (int i = 0; i < 8; i += 2) {
        t[i] = _mm256_unpacklo_ps(v[i], v[i + 1]);
        t[i + 1] = _mm256_unpackhi_ps(v[i], v[i + 1]);
    }
    for (int g = 0; g < 8; g += 4) {
        const __m256d a = _mm256_castps_pd(t[g]), b = _mm256_castps_pd(t[g + 1]);
        const __m256d c = _mm256_castps_pd(t[g + 2]), d = _mm256_castps_pd(t[g + 3]);
        u[g] = _mm256_castpd_ps(_mm256_unpacklo_pd(a, c));
        u[g + 1] = _mm256_castpd_ps(_mm256_unpackhi_pd(a, c));
        u[g + 2] = _mm256_castpd_ps(_mm256_unpacklo_pd(b, d));
        u[g + 3] = _mm256_castpd_ps(_mm256_unpackhi_pd(b, d));
    }
    for (int c = 0; c < 4; c++) {
        v[c] = _mm256_permute2f128_ps(u[c], u[4 + c], 0x20);
        v[c + 4] = _mm256_permute2f128_ps(u[c], u[4 + c], 0x31);
    }
}
constexpr int kTransposeBlock = 8;
#else
constexpr int kTransposeBlock = 8;
#endif

// Lanes contiguous in memory (sr == 1): straight copies.
template <int P>
void pack_lanes_contiguous(float* dst, const float* src, idx_t sk, int w, idx_t kb, float scale) {
#if defined(__AVX512F__)
    // One masked load and store per 16 lanes and step: the compiler's own code for P = 14 falls back
    // to pieces, and with narrow C (N = 128) packing A is a fifth of the work.
    const __m512 vscale = _mm512_set1_ps(scale);
    for (int g = 0; g < P; g += 16) {
        const int valid = w - g < 0 ? 0 : (w - g < 16 ? w - g : 16), lanes = P - g < 16 ? P - g : 16;
        const __mmask16 load = (__mmask16)((1u << valid) - 1), store = (__mmask16)((1u << lanes) - 1);
        for (idx_t k = 0; k < kb; k++)
            _mm512_mask_storeu_ps(dst + k * P + g, store,
                                  _mm512_mul_ps(_mm512_maskz_loadu_ps(load, src + k * sk + g), vscale));
    }
#else
    if (w == P) {
        for (idx_t k = 0; k < kb; k++)
            for (int r = 0; r < P; r++) dst[k * P + r] = scale * src[k * sk + r];
    } else {
        for (idx_t k = 0; k < kb; k++)
            for (int r = 0; r < P; r++) dst[k * P + r] = r < w ? scale * src[k * sk + r] : 0.0f;
    }
#endif
}

// The reduction contiguous in memory (sk == 1), lanes strided: a transpose, done a square block at
// a time in registers so that both the reads and the writes stay sequential.
template <int P>
void pack_lanes_transposed(float* dst, const float* src, idx_t sr, int w, idx_t kb, float scale) {
    constexpr int TB = kTransposeBlock;
    idx_t k0 = 0;
#if defined(__AVX512F__)
    const __m512 vscale = _mm512_set1_ps(scale);
    for (; k0 + TB <= kb; k0 += TB) {
        for (int g = 0; g < P; g += TB) {
            __m512 v[TB];
            for (int i = 0; i < TB; i++)
                v[i] = g + i < w ? _mm512_loadu_ps(src + (g + i) * sr + k0) : _mm512_setzero_ps();
            transpose16(v);
            const __mmask16 keep = P - g >= TB ? (__mmask16)0xFFFF : (__mmask16)((1u << (P - g)) - 1);
            for (int j = 0; j < TB; j++)
                _mm512_mask_storeu_ps(dst + (k0 + j) * P + g, keep, _mm512_mul_ps(v[j], vscale));
        }
    }
#elif defined(__AVX2__)
    const __m256 vscale = _mm256_set1_ps(scale);
    for (; k0 + TB <= kb; k0 += TB) {
        for (int g = 0; g < P; g += TB) {
            __m256 v[TB];
            for (int i = 0; i < TB; i++)
                v[i] = g + i < w ? _mm256_loadu_ps(src + (g + i) * sr + k0) : _mm256_setzero_ps();
            transpose8(v);
            if (P - g >= TB) {
                for (int j = 0; j < TB; j++)
                    _mm256_storeu_ps(dst + (k0 + j) * P + g, _mm256_mul_ps(v[j], vscale));
            } else {
                alignas(32) int lanes[TB];
                for (int i = 0; i < TB; i++) lanes[i] = i < P - g ? -1 : 0;
                const __m256i keep = _mm256_load_si256(reinterpret_cast<const __m256i*>(lanes));
                for (int j = 0; j < TB; j++)
                    _mm256_maskstore_ps(dst + (k0 + j) * P + g, keep, _mm256_mul_ps(v[j], vscale));
            }
        }
    }
#else
    for (; k0 + TB <= kb; k0 += TB)
        for (int r = 0; r < P; r++)
            for (int j = 0; j < TB; j++)
                dst[(k0 + j) * P + r] = r < w ? scale * src[r * sr + k0 + j] : 0.0f;
#endif
    for (; k0 < kb; k0++)
        for (int r = 0; r < P; r++) dst[k0 * P + r] = r < w ? scale * src[r * sr + k0] : 0.0f;
}

template <int P>
void pack_panel(float* dst, const float* src, idx_t sk, idx_t sr, int w, idx_t kb, float scale) {
    if (sr == 1) {
        pack_lanes_contiguous<P>(dst, src, sk, w, kb, scale);
    } else if (sk == 1) {
        pack_lanes_transposed<P>(dst, src, sr, w, kb, scale);
    } else {
        for (idx_t k = 0; k < kb; k++)
            for (int r = 0; r < P; r++) dst[k * P + r] = r < w ? scale * src[k * sk + r * sr] : 0.0f;
    }
}

// Packs `lanes` lanes as consecutive P-lane panels of depth kb (the last one zero-padded).
template <int P>
void pack_block(float* dst, const float* src, idx_t sk, idx_t sr, idx_t lanes, idx_t kb,
                float scale) {
    for (idx_t p0 = 0; p0 < lanes; p0 += P) {
        const int w = (int)min_idx(P, lanes - p0);
        pack_panel<P>(dst + p0 * kb, src + p0 * sr, sk, sr, w, kb, scale);
    }
}

// --- micro-kernel ----------------------------------------------------------------------------------
// c (mr x nr of an MR x NR tile, row stride ldc) = init + a-panel . b-panel over kb steps, where init
// is c itself (add), the bias row, or zero. Full tiles write straight from registers; edge tiles go
// through `tile` so that the same additions happen in the same order either way.

inline void write_back_edge(const float* tile, float* c, idx_t ldc, int mr, int nr,
                            const float* bias, bool add) {
    for (int i = 0; i < mr; i++) {
        float* ci = c + i * ldc;
        const float* ti = tile + i * NR;
        if (add) {
            for (int j = 0; j < nr; j++) ci[j] = ci[j] + ti[j];
        } else if (bias != nullptr) {
            for (int j = 0; j < nr; j++) ci[j] = bias[j] + ti[j];
        } else {
            for (int j = 0; j < nr; j++) ci[j] = ti[j];
        }
    }
}

#if defined(__AVX512F__) || defined(__AVX2__)
// Asks for the C tile's cache lines at the start of the kernel, so that the write-back at its end
// (a read too when accumulating) does not stall on lines that have left the cache since the previous
// slice.
inline void prefetch_tile(const float* c, idx_t ldc, int mr) {
    for (int i = 0; i < mr; i++) {
        _mm_prefetch(reinterpret_cast<const char*>(c + i * ldc), _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(c + i * ldc + NR - 1), _MM_HINT_T0);
    }
}
#endif

#if defined(__AVX512F__)
void micro_kernel(idx_t kb, const float* a, const float* b, float* c, idx_t ldc, int mr, int nr,
                  const float* bias, bool add) {
    prefetch_tile(c, ldc, mr);
    __m512 c0[MR], c1[MR];
#pragma GCC unroll 16
    for (int i = 0; i < MR; i++) c0[i] = c1[i] = _mm512_setzero_ps();
#pragma GCC unroll 2
    for (idx_t k = 0; k < kb; k++) {
        const __m512 b0 = _mm512_load_ps(b), b1 = _mm512_load_ps(b + 16);
#pragma GCC unroll 16
        for (int i = 0; i < MR; i++) {
            const __m512 ai = _mm512_set1_ps(a[i]);
            c0[i] = _mm512_fmadd_ps(ai, b0, c0[i]);
            c1[i] = _mm512_fmadd_ps(ai, b1, c1[i]);
        }
        a += MR;
        b += NR;
    }
    if (mr == MR && nr == NR) {
#pragma GCC unroll 16
        for (int i = 0; i < MR; i++) {
            float* ci = c + i * ldc;
            if (add) {
                c0[i] = _mm512_add_ps(_mm512_loadu_ps(ci), c0[i]);
                c1[i] = _mm512_add_ps(_mm512_loadu_ps(ci + 16), c1[i]);
            } else if (bias != nullptr) {
                c0[i] = _mm512_add_ps(_mm512_loadu_ps(bias), c0[i]);
                c1[i] = _mm512_add_ps(_mm512_loadu_ps(bias + 16), c1[i]);
            }
            _mm512_storeu_ps(ci, c0[i]);
            _mm512_storeu_ps(ci + 16, c1[i]);
        }
        return;
    }
    alignas(64) float tile[MR * NR];
    for (int i = 0; i < MR; i++) {
        _mm512_store_ps(tile + i * NR, c0[i]);
        _mm512_store_ps(tile + i * NR + 16, c1[i]);
    }
    write_back_edge(tile, c, ldc, mr, nr, bias, add);
}
#elif defined(__AVX2__)
// Twelve accumulators named one by one: with an array, GCC 12 writes the whole tile back to the stack
// on every step of the loop.
void micro_kernel(idx_t kb, const float* a, const float* b, float* c, idx_t ldc, int mr, int nr,
                  const float* bias, bool add) {
    static_assert(MR == 6 && NR == 16, "the AVX2 micro-kernel is written out for a 6 x 16 tile");
    prefetch_tile(c, ldc, mr);
    __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00;
    __m256 c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
    for (idx_t k = 0; k < kb; k++) {
        const __m256 b0 = _mm256_load_ps(b), b1 = _mm256_load_ps(b + 8);
#define LMLAB_GEMM_ROW(i)                                \
    {                                                    \
        const __m256 ai = _mm256_broadcast_ss(a + i);    \
        c##i##0 = _mm256_fmadd_ps(ai, b0, c##i##0);      \
        c##i##1 = _mm256_fmadd_ps(ai, b1, c##i##1);      \
    }
        LMLAB_GEMM_ROW(0) LMLAB_GEMM_ROW(1) LMLAB_GEMM_ROW(2)
        LMLAB_GEMM_ROW(3) LMLAB_GEMM_ROW(4) LMLAB_GEMM_ROW(5)
#undef LMLAB_GEMM_ROW
        a += MR;
        b += NR;
    }
    alignas(32) float tile[MR * NR];
    const __m256 rows[MR][2] = {{c00, c01}, {c10, c11}, {c20, c21}, {c30, c31}, {c40, c41}, {c50, c51}};
    if (mr == MR && nr == NR) {
        for (int i = 0; i < MR; i++) {
            float* ci = c + i * ldc;
            __m256 lo = rows[i][0], hi = rows[i][1];
            if (add) {
                lo = _mm256_add_ps(_mm256_loadu_ps(ci), lo);
                hi = _mm256_add_ps(_mm256_loadu_ps(ci + 8), hi);
            } else if (bias != nullptr) {
                lo = _mm256_add_ps(_mm256_loadu_ps(bias), lo);
                hi = _mm256_add_ps(_mm256_loadu_ps(bias + 8), hi);
            }
            _mm256_storeu_ps(ci, lo);
            _mm256_storeu_ps(ci + 8, hi);
        }
        return;
    }
    for (int i = 0; i < MR; i++) {
        _mm256_store_ps(tile + i * NR, rows[i][0]);
        _mm256_store_ps(tile + i * NR + 8, rows[i][1]);
    }
    write_back_edge(tile, c, ldc, mr, nr, bias, add);
}
#else
void micro_kernel(idx_t kb, const float* a, const float* b, float* c, idx_t ldc, int mr, int nr,
                  const float* bias, bool add) {
    float tile[MR * NR] = {};
    for (idx_t k = 0; k < kb; k++) {
        for (int i = 0; i < MR; i++) {
            const float ai = a[i];
            for (int j = 0; j < NR; j++) tile[i * NR + j] += ai * b[j];
        }
        a += MR;
        b += NR;
    }
    write_back_edge(tile, c, ldc, mr, nr, bias, add);
}
#endif

// --- one thread's share ----------------------------------------------------------------------------
// The blocked product on one thread over a sub-block of C. Returns false (having written nothing)
// if its scratch could not be allocated.
bool gemm_blocked(idx_t M, idx_t N, idx_t K, float alpha, const float* A, idx_t rsA, idx_t csA,
                  const float* B, idx_t rsB, idx_t csB, float* C, idx_t ldc, const float* bias,
                  bool accumulate) {
    const idx_t kc = slice_depth(K);
    const idx_t mc = min_idx(MC, ceil_div(M, MR) * MR), nc = min_idx(NC, ceil_div(N, NR) * NR);
    float* pa = tl_pack_a.get((size_t)(mc * kc));
    float* pb = tl_pack_b.get((size_t)(nc * kc));
    if (pa == nullptr || pb == nullptr) return false;
    for (idx_t jc = 0; jc < N; jc += NC) {
        const idx_t nb = min_idx(NC, N - jc);
        for (idx_t pc = 0; pc < K; pc += kc) {
            const idx_t kb = min_idx(kc, K - pc);
            pack_block<NR>(pb, B + pc * rsB + jc * csB, rsB, csB, nb, kb, 1.0f);
            const bool add = accumulate || pc > 0;
            const float* row_init = add || bias == nullptr ? nullptr : bias + jc;
            for (idx_t ic = 0; ic < M; ic += MC) {
                const idx_t mb = min_idx(MC, M - ic);
                pack_block<MR>(pa, A + ic * rsA + pc * csA, csA, rsA, mb, kb, alpha);
                for (idx_t ir = 0; ir < mb; ir += MR) {
                    const int mr = (int)min_idx(MR, mb - ir);
                    for (idx_t jr = 0; jr < nb; jr += NR) {
                        const int nr = (int)min_idx(NR, nb - jr);
                        micro_kernel(kb, pa + ir * kb, pb + jr * kb, C + (ic + ir) * ldc + jc + jr,
                                     ldc, mr, nr, row_init == nullptr ? nullptr : row_init + jr,
                                     add);
                    }
                }
            }
        }
    }
    return true;
}

// One thread's share, falling back to the reference loop if scratch is unavailable.
void gemm_share(idx_t M, idx_t N, idx_t K, float alpha, const float* A, idx_t rsA, idx_t csA,
                const float* B, idx_t rsB, idx_t csB, float* C, idx_t ldc, const float* bias,
                bool accumulate) {
    if (gemm_blocked(M, N, K, alpha, A, rsA, csA, B, rsB, csB, C, ldc, bias, accumulate)) return;
    gemm_reference(M, N, K, alpha, A, rsA, csA, B, rsB, csB, C, ldc, accumulate, false);
    if (bias != nullptr && !accumulate)
        for (idx_t m = 0; m < M; m++)
            for (idx_t n = 0; n < N; n++) C[m * ldc + n] = bias[n] + C[m * ldc + n];
}

// Splits C between the threads and runs each share. The split is along whichever of M and N is
// larger, so the operand every thread packs in full (B when splitting rows, A when splitting
// columns) is the smaller one; shares are whole register tiles.
void gemm_dispatch(idx_t M, idx_t N, idx_t K, float alpha, const float* A, idx_t rsA, idx_t csA,
                   const float* B, idx_t rsB, idx_t csB, float* C, idx_t ldc, const float* bias,
                   bool accumulate, bool parallel) {
    if (M <= 0 || N <= 0) return;
    if (K <= 0) {
        if (accumulate) return;
        for (idx_t m = 0; m < M; m++)
            for (idx_t n = 0; n < N; n++) C[m * ldc + n] = bias != nullptr ? bias[n] : 0.0f;
        return;
    }
    int threads = 1;
#ifdef _OPENMP
    if (parallel && !omp_in_parallel() && (double)M * N * K >= kParallelMinWork)
        threads = omp_get_max_threads();
#else
    (void)parallel;
#endif
    const bool split_rows = M >= N;
    const idx_t tiles = split_rows ? ceil_div(M, MR) : ceil_div(N, NR);
    if (threads > tiles) threads = (int)tiles;
    if (threads <= 1) {
        gemm_share(M, N, K, alpha, A, rsA, csA, B, rsB, csB, C, ldc, bias, accumulate);
        return;
    }
#pragma omp parallel num_threads(threads)
    {
#ifdef _OPENMP
        const idx_t t = omp_get_thread_num(), team = omp_get_num_threads();
#else
        const idx_t t = 0, team = 1;
#endif
        const idx_t first = tiles * t / team, last = tiles * (t + 1) / team;
        if (split_rows) {
            const idx_t m0 = first * MR, m1 = min_idx(last * MR, M);
            if (m1 > m0)
                gemm_share(m1 - m0, N, K, alpha, A + m0 * rsA, rsA, csA, B, rsB, csB, C + m0 * ldc,
                           ldc, bias, accumulate);
        } else {
            const idx_t n0 = first * NR, n1 = min_idx(last * NR, N);
            if (n1 > n0)
                gemm_share(M, n1 - n0, K, alpha, A, rsA, csA, B + n0 * csB, rsB, csB, C + n0, ldc,
                           bias != nullptr ? bias + n0 : nullptr, accumulate);
        }
    }
}

}  // namespace

void gemm(idx_t M, idx_t N, idx_t K, float alpha, const float* A, idx_t rsA, idx_t csA,
          const float* B, idx_t rsB, idx_t csB, float* C, idx_t ldc, bool accumulate,
          bool parallel) {
    gemm_dispatch(M, N, K, alpha, A, rsA, csA, B, rsB, csB, C, ldc, nullptr, accumulate, parallel);
}

void gemm_bias(idx_t M, idx_t N, idx_t K, float alpha, const float* A, idx_t rsA, idx_t csA,
               const float* B, idx_t rsB, idx_t csB, float* C, idx_t ldc, const float* bias,
               bool parallel) {
    gemm_dispatch(M, N, K, alpha, A, rsA, csA, B, rsB, csB, C, ldc, bias, false, parallel);
}

}  // namespace LMLAB_ISA_NS
}  // namespace lmlab

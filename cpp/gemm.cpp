// gemm: the matrix product behind matmul and attention,
//   C (M, N) = init + alpha * A (M, K) . B (K, N)   (Operand, Output and the contract: cpp/gemm.h)
// This file holds the dispatcher gemm, the fp32 path, the emulated bf16 path and the reference loop.
//
// The tuned path is the classic blocked design (Goto / BLIS):
//   for each NC-wide column block of C:
//     for each KC-deep slice of the reduction:      pack op(B) slice into NR-wide panels (L2)
//       for each MC-tall row block:                 pack op(A) block into MR-tall panels
//         for each MR panel (L1), each NR panel:    micro-kernel: an MR x NR tile of C held in
//                                                   registers, a slice of rank-1 updates
// Packing copies any stride pattern (transposes included) into contiguous, aligned panels and folds
// alpha into A (the emulated bf16 path then rounds both panels), so one micro-kernel serves every
// case; edge panels are zero-padded, so edge tiles run the very same kernel and only their
// write-back is partial.
//
// C of at most kDirectRows rows (generation's new token) skips all that, in either precision and on
// every bf16 path: packing for a register tile one row cannot fill cost more than the product, which
// is formed from the operands as they lie (gemm_direct, below).
//
// Determinism: every C element is computed by the same micro-kernel instruction sequence over the
// same KC slices in the same order; the slice depth depends on K alone (with at most kDirectRows
// rows, by gemm_direct's sequence, which depends on K alone too). Threads only divide the output
// (rows or columns of C), so results are bitwise identical for any thread count, and equal to a
// serial call (the attention kernel calls gemm with parallel = false inside its own team).
//
// On several threads (gemm_blocked_parallel) the team shares one packed slice of B, packed by all of
// them, and takes C's rows a unit at a time as each thread comes free; C too thin for that is split
// into one share per thread, each packing its own.
//
// Each instruction-set build picks its own micro-kernel below: AVX-512 (14 x 32, two zmm wide),
// AVX2+FMA (6 x 16, two ymm wide), NEON (8 x 12, three q registers wide), and portable C++ the
// compiler vectorises as it can (4 x 8).
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "gemm.h"
#include "gemm_internal.h"
#include "isa.h"
#include "simd.h"  // vf, kW, vload_n / vstore_n / vmul / vset; <immintrin.h> or <arm_neon.h>


namespace lmlab {
namespace LMLAB_ISA_NS {

void gemm_reference(Precision precision, idx_t M, idx_t N, idx_t K, float alpha, Operand A,
                    Operand B, Output C) {
    const bool bf16 = precision == Precision::bf16;
    for (idx_t m = 0; m < M; m++) {
        for (idx_t n = 0; n < N; n++) {
            float acc = 0.0f;
            for (idx_t k = 0; k < K; k++) {
                float a = alpha * A.at(m, k), b = B.at(k, n);
                if (bf16) {
                    round_to_bf16(&a, 1);
                    round_to_bf16(&b, 1);
                }
                acc += a * b;
            }
            float* c = &C.data[m * C.ld + n];
            const float init = C.accumulate ? *c : C.bias != nullptr ? C.bias[n] : 0.0f;
            *c = init + acc;
        }
    }
}

// Precision::bf16 without native instructions: each packed operand rounded to bfloat16 (nearest,
// ties to even: bf16_nearest in simd.h) and kept in fp32 lanes, so the fp32 micro-kernel multiplies
// exactly the values the native paths do.
void round_to_bf16(float* x, size_t n) {
    LMLAB_SIMD
    for (size_t i = 0; i < n; i++) x[i] = bf16_nearest(x[i]);
}

void round_bf16(float* out, const float* inp, idx_t n) {
    if (out != inp) std::memcpy(out, inp, (size_t)n * sizeof(float));
    round_to_bf16(out, (size_t)n);
}

// GCC 12 does not emit the destructor of a class-template thread_local on its own: instantiate it.
template struct Scratch<float>;

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
#elif defined(LMLAB_NEON)
// KC x NC of B (768 KB) for a 1 MB L2 (Graviton, Neoverse); larger caches (Apple) hold it too.
constexpr int MR = 8, NR = 12;
constexpr idx_t KC = 256, MC = 8 * 24, NC = 768;
#else
constexpr int MR = 4, NR = 8;
constexpr idx_t KC = 256, MC = 4 * 32, NC = 512;
#endif

// Products smaller than this many multiply-adds run on one thread: waking the team costs more.
constexpr double kParallelMinWork = 1 << 18;


// Slice depth: K cut into equal slices of at most KC, a function of K alone (see Determinism).
inline idx_t slice_depth(idx_t K) { return ceil_div(K, ceil_div(K, KC)); }

thread_local Scratch<float> tl_pack_a;  // see Scratch in gemm_internal.h
thread_local Scratch<float> tl_pack_b;

// --- packing ---------------------------------------------------------------------------------------


// A panel of P lanes (rows of op(A) or columns of op(B)) over kb steps of the reduction:
//   dst[k * P + r] = scale * src[k * sk + r * sr] for r < w, and 0 for w <= r < P.

#ifndef LMLAB_GEMM_VECTOR_PACKING
constexpr int kTransposeBlock = 8;
#endif

// Floats of scratch past a packed block: room for store_lanes's whole-vector store of the block's
// last row (a vector is at most 16 floats).
constexpr idx_t kPackSlack = 16;

#ifdef LMLAB_GEMM_VECTOR_PACKING
// The first `lanes` (<= kW) of x stored at dst, a row of a panel being packed. On AVX2 a masked
// store (VMASKMOVPS) is microcoded and slow on AMD's Zen cores, and packing the 6-row A panels
// did one per step of k; instead the whole vector is stored. Its extra lanes land on the next
// row of the panel (or the next panel), which the packing writes later (rows in increasing
// address order), or on kPackSlack past the block. AVX-512's masked stores are cheap: kept.
// A row of P lanes is one partial vector (P < kW) or whole ones, so a spill never lands on lanes
// of the same row written before it.
template <int P>
inline void store_lanes(float* dst, vf x, idx_t lanes) {
#if defined(__AVX2__) && !defined(__AVX512F__)
    static_assert(P < (int)kW || P % (int)kW == 0, "a spilled store would overwrite this row");
    vstore_n(dst, x, kW);
    (void)lanes;
#else
    vstore_n(dst, x, lanes);
#endif
}
#endif

// Lanes contiguous in memory (sr == 1): straight copies.
template <int P>
void pack_lanes_contiguous(float* dst, const float* src, idx_t sk, int w, idx_t kb, float scale) {
#ifdef LMLAB_GEMM_VECTOR_PACKING
    // Whole vectors with masks: the compiler's own code for P = 14 or 6 falls back to pieces, and
    // with narrow C (N = 128) packing A is a fifth of the work.
    const vf vscale = vset(scale);
    for (int g = 0; g < P; g += (int)kW) {
        const idx_t valid = w > g ? w - g : 0;
        for (idx_t k = 0; k < kb; k++)
            store_lanes<P>(dst + k * P + g, vmul(vload_n(src + k * sk + g, valid, 0.0f), vscale), P - g);
    }
#else
    for (idx_t k = 0; k < kb; k++)
        for (int r = 0; r < P; r++) dst[k * P + r] = r < w ? scale * src[k * sk + r] : 0.0f;
#endif
}

// The reduction contiguous in memory (sk == 1), lanes strided: a transpose, done a square block at
// a time in registers so that both the reads and the writes stay sequential.
template <int P>
void pack_lanes_transposed(float* dst, const float* src, idx_t sr, int w, idx_t kb, float scale) {
    constexpr int TB = kTransposeBlock;
    idx_t k0 = 0;
#ifdef LMLAB_GEMM_VECTOR_PACKING
    const vf vscale = vset(scale);
    for (; k0 + TB <= kb; k0 += TB) {
        for (int g = 0; g < P; g += TB) {
            vf v[TB];
            for (int i = 0; i < TB; i++)
                v[i] = g + i < w ? vload_n(src + (g + i) * sr + k0, TB, 0.0f) : vset(0.0f);
            vtranspose(v);
            for (int j = 0; j < TB; j++) store_lanes<P>(dst + (k0 + j) * P + g, vmul(v[j], vscale), P - g);
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
// With bf16, the packed values (scale folded in) are then rounded to bfloat16.
template <int P>
void pack_block(float* dst, const float* src, idx_t sk, idx_t sr, idx_t lanes, idx_t kb,
                float scale, bool bf16) {
    for (idx_t p0 = 0; p0 < lanes; p0 += P) {
        const int w = (int)min_idx(P, lanes - p0);
        pack_panel<P>(dst + p0 * kb, src + p0 * sr, sk, sr, w, kb, scale);
    }
    if (bf16) round_to_bf16(dst, (size_t)(ceil_div(lanes, P) * P * kb));
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
#elif defined(LMLAB_NEON)
// 8 x 12: 24 of the 32 q registers accumulate, 3 hold the row of B and 2 the column of A, whose
// lanes the multiply-adds broadcast themselves (FMLA by element). Accumulators named one by one, as
// in the AVX2 kernel: with an array, GCC 12 stores the whole tile to the stack on every step.
void micro_kernel(idx_t kb, const float* a, const float* b, float* c, idx_t ldc, int mr, int nr,
                  const float* bias, bool add) {
    static_assert(MR == 8 && NR == 12, "the NEON micro-kernel is written out for an 8 x 12 tile");
#define LMLAB_GEMM_ROW(i) float32x4_t c##i##0 = vdupq_n_f32(0.0f), c##i##1 = c##i##0, c##i##2 = c##i##0;
    LMLAB_GEMM_ROW(0) LMLAB_GEMM_ROW(1) LMLAB_GEMM_ROW(2) LMLAB_GEMM_ROW(3)
    LMLAB_GEMM_ROW(4) LMLAB_GEMM_ROW(5) LMLAB_GEMM_ROW(6) LMLAB_GEMM_ROW(7)
#undef LMLAB_GEMM_ROW
    for (idx_t k = 0; k < kb; k++) {
        const float32x4_t b0 = vld1q_f32(b), b1 = vld1q_f32(b + 4), b2 = vld1q_f32(b + 8);
        const float32x4_t a03 = vld1q_f32(a), a47 = vld1q_f32(a + 4);
#define LMLAB_GEMM_ROW(i, av, lane)                            \
    c##i##0 = vfmaq_laneq_f32(c##i##0, b0, av, lane);          \
    c##i##1 = vfmaq_laneq_f32(c##i##1, b1, av, lane);          \
    c##i##2 = vfmaq_laneq_f32(c##i##2, b2, av, lane);
        LMLAB_GEMM_ROW(0, a03, 0) LMLAB_GEMM_ROW(1, a03, 1) LMLAB_GEMM_ROW(2, a03, 2)
        LMLAB_GEMM_ROW(3, a03, 3) LMLAB_GEMM_ROW(4, a47, 0) LMLAB_GEMM_ROW(5, a47, 1)
        LMLAB_GEMM_ROW(6, a47, 2) LMLAB_GEMM_ROW(7, a47, 3)
#undef LMLAB_GEMM_ROW
        a += MR;
        b += NR;
    }
    const float32x4_t rows[MR][3] = {{c00, c01, c02}, {c10, c11, c12}, {c20, c21, c22},
                                     {c30, c31, c32}, {c40, c41, c42}, {c50, c51, c52},
                                     {c60, c61, c62}, {c70, c71, c72}};
    if (mr == MR && nr == NR) {
        for (int i = 0; i < MR; i++) {
            float* ci = c + i * ldc;
            const float* init = add ? ci : bias;
            for (int v = 0; v < 3; v++)
                vst1q_f32(ci + 4 * v, init != nullptr ? vaddq_f32(vld1q_f32(init + 4 * v), rows[i][v])
                                                      : rows[i][v]);
        }
        return;
    }
    alignas(16) float tile[MR * NR];
    for (int i = 0; i < MR; i++)
        for (int v = 0; v < 3; v++) vst1q_f32(tile + i * NR + 4 * v, rows[i][v]);
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

// --- the blocked product ---------------------------------------------------------------------------

// One row block of C against one packed slice of B (nb columns, kb deep, starting at column jc and
// depth pc): packs the block's rows of op(A) into pa, then runs the micro-kernel over every
// register tile. `add`: the tiles add to C (a later slice, or an accumulating product); else they
// start from row_init (the bias from column jc) or zero.
void row_block(idx_t ic, idx_t mb, idx_t jc, idx_t nb, idx_t pc, idx_t kb, float alpha, Operand A,
               Output C, const float* pb, float* pa, bool add, const float* row_init, bool bf16) {
    const Operand a = A.from(ic, pc);  // A's panels run down its rows and along k
    pack_block<MR>(pa, a.data, a.col_stride, a.row_stride, mb, kb, alpha, bf16);
    for (idx_t ir = 0; ir < mb; ir += MR) {
        const int mr = (int)min_idx(MR, mb - ir);
        for (idx_t jr = 0; jr < nb; jr += NR) {
            const int nr = (int)min_idx(NR, nb - jr);
            micro_kernel(kb, pa + ir * kb, pb + jr * kb, C.data + (ic + ir) * C.ld + jc + jr, C.ld, mr,
                         nr, row_init == nullptr ? nullptr : row_init + jr, add);
        }
    }
}

// The blocked product on one thread over a sub-block of C. Returns false (having written nothing)
// if its scratch could not be allocated.
bool gemm_blocked(idx_t M, idx_t N, idx_t K, float alpha, Operand A, Operand B, Output C, bool bf16) {
    const idx_t kc = slice_depth(K);
    const idx_t mc = min_idx(MC, ceil_div(M, MR) * MR), nc = min_idx(NC, ceil_div(N, NR) * NR);
    float* pa = tl_pack_a.get((size_t)(mc * kc + kPackSlack));
    float* pb = tl_pack_b.get((size_t)(nc * kc + kPackSlack));
    if (pa == nullptr || pb == nullptr) return false;
    for (idx_t jc = 0; jc < N; jc += NC) {
        const idx_t nb = min_idx(NC, N - jc);
        for (idx_t pc = 0; pc < K; pc += kc) {
            const idx_t kb = min_idx(kc, K - pc);
            // B's panels run along its columns (lanes) and down k.
            const Operand b = B.from(pc, jc);
            pack_block<NR>(pb, b.data, b.row_stride, b.col_stride, nb, kb, 1.0f, bf16);
            // The first slice starts from C's init; later ones add to C.
            const bool add = C.accumulate || pc > 0;
            const float* row_init = add || C.bias == nullptr ? nullptr : C.bias + jc;
            for (idx_t ic = 0; ic < M; ic += MC)
                row_block(ic, min_idx(MC, M - ic), jc, nb, pc, kb, alpha, A, C, pb, pa, add, row_init, bf16);
        }
    }
    return true;
}

#ifdef _OPENMP
// Rows of C per unit of the team's work: a quarter of the cache block in whole register tiles, so
// that a product of a few hundred rows still gives each thread several units to balance.
constexpr idx_t kTeamRows = MR * (MC / MR / 4);

thread_local Scratch<float> tl_team;  // the calling thread's: its team's shared B and A blocks

// The blocked product on the OpenMP team (`threads` of them) sharing one packed slice of B: the
// team packs B's panels together (each thread some of them), then takes C's row units one at a
// time as each thread comes free, so a thread slowed by other work on its core holds the product up
// by one unit, not by half of it, and no thread packs B again for itself. Which thread computes a
// unit changes nothing in it (see Determinism). Returns false (having written nothing) if its
// scratch could not be allocated.
bool gemm_team(idx_t M, idx_t N, idx_t K, float alpha, Operand A, Operand B, Output C, bool bf16,
               int threads) {
    const idx_t kc = slice_depth(K);
    const idx_t nc = min_idx(NC, ceil_div(N, NR) * NR);
    // Each buffer in whole cache lines, so no two threads write one line.
    const idx_t b_floats = ceil_div(nc * kc + kPackSlack, 16) * 16;
    const idx_t a_floats = ceil_div(kTeamRows * kc + kPackSlack, 16) * 16;
    float* scratch = tl_team.get((size_t)(b_floats + threads * a_floats));
    if (scratch == nullptr) return false;
    float* const pb = scratch;
    const idx_t units = ceil_div(M, kTeamRows);
#pragma omp parallel num_threads(threads)
    {
        float* const pa = scratch + b_floats + omp_get_thread_num() * a_floats;
        for (idx_t jc = 0; jc < N; jc += NC) {
            const idx_t nb = min_idx(NC, N - jc);
            for (idx_t pc = 0; pc < K; pc += kc) {
                const idx_t kb = min_idx(kc, K - pc);
                const Operand b = B.from(pc, jc);
                // The loop's closing barrier: every panel is packed before any unit starts (and the
                // units' barrier below, every unit done before the next slice is packed over it).
#pragma omp for schedule(static)
                for (idx_t p = 0; p < ceil_div(nb, NR); p++)
                    pack_block<NR>(pb + p * NR * kb, b.data + p * NR * b.col_stride, b.row_stride,
                                   b.col_stride, min_idx(NR, nb - p * NR), kb, 1.0f, bf16);
                const bool add = C.accumulate || pc > 0;
                const float* row_init = add || C.bias == nullptr ? nullptr : C.bias + jc;
#pragma omp for schedule(dynamic, 1)
                for (idx_t u = 0; u < units; u++) {
                    const idx_t ic = u * kTeamRows;
                    row_block(ic, min_idx(kTeamRows, M - ic), jc, nb, pc, kb, alpha, A, C, pb, pa, add,
                              row_init, bf16);
                }
            }
        }
    }
    return true;
}
#endif

// --- a few rows of C: straight from op(B) -----------------------------------------------------------
// Generation reads one new token at a time, so C has one row and B is a weight matrix (or a head's
// cached keys and values) read once; packing it for a register tile that one row cannot fill cost
// more than the product. C of at most kDirectRows rows is formed from op(B) as it lies:
//   - op(B)'s rows contiguous (col_stride 1): C's row is a sum of op(B)'s rows, kDirectVectors
//     vectors of columns at a time, one multiply-add per k in order;
//   - op(B)'s columns contiguous (row_stride 1: a weight read transposed, or cached keys): each
//     element is a dot product along k, in vector lanes, then summed across them;
//   - any other strides: element by element.
// Each element is reduced in an order fixed by K alone (Determinism), not the one a taller product
// gives it: a one-row product agrees with that row of a taller one to fp32 rounding.
// In bf16 (kBf16) each operand is rounded as it is read (alpha folded into A first), and the products
// are summed in fp32, as on the emulated path; this serves every bf16 path (see gemm), since the
// native ones pack for tiles too.
constexpr idx_t kDirectRows = 4;
// Independent chains of multiply-adds per row of C, to hide their latency: as many as the registers
// hold beside the operands.
template <int M>
constexpr idx_t direct_vectors() { return M <= 2 ? 8 : 4; }

// An operand as the product multiplies it: a vector of lanes, or one element.
template <bool kBf16>
inline vf direct_operand(vf x) { return kBf16 ? vround_bf16(x) : x; }
template <bool kBf16>
inline float direct_element(float x) { return kBf16 ? bf16_nearest(x) : x; }

// M is a template parameter so that the accumulators are registers: with a run-time row count GCC
// keeps them on the stack, and every multiply-add waits on a store and a load.
template <int M, bool kBf16>
void direct_rows_of_b(idx_t N, idx_t K, float alpha, Operand A, Operand B, Output C) {
    constexpr idx_t kDirectVectors = direct_vectors<M>();
    for (idx_t n0 = 0; n0 < N; n0 += kDirectVectors * kW) {
        vf acc[M][kDirectVectors];
        for (idx_t m = 0; m < M; m++)
            for (idx_t v = 0; v < kDirectVectors; v++) acc[m][v] = vset(0.0f);
        for (idx_t k = 0; k < K; k++) {
            const float* b = B.data + k * B.row_stride + n0;
            vf vb[kDirectVectors];
            for (idx_t v = 0; v < kDirectVectors; v++) {
                const idx_t lanes = N - n0 - v * kW;
                vb[v] = lanes > 0 ? direct_operand<kBf16>(vload_n(b + v * kW, lanes, 0.0f)) : vset(0.0f);
            }
            for (idx_t m = 0; m < M; m++) {
                const vf a = vset(direct_element<kBf16>(alpha * A.at(m, k)));
                for (idx_t v = 0; v < kDirectVectors; v++) acc[m][v] = vfmadd(a, vb[v], acc[m][v]);
            }
        }
        for (idx_t m = 0; m < M; m++) {
            for (idx_t v = 0; v < kDirectVectors; v++) {
                const idx_t n = n0 + v * kW, lanes = N - n;
                if (lanes <= 0) break;
                float* c = C.data + m * C.ld + n;
                const float* init = C.accumulate ? c : C.bias != nullptr ? C.bias + n : nullptr;
                vstore_n(c, init != nullptr ? vadd(vload_n(init, lanes, 0.0f), acc[m][v]) : acc[m][v],
                         lanes);
            }
        }
    }
}

template <int M, bool kBf16>
void direct_columns_of_b(idx_t N, idx_t K, float alpha, Operand A, Operand B, Output C) {
    constexpr idx_t kDirectVectors = direct_vectors<M>();
    for (idx_t n0 = 0; n0 < N; n0 += kDirectVectors) {
        const idx_t cols = min_idx(kDirectVectors, N - n0);
        vf acc[M][kDirectVectors];
        for (idx_t m = 0; m < M; m++)
            for (idx_t v = 0; v < kDirectVectors; v++) acc[m][v] = vset(0.0f);
        for (idx_t k = 0; k < K; k += kW) {
            const idx_t steps = min_idx(kW, K - k);
            vf va[M];
            for (idx_t m = 0; m < M; m++)
                va[m] = direct_operand<kBf16>(
                    vmul(vload_n(A.data + m * A.row_stride + k, steps, 0.0f), vset(alpha)));
            for (idx_t v = 0; v < cols; v++) {
                const vf b = direct_operand<kBf16>(vload_n(B.data + (n0 + v) * B.col_stride + k, steps, 0.0f));
                for (idx_t m = 0; m < M; m++) acc[m][v] = vfmadd(va[m], b, acc[m][v]);
            }
        }
        for (idx_t m = 0; m < M; m++) {
            for (idx_t v = 0; v < cols; v++) {
                float* c = C.data + m * C.ld + n0 + v;
                const float init = C.accumulate ? *c : C.bias != nullptr ? C.bias[n0 + v] : 0.0f;
                *c = init + vhsum(acc[m][v]);
            }
        }
    }
}

template <int M, bool kBf16>
void gemm_direct_rows(idx_t N, idx_t K, float alpha, Operand A, Operand B, Output C) {
    if (B.col_stride == 1) return direct_rows_of_b<M, kBf16>(N, K, alpha, A, B, C);
    if (B.row_stride == 1 && A.col_stride == 1)
        return direct_columns_of_b<M, kBf16>(N, K, alpha, A, B, C);
    gemm_reference(kBf16 ? Precision::bf16 : Precision::fp32, M, N, K, alpha, A, B, C);
}

template <bool kBf16>
void gemm_direct(idx_t M, idx_t N, idx_t K, float alpha, Operand A, Operand B, Output C) {
    static_assert(kDirectRows == 4, "gemm_direct has a case for each row count up to kDirectRows");
    switch (M) {
        case 1: return gemm_direct_rows<1, kBf16>(N, K, alpha, A, B, C);
        case 2: return gemm_direct_rows<2, kBf16>(N, K, alpha, A, B, C);
        case 3: return gemm_direct_rows<3, kBf16>(N, K, alpha, A, B, C);
        default: return gemm_direct_rows<4, kBf16>(N, K, alpha, A, B, C);
    }
}

// The product on the OpenMP team: shared B and row units handed out as threads come free
// (gemm_team) where C has rows enough to balance, else C split into one share per thread
// (split_between_threads); the reference loop where scratch is unavailable.
void gemm_blocked_parallel(idx_t M, idx_t N, idx_t K, float alpha, Operand A, Operand B, Output C,
                           bool parallel, bool bf16) {
    if (M <= 0 || N <= 0) return;
    if (K <= 0) return empty_product(M, N, C);
    if (M <= kDirectRows) {
        split_between_threads(M, N, K, M, kW, kParallelMinWork, parallel,
                              [&](idx_t m0, idx_t n0, idx_t rows, idx_t cols) {
                                  const Operand a = A.from(m0, 0), b = B.from(0, n0);
                                  const Output c = C.from(m0, n0);
                                  if (bf16)
                                      gemm_direct<true>(rows, cols, K, alpha, a, b, c);
                                  else
                                      gemm_direct<false>(rows, cols, K, alpha, a, b, c);
                              });
        return;
    }
#ifdef _OPENMP
    const int threads = product_threads(M, N, K, kParallelMinWork, parallel);
    if (threads > 1 && ceil_div(M, kTeamRows) >= 2 * threads &&
        gemm_team(M, N, K, alpha, A, B, C, bf16, threads))
        return;
#endif
    split_between_threads(M, N, K, MR, NR, kParallelMinWork, parallel,
                          [&](idx_t m0, idx_t n0, idx_t rows, idx_t cols) {
                              const Operand a = A.from(m0, 0), b = B.from(0, n0);
                              const Output c = C.from(m0, n0);
                              if (!gemm_blocked(rows, cols, K, alpha, a, b, c, bf16))
                                  gemm_reference(bf16 ? Precision::bf16 : Precision::fp32, rows,
                                                 cols, K, alpha, a, b, c);
                          });
}

}  // namespace

void gemm_fp32(idx_t M, idx_t N, idx_t K, float alpha, Operand A, Operand B, Output C, bool parallel) {
    gemm_blocked_parallel(M, N, K, alpha, A, B, C, parallel, false);
}

void gemm_bf16_emulated(idx_t M, idx_t N, idx_t K, float alpha, Operand A, Operand B, Output C,
                        bool parallel) {
    gemm_blocked_parallel(M, N, K, alpha, A, B, C, parallel, true);
}

void gemm(Precision precision, idx_t M, idx_t N, idx_t K, float alpha, Operand A, Operand B,
          Output C, bool parallel) {
    if (precision == Precision::fp32) return gemm_fp32(M, N, K, alpha, A, B, C, parallel);
    // The native paths pack for tiles that a few rows of C cannot fill; the emulated path's direct
    // product (rounding as it reads) skips that.
    if (M <= kDirectRows) return gemm_bf16_emulated(M, N, K, alpha, A, B, C, parallel);
    switch (bf16_path()) {
        case Bf16Path::amx:
            if (gemm_bf16_amx(M, N, K, alpha, A, B, C, parallel)) return;
            break;
        case Bf16Path::avx512_bf16:
            if (gemm_bf16_dpbf16(M, N, K, alpha, A, B, C, parallel)) return;
            break;
        case Bf16Path::emulated:
            break;
    }
    gemm_bf16_emulated(M, N, K, alpha, A, B, C, parallel);
}

}  // namespace LMLAB_ISA_NS
}  // namespace lmlab

// gemm_bf16_dpbf16: the bf16 matrix product (Precision::bf16, Bf16Path::avx512_bf16) on
// AVX512-BF16's VDPBF16PS.
//   C (M, N) = init + alpha * A . B, operands rounded to bfloat16, fp32 accumulation (cpp/gemm.h).
//
// VDPBF16PS acc, a, b treats a and b as 16 pairs of bf16 and, in each fp32 lane i, does
//   acc += a[2i+1] * b[2i+1];  acc += a[2i] * b[2i]
// A product of two bf16 is exact in fp32; each addition rounds to nearest even; bf16 inputs and fp32
// results below 2^-126 count as zero (DAZ and FTZ). (Intel's definition; tests/test_gemm.py checks
// this CPU against it bit for bit.) So one instruction is 32 multiply-adds on the 16 lanes of an fp32
// FMA: twice the fp32 rate, with the error of an fp32 sum plus the flushing of values below 2^-126.
//
// The blocking is gemm's (cpp/gemm.cpp) on pairs of k, with the slice loop outermost:
//   for each KC-deep slice:           pack A into MR-tall panels of pairs (alpha folded in, rounded;
//                                     all rows at once where they fit 4 MB)
//     for each NC-wide column block:  pack B into NR-wide panels of pairs
//       for each MR x NR tile:        micro-kernel: 2 * MR zmm accumulators; per pair of k, two
//                                     vectors of B and MR broadcasts of A's pair, 2 * MR VDPBF16PS
// A panel is [k pair][lane], each element a 32-bit word holding the bf16 of k (low half) and k + 1
// (high half), which is what the instruction reads; an odd depth gets a zero partner, and edge panels
// are zero-padded, so every tile runs the same instructions.
//
// Determinism: each slice's products are summed from zero in k order, then added to the init (C,
// bias or zero) with one fp32 addition; the slice depth depends on K alone; threads divide C in whole
// tiles (see "the team's product" below). So every element is bitwise the same for any thread count.
//
// Only the AVX-512 build holds this code, compiled for AVX512-BF16 by a target attribute;
// cpp/bf16_path.cpp decides at run time whether it may run.
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "gemm.h"
#include "gemm_internal.h"
#include "isa.h"
#include "simd.h"

#if defined(__AVX512F__) && defined(__x86_64__) && \
    (defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 10))
#define LMLAB_DPBF16_BUILD 1
#endif

namespace lmlab {
namespace LMLAB_ISA_NS {

#ifndef LMLAB_DPBF16_BUILD

bool gemm_bf16_dpbf16(idx_t, idx_t, idx_t, float, Operand, Operand, Output, bool) { return false; }

#else

#ifdef LMLAB_SIMULATED_ISA  // tests/simulated_isa: the intrinsics are plain C++
#define LMLAB_BF16_TARGET
#else
#define LMLAB_BF16_TARGET __attribute__((target("avx512bf16")))
#endif

// GCC 12 does not emit the destructor of a class-template thread_local on its own: instantiate it.
template struct Scratch<std::uint32_t>;

namespace {

using pair_t = std::uint32_t;  // two bf16: k in the low half, k + 1 in the high half

// Register tile: 24 of the 32 zmm accumulate, 2 hold B, the broadcasts of A take one more. 12 rows
// (not 14 as in gemm_fp32) divide the model widths (128, 384, 1536) with little or no padding.
constexpr int MR = 12, NR = 32;
// Cache blocks: an A micro-panel (MR x KC bf16, 12 KB) stays in L1 while the B panels of a column
// block (NC x KC, 512 KB) stream from L2. A is packed up to kAPackBytes at a time (all of it, in
// the model's products), so each slice of A is packed once whatever the number of column blocks.
constexpr idx_t KC = 512, NC = 512;
constexpr idx_t kAPackBytes = idx_t(4) << 20;

constexpr double kParallelMinWork = 1 << 18;  // as gemm_fp32: below this, one thread

// Slice depth: even (pairs never straddle slices), a function of K alone (see Determinism).
inline idx_t slice_depth(idx_t K) {
    const idx_t d = ceil_div(K, ceil_div(K, KC));
    return d + (d & 1);
}

thread_local Scratch<pair_t> tl_pack_a;  // see Scratch in gemm_internal.h
thread_local Scratch<pair_t> tl_pack_b;
thread_local Scratch<pair_t> tl_pack_shared;  // the operand a team shares, held by its first thread

inline __mmask16 lanes(idx_t n) {
    return n >= 16 ? (__mmask16)0xFFFF : n <= 0 ? (__mmask16)0 : (__mmask16)((1u << n) - 1u);
}

// 16 pairs from even = values at k, odd = values at k + 1, rounded to nearest even.
LMLAB_BF16_TARGET inline __m512i interleave_pairs(__m512 even, __m512 odd, __m512i order) {
    return _mm512_permutexvar_epi16(order, (__m512i)_mm512_cvtne2ps_pbh(odd, even));
}

// The 32 bf16 of lo (first 16) and hi in order: 16 pairs of consecutive k.
LMLAB_BF16_TARGET inline __m512 consecutive_pairs(__m512 lo, __m512 hi) {
    return _mm512_castsi512_ps((__m512i)_mm512_cvtne2ps_pbh(hi, lo));
}

pair_t scalar_pair(float even, float odd) {
    round_to_bf16(&even, 1);
    round_to_bf16(&odd, 1);
    std::uint32_t e, o;
    std::memcpy(&e, &even, sizeof e);
    std::memcpy(&o, &odd, sizeof o);
    return (e >> 16) | (o & 0xffff0000u);
}

// --- packing ---------------------------------------------------------------------------------------
// A block of `count` lanes (rows of A or columns of B) over kb steps of k, as consecutive P-lane
// panels (the last one zero-padded), panel q at dst + q * P * pairs:
//   panel[p * P + r] = pair(scale * src[2p * sk + l * sr], scale * src[(2p + 1) * sk + l * sr])
// for lane l = q * P + r < count and 2p (+ 1) < kb, zero elsewhere.

// Whole-vector interleave: [a0..a15, b0..b15] (bf16) to [a0, b0, a1, b1, ...].
LMLAB_BF16_TARGET inline __m512i pair_order() {
    alignas(64) std::uint16_t idx[32];
    for (int n = 0; n < 16; n++) {
        idx[2 * n] = (std::uint16_t)n;
        idx[2 * n + 1] = (std::uint16_t)(16 + n);
    }
    return _mm512_load_si512(idx);
}

// Lanes contiguous (sr == 1): each pair of rows k, k + 1 is read once from end to end (the order
// the hardware prefetchers follow) and dealt out to every panel, 16 lanes at a time.
template <int P>
LMLAB_BF16_TARGET void pack_rows(pair_t* dst, const float* src, idx_t sk, idx_t count, idx_t kb,
                                 float scale) {
    const idx_t pairs = ceil_div(kb, 2), panels = ceil_div(count, P);
    const __m512 vscale = _mm512_set1_ps(scale);
    const __m512i order = pair_order();
    for (idx_t p = 0; p < pairs; p++) {
        const float* even_row = src + 2 * p * sk;
        const bool has_odd = 2 * p + 1 < kb;
        for (idx_t q = 0; q < panels; q++) {
            pair_t* out = dst + q * P * pairs + p * P;
            for (int g = 0; g < P; g += 16) {
                const idx_t l = q * P + g;
                const __mmask16 load = lanes(count - l), store = lanes(P - g);
                const __m512 even = _mm512_mul_ps(_mm512_maskz_loadu_ps(load, even_row + l), vscale);
                const __m512 odd = has_odd ? _mm512_mul_ps(_mm512_maskz_loadu_ps(load, even_row + sk + l), vscale)
                                           : _mm512_setzero_ps();
                _mm512_mask_storeu_epi32(out + g, store, interleave_pairs(even, odd, order));
            }
        }
    }
}

// k contiguous (sk == 1): 32 k of a lane are 16 ready-made pairs; a 16 x 16 transpose of those
// 32-bit pairs puts 16 lanes side by side.
template <int P>
LMLAB_BF16_TARGET void pack_columns(pair_t* dst, const float* src, idx_t sr, idx_t count, idx_t kb,
                                    float scale) {
    const idx_t pairs = ceil_div(kb, 2);
    const __m512 vscale = _mm512_set1_ps(scale);
    for (idx_t q0 = 0; q0 < count; q0 += P) {
        pair_t* panel = dst + q0 * pairs;
        for (idx_t p0 = 0; p0 < pairs; p0 += 16) {
            const idx_t k0 = 2 * p0, valid_k = kb - k0, n_pairs = min_idx(16, pairs - p0);
            for (int g = 0; g < P; g += 16) {
                vf v[16];
                for (int r = 0; r < 16; r++) {
                    if (q0 + g + r < count) {
                        const float* s = src + (q0 + g + r) * sr + k0;
                        v[r] = consecutive_pairs(
                            _mm512_mul_ps(_mm512_maskz_loadu_ps(lanes(valid_k), s), vscale),
                            _mm512_mul_ps(_mm512_maskz_loadu_ps(lanes(valid_k - 16), s + 16), vscale));
                    } else {
                        v[r] = _mm512_setzero_ps();
                    }
                }
                vtranspose(v);
                const __mmask16 store = lanes(P - g);
                for (idx_t j = 0; j < n_pairs; j++)
                    _mm512_mask_storeu_epi32(panel + (p0 + j) * P + g, store, _mm512_castps_si512(v[j]));
            }
        }
    }
}

// Any other strides: one element at a time.
template <int P>
void pack_strided(pair_t* dst, const float* src, idx_t sk, idx_t sr, idx_t count, idx_t kb,
                  float scale) {
    const idx_t pairs = ceil_div(kb, 2);
    for (idx_t q0 = 0; q0 < count; q0 += P)
        for (idx_t p = 0; p < pairs; p++)
            for (int r = 0; r < P; r++) {
                const bool lane = q0 + r < count;
                const float even = lane ? scale * src[(q0 + r) * sr + 2 * p * sk] : 0.0f;
                const float odd =
                    lane && 2 * p + 1 < kb ? scale * src[(q0 + r) * sr + (2 * p + 1) * sk] : 0.0f;
                dst[q0 * pairs + p * P + r] = scalar_pair(even, odd);
            }
}

template <int P>
void pack_block(pair_t* dst, const float* src, idx_t sk, idx_t sr, idx_t count, idx_t kb,
                float scale) {
    if (sr == 1)
        pack_rows<P>(dst, src, sk, count, kb, scale);
    else if (sk == 1)
        pack_columns<P>(dst, src, sr, count, kb, scale);
    else
        pack_strided<P>(dst, src, sk, sr, count, kb, scale);
}

// --- micro-kernel ----------------------------------------------------------------------------------
// c (mr x nr of an MR x NR tile) = init + a-panel . b-panel over `pairs` pairs of k, where init is c
// itself (add), the bias row, or zero; the same additions for full and edge tiles.
LMLAB_BF16_TARGET void micro_kernel(idx_t pairs, const pair_t* a, const pair_t* b, float* c,
                                    idx_t ldc, int mr, int nr, const float* bias, bool add) {
    // The tile's lines of C, asked for now so that the write-back at the end does not wait on them.
    for (int i = 0; i < mr; i++) {
        _mm_prefetch(reinterpret_cast<const char*>(c + i * ldc), _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(c + i * ldc + NR - 1), _MM_HINT_T0);
    }
    __m512 c0[MR], c1[MR];
#pragma GCC unroll 16
    for (int i = 0; i < MR; i++) c0[i] = c1[i] = _mm512_setzero_ps();
    for (idx_t p = 0; p < pairs; p++) {
        const __m512bh b0 = (__m512bh)_mm512_load_si512(b), b1 = (__m512bh)_mm512_load_si512(b + 16);
#pragma GCC unroll 16
        for (int i = 0; i < MR; i++) {
            const __m512bh ai = (__m512bh)_mm512_set1_epi32((int)a[i]);
            c0[i] = _mm512_dpbf16_ps(c0[i], ai, b0);
            c1[i] = _mm512_dpbf16_ps(c1[i], ai, b1);
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
    const __mmask16 m0 = lanes(nr), m1 = lanes(nr - 16);
    const __m512 bias0 = bias != nullptr ? _mm512_maskz_loadu_ps(m0, bias) : _mm512_setzero_ps();
    const __m512 bias1 = bias != nullptr ? _mm512_maskz_loadu_ps(m1, bias + 16) : _mm512_setzero_ps();
    for (int i = 0; i < mr; i++) {
        float* ci = c + i * ldc;
        const __m512 init0 = add ? _mm512_maskz_loadu_ps(m0, ci) : bias0;
        const __m512 init1 = add ? _mm512_maskz_loadu_ps(m1, ci + 16) : bias1;
        _mm512_mask_storeu_ps(ci, m0, _mm512_add_ps(init0, c0[i]));
        _mm512_mask_storeu_ps(ci + 16, m1, _mm512_add_ps(init1, c1[i]));
    }
}

// --- one thread's share, and the team's product ------------------------------------------------------
// Threads divide C along its longer side in whole tiles, each computing its share alone, with no
// synchronisation until the end. Only where a share is narrow, so that packing the operand every
// thread needs in full (B when splitting rows, A when splitting columns) would cost a good part of
// the work if each thread did it, the team packs that operand once, all slices up front (a share of
// the panels each), and meets once before computing. Which thread packs a panel changes nothing in
// it, so C is bitwise the same for any team size.

// An operand packed whole: slice s, lane block j at data + (s * blocks + j) * block * max_pairs.
struct Packed {
    pair_t* data = nullptr;
    idx_t blocks = 0, block = 0, max_pairs = 0;
    pair_t* at(idx_t s, idx_t j) const { return data + (s * blocks + j) * block * max_pairs; }
};

// C tiles of one (slice, row chunk, column block): packed A rows [0, mb) times packed B columns
// [0, nb) into c, from the init (row_init or zero) or adding to c.
void tiles(idx_t pairs, const pair_t* pa, idx_t mb, const pair_t* pb, idx_t nb, float* c, idx_t ldc,
           const float* row_init, bool add) {
    for (idx_t ir = 0; ir < mb; ir += MR) {
        const int mr = (int)min_idx(MR, mb - ir);
        for (idx_t jr = 0; jr < nb; jr += NR)
            micro_kernel(pairs, pa + ir * pairs, pb + jr * pairs, c + ir * ldc + jr, ldc, mr,
                         (int)min_idx(NR, nb - jr), row_init == nullptr ? nullptr : row_init + jr,
                         add);
    }
}

// Rows of A packed at once: all of them where they fit kAPackBytes, so that each slice of A is
// packed once for every column block.
inline idx_t a_chunk(idx_t M, idx_t kc) {
    return min_idx(ceil_div(M, MR) * MR, kAPackBytes / (kc * 2) / MR * MR);
}

// The product over a block of C on one thread, packing its operands itself except one the team
// packed whole (packed_a or packed_b, in this block's coordinates). Returns false, having written
// nothing, if its scratch could not be had.
bool dpbf16_blocked(idx_t M, idx_t N, idx_t K, float alpha, Operand A, Operand B, Output C,
                    const Packed& packed_a, const Packed& packed_b) {
    const idx_t kc = slice_depth(K), max_pairs = kc / 2, mc = a_chunk(M, kc);
    const idx_t nc = min_idx(NC, ceil_div(N, NR) * NR);
    pair_t* own_a = packed_a.data == nullptr ? tl_pack_a.get((size_t)(mc * max_pairs)) : nullptr;
    pair_t* own_b = packed_b.data == nullptr ? tl_pack_b.get((size_t)(nc * max_pairs)) : nullptr;
    if ((packed_a.data == nullptr && own_a == nullptr) || (packed_b.data == nullptr && own_b == nullptr))
        return false;
    for (idx_t pc = 0, s = 0; pc < K; pc += kc, s++) {
        const idx_t kb = min_idx(kc, K - pc), pairs = ceil_div(kb, 2);
        // The first slice starts from C's init; later ones add to C.
        const bool add = C.accumulate || pc > 0;
        for (idx_t ic = 0; ic < M; ic += mc) {
            const idx_t mb = min_idx(mc, M - ic);
            const pair_t* pa = own_a;
            if (own_a == nullptr) {
                pa = packed_a.at(s, ic / mc);
            } else {
                const Operand a = A.from(ic, pc);
                pack_block<MR>(own_a, a.data, a.col_stride, a.row_stride, mb, kb, alpha);
            }
            for (idx_t jc = 0; jc < N; jc += NC) {
                const idx_t nb = min_idx(NC, N - jc);
                const pair_t* pb = own_b;
                if (own_b == nullptr) {
                    pb = packed_b.at(s, jc / NC);
                } else {
                    const Operand b = B.from(pc, jc);
                    pack_block<NR>(own_b, b.data, b.row_stride, b.col_stride, nb, kb, 1.0f);
                }
                const float* row_init = add || C.bias == nullptr ? nullptr : C.bias + jc;
                tiles(pairs, pa, mb, pb, nb, C.data + ic * C.ld + jc, C.ld, row_init, add);
            }
        }
    }
    return true;
}

// Thread t's share of packing `count` lanes (P-lane panels) of a block the team shares.
template <int P>
void pack_share(pair_t* dst, const float* src, idx_t sk, idx_t sr, idx_t count, idx_t kb,
                float scale, idx_t t, idx_t team) {
    const idx_t pairs = ceil_div(kb, 2);
    idx_t first, last;
    thread_share(ceil_div(count, P), t, team, &first, &last);
    if (last > first)
        pack_block<P>(dst + first * P * pairs, src + first * P * sr, sk, sr,
                      min_idx(last * P, count) - first * P, kb, scale);
}

// Thread t of `team`: its share of packing the shared operand whole, then (after the team has
// met) its block of C. The same barrier for every thread, whatever its share.
void team_member(idx_t t, idx_t team, bool split_rows, idx_t M, idx_t N, idx_t K, float alpha,
                 Operand A, Operand B, Output C, const Packed& shared, bool* ok) {
    const idx_t kc = slice_depth(K);
    for (idx_t pc = 0, s = 0; pc < K; pc += kc, s++) {
        const idx_t kb = min_idx(kc, K - pc);
        if (split_rows) {
            for (idx_t jc = 0, j = 0; jc < N; jc += NC, j++) {
                const Operand b = B.from(pc, jc);
                pack_share<NR>(shared.at(s, j), b.data, b.row_stride, b.col_stride,
                               min_idx(NC, N - jc), kb, 1.0f, t, team);
            }
        } else {
            const Operand a = A.from(0, pc);
            pack_share<MR>(shared.at(s, 0), a.data, a.col_stride, a.row_stride, M, kb, alpha, t, team);
        }
    }
#pragma omp barrier
    const idx_t units = split_rows ? ceil_div(M, MR) : ceil_div(N, NR);
    idx_t first, last;
    thread_share(units, t, team, &first, &last);
    if (last <= first) return;
    const Packed none;
    bool done;
    if (split_rows) {
        const idx_t m0 = first * MR, m1 = min_idx(last * MR, M);
        done = dpbf16_blocked(m1 - m0, N, K, alpha, A.from(m0, 0), B, C.from(m0, 0), none, shared);
    } else {
        const idx_t n0 = first * NR, n1 = min_idx(last * NR, N);
        done = dpbf16_blocked(M, n1 - n0, K, alpha, A, B.from(0, n0), C.from(0, n0), shared, none);
    }
    if (!done) {
#pragma omp atomic write
        *ok = false;
    }
}

// Shares of at most this many tiles' width have the team pack the common operand (there its
// packing is a tenth or more of a thread's work), if all of it fits kSharedBytes.
constexpr idx_t kShareUnits = 64;
constexpr idx_t kSharedBytes = idx_t(8) << 20;

// The product on `team` threads. Returns false if scratch memory could not be had (some of C may
// then be written: the caller recomputes all of it).
bool dpbf16_team(idx_t M, idx_t N, idx_t K, float alpha, Operand A, Operand B, Output C, int team) {
    const bool split_rows = M >= N;
    const idx_t units = split_rows ? ceil_div(M, MR) : ceil_div(N, NR);
    if (team > units) team = (int)units;
    const Packed none;
    if (team <= 1) return dpbf16_blocked(M, N, K, alpha, A, B, C, none, none);
    const idx_t kc = slice_depth(K), slices = ceil_div(K, kc);
    Packed shared;
    shared.max_pairs = kc / 2;
    if (split_rows) {
        shared.block = min_idx(NC, ceil_div(N, NR) * NR);
        shared.blocks = ceil_div(N, NC);
    } else {
        shared.block = a_chunk(M, kc);
        shared.blocks = ceil_div(M, shared.block);
    }
    const idx_t shared_bytes = slices * shared.blocks * shared.block * shared.max_pairs * 4;
    // (Split by columns, all of A must be one chunk: team_member packs its rows in one run.)
    const bool share = units / team <= kShareUnits && (split_rows || shared.blocks == 1) &&
                       shared_bytes <= kSharedBytes;
    bool ok = true;
    if (share) {
        // The calling thread's scratch, kept between calls like the others.
        shared.data = tl_pack_shared.get((size_t)(shared_bytes / 4));
        if (shared.data == nullptr) return false;
#pragma omp parallel num_threads(team)
        {
#ifdef _OPENMP
            const idx_t t = omp_get_thread_num(), n = omp_get_num_threads();
#else
            const idx_t t = 0, n = 1;
#endif
            team_member(t, n, split_rows, M, N, K, alpha, A, B, C, shared, &ok);
        }
        return ok;
    }
    split_between_threads(M, N, K, MR, NR, 0.0, true, [&](idx_t m0, idx_t n0, idx_t rows, idx_t cols) {
        if (!dpbf16_blocked(rows, cols, K, alpha, A.from(m0, 0), B.from(0, n0), C.from(m0, n0), none,
                            none)) {
#pragma omp atomic write
            ok = false;
        }
    });
    return ok;
}

}  // namespace

bool gemm_bf16_dpbf16(idx_t M, idx_t N, idx_t K, float alpha, Operand A, Operand B, Output C,
                      bool parallel) {
    if (!bf16_path_available(Bf16Path::avx512_bf16)) return false;
    if (M <= 0 || N <= 0) return true;
    if (K <= 0) {
        empty_product(M, N, C);
        return true;
    }
    if (!dpbf16_team(M, N, K, alpha, A, B, C, product_threads(M, N, K, kParallelMinWork, parallel)))
        gemm_reference(Precision::bf16, M, N, K, alpha, A, B, C);
    return true;
}

#endif  // LMLAB_DPBF16_BUILD

}  // namespace LMLAB_ISA_NS
}  // namespace lmlab

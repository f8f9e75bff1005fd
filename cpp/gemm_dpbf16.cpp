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
// The blocking is gemm's (cpp/gemm.cpp) on pairs of k:
//   for each NC-wide column block:  for each KC-deep slice:  pack B into NR-wide panels of pairs
//     for each MC-tall row block:   pack A into MR-tall panels of pairs (alpha folded in, rounded)
//       for each MR x NR tile:      micro-kernel: 2 * MR zmm accumulators; per pair of k, two
//                                   vectors of B and MR broadcasts of A's pair, 2 * MR VDPBF16PS
// A panel is [k pair][lane], each element a 32-bit word holding the bf16 of k (low half) and k + 1
// (high half), which is what the instruction reads; an odd depth gets a zero partner, and edge panels
// are zero-padded, so every tile runs the same instructions.
//
// Determinism: each slice's products are summed from zero in k order, then added to the init (C,
// bias or zero) with one fp32 addition; the slice depth depends on K alone; threads divide C in whole
// tiles. So every element is bitwise the same for any thread count.
//
// Only the AVX-512 build holds this code, compiled for AVX512-BF16 by a target attribute;
// cpp/bf16_path.cpp decides at run time whether it may run.
#include <cstdint>
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

#define LMLAB_BF16_TARGET __attribute__((target("avx512bf16")))

// GCC 12 does not emit the destructor of a class-template thread_local on its own: instantiate it.
template struct Scratch<std::uint32_t>;

namespace {

using pair_t = std::uint32_t;  // two bf16: k in the low half, k + 1 in the high half

// Register tile: 28 of the 32 zmm accumulate, 2 hold B, the broadcasts of A take the rest.
constexpr int MR = 14, NR = 32;
// Cache blocks: an A micro-panel (MR x KC bf16, 14 KB) stays in L1 while the B panels of a column
// block (NC x KC, 512 KB) stream from L2.
constexpr idx_t KC = 512, MC = 14 * 12, NC = 512;

constexpr double kParallelMinWork = 1 << 18;  // as gemm_fp32: below this, one thread

// Slice depth: even (pairs never straddle slices), a function of K alone (see Determinism).
inline idx_t slice_depth(idx_t K) {
    const idx_t d = ceil_div(K, ceil_div(K, KC));
    return d + (d & 1);
}

thread_local Scratch<pair_t> tl_pack_a;  // see Scratch in gemm_internal.h
thread_local Scratch<pair_t> tl_pack_b;

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
// A panel of P lanes (rows of A or columns of B) over kb steps of k:
//   dst[p * P + r] = pair(scale * src[2p * sk + r * sr], scale * src[(2p + 1) * sk + r * sr])
// for r < w and 2p (+ 1) < kb, zero elsewhere.
template <int P>
LMLAB_BF16_TARGET void pack_panel(pair_t* dst, const float* src, idx_t sk, idx_t sr, int w, idx_t kb,
                                  float scale) {
    const idx_t pairs = ceil_div(kb, 2);
    const __m512 vscale = _mm512_set1_ps(scale);
    if (sr == 1) {
        // Lanes contiguous: rows k and k + 1 of 16 lanes, interleaved.
        alignas(64) std::uint16_t order_idx[32];
        for (int n = 0; n < 16; n++) {
            order_idx[2 * n] = (std::uint16_t)n;
            order_idx[2 * n + 1] = (std::uint16_t)(16 + n);
        }
        const __m512i order = _mm512_load_si512(order_idx);
        for (int g = 0; g < P; g += 16) {
            const __mmask16 load = lanes(w - g), store = lanes(P - g);
            for (idx_t p = 0; p < pairs; p++) {
                const float* s = src + 2 * p * sk + g;
                const __m512 even = _mm512_mul_ps(_mm512_maskz_loadu_ps(load, s), vscale);
                const __m512 odd = 2 * p + 1 < kb
                                       ? _mm512_mul_ps(_mm512_maskz_loadu_ps(load, s + sk), vscale)
                                       : _mm512_setzero_ps();
                _mm512_mask_storeu_epi32(dst + p * P + g, store, interleave_pairs(even, odd, order));
            }
        }
    } else if (sk == 1) {
        // k contiguous: 32 k of a lane are 16 ready-made pairs; a 16 x 16 transpose of those 32-bit
        // pairs puts 16 lanes side by side.
        for (idx_t p0 = 0; p0 < pairs; p0 += 16) {
            const idx_t k0 = 2 * p0, valid_k = kb - k0, n_pairs = min_idx(16, pairs - p0);
            for (int g = 0; g < P; g += 16) {
                vf v[16];
                for (int r = 0; r < 16; r++) {
                    if (g + r < w) {
                        const float* s = src + (g + r) * sr + k0;
                        v[r] = consecutive_pairs(
                            _mm512_mul_ps(_mm512_maskz_loadu_ps(lanes(valid_k), s), vscale),
                            _mm512_mul_ps(_mm512_maskz_loadu_ps(lanes(valid_k - 16), s + 16), vscale));
                    } else {
                        v[r] = _mm512_setzero_ps();
                    }
                }
                transpose(v);
                const __mmask16 store = lanes(P - g);
                for (idx_t j = 0; j < n_pairs; j++)
                    _mm512_mask_storeu_epi32(dst + (p0 + j) * P + g, store, _mm512_castps_si512(v[j]));
            }
        }
    } else {
        for (idx_t p = 0; p < pairs; p++)
            for (int r = 0; r < P; r++) {
                const bool lane = r < w;
                const float even = lane ? scale * src[2 * p * sk + r * sr] : 0.0f;
                const float odd = lane && 2 * p + 1 < kb ? scale * src[(2 * p + 1) * sk + r * sr] : 0.0f;
                dst[p * P + r] = scalar_pair(even, odd);
            }
    }
}

// Packs `count` lanes as consecutive P-lane panels of kb steps (the last one zero-padded).
template <int P>
void pack_block(pair_t* dst, const float* src, idx_t sk, idx_t sr, idx_t count, idx_t kb,
                float scale) {
    const idx_t pairs = ceil_div(kb, 2);
    for (idx_t p0 = 0; p0 < count; p0 += P)
        pack_panel<P>(dst + p0 * pairs, src + p0 * sr, sk, sr, (int)min_idx(P, count - p0), kb, scale);
}

// --- micro-kernel ----------------------------------------------------------------------------------
// c (mr x nr of an MR x NR tile) = init + a-panel . b-panel over `pairs` pairs of k, where init is c
// itself (add), the bias row, or zero; the same additions for full and edge tiles.
LMLAB_BF16_TARGET void micro_kernel(idx_t pairs, const pair_t* a, const pair_t* b, float* c,
                                    idx_t ldc, int mr, int nr, const float* bias, bool add) {
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

// --- one thread's share ----------------------------------------------------------------------------
// The blocked product over a sub-block of C. Returns false (having written nothing) if its scratch
// could not be allocated.
bool dpbf16_blocked(idx_t M, idx_t N, idx_t K, float alpha, Operand A, Operand B, Output C) {
    const idx_t kc = slice_depth(K), max_pairs = kc / 2;
    const idx_t mc = min_idx(MC, ceil_div(M, MR) * MR), nc = min_idx(NC, ceil_div(N, NR) * NR);
    pair_t* pa = tl_pack_a.get((size_t)(mc * max_pairs));
    pair_t* pb = tl_pack_b.get((size_t)(nc * max_pairs));
    if (pa == nullptr || pb == nullptr) return false;
    for (idx_t jc = 0; jc < N; jc += NC) {
        const idx_t nb = min_idx(NC, N - jc);
        for (idx_t pc = 0; pc < K; pc += kc) {
            const idx_t kb = min_idx(kc, K - pc), pairs = ceil_div(kb, 2);
            const Operand b = B.from(pc, jc);
            pack_block<NR>(pb, b.data, b.row_stride, b.col_stride, nb, kb, 1.0f);
            // The first slice starts from C's init; later ones add to C.
            const bool add = C.accumulate || pc > 0;
            const float* row_init = add || C.bias == nullptr ? nullptr : C.bias + jc;
            for (idx_t ic = 0; ic < M; ic += MC) {
                const idx_t mb = min_idx(MC, M - ic);
                const Operand a = A.from(ic, pc);
                pack_block<MR>(pa, a.data, a.col_stride, a.row_stride, mb, kb, alpha);
                for (idx_t ir = 0; ir < mb; ir += MR) {
                    const int mr = (int)min_idx(MR, mb - ir);
                    for (idx_t jr = 0; jr < nb; jr += NR) {
                        const int nr = (int)min_idx(NR, nb - jr);
                        micro_kernel(pairs, pa + ir * pairs, pb + jr * pairs,
                                     C.data + (ic + ir) * C.ld + jc + jr, C.ld, mr, nr,
                                     row_init == nullptr ? nullptr : row_init + jr, add);
                    }
                }
            }
        }
    }
    return true;
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
    split_between_threads(M, N, K, MR, NR, kParallelMinWork, parallel,
                          [&](idx_t m0, idx_t n0, idx_t rows, idx_t cols) {
                              const Operand a = A.from(m0, 0), b = B.from(0, n0);
                              const Output c = C.from(m0, n0);
                              if (!dpbf16_blocked(rows, cols, K, alpha, a, b, c))
                                  gemm_reference(Precision::bf16, rows, cols, K, alpha, a, b, c);
                          });
    return true;
}

#endif  // LMLAB_DPBF16_BUILD

}  // namespace LMLAB_ISA_NS
}  // namespace lmlab

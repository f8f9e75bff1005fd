// Vector math shared by the kernel sources: one small vector API per instruction-set variant, so each
// kernel is written once and compiled to AVX-512 (16 lanes), AVX2+FMA (8 lanes), AArch64 NEON (4
// lanes; the `neon` variant, compiled with LMLAB_NEON defined) or portable code.
//
// The API (all static inline, inside lmlab::LMLAB_ISA_NS like every kernel, see cpp/isa.h):
//   vf                  the vector type; kW lanes (16, 8, 4, or 1 on the portable path, where plain
//                       loops marked with LMLAB_SIMD / LMLAB_SIMD_REDUCE are vectorised by the compiler)
//   vload_n(p, n, fill) loads min(n, kW) floats from p, the lanes past n set to `fill`; never reads
//                       past p + n (tails are masked loads, so a row's last partial vector goes through
//                       exactly the same arithmetic as a full one)
//   vstore_n(p, x, n)   stores min(n, kW) lanes
//   vkeep_n(x, n)       x with the lanes from n on set to 0
//   vstream(p, x)       non-temporal store of a full vector to a kW-aligned p; vstream_fence() orders
//                       such stores before anything after it (call it before other threads read them).
//                       NEON has no such hint in its intrinsics: there both are a plain store / nothing.
//   vset vadd vsub vmul vdiv vmax vmin vsqrt vabs vfmadd(a, b, c) = a * b + c
//   vmax(a, b) / vmin(a, b) = a > b ? a : b / a < b ? a : b, so b wins when either is NaN (x86's rule,
//                       kept on every variant: callers put the data second to propagate NaN)
//   vselect_neg(s, a, b) = s < 0 ? a : b (per lane, by the sign bit of s)
//   vhsum vhmax         horizontal sum / max, in a fixed lane order
//   vround_bf16(x)      each lane rounded to the nearest bfloat16 (ties to even) and kept in fp32, NaN
//                       staying NaN: bf16_nearest (below) on every lane
//   vexp                exp(x), see below
//   vtranspose(v)       in-register transpose of a kW x kW block held as kW vectors: v[i][j] becomes
//                       v[j][i] (portable: one lane, nothing to do)
//   scale_row, add_row  dst = src * scale, dst += src over a row of n floats
//   for_each_vector(i0, i1, body) runs body(i, lanes) over a range a vector at a time, four whole
//                       vectors per iteration (elementwise kernels whose vectors are long chains)
//   parallel_blocks(n, body) runs body(i0, i1) over fixed blocks of [0, n) on the OpenMP team: for
//                       elementwise kernels, whose every element then takes the same code path (full
//                       vector or masked tail) whatever the thread count.
//
// vexp: exp(x) = 2^n * exp(r), n = round(x / ln 2), r = x - n ln 2 (Cody-Waite split, so r is exact to
// well below an ulp), |r| <= ln2/2, exp(r) by its Taylor polynomial of degree 7 (truncation error
// below 5.2e-9 relative, a tenth of an fp32 ulp). Measured over every fp32 x in [-110, 90] against
// double-precision exp: max error 1.07 ulp on each of the three x86 variants (subnormal results counted
// in units of the subnormal spacing; 0.5 ulp is the best any fp32 result can do). The NEON variant runs
// the same operations (fused multiply-adds, ties-to-even rounding, the AVX2 scaling); tests/simd_check.cpp
// holds every variant, NEON under qemu, to that bound on a sample of x. x < -87 gives 0 (the true
// result is below 1.65e-38; see kExpLo for why no subnormals), -inf gives 0, x > 88.72 gives +inf,
// NaN gives NaN. The scaling by 2^n is done in two exact steps (or by AVX-512's scalef), so no
// intermediate over- or underflows.
#pragma once

#include <cstdint>
#include <cstring>

#include "isa.h"

#if defined(LMLAB_NEON) && !(defined(__aarch64__) && defined(__ARM_NEON))
#error "LMLAB_NEON (the neon variant) needs an AArch64 target, where NEON is baseline"
#endif
#if defined(__AVX512F__) || defined(__AVX2__) || defined(LMLAB_NEON)
// The variant is written with intrinsics (see LMLAB_SIMD below).
#define LMLAB_VECTOR_INTRINSICS 1
#endif

#if defined(LMLAB_NEON)
#include <arm_neon.h>
#elif defined(__AVX512F__) || defined(__AVX2__)
// GCC 12 warns about the deliberately undefined registers inside its own AVX-512 intrinsics at -O3
// (a known false positive); the warning is placed at the intrinsic header's lines, so silence it there.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif
#include <immintrin.h>
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif
#endif

#define LMLAB_PRAGMA(x) _Pragma(#x)
#ifdef LMLAB_VECTOR_INTRINSICS
// The vector variants use intrinsics; the compiler must not reorder their reductions.
#define LMLAB_SIMD
#define LMLAB_SIMD_REDUCE(op, ...)
#else
// Portable: let the compiler vectorise the one-lane loops. The reduction order is then the compiler's,
// fixed at build time, so results are still the same for any thread count.
#define LMLAB_SIMD LMLAB_PRAGMA(omp simd)
#define LMLAB_SIMD_REDUCE(op, ...) LMLAB_PRAGMA(omp simd reduction(op : __VA_ARGS__))
#endif

// The arithmetic of the vector API over one intrinsics family (_mm512 or _mm256). The instructions'
// max/min return their second operand when either is NaN: callers put the data second to propagate NaN.
#define LMLAB_VEC_ARITHMETIC(P)                                                           \
    static inline vf vadd(vf a, vf b) { return P##_add_ps(a, b); }                         \
    static inline vf vsub(vf a, vf b) { return P##_sub_ps(a, b); }                         \
    static inline vf vmul(vf a, vf b) { return P##_mul_ps(a, b); }                         \
    static inline vf vdiv(vf a, vf b) { return P##_div_ps(a, b); }                         \
    static inline vf vmax(vf a, vf b) { return P##_max_ps(a, b); }                         \
    static inline vf vmin(vf a, vf b) { return P##_min_ps(a, b); }                         \
    static inline vf vsqrt(vf a) { return P##_sqrt_ps(a); }                                \
    static inline vf vfmadd(vf a, vf b, vf c) { return P##_fmadd_ps(a, b, c); }

namespace lmlab {
namespace LMLAB_ISA_NS {

#if defined(__AVX512F__) || defined(__AVX2__)
// The first two stages of vtranspose, within each 128-bit lane: interleaves of 32-bit and 64-bit
// elements, for one intrinsics family.
#define LMLAB_TRANSPOSE_4X4_IN_LANES(P)                                                      \
    static inline void transpose_4x4_in_lanes(vf* v, int n) {                                   \
        vf t[16];                                                                               \
        for (int i = 0; i < n; i += 2) {                                                        \
            t[i] = P##_unpacklo_ps(v[i], v[i + 1]);                                             \
            t[i + 1] = P##_unpackhi_ps(v[i], v[i + 1]);                                         \
        }                                                                                       \
        const auto d = [](vf x) { return P##_castps_pd(x); };                                   \
        for (int g = 0; g < n; g += 4) {                                                        \
            v[g] = P##_castpd_ps(P##_unpacklo_pd(d(t[g]), d(t[g + 2])));                        \
            v[g + 1] = P##_castpd_ps(P##_unpackhi_pd(d(t[g]), d(t[g + 2])));                    \
            v[g + 2] = P##_castpd_ps(P##_unpacklo_pd(d(t[g + 1]), d(t[g + 3])));                \
            v[g + 3] = P##_castpd_ps(P##_unpackhi_pd(d(t[g + 1]), d(t[g + 3])));                \
        }                                                                                       \
    }
// bf16_nearest's carry, without its NaN case, for one intrinsics family (P: _mm512 or _mm256; SI: the
// matching integer-vector suffix, si512 or si256).
#define LMLAB_ROUND_BF16_CARRY(P, SI)                                                            \
    static inline vf round_bf16_carry(vf a) {                                                   \
        const auto u = P##_castps_##SI(a);                                                    \
        const auto lowest_kept = P##_and_##SI(P##_srli_epi32(u, 16), P##_set1_epi32(1));       \
        const auto carried = P##_add_epi32(u, P##_add_epi32(lowest_kept, P##_set1_epi32(0x7fff))); \
        return P##_cast##SI##_ps(P##_and_##SI(carried, P##_set1_epi32((int)0xffff0000u)));      \
    }
#endif

namespace simd_constants {
constexpr float kLog2e = 1.44269504088896341f;
// ln 2 = kLn2Hi + kLn2Lo; kLn2Hi has 9 significant bits, so n * kLn2Hi is exact for |n| < 2^15.
constexpr float kLn2Hi = 0.693359375f;
constexpr float kLn2Lo = -2.12194440e-4f;
// Below kExpLo the result would be under 1.65e-38, and is returned as 0: producing a subnormal costs
// a microcode assist (~100x slower) on x86, and softmax rows of masked or very negative logits hit it
// constantly. Above kExpHi exp overflows to +inf. Clamping keeps n within [-126, 129].
constexpr float kExpLo = -87.0f;
constexpr float kExpHi = 89.0f;
// 1/k! for the Taylor polynomial of expm1(r) = r + r^2 (1/2! + r (1/3! + ...)).
constexpr float kInvFact3 = 1.0f / 6.0f, kInvFact4 = 1.0f / 24.0f, kInvFact5 = 1.0f / 120.0f,
                kInvFact6 = 1.0f / 720.0f, kInvFact7 = 1.0f / 5040.0f;
}  // namespace simd_constants

// x rounded to the nearest bfloat16 (ties to even; denormals rounded like any other value), kept in
// fp32. Adding 0x7fff plus the lowest kept bit carries exactly when the dropped half is above a
// half-step, or equal to one with the kept part odd. NaN is passed through: rounding a NaN whose
// payload lies only in the dropped bits would carry it into the exponent and make it inf.
static inline float bf16_nearest(float x) {
    std::uint32_t u;
    std::memcpy(&u, &x, sizeof u);
    const bool nan = (u & 0x7fffffffu) > 0x7f800000u;
    const std::uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u;
    u = nan ? u : rounded;
    std::memcpy(&x, &u, sizeof u);
    return x;
}

#if defined(LMLAB_NEON)

using vf = float32x4_t;
constexpr idx_t kW = 4;

static inline uint32x4_t lane_mask(idx_t n) {
    const std::uint32_t lanes[4] = {0, 1, 2, 3};
    return vcltq_u32(vld1q_u32(lanes), vdupq_n_u32((std::uint32_t)(n < 0 ? 0 : n < 4 ? n : 4)));
}
static inline vf vset(float a) { return vdupq_n_f32(a); }
// Tails lane by lane: NEON has no masked load or store, and the lanes past n must not be touched.
static inline vf vload_n(const float* p, idx_t n, float fill) {
    if (n >= 4) return vld1q_f32(p);
    vf x = vdupq_n_f32(fill);
    if (n > 0) x = vsetq_lane_f32(p[0], x, 0);
    if (n > 1) x = vsetq_lane_f32(p[1], x, 1);
    if (n > 2) x = vsetq_lane_f32(p[2], x, 2);
    return x;
}
static inline void vstore_n(float* p, vf x, idx_t n) {
    if (n >= 4) return vst1q_f32(p, x);
    if (n > 0) p[0] = vgetq_lane_f32(x, 0);
    if (n > 1) p[1] = vgetq_lane_f32(x, 1);
    if (n > 2) p[2] = vgetq_lane_f32(x, 2);
}
static inline vf vkeep_n(vf x, idx_t n) {
    return vreinterpretq_f32_u32(vandq_u32(vreinterpretq_u32_f32(x), lane_mask(n)));
}
static inline void vstream(float* p, vf x) { vst1q_f32(p, x); }
static inline void vstream_fence() {}
static inline vf vadd(vf a, vf b) { return vaddq_f32(a, b); }
static inline vf vsub(vf a, vf b) { return vsubq_f32(a, b); }
static inline vf vmul(vf a, vf b) { return vmulq_f32(a, b); }
static inline vf vdiv(vf a, vf b) { return vdivq_f32(a, b); }
// FMAX/FMIN return NaN when either operand is; select instead, for x86's second-operand rule.
static inline vf vmax(vf a, vf b) { return vbslq_f32(vcgtq_f32(a, b), a, b); }
static inline vf vmin(vf a, vf b) { return vbslq_f32(vcltq_f32(a, b), a, b); }
static inline vf vsqrt(vf a) { return vsqrtq_f32(a); }
static inline vf vabs(vf a) { return vabsq_f32(a); }
static inline vf vfmadd(vf a, vf b, vf c) { return vfmaq_f32(c, a, b); }
static inline vf vselect_neg(vf s, vf a, vf b) {
    const uint32x4_t neg = vreinterpretq_u32_s32(vshrq_n_s32(vreinterpretq_s32_f32(s), 31));
    return vbslq_f32(neg, a, b);
}
// One instruction each, pairwise in a fixed order ((x0 + x1) + (x2 + x3)); FMAXV propagates NaN.
static inline float vhsum(vf a) { return vaddvq_f32(a); }
static inline float vhmax(vf a) { return vmaxvq_f32(a); }
static inline vf vround(vf a) { return vrndnq_f32(a); }  // to nearest, ties to even
static inline vf vround_bf16(vf a) {
    const uint32x4_t u = vreinterpretq_u32_f32(a);
    const uint32x4_t carry = vaddq_u32(vandq_u32(vshrq_n_u32(u, 16), vdupq_n_u32(1)), vdupq_n_u32(0x7fff));
    const vf rounded = vreinterpretq_f32_u32(vandq_u32(vaddq_u32(u, carry), vdupq_n_u32(0xffff0000u)));
    return vbslq_f32(vceqq_f32(a, a), rounded, a);  // a == a is false only for NaN
}
static inline vf vzero_where_below(vf x, float lo, vf r) {
    return vbslq_f32(vcltq_f32(x, vdupq_n_f32(lo)), vdupq_n_f32(0.0f), r);
}
// Pairs of rows interleaved (32-bit lanes), then pairs of pairs (64-bit lanes).
static inline void vtranspose(vf v[4]) {
    const vf t0 = vtrn1q_f32(v[0], v[1]), t1 = vtrn2q_f32(v[0], v[1]);
    const vf t2 = vtrn1q_f32(v[2], v[3]), t3 = vtrn2q_f32(v[2], v[3]);
    const auto d = [](vf x) { return vreinterpretq_f64_f32(x); };
    v[0] = vreinterpretq_f32_f64(vtrn1q_f64(d(t0), d(t2)));
    v[1] = vreinterpretq_f32_f64(vtrn1q_f64(d(t1), d(t3)));
    v[2] = vreinterpretq_f32_f64(vtrn2q_f64(d(t0), d(t2)));
    v[3] = vreinterpretq_f32_f64(vtrn2q_f64(d(t1), d(t3)));
}
// See the AVX2 version: two exact power-of-two factors, each a normal float.
static inline vf vldexp(vf p, vf n) {
    int32x4_t k = vcvtnq_s32_f32(n);
    k = vminq_s32(vmaxq_s32(k, vdupq_n_s32(-150)), vdupq_n_s32(129));
    const int32x4_t k1 = vshrq_n_s32(k, 1), k2 = vsubq_s32(k, k1), bias = vdupq_n_s32(127);
    const vf f1 = vreinterpretq_f32_s32(vshlq_n_s32(vaddq_s32(k1, bias), 23));
    const vf f2 = vreinterpretq_f32_s32(vshlq_n_s32(vaddq_s32(k2, bias), 23));
    return vmulq_f32(vmulq_f32(p, f1), f2);
}

#elif defined(__AVX512F__)

using vf = __m512;
constexpr idx_t kW = 16;

static inline __mmask16 lane_mask(idx_t n) {
    return n >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << n) - 1u);
}
static inline vf vset(float a) { return _mm512_set1_ps(a); }
static inline vf vload_n(const float* p, idx_t n, float fill) {
    return _mm512_mask_loadu_ps(_mm512_set1_ps(fill), lane_mask(n), p);
}
static inline void vstore_n(float* p, vf x, idx_t n) { _mm512_mask_storeu_ps(p, lane_mask(n), x); }
static inline vf vkeep_n(vf x, idx_t n) { return _mm512_maskz_mov_ps(lane_mask(n), x); }
static inline void vstream(float* p, vf x) { _mm512_stream_ps(p, x); }
static inline void vstream_fence() { _mm_sfence(); }
LMLAB_VEC_ARITHMETIC(_mm512)
static inline vf vabs(vf a) { return _mm512_abs_ps(a); }
static inline vf vselect_neg(vf s, vf a, vf b) {
    __mmask16 neg = _mm512_movepi32_mask(_mm512_castps_si512(s));
    return _mm512_mask_blend_ps(neg, b, a);
}
// Fixed reduction trees (the compiler's expansion of these does not vary between calls).
static inline float vhsum(vf a) { return _mm512_reduce_add_ps(a); }
static inline float vhmax(vf a) { return _mm512_reduce_max_ps(a); }
static inline vf vround(vf a) {
    return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}
LMLAB_ROUND_BF16_CARRY(_mm512, si512)
static inline vf vround_bf16(vf a) {
    return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(a, a, _CMP_UNORD_Q), round_bf16_carry(a), a);
}
static inline vf vzero_where_below(vf x, float lo, vf r) {
    return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, _mm512_set1_ps(lo), _CMP_LT_OQ), r,
                                _mm512_setzero_ps());
}
// p * 2^n for integral n; scalef handles overflow and subnormal results itself.
static inline vf vldexp(vf p, vf n) { return _mm512_scalef_ps(p, n); }
LMLAB_TRANSPOSE_4X4_IN_LANES(_mm512)
// Every 4 x 4 block within each 128-bit lane transposed, then v[4g + c] holds, in 128-bit lane L,
// rows 4g..4g+3 of column c + 4L; each output row gathers one column's lanes.
static inline void vtranspose(vf v[16]) {
    transpose_4x4_in_lanes(v, 16);
    vf u[16];
    for (int i = 0; i < 16; i++) u[i] = v[i];
    for (int c = 0; c < 4; c++) {
        const vf even01 = _mm512_shuffle_f32x4(u[c], u[4 + c], 0x88);
        const vf odd01 = _mm512_shuffle_f32x4(u[c], u[4 + c], 0xDD);
        const vf even23 = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0x88);
        const vf odd23 = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0xDD);
        v[c] = _mm512_shuffle_f32x4(even01, even23, 0x88);
        v[c + 8] = _mm512_shuffle_f32x4(even01, even23, 0xDD);
        v[c + 4] = _mm512_shuffle_f32x4(odd01, odd23, 0x88);
        v[c + 12] = _mm512_shuffle_f32x4(odd01, odd23, 0xDD);
    }
}

#elif defined(__AVX2__)

using vf = __m256;
constexpr idx_t kW = 8;

static inline __m256i lane_mask(idx_t n) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32((int)n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
static inline vf vset(float a) { return _mm256_set1_ps(a); }
static inline vf vload_n(const float* p, idx_t n, float fill) {
    if (n >= 8) return _mm256_loadu_ps(p);
    __m256i m = lane_mask(n);
    return _mm256_blendv_ps(_mm256_set1_ps(fill), _mm256_maskload_ps(p, m), _mm256_castsi256_ps(m));
}
static inline vf vkeep_n(vf x, idx_t n) {
    return n >= 8 ? x : _mm256_and_ps(x, _mm256_castsi256_ps(lane_mask(n)));
}
static inline void vstream(float* p, vf x) { _mm256_stream_ps(p, x); }
static inline void vstream_fence() { _mm_sfence(); }
static inline void vstore_n(float* p, vf x, idx_t n) {
    if (n >= 8)
        _mm256_storeu_ps(p, x);
    else
        _mm256_maskstore_ps(p, lane_mask(n), x);
}
LMLAB_VEC_ARITHMETIC(_mm256)
static inline vf vabs(vf a) { return _mm256_andnot_ps(_mm256_set1_ps(-0.0f), a); }
static inline vf vselect_neg(vf s, vf a, vf b) { return _mm256_blendv_ps(b, a, s); }
static inline float vhsum(vf a) {
    __m128 q = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    q = _mm_add_ps(q, _mm_movehl_ps(q, q));
    q = _mm_add_ss(q, _mm_movehdup_ps(q));
    return _mm_cvtss_f32(q);
}
static inline float vhmax(vf a) {
    __m128 q = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    q = _mm_max_ps(q, _mm_movehl_ps(q, q));
    q = _mm_max_ss(q, _mm_movehdup_ps(q));
    return _mm_cvtss_f32(q);
}
static inline vf vround(vf a) { return _mm256_round_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
LMLAB_ROUND_BF16_CARRY(_mm256, si256)
static inline vf vround_bf16(vf a) {
    return _mm256_blendv_ps(round_bf16_carry(a), a, _mm256_cmp_ps(a, a, _CMP_UNORD_Q));
}
static inline vf vzero_where_below(vf x, float lo, vf r) {
    return _mm256_andnot_ps(_mm256_cmp_ps(x, _mm256_set1_ps(lo), _CMP_LT_OQ), r);
}
// p * 2^n for integral n in [-150, 129] (NaN n only with NaN p): two exact power-of-two factors, each
// a normal float, so the only rounding is the final one (into the subnormals or to inf).
static inline vf vldexp(vf p, vf n) {
    __m256i k = _mm256_cvtps_epi32(n);
    k = _mm256_min_epi32(_mm256_max_epi32(k, _mm256_set1_epi32(-150)), _mm256_set1_epi32(129));
    __m256i k1 = _mm256_srai_epi32(k, 1), k2 = _mm256_sub_epi32(k, k1);
    const __m256i bias = _mm256_set1_epi32(127);
    vf f1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(k1, bias), 23));
    vf f2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(k2, bias), 23));
    return _mm256_mul_ps(_mm256_mul_ps(p, f1), f2);
}
LMLAB_TRANSPOSE_4X4_IN_LANES(_mm256)
// Every 4 x 4 block within each 128-bit lane transposed, then the blocks swapped across lanes.
static inline void vtranspose(vf v[8]) {
    transpose_4x4_in_lanes(v, 8);
    vf u[8];
    for (int i = 0; i < 8; i++) u[i] = v[i];
    for (int c = 0; c < 4; c++) {
        v[c] = _mm256_permute2f128_ps(u[c], u[4 + c], 0x20);
        v[c + 4] = _mm256_permute2f128_ps(u[c], u[4 + c], 0x31);
    }
}

#else

using vf = float;
constexpr idx_t kW = 1;

static inline vf vset(float a) { return a; }
static inline vf vload_n(const float* p, idx_t, float) { return *p; }
static inline void vstore_n(float* p, vf x, idx_t) { *p = x; }
static inline vf vkeep_n(vf x, idx_t) { return x; }
static inline void vstream(float* p, vf x) { *p = x; }
static inline void vstream_fence() {}
static inline vf vadd(vf a, vf b) { return a + b; }
static inline vf vsub(vf a, vf b) { return a - b; }
static inline vf vmul(vf a, vf b) { return a * b; }
static inline vf vdiv(vf a, vf b) { return a / b; }
// Same NaN rule as the vector instructions: the second operand wins when either is NaN.
static inline vf vmax(vf a, vf b) { return a > b ? a : b; }
static inline vf vmin(vf a, vf b) { return a < b ? a : b; }
static inline vf vsqrt(vf a) { return __builtin_sqrtf(a); }
static inline vf vabs(vf a) { return __builtin_fabsf(a); }
static inline vf vfmadd(vf a, vf b, vf c) { return a * b + c; }
static inline vf vselect_neg(vf s, vf a, vf b) { return __builtin_signbit(s) ? a : b; }
static inline float vhsum(vf a) { return a; }
static inline float vhmax(vf a) { return a; }
// Round to nearest without a library call (so loops stay vectorisable): adding 1.5 * 2^23 pushes the
// fraction bits out; exact for |a| < 2^22, NaN stays NaN.
static inline vf vround(vf a) {
    const float shifter = 12582912.0f;
    return (a + shifter) - shifter;
}
static inline vf vzero_where_below(vf x, float lo, vf r) { return x < lo ? 0.0f : r; }
static inline vf vround_bf16(vf a) { return bf16_nearest(a); }
static inline void vtranspose(vf*) {}  // a 1 x 1 block
static inline float pow2_bits(int k) {
    int bits = (k + 127) << 23;
    float f;
    std::memcpy(&f, &bits, sizeof f);
    return f;
}
// See the AVX2 version; comparisons written so that NaN n maps to a bound instead of into an int.
static inline vf vldexp(vf p, vf n) {
    n = n > -150.0f ? n : -150.0f;
    n = n < 129.0f ? n : 129.0f;
    int k = (int)n, k1 = k >> 1, k2 = k - k1;
    return p * pow2_bits(k1) * pow2_bits(k2);
}

#endif

static inline vf vexp(vf x_in) {
    using namespace simd_constants;
    // Clamp with the data as the second operand of max/min, so that NaN passes through.
    vf x = vmin(vset(kExpHi), vmax(vset(kExpLo), x_in));
    vf n = vround(vmul(x, vset(kLog2e)));
    vf r = vfmadd(n, vset(-kLn2Hi), x);
    r = vfmadd(n, vset(-kLn2Lo), r);
    vf q = vfmadd(vset(kInvFact7), r, vset(kInvFact6));
    q = vfmadd(q, r, vset(kInvFact5));
    q = vfmadd(q, r, vset(kInvFact4));
    q = vfmadd(q, r, vset(kInvFact3));
    q = vfmadd(q, r, vset(0.5f));
    q = vfmadd(vmul(q, r), r, r);  // expm1(r)
    return vzero_where_below(x_in, kExpLo, vldexp(vadd(q, vset(1.0f)), n));
}

// dst[i] = src[i] * scale for i < n (dst == src allowed). With `streaming`, the stores that can be
// aligned are non-temporal: for outputs too large to stay in cache, this skips reading every
// destination line before overwriting it (a third of the memory traffic); call vstream_fence() after.
static inline void scale_row(float* dst, const float* src, vf scale, idx_t n, bool streaming) {
    idx_t i = 0;
    if (streaming) {
        const idx_t misaligned = (idx_t)(reinterpret_cast<std::uintptr_t>(dst) / sizeof(float) % kW);
        const idx_t head = misaligned == 0 ? 0 : (kW - misaligned < n ? kW - misaligned : n);
        if (head > 0) vstore_n(dst, vmul(vload_n(src, head, 0.0f), scale), head);
        for (i = head; i + kW <= n; i += kW) vstream(dst + i, vmul(vload_n(src + i, kW, 0.0f), scale));
    }
    const idx_t i0 = i;
    LMLAB_SIMD
    for (idx_t j = i0; j < n; j += kW) vstore_n(dst + j, vmul(vload_n(src + j, n - j, 0.0f), scale), n - j);
}

// dst[i] += src[i] for i < n: one add per element, so the result does not depend on how the range is
// cut into vectors.
static inline void add_row(float* dst, const float* src, idx_t n) {
    LMLAB_SIMD
    for (idx_t i = 0; i < n; i += kW)
        vstore_n(dst + i, vadd(vload_n(dst + i, n - i, 0.0f), vload_n(src + i, n - i, 0.0f)), n - i);
}

// Runs body(i, lanes) over [i0, i1) one vector at a time (lanes = min(kW, i1 - i)), four whole
// vectors per iteration where they fit. For elementwise kernels whose every vector is a long
// dependency chain (exp, a division, a square root): four independent chains side by side in the
// instruction stream keep the floating-point units busy, where the out-of-order window holds too
// little of one chain after another to overlap them. Each vector's arithmetic is unchanged, so
// results are too. The calls must not depend on each other: on the portable variant (one element
// per step) the loop is `omp simd`, for the compiler to vectorise.
template <class Body>
static inline void for_each_vector(idx_t i0, idx_t i1, Body body) {
    idx_t i = i0;
#ifdef LMLAB_VECTOR_INTRINSICS
    for (; i + 4 * kW <= i1; i += 4 * kW) {
        body(i, kW);
        body(i + kW, kW);
        body(i + 2 * kW, kW);
        body(i + 3 * kW, kW);
    }
#endif
    LMLAB_SIMD
    for (idx_t j = i; j < i1; j += kW) body(j, i1 - j);
}

// Elements per block of parallel_blocks: large enough to amortise scheduling, a multiple of every kW.
constexpr idx_t kElementBlock = 8192;

template <class Body>
static inline void parallel_blocks(idx_t n, Body body) {
    const idx_t nblocks = (n + kElementBlock - 1) / kElementBlock;
#pragma omp parallel for schedule(static)
    for (idx_t b = 0; b < nblocks; b++) {
        const idx_t i0 = b * kElementBlock, i1 = i0 + kElementBlock < n ? i0 + kElementBlock : n;
        body(i0, i1);
    }
}

}  // namespace LMLAB_ISA_NS
}  // namespace lmlab

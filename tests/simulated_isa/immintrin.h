// The AVX-512, AVX512-BF16 and AMX intrinsics the kernels use, written as plain C++: the avx512
// variant's code (every kernel, the VDPBF16PS and AMX matrix products among them) compiled to run on
// any x86-64 CPU, to test its logic where the instructions are missing. Test drivers built as the
// "avx512_sim" variant (tests/drivers.py) put this directory first on the include path, so
// `#include <immintrin.h>` in cpp/simd.h finds this file instead of the compiler's, and define the
// macros the real avx512 build has (__AVX512F__, __AVX2__, ...) plus LMLAB_SIMULATED_ISA, which turns
// the target attributes off and tells cpp/bf16_path.cpp that both native bf16 paths may run.
//
// Semantics follow Intel's definitions where the kernels' results depend on them: masked loads and
// stores touch only their lanes' memory; aligned loads and stores trap off a 64-byte boundary; max/min return the second operand on NaN; fused multiply-add
// rounds once; VCVTNE2PS2BF16 rounds to nearest even, keeps NaN quiet and takes denormal inputs as
// zero; VDPBF16PS and TDPBF16PS add each pair's exact products one at a time (VDPBF16PS odd k first,
// TDPBF16PS even first), rounding each sum to fp32, with bf16 inputs and fp32 results below 2^-126
// taken as zero. Speed means nothing here; only results are tested.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#define LMLAB_SIM_VEC(type, bytes) type __attribute__((vector_size(bytes), aligned(bytes), may_alias))
typedef LMLAB_SIM_VEC(float, 64) __m512;
typedef LMLAB_SIM_VEC(double, 64) __m512d;
typedef LMLAB_SIM_VEC(long long, 64) __m512i;
typedef LMLAB_SIM_VEC(short, 64) __m512bh;
typedef LMLAB_SIM_VEC(float, 32) __m256;
typedef LMLAB_SIM_VEC(double, 32) __m256d;
typedef LMLAB_SIM_VEC(long long, 32) __m256i;
typedef LMLAB_SIM_VEC(float, 16) __m128;
typedef LMLAB_SIM_VEC(double, 16) __m128d;
#undef LMLAB_SIM_VEC
typedef unsigned short __mmask16;

#define _MM_FROUND_TO_NEAREST_INT 0x00
#define _MM_FROUND_NO_EXC 0x08
#define _CMP_UNORD_Q 0x03
#define _CMP_LT_OQ 0x11
#define _MM_HINT_T0 3

namespace lmlab_sim {

typedef int v16si __attribute__((vector_size(64), may_alias));
typedef unsigned int v16ui __attribute__((vector_size(64), may_alias));
typedef unsigned short v32hu __attribute__((vector_size(64), may_alias));

inline bool lane(__mmask16 k, int i) { return (k >> i) & 1u; }

inline std::uint32_t bits(float x) {
    std::uint32_t u;
    std::memcpy(&u, &x, sizeof u);
    return u;
}
inline float from_bits(std::uint32_t u) {
    float x;
    std::memcpy(&x, &u, sizeof x);
    return x;
}

// Below 2^-126 (a denormal or zero) becomes a zero of the same sign.
inline float flush(float x) { return std::fabs(x) < 0x1p-126f ? std::copysign(0.0f, x) : x; }

inline std::uint16_t to_bf16(float x) {
    const std::uint32_t u = bits(flush(x));
    if (std::isnan(x)) return (std::uint16_t)((bits(x) >> 16) | 0x40u);  // quiet NaN, sign kept
    return (std::uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}
inline float from_bf16(std::uint16_t h) { return flush(from_bits((std::uint32_t)h << 16)); }

// acc + a * b for two bf16: the product is exact (fma: even where it is below fp32's normal range),
// the sum rounds once, the result is flushed.
inline float add_product(float acc, std::uint16_t a, std::uint16_t b) {
    return flush(std::fma(from_bf16(a), from_bf16(b), flush(acc)));
}

}  // namespace lmlab_sim

// --- set, load, store ------------------------------------------------------------------------------
inline __m512 _mm512_setzero_ps() { return __m512{}; }
inline __m512d _mm512_setzero_pd() { return __m512d{}; }
inline __m512 _mm512_set1_ps(float a) { return __m512{} + a; }
inline __m512i _mm512_set1_epi32(int a) { return (__m512i)(lmlab_sim::v16si{} + a); }
inline __m512 _mm512_loadu_ps(const void* p) {
    __m512 r;
    std::memcpy(&r, p, sizeof r);
    return r;
}
// The aligned forms fault (#GP) on an address that is not a multiple of 64, and so do these.
namespace lmlab_sim {
inline void expect_aligned(const void* p) {
    if (reinterpret_cast<std::uintptr_t>(p) % 64 != 0) __builtin_trap();
}
}  // namespace lmlab_sim
inline __m512 _mm512_load_ps(const void* p) {
    lmlab_sim::expect_aligned(p);
    return _mm512_loadu_ps(p);
}
inline __m512i _mm512_load_si512(const void* p) {
    lmlab_sim::expect_aligned(p);
    __m512i r;
    std::memcpy(&r, p, sizeof r);
    return r;
}
inline void _mm512_storeu_ps(void* p, __m512 a) { std::memcpy(p, &a, sizeof a); }
inline void _mm512_store_ps(void* p, __m512 a) {
    lmlab_sim::expect_aligned(p);
    std::memcpy(p, &a, sizeof a);
}
inline void _mm512_stream_ps(void* p, __m512 a) {
    lmlab_sim::expect_aligned(p);
    std::memcpy(p, &a, sizeof a);
}
inline void _mm512_store_si512(void* p, __m512i a) {
    lmlab_sim::expect_aligned(p);
    std::memcpy(p, &a, sizeof a);
}
inline __m512 _mm512_mask_loadu_ps(__m512 src, __mmask16 k, const void* p) {
    for (int i = 0; i < 16; i++)
        if (lmlab_sim::lane(k, i)) {
            float x;
            std::memcpy(&x, static_cast<const float*>(p) + i, 4);
            src[i] = x;
        }
    return src;
}
inline __m512 _mm512_maskz_loadu_ps(__mmask16 k, const void* p) {
    return _mm512_mask_loadu_ps(__m512{}, k, p);
}
inline void _mm512_mask_storeu_ps(void* p, __mmask16 k, __m512 a) {
    for (int i = 0; i < 16; i++)
        if (lmlab_sim::lane(k, i)) {
            const float x = a[i];
            std::memcpy(static_cast<float*>(p) + i, &x, 4);
        }
}
inline void _mm512_mask_storeu_epi32(void* p, __mmask16 k, __m512i a) {
    _mm512_mask_storeu_ps(p, k, (__m512)a);
}
inline void _mm_prefetch(const void*, int) {}
inline void _mm_sfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }

// --- arithmetic ------------------------------------------------------------------------------------
#define LMLAB_SIM_LANEWISE(name, type, n, expr)  \
    inline type name(type a, type b) {           \
        type r;                                  \
        for (int i = 0; i < n; i++) r[i] = expr; \
        return r;                                \
    }
LMLAB_SIM_LANEWISE(_mm512_add_ps, __m512, 16, a[i] + b[i])
LMLAB_SIM_LANEWISE(_mm512_sub_ps, __m512, 16, a[i] - b[i])
LMLAB_SIM_LANEWISE(_mm512_mul_ps, __m512, 16, a[i] * b[i])
LMLAB_SIM_LANEWISE(_mm512_div_ps, __m512, 16, a[i] / b[i])
LMLAB_SIM_LANEWISE(_mm512_max_ps, __m512, 16, a[i] > b[i] ? a[i] : b[i])
LMLAB_SIM_LANEWISE(_mm512_min_ps, __m512, 16, a[i] < b[i] ? a[i] : b[i])
LMLAB_SIM_LANEWISE(_mm512_add_pd, __m512d, 8, a[i] + b[i])
// scalef: a * 2^floor(b)
LMLAB_SIM_LANEWISE(_mm512_scalef_ps, __m512, 16,
                   std::isnan(b[i]) ? b[i] : std::ldexp(a[i], (int)std::fmax(-400.0f, std::fmin(400.0f, std::floor(b[i])))))
#undef LMLAB_SIM_LANEWISE

inline __m512 _mm512_sqrt_ps(__m512 a) {
    for (int i = 0; i < 16; i++) a[i] = std::sqrt(a[i]);
    return a;
}
inline __m512 _mm512_abs_ps(__m512 a) {
    for (int i = 0; i < 16; i++) a[i] = std::fabs(a[i]);
    return a;
}
inline __m512 _mm512_fmadd_ps(__m512 a, __m512 b, __m512 c) {
    for (int i = 0; i < 16; i++) c[i] = std::fma(a[i], b[i], c[i]);
    return c;
}
inline __m512d _mm512_fmadd_pd(__m512d a, __m512d b, __m512d c) {
    for (int i = 0; i < 8; i++) c[i] = std::fma(a[i], b[i], c[i]);
    return c;
}
inline __m512 _mm512_roundscale_ps(__m512 a, int) {  // only to nearest integer, ties to even
    for (int i = 0; i < 16; i++) a[i] = std::nearbyint(a[i]);
    return a;
}
// Pairwise halving in the compiler's own expansion's order (GCC's avx512fintrin.h): op(high half,
// low half) for the 256- and 128-bit halvings, then op(low, high) within the last 128 bits. For max
// the operand order decides which NaN-holding lane wins (MAXPS returns its second operand on NaN).
inline float _mm512_reduce_add_ps(__m512 a) {
    for (int w = 8; w >= 1; w /= 2)
        for (int i = 0; i < w; i++) a[i] = a[i] + a[i + w];
    return a[0];
}
inline float _mm512_reduce_max_ps(__m512 a) {
    for (int w = 8; w >= 1; w /= 2)
        for (int i = 0; i < w; i++) {
            const float x = w >= 4 ? a[i + w] : a[i], y = w >= 4 ? a[i] : a[i + w];
            a[i] = x > y ? x : y;
        }
    return a[0];
}
inline double _mm512_reduce_add_pd(__m512d a) {
    for (int w = 4; w >= 1; w /= 2)
        for (int i = 0; i < w; i++) a[i] = a[i] + a[i + w];
    return a[0];
}

// --- 32-bit integer lanes ---------------------------------------------------------------------------
inline __m512i _mm512_add_epi32(__m512i a, __m512i b) {
    return (__m512i)((lmlab_sim::v16ui)a + (lmlab_sim::v16ui)b);  // unsigned: wraps as the instruction does
}
inline __m512i _mm512_and_si512(__m512i a, __m512i b) { return a & b; }
inline __m512i _mm512_srli_epi32(__m512i a, unsigned int count) {
    return count > 31 ? __m512i{} : (__m512i)((lmlab_sim::v16ui)a >> count);
}

// --- masks, compares, conversions, casts ------------------------------------------------------------
inline __m512 _mm512_maskz_mov_ps(__mmask16 k, __m512 a) {
    for (int i = 0; i < 16; i++)
        if (!lmlab_sim::lane(k, i)) a[i] = 0.0f;
    return a;
}
inline __m512 _mm512_mask_blend_ps(__mmask16 k, __m512 a, __m512 b) {
    for (int i = 0; i < 16; i++)
        if (lmlab_sim::lane(k, i)) a[i] = b[i];
    return a;
}
// Masks are built from plain arrays: GCC 12 with -fsanitize=undefined miscompiles the same loop over
// vector elements (every bit set).
inline __mmask16 _mm512_movepi32_mask(__m512i a) {
    std::int32_t v[16];
    std::memcpy(v, &a, sizeof v);
    unsigned k = 0;
    for (int i = 0; i < 16; i++)
        if (v[i] < 0) k |= 1u << i;
    return (__mmask16)k;
}
inline __mmask16 _mm512_cmp_ps_mask(__m512 a, __m512 b, int predicate) {  // _CMP_LT_OQ, _CMP_UNORD_Q
    float x[16], y[16];
    std::memcpy(x, &a, sizeof x);
    std::memcpy(y, &b, sizeof y);
    unsigned k = 0;
    for (int i = 0; i < 16; i++)
        if (predicate == _CMP_UNORD_Q ? std::isnan(x[i]) || std::isnan(y[i]) : x[i] < y[i]) k |= 1u << i;
    return (__mmask16)k;
}
inline __m512i _mm512_castps_si512(__m512 a) { return (__m512i)a; }
inline __m512 _mm512_castsi512_ps(__m512i a) { return (__m512)a; }
inline __m512d _mm512_castps_pd(__m512 a) { return (__m512d)a; }
inline __m512 _mm512_castpd_ps(__m512d a) { return (__m512)a; }
inline __m256 _mm256_castpd_ps(__m256d a) { return (__m256)a; }
inline __m256 _mm512_castps512_ps256(__m512 a) {
    __m256 r;
    std::memcpy(&r, &a, sizeof r);
    return r;
}
inline __m256d _mm512_extractf64x4_pd(__m512d a, int half) {
    __m256d r;
    std::memcpy(&r, reinterpret_cast<const char*>(&a) + 32 * (half & 1), sizeof r);
    return r;
}
inline __m512d _mm512_cvtps_pd(__m256 a) {
    __m512d r;
    for (int i = 0; i < 8; i++) r[i] = a[i];
    return r;
}

// --- shuffles (128-bit lanes of four floats or two doubles) ----------------------------------------
inline __m512 _mm512_shuffle_f32x4(__m512 a, __m512 b, int imm) {
    __m512 r;
    for (int l = 0; l < 4; l++) {
        const __m512& src = l < 2 ? a : b;
        const int from = (imm >> (2 * l)) & 3;
        for (int j = 0; j < 4; j++) r[4 * l + j] = src[4 * from + j];
    }
    return r;
}
inline __m512 _mm512_unpacklo_ps(__m512 a, __m512 b) {
    __m512 r;
    for (int l = 0; l < 16; l += 4) {
        r[l] = a[l], r[l + 1] = b[l], r[l + 2] = a[l + 1], r[l + 3] = b[l + 1];
    }
    return r;
}
inline __m512 _mm512_unpackhi_ps(__m512 a, __m512 b) {
    __m512 r;
    for (int l = 0; l < 16; l += 4) {
        r[l] = a[l + 2], r[l + 1] = b[l + 2], r[l + 2] = a[l + 3], r[l + 3] = b[l + 3];
    }
    return r;
}
inline __m512d _mm512_unpacklo_pd(__m512d a, __m512d b) {
    __m512d r;
    for (int l = 0; l < 8; l += 2) r[l] = a[l], r[l + 1] = b[l];
    return r;
}
inline __m512d _mm512_unpackhi_pd(__m512d a, __m512d b) {
    __m512d r;
    for (int l = 0; l < 8; l += 2) r[l] = a[l + 1], r[l + 1] = b[l + 1];
    return r;
}
inline __m512i _mm512_permutexvar_epi16(__m512i idx, __m512i a) {
    const lmlab_sim::v32hu i = (lmlab_sim::v32hu)idx, v = (lmlab_sim::v32hu)a;
    lmlab_sim::v32hu r;
    for (int j = 0; j < 32; j++) r[j] = v[i[j] & 31];
    return (__m512i)r;
}

// --- AVX512-BF16 -----------------------------------------------------------------------------------
// bf16 j < 16 of the result is b[j] rounded, bf16 16 + j is a[j].
inline __m512bh _mm512_cvtne2ps_pbh(__m512 a, __m512 b) {
    lmlab_sim::v32hu r;
    for (int j = 0; j < 16; j++) {
        r[j] = lmlab_sim::to_bf16(b[j]);
        r[16 + j] = lmlab_sim::to_bf16(a[j]);
    }
    return (__m512bh)r;
}
inline __m512 _mm512_dpbf16_ps(__m512 acc, __m512bh a, __m512bh b) {
    const lmlab_sim::v32hu x = (lmlab_sim::v32hu)a, y = (lmlab_sim::v32hu)b;
    for (int i = 0; i < 16; i++) {
        acc[i] = lmlab_sim::add_product(acc[i], x[2 * i + 1], y[2 * i + 1]);
        acc[i] = lmlab_sim::add_product(acc[i], x[2 * i], y[2 * i]);
    }
    return acc;
}

// --- AMX: eight tile registers of up to 16 rows x 64 bytes, per thread -----------------------------
namespace lmlab_sim {
struct Tiles {
    bool configured = false;
    std::uint8_t rows[8] = {};
    std::uint16_t colsb[8] = {};
    alignas(64) unsigned char data[8][16][64] = {};
};
inline Tiles& tiles() {
    static thread_local Tiles t;
    return t;
}
// A tile instruction without a configuration, or past its tile's shape, is a #UD on the CPU.
inline Tiles& configured_tiles(int t) {
    Tiles& s = tiles();
    if (!s.configured || t < 0 || t > 7 || s.rows[t] == 0) __builtin_trap();
    return s;
}
}  // namespace lmlab_sim

inline void _tile_loadconfig(const void* config) {
    const unsigned char* c = static_cast<const unsigned char*>(config);
    lmlab_sim::Tiles& s = lmlab_sim::tiles();
    if (c[0] != 1) __builtin_trap();  // palette 1 is the only one the kernels (and CPUs) have
    for (int t = 0; t < 8; t++) {
        std::memcpy(&s.colsb[t], c + 16 + 2 * t, 2);
        s.rows[t] = c[48 + t];
        if (s.colsb[t] > 64 || s.rows[t] > 16) __builtin_trap();
    }
    s.configured = true;
}
inline void _tile_release() { lmlab_sim::tiles() = lmlab_sim::Tiles{}; }
inline void _tile_zero(int t) { std::memset(lmlab_sim::configured_tiles(t).data[t], 0, 16 * 64); }
inline void _tile_loadd(int t, const void* base, long stride) {
    lmlab_sim::Tiles& s = lmlab_sim::configured_tiles(t);
    for (int r = 0; r < s.rows[t]; r++)
        std::memcpy(s.data[t][r], static_cast<const char*>(base) + r * stride, s.colsb[t]);
}
inline void _tile_stored(int t, void* base, long stride) {
    lmlab_sim::Tiles& s = lmlab_sim::configured_tiles(t);
    for (int r = 0; r < s.rows[t]; r++)
        std::memcpy(static_cast<char*>(base) + r * stride, s.data[t][r], s.colsb[t]);
}
// C (rows x colsb/4 fp32) += A (rows x K pairs of bf16) . B (K rows of colsb/4 pairs).
inline void _tile_dpbf16ps(int c, int a, int b) {
    lmlab_sim::Tiles& s = lmlab_sim::configured_tiles(c);
    lmlab_sim::configured_tiles(a);
    lmlab_sim::configured_tiles(b);
    const int M = s.rows[c], N = s.colsb[c] / 4, K = s.colsb[a] / 4;
    if (s.rows[a] != M || s.rows[b] != K || s.colsb[b] != s.colsb[c]) __builtin_trap();
    for (int m = 0; m < M; m++) {
        float acc[16];
        std::memcpy(acc, s.data[c][m], sizeof acc);
        std::uint16_t x[32], y[32];
        std::memcpy(x, s.data[a][m], sizeof x);
        for (int k = 0; k < K; k++) {
            std::memcpy(y, s.data[b][k], sizeof y);
            for (int n = 0; n < N; n++) {
                acc[n] = lmlab_sim::add_product(acc[n], x[2 * k], y[2 * n]);
                acc[n] = lmlab_sim::add_product(acc[n], x[2 * k + 1], y[2 * n + 1]);
            }
        }
        std::memcpy(s.data[c][m], acc, sizeof acc);
    }
}

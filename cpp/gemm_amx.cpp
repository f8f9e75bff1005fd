// gemm_bf16_amx: the bf16 matrix product (Precision::bf16, Bf16Path::amx) on Intel's AMX tile unit.
//   C (M, N) = init + alpha * A . B, operands rounded to bfloat16, fp32 accumulation (cpp/gemm.h).
//
// AMX holds eight tile registers of 16 rows x 64 bytes. TDPBF16PS C, A, B adds to a 16 x 16 fp32 tile
// C the product of a 16 x 32 bf16 tile A and a 32 x 16 bf16 tile B stored in pairs ("VNNI" layout:
// row j of the B tile holds, for each of the 16 columns, the two bf16 values of k = 2j and 2j + 1).
// One instruction is 8,192 multiply-adds; a core issues one every 16 cycles, about 16 times the fp32
// FMA rate of AVX-512.
//
// The blocking is gemm's (cpp/gemm.cpp) with bf16 panels:
//   for each NC-wide column block:   for each KC-deep slice:   pack op(B) into 16-column VNNI tiles
//     for each MC-tall row block:    pack op(A) into 16-row tiles (alpha folded in, then rounded)
//       for each 32 x 32 block of C: four C tiles, two A tiles, two B tiles; TDPBF16PS over the slice
// Packing converts fp32 to bf16 with AVX512-BF16's round-to-nearest-even conversion and zero-pads every
// edge (rows, columns and k to a multiple of 32), so edge blocks run the same instructions.
//
// Determinism: each slice's products are summed in a tile from zero, in k order, then added to C (or,
// on the first slice, to the init: C, bias or zero) with one fp32 addition; the slices have a depth
// that depends on K alone, and edge blocks run the same instructions on zero padding. Threads divide C
// into whole 32 x 32 blocks. So every element is bitwise the same for any thread count and any
// position in C.
//
// Only the AVX-512 build holds this code, each function compiled for AMX and AVX512-BF16 by a target
// attribute; cpp/bf16_path.cpp decides at run time whether it may run.
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "gemm.h"
#include "gemm_internal.h"
#include "isa.h"
#include "simd.h"


#if defined(__AVX512F__) && defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && \
    __GNUC__ >= 11
#define LMLAB_AMX_BUILD 1
#endif

namespace lmlab {
namespace LMLAB_ISA_NS {

#ifndef LMLAB_AMX_BUILD

bool gemm_bf16_amx(idx_t, idx_t, idx_t, float, Operand, Operand, Output, bool) { return false; }

#else

#ifdef LMLAB_SIMULATED_ISA  // tests/simulated_isa: the intrinsics are plain C++
#define LMLAB_AMX_TARGET
#else
#define LMLAB_AMX_TARGET __attribute__((target("amx-tile,amx-bf16,avx512bf16")))
#endif

// GCC 12 does not emit the destructor of a class-template thread_local on its own: instantiate it.
template struct Scratch<std::uint16_t>;

namespace {

using bf16_t = std::uint16_t;

constexpr idx_t kTile = 16;        // rows (and fp32 columns) of a C tile
constexpr idx_t kStepK = 32;       // k per TDPBF16PS
constexpr idx_t kTileElems = 512;  // bf16 values in one 16 x 32 A tile or 16-pair x 16 B tile
constexpr idx_t kBlock = 32;       // C block per micro-kernel call: 2 x 2 tiles

// Cache blocks: a 32-row A micro-panel of one slice (32 KB at KC = 512) stays in L1 while the
// B panels of the column block (NC x KC, 512 KB) stream from L2.
constexpr idx_t KC = 512, MC = 256, NC = 512;

// Products smaller than this run on one thread (the tile unit finishes them before a thread team would start).
constexpr double kParallelMinWork = 1 << 21;

inline idx_t round_up(idx_t a, idx_t b) { return ceil_div(a, b) * b; }

// Slice depth: a multiple of 32, a function of K alone (see Determinism).
inline idx_t slice_depth(idx_t K) { return round_up(ceil_div(K, ceil_div(K, KC)), kStepK); }

thread_local Scratch<bf16_t> tl_pack_a;  // see Scratch in gemm_internal.h
thread_local Scratch<bf16_t> tl_pack_b;

// Palette 1, tiles 0-7 all 16 rows x 64 bytes: 0-3 accumulate C, 4-5 hold A, 6-7 hold B.
struct alignas(64) TileConfig {
    std::uint8_t palette_id = 1;
    std::uint8_t start_row = 0;
    std::uint8_t reserved[14] = {};
    std::uint16_t colsb[16] = {};
    std::uint8_t rows[16] = {};
};

LMLAB_AMX_TARGET void configure_tiles() {
    TileConfig cfg;
    for (int t = 0; t < 8; t++) {
        cfg.colsb[t] = 64;
        cfg.rows[t] = (std::uint8_t)kTile;
    }
    _tile_loadconfig(&cfg);
}

inline __mmask16 lanes(idx_t n) {
    return n >= 16 ? (__mmask16)0xFFFF : n <= 0 ? (__mmask16)0 : (__mmask16)((1u << n) - 1u);
}

// 32 fp32 values (lo = the first 16) as 32 bf16 in order, rounded to nearest even.
LMLAB_AMX_TARGET inline __m512i to_bf16(__m512 lo, __m512 hi) {
    return (__m512i)_mm512_cvtne2ps_pbh(hi, lo);
}

// --- packing ---------------------------------------------------------------------------------------
// A: rows of op(A) in groups of 16; for each group and 32-deep step of k, one 16 x 32 tile (row r,
//    column kk = element alpha * op(A)[r, k0 + kk]). Groups are padded to an even count, so that every
//    32-row micro-panel exists; the padding is zero.
// op(A)[m, k] = src[m * sm + k * sk], rows < `rows`, k < kb.
LMLAB_AMX_TARGET void pack_a(bf16_t* dst, const float* src, idx_t sm, idx_t sk, idx_t rows,
                             idx_t kb, float alpha) {
    const idx_t steps = ceil_div(kb, kStepK), groups = round_up(ceil_div(rows, kTile), 2);
    const __m512 va = _mm512_set1_ps(alpha);
    // Steps outer, groups inner: for each step every row of src (of either layout) is read from start
    // to end, the order the hardware prefetchers follow.
    for (idx_t s = 0; s < steps; s++) {
        const idx_t k0 = s * kStepK, valid_k = kb - k0;
        for (idx_t g = 0; g < groups; g++) {
            const idx_t r0 = g * kTile, valid_rows = rows - r0;
            bf16_t* tile = dst + (g * steps + s) * kTileElems;
            if (valid_rows <= 0) {
                std::memset(tile, 0, kTileElems * sizeof(bf16_t));
            } else if (sk == 1) {
                for (idx_t r = 0; r < kTile; r++) {
                    __m512 lo = _mm512_setzero_ps(), hi = lo;
                    if (r < valid_rows) {
                        const float* p = src + (r0 + r) * sm + k0;
                        lo = _mm512_mul_ps(_mm512_maskz_loadu_ps(lanes(valid_k), p), va);
                        hi = _mm512_mul_ps(_mm512_maskz_loadu_ps(lanes(valid_k - 16), p + 16), va);
                    }
                    _mm512_store_si512(tile + r * kStepK, to_bf16(lo, hi));
                }
            } else if (sm == 1) {
                // Rows of op(A) lie across memory: read 32 k-rows of 16 lanes, transpose in two
                // 16 x 16 halves.
                vf v0[16], v1[16];
                const __mmask16 rmask = lanes(valid_rows);
                for (idx_t kk = 0; kk < 16; kk++) {
                    v0[kk] = kk < valid_k ? _mm512_maskz_loadu_ps(rmask, src + (k0 + kk) * sk + r0)
                                          : _mm512_setzero_ps();
                    v1[kk] = kk + 16 < valid_k
                                 ? _mm512_maskz_loadu_ps(rmask, src + (k0 + kk + 16) * sk + r0)
                                 : _mm512_setzero_ps();
                }
                vtranspose(v0);
                vtranspose(v1);
                for (idx_t r = 0; r < kTile; r++)
                    _mm512_store_si512(tile + r * kStepK,
                                       to_bf16(_mm512_mul_ps(v0[r], va), _mm512_mul_ps(v1[r], va)));
            } else {
                alignas(64) float row[kStepK];
                for (idx_t r = 0; r < kTile; r++) {
                    for (idx_t kk = 0; kk < kStepK; kk++)
                        row[kk] = r < valid_rows && kk < valid_k
                                      ? alpha * src[(r0 + r) * sm + (k0 + kk) * sk]
                                      : 0.0f;
                    _mm512_store_si512(tile + r * kStepK,
                                       to_bf16(_mm512_load_ps(row), _mm512_load_ps(row + 16)));
                }
            }
        }
    }
}

// B: columns of op(B) in groups of 16 (padded to an even count); for each group and step, one VNNI
// tile: row j, column n holds the pair (op(B)[k0 + 2j, n], op(B)[k0 + 2j + 1, n]).
// op(B)[k, n] = src[k * sk + n * sn], columns < `cols`, k < kb.
LMLAB_AMX_TARGET void pack_b(bf16_t* dst, const float* src, idx_t sk, idx_t sn, idx_t cols,
                             idx_t kb) {
    const idx_t steps = ceil_div(kb, kStepK), groups = round_up(ceil_div(cols, kTile), 2);
    // Interleaves [a0..a15, b0..b15] into [a0, b0, a1, b1, ...].
    alignas(64) std::uint16_t interleave_idx[32];
    for (int n = 0; n < 16; n++) {
        interleave_idx[2 * n] = (std::uint16_t)n;
        interleave_idx[2 * n + 1] = (std::uint16_t)(16 + n);
    }
    const __m512i interleave = _mm512_load_si512(interleave_idx);
    for (idx_t s = 0; s < steps; s++) {  // steps outer, as in pack_a
        const idx_t k0 = s * kStepK, valid_k = kb - k0;
        for (idx_t g = 0; g < groups; g++) {
            const idx_t n0 = g * kTile, valid_cols = cols - n0;
            bf16_t* tile = dst + (g * steps + s) * kTileElems;
            if (valid_cols <= 0) {
                std::memset(tile, 0, kTileElems * sizeof(bf16_t));
            } else if (sn == 1) {
                const __mmask16 cmask = lanes(valid_cols);
                for (idx_t j = 0; j < kTile; j++) {
                    const idx_t k = k0 + 2 * j;
                    const __m512 even = k < kb ? _mm512_maskz_loadu_ps(cmask, src + k * sk + n0)
                                               : _mm512_setzero_ps();
                    const __m512 odd = k + 1 < kb
                                           ? _mm512_maskz_loadu_ps(cmask, src + (k + 1) * sk + n0)
                                           : _mm512_setzero_ps();
                    _mm512_store_si512(tile + j * kStepK,
                                       _mm512_permutexvar_epi16(interleave, to_bf16(even, odd)));
                }
            } else if (sk == 1) {
                // Each column's k run is contiguous: converted, 32 bf16 are 16 ready-made pairs; a
                // 16 x 16 transpose of those 32-bit pairs puts the columns side by side.
                vf v[16];
                for (idx_t n = 0; n < kTile; n++) {
                    if (n < valid_cols) {
                        const float* p = src + (n0 + n) * sn + k0;
                        v[n] = _mm512_castsi512_ps(to_bf16(_mm512_maskz_loadu_ps(lanes(valid_k), p),
                                                   _mm512_maskz_loadu_ps(lanes(valid_k - 16), p + 16)));
                    } else {
                        v[n] = _mm512_setzero_ps();
                    }
                }
                vtranspose(v);
                for (idx_t j = 0; j < kTile; j++)
                    _mm512_store_si512(tile + j * kStepK, _mm512_castps_si512(v[j]));
            } else {
                alignas(64) float even[kTile], odd[kTile];
                for (idx_t j = 0; j < kTile; j++) {
                    for (idx_t n = 0; n < kTile; n++) {
                        const idx_t k = k0 + 2 * j;
                        const bool col = n < valid_cols;
                        even[n] = col && k < kb ? src[k * sk + (n0 + n) * sn] : 0.0f;
                        odd[n] = col && k + 1 < kb ? src[(k + 1) * sk + (n0 + n) * sn] : 0.0f;
                    }
                    _mm512_store_si512(tile + j * kStepK,
                                       _mm512_permutexvar_epi16(interleave,
                                                                to_bf16(_mm512_load_ps(even),
                                                                        _mm512_load_ps(odd))));
                }
            }
        }
    }
}

// --- micro-kernel ----------------------------------------------------------------------------------
// One 32 x 32 block of one slice: four C tiles (t = 2 * row half + column half) start at zero, take
// `steps` steps of A . B, and are stored to `stage` (four 16 x 16 fp32 tiles, contiguous). The A
// tiles of the two row halves and the B tiles of the two column halves are consecutive steps of their
// packed panels. Storing to a small buffer in L1 rather than to C keeps the tile unit from waiting
// on C's cache lines; write_back adds the stage into C with vector instructions, which run while the
// tile unit works on the next block.

// GCC's tile intrinsics are asm statements that do not tell the compiler they touch memory: fence the
// packed panels' stores before the tile loads, and the tile stores before anyone reads the stage.
inline void compiler_fence() { __asm__ volatile("" ::: "memory"); }

LMLAB_AMX_TARGET void micro_block(idx_t steps, const bf16_t* a0, const bf16_t* a1, const bf16_t* b0,
                                  const bf16_t* b1, float* stage) {
    compiler_fence();
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (idx_t s = 0; s < steps; s++) {
        const idx_t off = s * kTileElems;
        _tile_loadd(4, a0 + off, 64);
        _tile_loadd(6, b0 + off, 64);
        _tile_dpbf16ps(0, 4, 6);
        _tile_loadd(7, b1 + off, 64);
        _tile_dpbf16ps(1, 4, 7);
        _tile_loadd(5, a1 + off, 64);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
    }
    _tile_stored(0, stage, 64);
    _tile_stored(1, stage + kTile * kTile, 64);
    _tile_stored(2, stage + 2 * kTile * kTile, 64);
    _tile_stored(3, stage + 3 * kTile * kTile, 64);
    compiler_fence();
}

// C (rows x cols of a 32 x 32 block, rows, cols <= 32) = init + stage, where init is C itself
// (from_c), the bias row, or zero. One rounding per slice, the same for edge and full blocks.
inline void write_back(const float* stage, float* c, idx_t ldc, idx_t rows, idx_t cols,
                       const float* bias, bool from_c) {
    for (idx_t h = 0; h < 2; h++) {
        const idx_t width = cols - h * kTile;
        if (width <= 0) break;
        const __mmask16 m = lanes(width);
        const __m512 b = !from_c && bias != nullptr ? _mm512_maskz_loadu_ps(m, bias + h * kTile)
                                                    : _mm512_setzero_ps();
        for (idx_t r = 0; r < rows; r++) {
            const float* st = stage + ((r / kTile) * 2 + h) * kTile * kTile + (r % kTile) * kTile;
            float* cr = c + r * ldc + h * kTile;
            const __m512 init = from_c ? _mm512_maskz_loadu_ps(m, cr) : b;
            _mm512_mask_storeu_ps(cr, m, _mm512_add_ps(init, _mm512_load_ps(st)));
        }
    }
}

// --- one thread's share ----------------------------------------------------------------------------
// The blocked product over a sub-block of C. Returns false (having written nothing) if its scratch
// could not be allocated.
LMLAB_AMX_TARGET bool amx_blocked(idx_t M, idx_t N, idx_t K, float alpha, Operand A, Operand B,
                                  Output C) {
    const idx_t kc = slice_depth(K);
    const idx_t mc = min_idx(MC, round_up(M, kBlock)), nc = min_idx(NC, round_up(N, kBlock));
    bf16_t* pa = tl_pack_a.get((size_t)(mc * kc));
    bf16_t* pb = tl_pack_b.get((size_t)(nc * kc));
    if (pa == nullptr || pb == nullptr) return false;
    configure_tiles();
    // Software pipelining: a block's write-back runs after the next block has been issued to the
    // tile unit, so the vector unit adds one stage into C while the tiles compute the next. Two
    // stages alternate; a block's stage is written back before the stage is reused two blocks on.
    alignas(64) float stage[2][4 * kTile * kTile];
    int which = 0;
    struct Pending {
        const float* stage = nullptr;
        float* c;
        idx_t rows, cols;
        const float* bias;
        bool from_c;
    } pending;
    auto flush = [&] {
        if (pending.stage != nullptr)
            write_back(pending.stage, pending.c, C.ld, pending.rows, pending.cols, pending.bias,
                       pending.from_c);
        pending.stage = nullptr;
    };
    for (idx_t jc = 0; jc < N; jc += NC) {
        const idx_t nb = min_idx(NC, N - jc);
        for (idx_t pc = 0; pc < K; pc += kc) {
            const idx_t kb = min_idx(kc, K - pc), steps = ceil_div(kb, kStepK);
            const Operand b = B.from(pc, jc);
            pack_b(pb, b.data, b.row_stride, b.col_stride, nb, kb);
            // The first slice adds its products to the init; later ones to C.
            const bool from_c = C.accumulate || pc > 0;
            const float* row_init = C.bias != nullptr ? C.bias + jc : nullptr;
            for (idx_t ic = 0; ic < M; ic += MC) {
                const idx_t mb = min_idx(MC, M - ic);
                const Operand a = A.from(ic, pc);
                pack_a(pa, a.data, a.row_stride, a.col_stride, mb, kb, alpha);
                for (idx_t ir = 0; ir < mb; ir += kBlock) {
                    const idx_t ga = ir / kTile, rows = min_idx(kBlock, mb - ir);
                    for (idx_t jr = 0; jr < nb; jr += kBlock) {
                        const idx_t gb = jr / kTile, cols = min_idx(kBlock, nb - jr);
                        float* st = stage[which];
                        which ^= 1;
                        micro_block(steps, pa + ga * steps * kTileElems,
                                    pa + (ga + 1) * steps * kTileElems, pb + gb * steps * kTileElems,
                                    pb + (gb + 1) * steps * kTileElems, st);
                        flush();
                        pending.stage = st;
                        pending.c = C.data + (ic + ir) * C.ld + jc + jr;
                        pending.rows = rows;
                        pending.cols = cols;
                        pending.bias = row_init != nullptr ? row_init + jr : nullptr;
                        pending.from_c = from_c;
                    }
                }
            }
        }
    }
    flush();
    _tile_release();
    return true;
}

}  // namespace

bool gemm_bf16_amx(idx_t M, idx_t N, idx_t K, float alpha, Operand A, Operand B, Output C,
                   bool parallel) {
    if (!bf16_path_available(Bf16Path::amx)) return false;
    if (M <= 0 || N <= 0) return true;
    if (K <= 0) {
        empty_product(M, N, C);
        return true;
    }
    split_between_threads(M, N, K, kBlock, kBlock, kParallelMinWork, parallel,
                          [&](idx_t m0, idx_t n0, idx_t rows, idx_t cols) {
                              const Operand a = A.from(m0, 0), b = B.from(0, n0);
                              const Output c = C.from(m0, n0);
                              if (!amx_blocked(rows, cols, K, alpha, a, b, c))
                                  gemm_reference(Precision::bf16, rows, cols, K, alpha, a, b, c);
                          });
    return true;
}

#endif  // LMLAB_AMX_BUILD

}  // namespace LMLAB_ISA_NS
}  // namespace lmlab

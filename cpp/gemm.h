// Every matrix-product entry point of the kernels, in one place (internal to the kernel sources).
//
//   C (M, N) = init + alpha * A (M, K) . B (K, N)
//
// A and B are Operands: a pointer and two strides, so a transpose or a head's slice of a wider
// array is a way of reading, never a copy. C is an Output: row-major with its leading dimension, and
// what the product starts from (zero, a bias row, or C itself). `precision` says how the products
// are formed (Precision in kernels.h); `parallel` lets a call spread C over the OpenMP team (pass
// false from inside a parallel region: a call made there runs on its own thread anyway).
//
// Every entry point is bitwise deterministic: each C element is reduced in an order fixed by the
// shapes alone, whatever the thread count.
//
// Which code runs (gemm below picks):
//   fp32                  gemm_fp32: the blocked fp32 product of cpp/gemm.cpp
//   bf16, bf16_path amx   gemm_bf16_amx: AMX tiles (cpp/gemm_amx.cpp)
//   bf16, avx512_bf16     gemm_bf16_dpbf16: VDPBF16PS (cpp/gemm_dpbf16.cpp)
//   bf16, emulated        gemm_bf16_emulated: gemm_fp32's kernels on operands rounded to bf16
//   bf16, C of 1-4 rows   gemm_bf16_emulated on every path: its direct product, which rounds the
//                         operands as it reads them, beats packing them for tiles (cpp/gemm.cpp)
// The native bf16 paths exist only in the AVX-512 build; elsewhere bf16 is always emulated.
#pragma once

#include "isa.h"

namespace lmlab {
namespace LMLAB_ISA_NS {

// A matrix as a product reads it: element (i, j) is data[i * row_stride + j * col_stride].
struct Operand {
    const float* data;
    idx_t row_stride;
    idx_t col_stride;

    // A row-major matrix with leading dimension ld, read as stored.
    static Operand rows(const float* data, idx_t ld) { return {data, ld, 1}; }
    // The transpose of a row-major matrix with leading dimension ld.
    static Operand transpose_of(const float* data, idx_t ld) { return {data, 1, ld}; }

    float at(idx_t i, idx_t j) const { return data[i * row_stride + j * col_stride]; }
    // The sub-matrix starting at element (i, j), with the same strides.
    Operand from(idx_t i, idx_t j) const {
        return {data + i * row_stride + j * col_stride, row_stride, col_stride};
    }
};

// Where a product goes: C row-major with leading dimension ld, and its init.
struct Output {
    float* data;
    idx_t ld;
    const float* bias;  // init when not accumulating: this row (N) on every row of C, or zero if null
    bool accumulate;    // init = C itself (C += product)

    static Output overwrite(float* data, idx_t ld) { return {data, ld, nullptr, false}; }
    static Output with_bias(float* data, idx_t ld, const float* bias) { return {data, ld, bias, false}; }
    static Output add_to(float* data, idx_t ld) { return {data, ld, nullptr, true}; }
    static Output write(float* data, idx_t ld, bool accumulate) { return {data, ld, nullptr, accumulate}; }

    // The sub-block starting at element (i, j) of C (and column j of the bias).
    Output from(idx_t i, idx_t j) const {
        return {data + i * ld + j, ld, bias != nullptr ? bias + j : nullptr, accumulate};
    }
};

// The product in a precision, on the path chosen for this CPU (see above).
void gemm(Precision precision, idx_t M, idx_t N, idx_t K, float alpha, Operand A, Operand B,
          Output C, bool parallel);

// The paths behind gemm, each with gemm's contract for its precision.
void gemm_fp32(idx_t M, idx_t N, idx_t K, float alpha, Operand A, Operand B, Output C, bool parallel);
void gemm_bf16_emulated(idx_t M, idx_t N, idx_t K, float alpha, Operand A, Operand B, Output C,
                        bool parallel);
// The native paths return false, having written nothing, where they cannot run: not the AVX-512
// build, the CPU or OS lacks the instructions, or no scratch memory.
bool gemm_bf16_amx(idx_t M, idx_t N, idx_t K, float alpha, Operand A, Operand B, Output C,
                   bool parallel);
bool gemm_bf16_dpbf16(idx_t M, idx_t N, idx_t K, float alpha, Operand A, Operand B, Output C,
                      bool parallel);

// The plain triple loop in a precision, each C element reduced over k in ascending order in fp32
// (bf16: alpha folded into A, then both operands rounded, as every bf16 path does). The oracle the
// tuned paths are tested against, and their fallback when scratch memory cannot be had.
void gemm_reference(Precision precision, idx_t M, idx_t N, idx_t K, float alpha, Operand A,
                    Operand B, Output C);

// Rounds each of x (n) to the nearest bfloat16 (ties to even), in place; NaN stays NaN.
void round_to_bf16(float* x, size_t n);

}  // namespace LMLAB_ISA_NS
}  // namespace lmlab

// Internal to the matrix-product sources (cpp/gemm.cpp, cpp/gemm_amx.cpp, cpp/gemm_dpbf16.cpp): the
// machinery their paths share (scratch buffers, the split of C between threads, the block size of
// the packing's in-register transposes). The entry points themselves are declared in cpp/gemm.h.
#pragma once

#include <cstddef>
#include <cstdlib>

#include "gemm.h"
#include "isa.h"
#include "simd.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace lmlab {
namespace LMLAB_ISA_NS {

inline idx_t ceil_div(idx_t a, idx_t b) { return (a + b - 1) / b; }
inline idx_t min_idx(idx_t a, idx_t b) { return a < b ? a : b; }

// A per-thread packing buffer of T, grown on demand and kept for the thread's lifetime (declare it
// thread_local), so repeated calls (every layer of every training step) never touch the allocator.
// get() returns null if the memory cannot be had.
template <class T>
struct Scratch {
    T* data = nullptr;
    size_t capacity = 0;  // elements
    Scratch() = default;
    Scratch(const Scratch&) = delete;
    Scratch& operator=(const Scratch&) = delete;
    ~Scratch() { std::free(data); }
    T* get(size_t n) {
        if (n > capacity) {
            std::free(data);
            const size_t bytes = (n * sizeof(T) + 63) / 64 * 64;
            data = static_cast<T*>(std::aligned_alloc(64, bytes));
            capacity = data != nullptr ? n : 0;
        }
        return data;
    }
};

// C (M, N) = its init: a product with K = 0.
inline void empty_product(idx_t M, idx_t N, Output C) {
    if (C.accumulate) return;
    for (idx_t m = 0; m < M; m++)
        for (idx_t n = 0; n < N; n++) C.data[m * C.ld + n] = C.bias != nullptr ? C.bias[n] : 0.0f;
}

// Divides C (M x N) between the OpenMP team and runs share(m0, n0, rows, cols) on each part, from
// inside the team (or directly on one thread: when `parallel` is false, when already inside a team,
// or when M * N * K is below min_work). The split is along whichever of M and N is larger, in whole
// units of unit_m rows or unit_n columns, so the operand every thread packs in full (B when splitting
// rows, A when splitting columns) is the smaller one. Each C element belongs to one share whatever
// the thread count, which is what keeps the products thread-count independent.
// Threads for a product of M * N * K multiply-adds: the OpenMP team, or one thread when `parallel`
// is false, when already inside a team, or below min_work.
inline int product_threads(idx_t M, idx_t N, idx_t K, double min_work, bool parallel) {
#ifdef _OPENMP
    if (parallel && !omp_in_parallel() && (double)M * N * K >= min_work) return omp_get_max_threads();
#else
    (void)M, (void)N, (void)K, (void)parallel, (void)min_work;
#endif
    return 1;
}

// Thread t of `team` takes units [first, last) of `units`: contiguous, in order, sizes within one.
inline void thread_share(idx_t units, idx_t t, idx_t team, idx_t* first, idx_t* last) {
    *first = units * t / team;
    *last = units * (t + 1) / team;
}

template <class Share>
void split_between_threads(idx_t M, idx_t N, idx_t K, idx_t unit_m, idx_t unit_n, double min_work,
                           bool parallel, Share share) {
    int threads = product_threads(M, N, K, min_work, parallel);
    const bool split_rows = M >= N;
    const idx_t units = split_rows ? ceil_div(M, unit_m) : ceil_div(N, unit_n);
    if (threads > units) threads = (int)units;
    if (threads <= 1) {
        share(idx_t(0), idx_t(0), M, N);
        return;
    }
#pragma omp parallel num_threads(threads)
    {
#ifdef _OPENMP
        const idx_t t = omp_get_thread_num(), team = omp_get_num_threads();
#else
        const idx_t t = 0, team = 1;
#endif
        idx_t first, last;
        thread_share(units, t, team, &first, &last);
        if (split_rows) {
            const idx_t m0 = first * unit_m, m1 = min_idx(last * unit_m, M);
            if (m1 > m0) share(m0, idx_t(0), m1 - m0, N);
        } else {
            const idx_t n0 = first * unit_n, n1 = min_idx(last * unit_n, N);
            if (n1 > n0) share(idx_t(0), n0, M, n1 - n0);
        }
    }
}

#if defined(__AVX512F__) || defined(__AVX2__)
// Packing with whole vectors and in-register transposes (simd.h's vtranspose, kW x kW blocks).
#define LMLAB_GEMM_VECTOR_PACKING 1
constexpr int kTransposeBlock = (int)kW;
#endif

}  // namespace LMLAB_ISA_NS
}  // namespace lmlab

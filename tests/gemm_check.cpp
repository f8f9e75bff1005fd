// Checks of the internal gemm (cpp/gemm.h) that the public matmul cannot reach: any stride pattern
// (both operands transposed or not, padded leading dimensions), alpha, accumulate on/off, a bias
// row, the serial path, the parallel path at 1 and 2 threads, and a call from inside a parallel
// region. Built and run by tests/test_gemm.py once per instruction set, which asserts on what this
// prints.
// Usage: gemm_check fp32 | gemm_check bf16 PATH, PATH one of amx, avx512_bf16, emulated (Bf16Path):
// Precision::bf16 on that path (exit code 3 if this CPU cannot run it). The reference then multiplies
// operands rounded to bfloat16 here, independently (frexp / nearbyint).
//
// Prints one line per case:
//   M N K transA transB alpha accumulate rel_err bitwise guard
// rel_err: max |C - exact| / max(|alpha| * sum_k |a||b| + |C0|) against a double-precision loop;
// bitwise: 1 if the serial call, the parallel call at 1 and at 2 threads and the call from inside a
// parallel region gave identical bits; guard: 1 if no element outside the M x N window changed.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <vector>

#include "gemm.h"
#include "kernels.h"
#ifdef _OPENMP
#include <omp.h>
#endif

namespace isa = lmlab::LMLAB_ISA_NS;
using lmlab::idx_t;

namespace {

std::uint64_t rng_state = 0x9E3779B97F4A7C15ull;
float uniform() {  // xorshift64*, in [-1, 1)
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    return (float)((rng_state * 0x2545F4914F6CDD1Dull) >> 40) / (float)(1 << 23) - 1.0f;
}

void set_threads(int n) {
#ifdef _OPENMP
    omp_set_num_threads(n);
#else
    (void)n;
#endif
}

bool g_bf16 = false;  // check Precision::bf16 instead of fp32

// x rounded to the nearest bfloat16 (8 significant bits, ties to even): the reference's own rounding.
double round_bf16(double x) {
    if (x == 0.0 || !std::isfinite(x)) return x;
    int e = 0;
    const double m = std::frexp(x, &e);  // x = m * 2^e, 0.5 <= |m| < 1
    return std::ldexp(std::nearbyint(std::ldexp(m, 8)), e - 8);
}

void call(idx_t M, idx_t N, idx_t K, float alpha, const float* A, idx_t rsA, idx_t csA,
          const float* B, idx_t rsB, idx_t csB, float* C, idx_t ldc, const float* bias,
          bool accumulate, bool parallel) {
    isa::gemm(g_bf16 ? lmlab::Precision::bf16 : lmlab::Precision::fp32, M, N, K, alpha,
              isa::Operand{A, rsA, csA}, isa::Operand{B, rsB, csB},
              isa::Output{C, ldc, bias, accumulate}, parallel);
}

// One case: op(A) is M x K, stored as A (M, lda) or, transposed, as (K, lda); likewise op(B).
void run_case(idx_t M, idx_t N, idx_t K, bool transA, bool transB, float alpha, bool accumulate) {
    const idx_t pad = 3;  // leading dimensions wider than the matrix, to catch stride mix-ups
    const idx_t lda = (transA ? M : K) + pad, ldb = (transB ? K : N) + pad, ldc = N + pad;
    std::vector<float> A((transA ? K : M) * lda), B((transB ? N : K) * ldb), C0(M * ldc), bias_row(N);
    for (float& x : A) x = uniform();
    for (float& x : B) x = uniform();
    for (float& x : C0) x = uniform();
    for (float& x : bias_row) x = uniform();
    // C starts from a bias row on the non-accumulating cases with an odd M.
    const float* bias = !accumulate && M % 2 == 1 ? bias_row.data() : nullptr;
    const idx_t rsA = transA ? 1 : lda, csA = transA ? lda : 1;
    const idx_t rsB = transB ? 1 : ldb, csB = transB ? ldb : 1;

    double err = 0.0, scale = 0.0;
    std::vector<float> C[4];
    for (auto& c : C) c = C0;
    call(M, N, K, alpha, A.data(), rsA, csA, B.data(), rsB, csB, C[0].data(), ldc, bias, accumulate,
         false);
    set_threads(1);
    call(M, N, K, alpha, A.data(), rsA, csA, B.data(), rsB, csB, C[1].data(), ldc, bias, accumulate,
         true);
    set_threads(2);
    call(M, N, K, alpha, A.data(), rsA, csA, B.data(), rsB, csB, C[2].data(), ldc, bias, accumulate,
         true);
    float* c3 = C[3].data();
#pragma omp parallel num_threads(2)
    {
#ifdef _OPENMP
        const bool mine = omp_get_thread_num() == 0;
#else
        const bool mine = true;
#endif
        // Only one thread calls, with parallel = true: gemm must notice it is already inside a team.
        if (mine)
            call(M, N, K, alpha, A.data(), rsA, csA, B.data(), rsB, csB, c3, ldc, bias, accumulate,
                 true);
    }

    // The reference's operands in double, rounded to bfloat16 for gemm_bf16 (alpha folded into op(A)
    // before rounding, as the packing does): once per case, not once per product term, which keeps
    // the bf16 run short under qemu (tests/test_aarch64.py).
    std::vector<double> opA(M * K), opB(K * N);
    for (idx_t m = 0; m < M; m++)
        for (idx_t k = 0; k < K; k++) {
            const float a = A[m * rsA + k * csA];
            opA[m * K + k] = g_bf16 ? round_bf16((double)(alpha * a)) / alpha : a;
        }
    for (idx_t k = 0; k < K; k++)
        for (idx_t n = 0; n < N; n++) {
            const float b = B[k * rsB + n * csB];
            opB[k * N + n] = g_bf16 ? round_bf16(b) : b;
        }

    bool guard = true;
    for (idx_t m = 0; m < M; m++) {
        for (idx_t n = 0; n < ldc; n++) {
            const float got = C[0][m * ldc + n];
            if (n >= N) {
                guard = guard && std::memcmp(&got, &C0[m * ldc + n], sizeof got) == 0;
                continue;
            }
            double exact = 0.0, size = 0.0;
            for (idx_t k = 0; k < K; k++) {
                const double a = opA[m * K + k], b = opB[k * N + n];
                exact += a * b;
                size += std::fabs(a * b);
            }
            exact *= alpha;
            size *= std::fabs(alpha);
            if (accumulate) {
                exact += C0[m * ldc + n];
                size += std::fabs(C0[m * ldc + n]);
            }
            if (bias != nullptr) {
                exact += bias[n];
                size += std::fabs(bias[n]);
            }
            err = std::fmax(err, std::fabs(got - exact));
            scale = std::fmax(scale, size);
        }
    }
    bool bitwise = true;
    for (int i = 1; i < 4; i++)
        bitwise = bitwise && std::memcmp(C[0].data(), C[i].data(), C0.size() * sizeof(float)) == 0;
    std::printf("%lld %lld %lld %d %d %g %d %.3e %d %d\n", (long long)M, (long long)N, (long long)K,
                (int)transA, (int)transB, alpha, (int)accumulate, scale > 0 ? err / scale : err,
                (int)bitwise, (int)guard);
}

}  // namespace

int main(int argc, char** argv) {
    g_bf16 = argc > 1 && std::strcmp(argv[1], "bf16") == 0;
    if (g_bf16) {
        lmlab::Bf16Path path;
        if (argc < 3 || !lmlab::bf16_path_from_name(argv[2], &path)) {
            std::fprintf(stderr, "usage: gemm_check fp32 | gemm_check bf16 amx|avx512_bf16|emulated\n");
            return 2;
        }
        if (!lmlab::select_bf16_path(path)) {
            std::fprintf(stderr, "gemm_check: this CPU cannot run the %s path\n", argv[2]);
            return 3;
        }
    }
    // Edge sizes around every tile (MR up to 14, NR up to 32; AMX blocks of 32) and slice (KC = 384,
    // 256 or 512), the attention kernel's per-head blocks, products big enough for two threads, and
    // the few-row products gemm forms without packing.
    const idx_t sizes[][3] = {{1, 1, 1},     {7, 9, 33},    {33, 7, 9},    {9, 33, 7},
                              {14, 32, 16},  {15, 33, 257}, {29, 65, 600}, {64, 256, 64},
                              {256, 64, 256}, {100, 3, 1},  {1, 100, 513}, {130, 90, 40},
                              {47, 200, 1100}, {301, 77, 130},
                              // one to four rows: computed without packing
                              {2, 45, 37},   {3, 70, 600},  {4, 17, 1030}, {1, 1100, 47}};
    const float alphas[] = {1.0f, 0.125f, -2.5f};
    int i = 0;
    for (const auto& s : sizes)
        for (int t = 0; t < 4; t++) {
            const bool transA = t & 1, transB = t & 2;
            run_case(s[0], s[1], s[2], transA, transB, alphas[i % 3], (i / 3) % 2 == 1);
            i++;
        }
    // A zero-depth product: C = 0 or unchanged.
    run_case(5, 6, 0, false, false, 1.0f, false);
    run_case(5, 6, 0, false, false, 1.0f, true);
    return 0;
}

// Checks of the vector API in cpp/simd.h, the one place each instruction-set variant's arithmetic
// differs, compiled once per variant: natively for the x86 variants and the portable one, and for
// AArch64's neon variant under qemu (tests/test_aarch64.py). Run by tests/test_simd.py and
// tests/test_aarch64.py, which assert on what this prints: one line per check,
//   name failures detail
// where failures counts the lanes or cases that broke the rule, and one line
//   exp_max_ulp value
// the largest error of vexp, in ulp of the correctly rounded result, over a sample of every
// 2^11-th fp32 in [-87, 88.72] against double-precision exp (cpp/simd.h states the bound).
//
// Tails are checked against a guard page: the loads and stores of n < kW lanes sit at the very end of
// readable memory, so touching a float past n kills the process instead of passing unnoticed.
#include <sys/mman.h>
#include <unistd.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>

#include "simd.h"

namespace isa = lmlab::LMLAB_ISA_NS;
using isa::kW;
using isa::vf;
using lmlab::idx_t;

namespace {

constexpr idx_t kMaxW = 16;
const float kNaN = std::numeric_limits<float>::quiet_NaN();
const float kInf = std::numeric_limits<float>::infinity();

struct Lanes {
    float x[kMaxW];
};
Lanes lanes(vf v) {
    Lanes l;
    isa::vstore_n(l.x, v, kW);
    return l;
}
vf from(const float* p) { return isa::vload_n(p, kW, 0.0f); }
bool same_bits(float a, float b) { return std::memcmp(&a, &b, sizeof a) == 0; }

void report(const char* name, int failures, const char* detail) {
    std::printf("%s %d %s\n", name, failures, detail);
}

// Floats [end - n, end) are readable, the page after them is not.
float* guarded_end() {
    const long page = sysconf(_SC_PAGESIZE);
    void* mem = mmap(nullptr, 2 * page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (mem == MAP_FAILED || mprotect((char*)mem + page, page, PROT_NONE) != 0) {
        std::perror("simd_check: guard page");
        return nullptr;
    }
    return (float*)((char*)mem + page);
}

int check_tails(float* end) {
    int bad = 0;
    // n >= 1: kernels never ask for an empty vector (their loops run while j < n).
    for (idx_t n = 1; n <= kW + 1; n++) {
        const idx_t m = n < kW ? n : kW;
        float* p = end - n;
        for (idx_t i = 0; i < n; i++) p[i] = 1.0f + (float)i;
        const Lanes got = lanes(isa::vload_n(p, n, -7.0f));
        for (idx_t i = 0; i < kW; i++) bad += got.x[i] != (i < m ? 1.0f + (float)i : -7.0f);
        const Lanes kept = lanes(isa::vkeep_n(isa::vset(5.0f), n));
        for (idx_t i = 0; i < kW; i++) bad += kept.x[i] != (i < m ? 5.0f : 0.0f);
        for (idx_t i = 0; i < n; i++) p[i] = -1.0f;
        isa::vstore_n(p, isa::vset(3.0f), n);
        for (idx_t i = 0; i < n; i++) bad += p[i] != (i < m ? 3.0f : -1.0f);
    }
    return bad;
}

// vmax / vmin return their second operand when either is NaN; vselect_neg reads the sign bit.
int check_select_rules() {
    int bad = 0;
    float a[kMaxW], b[kMaxW];
    for (idx_t i = 0; i < kW; i++) {
        a[i] = i % 2 ? kNaN : (float)i;
        b[i] = i % 3 ? (float)(5 - i) : kNaN;
    }
    const Lanes mx = lanes(isa::vmax(from(a), from(b))), mn = lanes(isa::vmin(from(a), from(b)));
    for (idx_t i = 0; i < kW; i++) {
        const float want_max = a[i] > b[i] ? a[i] : b[i], want_min = a[i] < b[i] ? a[i] : b[i];
        bad += !same_bits(mx.x[i], want_max) + !same_bits(mn.x[i], want_min);
    }
    float s[kMaxW];
    for (idx_t i = 0; i < kW; i++) s[i] = i % 4 == 0 ? -0.0f : i % 4 == 1 ? 0.0f : i % 4 == 2 ? -kNaN : 2.0f;
    const Lanes sel = lanes(isa::vselect_neg(from(s), isa::vset(1.0f), isa::vset(2.0f)));
    for (idx_t i = 0; i < kW; i++) bad += sel.x[i] != (std::signbit(s[i]) ? 1.0f : 2.0f);
    return bad;
}

// Round to nearest, ties to even; exact square root, quotient and absolute value.
int check_rounding() {
    const float cases[] = {0.5f, 1.5f, 2.5f, -0.5f, -1.5f, -2.5f, 0.49999997f, 3.7f, -3.7f,
                           1048575.5f, -4194303.0f, 0.0f, 7.25f, -100.75f, 12345.5f, 1e-20f};
    int bad = 0;
    constexpr idx_t n = sizeof cases / sizeof cases[0];
    for (idx_t i = 0; i < n; i += kW) {
        const vf x = isa::vload_n(cases + i, n - i, 1.0f);
        const Lanes r = lanes(isa::vround(x)), q = lanes(isa::vsqrt(isa::vabs(x)));
        const Lanes d = lanes(isa::vdiv(x, isa::vset(3.0f)));
        for (idx_t j = 0; j < kW && i + j < n; j++) {
            const float c = cases[i + j];
            bad += r.x[j] != std::nearbyint(c);  // the default rounding mode: ties to even
            bad += q.x[j] != std::sqrt(std::fabs(c));
            bad += d.x[j] != c / 3.0f;
        }
    }
    return bad;
}

// x rounded to bfloat16 by value: of the two bf16 values around x (its top 16 bits, and one bf16 step
// further from zero), the nearer, the even one on a tie. Independent of the carry trick cpp/simd.h
// uses; x is finite.
float nearest_bf16_by_value(float x) {
    std::uint32_t u;
    std::memcpy(&u, &x, sizeof u);
    const std::uint32_t kept = u & 0xffff0000u;
    float low;
    std::memcpy(&low, &kept, sizeof low);
    const int exponent = (int)((u >> 23) & 0xff);
    const double step = std::ldexp(1.0, (exponent == 0 ? 1 : exponent) - 127 - 7);
    const double toward = std::signbit(x) ? -step : step, high = (double)low + toward;
    const double below = std::fabs((double)x - (double)low), above = std::fabs(high - (double)x);
    const bool low_even = ((kept >> 16) & 1u) == 0;
    return below < above || (below == above && low_even) ? low : (float)high;  // 2^128 becomes inf
}

// vround_bf16 against that, on a sweep of bit patterns across the whole range, on every kind of low
// half (zero, just below, at and just above a tie, all ones), and on inf, NaN (a NaN whose payload
// lies only in the dropped bits must stay NaN) and the largest floats (which round to inf).
int check_bf16_rounding() {
    std::uint32_t cases[4096];
    idx_t n = 0;
    const std::uint32_t lows[] = {0x0000u, 0x0001u, 0x7fffu, 0x8000u, 0x8001u, 0xffffu};
    for (std::uint32_t high = 0; high < 0x10000u; high += 113)  // 580 of them
        for (std::uint32_t low : lows) cases[n++] = (high << 16) | low;
    const std::uint32_t special[] = {0x7f7fffffu, 0x7f7f8000u, 0x7f7f7fffu, 0xff7fffffu, 0x00008000u,
                                     0x00018000u, 0x80008000u, 0x7f800000u, 0xff800000u, 0x7f800001u,
                                     0x7f80ffffu, 0xffc00000u, 0x7fc00001u, 0x00000000u, 0x80000000u};
    for (std::uint32_t u : special) cases[n++] = u;
    int bad = 0;
    for (idx_t i = 0; i < n; i += kW) {
        float x[kMaxW];
        const idx_t count = n - i < kW ? n - i : kW;
        std::memcpy(x, cases + i, (size_t)count * sizeof(float));
        const Lanes r = lanes(isa::vround_bf16(isa::vload_n(x, count, 0.0f)));
        for (idx_t j = 0; j < count; j++) {
            const bool nan = std::isnan(x[j]);
            bad += nan ? !std::isnan(r.x[j])
                       : !same_bits(r.x[j], std::isinf(x[j]) ? x[j] : nearest_bf16_by_value(x[j]));
            bad += !same_bits(r.x[j], isa::bf16_nearest(x[j])) && !nan;  // the scalar form agrees
        }
    }
    return bad;
}

// Horizontal sum and max against scalar loops on values whose sum is exact in any order.
int check_horizontal() {
    float x[kMaxW];
    double sum = 0.0;
    float mx = -kInf;
    for (idx_t i = 0; i < kW; i++) {
        x[i] = (float)((i * 7) % 11) - 3.0f;
        sum += x[i];
        mx = x[i] > mx ? x[i] : mx;
    }
    return (isa::vhsum(from(x)) != (float)sum) + (isa::vhmax(from(x)) != mx);
}

// p * 2^n for every n vexp can produce, exactly as one rounding of the true product.
int check_ldexp() {
    const float ps[] = {1.0f, 0.70710677f, 1.4142135f, 1.9999999f, 0.5f, 1.2345678f};
    int bad = 0;
    for (float p : ps)
        for (int n = -150; n <= 129; n++) {
            const Lanes got = lanes(isa::vldexp(isa::vset(p), isa::vset((float)n)));
            const float want = (float)std::ldexp((double)p, n);
            for (idx_t i = 0; i < kW; i++) bad += !same_bits(got.x[i], want);
        }
    return bad;
}

int check_exp_special() {
    const float x[] = {-kInf, kInf, kNaN, -87.5f, -100.0f, -1e30f, 88.8f, 89.5f, 1e30f, 0.0f, -0.0f};
    const float want[] = {0.0f, kInf, kNaN, 0.0f, 0.0f, 0.0f, kInf, kInf, kInf, 1.0f, 1.0f};
    constexpr idx_t n = sizeof x / sizeof x[0];
    int bad = 0;
    for (idx_t i = 0; i < n; i += kW) {
        const Lanes got = lanes(isa::vexp(isa::vload_n(x + i, n - i, 0.0f)));
        for (idx_t j = 0; j < kW && i + j < n; j++)
            bad += std::isnan(want[i + j]) ? !std::isnan(got.x[j]) : got.x[j] != want[i + j];
    }
    return bad;
}

// Error of y against exact, in units of the spacing of floats at exact (subnormal spacing below the
// normal range).
double ulp_error(float y, double exact) {
    const double spacing = exact < (double)std::numeric_limits<float>::min()
                               ? std::ldexp(1.0, -149)
                               : std::ldexp(1.0, std::ilogb(exact) - 23);
    return std::fabs((double)y - exact) / spacing;
}

double exp_max_ulp(int* nonfinite) {
    // Every 2^11-th float pattern, from both signs' ends of the range where exp is finite and normal.
    double worst = 0.0;
    float xs[kMaxW];
    idx_t count = 0;
    auto flush = [&] {
        const Lanes y = lanes(isa::vexp(isa::vload_n(xs, count, 0.0f)));
        for (idx_t j = 0; j < count; j++) {
            if (!std::isfinite(y.x[j])) {
                ++*nonfinite;
                continue;
            }
            const double e = ulp_error(y.x[j], std::exp((double)xs[j]));
            worst = e > worst ? e : worst;
        }
        count = 0;
    };
    const float lo = -87.0f, hi = 88.72f;
    for (std::uint32_t bits = 0; bits < 0x7f800000u; bits += 2048 + 1) {
        for (int side = 0; side < 2; side++) {
            const float sign = side == 0 ? 1.0f : -1.0f;
            float x;
            std::memcpy(&x, &bits, sizeof x);
            x *= sign;
            if (x < lo || x > hi) continue;
            xs[count++] = x;
            if (count == kW) flush();
        }
    }
    if (count > 0) flush();
    return worst;
}

}  // namespace

int main() {
    float* end = guarded_end();
    if (end == nullptr) return 1;
    report("tails", check_tails(end), "vload_n/vkeep_n/vstore_n lanes for n = 1..kW+1 at a guard page");
    report("select_rules", check_select_rules(), "vmax/vmin NaN rule, vselect_neg sign bit");
    report("rounding", check_rounding(), "vround ties to even, vsqrt/vdiv/vabs exact");
    report("bf16_rounding", check_bf16_rounding(), "vround_bf16 to nearest bf16, ties to even, NaN kept");
    report("horizontal", check_horizontal(), "vhsum/vhmax against scalar loops");
    report("ldexp", check_ldexp(), "vldexp(p, n) for n in [-150, 129] is one rounding of p*2^n");
    report("exp_special", check_exp_special(), "vexp at +-inf, NaN, the flush and overflow regions");
    int nonfinite = 0;
    const double ulp = exp_max_ulp(&nonfinite);
    report("exp_finite", nonfinite, "vexp finite over [-87, 88.72]");
    std::printf("exp_max_ulp %.4f kW=%lld\n", ulp, (long long)kW);
    return 0;
}

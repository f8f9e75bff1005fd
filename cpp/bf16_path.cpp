// Which instructions run bf16 products (Bf16Path, kernels.h): what this CPU and OS allow, and the
// path chosen. Compiled once, for the baseline instruction set, so that asking is safe on any CPU. A
// file of its own so that the gemm test driver (tests/gemm_check.cpp) can link it without the
// kernel tables.
#include <atomic>
#include <cstring>

#include "kernels.h"

#if defined(LMLAB_SIMULATED_ISA)
// A test driver built on tests/simulated_isa, whose intrinsics are plain C++: every path runs.
#elif defined(LMLAB_HAVE_AVX512) && (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__)
#define LMLAB_X86_PROBE 1
#include <cpuid.h>
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif
#endif

namespace lmlab {
namespace {

#ifdef LMLAB_X86_PROBE
// The AVX-512 variant, which holds the native bf16 code, needs these (the OS must save zmm state,
// which __builtin_cpu_supports checks too).
bool avx512_variant_runs() {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
}

// CPUID.(EAX=7, ECX=1):EAX bit 5.
bool cpu_has_avx512_bf16() {
    unsigned a = 0, b = 0, c = 0, d = 0;
    return __get_cpuid_count(7, 1, &a, &b, &c, &d) && ((a >> 5) & 1u);
}

bool probe_avx512_bf16() { return avx512_variant_runs() && cpu_has_avx512_bf16(); }

bool probe_amx() {
#if defined(__linux__)
    if (!probe_avx512_bf16()) return false;  // the tile code packs with AVX512-BF16 conversions
    unsigned a = 0, b = 0, c = 0, d = 0;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
    const bool amx_bf16 = (d >> 22) & 1u, amx_tile = (d >> 24) & 1u;
    if (!(amx_bf16 && amx_tile)) return false;
    // Linux hands out the 8 KB tile register state only on request (arch_prctl
    // ARCH_REQ_XCOMP_PERM for XFEATURE_XTILEDATA, kernel 5.16 and later); once granted it holds for
    // every thread of the process. Without it the first tile instruction kills the process.
    constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
#else
    return false;
#endif
}
#elif defined(LMLAB_SIMULATED_ISA)
bool probe_avx512_bf16() { return true; }
bool probe_amx() { return true; }
#else
bool probe_avx512_bf16() { return false; }
bool probe_amx() { return false; }
#endif

struct Names {
    Bf16Path path;
    const char* name;
};
const Names kNames[] = {{Bf16Path::amx, "amx"},
                        {Bf16Path::avx512_bf16, "avx512_bf16"},
                        {Bf16Path::emulated, "emulated"}};

Bf16Path fastest_available() {
    for (const Names& n : kNames)
        if (bf16_path_available(n.path)) return n.path;
    return Bf16Path::emulated;
}

// The path select_bf16_path chose, or -1 for the fastest available. Atomic: products running on
// several threads read it.
std::atomic<int> g_chosen{-1};

}  // namespace

const char* bf16_path_name(Bf16Path path) {
    for (const Names& n : kNames)
        if (n.path == path) return n.name;
    return "emulated";
}

bool bf16_path_from_name(const char* name, Bf16Path* path) {
    for (const Names& n : kNames) {
        if (std::strcmp(n.name, name) == 0) {
            *path = n.path;
            return true;
        }
    }
    return false;
}

bool bf16_path_available(Bf16Path path) {
    static const bool amx = probe_amx(), avx512_bf16 = probe_avx512_bf16();
    switch (path) {
        case Bf16Path::amx: return amx;
        case Bf16Path::avx512_bf16: return avx512_bf16;
        case Bf16Path::emulated: return true;
    }
    return false;
}

Bf16Path bf16_path() {
    const int chosen = g_chosen.load(std::memory_order_relaxed);
    if (chosen >= 0) return static_cast<Bf16Path>(chosen);
    static const Bf16Path fastest = fastest_available();
    return fastest;
}

bool select_bf16_path(Bf16Path path) {
    if (!bf16_path_available(path)) return false;
    g_chosen.store(static_cast<int>(path), std::memory_order_relaxed);
    return true;
}

}  // namespace lmlab

// amx_bf16_available (kernels.h): whether this process may use the AMX-BF16 tile unit. Compiled
// once, for the baseline instruction set, so that asking is safe on any x86-64 CPU. A file of its own
// so that the gemm test driver (tests/gemm_check.cpp) can link it without the kernel tables.
#include "kernels.h"

#if defined(LMLAB_HAVE_AVX512) && defined(__linux__) && (defined(__GNUC__) || defined(__clang__)) && \
    defined(__x86_64__)
#define LMLAB_AMX_PROBE 1
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace lmlab {

bool amx_bf16_available() {
#ifdef LMLAB_AMX_PROBE
    static const bool available = [] {
        __builtin_cpu_init();
        // The tile code lives in the AVX-512 variant (cpp/gemm_amx.cpp), which needs these too.
        if (!(__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
              __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl")))
            return false;
        unsigned a = 0, b = 0, c = 0, d = 0;
        if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
        const bool amx_bf16 = (d >> 22) & 1u, amx_tile = (d >> 24) & 1u;
        if (!__get_cpuid_count(7, 1, &a, &b, &c, &d)) return false;
        const bool avx512_bf16 = (a >> 5) & 1u;
        if (!(amx_bf16 && amx_tile && avx512_bf16)) return false;
        // Linux hands out the 8 KB tile register state only on request (arch_prctl
        // ARCH_REQ_XCOMP_PERM for XFEATURE_XTILEDATA, kernel 5.16 and later); once granted it holds
        // for every thread of the process. Without it the first tile instruction kills the process.
        constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
        return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
    }();
    return available;
#else
    return false;
#endif
}

}  // namespace lmlab

// Runtime CPU dispatch and thread control. Compiled once, for the baseline instruction set, so that
// it runs on any x86-64 (or AArch64, or other) CPU and can safely ask the CPU what it supports.
#include <cstdlib>
#include <cstring>

#include "kernels.h"

#ifdef _OPENMP
#include <omp.h>
#endif


namespace lmlab {
namespace {

struct Variant {
    const char* name;
    const KernelTable& (*table)();
    bool (*supported)();
};

[[maybe_unused]] bool cpu_has_avx512() {
#if defined(LMLAB_HAVE_AVX512) && (defined(__GNUC__) || defined(__clang__))
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") &&
           __builtin_cpu_supports("fma");
#else
    return false;
#endif
}

[[maybe_unused]] bool cpu_has_avx2() {
#if defined(LMLAB_HAVE_AVX2) && (defined(__GNUC__) || defined(__clang__))
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
    return false;
#endif
}

// Every AArch64 CPU has NEON (Advanced SIMD), and Linux and macOS both require it.
bool always() { return true; }

// Best first. Only variants compiled into this build appear (x86-64 builds hold avx512, avx2 and
// portable; AArch64 builds neon and portable).
const Variant kVariants[] = {
#ifdef LMLAB_HAVE_AVX512
    {"avx512", &kernel_table_avx512, &cpu_has_avx512},
#endif
#ifdef LMLAB_HAVE_AVX2
    {"avx2", &kernel_table_avx2, &cpu_has_avx2},
#endif
#ifdef LMLAB_HAVE_NEON
    {"neon", &kernel_table_neon, &always},
#endif
    {"portable", &kernel_table_portable, &always},
};

// The best variant this CPU runs (LMLAB_ISA, applied by the bindings at import, may then force
// another through select_isa).
const KernelTable* choose_at_import() {
    for (const Variant& v : kVariants)
        if (v.supported()) return &v.table();
    return &kernel_table_portable();
}

const KernelTable* g_active = nullptr;

}  // namespace

const KernelTable& kernels() {
    if (g_active == nullptr) g_active = choose_at_import();
    return *g_active;
}

int available_isas(const char** names, int capacity) {
    int count = 0;
    for (const Variant& v : kVariants)
        if (v.supported() && count < capacity) names[count++] = v.name;
    return count;
}

bool select_isa(const char* name) {
    for (const Variant& v : kVariants) {
        if (std::strcmp(v.name, name) == 0 && v.supported()) {
            g_active = &v.table();
            return true;
        }
    }
    return false;
}

void set_num_threads(int n) {
#ifdef _OPENMP
    omp_set_num_threads(n);
#else
    (void)n;
#endif
}

int get_num_threads() {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}

bool has_openmp() {
#ifdef _OPENMP
    return true;
#else
    return false;
#endif
}

}  // namespace lmlab

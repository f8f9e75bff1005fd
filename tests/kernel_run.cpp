// Runs one kernel of one instruction-set variant on arguments read from stdin and writes its arrays
// back: how tests/test_aarch64.py calls the AArch64 kernels, cross-compiled and under qemu, where no
// Python module can be loaded, and checks them against tests/reference.py.
//
// Usage: kernel_run NAME [BF16_PATH] < arguments > results, NAME any kernel of cpp/kernels.h, BF16_PATH
// the Bf16Path for its Precision::bf16 products (default: the fastest this CPU runs). The arguments come
// in the kernel's parameter order, each a tag byte and its value (little-endian):
//   'a' int64 count, then count 4-byte elements   a float* or std::int32_t* parameter
//   'n'                                           a null pointer
//   'i' int64                                     an idx_t, int or bool parameter
//   'f' float64                                   a float parameter
// After the call every non-null array is written back in the same order (int64 count, elements),
// then, for a kernel that returns a value, 'r' and that value as float64. The parameter types come
// from the kernel's own declaration, so the one list in cpp/kernels.h is all this driver needs.
// A malformed call exits with 2 and a message naming the argument.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <vector>

#include "isa.h"

namespace isa = lmlab::LMLAB_ISA_NS;
using lmlab::idx_t;

namespace {

[[noreturn]] void fail(const char* what, int arg) {
    std::fprintf(stderr, "kernel_run: argument %d: %s\n", arg, what);
    std::exit(2);
}

template <class T>
T read_raw(int arg) {
    T x;
    if (std::fread(&x, sizeof x, 1, stdin) != 1) fail("input ends early", arg);
    return x;
}

struct Arguments {
    std::vector<std::vector<std::uint32_t>> arrays;  // every array read, in order
    int next = 0;                                     // parameter being read

    char tag() { return read_raw<char>(next); }

    template <class T>
    T read() {
        const int arg = next++;
        const char t = tag();
        if constexpr (std::is_pointer_v<T>) {
            using Element = std::remove_const_t<std::remove_pointer_t<T>>;
            static_assert(sizeof(Element) == 4, "kernel arrays hold 4-byte elements");
            if (t == 'n') return nullptr;
            if (t != 'a') fail("expected an array ('a') or null ('n')", arg);
            const auto count = read_raw<std::int64_t>(arg);
            if (count < 0) fail("negative array length", arg);
            arrays.emplace_back((size_t)count);
            auto& a = arrays.back();
            if (std::fread(a.data(), 4, a.size(), stdin) != a.size()) fail("array ends early", arg);
            return reinterpret_cast<T>(a.data());
        } else if constexpr (std::is_floating_point_v<T>) {
            if (t != 'f') fail("expected a float ('f')", arg);
            return (T)read_raw<double>(arg);
        } else {
            if (t != 'i') fail("expected an integer ('i')", arg);
            return (T)read_raw<std::int64_t>(arg);
        }
    }
};

template <class R, class... Params>
void run(R (*kernel)(Params...)) {
    Arguments in;
    // Braced initialisation reads the arguments left to right, in parameter order.
    std::tuple<Params...> args{in.read<Params>()...};
    char extra;
    if (std::fread(&extra, 1, 1, stdin) == 1) fail("more arguments than the kernel takes", in.next);
    double result = 0.0;
    if constexpr (std::is_void_v<R>)
        std::apply(kernel, args);
    else
        result = (double)std::apply(kernel, args);
    for (const auto& a : in.arrays) {
        const std::int64_t count = (std::int64_t)a.size();
        std::fwrite(&count, sizeof count, 1, stdout);
        std::fwrite(a.data(), 4, a.size(), stdout);
    }
    if constexpr (!std::is_void_v<R>) {
        std::fputc('r', stdout);
        std::fwrite(&result, sizeof result, 1, stdout);
    }
}

}  // namespace

int main(int argc, char** argv) {
    if (argc != 2 && argc != 3) {
        std::fprintf(stderr, "usage: kernel_run NAME [amx|avx512_bf16|emulated] < arguments\n");
        return 2;
    }
    if (argc == 3) {  // the bf16 path for Precision::bf16 products; else the fastest this CPU has
        lmlab::Bf16Path path;
        if (!lmlab::bf16_path_from_name(argv[2], &path) || !lmlab::select_bf16_path(path)) {
            std::fprintf(stderr, "kernel_run: this CPU cannot run the bf16 path '%s'\n", argv[2]);
            return 3;
        }
    }
#define LMLAB_KERNEL_RUN(ret, name, params)      \
    if (std::strcmp(argv[1], #name) == 0) {      \
        run(&isa::name);                         \
        return std::fflush(stdout) == 0 ? 0 : 1; \
    }
    LMLAB_KERNEL_LIST(LMLAB_KERNEL_RUN)
#undef LMLAB_KERNEL_RUN
    std::fprintf(stderr, "kernel_run: no kernel named '%s' in cpp/kernels.h\n", argv[1]);
    return 2;
}

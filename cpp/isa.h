// Internal to the kernel sources: declarations of one instruction-set variant.
//
// Every kernel source is compiled once per instruction set (see CMakeLists.txt), each time with
// LMLAB_ISA_NS naming the variant (avx512, avx2, neon, portable) and that variant's compiler flags. All code
// in a kernel source lives in namespace lmlab::LMLAB_ISA_NS, so the variants never share a symbol: an
// AVX-512 copy of a function can never be linked into the portable path. For the same reason kernel
// sources use no standard-library templates that could be emitted out of line (containers,
// algorithms); they allocate scratch with aligned_alloc/free.
#pragma once

#include "kernels.h"

#ifndef LMLAB_ISA_NS
#error "LMLAB_ISA_NS must name the instruction-set variant being compiled"
#endif

namespace lmlab {
namespace LMLAB_ISA_NS {

#define LMLAB_KERNEL_DECLARE(ret, name, params) ret name params;
LMLAB_KERNEL_LIST(LMLAB_KERNEL_DECLARE)
#undef LMLAB_KERNEL_DECLARE

// Rows per chunk for reductions across rows (bias and layernorm weight gradients, embedding
// position gradients): a constant, so partial sums and their order do not depend on the thread count.
constexpr idx_t kRowChunk = 64;

}  // namespace LMLAB_ISA_NS

}  // namespace lmlab

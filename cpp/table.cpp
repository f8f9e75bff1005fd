// One variant's KernelTable: compiled once per instruction set, like the kernels it points to.
#include "isa.h"

#define LMLAB_STR2(x) #x
#define LMLAB_STR(x) LMLAB_STR2(x)
#define LMLAB_CAT2(a, b) a##b
#define LMLAB_CAT(a, b) LMLAB_CAT2(a, b)

namespace lmlab {

#define LMLAB_KERNEL_ADDRESS(ret, name, params) &LMLAB_ISA_NS::name,
const KernelTable& LMLAB_CAT(kernel_table_, LMLAB_ISA_NS)() {
    static const KernelTable table{LMLAB_STR(LMLAB_ISA_NS), LMLAB_KERNEL_LIST(LMLAB_KERNEL_ADDRESS)};
    return table;
}
#undef LMLAB_KERNEL_ADDRESS

}  // namespace lmlab

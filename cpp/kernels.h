// lmlab kernels: every kernel's declaration, the shape legend and the contracts.
//
// Shape legend
//   B  = batch size            T  = sequence length (time)     C  = channels (model width)
//   NH = number of heads       HS = head size (C / NH)         V  = vocabulary size
//   OC = output channels       N  = number of rows (often B*T)  maxT = block size (rows of wpe)
//
// Contracts
//   - fp32, row-major, C-contiguous. Arguments: outputs first, then cached statistics, then inputs,
//     weights, and dims last. Inputs are const.
//   - Gradients. Parameter gradients (dweight, dbias, dwte, dwpe) always ACCUMULATE (+=): a step
//     sums them over its micro-batches, and the trainer zeroes them once per optimiser step
//     (GPT.zero_grad). Input gradients are WRITTEN by the kernels that take `accumulate` (dinp of
//     matmul and GELU, dqkv of attention) when it is false, as the model calls them, so no
//     activation-sized buffer is zero-filled first; true adds to them instead. The other input
//     gradients accumulate: layernorm's dinp (the residual stream sums the branches into it),
//     residual's da and db, softmax's and cross-entropy's dlogits (the model zero-fills dlogits and
//     the residual stream's buffer once per backward).
//     A null gradient pointer means "this gradient is not wanted" (frozen weights, no input gradient).
//   - Forward caches what backward needs (layernorm mean/rstd, attention's softmax statistics per
//     row, the cross-entropy log-sum-exp per row).
//   - Determinism: the same inputs give bitwise-identical outputs for any number of threads.
//     Kernels parallelise over independent outputs and reduce each output in a fixed order; where a
//     reduction spans rows (bias, layernorm weight gradients), rows are cut into fixed-size chunks whose
//     partial sums are added in chunk order, independent of the thread count.
//   - No kernel validates its arguments: cpp/bindings.cpp does, before the GIL is released.
//
// How this file is used: LMLAB_KERNEL_LIST is an X-macro, the single list of kernels. It declares the
// functions of each instruction-set variant (cpp/isa.h), fills each variant's table (cpp/table.cpp)
// and defines KernelTable below, through which cpp/bindings.cpp calls the variant chosen at import.
//
// How to add a kernel: add one X(...) line here; implement it in a kernel source inside
// `namespace lmlab { namespace LMLAB_ISA_NS {` (it is compiled once per instruction set); bind it in
// cpp/bindings.cpp with its argument checks; wrap it in python/lmlab/ops.py; test it in tests/.
#pragma once

#include <cstddef>
#include <cstdint>

namespace lmlab {

using idx_t = std::int64_t;

// How the matrix products multiply (the `precision` argument of matmul and attention; every array
// stays float32):
//   Precision::fp32  the fp32 values as given, fp32 accumulation.
//   Precision::bf16  both operands rounded to bfloat16 (round to nearest even: 8 significant bits),
//                    the products of those exact values accumulated in fp32, the result fp32. Where
//                    the CPU multiplies bf16 natively (Bf16Path below) this runs at two (AVX512-BF16)
//                    to sixteen (AMX) times the fp32 rate; elsewhere the fp32 kernels run on the
//                    rounded operands, which gives the same rounding of the inputs.
// Mixed precision in the usual sense: parameters, gradients, optimiser state and every other kernel
// stay fp32; only the operands of the products lose precision.
enum class Precision : int { fp32 = 0, bf16 = 1 };

// X(return type, name, (parameters))
// X(return type, name, (parameters))
#define LMLAB_KERNEL_LIST(X)                                                                        \
    /* out (N, OC) = inp (N, C) . weight (OC, C)^T + bias (OC); bias may be null */                  \
    X(void, matmul_forward,                                                                         \
      (float* out, const float* inp, const float* weight, const float* bias, idx_t N, idx_t C,      \
       idx_t OC, Precision precision))                                                                    \
    /* dinp (N, C) = dout . weight (+= when accumulate); dweight (OC, C) += dout^T . inp;          \
       dbias (OC) += sum_n dout. Any of the three may be null. The two products use `precision`;    \
       dbias is an fp32 sum. */                                                                     \
    X(void, matmul_backward,                                                                        \
      (float* dinp, float* dweight, float* dbias, const float* dout, const float* inp,              \
       const float* weight, idx_t N, idx_t C, idx_t OC, Precision precision, bool accumulate))            \
    /* probs (N, V) = softmax over each row of logits (N, V) */                                     \
    X(void, softmax_forward, (float* probs, const float* logits, idx_t N, idx_t V))                 \
    /* dlogits (N, V) += probs * (dprobs - sum_v dprobs * probs) */                                 \
    X(void, softmax_backward,                                                                       \
      (float* dlogits, const float* dprobs, const float* probs, idx_t N, idx_t V))                  \
    /* losses (N) = logsumexp(logits_n) - logits_n[target_n]; lse (N) caches logsumexp */          \
    X(void, crossentropy_forward,                                                                   \
      (float* losses, float* lse, const float* logits, const std::int32_t* targets, idx_t N,        \
       idx_t V))                                                                                    \
    /* dlogits (N, V) += weights_n * (softmax(logits_n) - onehot(target_n)). The per-row weight     \
       serves every stage: 1/N for pretraining, 0 on prompt tokens for instruct tuning, a           \
       sequence's coefficient for DPO and policy gradients. */                                      \
    X(void, crossentropy_backward,                                                                  \
      (float* dlogits, const float* logits, const float* lse, const std::int32_t* targets,          \
       const float* weights, idx_t N, idx_t V))                                                     \
    /* out (N, C) = (inp - mean) * rstd * weight + bias; mean, rstd (N) cached; eps = 1e-5 */      \
    X(void, layernorm_forward,                                                                      \
      (float* out, float* mean, float* rstd, const float* inp, const float* weight,                 \
       const float* bias, idx_t N, idx_t C))                                                        \
    /* dinp (N, C) += input gradient; dweight (C), dbias (C) += their gradients, either may be null \
       (layernorm's input gradient always accumulates: the residual stream sums into it) */         \
    X(void, layernorm_backward,                                                                     \
      (float* dinp, float* dweight, float* dbias, const float* dout, const float* inp,              \
       const float* weight, const float* mean, const float* rstd, idx_t N, idx_t C))                \
    /* out (N) = GELU(inp), GPT-2's tanh approximation */                                           \
    X(void, gelu_forward, (float* out, const float* inp, idx_t N))                                  \
    /* dinp (N) = GELU'(inp) * dout (+= when accumulate) */                                         \
    X(void, gelu_backward,                                                                          \
      (float* dinp, const float* inp, const float* dout, idx_t N, bool accumulate))                 \
    /* Causal multi-head self-attention. qkv (B, T, 3C) holds q, k, v side by side, each split      \
       into NH heads of HS = C / NH. out (B, T, C); stats (B, NH, T, 2) caches each row's softmax   \
       statistics (max score, 1 / sum), from which backward recomputes the probabilities. precision \
       applies to the products Q.K^T and P.V, and to backward's six products; softmax stays fp32. */\
    X(void, attention_forward,                                                                      \
      (float* out, float* stats, const float* qkv, idx_t B, idx_t T, idx_t C, idx_t NH,             \
       Precision precision))                                                                        \
    /* dqkv (B, T, 3C) = gradient of the attention output dout (B, T, C) (+= when accumulate) */    \
    X(void, attention_backward,                                                                     \
      (float* dqkv, const float* dout, const float* qkv, const float* stats, idx_t B, idx_t T,      \
       idx_t C, idx_t NH, Precision precision, bool accumulate))                                          \
    /* out (B, T, C) = wte[tokens[b, t]] + wpe[t]; tokens (B, T) in [0, V), T <= maxT */            \
    X(void, embedding_forward,                                                                      \
      (float* out, const std::int32_t* tokens, const float* wte, const float* wpe, idx_t B,         \
       idx_t T, idx_t C))                                                                           \
    /* dwte (V, C) scatter-adds dout rows by token; dwpe (maxT, C) += sum over b; either null */    \
    X(void, embedding_backward,                                                                     \
      (float* dwte, float* dwpe, const float* dout, const std::int32_t* tokens, idx_t B, idx_t T,   \
       idx_t C))                                                                                    \
    /* out (N) = a + b */                                                                           \
    X(void, residual_forward, (float* out, const float* a, const float* b, idx_t N))                \
    /* da (N) += dout; db (N) += dout */                                                            \
    X(void, residual_backward, (float* da, float* db, const float* dout, idx_t N))                  \
    /* One AdamW step over a flat buffer, t >= 1 the step number. g = grads * grad_scale (the      \
       clipping factor); m, v updated in place; params -= lr * (mhat / (sqrt(vhat) + eps)          \
       + weight_decay * decay_mask * params). decay_mask (n) holds 0 or 1; null decays all. */      \
    X(void, adamw_update,                                                                           \
      (float* params, float* m, float* v, const float* grads, const float* decay_mask, idx_t n,     \
       float lr, float beta1, float beta2, float eps, float weight_decay, float grad_scale,         \
       idx_t t))                                                                                    \
    /* sum of squares of x (n), accumulated in double in a fixed order: the global gradient norm */ \
    X(double, sum_squares, (const float* x, idx_t n))                                               \
    /* out (n) = inp rounded to the nearest bfloat16 (ties to even), kept in fp32; NaN stays NaN:   \
       the rounding Precision::bf16 gives matmul operands, for code that must match it */               \
    X(void, round_bf16, (float* out, const float* inp, idx_t n))

#define LMLAB_KERNEL_POINTER(ret, name, params) ret(*name) params;
struct KernelTable {
    const char* isa;  // "avx512", "avx2", "neon" or "portable"
    LMLAB_KERNEL_LIST(LMLAB_KERNEL_POINTER)
};
#undef LMLAB_KERNEL_POINTER

// The table of each compiled variant (cpp/table.cpp); only the variants this build holds exist.
const KernelTable& kernel_table_avx512();
const KernelTable& kernel_table_avx2();
const KernelTable& kernel_table_neon();
const KernelTable& kernel_table_portable();

// The table of the instruction set chosen at import (the best the CPU supports, unless the
// environment variable LMLAB_ISA names another).
const KernelTable& kernels();

// Instruction sets this build holds and this CPU can run, best first.
int available_isas(const char** names, int capacity);

// Switch to a named instruction set; returns false if it is not available here.
bool select_isa(const char* name);

// The instructions behind Precision::bf16 products in the AVX-512 variant (the other variants
// always emulate). Every path multiplies the same bf16-rounded operands and accumulates in fp32.
//   amx          AMX-BF16 tiles (TDPBF16PS), cpp/gemm_amx.cpp: CPU has AMX-TILE, AMX-BF16 and
//                AVX512-BF16, and the OS grants this process the tile state
//   avx512_bf16  VDPBF16PS on zmm registers, cpp/gemm_dpbf16.cpp: CPU has AVX512-BF16
//   emulated     the fp32 kernels on rounded operands: any CPU
enum class Bf16Path : int { emulated = 0, avx512_bf16 = 1, amx = 2 };

// "amx", "avx512_bf16" or "emulated"; and back (false for an unknown name).
const char* bf16_path_name(Bf16Path path);
bool bf16_path_from_name(const char* name, Bf16Path* path);

// Whether this CPU (and OS) can run a path; asked once, later calls return the cached answer.
bool bf16_path_available(Bf16Path path);

// The path bf16 products take: the fastest available, unless select_bf16_path chose another.
Bf16Path bf16_path();

// Choose the path (tests and LMLAB_BF16 force each one); false, changing nothing, if unavailable.
bool select_bf16_path(Bf16Path path);

// Threads: OpenMP's pool. Without OpenMP these report 1 and ignore requests.
void set_num_threads(int n);
int get_num_threads();
bool has_openmp();

}  // namespace lmlab

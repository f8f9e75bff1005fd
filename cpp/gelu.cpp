// GELU, GPT-2's tanh approximation: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), and its backward.
#include <cmath>

#include "isa.h"

namespace lmlab {
namespace LMLAB_ISA_NS {

namespace {
constexpr float kSqrt2OverPi = 0.7978845608028654f;
constexpr float kCubic = 0.044715f;
}  // namespace

void gelu_forward(float* out, const float* inp, idx_t N) {
#pragma omp parallel for schedule(static)
    for (idx_t i = 0; i < N; i++) {
        float x = inp[i];
        float u = kSqrt2OverPi * (x + kCubic * x * x * x);
        out[i] = 0.5f * x * (1.0f + std::tanh(u));
    }
}

void gelu_backward(float* dinp, const float* inp, const float* dout, idx_t N) {
#pragma omp parallel for schedule(static)
    for (idx_t i = 0; i < N; i++) {
        float x = inp[i];
        float u = kSqrt2OverPi * (x + kCubic * x * x * x);
        float th = std::tanh(u);
        float sech2 = 1.0f - th * th;
        float du = kSqrt2OverPi * (1.0f + 3.0f * kCubic * x * x);
        dinp[i] += (0.5f * (1.0f + th) + 0.5f * x * sech2 * du) * dout[i];
    }
}

}  // namespace LMLAB_ISA_NS
}  // namespace lmlab

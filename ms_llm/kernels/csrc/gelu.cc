// GELU activations, forward and backward, for the CPU, called by MindSpore through ops.Custom(..., func_type="aot")
// (the backward wired as the forward's bprop). Contract and reference: the docstring of ms_llm/kernels/gelu.py.
//
// GeluFwd(x, params) -> y          params (1,) = [kind]: 0 exact (erf) GELU, 1 tanh approximation ("gelu_new")
// GeluBwd(x, dy, params) -> dx
//   exact:  y = x Phi(x),  Phi(x) = (1 + erf(x / sqrt 2)) / 2,   dy/dx = Phi(x) + x phi(x),  phi = exp(-x^2/2)/sqrt(2 pi)
//   tanh:   y = x s,  s = sigmoid(2 z),  z = sqrt(2/pi) (x + 0.044715 x^3),
//           dy/dx = s + x s (1 - s) 2 sqrt(2/pi) (1 + 3 * 0.044715 x^2)
// All float32, any shape (flattened).
//
// erf: Abramowitz & Stegun 7.1.26, erf(u) = 1 - t (a1 + t (a2 + t (a3 + t (a4 + t a5)))) exp(-u^2), t = 1/(1 + p u)
// for u >= 0 (odd extension), absolute error <= 1.5e-7; its exp(-u^2) with u = x / sqrt 2 is the backward's
// exp(-x^2/2), so one exp per element serves both. exp: Cody-Waite reduction by ln 2 and a degree-6 polynomial
// (relative error ~2e-7), 2^n built in the exponent bits. Everything is branch-free, so gcc vectorises the loops
// at the ISA tier's width (ms_llm/kernels/_build.py); std::erf / std::exp would be scalar library calls.
//
// Why: MindSpore 2.10's CPU GeLU / GeLUGrad take ~170 ms forward + backward on a (512, 3072) tensor (bench/README.md),
// half of a 2-layer BERT training step at batch 4 x 128.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "kernel_common.h"

#define GELU_EXPORT extern "C" __attribute__((visibility("default")))

namespace {

using ms_llm_kernels::ForEachChunk;
using ms_llm_kernels::IsFloat32;
using ms_llm_kernels::NumElements;
using ms_llm_kernels::SameShape;

constexpr int64_t kChunk = int64_t{1} << 14;                // elements per work chunk (64 KiB of float32)
constexpr int64_t kMinElemsForThreads = int64_t{1} << 16;

constexpr float kInvSqrt2 = 0.70710678118654752f;
constexpr float kInvSqrt2Pi = 0.39894228040143268f;
constexpr float kSqrt2OverPi = 0.79788456080286536f;
constexpr float kTanhCubic = 0.044715f;

// exp(x) for x in about [-87, 88] (clamped there; exp(-87) ~ 1.6e-38 is the smallest normal range, so results below
// it flush to that tiny value and are harmless in the formulas here).
inline float Exp(float x) {
  x = std::min(88.0f, std::max(-87.0f, x));
  const float n = __builtin_floorf(x * 1.44269504088896341f + 0.5f);
  const float r = (x - n * 0.693145751953125f) - n * 1.42860682030941723e-6f;  // ln 2 split in hi + lo
  float p = 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

// 1 - erf(|u|) given e = exp(-u^2).
inline float ErfcAbs(float u, float e) {
  const float t = 1.0f / (1.0f + 0.3275911f * std::fabs(u));
  const float poly = t * (0.254829592f + t * (-0.284496736f + t * (1.421413741f + t * (-1.453152027f + t * 1.061405429f))));
  return poly * e;
}

// Phi(x) = (1 + erf(x / sqrt 2)) / 2 and exp(-x^2 / 2).
inline void Phi(float x, float *phi_cdf, float *e) {
  *e = Exp(-0.5f * x * x);
  const float half_erfc = 0.5f * ErfcAbs(x * kInvSqrt2, *e);   // (1 - erf(|x|/sqrt 2)) / 2
  *phi_cdf = x >= 0.0f ? 1.0f - half_erfc : half_erfc;
}

void ExactFwd(const float *x, float *y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    float cdf, e;
    Phi(x[i], &cdf, &e);
    y[i] = x[i] * cdf;
  }
}

void ExactBwd(const float *x, const float *dy, float *dx, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    float cdf, e;
    Phi(x[i], &cdf, &e);
    dx[i] = dy[i] * (cdf + x[i] * e * kInvSqrt2Pi);
  }
}

// sigmoid(2 z) of the tanh form.
inline float TanhSigmoid(float x) {
  const float two_z = 2.0f * kSqrt2OverPi * (x + kTanhCubic * x * x * x);
  return 1.0f / (1.0f + Exp(-two_z));
}

void TanhFwd(const float *x, float *y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] = x[i] * TanhSigmoid(x[i]);
}

void TanhBwd(const float *x, const float *dy, float *dx, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const float v = x[i];
    const float s = TanhSigmoid(v);
    const float dz = 2.0f * kSqrt2OverPi * (1.0f + 3.0f * kTanhCubic * v * v);
    dx[i] = dy[i] * (s + v * s * (1.0f - s) * dz);
  }
}

bool KindOk(const float *params) { return params[0] == 0.0f || params[0] == 1.0f; }

}  // namespace

// Return codes: 0 ok; 1 wrong parameter count; 2 mismatched shapes or params not (1,); 3 a dtype other than
// float32; 4 an unknown kind.
GELU_EXPORT int GeluFwd(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *stream,
                        void *extra) {
  (void)stream;
  (void)extra;
  if (nparam != 3) return 1;
  if (!SameShape(ndims, shapes, 0, 2) || ndims[1] != 1 || shapes[1][0] != 1) return 2;
  for (int i = 0; i < 3; ++i) {
    if (!IsFloat32(dtypes[i])) return 3;
  }
  const auto *p = static_cast<const float *>(params[1]);
  if (!KindOk(p)) return 4;
  const auto *x = static_cast<const float *>(params[0]);
  auto *y = static_cast<float *>(params[2]);
  const bool exact = p[0] == 0.0f;
  ForEachChunk(NumElements(ndims[0], shapes[0]), kChunk, kMinElemsForThreads, [&](int64_t, int64_t b, int64_t e) {
    if (exact) {
      ExactFwd(x + b, y + b, e - b);
    } else {
      TanhFwd(x + b, y + b, e - b);
    }
  });
  return 0;
}

GELU_EXPORT int GeluBwd(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *stream,
                        void *extra) {
  (void)stream;
  (void)extra;
  if (nparam != 4) return 1;
  if (!SameShape(ndims, shapes, 0, 1) || !SameShape(ndims, shapes, 0, 3) || ndims[2] != 1 || shapes[2][0] != 1) {
    return 2;
  }
  for (int i = 0; i < 4; ++i) {
    if (!IsFloat32(dtypes[i])) return 3;
  }
  const auto *p = static_cast<const float *>(params[2]);
  if (!KindOk(p)) return 4;
  const auto *x = static_cast<const float *>(params[0]);
  const auto *dy = static_cast<const float *>(params[1]);
  auto *dx = static_cast<float *>(params[3]);
  const bool exact = p[0] == 0.0f;
  ForEachChunk(NumElements(ndims[0], shapes[0]), kChunk, kMinElemsForThreads, [&](int64_t, int64_t b, int64_t e) {
    if (exact) {
      ExactBwd(x + b, dy + b, dx + b, e - b);
    } else {
      TanhBwd(x + b, dy + b, dx + b, e - b);
    }
  });
  return 0;
}

// One parameter's AdamW step in place on the CPU (MindSpore AdamWeightDecay's update rule, with the gradient scale
// of global-norm clipping / loss unscaling folded in), called by MindSpore through ops.Custom(..., func_type="aot").
// Contract and reference (AdamWUpdateReference): the docstring of ms_llm/kernels/adamw.py.
//
// AdamWUpdate(param, m, v, grad, scalars, wd) -> token
//   param, m, v, grad: float32 of one shape (any rank; n elements); scalars (7,) float32 =
//   [lr, beta1, beta2, eps, decay_scale, grad_scale, apply]; wd: one float32 (shape () or (1,)); token (1,) float32
//   = 0. apply == 0: nothing is read or written (a skipped step: the gradient may be inf/NaN). Else, in place:
//   g = grad * grad_scale;  m = beta1 m + (1 - beta1) g;  v = beta2 v + (1 - beta2) g^2;
//   param -= lr (m / (sqrt(v) + eps) + wd * decay_scale * param).
//
// Why: the update is memory bound (param, m, v and grad read, param, m and v written: 28 bytes per element), and
// MindSpore 2.10's CPU AdamWeightDecay moves them at ~7-11 GB/s (98-166 ms for GPT-2's 38.6M-element embedding,
// measured) where the machine reads ~21 GB/s; clipping also cost one more read and write of every gradient.
// Threads: one per CPU in the affinity mask (the caller included) for tensors of at least kMinElemsForThreads
// elements, taking chunks of kChunk elements from an atomic counter; the element loop is plain C++ that gcc
// vectorises (-O3; sqrt and division have vector instructions).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "kernel_common.h"

#define ADAMW_EXPORT extern "C" __attribute__((visibility("default")))

namespace {

using ms_llm_kernels::ForEachChunk;
using ms_llm_kernels::IsFloat32;
using ms_llm_kernels::NumElements;

constexpr int64_t kMinElemsForThreads = int64_t{1} << 17;
constexpr int64_t kChunk = int64_t{1} << 15;

struct Step {
  float *param, *m, *v;
  const float *grad;
  float lr, b1, b2, eps, decay, scale;
};

void Update(const Step &s, int64_t i0, int64_t i1) {
  float *__restrict p = s.param;
  float *__restrict m = s.m;
  float *__restrict v = s.v;
  const float *__restrict g = s.grad;
  const float b1 = s.b1, c1 = 1.0f - s.b1, b2 = s.b2, c2 = 1.0f - s.b2, lr = s.lr, eps = s.eps, decay = s.decay,
              scale = s.scale;
  for (int64_t i = i0; i < i1; ++i) {
    const float gi = g[i] * scale;
    const float mi = b1 * m[i] + c1 * gi;
    const float vi = b2 * v[i] + c2 * gi * gi;
    m[i] = mi;
    v[i] = vi;
    p[i] -= lr * (mi / (std::sqrt(vi) + eps) + decay * p[i]);
  }
}

}  // namespace

// Return codes: 0 ok; 1 wrong parameter count; 2 shapes disagree (param, m, v, grad not one shape; scalars not (7,);
// wd not one element; token not (1,)); 3 a dtype is not float32.
ADAMW_EXPORT int AdamWUpdate(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *stream,
                             void *extra) {
  (void)stream;
  (void)extra;
  if (nparam != 7) return 1;
  for (int i = 1; i < 4; ++i) {
    if (ndims[i] != ndims[0] || !std::equal(shapes[0], shapes[0] + ndims[0], shapes[i])) return 2;
  }
  if (ndims[4] != 1 || shapes[4][0] != 7 || NumElements(ndims[5], shapes[5]) != 1 || ndims[5] > 1 ||
      NumElements(ndims[6], shapes[6]) != 1) {
    return 2;
  }
  for (int i = 0; i < nparam; ++i) {
    if (!IsFloat32(dtypes[i])) return 3;
  }
  const float *sc = static_cast<const float *>(params[4]);
  const float wd = *static_cast<const float *>(params[5]);
  const Step s{static_cast<float *>(params[0]), static_cast<float *>(params[1]), static_cast<float *>(params[2]),
               static_cast<const float *>(params[3]), sc[0], sc[1], sc[2], sc[3], wd * sc[4], sc[5]};
  static_cast<float *>(params[6])[0] = 0.0f;
  if (sc[6] == 0.0f) return 0;  // a skipped step
  ForEachChunk(NumElements(ndims[0], shapes[0]), kChunk, kMinElemsForThreads,
               [&](int64_t, int64_t begin, int64_t end) { Update(s, begin, end); });
  return 0;
}

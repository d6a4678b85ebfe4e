// LayerNorm over the last axis, forward and backward, for the CPU, called by MindSpore through
// ops.Custom(..., func_type="aot") (the backward wired as the forward's bprop). Contract and reference: the
// docstring of ms_llm/kernels/layer_norm.py.
//
// LayerNormFwd(x, gamma, beta, params) -> (y, mean, rstd)
//   x (..., H) float32 (R rows of H), gamma, beta (H), params (1,) = [eps];
//   mean, rstd (R,): the row mean and 1 / sqrt(biased variance + eps);  y = (x - mean) * rstd * gamma + beta.
// LayerNormBwd(x, gamma, mean, rstd, dy) -> (dx, dgamma, dbeta)
//   xhat = (x - mean) * rstd, g = dy * gamma:
//   dx = rstd * (g - mean_H(g) - xhat * mean_H(g * xhat));  dgamma = sum_rows(dy * xhat);  dbeta = sum_rows(dy).
//
// Why: MindSpore 2.10's CPU LayerNormGrad takes ~24 ms for a (1024, 768) tensor inside a BERT-base training step
// (605 ms for its 25 norms, bench/results/profile_bert_full.md), and the same formula in composite ops is no faster;
// the work is three passes over 3 MB. Here each thread takes chunks of rows (two passes over a row that stays in L1:
// statistics, then output), and the backward's dgamma / dbeta are per-thread partial sums added at the end.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "kernel_common.h"

#define LN_EXPORT extern "C" __attribute__((visibility("default")))

namespace {

using ms_llm_kernels::IsFloat32;
using ms_llm_kernels::NumThreads;
using ms_llm_kernels::ParallelChunks;
using ms_llm_kernels::SameShape;

constexpr int64_t kMinElemsForThreads = int64_t{1} << 16;
constexpr int64_t kRowsPerChunk = 16;

// Runs body(row0, row1, tid) over chunks of rows (ParallelChunks); returns the thread count used.
template <typename Body>
int ForRows(int64_t rows, int64_t h, Body body) {
  const int n = rows * h < kMinElemsForThreads ? 1 : NumThreads();
  return ParallelChunks((rows + kRowsPerChunk - 1) / kRowsPerChunk, n, [&](int64_t c, int tid) {
    body(c * kRowsPerChunk, std::min(rows, (c + 1) * kRowsPerChunk), tid);
  });
}

void Forward(const float *x, const float *gamma, const float *beta, float eps, int64_t rows, int64_t h, float *y,
             float *mean, float *rstd) {
  ForRows(rows, h, [&](int64_t r0, int64_t r1, int) {
    for (int64_t r = r0; r < r1; ++r) {
      const float *xr = x + r * h;
      float s = 0.f;
      for (int64_t i = 0; i < h; ++i) s += xr[i];
      const float mu = s / static_cast<float>(h);
      float v = 0.f;
      for (int64_t i = 0; i < h; ++i) {
        const float d = xr[i] - mu;
        v += d * d;
      }
      const float rs = 1.0f / std::sqrt(v / static_cast<float>(h) + eps);
      mean[r] = mu;
      rstd[r] = rs;
      float *yr = y + r * h;
      for (int64_t i = 0; i < h; ++i) yr[i] = (xr[i] - mu) * rs * gamma[i] + beta[i];
    }
  });
}

void Backward(const float *x, const float *gamma, const float *mean, const float *rstd, const float *dy, int64_t rows,
              int64_t h, float *dx, float *dgamma, float *dbeta) {
  const int max_threads = std::max(1, NumThreads());
  std::vector<float> partial(static_cast<size_t>(2 * h * max_threads), 0.f);  // per thread: dgamma, dbeta sums
  const int n = ForRows(rows, h, [&](int64_t r0, int64_t r1, int tid) {
    float *pg = partial.data() + 2 * h * tid;
    float *pb = pg + h;
    for (int64_t r = r0; r < r1; ++r) {
      const float *xr = x + r * h;
      const float *dyr = dy + r * h;
      const float mu = mean[r], rs = rstd[r];
      float sg = 0.f, sgx = 0.f;
      for (int64_t i = 0; i < h; ++i) {
        const float xh = (xr[i] - mu) * rs;
        const float g = dyr[i] * gamma[i];
        sg += g;
        sgx += g * xh;
        pg[i] += dyr[i] * xh;
        pb[i] += dyr[i];
      }
      const float inv_h = 1.0f / static_cast<float>(h);
      const float mg = sg * inv_h, mgx = sgx * inv_h;
      float *dxr = dx + r * h;
      for (int64_t i = 0; i < h; ++i) {
        const float xh = (xr[i] - mu) * rs;
        dxr[i] = rs * (dyr[i] * gamma[i] - mg - xh * mgx);
      }
    }
  });
  for (int64_t i = 0; i < h; ++i) {
    float g = 0.f, b = 0.f;
    for (int t = 0; t < n; ++t) {
      g += partial[2 * h * t + i];
      b += partial[2 * h * t + h + i];
    }
    dgamma[i] = g;
    dbeta[i] = b;
  }
}

int64_t Rows(int ndim, const int64_t *shape) {
  int64_t r = 1;
  for (int d = 0; d + 1 < ndim; ++d) r *= shape[d];
  return r;
}

bool Vec(int *ndims, int64_t **shapes, int i, int64_t n) { return ndims[i] == 1 && shapes[i][0] == n; }

}  // namespace

// Return codes (both entry points): 0 ok; 1 wrong parameter count; 2 shapes disagree; 3 a dtype is not float32.
// params: x, gamma, beta, params, y, mean, rstd
LN_EXPORT int LayerNormFwd(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *stream,
                           void *extra) {
  (void)stream;
  (void)extra;
  if (nparam != 7) return 1;
  if (ndims[0] < 1) return 2;
  const int64_t h = shapes[0][ndims[0] - 1], rows = Rows(ndims[0], shapes[0]);
  if (!Vec(ndims, shapes, 1, h) || !Vec(ndims, shapes, 2, h) || !Vec(ndims, shapes, 3, 1) ||
      !SameShape(ndims, shapes, 0, 4) || !Vec(ndims, shapes, 5, rows) || !Vec(ndims, shapes, 6, rows)) {
    return 2;
  }
  for (int i = 0; i < nparam; ++i) {
    if (!IsFloat32(dtypes[i])) return 3;
  }
  if (rows == 0 || h == 0) return 0;
  auto in = [&](int i) { return static_cast<const float *>(params[i]); };
  auto out = [&](int i) { return static_cast<float *>(params[i]); };
  Forward(in(0), in(1), in(2), in(3)[0], rows, h, out(4), out(5), out(6));
  return 0;
}

// params: x, gamma, mean, rstd, dy, dx, dgamma, dbeta
LN_EXPORT int LayerNormBwd(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *stream,
                           void *extra) {
  (void)stream;
  (void)extra;
  if (nparam != 8) return 1;
  if (ndims[0] < 1) return 2;
  const int64_t h = shapes[0][ndims[0] - 1], rows = Rows(ndims[0], shapes[0]);
  if (!Vec(ndims, shapes, 1, h) || !Vec(ndims, shapes, 2, rows) || !Vec(ndims, shapes, 3, rows) ||
      !SameShape(ndims, shapes, 0, 4) || !SameShape(ndims, shapes, 0, 5) || !Vec(ndims, shapes, 6, h) ||
      !Vec(ndims, shapes, 7, h)) {
    return 2;
  }
  for (int i = 0; i < nparam; ++i) {
    if (!IsFloat32(dtypes[i])) return 3;
  }
  auto in = [&](int i) { return static_cast<const float *>(params[i]); };
  auto out = [&](int i) { return static_cast<float *>(params[i]); };
  if (rows == 0 || h == 0) {
    std::fill(out(6), out(6) + h, 0.f);
    std::fill(out(7), out(7) + h, 0.f);
    return 0;
  }
  Backward(in(0), in(1), in(2), in(3), in(4), rows, h, out(5), out(6), out(7));
  return 0;
}

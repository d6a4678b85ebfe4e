// Sum of squares of a float32 tensor for the CPU (the global gradient norm of clipping), called by MindSpore through
// ops.Custom(..., func_type="aot"). Contract and reference: the docstring of ms_llm/kernels/sum_squares.py.
//
// SumSquares(g) -> s      g float32 of any shape; s (1,) float32 = sum(g^2), accumulated in float64.
//
// Why: MindSpore 2.10's CPU Mul + ReduceSum make two passes and write a squared copy of every gradient (the 110M
// parameters of BERT-base: ~0.2 s per step, bench/results/profile_bert_full.md); this is one read-only pass. Threads
// take chunks from a shared counter; each chunk sums into float64 lanes (gcc vectorises the widening loop), and the
// per-chunk sums are added in chunk order, so the result does not depend on the thread count or timing.

#include <algorithm>
#include <cstdint>
#include <vector>

#include "kernel_common.h"

#define SS_EXPORT extern "C" __attribute__((visibility("default")))

namespace {

using ms_llm_kernels::ForEachChunk;
using ms_llm_kernels::IsFloat32;
using ms_llm_kernels::NumElements;

constexpr int64_t kChunk = int64_t{1} << 16;               // elements per work chunk (256 KiB)
constexpr int64_t kMinElemsForThreads = int64_t{1} << 18;
constexpr int kLanes = 16;

double ChunkSum(const float *g, int64_t n) {
  double acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      const double v = g[i + l];
      acc[l] += v * v;
    }
  }
  double s = 0.0;
  for (; i < n; ++i) s += static_cast<double>(g[i]) * g[i];
  for (int l = 0; l < kLanes; ++l) s += acc[l];
  return s;
}

}  // namespace

// Return codes: 0 ok; 1 wrong parameter count; 2 output not (1,); 3 a dtype other than float32.
SS_EXPORT int SumSquares(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *stream,
                         void *extra) {
  (void)stream;
  (void)extra;
  if (nparam != 2) return 1;
  if (ndims[1] != 1 || shapes[1][0] != 1) return 2;
  if (!IsFloat32(dtypes[0]) || !IsFloat32(dtypes[1])) return 3;
  const int64_t n = NumElements(ndims[0], shapes[0]);
  const auto *g = static_cast<const float *>(params[0]);
  std::vector<double> partial(static_cast<size_t>((n + kChunk - 1) / kChunk), 0.0);
  ForEachChunk(n, kChunk, kMinElemsForThreads, [&](int64_t c, int64_t b, int64_t e) {
    partial[static_cast<size_t>(c)] = ChunkSum(g + b, e - b);
  });
  double s = 0.0;
  for (const double p : partial) s += p;
  *static_cast<float *>(params[1]) = static_cast<float>(s);
  return 0;
}

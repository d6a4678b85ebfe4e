// MoE dispatch (tokens -> expert slots, expert-major) and combine (weighted expert outputs -> tokens), forward and
// backward, for the CPU, called by MindSpore through ops.Custom(..., func_type="aot") (each backward wired as its
// forward's bprop). Contract and reference: the docstring of ms_llm/kernels/moe_dispatch.py.
//
// G routing groups of T tokens, E experts of C slots, hidden size H; slot_token (G, E, C) int32 holds the token
// (inside its group) of every slot, slot_weight (G, E, C) float32 its combine weight.
//
// MoeDispatchFwd(x (G, T, H), slot_token) -> slots (E, G, C, H)       slots[e, g, c] = x[g, slot_token[g, e, c]]
// MoeDispatchBwd(dslots (E, G, C, H), slot_token, x) -> dx (G, T, H)  dx[g, t] = sum of dslots[e, g, c] over the
//                                                                      slots holding t (x: only its shape is read)
// MoeCombineFwd(y (E, G, C, H), slot_token, slot_weight, spec (T,)) -> out (G, T, H)
//                                                 out[g, t] = sum of slot_weight[g, e, c] * y[e, g, c] over the
//                                                 slots holding t (spec: only its length T is read)
// MoeCombineBwd(y, slot_token, slot_weight, dout (G, T, H)) -> dy (E, G, C, H), dweight (G, E, C)
//                                                 dy[e, g, c] = slot_weight[g, e, c] * dout[g, t],
//                                                 dweight[g, e, c] = <y[e, g, c], dout[g, t]> (float64 accumulator)
// with t = slot_token[g, e, c]. Every slot counts, empty ones (weight 0) too, as in the reference ops. Sums over
// the slots of a token run in (e, c) order, the reference's scatter order. All floats are float32, contiguous.
//
// Why: the composite (Gather, two Transposes, Mul, UnsortedSegmentSum and their gradients: Gather + LogicalAnd +
// Select for the segment sum, Transposes, Mul + ReduceSum) moves every (E, G, C, H) activation 3-4 times per pass;
// these kernels move it once (bench/results/moe_full.md).

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "kernel_common.h"

#define MD_EXPORT extern "C" __attribute__((visibility("default")))

namespace {

using ms_llm_kernels::ForEachChunk;
using ms_llm_kernels::IsFloat32;
using ms_llm_kernels::IsInt32;
using ms_llm_kernels::NumThreads;
using ms_llm_kernels::ParallelChunks;
using ms_llm_kernels::SameShape;

constexpr int64_t kColumnBlock = 256;                 // floats of a row per work item of the scatter kernels
constexpr int64_t kRowsPerChunk = 64;                 // slot rows per work item of the gather kernels
constexpr int64_t kMinFloatsForThreads = int64_t{1} << 15;

// <a, b> accumulated in float64, in kLanes interleaved partial sums (a fixed order gcc can vectorise).
double Dot(const float *a, const float *b, int64_t n) {
  constexpr int64_t kLanes = 8;
  double acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int64_t j = 0; j < kLanes; ++j) acc[j] += static_cast<double>(a[i + j]) * b[i + j];
  }
  for (; i < n; ++i) acc[0] += static_cast<double>(a[i]) * b[i];
  double sum = 0.0;
  for (int64_t j = 0; j < kLanes; ++j) sum += acc[j];
  return sum;
}

struct Dims {
  int64_t G, T, E, C, H;
};

// Every slot's token in [0, T).
bool TokensInRange(const int32_t *slot_token, const Dims &d) {
  const int64_t n = d.G * d.E * d.C;
  for (int64_t i = 0; i < n; ++i) {
    if (slot_token[i] < 0 || slot_token[i] >= d.T) return false;
  }
  return true;
}

int Threads(const Dims &d) { return d.G * d.E * d.C * d.H < kMinFloatsForThreads ? 1 : NumThreads(); }

// body(r, e, g, c) for every slot row r = (e * G + g) * C + c of an (E, G, C, ...) tensor, in chunks of rows, on
// the same threads as Threads(d) (rows * H < kMinFloatsForThreads <=> rows < ceil(kMinFloatsForThreads / H)).
template <typename Body>
void ForEachSlotRow(const Dims &d, Body body) {
  const int64_t min_rows_for_threads = (kMinFloatsForThreads + d.H - 1) / d.H;
  ForEachChunk(d.E * d.G * d.C, kRowsPerChunk, min_rows_for_threads, [&](int64_t, int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t c = r % d.C;
      const int64_t g = (r / d.C) % d.G;
      body(r, r / (d.C * d.G), g, c);
    }
  });
}

// For every group g and block [h0, h1) of columns: zero out[g, :, h0:h1], then out[g, t, h0:h1] +=
// scale(g, e, c) * src[e, g, c, h0:h1] over the slots in (e, c) order. Work items are (group, column block), so
// no two threads write one element and the order of the sums is fixed.
template <typename Scale>
void ScatterAdd(const float *src, const int32_t *slot_token, const Dims &d, float *out, Scale scale) {
  const int64_t blocks = (d.H + kColumnBlock - 1) / kColumnBlock;
  ParallelChunks(d.G * blocks, Threads(d), [&](int64_t item, int) {
    const int64_t g = item / blocks;
    const int64_t h0 = (item % blocks) * kColumnBlock;
    const int64_t w = std::min(d.H, h0 + kColumnBlock) - h0;
    float *og = out + g * d.T * d.H + h0;
    for (int64_t t = 0; t < d.T; ++t) std::memset(og + t * d.H, 0, static_cast<size_t>(w) * sizeof(float));
    for (int64_t e = 0; e < d.E; ++e) {
      const int32_t *st = slot_token + (g * d.E + e) * d.C;
      for (int64_t c = 0; c < d.C; ++c) {
        const float s = scale(g, e, c);
        const float *row = src + ((e * d.G + g) * d.C + c) * d.H + h0;
        float *dst = og + st[c] * d.H;
        for (int64_t h = 0; h < w; ++h) dst[h] += s * row[h];
      }
    }
  });
}

// Checks shared by the four kernels: `slots_at` is an (E, G, C, H) tensor, `tokens_at` a (G, T, H) one, `table_at`
// the (G, E, C) int32 slot_token. Returns 0 or the return code (see below).
int CheckCore(int *ndims, int64_t **shapes, const char **dtypes, int slots_at, int tokens_at, int table_at,
              int64_t T, Dims *d) {
  if (ndims[slots_at] != 4 || ndims[tokens_at] != 3 || ndims[table_at] != 3) return 2;
  const int64_t *s = shapes[slots_at];
  const int64_t *x = shapes[tokens_at];
  const int64_t *st = shapes[table_at];
  *d = Dims{s[1], T, s[0], s[2], s[3]};
  if (st[0] != d->G || st[1] != d->E || st[2] != d->C || x[0] != d->G || x[1] != T || x[2] != d->H) return 2;
  if (d->G < 1 || d->T < 1 || d->E < 1 || d->C < 1 || d->H < 1) return 2;
  if (!IsFloat32(dtypes[slots_at]) || !IsFloat32(dtypes[tokens_at]) || !IsInt32(dtypes[table_at])) return 3;
  return 0;
}

}  // namespace

// Return codes (all four): 0 ok; 1 wrong parameter count; 2 inconsistent shapes; 3 a dtype other than the contract's
// (float32 tensors, int32 slot_token); 4 a slot_token outside [0, T).

// params: x (G, T, H), slot_token (G, E, C), slots (E, G, C, H)
MD_EXPORT int MoeDispatchFwd(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                             void *stream, void *extra) {
  (void)stream;
  (void)extra;
  if (nparam != 3) return 1;
  if (ndims[0] != 3) return 2;
  Dims d;
  if (const int rc = CheckCore(ndims, shapes, dtypes, 2, 0, 1, shapes[0][1], &d)) return rc;
  const auto *x = static_cast<const float *>(params[0]);
  const auto *slot_token = static_cast<const int32_t *>(params[1]);
  auto *slots = static_cast<float *>(params[2]);
  if (!TokensInRange(slot_token, d)) return 4;
  const size_t bytes = static_cast<size_t>(d.H) * sizeof(float);
  ForEachSlotRow(d, [&](int64_t r, int64_t e, int64_t g, int64_t c) {
    std::memcpy(slots + r * d.H, x + (g * d.T + slot_token[(g * d.E + e) * d.C + c]) * d.H, bytes);
  });
  return 0;
}

// params: dslots (E, G, C, H), slot_token (G, E, C), x (G, T, H), dx (G, T, H)
MD_EXPORT int MoeDispatchBwd(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                             void *stream, void *extra) {
  (void)stream;
  (void)extra;
  if (nparam != 4) return 1;
  if (ndims[2] != 3 || !SameShape(ndims, shapes, 2, 3)) return 2;
  Dims d;
  if (const int rc = CheckCore(ndims, shapes, dtypes, 0, 3, 1, shapes[2][1], &d)) return rc;
  if (!IsFloat32(dtypes[2])) return 3;
  const auto *dslots = static_cast<const float *>(params[0]);
  const auto *slot_token = static_cast<const int32_t *>(params[1]);
  auto *dx = static_cast<float *>(params[3]);
  if (!TokensInRange(slot_token, d)) return 4;
  ScatterAdd(dslots, slot_token, d, dx, [](int64_t, int64_t, int64_t) { return 1.0f; });
  return 0;
}

// params: y (E, G, C, H), slot_token (G, E, C), slot_weight (G, E, C), spec (T,), out (G, T, H)
MD_EXPORT int MoeCombineFwd(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                            void *stream, void *extra) {
  (void)stream;
  (void)extra;
  if (nparam != 5) return 1;
  if (ndims[3] != 1 || !SameShape(ndims, shapes, 1, 2)) return 2;
  Dims d;
  if (const int rc = CheckCore(ndims, shapes, dtypes, 0, 4, 1, shapes[3][0], &d)) return rc;
  if (!IsFloat32(dtypes[2])) return 3;
  const auto *y = static_cast<const float *>(params[0]);
  const auto *slot_token = static_cast<const int32_t *>(params[1]);
  const auto *weight = static_cast<const float *>(params[2]);
  auto *out = static_cast<float *>(params[4]);
  if (!TokensInRange(slot_token, d)) return 4;
  ScatterAdd(y, slot_token, d, out, [&](int64_t g, int64_t e, int64_t c) { return weight[(g * d.E + e) * d.C + c]; });
  return 0;
}

// params: y (E, G, C, H), slot_token (G, E, C), slot_weight (G, E, C), dout (G, T, H), dy (E, G, C, H),
// dweight (G, E, C)
MD_EXPORT int MoeCombineBwd(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                            void *stream, void *extra) {
  (void)stream;
  (void)extra;
  if (nparam != 6) return 1;
  if (ndims[3] != 3 || !SameShape(ndims, shapes, 1, 2) || !SameShape(ndims, shapes, 1, 5) ||
      !SameShape(ndims, shapes, 0, 4)) {
    return 2;
  }
  Dims d;
  if (const int rc = CheckCore(ndims, shapes, dtypes, 0, 3, 1, shapes[3][1], &d)) return rc;
  if (!IsFloat32(dtypes[2]) || !IsFloat32(dtypes[4]) || !IsFloat32(dtypes[5])) return 3;
  const auto *y = static_cast<const float *>(params[0]);
  const auto *slot_token = static_cast<const int32_t *>(params[1]);
  const auto *weight = static_cast<const float *>(params[2]);
  const auto *dout = static_cast<const float *>(params[3]);
  auto *dy = static_cast<float *>(params[4]);
  auto *dweight = static_cast<float *>(params[5]);
  if (!TokensInRange(slot_token, d)) return 4;
  ForEachSlotRow(d, [&](int64_t r, int64_t e, int64_t g, int64_t c) {
    const int64_t slot = (g * d.E + e) * d.C + c;
    const float w = weight[slot];
    const float *go = dout + (g * d.T + slot_token[slot]) * d.H;
    const float *yr = y + r * d.H;
    float *dyr = dy + r * d.H;
    for (int64_t h = 0; h < d.H; ++h) dyr[h] = w * go[h];
    dweight[slot] = static_cast<float>(Dot(yr, go, d.H));
  });
  return 0;
}

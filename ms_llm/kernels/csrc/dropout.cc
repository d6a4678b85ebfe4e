// Dropout forward and backward for the CPU, called by MindSpore through ops.Custom(..., func_type="aot") (the
// backward wired as the forward's bprop). Contract and reference: the docstring of ms_llm/kernels/dropout.py.
//
// DropoutFwd(x, params) -> (y, mask)     y = x * (mask ? scale : 0),  mask uint8 1 = kept
// DropoutBwd(dy, mask, params) -> dx     dx = dy * scale * mask
//   (products, not selects, as MindSpore's x * mask * scale: a dropped inf or NaN gives NaN, not 0)
//   x, y, dy, dx float32 of any shape (flattened), mask uint8 of the same shape;
//   params (4,) float64 = [p, scale, seed, instance]: drop probability in [0, 1), the kept elements' scale
//   (1 / (1 - p) rounded to float32 by the caller), a seed < 2^53 and the calling cell's instance number.
//
// Random bits: counter-based, so every element is independent of the thread and chunk that computes it. Call c of
// an instance (c = 0, 1, ... per process, one counter per instance: two models built with the same seeds draw the
// same masks) keys a 64-bit SplitMix64 mix of (seed, c); element i's 32 bits are two rounds of Wellons' lowbias32
// (a bijective integer hash with full avalanche) over (i, key). Element i is dropped iff its bits < round(p 2^32),
// so P(drop) is p to within 2^-33. The loop is branch-free 32-bit integer arithmetic, vectorised by gcc at the
// ISA tier's width (ms_llm/kernels/_build.py).
//
// Why: MindSpore 2.10's CPU Dropout draws ~4 ns per element and returns a float32 mask (4 bytes per element kept
// for the backward): 88 ms + 19 ms of DropoutGrad in a BERT-base training step (8 x 128) of ~2.5 s
// (bench/README.md). Here one pass reads x and writes y and a 1-byte mask.

#include <algorithm>
#include <cstdint>
#include <mutex>
#include <unordered_map>

#include "kernel_common.h"

#define DROPOUT_EXPORT extern "C" __attribute__((visibility("default")))

namespace {

using ms_llm_kernels::ForEachChunk;
using ms_llm_kernels::IsFloat32;
using ms_llm_kernels::NumElements;
using ms_llm_kernels::SameShape;

constexpr int64_t kChunk = int64_t{1} << 15;                // elements per work chunk (divides 2^32)
constexpr int64_t kMinElemsForThreads = int64_t{1} << 16;

inline uint64_t SplitMix64(uint64_t z) {
  z += 0x9e3779b97f4a7c15ull;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

inline uint32_t LowBias32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352du;
  x ^= x >> 15;
  x *= 0x846ca68bu;
  x ^= x >> 16;
  return x;
}

// The next call number of `instance` (0 on its first call in this process).
uint64_t NextCall(uint64_t instance) {
  static std::mutex mutex;
  static std::unordered_map<uint64_t, uint64_t> calls;
  std::lock_guard<std::mutex> guard(mutex);
  return calls[instance]++;
}

struct Params {
  uint32_t threshold;  // drop iff bits < threshold
  float scale;
  uint64_t seed, instance;
};

// Reads and checks params (4,) float64; false if p is not in [0, 1), the scale not positive or finite, or the seed
// or instance not an integer in [0, 2^53).
bool ReadParams(const double *v, Params *out) {
  const double p = v[0], scale = v[1], seed = v[2], instance = v[3];
  const double two53 = 9007199254740992.0;
  if (!(p >= 0.0 && p < 1.0) || !(scale > 0.0 && scale < 3.4e38)) return false;
  if (!(seed >= 0.0 && seed < two53 && seed == static_cast<double>(static_cast<uint64_t>(seed)))) return false;
  if (!(instance >= 0.0 && instance < two53 && instance == static_cast<double>(static_cast<uint64_t>(instance))))
    return false;
  const double t = p * 4294967296.0 + 0.5;
  out->threshold = t >= 4294967295.0 ? 0xffffffffu : static_cast<uint32_t>(t);
  out->scale = static_cast<float>(scale);
  out->seed = static_cast<uint64_t>(seed);
  out->instance = static_cast<uint64_t>(instance);
  return true;
}

// Elements [begin, end) of one chunk; a chunk never straddles a multiple of 2^32 (kChunk divides it), so the high
// half of the element index is the same for the whole chunk and the bits come from 32-bit lanes only. In blocks of
// kBlock: the keep flags as uint32 (one vectorised integer loop), then y (float lanes of the same width), then the
// 1-byte mask; one loop mixing the widths was vectorised on 8-byte vectors only (2x slower than scalar, measured).
constexpr int kBlock = 512;

void Forward(const float *__restrict x, float *__restrict y, uint8_t *__restrict mask, int64_t begin, int64_t end,
             uint64_t key, uint32_t threshold, float scale) {
  const uint32_t k1 = static_cast<uint32_t>(key);
  const uint32_t k2 = static_cast<uint32_t>(key >> 32) ^ static_cast<uint32_t>(static_cast<uint64_t>(begin) >> 32);
  uint32_t keep[kBlock];
  for (int64_t b0 = begin; b0 < end; b0 += kBlock) {
    const int n = static_cast<int>(std::min<int64_t>(kBlock, end - b0));
    const uint32_t lo0 = static_cast<uint32_t>(b0);
    for (int j = 0; j < n; ++j) {  // element b0 + j
      const uint32_t bits = LowBias32(LowBias32((lo0 + static_cast<uint32_t>(j)) ^ k1) + k2);
      keep[j] = bits >= threshold ? 1u : 0u;
    }
    const float *xs = x + b0;
    float *ys = y + b0;
    for (int j = 0; j < n; ++j) ys[j] = xs[j] * (keep[j] != 0 ? scale : 0.0f);
    uint8_t *ms = mask + b0;
    for (int j = 0; j < n; ++j) ms[j] = static_cast<uint8_t>(keep[j]);
  }
}

bool IsParams(int *ndims, int64_t **shapes, const char **dtypes, int i) {
  return ndims[i] == 1 && shapes[i][0] == 4 && std::strcmp(dtypes[i], "float64") == 0;
}

}  // namespace

// Return codes: 0 ok; 1 wrong parameter count; 2 mismatched shapes or params not (4,) float64; 3 a wrong dtype
// (x, y, dy, dx float32, mask uint8); 4 invalid params (see ReadParams).
DROPOUT_EXPORT int DropoutFwd(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                              void *stream, void *extra) {
  (void)stream;
  (void)extra;
  if (nparam != 4) return 1;  // x, params, y, mask
  if (!SameShape(ndims, shapes, 0, 2) || !SameShape(ndims, shapes, 0, 3) || !IsParams(ndims, shapes, dtypes, 1))
    return 2;
  if (!IsFloat32(dtypes[0]) || !IsFloat32(dtypes[2]) || std::strcmp(dtypes[3], "uint8") != 0) return 3;
  Params p{};
  if (!ReadParams(static_cast<const double *>(params[1]), &p)) return 4;
  const uint64_t key = SplitMix64(p.seed ^ SplitMix64(NextCall(p.instance)));
  const auto *x = static_cast<const float *>(params[0]);
  auto *y = static_cast<float *>(params[2]);
  auto *mask = static_cast<uint8_t *>(params[3]);
  ForEachChunk(NumElements(ndims[0], shapes[0]), kChunk, kMinElemsForThreads, [&](int64_t, int64_t b, int64_t e) {
    Forward(x, y, mask, b, e, key, p.threshold, p.scale);
  });
  return 0;
}

DROPOUT_EXPORT int DropoutBwd(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                              void *stream, void *extra) {
  (void)stream;
  (void)extra;
  if (nparam != 4) return 1;  // dy, mask, params, dx
  if (!SameShape(ndims, shapes, 0, 1) || !SameShape(ndims, shapes, 0, 3) || !IsParams(ndims, shapes, dtypes, 2))
    return 2;
  if (!IsFloat32(dtypes[0]) || !IsFloat32(dtypes[3]) || std::strcmp(dtypes[1], "uint8") != 0) return 3;
  Params p{};
  if (!ReadParams(static_cast<const double *>(params[2]), &p)) return 4;
  const auto *dy = static_cast<const float *>(params[0]);
  const auto *mask = static_cast<const uint8_t *>(params[1]);
  auto *dx = static_cast<float *>(params[3]);
  const float scale = p.scale;
  ForEachChunk(NumElements(ndims[0], shapes[0]), kChunk, kMinElemsForThreads, [&](int64_t, int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) dx[i] = dy[i] * scale * static_cast<float>(mask[i]);   // mask is 0 or 1
  });
  return 0;
}

// Helpers shared by ms_llm's CPU kernels (csrc/*.cc): IEEE binary16 <-> float32 conversion, the number of CPUs
// this process may run on, the shape and float32 / int32 dtype name checks and a chunked parallel loop. Included by
// every kernel source; ms_llm/kernels/_build.py hashes csrc/*.h into each library's cache key, so a change here
// rebuilds every kernel.
#pragma once

#include <sched.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>

namespace ms_llm_kernels {

// ---------------------------------------------------------------- float16 <-> float32 (IEEE binary16)
inline float HalfToFloat(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t man = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0) {
    if (man == 0) {
      bits = sign;
    } else {  // subnormal: normalise
      exp = 127 - 15 + 1;
      while ((man & 0x400u) == 0) {
        man <<= 1;
        --exp;
      }
      man &= 0x3ffu;
      bits = sign | (exp << 23) | (man << 13);
    }
  } else if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (man << 13);
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
  }
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

inline uint16_t FloatToHalf(float f) {  // round to nearest even
  uint32_t x;
  std::memcpy(&x, &f, sizeof(x));
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
  const uint32_t ax = x & 0x7fffffffu;
  if (ax >= 0x7f800000u) {  // inf or nan
    return static_cast<uint16_t>(sign | 0x7c00u | (ax > 0x7f800000u ? 0x200u : 0u));
  }
  if (ax >= 0x477ff000u) {  // rounds to >= 65520: overflow to inf
    return static_cast<uint16_t>(sign | 0x7c00u);
  }
  if (ax < 0x38800000u) {  // below the smallest normal half: subnormal or zero
    if (ax < 0x33000000u) return sign;  // < 2^-25 rounds to zero
    const uint32_t e = ax >> 23;
    const uint32_t m = (ax & 0x7fffffu) | 0x800000u;
    const uint32_t shift = 126 - e;  // 14 + (113 - e)
    uint32_t half_m = m >> shift;
    const uint32_t rem = m & ((1u << shift) - 1u);
    const uint32_t halfway = 1u << (shift - 1);
    if (rem > halfway || (rem == halfway && (half_m & 1u))) ++half_m;
    return static_cast<uint16_t>(sign | half_m);
  }
  uint32_t h = ((ax >> 23) - 127 + 15) << 10 | ((ax >> 13) & 0x3ffu);
  const uint32_t rem = ax & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;  // may carry into the exponent: correct
  return static_cast<uint16_t>(sign | h);
}

// CPUs in this process's affinity mask (falls back to hardware_concurrency, then 1).
inline int NumThreads() {
  cpu_set_t set;
  CPU_ZERO(&set);
  if (sched_getaffinity(0, sizeof(set), &set) == 0) {
    const int n = CPU_COUNT(&set);
    if (n > 0) return n;
  }
  const unsigned hc = std::thread::hardware_concurrency();
  return hc > 0 ? static_cast<int>(hc) : 1;
}

// Elements of a tensor of rank `ndim` and dimensions `shape` (1 for a scalar).
inline int64_t NumElements(int ndim, const int64_t *shape) {
  int64_t n = 1;
  for (int d = 0; d < ndim; ++d) n *= shape[d];
  return n;
}

// Whether tensors a and b of an aot call have the same rank and dimensions.
inline bool SameShape(int *ndims, int64_t **shapes, int a, int b) {
  return ndims[a] == ndims[b] && std::equal(shapes[a], shapes[a] + ndims[a], shapes[b]);
}

// Whether an aot call's dtype name is float32 (MindSpore passes "float32"; "float" is accepted too).
inline bool IsFloat32(const char *s) { return std::strcmp(s, "float32") == 0 || std::strcmp(s, "float") == 0; }

// Whether an aot call's dtype name is int32.
inline bool IsInt32(const char *s) { return std::strcmp(s, "int32") == 0; }

// Runs body(chunk, tid) for every chunk in [0, chunks) on up to `threads` threads, the caller being thread 0; the
// threads take chunks from an atomic counter, so one the OS deschedules (the machine is shared) does not hold up
// the others. Returns the number of threads used (tid < that).
template <typename Body>
int ParallelChunks(int64_t chunks, int threads, Body body) {
  const int n = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, chunks)));
  std::atomic<int64_t> next{0};
  auto work = [&](int tid) {
    for (int64_t c = next.fetch_add(1, std::memory_order_relaxed); c < chunks;
         c = next.fetch_add(1, std::memory_order_relaxed)) {
      body(c, tid);
    }
  };
  std::vector<std::thread> workers;
  workers.reserve(static_cast<size_t>(n - 1));
  for (int t = 1; t < n; ++t) workers.emplace_back(work, t);
  work(0);
  for (auto &th : workers) th.join();
  return n;
}

// Runs body(c, begin, end) for the chunks [c * chunk, min(n, (c + 1) * chunk)) of a flat range [0, n): on every CPU
// (ParallelChunks) when n >= min_elems_for_threads, else on the calling thread.
template <typename Body>
void ForEachChunk(int64_t n, int64_t chunk, int64_t min_elems_for_threads, Body body) {
  ParallelChunks((n + chunk - 1) / chunk, n < min_elems_for_threads ? 1 : NumThreads(), [&](int64_t c, int) {
    body(c, c * chunk, std::min(n, (c + 1) * chunk));
  });
}

}  // namespace ms_llm_kernels

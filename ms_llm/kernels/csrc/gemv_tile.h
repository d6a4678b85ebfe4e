// The register-tiled small-batch GEMV core, y[b, r] = x[b] . W[r] for rows r0..r1 of a row-major W (V, H), shared
// by csrc/gemv.cc (the output head) and csrc/decode_layer.cc (the fused decode layer's projections). Design notes
// (tile sizes, prefetch, vector widths): the header comment of gemv.cc. Included by kernel sources only;
// ms_llm/kernels/_build.py hashes csrc/*.h into every library's cache key.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__) || defined(__F16C__)
#include <immintrin.h>
#endif

#include "kernel_common.h"

namespace ms_llm_kernels {
namespace gemv_tile {

#if defined(__AVX512F__)
#define GEMV_VW 16
constexpr int kMaxNB = 4;  // 4 x 4 zmm accumulators + 4 row vectors + 1 x vector of 32 registers
#elif defined(__AVX__)
#define GEMV_VW 8
constexpr int kMaxNB = 2;  // 2 x 4 ymm accumulators + 4 + 1 of 16 registers
#else
#define GEMV_VW 4
constexpr int kMaxNB = 2;
#endif
constexpr int kVW = GEMV_VW;  // floats per vector
constexpr int kNR = 4;        // rows of W per tile
#ifndef GEMV_PF_TILES
#define GEMV_PF_TILES 2
#endif
constexpr int64_t kPrefetchTiles = GEMV_PF_TILES;  // software prefetch distance in tiles of kNR rows

typedef float VecF __attribute__((vector_size(GEMV_VW * sizeof(float))));
typedef float VecFU __attribute__((vector_size(GEMV_VW * sizeof(float)), aligned(4), may_alias));

inline VecF LoadU(const float *p) { return *reinterpret_cast<const VecFU *>(p); }

// Horizontal sum by halving (log2(width) vector adds; a lane-serial loop costs ~4x more per tile and the tile
// epilogue runs once per kNB x kNR dot products).
template <int N>
inline float HSumN(const float *v) {
  if constexpr (N == 4) {
    return (v[0] + v[2]) + (v[1] + v[3]);
  } else {
    typedef float Half __attribute__((vector_size(N / 2 * sizeof(float))));
    Half lo, hi;
    std::memcpy(&lo, v, sizeof(Half));
    std::memcpy(&hi, v + N / 2, sizeof(Half));
    const Half sum = lo + hi;
    float tmp[N / 2];
    std::memcpy(tmp, &sum, sizeof(Half));
    return HSumN<N / 2>(tmp);
  }
}

inline float HSum(VecF v) {
  float lanes[kVW];
  std::memcpy(lanes, &v, sizeof(VecF));
  return HSumN<kVW>(lanes);
}

using ms_llm_kernels::FloatToHalf;
using ms_llm_kernels::HalfToFloat;

// n float16 values -> float32 (exact: every binary16 value is a binary32 value)
inline void WidenHalf(const uint16_t *src, int64_t n, float *dst) {
  int64_t i = 0;
#if defined(__AVX512F__)
  for (; i + 16 <= n; i += 16) {
    _mm512_storeu_ps(dst + i, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i *>(src + i))));
  }
#elif defined(__F16C__)
  for (; i + 8 <= n; i += 8) {
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i *>(src + i))));
  }
#endif
  for (; i < n; ++i) dst[i] = HalfToFloat(src[i]);
}

inline void StoreOut(float *y, int64_t i, float v) { y[i] = v; }
inline void StoreOut(uint16_t *y, int64_t i, float v) { y[i] = FloatToHalf(v); }

// y[b * V + col + r] = x[b] . w[r] for b < NB, r < NR; x rows are H apart, w holds NR row pointers.
// pf (or nullptr): bytes of W to prefetch, pf_lines cache lines per vector step, spread over the loop.
template <int NB, int NR, typename OutT>
inline void Tile(const float *x, const float *const *w, int64_t H, OutT *y, int64_t V, int64_t col, const char *pf,
                 int pf_lines) {
  VecF acc[NB][NR];
  for (int b = 0; b < NB; ++b) {
    for (int r = 0; r < NR; ++r) acc[b][r] = VecF{};
  }
  int64_t k = 0;
  for (; k + kVW <= H; k += kVW) {
    if (pf != nullptr) {
      for (int j = 0; j < pf_lines; ++j) __builtin_prefetch(pf + (k / kVW * pf_lines + j) * 64, 0, 3);
    }
    VecF wv[NR];
    for (int r = 0; r < NR; ++r) wv[r] = LoadU(w[r] + k);
    for (int b = 0; b < NB; ++b) {
      const VecF xv = LoadU(x + b * H + k);
      for (int r = 0; r < NR; ++r) acc[b][r] += xv * wv[r];
    }
  }
  for (int b = 0; b < NB; ++b) {
    for (int r = 0; r < NR; ++r) {
      float s = HSum(acc[b][r]);
      for (int64_t kk = k; kk < H; ++kk) s += x[b * H + kk] * w[r][kk];
      StoreOut(y, b * V + col + r, s);
    }
  }
}

// All B rows of x against NR rows of W; the first x chunk also prefetches (see Tile).
template <int NR, typename OutT>
inline void TileRows(const float *x, int64_t B, const float *const *w, int64_t H, OutT *y, int64_t V, int64_t col,
                     const char *pf, int pf_lines) {
  int64_t b = 0;
  for (; b + kMaxNB <= B; b += kMaxNB) {
    Tile<kMaxNB, NR>(x + b * H, w, H, y + b * V, V, col, pf, pf_lines);
    pf = nullptr;
  }
  switch (B - b) {
    case 1: Tile<1, NR>(x + b * H, w, H, y + b * V, V, col, pf, pf_lines); break;
    case 2: if constexpr (kMaxNB > 2) Tile<2, NR>(x + b * H, w, H, y + b * V, V, col, pf, pf_lines); break;
    case 3: if constexpr (kMaxNB > 3) Tile<3, NR>(x + b * H, w, H, y + b * V, V, col, pf, pf_lines); break;
    default: break;
  }
}

// Rows [r0, r1) of W: all B outputs of each row.  WT is float (read in place) or uint16_t (float16, widened).
template <typename WT, typename OutT>
void RunRows(const float *x, int64_t B, const WT *w, int64_t H, OutT *y, int64_t V, int64_t r0, int64_t r1) {
  std::vector<float> buf;
  if constexpr (!std::is_same<WT, float>::value) buf.resize(static_cast<size_t>(kNR * H));
  const float *rows[kNR];
  // the tile kPrefetchTiles ahead is prefetched while this one is computed: with B > 1 the FMAs of a tile take
  // long enough that the hardware prefetcher alone lets the memory stream idle (measured: B = 8 took the sum of
  // its compute and its memory time, not the max)
  const int pf_lines = static_cast<int>(std::max<int64_t>(1, (kNR * kVW * sizeof(WT) + 63) / 64));
  for (int64_t r = r0; r < r1; r += kNR) {
    const int nr = static_cast<int>(std::min<int64_t>(kNR, r1 - r));
    const int64_t r_pf = r + kPrefetchTiles * kNR;
    const char *pf = r_pf + kNR <= r1 ? reinterpret_cast<const char *>(w + r_pf * H) : nullptr;
    for (int i = 0; i < nr; ++i) {
      if constexpr (std::is_same<WT, float>::value) {
        rows[i] = w + (r + i) * H;
      } else {
        WidenHalf(w + (r + i) * H, H, buf.data() + i * H);
        rows[i] = buf.data() + i * H;
      }
    }
    switch (nr) {
      case 4: TileRows<4>(x, B, rows, H, y, V, r, pf, pf_lines); break;
      case 3: TileRows<3>(x, B, rows, H, y, V, r, pf, pf_lines); break;
      case 2: TileRows<2>(x, B, rows, H, y, V, r, pf, pf_lines); break;
      default: TileRows<1>(x, B, rows, H, y, V, r, pf, pf_lines); break;
    }
  }
}

}  // namespace gemv_tile
}  // namespace ms_llm_kernels

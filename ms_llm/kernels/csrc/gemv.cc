// Small-batch "GEMV" y = x W^T for the CPU (the output head of small-batch decoding), called by MindSpore through
// ops.Custom(..., func_type="aot").  Shape/dtype contract: ascend_kernels/gemv/README.md.
//
// GemvNT(x, w) -> y
//   x (B, H), w (V, H) (row-major: W's rows are the output features, as an nn.Dense / tied embedding stores them),
//   y (B, V) = x @ w^T; x, w and y share one dtype, float32 or float16; products are accumulated in float32
//   (float16 inputs are widened, y is rounded to float16 once at the end).
//
// Why: with B <= 8 the product is memory bound (W is V*H elements read once per token; 154 MB for GPT-2's tied
// embedding), so the only thing that matters is streaming W exactly once at full bandwidth.  Threads take chunks of
// W's rows; each walks its chunk kNR = 4 rows at a time (12 KB for H = 768, so they stay in L1) and computes all B
// dot products of those rows before moving on: B is processed in chunks of up to kMaxNB rows of x with a
// kMaxNB x kNR register tile of vector accumulators (fused multiply-adds; -ffp-contract=fast is gcc's default
// under -std=gnu++17), so every element of W is loaded from memory once and from L1 at most ceil(B / kMaxNB)
// times.  The tile kPrefetchTiles ahead is software-prefetched during the first x chunk.
// Vectors are gcc vector extensions of the widest width the build's ISA flags enable (16 floats with AVX-512,
// 8 with AVX, else 4, which gcc lowers to SSE2 / NEON), picked with the same ISA tiers as the flash-attention
// kernel (ms_llm/kernels/_build.py); the H % width tail is scalar.  float16 rows are widened into a per-thread
// float32 buffer (vcvtph2ps when the build has AVX-512F or F16C, else a bit-exact scalar conversion).
// Threads: std::threads (one per CPU in the affinity mask, the calling thread included), only when W has enough
// elements to amortise starting them; they take chunks of rows (~1 MiB of float32 W each) from an atomic counter,
// so a thread the OS deschedules on a shared machine does not hold up the others.  No scratch buffers in the
// float32 path.

#include <sched.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <thread>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__) || defined(__F16C__)
#include <immintrin.h>
#endif

#include "kernel_common.h"

#define GEMV_EXPORT extern "C" __attribute__((visibility("default")))

namespace {

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
constexpr int64_t kMinElemsPerThread = int64_t{1} << 18;  // W elements (1 MiB of float32) per extra thread
constexpr int64_t kChunkElems = int64_t{1} << 18;        // W elements per work chunk handed to a thread
constexpr int64_t kRangeAlign = 16;                      // chunks are multiples of 16 rows

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
void WidenHalf(const uint16_t *src, int64_t n, float *dst) {
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

using ms_llm_kernels::NumThreads;

// Rows are handed out in chunks of about kChunkElems elements of W from a shared atomic counter, so a thread that
// the OS deschedules (the machine is shared) does not hold the others up: the rest take its remaining chunks.
template <typename WT, typename OutT>
void Run(const float *x, int64_t B, const WT *w, int64_t H, OutT *y, int64_t V) {
  int64_t n = std::min<int64_t>(NumThreads(), std::max<int64_t>(1, V * H / kMinElemsPerThread));
  if (n <= 1) {
    RunRows(x, B, w, H, y, V, 0, V);
    return;
  }
  const int64_t chunk = std::max<int64_t>(kRangeAlign, kChunkElems / std::max<int64_t>(H, 1) / kRangeAlign *
                                                           kRangeAlign);  // rows per chunk, a multiple of 16
  const int64_t n_chunks = (V + chunk - 1) / chunk;
  n = std::min(n, n_chunks);
  std::atomic<int64_t> next{0};
  auto work = [&] {
    for (int64_t c = next.fetch_add(1, std::memory_order_relaxed); c < n_chunks;
         c = next.fetch_add(1, std::memory_order_relaxed)) {
      RunRows(x, B, w, H, y, V, c * chunk, std::min(V, (c + 1) * chunk));
    }
  };
  std::vector<std::thread> workers;
  workers.reserve(static_cast<size_t>(n - 1));
  for (int64_t t = 1; t < n; ++t) workers.emplace_back(work);
  work();
  for (auto &th : workers) th.join();
}

enum class DType { kF32, kF16, kBad };

inline DType ParseDType(const char *s) {
  if (std::strcmp(s, "float32") == 0 || std::strcmp(s, "float") == 0) return DType::kF32;
  if (std::strcmp(s, "float16") == 0) return DType::kF16;
  return DType::kBad;
}

}  // namespace

// Return codes: 0 ok; 1 wrong parameter count; 2 wrong rank or shapes; 3 wrong or mismatched dtypes.
GEMV_EXPORT int GemvNT(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *stream,
                       void *extra) {
  (void)stream;
  (void)extra;
  if (nparam != 3) return 1;
  if (ndims[0] != 2 || ndims[1] != 2 || ndims[2] != 2) return 2;
  const int64_t B = shapes[0][0], H = shapes[0][1], V = shapes[1][0];
  if (shapes[1][1] != H || shapes[2][0] != B || shapes[2][1] != V || B < 0 || H < 0 || V < 0) return 2;
  const DType dt = ParseDType(dtypes[0]);
  if (dt == DType::kBad || ParseDType(dtypes[1]) != dt || ParseDType(dtypes[2]) != dt) return 3;
  if (B == 0 || V == 0) return 0;
  if (dt == DType::kF32) {
    Run(static_cast<const float *>(params[0]), B, static_cast<const float *>(params[1]), H,
        static_cast<float *>(params[2]), V);
  } else {
    std::vector<float> xf(static_cast<size_t>(B * H));
    WidenHalf(static_cast<const uint16_t *>(params[0]), B * H, xf.data());
    Run(xf.data(), B, static_cast<const uint16_t *>(params[1]), H, static_cast<uint16_t *>(params[2]), V);
  }
  return 0;
}

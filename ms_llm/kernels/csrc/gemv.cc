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

#include "gemv_tile.h"
#include "kernel_common.h"

#define GEMV_EXPORT extern "C" __attribute__((visibility("default")))

namespace {

using namespace ms_llm_kernels::gemv_tile;  // NOLINT: the tile kernels and their constants

constexpr int64_t kMinElemsPerThread = int64_t{1} << 18;  // W elements (1 MiB of float32) per extra thread
constexpr int64_t kChunkElems = int64_t{1} << 18;        // W elements per work chunk handed to a thread
constexpr int64_t kRangeAlign = 16;                      // chunks are multiples of 16 rows

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
  ms_llm_kernels::ParallelChunks((V + chunk - 1) / chunk, static_cast<int>(n), [&](int64_t c, int) {
    RunRows(x, B, w, H, y, V, c * chunk, std::min(V, (c + 1) * chunk));
  });
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

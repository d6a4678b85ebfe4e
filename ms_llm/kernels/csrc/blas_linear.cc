// Linear layer y = x W^T (+ b) for the CPU with OpenBLAS's SGEMM, forward and backward, called by MindSpore through
// ops.Custom(..., func_type="aot") (the backward wired as the forward's bprop). Contract and reference: the
// docstring of ms_llm/kernels/blas_linear.py.
//
// LinearFwd(x, w, b) -> y          x (N, K), w (M, K), b (M,), y (N, M) = x w^T + b   (y is filled with b, then
//                                  SGEMM accumulates into it with beta = 1: no separate bias pass)
// LinearFwdNoBias(x, w) -> y       y = x w^T
// LinearBwd(x, w, dy) -> (dx, dw, db)      dx (N, K) = dy w,  dw (M, K) = dy^T x,  db (M,) = column sums of dy
// LinearBwdNoBias(x, w, dy) -> (dx, dw)
// All float32, row-major, contiguous (MindSpore hands aot kernels contiguous buffers).
//
// Why: MindSpore 2.10's CPU MatMul runs the backward's layouts far below the machine's peak (at BERT-base shapes,
// (1024, 3072) x (3072, 768) "nn" ~109 GFLOPS and (768, 1024)^T x (1024, 3072) "tn" ~69 GFLOPS of a measured
// ~270 GFLOPS 2-core peak), while OpenBLAS (the scipy-openblas32 wheel, the build numpy and SciPy link against)
// runs every layout at ~190-220 GFLOPS here (bench/bench_train_kernels.py). Threads: OpenBLAS runs
// single-threaded; each call splits its products into blocks of output rows over std::threads (one per CPU) that
// exit when it returns (see SingleThreadedBlas), and db's column sums by blocks of columns.

#include <algorithm>
#include <cstdint>
#include <cstring>

#include <cblas.h>

#include "kernel_common.h"

#define BL_EXPORT extern "C" __attribute__((visibility("default")))

namespace {

using ms_llm_kernels::IsFloat32;
using ms_llm_kernels::NumThreads;
using ms_llm_kernels::ParallelChunks;

constexpr int64_t kColsPerChunk = 256;
constexpr int64_t kMinElemsForThreads = int64_t{1} << 16;
constexpr int64_t kMinFlopsForThreads = int64_t{1} << 22;  // products below ~4 MFLOP run on the calling thread
constexpr int64_t kMinBlockRows = 64;
// OpenBLAS's 32-bit-integer interface (scipy-openblas32): every dimension and leading dimension must fit.
constexpr int64_t kMaxDim = int64_t{0x7fffffff};

bool Fits(int64_t a, int64_t b, int64_t c) { return a <= kMaxDim && b <= kMaxDim && c <= kMaxDim; }

// c (rows, cols) = op(a) op(b) (+ c when accumulate), row-major; lda / ldb are the operands' row strides.
void Gemm(bool ta, bool tb, int64_t rows, int64_t cols, int64_t inner, const float *a, int64_t lda, const float *b,
          int64_t ldb, float *c, int64_t ldc, bool accumulate) {
  scipy_cblas_sgemm(CblasRowMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans,
                    static_cast<blasint>(rows), static_cast<blasint>(cols), static_cast<blasint>(inner), 1.0f, a,
                    static_cast<blasint>(lda), b, static_cast<blasint>(ldb), accumulate ? 1.0f : 0.0f, c,
                    static_cast<blasint>(ldc));
}

// OpenBLAS runs single-threaded inside this library: the kernels split their products over their own std::threads
// (which exit when the call returns). OpenBLAS's pool would keep its workers spinning after each call, taking the
// CPUs from the MindSpore kernels that follow (measured: a BERT step with OpenBLAS's 2 threads was slower than with
// MindSpore's MatMul, bench/README.md).
void SingleThreadedBlas() {
  static const bool once = [] {
    scipy_openblas_set_num_threads(1);
    return true;
  }();
  (void)once;
}

// Splits [0, n) into one nearly equal block per thread (none under kMinBlockRows rows unless n itself is smaller),
// block p being [Begin(p), Begin(p + 1)). One block per thread, not more: every block re-reads the whole other
// operand (measured: 4 blocks per thread made the vocabulary projection's backward 25% slower).
struct Blocks {
  int64_t n, parts;
  Blocks(int64_t rows, int threads)
      : n(rows), parts(std::max<int64_t>(1, std::min<int64_t>(threads, rows / kMinBlockRows))) {}
  int64_t Begin(int64_t p) const { return n * p / parts; }
};

int ThreadsFor(int64_t flops) { return flops < kMinFlopsForThreads ? 1 : NumThreads(); }

// db (m,) = sum over the n rows of dy (n, m); threads take blocks of columns and walk all rows.
void ColumnSums(const float *dy, int64_t n, int64_t m, float *db) {
  const int threads = n * m < kMinElemsForThreads ? 1 : NumThreads();
  ParallelChunks((m + kColsPerChunk - 1) / kColsPerChunk, threads, [&](int64_t c, int) {
    const int64_t c0 = c * kColsPerChunk, c1 = std::min(m, c0 + kColsPerChunk);
    float *out = db + c0;
    std::memset(out, 0, static_cast<size_t>(c1 - c0) * sizeof(float));
    for (int64_t r = 0; r < n; ++r) {
      const float *row = dy + r * m + c0;
      for (int64_t j = 0; j < c1 - c0; ++j) out[j] += row[j];
    }
  });
}

// Checks x (N, K), w (M, K) and, when given, the further (rank, dims) pairs; returns N, K, M or a return code.
struct Dims {
  int64_t n, k, m;
};

int CheckXW(int nparam, int expected, int *ndims, int64_t **shapes, const char **dtypes, Dims *d) {
  if (nparam != expected) return 1;
  if (ndims[0] != 2 || ndims[1] != 2) return 2;
  d->n = shapes[0][0];
  d->k = shapes[0][1];
  d->m = shapes[1][0];
  if (shapes[1][1] != d->k || d->n < 0 || d->k < 0 || d->m < 0 || !Fits(d->n, d->k, d->m)) return 2;
  for (int i = 0; i < nparam; ++i) {
    if (!IsFloat32(dtypes[i])) return 3;
  }
  return 0;
}

bool Is2D(int *ndims, int64_t **shapes, int i, int64_t r, int64_t c) {
  return ndims[i] == 2 && shapes[i][0] == r && shapes[i][1] == c;
}

bool Is1D(int *ndims, int64_t **shapes, int i, int64_t n) { return ndims[i] == 1 && shapes[i][0] == n; }

int Forward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, bool bias) {
  Dims d{};
  if (int rc = CheckXW(nparam, bias ? 4 : 3, ndims, shapes, dtypes, &d)) return rc;
  const int y_index = bias ? 3 : 2;
  if ((bias && !Is1D(ndims, shapes, 2, d.m)) || !Is2D(ndims, shapes, y_index, d.n, d.m)) return 2;
  const auto *x = static_cast<const float *>(params[0]);
  const auto *w = static_cast<const float *>(params[1]);
  auto *y = static_cast<float *>(params[y_index]);
  if (d.n == 0 || d.m == 0) return 0;
  if (d.k == 0) {
    for (int64_t r = 0; r < d.n; ++r) {
      if (bias) {
        std::memcpy(y + r * d.m, params[2], static_cast<size_t>(d.m) * sizeof(float));
      } else {
        std::memset(y + r * d.m, 0, static_cast<size_t>(d.m) * sizeof(float));
      }
    }
    return 0;
  }
  SingleThreadedBlas();
  const int threads = ThreadsFor(2 * d.n * d.m * d.k);
  const auto *b = static_cast<const float *>(params[2]);
  if (d.m >= d.n) {  // blocks of w's rows -> y's columns (a wide output, e.g. a vocabulary: each block of w is read
                     // by one thread only)
    const Blocks cols(d.m, threads);
    ParallelChunks(cols.parts, threads, [&](int64_t p, int) {
      const int64_t c0 = cols.Begin(p), c1 = cols.Begin(p + 1);
      if (bias) {
        for (int64_t r = 0; r < d.n; ++r) std::memcpy(y + r * d.m + c0, b + c0, static_cast<size_t>(c1 - c0) * sizeof(float));
      }
      Gemm(false, true, d.n, c1 - c0, d.k, x, d.k, w + c0 * d.k, d.k, y + c0, d.m, bias);  // (N, K) x (m, K)^T
    });
  } else {  // blocks of x's rows -> the same rows of y
    const Blocks rows(d.n, threads);
    ParallelChunks(rows.parts, threads, [&](int64_t p, int) {
      const int64_t r0 = rows.Begin(p), r1 = rows.Begin(p + 1);
      if (bias) {
        for (int64_t r = r0; r < r1; ++r) std::memcpy(y + r * d.m, b, static_cast<size_t>(d.m) * sizeof(float));
      }
      Gemm(false, true, r1 - r0, d.m, d.k, x + r0 * d.k, d.k, w, d.k, y + r0 * d.m, d.m, bias);  // (n, K) x (M, K)^T
    });
  }
  return 0;
}

int Backward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, bool bias) {
  Dims d{};
  if (int rc = CheckXW(nparam, bias ? 6 : 5, ndims, shapes, dtypes, &d)) return rc;
  if (!Is2D(ndims, shapes, 2, d.n, d.m) || !Is2D(ndims, shapes, 3, d.n, d.k) || !Is2D(ndims, shapes, 4, d.m, d.k) ||
      (bias && !Is1D(ndims, shapes, 5, d.m))) {
    return 2;
  }
  const auto *x = static_cast<const float *>(params[0]);
  const auto *w = static_cast<const float *>(params[1]);
  const auto *dy = static_cast<const float *>(params[2]);
  auto *dx = static_cast<float *>(params[3]);
  auto *dw = static_cast<float *>(params[4]);
  if (d.n == 0 || d.m == 0 || d.k == 0) {  // an empty product: zero gradients
    std::memset(dx, 0, static_cast<size_t>(d.n * d.k) * sizeof(float));
    std::memset(dw, 0, static_cast<size_t>(d.m * d.k) * sizeof(float));
  } else {
    // dx and dw cost the same (N K M multiply-adds each); each is split into blocks of its output rows (dx by
    // rows of N, dw by rows of M) and the threads take the blocks of both from one counter.
    SingleThreadedBlas();
    const int threads = ThreadsFor(4 * d.n * d.m * d.k);
    const Blocks dx_rows(d.n, threads), dw_rows(d.m, threads);
    ParallelChunks(dx_rows.parts + dw_rows.parts, threads, [&](int64_t c, int) {
      if (c < dx_rows.parts) {
        const int64_t r0 = dx_rows.Begin(c), r1 = dx_rows.Begin(c + 1);
        Gemm(false, false, r1 - r0, d.k, d.m, dy + r0 * d.m, d.m, w, d.k, dx + r0 * d.k, d.k, false);  // (n, M) x (M, K)
      } else {
        const int64_t p = c - dx_rows.parts;
        const int64_t r0 = dw_rows.Begin(p), r1 = dw_rows.Begin(p + 1);
        Gemm(true, false, r1 - r0, d.k, d.n, dy + r0, d.m, x, d.k, dw + r0 * d.k, d.k, false);  // (N, m)^T x (N, K)
      }
    });
  }
  if (bias) ColumnSums(dy, d.n, d.m, static_cast<float *>(params[5]));
  return 0;
}

}  // namespace

// Return codes: 0 ok; 1 wrong parameter count; 2 wrong rank or shapes (or a dimension over 2^31 - 1);
// 3 a dtype other than float32.
BL_EXPORT int LinearFwd(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *stream,
                        void *extra) {
  (void)stream;
  (void)extra;
  return Forward(nparam, params, ndims, shapes, dtypes, true);
}

BL_EXPORT int LinearFwdNoBias(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                              void *stream, void *extra) {
  (void)stream;
  (void)extra;
  return Forward(nparam, params, ndims, shapes, dtypes, false);
}

BL_EXPORT int LinearBwd(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *stream,
                        void *extra) {
  (void)stream;
  (void)extra;
  return Backward(nparam, params, ndims, shapes, dtypes, true);
}

BL_EXPORT int LinearBwdNoBias(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                              void *stream, void *extra) {
  (void)stream;
  (void)extra;
  return Backward(nparam, params, ndims, shapes, dtypes, false);
}

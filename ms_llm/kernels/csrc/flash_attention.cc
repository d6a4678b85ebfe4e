// Flash attention (Dao et al. 2022) forward and backward for the CPU, called by MindSpore through
// ops.Custom(..., func_type="aot").  Shape/dtype contract: ascend_kernels/flash_attention/README.md.
//
// Forward  FlashAttentionFwd(q, k, v, key_mask, params) -> (out, lse)
// Backward FlashAttentionBwd(q, k, v, key_mask, params, out, dout, lse) -> (dq, dk, dv)
// Biased   FlashAttentionBiasFwd(q, k, v, key_mask, params, bias) -> (out, lse)
//          FlashAttentionBiasBwd(q, k, v, key_mask, params, bias, out, dout, lse) -> (dq, dk, dv, dbias)
//   (separate symbols, not an optional argument: MindSpore identifies a Custom op with a bprop by its function
//   name, so two ops on one symbol with different arities collide in a graph that holds both)
//   q (B, H, Sq, D), k/v (B, H, Sk, D): float32 or float16 (all three the same); with layout 1 (BSND) instead
//   q (B, Sq, H, D), k/v (B, Sk, H, D), and out, dout, dq, dk, dv likewise (the layout of a (B, S, H*D)
//   projection reshaped, so the caller needs no head transposes);
//   key_mask (B, Sk) float32, 1 = attend, 0 = padding (a value > 0.5 counts as 1);
//   params (4,) float32 = [scale, causal (0/1), band_width (0 = no band), layout (0 = BNSD, 1 = BSND)];
//   bias (Bb, H, Sq, Sk) float32 with Bb = 1 (shared by the batch) or B, added to the scaled scores:
//   s = q k^T * scale + bias;
//   out (B, H, Sq, D) in the input dtype (BSND: (B, Sq, H, D)); lse (B, H, Sq) float32 in both layouts, -inf for
//   a row with no visible key;
//   dq/dk/dv in the input dtype; dbias (Bb, H, Sq, Sk) float32 = dL/ds (summed over the batch when Bb = 1; zero
//   where the key is not visible).
// Key j is visible to query i iff key_mask[b, j] > 0.5 and, when causal, j <= i + (Sk - Sq) and, when
// band_width > 0, j > i + (Sk - Sq) - band_width.  A row with no visible key outputs zeros (and zero grads).
// The bias does not change visibility; it must be finite where a key is visible.
//
// Everything is computed in float32.  Each (b, h) head is copied once into padded float32 buffers (D padded
// to a multiple of kNR, rows padded with zeros), so the inner GEMM micro-kernel has fixed 4 x kNR blocks and no
// edge cases; padded keys are masked out.  The loops are plain C++ written for gcc's auto-vectoriser
// (-O3 -std=gnu++17 -fno-trapping-math so masked selects are if-converted; AVX2/FMA or AVX-512 flags only when
// the CPU has them, else the compiler's default target; see ms_llm/kernels/_build.py).
// Work is split over (b, h, query tile) tasks (forward) or (b, h, key tile) tasks (backward) in contiguous,
// cost-balanced ranges across std::threads; tiles outside the causal/band structure are skipped.  With a bias
// shared by the batch (Bb = 1 < B), a backward task is (h, key tile) over every b, so the dbias column strip of
// a key tile is accumulated by one thread only (no locks, no per-thread Sq x Sk buffer).  The bias and no-bias
// paths are separate template instances: the no-bias code is the same as without bias support.

#include <sched.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <mutex>
#include <thread>
#include <vector>

#include "kernel_common.h"

#define FA_EXPORT extern "C" __attribute__((visibility("default")))

namespace {

constexpr int kBR = 64;  // query rows per tile
constexpr int kBC = 64;  // keys per tile
constexpr int kMR = 4;   // micro-kernel rows (GemmAcc is written for exactly 4)
#ifndef FA_NR
#define FA_NR 16
#endif
constexpr int kNR = FA_NR;  // micro-kernel columns: 2 vector registers a row (16 floats with AVX2, 32 with AVX-512)
static_assert(kBR % kMR == 0 && kBC % kMR == 0 && kBC % kNR == 0, "tile sizes must fit the micro-kernel");
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

inline int64_t RoundUp(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

using ms_llm_kernels::FloatToHalf;
using ms_llm_kernels::HalfToFloat;

enum class DType { kF32, kF16, kBad };

inline DType ParseDType(const char *s) {
  if (std::strcmp(s, "float32") == 0 || std::strcmp(s, "float") == 0) return DType::kF32;
  if (std::strcmp(s, "float16") == 0) return DType::kF16;
  return DType::kBad;
}

inline float LoadElem(const void *base, DType dt, int64_t i) {
  return dt == DType::kF32 ? static_cast<const float *>(base)[i]
                           : HalfToFloat(static_cast<const uint16_t *>(base)[i]);
}

inline void StoreElem(void *base, DType dt, int64_t i, float v) {
  if (dt == DType::kF32) {
    static_cast<float *>(base)[i] = v;
  } else {
    static_cast<uint16_t *>(base)[i] = FloatToHalf(v);
  }
}

// ---------------------------------------------------------------- vectorisable exp (Cephes expf)
// Branch-free so gcc vectorises the loops calling it; relative error ~1e-7 for x in [-87, 88].
inline float FastExp(float x) {
  x = std::min(std::max(x, -87.0f), 88.0f);
  const float magic = 12582912.0f;  // 1.5 * 2^23: adding and subtracting rounds to nearest integer
  float n = (x * 1.44269504088896341f + magic) - magic;
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return y * scale;
}

// ---------------------------------------------------------------- GEMM micro-kernel
// C[m, n] += sum_k A[m, k] * B[k, n] for m < M (multiple of kMR), n < N (multiple of kNR).
// The 4 x kNR accumulator block stays in 8 vector registers (gcc's predictive commoning would unroll
// the k loop and spill them, hence -fno-predictive-commoning); each B row chunk is loaded once per 4 rows.
void GemmAcc(int M, int N, int K, const float *__restrict A, int64_t lda, const float *__restrict B,
             int64_t ldb, float *__restrict C, int64_t ldc) {
  for (int m0 = 0; m0 < M; m0 += kMR) {
    for (int n0 = 0; n0 < N; n0 += kNR) {
      float acc[kMR][kNR];
      for (int i = 0; i < kMR; ++i)
        for (int j = 0; j < kNR; ++j) acc[i][j] = C[(m0 + i) * ldc + n0 + j];
      const float *a0 = A + (m0 + 0) * lda;
      const float *a1 = A + (m0 + 1) * lda;
      const float *a2 = A + (m0 + 2) * lda;
      const float *a3 = A + (m0 + 3) * lda;
      for (int k = 0; k < K; ++k) {
        const float *b = B + k * ldb + n0;
        const float x0 = a0[k], x1 = a1[k], x2 = a2[k], x3 = a3[k];
        for (int j = 0; j < kNR; ++j) {
          const float bj = b[j];
          acc[0][j] += x0 * bj;
          acc[1][j] += x1 * bj;
          acc[2][j] += x2 * bj;
          acc[3][j] += x3 * bj;
        }
      }
      for (int i = 0; i < kMR; ++i)
        for (int j = 0; j < kNR; ++j) C[(m0 + i) * ldc + n0 + j] = acc[i][j];
    }
  }
}

// Max and sum of a kBC-long row: kNR independent lanes (vectorised without -ffast-math), then a pairwise tree
// with compile-time widths (log2(kNR) dependent steps instead of kNR - 1).
template <int W>
inline void FoldMax(float *part) {
  if constexpr (W > 0) {
    for (int j = 0; j < W; ++j) part[j] = part[j] < part[j + W] ? part[j + W] : part[j];
    FoldMax<W / 2>(part);
  }
}

template <int W>
inline void FoldSum(float *part) {
  if constexpr (W > 0) {
    for (int j = 0; j < W; ++j) part[j] += part[j + W];
    FoldSum<W / 2>(part);
  }
}

inline float RowMax(const float *x) {
  float part[kNR];
  for (int j = 0; j < kNR; ++j) part[j] = x[j];
  for (int c = kNR; c < kBC; c += kNR)
    for (int j = 0; j < kNR; ++j) part[j] = part[j] < x[c + j] ? x[c + j] : part[j];
  FoldMax<kNR / 2>(part);
  return part[0];
}

inline float RowSum(const float *x) {
  float part[kNR];
  for (int j = 0; j < kNR; ++j) part[j] = x[j];
  for (int c = kNR; c < kBC; c += kNR)
    for (int j = 0; j < kNR; ++j) part[j] += x[c + j];
  FoldSum<kNR / 2>(part);
  return part[0];
}

// src (Skp x Dp rows) -> dst tiles [Skp / kBC][Dp][kBC]: each key tile transposed and contiguous, so the
// QK^T micro-kernel walks 256-byte rows (a full-length Kt with an Skp stride maps every row to one L1 set).
void PackTransposedTiles(const float *src, int64_t Skp, int64_t Dp, float *dst) {
  for (int64_t t = 0; t < Skp / kBC; ++t) {
    float *tile = dst + t * Dp * kBC;
    for (int c = 0; c < kBC; ++c)
      for (int64_t d = 0; d < Dp; ++d) tile[d * kBC + c] = src[(t * kBC + c) * Dp + d];
  }
}

// dst (cols x rows, leading dim ldd) = src (rows x cols, leading dim lds) transposed.
void Transpose(int rows, int cols, const float *src, int64_t lds, float *dst, int64_t ldd) {
  for (int r = 0; r < rows; ++r)
    for (int c = 0; c < cols; ++c) dst[c * ldd + r] = src[r * lds + c];
}

// ---------------------------------------------------------------- problem description
struct Problem {
  int64_t B = 0, H = 0, Sq = 0, Sk = 0, D = 0;
  int64_t Dp = 0;           // D rounded up to kNR
  int64_t Sqp = 0, Skp = 0; // Sq, Sk rounded up to kBR, kBC
  DType dt = DType::kBad;
  float scale = 1.0f;
  bool causal = false;
  int64_t band = 0;
  int64_t offset = 0;       // Sk - Sq: query i is aligned with key i + offset
  int64_t Bb = 0;           // bias batch: 0 = no bias, 1 = shared by the batch, B = per sequence
  bool bsnd = false;        // q/k/v/out and their gradients are (B, S, H, D) instead of (B, H, S, D)

  // Element offset of row r (of S rows) of head `head` (= b * H + h) in a q/k/v-shaped tensor.
  int64_t RowOffset(int64_t head, int64_t r, int64_t S) const {
    return bsnd ? (((head / H) * S + r) * H + head % H) * D : (head * S + r) * D;
  }

  // The (Sq, Sk) bias block of head `head` (= b * H + h).
  int64_t BiasHead(int64_t head) const { return Bb == 1 ? head % H : head; }

  // Visible key range [Lo(i), Hi(i)] from the causal/band structure (key_mask applies on top).
  int64_t Hi(int64_t i) const { return causal ? std::min(i + offset, Sk - 1) : Sk - 1; }
  int64_t Lo(int64_t i) const { return (causal && band > 0) ? std::max<int64_t>(i + offset - band + 1, 0) : 0; }
  // Key tiles [c_begin, c_end) that rows [r0, r1) can see structurally; empty when c_begin >= c_end.
  void KeyTileRange(int64_t r0, int64_t r1, int64_t *c_begin, int64_t *c_end) const {
    const int64_t lo = Lo(r0), hi = Hi(r1 - 1);
    if (hi < lo || hi < 0) {
      *c_begin = *c_end = 0;
      return;
    }
    *c_begin = lo / kBC;
    *c_end = hi / kBC + 1;
  }
  // Query tiles [r_begin, r_end) that can see keys [c0, c1) structurally.
  void QueryTileRange(int64_t c0, int64_t c1, int64_t *r_begin, int64_t *r_end) const {
    int64_t first = 0, last = Sq - 1;
    if (causal) first = std::max<int64_t>(first, c0 - offset);                  // i + offset >= c0
    if (causal && band > 0) last = std::min<int64_t>(last, c1 - 1 - offset + band - 1);  // i+off-band+1 <= c1-1
    if (first > last) {
      *r_begin = *r_end = 0;
      return;
    }
    *r_begin = first / kBR;
    *r_end = last / kBR + 1;
  }
};

using ms_llm_kernels::NumThreads;

// Split tasks (with costs) into at most n_threads contiguous ranges of about equal cost; run fn(begin, end).
template <typename Fn>
void ParallelRanges(const std::vector<double> &cost, Fn fn) {
  const int64_t n = static_cast<int64_t>(cost.size());
  if (n == 0) return;
  const int n_threads = static_cast<int>(std::min<int64_t>(NumThreads(), n));
  if (n_threads <= 1) {
    fn(0, n);
    return;
  }
  double total = 0.0;
  for (double c : cost) total += c;
  std::vector<int64_t> bounds(1, 0);
  double acc = 0.0;
  for (int64_t t = 0; t < n && static_cast<int>(bounds.size()) < n_threads; ++t) {
    acc += cost[t];
    if (acc >= total * static_cast<double>(bounds.size()) / n_threads && t + 1 < n) bounds.push_back(t + 1);
  }
  bounds.push_back(n);
  std::vector<std::thread> workers;
  for (size_t i = 0; i + 1 < bounds.size(); ++i) {
    if (bounds[i] < bounds[i + 1]) workers.emplace_back(fn, bounds[i], bounds[i + 1]);
  }
  for (auto &w : workers) w.join();
}

// Copies rows [r0, r0 + rows) (of S) of head `head` of a q/k/v-shaped tensor (p's layout) into dst
// (rows_alloc x Dp), zero padded.
void LoadRows(const Problem &p, const void *src, int64_t head, int64_t S, int64_t r0, int64_t rows,
              int64_t rows_alloc, float *dst) {
  const int64_t D = p.D, Dp = p.Dp;
  std::fill(dst, dst + rows_alloc * Dp, 0.0f);
  for (int64_t r = 0; r < rows && r0 + r < S; ++r) {
    const int64_t off = p.RowOffset(head, r0 + r, S);
    float *d = dst + r * Dp;
    if (p.dt == DType::kF32) {
      std::memcpy(d, static_cast<const float *>(src) + off, sizeof(float) * D);
    } else {
      for (int64_t c = 0; c < D; ++c) d[c] = LoadElem(src, p.dt, off + c);
    }
  }
}

// valid (kBR x kBC) = 1/0 for rows [r0, r0 + nr) and keys [c0, c0 + kBC): structure times key mask.
// km is the batch's key mask as 1/0, zero padded to Skp.
void TileMask(const Problem &p, const float *km, int64_t r0, int nr, int64_t c0, float *valid) {
  std::fill(valid, valid + kBR * kBC, 0.0f);
  for (int r = 0; r < nr; ++r) {
    const int64_t lo = std::max<int64_t>(p.Lo(r0 + r) - c0, 0);
    const int64_t hi = std::min<int64_t>(p.Hi(r0 + r) - c0 + 1, kBC);
    float *vr = valid + r * kBC;
    for (int64_t c = lo; c < hi; ++c) vr[c] = km[c0 + c];
  }
}

// km (Skp) = key_mask[b] > 0.5 as 1/0 (the reference's threshold), zero padded.
void LoadKeyMask(const Problem &p, const float *kmask, int64_t b, float *km) {
  std::fill(km, km + p.Skp, 0.0f);
  for (int64_t j = 0; j < p.Sk; ++j) km[j] = kmask[b * p.Sk + j] > 0.5f ? 1.0f : 0.0f;
}

// ---------------------------------------------------------------- forward
template <bool kBias>
void ForwardRange(const Problem &p, const void *q, const void *k, const void *v, const float *kmask,
                  const float *bias, void *out, float *lse, int64_t t_begin, int64_t t_end) {
  const int64_t n_rt = p.Sqp / kBR;
  const int64_t Dp = p.Dp, Skp = p.Skp;
  std::vector<float> Kt(Dp * Skp), V(Skp * Dp), Q(kBR * Dp), O(kBR * Dp);
  std::vector<float> S(kBR * kBC), valid(kBR * kBC), m(kBR), l(kBR);
  const float scale = p.scale;
  std::vector<float> Ktmp(Skp * Dp), km(Skp);  // K rows before the transpose; key mask
  int64_t loaded = -1;
  for (int64_t t = t_begin; t < t_end; ++t) {
    const int64_t head = t / n_rt, rt = t % n_rt;
    if (head != loaded) {
      LoadKeyMask(p, kmask, head / p.H, km.data());
      LoadRows(p, k, head, p.Sk, 0, p.Sk, Skp, Ktmp.data());
      PackTransposedTiles(Ktmp.data(), Skp, Dp, Kt.data());
      LoadRows(p, v, head, p.Sk, 0, p.Sk, Skp, V.data());
      loaded = head;
    }
    const int64_t r0 = rt * kBR;
    const int nr = static_cast<int>(std::min<int64_t>(kBR, p.Sq - r0));
    const int mr = static_cast<int>(RoundUp(nr, kMR));  // GEMM rows: skip the padding rows of a short tile
    LoadRows(p, q, head, p.Sq, r0, nr, kBR, Q.data());
    std::fill(O.begin(), O.end(), 0.0f);
    std::fill(m.begin(), m.end(), kNegInf);
    std::fill(l.begin(), l.end(), 0.0f);
    int64_t cb, ce;
    p.KeyTileRange(r0, r0 + nr, &cb, &ce);
    for (int64_t ct = cb; ct < ce; ++ct) {
      const int64_t c0 = ct * kBC;
      const int nc = static_cast<int>(std::min<int64_t>(kBC, p.Sk - c0));  // real keys in this tile
      const int ncr = static_cast<int>(RoundUp(nc, kNR));                    // GEMM key columns
      std::fill(S.begin(), S.end(), 0.0f);
      GemmAcc(mr, ncr, static_cast<int>(Dp), Q.data(), Dp, Kt.data() + ct * Dp * kBC, kBC, S.data(),
              kBC);  // (BR, BC)
      TileMask(p, km.data(), r0, nr, c0, valid.data());
      for (int r = 0; r < nr; ++r) {
        float *sr = S.data() + r * kBC;
        const float *vr = valid.data() + r * kBC;
        if constexpr (kBias) {  // bias row of query r0 + r, keys c0 .. c0 + nc (never read past the row)
          const float *br = bias + (p.BiasHead(head) * p.Sq + r0 + r) * p.Sk + c0;
          for (int c = 0; c < nc; ++c) {
            const float sc = sr[c] * scale + br[c];
            sr[c] = vr[c] != 0.0f ? sc : kNegInf;
          }
          for (int c = nc; c < kBC; ++c) sr[c] = kNegInf;
        } else {
          for (int c = 0; c < kBC; ++c) {
            const float sc = sr[c] * scale;
            sr[c] = vr[c] != 0.0f ? sc : kNegInf;
          }
        }
        const float mx = RowMax(sr);
        if (mx == kNegInf) {  // nothing visible in this tile for this row
          std::fill(sr, sr + kBC, 0.0f);
          continue;
        }
        const float m_new = std::max(m[r], mx);
        const float alpha = m[r] == kNegInf ? 0.0f : std::exp(m[r] - m_new);
        for (int c = 0; c < kBC; ++c) {
          const float e = FastExp(sr[c] - m_new);
          sr[c] = vr[c] != 0.0f ? e : 0.0f;
        }
        l[r] = l[r] * alpha + RowSum(sr);
        m[r] = m_new;
        float *orow = O.data() + r * Dp;
        for (int64_t d = 0; d < Dp; ++d) orow[d] *= alpha;
      }
      for (int r = nr; r < kBR; ++r) std::fill(S.data() + r * kBC, S.data() + (r + 1) * kBC, 0.0f);
      GemmAcc(mr, static_cast<int>(Dp), ncr, S.data(), kBC, V.data() + c0 * Dp, Dp, O.data(), Dp);  // (BR, Dp)
    }
    for (int r = 0; r < nr; ++r) {
      const int64_t off = p.RowOffset(head, r0 + r, p.Sq);
      const float inv = l[r] > 0.0f ? 1.0f / l[r] : 0.0f;
      for (int64_t d = 0; d < p.D; ++d) StoreElem(out, p.dt, off + d, O[r * Dp + d] * inv);
      lse[head * p.Sq + r0 + r] = l[r] > 0.0f ? m[r] + std::log(l[r]) : kNegInf;
    }
  }
}

// ---------------------------------------------------------------- backward
// Backward tasks are groups (g, key tile) with g = b * H + h (one head) or, when the bias is shared by the batch
// (Bb = 1 < B), g = h covering every b: Problem::BackwardGroups() of them, each run for BatchesPerGroup() heads.
// dk/dv of a (head, key tile) belong to one task, and so does the dbias column strip of a group's key tile (the
// batch loop is outermost inside a thread's range, so each head is still loaded once per range); dq is
// accumulated per thread and flushed into a shared float32 buffer under a mutex when the thread moves to another
// head.
int64_t BackwardGroups(const Problem &p) { return (p.Bb == 1 ? p.H : p.B * p.H) * (p.Skp / kBC); }
int64_t BatchesPerGroup(const Problem &p) { return p.Bb == 1 ? p.B : 1; }

template <bool kBias>
void BackwardRange(const Problem &p, const void *q, const void *k, const void *v, const float *kmask,
                   const float *bias, const void *out, const void *dout, const float *lse, float *dq_acc,
                   std::mutex *dq_mutex, void *dk, void *dv, float *dbias, int64_t g_begin, int64_t g_end) {
  const int64_t n_ct = p.Skp / kBC;
  const int64_t Dp = p.Dp, Sqp = p.Sqp, Skp = p.Skp;
  std::vector<float> Q(Sqp * Dp), dO(Sqp * Dp), Ob(Sqp * Dp), K(Skp * Dp), Kt(Dp * Skp), V(Skp * Dp), Vt(Dp * Skp);
  std::vector<float> L(Sqp), Dd(Sqp), dQ(Sqp * Dp);
  std::vector<float> S(kBR * kBC), dP(kBR * kBC), T(kBC * kBR), valid(kBR * kBC), dK(kBC * Dp), dV(kBC * Dp);
  std::vector<float> km(Skp);
  const float scale = p.scale;
  const bool shared_bias = kBias && p.Bb == 1;  // groups are (h, key tile), the batch loop runs inside
  int64_t loaded = -1;
  auto flush = [&]() {
    if (loaded < 0) return;
    std::lock_guard<std::mutex> guard(*dq_mutex);
    for (int64_t i = 0; i < p.Sq; ++i) {
      float *dst = dq_acc + p.RowOffset(loaded, i, p.Sq);
      for (int64_t d = 0; d < p.D; ++d) dst[d] += dQ[i * Dp + d];
    }
  };
  for (int64_t bi = 0; bi < BatchesPerGroup(p); ++bi) {
    for (int64_t t = g_begin; t < g_end; ++t) {
      const int64_t g = t / n_ct, ct = t % n_ct;
      const int64_t head = shared_bias ? bi * p.H + g : g;
      if (head != loaded) {
        flush();
        LoadKeyMask(p, kmask, head / p.H, km.data());
        LoadRows(p, q, head, p.Sq, 0, p.Sq, Sqp, Q.data());
        LoadRows(p, dout, head, p.Sq, 0, p.Sq, Sqp, dO.data());
        LoadRows(p, out, head, p.Sq, 0, p.Sq, Sqp, Ob.data());
        LoadRows(p, k, head, p.Sk, 0, p.Sk, Skp, K.data());
        LoadRows(p, v, head, p.Sk, 0, p.Sk, Skp, V.data());
        PackTransposedTiles(K.data(), Skp, Dp, Kt.data());
        PackTransposedTiles(V.data(), Skp, Dp, Vt.data());
        for (int64_t i = 0; i < Sqp; ++i) {
          L[i] = i < p.Sq ? lse[head * p.Sq + i] : kNegInf;
          float acc = 0.0f;  // D_i = rowsum(dO_i * O_i)
          for (int64_t d = 0; d < Dp; ++d) acc += dO[i * Dp + d] * Ob[i * Dp + d];
          Dd[i] = acc;
        }
        std::fill(dQ.begin(), dQ.end(), 0.0f);
        loaded = head;
      }
      const int64_t c0 = ct * kBC;
      const int nc = static_cast<int>(std::min<int64_t>(kBC, p.Sk - c0));
      const int ncr = static_cast<int>(RoundUp(nc, kNR));  // GEMM key rows/columns: skip a short tile's padding
      int64_t rb, re;
      p.QueryTileRange(c0, std::min(c0 + kBC, p.Sk), &rb, &re);
      const float *bias_h = nullptr;
      float *dbias_h = nullptr;
      const bool first = bi == 0;  // first visit of this dbias strip: store, later batches accumulate
      if constexpr (kBias) {
        const int64_t off = p.BiasHead(head) * p.Sq * p.Sk;
        bias_h = bias + off;
        dbias_h = dbias + off;
        if (first) {  // rows the structure skips get no store below: zero them
          const int64_t lo = std::min(rb * kBR, p.Sq), hi = std::max(lo, std::min(re * kBR, p.Sq));
          for (int64_t i = 0; i < p.Sq; ++i) {
            if (i < lo || i >= hi) std::fill(dbias_h + i * p.Sk + c0, dbias_h + i * p.Sk + c0 + nc, 0.0f);
          }
        }
      }
      std::fill(dK.begin(), dK.end(), 0.0f);
      std::fill(dV.begin(), dV.end(), 0.0f);
      for (int64_t rt = rb; rt < re; ++rt) {
        const int64_t r0 = rt * kBR;
        const int nr = static_cast<int>(std::min<int64_t>(kBR, p.Sq - r0));
        const int mr = static_cast<int>(RoundUp(nr, kMR));
        const float *Qi = Q.data() + r0 * Dp;
        const float *dOi = dO.data() + r0 * Dp;
        std::fill(S.begin(), S.end(), 0.0f);
        GemmAcc(mr, ncr, static_cast<int>(Dp), Qi, Dp, Kt.data() + ct * Dp * kBC, kBC, S.data(), kBC);  // (BR, BC)
        std::fill(dP.begin(), dP.end(), 0.0f);
        GemmAcc(mr, ncr, static_cast<int>(Dp), dOi, Dp, Vt.data() + ct * Dp * kBC, kBC, dP.data(), kBC);  // (BR, BC)
        TileMask(p, km.data(), r0, nr, c0, valid.data());
        for (int r = 0; r < kBR; ++r) {
          float *sr = S.data() + r * kBC;   // becomes P
          float *dpr = dP.data() + r * kBC; // becomes dS * scale
          const float *vr = valid.data() + r * kBC;
          if (r >= nr || L[r0 + r] == kNegInf) {
            std::fill(sr, sr + kBC, 0.0f);
            std::fill(dpr, dpr + kBC, 0.0f);
            if constexpr (kBias) {
              if (r < nr && first) std::fill(dbias_h + (r0 + r) * p.Sk + c0, dbias_h + (r0 + r) * p.Sk + c0 + nc, 0.0f);
            }
            continue;
          }
          const float li = L[r0 + r], di = Dd[r0 + r];
          if constexpr (kBias) {  // dS = P (dP - D) is also d bias; only the tile's nc real keys are read/written
            const float *br = bias_h + (r0 + r) * p.Sk + c0;
            float *dbr = dbias_h + (r0 + r) * p.Sk + c0;
            for (int c = 0; c < nc; ++c) {
              const float e = FastExp(sr[c] * scale + br[c] - li);
              const float pc = vr[c] != 0.0f ? e : 0.0f;
              const float ds = pc * (dpr[c] - di);
              sr[c] = pc;
              dpr[c] = ds;
            }
            if (first) {
              for (int c = 0; c < nc; ++c) dbr[c] = dpr[c];
            } else {
              for (int c = 0; c < nc; ++c) dbr[c] += dpr[c];
            }
            for (int c = 0; c < nc; ++c) dpr[c] *= scale;
            std::fill(sr + nc, sr + kBC, 0.0f);
            std::fill(dpr + nc, dpr + kBC, 0.0f);
          } else {
            for (int c = 0; c < kBC; ++c) {
              const float e = FastExp(sr[c] * scale - li);
              const float pc = vr[c] != 0.0f ? e : 0.0f;
              sr[c] = pc;
              dpr[c] = pc * (dpr[c] - di) * scale;
            }
          }
        }
        Transpose(mr, ncr, S.data(), kBC, T.data(), kBR);                                           // P^T (BC, BR)
        GemmAcc(ncr, static_cast<int>(Dp), mr, T.data(), kBR, dOi, Dp, dV.data(), Dp);              // dV += P^T dO
        GemmAcc(mr, static_cast<int>(Dp), ncr, dP.data(), kBC, K.data() + c0 * Dp, Dp,
                dQ.data() + r0 * Dp, Dp);                                                            // dQ += dS K
        Transpose(mr, ncr, dP.data(), kBC, T.data(), kBR);                                          // dS^T (BC, BR)
        GemmAcc(ncr, static_cast<int>(Dp), mr, T.data(), kBR, Qi, Dp, dK.data(), Dp);               // dK += dS^T Q
      }
      for (int c = 0; c < nc; ++c) {
        const int64_t off = p.RowOffset(head, c0 + c, p.Sk);
        for (int64_t d = 0; d < p.D; ++d) {
          StoreElem(dk, p.dt, off + d, dK[c * Dp + d]);
          StoreElem(dv, p.dt, off + d, dV[c * Dp + d]);
        }
      }
    }
  }
  flush();
}

// ---------------------------------------------------------------- argument checking
bool SameShape(int nd_a, const int64_t *a, int nd_b, const int64_t *b) {
  if (nd_a != nd_b) return false;
  for (int i = 0; i < nd_a; ++i)
    if (a[i] != b[i]) return false;
  return true;
}

// Fills p from q, k, v, key_mask, params (indices 0..4) and checks the contract; false on a violation.
bool Setup(int *ndims, int64_t **shapes, const char **dtypes, void **params, Problem *p) {
  if (ndims[0] != 4 || ndims[1] != 4 || ndims[2] != 4 || ndims[3] != 2 || ndims[4] != 1) return false;
  p->dt = ParseDType(dtypes[0]);
  if (p->dt == DType::kBad || ParseDType(dtypes[1]) != p->dt || ParseDType(dtypes[2]) != p->dt) return false;
  if (ParseDType(dtypes[3]) != DType::kF32 || ParseDType(dtypes[4]) != DType::kF32) return false;
  if (!SameShape(4, shapes[1], 4, shapes[2]) || shapes[4][0] != 4) return false;
  const float *prm = static_cast<const float *>(params[4]);
  if (prm[3] != 0.0f && prm[3] != 1.0f) return false;
  p->bsnd = prm[3] == 1.0f;
  const int s_axis = p->bsnd ? 1 : 2, h_axis = p->bsnd ? 2 : 1;
  p->B = shapes[0][0];
  p->H = shapes[0][h_axis];
  p->Sq = shapes[0][s_axis];
  p->D = shapes[0][3];
  p->Sk = shapes[1][s_axis];
  if (shapes[1][0] != p->B || shapes[1][h_axis] != p->H || shapes[1][3] != p->D) return false;
  if (shapes[3][0] != p->B || shapes[3][1] != p->Sk) return false;
  if (p->Sq <= 0 || p->Sk <= 0 || p->D <= 0) return false;
  p->scale = prm[0];
  p->causal = prm[1] != 0.0f;
  p->band = static_cast<int64_t>(prm[2]);
  if (p->band < 0 || (p->band > 0 && !p->causal)) return false;
  p->Dp = RoundUp(p->D, kNR);
  p->Sqp = RoundUp(p->Sq, kBR);
  p->Skp = RoundUp(p->Sk, kBC);
  p->offset = p->Sk - p->Sq;
  return true;
}

// Checks the bias (index i): (1 or B, H, Sq, Sk) float32, and records its batch in p->Bb.
bool SetupBias(int *ndims, int64_t **shapes, const char **dtypes, int i, Problem *p) {
  if (ndims[i] != 4 || ParseDType(dtypes[i]) != DType::kF32) return false;
  const int64_t *s = shapes[i];
  if ((s[0] != 1 && s[0] != p->B) || s[1] != p->H || s[2] != p->Sq || s[3] != p->Sk) return false;
  p->Bb = s[0];
  return true;
}

}  // namespace

namespace {

// params: q, k, v, key_mask, params, [bias,] out, lse  (7 without a bias, 8 with one)
int Forward(bool has_bias, int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes) {
  if (nparam != (has_bias ? 8 : 7)) return 1;
  Problem p;
  if (!Setup(ndims, shapes, dtypes, params, &p)) return 2;
  if (has_bias && !SetupBias(ndims, shapes, dtypes, 5, &p)) return 2;
  const int io = has_bias ? 6 : 5;  // index of out; lse follows
  if (!SameShape(ndims[io], shapes[io], ndims[0], shapes[0]) || ParseDType(dtypes[io]) != p.dt) return 3;
  if (ndims[io + 1] != 3 || shapes[io + 1][0] != p.B || shapes[io + 1][1] != p.H || shapes[io + 1][2] != p.Sq)
    return 3;
  const int64_t n_rt = p.Sqp / kBR;
  std::vector<double> cost(p.B * p.H * n_rt);
  for (int64_t t = 0; t < static_cast<int64_t>(cost.size()); ++t) {
    const int64_t r0 = (t % n_rt) * kBR;
    int64_t cb, ce;
    p.KeyTileRange(r0, std::min(r0 + kBR, p.Sq), &cb, &ce);
    cost[t] = 1.0 + static_cast<double>(ce - cb);
  }
  const float *kmask = static_cast<const float *>(params[3]);
  const float *bias = has_bias ? static_cast<const float *>(params[5]) : nullptr;
  float *lse = static_cast<float *>(params[io + 1]);
  ParallelRanges(cost, [&](int64_t begin, int64_t end) {
    if (has_bias) {
      ForwardRange<true>(p, params[0], params[1], params[2], kmask, bias, params[io], lse, begin, end);
    } else {
      ForwardRange<false>(p, params[0], params[1], params[2], kmask, nullptr, params[io], lse, begin, end);
    }
  });
  return 0;
}

// params: q, k, v, key_mask, params, [bias,] out, dout, lse, dq, dk, dv[, dbias]  (11 without a bias, 13 with)
int Backward(bool has_bias, int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes) {
  if (nparam != (has_bias ? 13 : 11)) return 1;
  Problem p;
  if (!Setup(ndims, shapes, dtypes, params, &p)) return 2;
  if (has_bias && !SetupBias(ndims, shapes, dtypes, 5, &p)) return 2;
  const int o = has_bias ? 1 : 0;  // shift of the indices after the bias
  for (int i : {5 + o, 6 + o, 8 + o}) {  // out, dout, dq
    if (!SameShape(ndims[i], shapes[i], ndims[0], shapes[0]) || ParseDType(dtypes[i]) != p.dt) return 3;
  }
  for (int i : {9 + o, 10 + o}) {  // dk, dv
    if (!SameShape(ndims[i], shapes[i], ndims[1], shapes[1]) || ParseDType(dtypes[i]) != p.dt) return 3;
  }
  const int il = 7 + o;  // lse
  if (ndims[il] != 3 || shapes[il][0] != p.B || shapes[il][1] != p.H || shapes[il][2] != p.Sq ||
      ParseDType(dtypes[il]) != DType::kF32)
    return 3;
  if (has_bias && (!SameShape(ndims[12], shapes[12], ndims[5], shapes[5]) || ParseDType(dtypes[12]) != DType::kF32))
    return 3;
  const int64_t n_ct = p.Skp / kBC;
  const int64_t per_group = BatchesPerGroup(p);
  std::vector<double> cost(BackwardGroups(p));
  for (int64_t t = 0; t < static_cast<int64_t>(cost.size()); ++t) {
    const int64_t c0 = (t % n_ct) * kBC;
    int64_t rb, re;
    p.QueryTileRange(c0, std::min(c0 + kBC, p.Sk), &rb, &re);
    cost[t] = static_cast<double>(per_group) * (1.0 + 2.5 * static_cast<double>(re - rb));
  }
  // dq accumulates in float32 (the output itself when float32, a scratch buffer otherwise).
  const int64_t n_q = p.B * p.H * p.Sq * p.D;
  std::vector<float> dq_scratch;
  float *dq_acc;
  if (p.dt == DType::kF32) {
    dq_acc = static_cast<float *>(params[8 + o]);
  } else {
    dq_scratch.resize(n_q);
    dq_acc = dq_scratch.data();
  }
  std::fill(dq_acc, dq_acc + n_q, 0.0f);
  std::mutex dq_mutex;
  const float *kmask = static_cast<const float *>(params[3]);
  const float *lse = static_cast<const float *>(params[il]);
  void *out = params[5 + o], *dout = params[6 + o], *dk = params[9 + o], *dv = params[10 + o];
  ParallelRanges(cost, [&](int64_t begin, int64_t end) {
    if (has_bias) {
      BackwardRange<true>(p, params[0], params[1], params[2], kmask, static_cast<const float *>(params[5]), out,
                          dout, lse, dq_acc, &dq_mutex, dk, dv, static_cast<float *>(params[12]), begin, end);
    } else {
      BackwardRange<false>(p, params[0], params[1], params[2], kmask, nullptr, out, dout, lse, dq_acc, &dq_mutex,
                           dk, dv, nullptr, begin, end);
    }
  });
  if (p.dt != DType::kF32) {
    for (int64_t i = 0; i < n_q; ++i) StoreElem(params[8 + o], p.dt, i, dq_acc[i]);
  }
  return 0;
}

}  // namespace

FA_EXPORT int FlashAttentionFwd(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                                void *stream, void *extra) {
  (void)stream;
  (void)extra;
  return Forward(false, nparam, params, ndims, shapes, dtypes);
}

FA_EXPORT int FlashAttentionBwd(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                                void *stream, void *extra) {
  (void)stream;
  (void)extra;
  return Backward(false, nparam, params, ndims, shapes, dtypes);
}

FA_EXPORT int FlashAttentionBiasFwd(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                                    void *stream, void *extra) {
  (void)stream;
  (void)extra;
  return Forward(true, nparam, params, ndims, shapes, dtypes);
}

FA_EXPORT int FlashAttentionBiasBwd(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                                    void *stream, void *extra) {
  (void)stream;
  (void)extra;
  return Backward(true, nparam, params, ndims, shapes, dtypes);
}

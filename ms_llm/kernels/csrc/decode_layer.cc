// One pre-norm GPT decoder layer for one new token per sequence against its KV cache, as a single CPU kernel:
// the decode step of small-batch generation, called by MindSpore through ops.Custom(..., func_type="aot").
// Contract (shapes, dtypes, semantics): ascend_kernels/decode_layer/README.md; reference: the composite
// TransformerBlock.construct_decode (ms_llm/layers/block.py) and DecodeLayerReference (ms_llm/kernels/decode_layer.py).
//
// DecodeLayer(x, ln1_w, ln1_b, wq, bq, wk, bk, wv, bv, wo, bo, ln2_w, ln2_b, w1, b1, w2, b2,
//             k_cache, v_cache, key_mask, slot, params) -> (y, k_new, v_new)
//   x (B, 1, H); LayerNorm weights (H); wq (nh*hd, H), wk / wv (nkv*hd, H), wo (H, nh*hd), w1 (F, H), w2 (H, F)
//   with their biases (rows); k_cache / v_cache (B, nkv, L, hd); key_mask (B, L) (1 = the new token may attend to
//   that slot, its own included); slot (1,) int32 (where the new keys/values belong); params (3,) =
//   [LayerNorm epsilon, attention scale, activation: 0 relu, 1 gelu (erf), 2 gelu_new (tanh)].
//   h = LN1(x); q, k, v = h Wq^T + bq, ...; a = softmax(q k^T * scale over the visible slots, where slot `slot`
//   holds this step's k, v) v (a row with no visible slot gives 0); x1 = x + a Wo^T + bo;
//   y = x1 + act(LN2(x1) W1^T + b1) W2^T + b2.  k_new, v_new (B, nkv, 1, hd) are this step's keys/values: the
//   caller adds them into the caches (the kernel only reads the caches, and never slot `slot` of them).
//   All float32 (slot int32).
//
// Why: at batch 1 a decode step of GPT-3 Small is ~30 small MindSpore kernels per layer (norms, 4 projections with
// bias adds, head reshapes, two batched matmuls, mask select, softmax, residual adds, the activation), and on CPU
// each costs a few microseconds of runtime besides its work; one call per layer keeps only the weight streaming,
// which is the real cost (28 MB of float32 weights per layer and token).  Projections use the GEMV tile of
// gemv_tile.h (each weight row read once, all B dot products while it is in L1).
// Threads: a team of up to NumThreads() (the caller included) works through the phases QKV -> attention -> Wo ->
// LN2 -> W1 -> W2, separated by spinning barriers (a phase needs all of the previous one's output); inside a phase
// the threads take chunks of weight rows (or (sequence, head) pairs) from an atomic counter, so a descheduled thread
// does not hold up the others.  Layers below kMinElemsForThreads weight elements run on the calling thread.

#include <sched.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <thread>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#include "gemv_tile.h"
#include "kernel_common.h"

#define DL_EXPORT extern "C" __attribute__((visibility("default")))

namespace {

using ms_llm_kernels::IsFloat32;
using ms_llm_kernels::IsInt32;
using ms_llm_kernels::NumThreads;
using ms_llm_kernels::gemv_tile::RunRows;

constexpr int kMaxThreads = 8;
constexpr int64_t kMinElemsForThreads = int64_t{1} << 20;  // weight elements of a layer worth a second thread
constexpr int64_t kChunkElems = int64_t{1} << 16;          // weight elements per chunk handed to a thread
constexpr int kNumInputs = 22;

inline void CpuRelax() {
#if defined(__x86_64__) || defined(__i386__)
  _mm_pause();
#else
  std::this_thread::yield();
#endif
}

// Sense-reversing spin barrier for a fixed team; yields after a while so an oversubscribed machine still progresses.
class Barrier {
 public:
  explicit Barrier(int n) : n_(n) {}
  void Wait() {
    const int gen = gen_.load(std::memory_order_acquire);
    if (count_.fetch_add(1, std::memory_order_acq_rel) + 1 == n_) {
      count_.store(0, std::memory_order_relaxed);
      gen_.store(gen + 1, std::memory_order_release);
      return;
    }
    for (int spins = 0; gen_.load(std::memory_order_acquire) == gen; ++spins) {
      if (spins < 4096) {
        CpuRelax();
      } else {
        std::this_thread::yield();
      }
    }
  }

 private:
  const int n_;
  std::atomic<int> count_{0};
  std::atomic<int> gen_{0};
};

struct Layer {
  int64_t B, H, nh, nkv, hd, L, F, slot;
  float eps, scale;
  int act;
  const float *x, *ln1_w, *ln1_b, *wq, *bq, *wk, *bk, *wv, *bv, *wo, *bo, *ln2_w, *ln2_b, *w1, *b1, *w2, *b2;
  const float *k_cache, *v_cache, *key_mask;
  float *y, *k_new, *v_new;
  // scratch
  float *h;     // (B, H) LN1(x), then LN2(x1)
  float *q;     // (B, nh*hd)
  float *attn;  // (B, nh*hd)
  float *x1;    // (B, H)
  float *u;     // (B, F)
};

void LayerNormRows(const float *x, int64_t B, int64_t H, const float *w, const float *b, float eps, float *out) {
  for (int64_t r = 0; r < B; ++r) {
    const float *xr = x + r * H;
    float mean = 0.f;
    for (int64_t i = 0; i < H; ++i) mean += xr[i];
    mean /= static_cast<float>(H);
    float var = 0.f;
    for (int64_t i = 0; i < H; ++i) {
      const float d = xr[i] - mean;
      var += d * d;
    }
    var /= static_cast<float>(H);
    const float inv = 1.0f / std::sqrt(var + eps);
    float *o = out + r * H;
    for (int64_t i = 0; i < H; ++i) o[i] = (xr[i] - mean) * inv * w[i] + b[i];
  }
}

inline float Activate(float v, int act) {
  switch (act) {
    case 0: return v > 0.f ? v : 0.f;
    case 1: return 0.5f * v * (1.0f + std::erf(v * 0.70710678118654752f));
    default: return v / (1.0f + std::exp(-v * (1.5957691216057308f + 0.0713548162726009f * v * v)));
  }
}

// One projection's rows [r0, r1): out[b, r] = in[b] . w[r] + bias[r] (+ res[b, r]), then the activation if act >= 0.
void ProjectRows(const float *in, int64_t B, const float *w, int64_t K, const float *bias, int64_t N, int64_t r0,
                 int64_t r1, float *out, const float *res, int act) {
  RunRows(in, B, w, K, out, N, r0, r1);
  for (int64_t b = 0; b < B; ++b) {
    float *o = out + b * N;
    const float *rr = res != nullptr ? res + b * N : nullptr;
    for (int64_t r = r0; r < r1; ++r) {
      float v = o[r] + bias[r];
      if (rr != nullptr) v += rr[r];
      o[r] = act >= 0 ? Activate(v, act) : v;
    }
  }
}

// A phase's work items: chunks of rows of up to three projections (QKV) or (sequence, head) pairs (attention).
struct Proj {
  const float *in, *w, *bias, *res;
  int64_t K, N;
  float *out;
  int act;
  int64_t rows_per_chunk, chunks;
};

Proj MakeProj(const float *in, const float *w, int64_t K, const float *bias, int64_t N, float *out, const float *res,
              int act) {
  int64_t rows = std::max<int64_t>(16, kChunkElems / std::max<int64_t>(K, 1) / 16 * 16);
  return Proj{in, w, bias, res, K, N, out, act, rows, (N + rows - 1) / rows};
}

// Runs chunks of `projs` (one counter over all of them) until none is left.
void RunProjs(const Layer &l, const Proj *projs, int n, std::atomic<int64_t> *next) {
  int64_t total = 0;
  for (int i = 0; i < n; ++i) total += projs[i].chunks;
  for (int64_t c = next->fetch_add(1, std::memory_order_relaxed); c < total;
       c = next->fetch_add(1, std::memory_order_relaxed)) {
    int i = 0;
    int64_t cc = c;
    while (cc >= projs[i].chunks) cc -= projs[i++].chunks;
    const Proj &p = projs[i];
    const int64_t r0 = cc * p.rows_per_chunk, r1 = std::min(p.N, r0 + p.rows_per_chunk);
    ProjectRows(p.in, l.B, p.w, p.K, p.bias, p.N, r0, r1, p.out, p.res, p.act);
  }
}

// softmax(q k^T * scale) v of one (sequence, query head) over the visible slots; scores: L floats of scratch.
void AttendHead(const Layer &l, int64_t b, int64_t head, float *scores) {
  const int64_t g = head / (l.nh / l.nkv);
  const float *q = l.q + (b * l.nh + head) * l.hd;
  const float *mask = l.key_mask + b * l.L;
  const float *kc = l.k_cache + (b * l.nkv + g) * l.L * l.hd;
  const float *vc = l.v_cache + (b * l.nkv + g) * l.L * l.hd;
  const float *kn = l.k_new + (b * l.nkv + g) * l.hd;
  const float *vn = l.v_new + (b * l.nkv + g) * l.hd;
  float *out = l.attn + (b * l.nh + head) * l.hd;
  float mx = -std::numeric_limits<float>::infinity();
  for (int64_t j = 0; j < l.L; ++j) {
    if (!(mask[j] > 0.5f)) continue;
    const float *k = j == l.slot ? kn : kc + j * l.hd;
    float s = 0.f;
    for (int64_t d = 0; d < l.hd; ++d) s += q[d] * k[d];
    s *= l.scale;
    scores[j] = s;
    mx = std::max(mx, s);
  }
  for (int64_t d = 0; d < l.hd; ++d) out[d] = 0.f;
  if (mx == -std::numeric_limits<float>::infinity()) return;  // no visible slot: 0, as the reference
  float sum = 0.f;
  for (int64_t j = 0; j < l.L; ++j) {
    if (!(mask[j] > 0.5f)) continue;
    const float p = std::exp(scores[j] - mx);
    sum += p;
    const float *v = j == l.slot ? vn : vc + j * l.hd;
    for (int64_t d = 0; d < l.hd; ++d) out[d] += p * v[d];
  }
  const float inv = 1.0f / sum;
  for (int64_t d = 0; d < l.hd; ++d) out[d] *= inv;
}

struct Team {
  Barrier barrier;
  std::atomic<int64_t> next[5];
  explicit Team(int n) : barrier(n) {
    for (auto &c : next) c.store(0);
  }
};

// Everything after LN1(x) (done by the caller before the team starts); every thread of the team runs this.
void RunLayer(const Layer &l, Team *team, int tid, int n_threads) {
  const int64_t nq = l.nh * l.hd, nk = l.nkv * l.hd;
  const Proj qkv[3] = {MakeProj(l.h, l.wq, l.H, l.bq, nq, l.q, nullptr, -1),
                       MakeProj(l.h, l.wk, l.H, l.bk, nk, l.k_new, nullptr, -1),
                       MakeProj(l.h, l.wv, l.H, l.bv, nk, l.v_new, nullptr, -1)};
  RunProjs(l, qkv, 3, &team->next[0]);
  if (n_threads > 1) team->barrier.Wait();

  std::vector<float> scores(static_cast<size_t>(l.L));
  const int64_t pairs = l.B * l.nh;
  for (int64_t p = team->next[1].fetch_add(1, std::memory_order_relaxed); p < pairs;
       p = team->next[1].fetch_add(1, std::memory_order_relaxed)) {
    AttendHead(l, p / l.nh, p % l.nh, scores.data());
  }
  if (n_threads > 1) team->barrier.Wait();

  const Proj o = MakeProj(l.attn, l.wo, nq, l.bo, l.H, l.x1, l.x, -1);  // x1 = x + attn Wo^T + bo
  RunProjs(l, &o, 1, &team->next[2]);
  if (n_threads > 1) team->barrier.Wait();

  if (tid == 0) LayerNormRows(l.x1, l.B, l.H, l.ln2_w, l.ln2_b, l.eps, l.h);
  if (n_threads > 1) team->barrier.Wait();

  const Proj up = MakeProj(l.h, l.w1, l.H, l.b1, l.F, l.u, nullptr, l.act);
  RunProjs(l, &up, 1, &team->next[3]);
  if (n_threads > 1) team->barrier.Wait();

  const Proj down = MakeProj(l.u, l.w2, l.F, l.b2, l.H, l.y, l.x1, -1);  // y = x1 + u W2^T + b2
  RunProjs(l, &down, 1, &team->next[4]);
}

bool Shape(int *ndims, int64_t **shapes, int i, std::initializer_list<int64_t> dims) {
  if (ndims[i] != static_cast<int>(dims.size())) return false;
  int d = 0;
  for (int64_t v : dims) {
    if (shapes[i][d++] != v) return false;
  }
  return true;
}

}  // namespace

// Return codes: 0 ok; 1 wrong parameter count; 2 shapes disagree with the contract; 3 a dtype is not float32
// (slot: int32); 4 slot outside [0, L); 5 params invalid (activation code, heads not a multiple of kv heads).
DL_EXPORT int DecodeLayer(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *stream,
                          void *extra) {
  (void)stream;
  (void)extra;
  if (nparam != kNumInputs + 3) return 1;
  if (ndims[0] != 3 || shapes[0][1] != 1 || ndims[17] != 4) return 2;
  const int64_t B = shapes[0][0], H = shapes[0][2];
  const int64_t nkv = shapes[17][1], L = shapes[17][2], hd = shapes[17][3];
  if (ndims[3] != 2 || ndims[13] != 2 || hd <= 0 || nkv <= 0 || shapes[3][0] % hd != 0) return 2;
  const int64_t nh = shapes[3][0] / hd, F = shapes[13][0];
  if (nh % nkv != 0) return 5;
  const int64_t nq = nh * hd, nk = nkv * hd;
  const bool ok =
      Shape(ndims, shapes, 1, {H}) && Shape(ndims, shapes, 2, {H}) && Shape(ndims, shapes, 3, {nq, H}) &&
      Shape(ndims, shapes, 4, {nq}) && Shape(ndims, shapes, 5, {nk, H}) && Shape(ndims, shapes, 6, {nk}) &&
      Shape(ndims, shapes, 7, {nk, H}) && Shape(ndims, shapes, 8, {nk}) && Shape(ndims, shapes, 9, {H, nq}) &&
      Shape(ndims, shapes, 10, {H}) && Shape(ndims, shapes, 11, {H}) && Shape(ndims, shapes, 12, {H}) &&
      Shape(ndims, shapes, 13, {F, H}) && Shape(ndims, shapes, 14, {F}) && Shape(ndims, shapes, 15, {H, F}) &&
      Shape(ndims, shapes, 16, {H}) && Shape(ndims, shapes, 17, {B, nkv, L, hd}) &&
      Shape(ndims, shapes, 18, {B, nkv, L, hd}) && Shape(ndims, shapes, 19, {B, L}) && Shape(ndims, shapes, 20, {1}) &&
      Shape(ndims, shapes, 21, {3}) && Shape(ndims, shapes, 22, {B, 1, H}) &&
      Shape(ndims, shapes, 23, {B, nkv, 1, hd}) && Shape(ndims, shapes, 24, {B, nkv, 1, hd});
  if (!ok) return 2;
  for (int i = 0; i < nparam; ++i) {
    if (i == 20 ? !IsInt32(dtypes[i]) : !IsFloat32(dtypes[i])) return 3;
  }
  const int32_t slot = *static_cast<const int32_t *>(params[20]);
  if (slot < 0 || slot >= L) return 4;
  const float *prm = static_cast<const float *>(params[21]);
  const int act = static_cast<int>(prm[2]);
  if (act < 0 || act > 2 || static_cast<float>(act) != prm[2]) return 5;
  if (B == 0) return 0;

  auto f = [&](int i) { return static_cast<const float *>(params[i]); };
  std::vector<float> scratch(static_cast<size_t>(B * (H + 2 * nh * hd + H + F)));
  Layer l{B, H, nh, nkv, hd, L, F, slot, prm[0], prm[1], act,
          f(0), f(1), f(2), f(3), f(4), f(5), f(6), f(7), f(8), f(9), f(10), f(11), f(12), f(13), f(14), f(15), f(16),
          f(17), f(18), f(19),
          static_cast<float *>(params[22]), static_cast<float *>(params[23]), static_cast<float *>(params[24]),
          nullptr, nullptr, nullptr, nullptr, nullptr};
  l.h = scratch.data();
  l.q = l.h + B * H;
  l.attn = l.q + B * nh * hd;
  l.x1 = l.attn + B * nh * hd;
  l.u = l.x1 + B * H;

  LayerNormRows(l.x, B, H, l.ln1_w, l.ln1_b, l.eps, l.h);
  const int64_t weights = (nh + 2 * nkv) * hd * H + nh * hd * H + 2 * F * H;
  const int n = weights < kMinElemsForThreads ? 1 : std::max(1, std::min(NumThreads(), kMaxThreads));
  Team team(n);
  std::vector<std::thread> workers;
  workers.reserve(static_cast<size_t>(n - 1));
  for (int t = 1; t < n; ++t) workers.emplace_back([&, t] { RunLayer(l, &team, t, n); });
  RunLayer(l, &team, 0, n);
  for (auto &th : workers) th.join();
  return 0;
}

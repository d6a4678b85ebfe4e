// Fused token-choice MoE routing (top-k + GShard capacity positions + expert slot tables) for the CPU, called by
// MindSpore through ops.Custom(..., func_type="aot").  Shape/dtype contract: ascend_kernels/moe_routing/README.md.
//
// MoeRouteTopK(probs, spec) -> (expert_index, position, kept, slot_token, slot_choice)
//   probs (G, T, E) float32: router probabilities of G routing groups of T tokens over E experts;
//   spec (k, C) int32: only its shape is read (k choices per token, C slots per expert);
//   expert_index (G, T, k) int32: the k largest probabilities of each token, largest first; equal values rank
//     the lower expert index first (ops.topk on CPU leaves the order of ties unspecified);
//   position (G, T, k) int32: the slot of each choice inside its expert, GShard order: all first choices of the
//     group in token order, then all second choices, ...; positions count every earlier request, kept or not;
//   kept (G, T, k) float32: 1.0 iff position < C, else 0.0 (the choice is dropped);
//   slot_token (G, E, C) int32: token (inside its group) in each slot, 0 for an empty slot;
//   slot_choice (G, E, C) int32: flat choice index t * k + j of the slot's occupant, T * k for an empty slot
//     (so a gather from the (T * k) combine weights padded with one trailing 0 gives the slot weight).
//
// Work: pass 1 selects the top k of every token row (one read of probs; an insertion into a k-entry sorted list,
// compare-only for k = 1); pass 2 walks each group's (T, k) choices once in GShard order with one E-entry counter
// array, writing position/kept and the slot tables; unused slots are filled per expert afterwards (no memset of
// the tables).  Pass 1 is split over token ranges, pass 2 over groups, across std::threads (one per CPU in the
// affinity mask) when there is enough work to amortise starting them.  No allocation per token.

#include <sched.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>

#include "kernel_common.h"

#define MR_EXPORT extern "C" __attribute__((visibility("default")))

namespace {

constexpr int kMaxK = 64;                 // top-k list kept on the stack
constexpr int64_t kMinWorkPerThread = 1 << 17;  // probabilities read (pass 1) or choices walked (pass 2)

using ms_llm_kernels::IsInt32;
using ms_llm_kernels::NumThreads;

// Run fn(begin, end) over [0, n) in contiguous ranges; `work` is the total cost, one thread per kMinWorkPerThread.
template <typename Fn>
void ParallelFor(int64_t n, int64_t work, Fn fn) {
  if (n <= 0) return;
  int64_t n_threads = std::min<int64_t>(NumThreads(), std::max<int64_t>(1, work / kMinWorkPerThread));
  n_threads = std::min<int64_t>(n_threads, n);
  if (n_threads <= 1) {
    fn(int64_t{0}, n);
    return;
  }
  std::vector<std::thread> workers;
  workers.reserve(static_cast<size_t>(n_threads - 1));
  const int64_t chunk = (n + n_threads - 1) / n_threads;
  for (int64_t b = chunk; b < n; b += chunk) workers.emplace_back(fn, b, std::min(n, b + chunk));
  fn(int64_t{0}, std::min(n, chunk));
  for (auto &w : workers) w.join();
}

// Top-k of one row of E probabilities into idx[0..k), largest first, equal values: lower index first.
inline void TopKRow(const float *row, int64_t E, int k, int32_t *idx) {
  if (k == 1) {
    float best = row[0];
    int32_t arg = 0;
    for (int64_t e = 1; e < E; ++e) {
      if (row[e] > best) {  // strict: the first of equal maxima wins
        best = row[e];
        arg = static_cast<int32_t>(e);
      }
    }
    idx[0] = arg;
    return;
  }
  if (k == 2) {
    float v0 = row[0], v1 = row[1];
    int32_t i0 = 0, i1 = 1;
    if (v1 > v0) {
      std::swap(v0, v1);
      std::swap(i0, i1);
    }
    for (int64_t e = 2; e < E; ++e) {
      const float v = row[e];
      if (v > v1) {
        if (v > v0) {
          v1 = v0;
          i1 = i0;
          v0 = v;
          i0 = static_cast<int32_t>(e);
        } else {
          v1 = v;
          i1 = static_cast<int32_t>(e);
        }
      }
    }
    idx[0] = i0;
    idx[1] = i1;
    return;
  }
  float val[kMaxK];
  int n = 0;
  for (int64_t e = 0; e < E; ++e) {
    const float v = row[e];
    if (n == k && !(v > val[k - 1])) continue;
    int p = n < k ? n : k - 1;  // insertion point: after every kept value >= v (stable for ties)
    while (p > 0 && v > val[p - 1]) {
      val[p] = val[p - 1];
      idx[p] = idx[p - 1];
      --p;
    }
    val[p] = v;
    idx[p] = static_cast<int32_t>(e);
    if (n < k) ++n;
  }
}

}  // namespace

// params: probs, spec, expert_index, position, kept, slot_token, slot_choice
MR_EXPORT int MoeRouteTopK(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                           void *stream, void *extra) {
  (void)stream;
  (void)extra;
  if (nparam != 7) return 1;
  if (ndims[0] != 3 || ndims[1] != 2 || std::strcmp(dtypes[0], "float32") != 0) return 2;
  const int64_t G = shapes[0][0], T = shapes[0][1], E = shapes[0][2];
  const int64_t K = shapes[1][0], C = shapes[1][1];
  if (G < 1 || T < 1 || E < 1 || K < 1 || K > E || K > kMaxK || C < 1) return 3;
  for (int i = 2; i <= 4; ++i) {
    if (ndims[i] != 3 || shapes[i][0] != G || shapes[i][1] != T || shapes[i][2] != K) return 4;
  }
  for (int i = 5; i <= 6; ++i) {
    if (ndims[i] != 3 || shapes[i][0] != G || shapes[i][1] != E || shapes[i][2] != C) return 4;
  }
  if (!IsInt32(dtypes[2]) || !IsInt32(dtypes[3]) || std::strcmp(dtypes[4], "float32") != 0 || !IsInt32(dtypes[5]) ||
      !IsInt32(dtypes[6])) {
    return 5;
  }
  const float *probs = static_cast<const float *>(params[0]);
  int32_t *expert_index = static_cast<int32_t *>(params[2]);
  int32_t *position = static_cast<int32_t *>(params[3]);
  float *kept = static_cast<float *>(params[4]);
  int32_t *slot_token = static_cast<int32_t *>(params[5]);
  int32_t *slot_choice = static_cast<int32_t *>(params[6]);
  const int k = static_cast<int>(K);

  // pass 1: top-k of every token (rows are independent)
  ParallelFor(G * T, G * T * E, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) TopKRow(probs + r * E, E, k, expert_index + r * K);
  });

  // pass 2: capacity positions and slot tables, one walk per group in GShard order
  const int32_t empty_choice = static_cast<int32_t>(T * K);
  ParallelFor(G, G * T * K, [&](int64_t g0, int64_t g1) {
    std::vector<int32_t> count(static_cast<size_t>(E));
    for (int64_t g = g0; g < g1; ++g) {
      std::fill(count.begin(), count.end(), 0);
      const int32_t *ei = expert_index + g * T * K;
      int32_t *pos = position + g * T * K;
      float *kp = kept + g * T * K;
      int32_t *st = slot_token + g * E * C;
      int32_t *sc = slot_choice + g * E * C;
      for (int64_t j = 0; j < K; ++j) {
        for (int64_t t = 0; t < T; ++t) {
          const int64_t i = t * K + j;
          const int32_t e = ei[i];
          const int32_t p = count[e]++;
          pos[i] = p;
          if (p < C) {
            kp[i] = 1.0f;
            st[e * C + p] = static_cast<int32_t>(t);
            sc[e * C + p] = static_cast<int32_t>(i);
          } else {
            kp[i] = 0.0f;
          }
        }
      }
      for (int64_t e = 0; e < E; ++e) {
        for (int64_t c = std::min<int64_t>(count[e], C); c < C; ++c) {
          st[e * C + c] = 0;
          sc[e * C + c] = empty_choice;
        }
      }
    }
  });
  return 0;
}

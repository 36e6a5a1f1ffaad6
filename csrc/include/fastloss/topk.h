// The running top-k of softmax_topk, shared by the CPU and CUDA kernels (__host__ __device__).
//
// softmax is monotone, so the k largest probabilities sit at the k largest logits: a row's top-k is kept on the
// logits while the same pass carries the online normaliser (m, d) (Milakov & Gimelshein, section 5), and only the
// k winners are exponentiated at the end: p_i = exp(x_i - lse).
//
// Ranking (torch.topk's order on the probabilities, with ties made deterministic): NaN above every number, then
// larger values first; among equal values (and among NaNs) the smaller index first.
#pragma once

#include <cstdint>

#include "fastloss/math.h"

namespace fastloss {
namespace math {
inline namespace FL_ISA_NAMESPACE {

// Is (a, ia) ranked before (b, ib)?
template <class T>
FL_HD bool topk_before(T a, int64_t ia, T b, int64_t ib) {
  const bool na = a != a, nb = b != b;
  if (na || nb) return na && (!nb || ia < ib);
  return a > b || (a == b && ia < ib);
}

// A best-first list of at most k (value, index) pairs over storage the caller owns. Elements must be pushed in
// increasing index order (one row scanned left to right, or one thread's strided share of it): a newcomer then
// loses every tie against what is already listed, which is what keeps `admits` a single comparison.
template <class T>
struct TopKList {
  T* val;
  int64_t* idx;
  int64_t k;
  int64_t n;

  FL_HD TopKList(T* v, int64_t* i, int64_t cap) : val(v), idx(i), k(cap), n(0) {}

  // Could a value with a larger index than everything listed still enter?
  FL_HD bool admits(T v) const {
    if (n < k) return true;
    const T w = val[k - 1];
    return (v != v) ? (w == w) : (v > w);
  }

  FL_HD void push(T v, int64_t i) {
    if (k == 0 || !admits(v)) return;
    int64_t p = n < k ? n : k - 1;  // the slot to fill; a full list drops its last entry
    while (p > 0 && topk_before(v, i, val[p - 1], idx[p - 1])) {
      val[p] = val[p - 1];
      idx[p] = idx[p - 1];
      --p;
    }
    val[p] = v;
    idx[p] = i;
    if (n < k) ++n;
  }
};

// Probability of a listed logit given the row's lse. A row whose lse is not finite (all -inf, a +inf, a NaN) has
// no finite softmax: torch.softmax gives NaN for every entry there, and so does this.
template <class T>
FL_HD T topk_probability(T v, double lse) {
  if (!(lse - lse == 0.0)) return T(lse - lse);  // NaN for +-inf and NaN
  return T(::exp(double(v) - lse));
}

}  // namespace FL_ISA_NAMESPACE
}  // namespace math
}  // namespace fastloss

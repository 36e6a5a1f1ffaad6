// fastloss/policy_math.h: the per-element math of the distillation and RL-policy kernels, shared by the CPU and
// CUDA kernels (templates over a value type with an Ops<V> policy, as fastloss/math.h).
//
// Every quantity is a softmax reduction that one pass can carry beside the online normaliser (m, d):
//
//  * entropy of softmax(z): the state (m, d, w) with w = sum_i e^(z_i - m) (z_i - m). When m grows to m',
//    d' = r d and w' = r (w + (m - m') d) with r = e^(m - m'); then H = log d - w / d. Kept relative to the
//    running max, a one-hot row (logits near 1e30, say) gives w = 0 and H = 0 exactly.
//  * TRL's per-token statistics (token_logprobs_fwd with stats): the entropy state grown by q = sum e^(2 (z - m))
//    (rescaled by r^2) and s = sum z, so log sum p^2 = log q - 2 log d and mean z = s / V; the argmax of the raw
//    logits as a (best value, first index) pair per thread or SIMD pass, merged with ties to the smaller index.
//  * the distillation forward's student normaliser grown the same way by w (distill_fwd with student_entropy: the
//    entropy of softmax(student / T) from the same pass), its m and d computed exactly as without w.
//  * KL(a || b) of two rows of logits: the state (m, d, u) of a with u = sum_i e^(a_i - m) (a_i - b_i) (rescaled
//    by r only), and the plain (m, d) of b: KL = u / d_a - lse_a + lse_b. Terms with e^(a_i - m) = 0 count 0
//    (a masked teacher entry: 0 log 0 = 0); a_i finite with b_i = -inf gives +inf, as it should.
//  * the generalized JSD with M = (1 - beta) p_s + beta p_t needs log M per element, so a second pass after the two
//    normalisers: JSD = sum_i beta p_t (lt - lM) + (1 - beta) p_s (ls - lM), carrying KL(s || M) = sum p_s (ls - lM)
//    as well, which its gradient needs.
//
// Gradients with respect to the tempered student logits s = x / T (the kernels multiply by 1 / T):
//    forward KL(t || s):  p_s - p_t
//    reverse KL(s || t):  p_s (ls - lt - KL)
//    JSD:                 (1 - beta) p_s (ls - lM - KL(s || M))
//    log p_k and H:       g_lp ([j = k] - p_j) - g_H p_j (lp_j + H)
// and the hard-label cross-entropy of the untempered logits adds g_hard (softmax(x)_j - [j = target]).
// p_j = 0 (a -inf logit) gives 0 wherever the formula would multiply 0 by an infinite log.
#pragma once

#include "fastloss/math.h"
#include "fastloss/topk.h"

namespace fastloss {
namespace math {
inline namespace FL_ISA_NAMESPACE {

// Divergences (DistillParams::divergence; plain ints, as the loss kinds of loss_math.h).
constexpr int kForwardKL = 0, kReverseKL = 1, kJSD = 2;

// The lowest finite value of V's lanes: the initial running max, and the clamp that keeps (m - m') finite.
template <class V>
FL_HD V lowest_of() {
  return Ops<V>::splat(-FLT_MAX);
}
template <>
FL_HD double lowest_of<double>() {
  return -DBL_MAX;
}

// p * v with p = 0 counting 0 whatever v (0 * inf, 0 * NaN from a -inf logit's log-probability).
template <class V>
FL_HD V times_prob(V p, V v) {
  using O = Ops<V>;
  return O::select(O::eq(p, O::splat(0.0f)), O::splat(0.0f), p * v);
}

// ---------------------------------------------------------------- entropy state (m, d, w)

template <class V>
struct EntState {
  V m;
  V d;
  V w;  // sum e^(z - m) (z - m)
};

template <class V>
FL_HD EntState<V> ent_init() {
  return {lowest_of<V>(), Ops<V>::splat(0.0f), Ops<V>::splat(0.0f)};
}

// The state re-expressed against a max m1 >= s.m. (r d) (m - m1) is 0 exactly when r d is 0, and m - m1 is
// clamped to a finite value, so an empty state never turns into 0 * inf.
template <class V>
FL_HD EntState<V> ent_rescale(EntState<V> s, V m1) {
  using O = Ops<V>;
  const V r = exp_nonpos(s.m - m1);
  const V rd = s.d * r;
  return {m1, rd, O::fma(rd, O::max(lowest_of<V>(), s.m - m1), times_prob(r, s.w))};
}

template <class V, int N>
FL_HD EntState<V> ent_update_block(EntState<V> s, const V (&z)[N]) {
  using O = Ops<V>;
  V m = s.m;
FL_UNROLL
  for (int i = 0; i < N; ++i) m = O::max(m, z[i]);
  s = ent_rescale(s, m);
FL_UNROLL
  for (int i = 0; i < N; ++i) {
    const V t = z[i] - m;
    const V e = exp_nonpos(t);
    s.d = s.d + e;
    s.w = O::fma(e, O::max(lowest_of<V>(), t), s.w);  // t = -inf: e = 0 times a finite value; NaN t stays NaN
  }
  return s;
}

template <class V>
FL_HD EntState<V> ent_update(EntState<V> s, V z) {
  const V one[1] = {z};
  return ent_update_block(s, one);
}

template <class V>
FL_HD EntState<V> ent_merge(EntState<V> a, EntState<V> b) {
  const V m = Ops<V>::max(a.m, b.m);
  a = ent_rescale(a, m);
  b = ent_rescale(b, m);
  return {m, a.d + b.d, a.w + b.w};
}

// H = log d - w / d (double, once per row); the row's lse is m + log d.
template <class T>
FL_HD T ent_entropy(EntState<T> s) {
  return Ops<T>::log(s.d) - s.w / s.d;
}

// ---------------------------------------------------------------- token statistics state (m, d, w, q, s)
//
// The entropy state plus what TRL's per-token statistics need from the same pass over z = x / T:
// q = sum e^(2 (z - m)) (rescaled by r^2 when the max grows: log sum p^2 = log q - 2 log d) and the plain sum
// s = sum z (the mean of the tempered logits over the vocabulary). The row's argmax is kept apart, on the raw
// logits (ArgMax below).

template <class V>
struct StatState {
  V m;
  V d;
  V w;  // sum e^(z - m) (z - m)
  V q;  // sum e^(2 (z - m))
  V s;  // sum z
};

template <class V>
FL_HD StatState<V> stat_init() {
  return {lowest_of<V>(), Ops<V>::splat(0.0f), Ops<V>::splat(0.0f), Ops<V>::splat(0.0f), Ops<V>::splat(0.0f)};
}

// As ent_rescale, with q' = r^2 q (q <= d is finite, so no 0 * inf guard is needed).
template <class V>
FL_HD StatState<V> stat_rescale(StatState<V> s, V m1) {
  using O = Ops<V>;
  const V r = exp_nonpos(s.m - m1);
  const V rd = s.d * r;
  return {m1, rd, O::fma(rd, O::max(lowest_of<V>(), s.m - m1), times_prob(r, s.w)), s.q * (r * r), s.s};
}

template <class V, int N>
FL_HD StatState<V> stat_update_block(StatState<V> s, const V (&z)[N]) {
  using O = Ops<V>;
  V m = s.m;
FL_UNROLL
  for (int i = 0; i < N; ++i) m = O::max(m, z[i]);
  s = stat_rescale(s, m);
FL_UNROLL
  for (int i = 0; i < N; ++i) {
    const V t = z[i] - m;
    const V e = exp_nonpos(t);
    s.d = s.d + e;
    s.w = O::fma(e, O::max(lowest_of<V>(), t), s.w);
    s.q = O::fma(e, e, s.q);
    s.s = s.s + z[i];
  }
  return s;
}

template <class V>
FL_HD StatState<V> stat_update(StatState<V> s, V z) {
  const V one[1] = {z};
  return stat_update_block(s, one);
}

template <class V>
FL_HD StatState<V> stat_merge(StatState<V> a, StatState<V> b) {
  const V m = Ops<V>::max(a.m, b.m);
  a = stat_rescale(a, m);
  b = stat_rescale(b, m);
  return {m, a.d + b.d, a.w + b.w, a.q + b.q, a.s + b.s};
}

// log sum_j p_j^2 = log q - 2 log d (double, once per row).
FL_HD double stat_log_sum_sq(double q, double d) { return ::log(q) - 2.0 * ::log(d); }

// The first index of a row's maximum, as torch.argmax: NaN ranks above every number (the first NaN wins), ties go
// to the smaller index. (v, i) starts at (-inf, 0): a row of -inf only has argmax 0. Each thread (or SIMD pass)
// meets its elements in increasing index order, so a newcomer replaces the best only when strictly before it.
template <class T>
struct ArgMax {
  T v;
  int64_t i;
};

template <class T>
FL_HD ArgMax<T> argmax_init() {
  return {-Limits<T>::inf, 0};
}

// The better of two (softmax_topk's ranking, fastloss/topk.h): commutative, so every lane of a butterfly agrees.
template <class T>
FL_HD ArgMax<T> argmax_merge(ArgMax<T> a, ArgMax<T> b) {
  return topk_before(b.v, b.i, a.v, a.i) ? b : a;
}

// Fold one element at index i (indices increasing over the calls).
template <class T>
FL_HD void argmax_update(ArgMax<T>& best, T v, int64_t i) {
  if (topk_before(v, i, best.v, best.i)) best = {v, i};
}

// Whether a block whose (NaN-propagating) max is bm can hold an element ranked before the best so far: bm above
// it, or NaN while the best is a number. Nothing can once the best is NaN.
template <class T>
FL_HD bool argmax_may_improve(ArgMax<T> best, T bm) {
  return best.v == best.v && !(bm <= best.v);
}

// ---------------------------------------------------------------- weighted state (m, d, u)

template <class V>
struct WState {
  V m;
  V d;
  V u;  // sum e^(a - m) y
};

template <class V>
FL_HD WState<V> w_init() {
  return {lowest_of<V>(), Ops<V>::splat(0.0f), Ops<V>::splat(0.0f)};
}

// Fold a block of N elements a[i] with weights y[i].
template <class V, int N>
FL_HD WState<V> w_update_block(WState<V> s, const V (&a)[N], const V (&y)[N]) {
  using O = Ops<V>;
  V m = s.m;
FL_UNROLL
  for (int i = 0; i < N; ++i) m = O::max(m, a[i]);
  const V r = exp_nonpos(s.m - m);
  s.d = s.d * r;
  s.u = times_prob(r, s.u);
FL_UNROLL
  for (int i = 0; i < N; ++i) {
    const V e = exp_nonpos(a[i] - m);
    s.d = s.d + e;
    s.u = s.u + times_prob(e, y[i]);
  }
  s.m = m;
  return s;
}

template <class V>
FL_HD WState<V> w_update(WState<V> s, V a, V y) {
  const V a1[1] = {a}, y1[1] = {y};
  return w_update_block(s, a1, y1);
}

template <class V>
FL_HD WState<V> w_merge(WState<V> a, WState<V> b) {
  const V m = Ops<V>::max(a.m, b.m);
  const V ra = exp_nonpos(a.m - m), rb = exp_nonpos(b.m - m);
  return {m, a.d * ra + b.d * rb, times_prob(ra, a.u) + times_prob(rb, b.u)};
}

// KL(a || b) from the weighted state of a (y = a - b) and the normaliser of b, in double: u / d_a - lse_a + lse_b
// grouped so that equal rows give 0 exactly ((a - b) - (m_a - m_b) cancels before the logs are added).
FL_HD double kl_from_states(WState<double> a, OnlineState<double> b) {
  return (a.u / a.d - (a.m - b.m)) + (::log(b.d) - ::log(a.d));
}

// ---------------------------------------------------------------- normalisers grown by the entropy accumulator
//
// The distillation forward's student normaliser with the entropy state's w = sum e^(z - m) (z - m) beside it
// (distill_fwd with student_entropy: H of softmax(student / T) from the same pass). m and d are computed by exactly
// the expressions of online_update_block / online_update / online_merge (OnlineEntState: the student is b, forward
// KL and JSD) and of w_update_block / w_update / w_merge (WEntState: the student is a, reverse KL), so the lse's,
// the loss and the gradient are those of the kernels without w; w is rescaled as in ent_rescale.

template <class V>
struct OnlineEntState {
  V m;
  V d;
  V w;  // sum e^(z - m) (z - m)
};

template <class V>
FL_HD OnlineEntState<V> online_ent_init() {
  return {lowest_of<V>(), Ops<V>::splat(0.0f), Ops<V>::splat(0.0f)};
}

// w re-expressed against the new max m1: r (w + (m - m1) d), 0 when r is 0, with m - m1 clamped to a finite value
// (an empty state never gives 0 * inf). Formed without the product d r, so that the compiler's contraction of the
// d r in the normaliser's own expression into a multiply-add is as without w (a shared product is not contracted).
template <class V>
FL_HD V ent_w_rescale(V w, V d, V r, V m, V m1) {
  return times_prob(r, Ops<V>::fma(d, Ops<V>::max(lowest_of<V>(), m - m1), w));
}

template <class V, int N>
FL_HD OnlineEntState<V> online_ent_update_block(OnlineEntState<V> s, const V (&x)[N]) {
  using O = Ops<V>;
  V m = s.m;
FL_UNROLL
  for (int i = 0; i < N; ++i) m = O::max(m, x[i]);
  const V r = exp_nonpos(s.m - m);
  V w = ent_w_rescale(s.w, s.d, r, s.m, m);
  V sum = exp_nonpos(x[0] - m);
  w = O::fma(sum, O::max(lowest_of<V>(), x[0] - m), w);
FL_UNROLL
  for (int i = 1; i < N; ++i) {
    const V e = exp_nonpos(x[i] - m);
    sum = sum + e;
    w = O::fma(e, O::max(lowest_of<V>(), x[i] - m), w);
  }
  return {m, O::fma(s.d, r, sum), w};
}

template <class V>
FL_HD OnlineEntState<V> online_ent_update(OnlineEntState<V> s, V x) {
  using O = Ops<V>;
  const V m = O::max(s.m, x);
  const V r = exp_nonpos(s.m - m), e = exp_nonpos(x - m);
  const V w = O::fma(e, O::max(lowest_of<V>(), x - m), ent_w_rescale(s.w, s.d, r, s.m, m));
  return {m, O::fma(s.d, r, e), w};
}

template <class V>
FL_HD OnlineEntState<V> online_ent_merge(OnlineEntState<V> a, OnlineEntState<V> b) {
  const V m = Ops<V>::max(a.m, b.m);
  const V ra = exp_nonpos(a.m - m), rb = exp_nonpos(b.m - m);
  return {m, a.d * ra + b.d * rb, ent_w_rescale(a.w, a.d, ra, a.m, m) + ent_w_rescale(b.w, b.d, rb, b.m, m)};
}

template <class V>
struct WEntState {
  V m;
  V d;
  V u;  // sum e^(a - m) y
  V w;  // sum e^(a - m) (a - m)
};

template <class V>
FL_HD WEntState<V> w_ent_init() {
  return {lowest_of<V>(), Ops<V>::splat(0.0f), Ops<V>::splat(0.0f), Ops<V>::splat(0.0f)};
}

template <class V, int N>
FL_HD WEntState<V> w_ent_update_block(WEntState<V> s, const V (&a)[N], const V (&y)[N]) {
  using O = Ops<V>;
  V m = s.m;
FL_UNROLL
  for (int i = 0; i < N; ++i) m = O::max(m, a[i]);
  const V r = exp_nonpos(s.m - m);
  s.w = ent_w_rescale(s.w, s.d, r, s.m, m);
  s.d = s.d * r;
  s.u = times_prob(r, s.u);
FL_UNROLL
  for (int i = 0; i < N; ++i) {
    const V e = exp_nonpos(a[i] - m);
    s.d = s.d + e;
    s.u = s.u + times_prob(e, y[i]);
    s.w = O::fma(e, O::max(lowest_of<V>(), a[i] - m), s.w);
  }
  s.m = m;
  return s;
}

template <class V>
FL_HD WEntState<V> w_ent_update(WEntState<V> s, V a, V y) {
  const V a1[1] = {a}, y1[1] = {y};
  return w_ent_update_block(s, a1, y1);
}

template <class V>
FL_HD WEntState<V> w_ent_merge(WEntState<V> a, WEntState<V> b) {
  const V m = Ops<V>::max(a.m, b.m);
  const V ra = exp_nonpos(a.m - m), rb = exp_nonpos(b.m - m);
  return {m, a.d * ra + b.d * rb, times_prob(ra, a.u) + times_prob(rb, b.u),
          ent_w_rescale(a.w, a.d, ra, a.m, m) + ent_w_rescale(b.w, b.d, rb, b.m, m)};
}

// The entropy log d - w / d of a finished (double) state.
FL_HD double entropy_of(double d, double w) { return ::log(d) - w / d; }

// ---------------------------------------------------------------- per-element gradients

// An element's log-probability from the row's normaliser given as (m, log_scale) with log p = (x - m) + log_scale
// (normaliser_from_lse below), and its probability.
template <class V>
FL_HD V logprob_at(V x, V m, V log_scale) {
  return (x - m) + log_scale;
}

// d loss / d s_j (tempered student logit) of one divergence, from the element's log-probabilities.
// row_aux: KL for the reverse KL, KL(s || M) for the JSD (unused by the forward KL).
template <int kDivergence, class V>
FL_HD V divergence_grad(V ls, V lt, V beta, V row_aux) {
  using O = Ops<V>;
  const V ps = exp_nonpos(ls);
  if constexpr (kDivergence == kForwardKL) {
    return ps - exp_nonpos(lt);
  } else if constexpr (kDivergence == kReverseKL) {
    return times_prob(ps, (ls - lt) - row_aux);
  } else {
    const V lm = O::log((O::splat(1.0f) - beta) * ps + beta * exp_nonpos(lt));
    return (O::splat(1.0f) - beta) * times_prob(ps, (ls - lm) - row_aux);
  }
}

// The JSD's two per-element sums: the loss term and p_s (ls - lM).
template <class V>
struct JsdTerms {
  V loss;
  V kl_sm;
};

template <class V>
FL_HD JsdTerms<V> jsd_terms(V ls, V lt, V beta) {
  using O = Ops<V>;
  const V ps = exp_nonpos(ls), pt = exp_nonpos(lt);
  const V lm = O::log((O::splat(1.0f) - beta) * ps + beta * pt);
  const V s_term = times_prob(ps, ls - lm);
  return {beta * times_prob(pt, lt - lm) + (O::splat(1.0f) - beta) * s_term, s_term};
}

// d / d z_j of g_lp log p_k + g_H H, without the target's + g_lp (added once by the caller).
template <class V>
FL_HD V logprob_entropy_grad(V lp, V g_lp, V g_h, V entropy) {
  using O = Ops<V>;
  const V p = exp_nonpos(lp);
  return O::splat(0.0f) - times_prob(p, O::fma(g_h, lp + entropy, g_lp));
}

}  // namespace FL_ISA_NAMESPACE
}  // namespace math
}  // namespace fastloss

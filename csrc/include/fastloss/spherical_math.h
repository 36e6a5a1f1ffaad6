// fastloss/spherical_math.h: the math of the spherical-family losses (Vincent et al. 2015; de Brebisson & Vincent
// 2016), shared by the CPU and CUDA kernels (templates over a value type with an Ops<V> policy, as fastloss/math.h).
//
// A spherical loss sees a row o[0..V) only through its target entry o_c, its mean mu and its (population) variance
// var, so one pass over the row is enough, and its gradient is affine in o:
//
//     dL/do_k = dL/dmu / V + dL/dvar * 2 (o_k - mu) / V + [k = c] dL/do_c
//
// The row's (count, mean, M2) is kept the way the softmax kernels keep (m, d): per lane, merged with Chan's rule
// (n = na + nb, delta = mean_b - mean_a, mean += delta nb / n, M2 = M2a + M2b + delta^2 na nb / n), so the variance
// never comes from subtracting two large sums of squares (no catastrophic cancellation for |mu| >> sigma). A block
// of M new values is folded in as its own two-pass (mean, M2) and one merge: one division per block, not per
// element.
//
// The losses (double, per row; `kind` below):
//  * kZLoss: the Z-loss of de Brebisson & Vincent: z = (o_c - mu) / sigma, L = softplus(a (b - z)) / a, a > 0.
//    sigma = 0 (every logit equal): z is defined as 0, L = softplus(a b) / a, and the gradient is 0 (no direction
//    of o changes z to first order in a way that is defined; this is the limit along any path that keeps z = 0).
//    NOT PaLM's auxiliary z-loss (z_loss * lse^2, `cross_entropy(z_loss=...)`).
//  * kTaylorSoftmax: the log-Taylor-softmax, softmax with exp replaced by its second-order Taylor polynomial
//    t(o) = 1 + o + o^2 / 2 (> 0 everywhere): L = log(sum_k t(o_k)) - log t(o_c), sum_k t(o_k) =
//    V (1 + mu + (var + mu^2) / 2).
//  * kOneHotMSE: the squared error to the one-hot target, summed over the V classes:
//    L = sum_k (o_k - [k = c])^2 = V (var + mu^2) - 2 o_c + 1. The logits kernels compute the value instead as
//    sum_{k != c} o_k^2 + (o_c - 1)^2 (onehot_mse_value: non-negative terms, exact for a row near its one-hot
//    target); the moments form, whose absolute error is ~eps * sum_k o_k^2, is what the linear version (which has
//    only the moments) can compute. An infinite logit gives +inf here (the true value), not NaN.
// A non-finite logit makes the row's loss NaN (its mean or variance is not finite), and so does a variance that
// overflowed the float accumulator (finite logits spread beyond ~1e19 in a float32 / bf16 / fp16 row): var = +inf
// only arises that way, and no value computed from it would be right.
#pragma once

#include "fastloss/math.h"

namespace fastloss {
namespace math {
inline namespace FL_ISA_NAMESPACE {

// SphericalParams::kind (plain ints, as the loss kinds of loss_math.h).
constexpr int kZLoss = 0, kTaylorSoftmax = 1, kOneHotMSE = 2;

// Running (count, mean, M2) of a row; on SIMD lanes every lane has the same count.
template <class V>
struct MomentState {
  V n, mean, m2;
};

template <class V>
FL_HD MomentState<V> moment_init() {
  using O = Ops<V>;
  return {O::splat(0), O::splat(0), O::splat(0)};
}

// Chan's merge (associative and commutative up to rounding; an empty side returns the other exactly).
template <class T>
FL_HD MomentState<T> moment_merge(MomentState<T> a, MomentState<T> b) {
  if (b.n == T(0)) return a;
  if (a.n == T(0)) return b;
  const T n = a.n + b.n;
  const T delta = b.mean - a.mean;
  const T wb = b.n / n;
  return {n, a.mean + delta * wb, a.m2 + b.m2 + delta * delta * (a.n * wb)};
}

// Sum of x[Lo .. Lo + n) (n a power of two) as a pairwise tree: n equal values sum exactly (each level doubles), so
// a row of equal logits keeps M2 = 0 exactly on every path (the sigma = 0 case is decided by var == 0). Indices are
// compile-time constants, so the values stay in registers (no local-memory array on the GPU).
template <int Lo, int n, class V, int M>
FL_HD V tree_sum(const V (&x)[M]) {
  static_assert(n > 0 && (n & (n - 1)) == 0 && Lo + n <= M, "tree_sum: n must be a power of two inside x");
  if constexpr (n == 1) {
    return x[Lo];
  } else {
    return tree_sum<Lo, n / 2>(x) + tree_sum<Lo + n / 2, n / 2>(x);
  }
}

// M new values (one per lane each; M a power of two) folded into s: their own mean and M2 first, then one merge.
template <class V, int M>
FL_HD MomentState<V> moment_add_block(MomentState<V> s, const V (&x)[M]) {
  using O = Ops<V>;
  const V bm = tree_sum<0, M>(x) * O::splat(1.0f / static_cast<float>(M));  // exact scale: M is a power of two
  V bm2 = O::splat(0);
FL_UNROLL
  for (int i = 0; i < M; ++i) {
    const V d = x[i] - bm;
    bm2 = O::fma(d, d, bm2);
  }
  const V n = s.n + O::splat(static_cast<float>(M));
  const V delta = bm - s.mean;
  const V wb = O::splat(static_cast<float>(M)) / n;
  return {n, O::fma(delta, wb, s.mean), s.m2 + bm2 + delta * delta * (s.n * wb)};
}

// The one-hot MSE's value from the sum of squares of the other logits and the target logit.
FL_HD double onehot_mse_value(double rest_sq, double oc) { return rest_sq + (oc - 1.0) * (oc - 1.0); }

// A row's loss and its partial derivatives in (o_c, mu, var).
struct SphericalTerms {
  double loss, d_oc, d_mu, d_var;
};

FL_HD double softplus_d(double t) { return t > 0 ? t + ::log1p(::exp(-t)) : ::log1p(::exp(t)); }
FL_HD double sigmoid_d(double t) {
  if (t >= 0) return 1.0 / (1.0 + ::exp(-t));
  const double e = ::exp(t);
  return e / (1.0 + e);
}

// The loss of one row from its statistics: o_c, dmu = mu - o_c and var (V: the row length; a, b: the Z-loss's
// parameters).
FL_HD SphericalTerms spherical_terms(int kind, double oc, double dmu, double var, double V, double a, double b) {
  const double mu = oc + dmu;
  if (var == INFINITY) {
    const double nan = NAN;
    return {nan, nan, nan, nan};
  }
  if (kind == kZLoss) {
    if (var == 0) return {softplus_d(a * b) / a, 0.0, 0.0, 0.0};  // sigma = 0; a NaN var gives NaN below
    const double sigma = ::sqrt(var);
    const double z = -dmu / sigma;
    const double t = a * (b - z);
    const double dz = -sigmoid_d(t);  // dL/dz
    return {softplus_d(t) / a, dz / sigma, -dz / sigma, -dz * z / (2.0 * var)};
  }
  if (kind == kTaylorSoftmax) {
    const double s = V * (1.0 + mu + 0.5 * (var + mu * mu));  // sum_k t(o_k) > 0
    const double tc = 1.0 + oc + 0.5 * oc * oc;
    return {::log(s) - ::log(tc), -(1.0 + oc) / tc, V * (1.0 + mu) / s, 0.5 * V / s};
  }
  // kOneHotMSE
  return {V * (var + mu * mu) - 2.0 * oc + 1.0, -2.0, 2.0 * V * mu, V};
}

// The affine gradient of a row: g * dL/do_k = c0 + c1 ((o_k - p1) - p2) + [k = c] target. The Z-loss takes the
// centred form, p1 = o_c and p2 = dmu (o_k - mu from the pivot: its coefficients would cancel a large mean
// otherwise); the log-Taylor-softmax (g (1 + o_k) / S) and the one-hot MSE (2 g o_k) are affine in o_k itself, with
// p1 = p2 = 0: no subtraction at all, so a row near its one-hot target keeps the precision of its small entries.
struct SphericalGradCoef {
  double c0, c1, target, p1, p2;
};

FL_HD SphericalGradCoef spherical_grad_coef(int kind, const SphericalTerms& t, double g, double V, double oc,
                                            double dmu) {
  const double c1 = 2.0 * g * t.d_var / V;
  if (kind == kZLoss) return {g * t.d_mu / V, c1, g * t.d_oc, oc, dmu};
  if (kind == kTaylorSoftmax) return {c1, c1, g * t.d_oc, 0.0, 0.0};  // c1 = g / S
  return {0.0, c1, g * t.d_oc, 0.0, 0.0};                            // kOneHotMSE: c1 = 2 g
}

// The gradient of the target entry itself, in double.
FL_HD double spherical_grad_at_target(const SphericalGradCoef& k, double oc) {
  return k.c0 + k.c1 * ((oc - k.p1) - k.p2) + k.target;
}

}  // namespace FL_ISA_NAMESPACE
}  // namespace math
}  // namespace fastloss

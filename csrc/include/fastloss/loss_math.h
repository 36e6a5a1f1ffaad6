// fastloss/loss_math.h: per-row cross-entropy formulas shared by the CPU and CUDA kernels.
//
// For one row with logits x (after the optional softcap), normaliser (m, d) and lse = m + log d, p_c = softmax:
//
//  class-index target t, class weights w (all 1 when absent), W = sum_c w_c, smoothing eps, z-loss z:
//    loss  = (1 - eps) w_t (lse - x_t) + (eps / C) (W lse - sum_c w_c x_c) + z lse^2
//    dloss/dx_c = a p_c - b w_c - [c == t] c_t,   a = (1 - eps) w_t + eps W / C + 2 z lse,  b = eps / C,
//                                                  c_t = (1 - eps) w_t
//    which is torch's cross_entropy with label_smoothing (the smoothing term weighted by w_c, the nll term by w_t).
//
//  probability target y (smoothed: y' = (1 - eps) y + eps / C):
//    loss  = lse sum_c w_c y'_c - sum_c w_c y'_c x_c + z lse^2
//    dloss/dx_c = (sum_k w_k y'_k + 2 z lse) p_c - w_c y'_c
//
// Every coefficient is multiplied by the row's incoming gradient g (which carries the reduction's 1/denominator),
// and the gradient of a returned lse (g_lse p_c) adds to a. The true class's a p_t - c_t is evaluated in fp32
// (a bf16 p - 1 loses everything at p = 0.999), and rounded once when stored.
//
// comp-sum losses (class-index targets, no label smoothing), with nll = lse - x_t, p_t = e^-nll, q = 1 - p_t:
//    focal (gamma):   loss = w_t q^gamma nll              dloss/dx_c = w_t F (p_c - [c == t]),
//                     F = q^gamma + gamma q^(gamma-1) p_t nll = q^gamma (1 + gamma p_t nll / q)
//    poly1 (epsilon): loss = w_t (nll + epsilon q)       F = 1 + epsilon p_t
//    (plus z lse^2 as above). So a = g w_t F (+ 2 g z lse + g_lse), b = 0, c_t = g w_t F: the same row pass.
//    squentropy:      loss = w_t (nll + k S),  S = sum_{c != t} p_c^2 = sum_c p_c^2 - p_t^2,  k = 1 / (C - 1)
//                     dloss/dx_c = w_t [(p_c - [c == t]) + k (2 p_c^2 [c != t] - 2 p_c S)]
//                     so a = g w_t (1 - 2 k S), a2 = 2 g w_t k (multiplies p_c^2), c_t = g w_t + a2 p_t^2;
//                     sum_c p_c^2 = exp(lse(2x) - 2 lse) needs a second running accumulator (of 2x).
//    q is computed as -expm1(-nll), exact when p_t -> 1, and nll / q -> 1 there, so focal's F has no 0 * inf.
//
// softcap s: x' = s tanh(x / s), dx'/dx = 1 - (x'/s)^2. A -inf logit (a masked vocabulary entry) stays -inf and gets
// a zero gradient: it must not come back as -s and leak into the log-sum-exp.
#pragma once

#include "fastloss/math.h"

namespace fastloss {
namespace math {
inline namespace FL_ISA_NAMESPACE {

template <class V, class S>
FL_HD V softcap_apply(V x, S cap, S inv_cap) {
  using O = Ops<V>;
  return O::select(O::eq(x, O::splat(-Limits<float>::inf)), x, O::splat(cap) * O::tanh(x * O::splat(inv_cap)));
}

// d softcap / dx from the capped value y.
template <class V, class S>
FL_HD V softcap_grad(V y, S inv_cap) {
  using O = Ops<V>;
  V u = y * O::splat(inv_cap);
  return O::select(O::eq(y, O::splat(-Limits<float>::inf)), O::splat(0.0f), O::splat(1.0f) - u * u);
}

// Coefficients of one row's loss and gradient for a class-index target (see the file comment).
template <class T>
struct CeRow {
  T a;          // multiplies p_c
  T b;          // multiplies w_c (subtracted)
  T c_t;        // subtracted at the target class
  T a2 = T(0);  // multiplies p_c^2 (squentropy only)
};

// The row's loss from its lse and fused sums. The sums are taken relative to a shift (the row's first logit):
// sum_w_dx = sum_c w_c (x_c - shift), so W lse - sum_c w_c x_c = W (lse - shift) - sum_w_dx without cancelling
// when every logit sits far from 0. Evaluate in double (once per row).
template <class T>
FL_HD T ce_index_loss(T lse, T x_t, T w_t, T sum_w_dx, T shift, T W, T eps, T inv_C, T z) {
  T loss = (T(1) - eps) * w_t * (lse - x_t);
  if (eps != T(0)) loss += eps * inv_C * (W * (lse - shift) - sum_w_dx);
  if (z != T(0)) loss += z * lse * lse;
  return loss;
}

template <class T>
FL_HD CeRow<T> ce_index_coefs(T g, T g_lse, T lse, T w_t, T W, T eps, T inv_C, T z) {
  const T nll = (T(1) - eps) * w_t;
  T a = nll + eps * inv_C * W;
  if (z != T(0)) a += T(2) * z * lse;
  return {g * a + g_lse, g * eps * inv_C, g * nll};
}

// sum_wy = sum_c w_c y'_c, sum_wy_dx = sum_c w_c y'_c (x_c - shift).
template <class T>
FL_HD T ce_prob_loss(T lse, T sum_wy, T sum_wy_dx, T shift, T z) {
  T loss = sum_wy * (lse - shift) - sum_wy_dx;
  if (z != T(0)) loss += z * lse * lse;
  return loss;
}

// Loss kinds (CrossEntropyParams::loss_kind; plain ints, so the params struct is the same type in every ISA build).
constexpr int kLossCE = 0, kLossFocal = 1, kLossPoly1 = 2, kLossSquentropy = 3;

// The comp-sum loss of one row without its class weight, and its gradient factor F (file comment).
template <class T>
struct CompSum {
  T loss;
  T factor;
};

// Evaluated in double whatever T (once per row): pow / expm1 of a float would cost the loss its last digits.
template <class T>
FL_HD CompSum<T> comp_sum(int kind, T param_t, T nll_t) {
  const double param = static_cast<double>(param_t), nll = static_cast<double>(nll_t);
  const double p_t = ::exp(-nll);
  const double q = -::expm1(-nll);
  if (kind == kLossPoly1) return {static_cast<T>(nll + param * q), static_cast<T>(1.0 + param * p_t)};
  // Focal. q^0 = 1 (cross-entropy); q = 0 (p_t = 1): loss 0, F = 0 for gamma > 0.
  const double qg = param == 0.0 ? 1.0 : ::pow(q, param);
  const double ratio = q > 0.0 ? nll / q : 1.0;
  const double extra = p_t > 0.0 ? param * p_t * ratio : 0.0;  // p_t = 0 (x_t = -inf): no 0 * inf
  return {static_cast<T>(qg * nll), static_cast<T>(qg * (1.0 + extra))};
}

// squentropy's S = sum_{c != t} p_c^2 from sq = sum_c p_c^2 (never below 0 by rounding).
template <class T>
FL_HD T squentropy_rest(T sq, T p_t) {
  const T s = sq - p_t * p_t;
  return s > T(0) ? s : T(0);
}

// The row's loss for any loss kind (CE: ce_index_loss). sq = sum_c p_c^2 and inv_cm1 = 1 / (C - 1) (0 when C = 1)
// are used by squentropy only.
template <class T>
FL_HD T ce_index_loss_kind(int kind, T param, T lse, T x_t, T w_t, T sum_w_dx, T shift, T W, T eps, T inv_C, T z,
                           T sq = T(0), T inv_cm1 = T(0)) {
  if (kind == kLossCE) return ce_index_loss(lse, x_t, w_t, sum_w_dx, shift, W, eps, inv_C, z);
  T loss;
  if (kind == kLossSquentropy) {
    const T nll = lse - x_t;
    loss = w_t * (nll + inv_cm1 * squentropy_rest(sq, T(::exp(double(-nll)))));
  } else {
    loss = w_t * comp_sum(kind, param, lse - x_t).loss;
  }
  if (z != T(0)) loss += z * lse * lse;
  return loss;
}

// The row's gradient coefficients for any loss kind (CE: ce_index_coefs). x_t is the (capped) target logit.
template <class T>
FL_HD CeRow<T> ce_index_coefs_kind(int kind, T param, T g, T g_lse, T lse, T x_t, T w_t, T W, T eps, T inv_C,
                                   T z, T sq = T(0), T inv_cm1 = T(0)) {
  if (kind == kLossCE) return ce_index_coefs(g, g_lse, lse, w_t, W, eps, inv_C, z);
  const T zl = z != T(0) ? T(2) * z * lse : T(0);
  if (kind == kLossSquentropy) {
    const T p_t = T(::exp(double(x_t - lse)));
    const T gw = g * w_t;
    const T a2 = T(2) * gw * inv_cm1;
    return {gw * (T(1) - T(2) * inv_cm1 * squentropy_rest(sq, p_t)) + g * zl + g_lse, T(0), gw + a2 * p_t * p_t,
            a2};
  }
  const T f = w_t * comp_sum(kind, param, lse - x_t).factor;
  return {g * (f + zl) + g_lse, T(0), g * f};
}

// ---------------------------------------------------------------- vocabulary shards (cross_entropy_shard_*)
//
// A shard holds the classes [vocab_start, vocab_start + C) of V. Its statistics per row (kShardStats float64):
// (m, d) of the online normaliser of its x' (so lse = M + log sum_r d_r e^(m_r - M) over the shards, M = max m_r),
// x'_t when it holds the target (else 0), and sum_c w_c x'_c (label smoothing) or d2 = sum_c e^(2 (x'_c - m))
// (squentropy: sum_c p_c^2 = sum_r d2_r e^(2 (m_r - M)) / D^2), else 0. The loss and gradient then take the
// combined rows (lse, x'_t, w_t, s) with W the vocabulary's weight sum, 1 / V and 1 / (V - 1). A NaN in a shard's
// row makes its d NaN (so the combined lse); a +inf gives m = +inf and d = NaN, as the online state has it: the
// combination (python/fastloss/_vocab_parallel.py) takes a non-finite M as the lse, +inf as the full-vocabulary op.
constexpr int kShardStats = 4;

// The m a shard reports: -inf for a row with nothing in it (all -inf: the state's m stays at its finite start, d = 0).
template <class T>
FL_HD double shard_max(T m, T d) {
  return d == T(0) ? -Limits<double>::inf : static_cast<double>(m);
}

// The loss of one combined row (lse, x'_t, w_t, s): sum_w_dx = s with shift 0, and s as squentropy's sum_c p_c^2.
FL_HD double ce_shard_loss(int kind, double param, double lse, double x_t, double w_t, double s, double W, double eps,
                           double inv_V, double z, double inv_vm1) {
  return ce_index_loss_kind<double>(kind, param, lse, x_t, w_t, s, 0.0, W, eps, inv_V, z, s, inv_vm1);
}

}  // namespace FL_ISA_NAMESPACE
}  // namespace math
}  // namespace fastloss

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
  T a;    // multiplies p_c
  T b;    // multiplies w_c (subtracted)
  T c_t;  // subtracted at the target class
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

}  // namespace FL_ISA_NAMESPACE
}  // namespace math
}  // namespace fastloss

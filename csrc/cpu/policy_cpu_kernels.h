// CPU row kernels for distillation and token log-probabilities (the table of fastloss/policy_kernels.h).
//
// Forward: one pass per row carries every normaliser and weighted sum the loss needs (fastloss/policy_math.h), in
// float SIMD lanes folded into double once per chunk of kChunk elements, with a scalar double tail; the JSD adds a
// second pass for log M. Backward: one elementwise pass per row, which may write over the student logits (the
// in-place variants). Included once per instruction set (CPU_CAPABILITY inline namespace).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <limits>
#include <type_traits>

#include "fastloss/policy_kernels.h"
#include "fastloss/policy_math.h"
#include "row_ops.h"

namespace fastloss {
namespace cpu {
inline namespace CPU_CAPABILITY {

constexpr int kLanes = Vec::size();

inline double widen_max(float m) { return m == -FLT_MAX ? -DBL_MAX : double(m); }

// Visits rows a and b (b may be null: token log-probabilities) of n elements: blocks of kBlock elements as four
// float vectors each (pass.vec), chunk by chunk (pass.begin / pass.flush), then the tail in double (pass.scalar).
template <typename scalar_t, class Pass>
void visit_rows(const scalar_t* a, const scalar_t* b, int64_t n, Pass& pass) {
  int64_t j = 0;
  if constexpr (kVectorized<scalar_t>) {
    while (j + kBlock <= n) {
      const int64_t end = std::min(n, j + kChunk);
      pass.begin();
      for (; j + kBlock <= end; j += kBlock) {
        Vec va[4], vb[4];
        load4(a + j, va);
        if (b != nullptr) load4(b + j, vb);
        pass.vec(va, vb);
      }
      pass.flush();
    }
  }
  for (; j < n; ++j) pass.scalar(double(a[j]), b != nullptr ? double(b[j]) : 0.0);
}

// Lanes of SIMD states merged into double states.
inline void fold(fm::OnlineState<double>& total, const fm::OnlineState<Vec>& s) {
  float m[kLanes], d[kLanes];
  s.m.store(m);
  s.d.store(d);
  for (int l = 0; l < kLanes; ++l) total = fm::online_merge(total, {widen_max(m[l]), double(d[l])});
}
inline void fold(fm::EntState<double>& total, const fm::EntState<Vec>& s) {
  float m[kLanes], d[kLanes], w[kLanes];
  s.m.store(m);
  s.d.store(d);
  s.w.store(w);
  for (int l = 0; l < kLanes; ++l) total = fm::ent_merge(total, {widen_max(m[l]), double(d[l]), double(w[l])});
}
inline void fold(fm::WState<double>& total, const fm::WState<Vec>& s) {
  float m[kLanes], d[kLanes], u[kLanes];
  s.m.store(m);
  s.d.store(d);
  s.u.store(u);
  for (int l = 0; l < kLanes; ++l) total = fm::w_merge(total, {widen_max(m[l]), double(d[l]), double(u[l])});
}

inline void fold(fm::OnlineEntState<double>& total, const fm::OnlineEntState<Vec>& s) {
  float m[kLanes], d[kLanes], w[kLanes];
  s.m.store(m);
  s.d.store(d);
  s.w.store(w);
  for (int l = 0; l < kLanes; ++l) total = fm::online_ent_merge(total, {widen_max(m[l]), double(d[l]), double(w[l])});
}
inline void fold(fm::WEntState<double>& total, const fm::WEntState<Vec>& s) {
  float m[kLanes], d[kLanes], u[kLanes], w[kLanes];
  s.m.store(m);
  s.d.store(d);
  s.u.store(u);
  s.w.store(w);
  for (int l = 0; l < kLanes; ++l) {
    total = fm::w_ent_merge(total, {widen_max(m[l]), double(d[l]), double(u[l]), double(w[l])});
  }
}

inline void fold(fm::StatState<double>& total, const fm::StatState<Vec>& s) {
  float m[kLanes], d[kLanes], w[kLanes], q[kLanes], z[kLanes];
  s.m.store(m);
  s.d.store(d);
  s.w.store(w);
  s.q.store(q);
  s.s.store(z);
  for (int l = 0; l < kLanes; ++l) {
    total = fm::stat_merge(total, {widen_max(m[l]), double(d[l]), double(w[l]), double(q[l]), double(z[l])});
  }
}

inline double lse_of(double m, double d) { return m + std::log(d); }

// ---------------------------------------------------------------- token log-probabilities

// The normaliser of z = x / T, with the entropy state when kEntropy.
template <bool kEntropy>
struct LogprobPass {
  float inv_t;
  double inv_t_d;
  fm::OnlineState<Vec> on;
  fm::EntState<Vec> en;
  fm::OnlineState<double> on_total = fm::online_init<double>();
  fm::EntState<double> en_total = fm::ent_init<double>();
  void begin() {
    if constexpr (kEntropy) en = fm::ent_init<Vec>();
    else on = fm::online_init<float, Vec>();
  }
  void vec(const Vec (&x)[4], const Vec (&)[4]) {
    const Vec z[4] = {x[0] * Vec(inv_t), x[1] * Vec(inv_t), x[2] * Vec(inv_t), x[3] * Vec(inv_t)};
    if constexpr (kEntropy) en = fm::ent_update_block(en, z);
    else on = fm::online_update_block(on, z);
  }
  void flush() {
    if constexpr (kEntropy) fold(en_total, en);
    else fold(on_total, on);
  }
  void scalar(double x, double) {
    if constexpr (kEntropy) en_total = fm::ent_update(en_total, x * inv_t_d);
    else on_total = fm::online_update(on_total, x * inv_t_d);
  }
  double lse() const { return kEntropy ? lse_of(en_total.m, en_total.d) : lse_of(on_total.m, on_total.d); }
};

// The statistics pass (token_logprobs_fwd(stats=True)): the entropy state grown by q = sum e^(2 (z - m)) and
// s = sum z, and the first index of the row's max of the raw logits. The elements arrive in increasing index order
// (the vector blocks, then the scalar tail), counted by `pos`; a block is searched element by element only when its
// max could beat the best so far (rarely, after the row's first blocks).
struct LogprobStatsPass {
  float inv_t;
  double inv_t_d;
  fm::StatState<Vec> sv;
  fm::StatState<double> total = fm::stat_init<double>();
  fm::ArgMax<double> best = fm::argmax_init<double>();
  int64_t pos = 0;
  void begin() { sv = fm::stat_init<Vec>(); }
  void vec(const Vec (&x)[4], const Vec (&)[4]) {
    const Vec z[4] = {x[0] * Vec(inv_t), x[1] * Vec(inv_t), x[2] * Vec(inv_t), x[3] * Vec(inv_t)};
    sv = fm::stat_update_block(sv, z);
    const Vec bm = at::vec::maximum(at::vec::maximum(x[0], x[1]), at::vec::maximum(x[2], x[3]));  // NaN-propagating
    // Some lane not <= best (greater, or NaN) while the best is a number: search the block in order.
    if (best.v == best.v && (bm <= Vec(float(best.v))).zero_mask() != 0) {
      float v[kBlock];
      for (int i = 0; i < 4; ++i) x[i].store(v + i * kLanes);
      for (int64_t k = 0; k < kBlock; ++k) fm::argmax_update(best, double(v[k]), pos + k);
    }
    pos += kBlock;
  }
  void flush() { fold(total, sv); }
  void scalar(double x, double) {
    total = fm::stat_update(total, x * inv_t_d);
    fm::argmax_update(best, x, pos++);
  }
};

inline void logprob_forward(const at::Tensor& x, const at::Tensor& tokens, double inv_t, const at::Tensor& logp,
                            const at::Tensor& entropy, const at::Tensor& lse, const at::Tensor& stats,
                            const at::Tensor& argmax) {
  const int64_t N = x.size(0), V = x.size(1);
  const int64_t* tok = tokens.const_data_ptr<int64_t>();
  double* plp = logp.mutable_data_ptr<double>();
  double* plse = lse.mutable_data_ptr<double>();
  double* pent = entropy.defined() ? entropy.mutable_data_ptr<double>() : nullptr;
  double* pst = stats.defined() ? stats.mutable_data_ptr<double>() : nullptr;
  int64_t* pam = stats.defined() ? argmax.mutable_data_ptr<int64_t>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "fastloss_logprob_fwd_cpu", [&] {
    const scalar_t* px = x.const_data_ptr<scalar_t>();
    auto run = [&](auto with_entropy) {
      constexpr bool kEnt = decltype(with_entropy)::value;
      at::parallel_for(0, N, row_grain(V), [&](int64_t b, int64_t e) {
        for (int64_t r = b; r < e; ++r) {
          const scalar_t* xr = px + r * V;
          LogprobPass<kEnt> pass{float(inv_t), inv_t};
          visit_rows<scalar_t>(xr, nullptr, V, pass);
          const double l = pass.lse();
          plse[r] = l;
          plp[r] = double(xr[tok[r]]) * inv_t - l;
          if constexpr (kEnt) pent[r] = fm::ent_entropy(pass.en_total);
        }
      });
    };
    if (pst != nullptr) {
      at::parallel_for(0, N, row_grain(V), [&](int64_t b, int64_t e) {
        for (int64_t r = b; r < e; ++r) {
          const scalar_t* xr = px + r * V;
          LogprobStatsPass pass{float(inv_t), inv_t};
          visit_rows<scalar_t>(xr, nullptr, V, pass);
          const fm::StatState<double>& t = pass.total;
          const double l = lse_of(t.m, t.d);
          plse[r] = l;
          plp[r] = double(xr[tok[r]]) * inv_t - l;
          if (pent != nullptr) pent[r] = fm::ent_entropy(fm::EntState<double>{t.m, t.d, t.w});
          pst[r * kTokenStats + kLogSumSqProbs] = fm::stat_log_sum_sq(t.q, t.d);
          pst[r * kTokenStats + kMeanLogits] = t.s / double(V);
          pam[r] = pass.best.i;
        }
      });
    } else if (pent != nullptr) {
      run(std::true_type{});
    } else {
      run(std::false_type{});
    }
  });
}

inline void logprob_backward(const at::Tensor& x, const at::Tensor& tokens, int64_t vocab_start, bool /*shard*/,
                             double inv_t, const at::Tensor& g_lp, const at::Tensor& g_h, const at::Tensor& lse,
                             const at::Tensor& entropy, const at::Tensor& grad) {
  const int64_t N = x.size(0), V = x.size(1);
  const int64_t* tok = tokens.const_data_ptr<int64_t>();
  const double* pglp = g_lp.defined() ? g_lp.const_data_ptr<double>() : nullptr;
  const double* pgh = g_h.defined() ? g_h.const_data_ptr<double>() : nullptr;
  const double* plse = lse.const_data_ptr<double>();
  const double* pent = pgh != nullptr ? entropy.const_data_ptr<double>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "fastloss_logprob_bwd_cpu", [&] {
    using acc = acc_t<scalar_t>;
    const scalar_t* px = x.const_data_ptr<scalar_t>();
    scalar_t* pg = grad.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, N, row_grain(V), [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) {
        const scalar_t* xr = px + r * V;
        scalar_t* out = pg + r * V;
        const acc glp = pglp != nullptr ? acc(pglp[r]) : acc(0);
        const acc gh = pgh != nullptr ? acc(pgh[r]) : acc(0);
        const acc h = pgh != nullptr ? acc(pent[r]) : acc(0);
        const auto parts = fm::lse_parts<acc>(plse[r]);
        const acc it = acc(inv_t);
        auto f = [&](auto v, auto) {
          using T = decltype(v);
          const T lp = fm::logprob_at(v * splat_like<T>(it), splat_like<T>(parts.m), splat_like<T>(parts.log_scale));
          return fm::logprob_entropy_grad(lp, splat_like<T>(glp), splat_like<T>(gh), splat_like<T>(h)) *
                 splat_like<T>(it);
        };
        const int64_t k = tok[r] - vocab_start;  // in [0, V) unless another slice holds the token
        const bool own = k >= 0 && k < V;
        const acc x_k = own ? acc(xr[k]) : acc(0);  // read before the pass: out may alias x
        map_row(xr, xr, out, V, f);
        if (own) out[k] = static_cast<scalar_t>(f(x_k, x_k) + glp * it);
      }
    });
  });
}

// ---------------------------------------------------------------- distillation

// Pass 1: the weighted state of a = the tempered teacher (forward KL, JSD) or student (reverse KL) with
// y = a - b, the plain normaliser of b (the other one), and, when kRaw, of the untempered student (hard term).
// kEnt (student_entropy): the student's state (a or b) also carries the entropy accumulator w, its m and d computed
// as without it (fastloss/policy_math.h OnlineEntState, WEntState).
template <class V, bool kEnt>
using AState = std::conditional_t<kEnt, fm::WEntState<V>, fm::WState<V>>;
template <class V, bool kEnt>
using BState = std::conditional_t<kEnt, fm::OnlineEntState<V>, fm::OnlineState<V>>;

template <bool kStudentIsA, bool kRaw, bool kEnt = false>
struct DistillPass {
  static constexpr bool kEntA = kEnt && kStudentIsA, kEntB = kEnt && !kStudentIsA;
  float inv_t;
  double inv_t_d;
  AState<Vec, kEntA> wa;
  BState<Vec, kEntB> ob;
  fm::OnlineState<Vec> ox;
  AState<double, kEntA> wa_total = a_init<double>();
  BState<double, kEntB> ob_total = b_init<double>();
  fm::OnlineState<double> ox_total = fm::online_init<double>();
  template <class V>
  static AState<V, kEntA> a_init() {
    if constexpr (kEntA) return fm::w_ent_init<V>();
    else return fm::w_init<V>();
  }
  template <class V>
  static BState<V, kEntB> b_init() {
    if constexpr (kEntB) return fm::online_ent_init<V>();
    else if constexpr (std::is_same_v<V, Vec>) return fm::online_init<float, Vec>();
    else return fm::online_init<double>();
  }
  void begin() {
    wa = a_init<Vec>();
    ob = b_init<Vec>();
    if constexpr (kRaw) ox = fm::online_init<float, Vec>();
  }
  void vec(const Vec (&s)[4], const Vec (&t)[4]) {
    Vec a[4], b[4], y[4];
    for (int i = 0; i < 4; ++i) {
      const Vec zs = s[i] * Vec(inv_t), zt = t[i] * Vec(inv_t);
      a[i] = kStudentIsA ? zs : zt;
      b[i] = kStudentIsA ? zt : zs;
      y[i] = a[i] - b[i];
    }
    if constexpr (kEntA) wa = fm::w_ent_update_block(wa, a, y);
    else wa = fm::w_update_block(wa, a, y);
    if constexpr (kEntB) ob = fm::online_ent_update_block(ob, b);
    else ob = fm::online_update_block(ob, b);
    if constexpr (kRaw) ox = fm::online_update_block(ox, s);
  }
  void flush() {
    fold(wa_total, wa);
    fold(ob_total, ob);
    if constexpr (kRaw) fold(ox_total, ox);
  }
  void scalar(double s, double t) {
    const double zs = s * inv_t_d, zt = t * inv_t_d;
    const double a = kStudentIsA ? zs : zt, b = kStudentIsA ? zt : zs;
    if constexpr (kEntA) wa_total = fm::w_ent_update(wa_total, a, a - b);
    else wa_total = fm::w_update(wa_total, a, a - b);
    if constexpr (kEntB) ob_total = fm::online_ent_update(ob_total, b);
    else ob_total = fm::online_update(ob_total, b);
    if constexpr (kRaw) ox_total = fm::online_update(ox_total, s);
  }
  // The student's entropy (kEnt only).
  double student_entropy() const {
    if constexpr (kEntA) return fm::entropy_of(wa_total.d, wa_total.w);
    else if constexpr (kEntB) return fm::entropy_of(ob_total.d, ob_total.w);
    else return 0.0;
  }
};

// Pass 2 of the JSD: sum of the loss terms and of p_s (ls - lM), from both finished normalisers.
struct JsdPass {
  float inv_t, beta;
  fm::LseParts<float> s, t;
  double inv_t_d, beta_d;
  fm::LseParts<double> sd, td;
  Vec loss_v, kl_v;
  double loss = 0, kl = 0;
  void begin() { loss_v = kl_v = Vec(0.0f); }
  void vec(const Vec (&xs)[4], const Vec (&xt)[4]) {
    for (int i = 0; i < 4; ++i) {
      const Vec ls = fm::logprob_at(xs[i] * Vec(inv_t), Vec(s.m), Vec(s.log_scale));
      const Vec lt = fm::logprob_at(xt[i] * Vec(inv_t), Vec(t.m), Vec(t.log_scale));
      const auto terms = fm::jsd_terms(ls, lt, Vec(beta));
      loss_v = loss_v + terms.loss;
      kl_v = kl_v + terms.kl_sm;
    }
  }
  void flush() {
    loss += hsum(loss_v);
    kl += hsum(kl_v);
  }
  void scalar(double xs, double xt) {
    const auto terms = fm::jsd_terms(fm::logprob_at(xs * inv_t_d, sd.m, sd.log_scale),
                                     fm::logprob_at(xt * inv_t_d, td.m, td.log_scale), beta_d);
    loss += terms.loss;
    kl += terms.kl_sm;
  }
};

// The gradient row: out[j] = scale * (d divergence / d x_j + hard_weight (softmax(x)_j - [j = target])).
template <int kDiv, typename scalar_t>
void write_distill_grad(const scalar_t* s, const scalar_t* t, scalar_t* out, int64_t V, const DistillParams& p,
                        const double* stats, double scale, int64_t target) {
  using acc = acc_t<scalar_t>;
  const auto ps = fm::lse_parts<acc>(stats[kLseStudent]), pt = fm::lse_parts<acc>(stats[kLseTeacher]);
  const auto px = fm::lse_parts<acc>(stats[kLseHard]);
  const acc it = acc(p.inv_temperature), beta = acc(p.beta), aux = acc(stats[kRowAux]);
  const acc g = acc(scale * p.inv_temperature), gh = acc(scale * p.hard_weight);
  const bool hard = p.hard_weight != 0.0 && target >= 0;
  auto f = [&](auto vs, auto vt) {
    using T = decltype(vs);
    const T ls = fm::logprob_at(vs * splat_like<T>(it), splat_like<T>(ps.m), splat_like<T>(ps.log_scale));
    const T lt = fm::logprob_at(vt * splat_like<T>(it), splat_like<T>(pt.m), splat_like<T>(pt.log_scale));
    T d = fm::divergence_grad<kDiv>(ls, lt, splat_like<T>(beta), splat_like<T>(aux)) * splat_like<T>(g);
    if (hard) {
      d = d + splat_like<T>(gh) *
                  fm::exp_nonpos(fm::logprob_at(vs, splat_like<T>(px.m), splat_like<T>(px.log_scale)));
    }
    return d;
  };
  const acc s_k = hard ? acc(s[target]) : acc(0), t_k = hard ? acc(t[target]) : acc(0);  // before out overwrites s
  map_row(s, t, out, V, f);
  if (hard) out[target] = static_cast<scalar_t>(f(s_k, t_k) - gh);
}

template <int kDiv, bool kEnt, typename scalar_t>
void distill_rows(const scalar_t* ps, const scalar_t* pt, const int64_t* tgt, int64_t N, int64_t V,
                  const DistillParams& p, double* loss, double* stats, const double* scale, scalar_t* grad) {
  const bool hard = p.hard_weight != 0.0 && tgt != nullptr;
  const bool raw = hard && p.inv_temperature != 1.0;
  at::parallel_for(0, N, row_grain(V), [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      const scalar_t* s = ps + r * V;
      const scalar_t* t = pt + r * V;
      double* st = stats + r * kDistillStats;
      const int64_t target = tgt != nullptr ? tgt[r] : -1;
      if (tgt != nullptr && target == p.ignore_index) {
        loss[r] = 0.0;
        for (int64_t i = 0; i < kDistillStats; ++i) st[i] = 0.0;
        if (grad != nullptr) std::fill(grad + r * V, grad + (r + 1) * V, scalar_t(0));
        continue;
      }
      double lse_a, lse_b, kl_ab, lse_x = 0.0, ent = 0.0;
      auto pass1 = [&](auto raw_c) {
        constexpr bool kRaw = decltype(raw_c)::value;
        DistillPass<kDiv == fm::kReverseKL, kRaw, kEnt> pass{float(p.inv_temperature), p.inv_temperature};
        visit_rows<scalar_t>(s, t, V, pass);
        const auto& wt = pass.wa_total;
        const auto& ot = pass.ob_total;
        lse_a = lse_of(wt.m, wt.d);
        lse_b = lse_of(ot.m, ot.d);
        kl_ab = fm::kl_from_states(fm::WState<double>{wt.m, wt.d, wt.u}, fm::OnlineState<double>{ot.m, ot.d});
        ent = pass.student_entropy();
        if constexpr (kRaw) lse_x = lse_of(pass.ox_total.m, pass.ox_total.d);
      };
      if (raw) pass1(std::true_type{});
      else pass1(std::false_type{});
      const double lse_s = kDiv == fm::kReverseKL ? lse_a : lse_b, lse_t = kDiv == fm::kReverseKL ? lse_b : lse_a;
      double row = 0.0, aux = 0.0;
      if constexpr (kDiv == fm::kJSD) {
        JsdPass jp{float(p.inv_temperature), float(p.beta), fm::lse_parts<float>(lse_s), fm::lse_parts<float>(lse_t),
                   p.inv_temperature, p.beta, fm::lse_parts<double>(lse_s), fm::lse_parts<double>(lse_t)};
        visit_rows<scalar_t>(s, t, V, jp);
        row = jp.loss;
        aux = jp.kl;
      } else {
        row = kl_ab;
        if (kDiv == fm::kReverseKL) aux = row;
      }
      if (hard) {
        if (!raw) lse_x = lse_s;
        row += p.hard_weight * (lse_x - double(s[target]));
      }
      loss[r] = row;
      st[kLseStudent] = lse_s;
      st[kLseTeacher] = lse_t;
      st[kRowAux] = aux;
      st[kLseHard] = lse_x;
      st[kStudentEntropy] = ent;
      if (grad != nullptr) write_distill_grad<kDiv>(s, t, grad + r * V, V, p, st, scale[r], target);
    }
  });
}

// Calls f(std::integral_constant<int, divergence>).
template <typename F>
void with_divergence(int divergence, const F& f) {
  if (divergence == fm::kForwardKL) f(std::integral_constant<int, fm::kForwardKL>{});
  else if (divergence == fm::kReverseKL) f(std::integral_constant<int, fm::kReverseKL>{});
  else f(std::integral_constant<int, fm::kJSD>{});
}

inline void distill_forward(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& target,
                            const DistillParams& p, const at::Tensor& loss, const at::Tensor& stats,
                            const at::Tensor& grad_scale, const at::Tensor& grad) {
  const int64_t N = student.size(0), V = student.size(1);
  const int64_t* tgt = target.defined() ? target.const_data_ptr<int64_t>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, student.scalar_type(), "fastloss_distill_fwd_cpu", [&] {
    with_divergence(p.divergence, [&](auto div) {
      auto run = [&](auto ent) {
        distill_rows<decltype(div)::value, decltype(ent)::value>(
            student.const_data_ptr<scalar_t>(), teacher.const_data_ptr<scalar_t>(), tgt, N, V, p,
            loss.mutable_data_ptr<double>(), stats.mutable_data_ptr<double>(),
            grad.defined() ? grad_scale.const_data_ptr<double>() : nullptr,
            grad.defined() ? grad.mutable_data_ptr<scalar_t>() : nullptr);
      };
      if (p.student_entropy) run(std::true_type{});
      else run(std::false_type{});
    });
  });
}

inline void distill_backward(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& target,
                             const DistillParams& p, const at::Tensor& grad_loss, const at::Tensor& stats,
                             const at::Tensor& grad) {
  const int64_t N = student.size(0), V = student.size(1);
  const int64_t* tgt = target.defined() ? target.const_data_ptr<int64_t>() : nullptr;
  const double* gl = grad_loss.const_data_ptr<double>();
  const double* st = stats.const_data_ptr<double>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, student.scalar_type(), "fastloss_distill_bwd_cpu", [&] {
    const scalar_t* ps = student.const_data_ptr<scalar_t>();
    const scalar_t* pt = teacher.const_data_ptr<scalar_t>();
    scalar_t* pg = grad.mutable_data_ptr<scalar_t>();
    with_divergence(p.divergence, [&](auto div) {
      at::parallel_for(0, N, row_grain(V), [&](int64_t b, int64_t e) {
        for (int64_t r = b; r < e; ++r) {
          const int64_t target = tgt != nullptr ? tgt[r] : -1;
          if (tgt != nullptr && target == p.ignore_index) {
            std::fill(pg + r * V, pg + (r + 1) * V, scalar_t(0));
            continue;
          }
          write_distill_grad<decltype(div)::value>(ps + r * V, pt + r * V, pg + r * V, V, p,
                                                   st + r * kDistillStats, gl[r], target);
        }
      });
    });
  });
}

const PolicyKernels& policy_kernel_table() {
  static const PolicyKernels table{&logprob_forward, &logprob_backward, &distill_forward, &distill_backward};
  return table;
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace fastloss

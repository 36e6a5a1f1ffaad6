// CPU row kernels for cross-entropy from logits (the table of fastloss/cross_entropy_kernels.h).
//
// One pass per row computes the normaliser of the (optionally softcapped) logits together with whatever sums the
// loss needs (sum_c w_c x_c for label smoothing; sum_c w_c y'_c and sum_c w_c y'_c x_c for probability targets);
// the target logit is a single load. The gradient pass re-reads the row (from cache for LLM vocabularies: a row of
// 128K bf16 logits is 256 KB) and writes it once; the in-place variant writes it over the logits in the forward.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <tuple>
#include <utility>

#include "fastloss/cross_entropy_kernels.h"
#include "fastloss/loss_math.h"
#include "row_ops.h"

namespace fastloss {
namespace cpu {
inline namespace CPU_CAPABILITY {

struct Softcap {
  double cap, inv;
  // float lanes (and float / bf16 / fp16 rows) use the float constants, float64 rows the double ones
  template <class V>
  V operator()(V v) const {
    if constexpr (std::is_same_v<V, double>) return fm::softcap_apply(v, cap, inv);
    else return fm::softcap_apply(v, float(cap), float(inv));
  }
  template <class V>
  V grad(V capped) const {
    if constexpr (std::is_same_v<V, double>) return fm::softcap_grad(capped, inv);
    else return fm::softcap_grad(capped, float(inv));
  }
};

// Calls f(tx) with the per-element transform: Identity, or the softcap.
template <typename F>
void with_transform(const CrossEntropyParams& p, const F& f) {
  if (p.has_softcap) f(Softcap{p.softcap, 1.0 / p.softcap});
  else f(Identity{});
}

template <class Tx, class V>
inline V transform_grad(const Tx& tx, V capped) {
  if constexpr (std::is_same_v<Tx, Softcap>) return tx.grad(capped);
  else return splat_like<V>(1.0f);
}

// sum_c w_c (x'_c - shift) (w_c = 1 when unweighted), fused into the reduction pass. The shift (the row's first
// logit) keeps float lanes from cancelling catastrophically when all logits sit far from 0 (-1e4, say).
template <typename acc>
struct SmoothSum {
  const acc* w;
  acc shift;
  Vec s{0.0f};
  double total = 0;
  void vec(int64_t j, const Vec (&v)[4]) {
    const Vec sh(static_cast<float>(shift));
    if (w) {
      Vec wv[4];
      load4(w + j, wv);
      for (int i = 0; i < 4; ++i) s = at::vec::fmadd(v[i] - sh, wv[i], s);
    } else {
      s = s + (((v[0] - sh) + (v[1] - sh)) + ((v[2] - sh) + (v[3] - sh)));
    }
  }
  void scalar(int64_t j, acc v) { total += (w ? double(w[j]) : 1.0) * (double(v) - double(shift)); }
  void flush() {
    total += hsum(s);
    s = Vec(0.0f);
  }
  void reset() {
    s = Vec(0.0f);
    total = 0;
  }
};

// sum_c w_c y'_c and sum_c w_c y'_c (x'_c - shift) with y' = keep * y + add (label smoothing of probability
// targets); the shift as in SmoothSum.
template <typename scalar_t>
struct ProbSums {
  using acc = acc_t<scalar_t>;
  const scalar_t* y;
  const acc* w;
  double keep, add;
  acc shift;
  Vec sy{0.0f}, syx{0.0f};
  double total_y = 0, total_yx = 0;
  void vec(int64_t j, const Vec (&v)[4]) {
    Vec yv[4];
    load4(y + j, yv);
    Vec wv[4];
    if (w) load4(w + j, wv);
    for (int i = 0; i < 4; ++i) {
      Vec t = at::vec::fmadd(yv[i], Vec(float(keep)), Vec(float(add)));
      if (w) t = t * wv[i];
      sy = sy + t;
      syx = at::vec::fmadd(t, v[i] - Vec(static_cast<float>(shift)), syx);
    }
  }
  void scalar(int64_t j, acc v) {
    double t = keep * double(y[j]) + add;
    if (w) t *= w[j];
    total_y += t;
    total_yx += t * (double(v) - double(shift));
  }
  void flush() {
    total_y += hsum(sy);
    total_yx += hsum(syx);
    sy = Vec(0.0f);
    syx = Vec(0.0f);
  }
  void reset() {
    sy = syx = Vec(0.0f);
    total_y = total_yx = 0;
  }
};

template <typename acc>
struct SqRow {
  fm::OnlineState<acc> st;
  double sq;  // sum_c p_c^2 = d2 / d^2
  double d2;  // sum_c e^(2 (x'_c - m))
};

// squentropy's reduction: the online (m, d) of the row with a second running accumulator d2 = sum e^(2(x' - m))
// sharing its exponentials (fastloss/math.h OnlineSqState); float lanes flushed into double per chunk as in
// reduce_row. Returns the state (m, d) for the lse, sum_c p_c^2 = d2 / d^2 and d2. Always the online algorithm.
template <typename scalar_t, class Tx>
SqRow<acc_t<scalar_t>> row_state_sq(const scalar_t* x, int64_t n, const Tx& tx) {
  using acc = acc_t<scalar_t>;
  auto total = fm::online_sq_init<double>();
  auto widen = [](acc v) { return (std::is_same_v<acc, float> && v == acc(-FLT_MAX)) ? -DBL_MAX : double(v); };
  int64_t j = 0;
  if constexpr (kVectorized<scalar_t>) {
    while (j + kBlock <= n) {
      const int64_t end = std::min(n, j + kChunk);
      auto s = fm::online_sq_init<float, Vec>();
      for (; j + 2 * kBlock <= end; j += 2 * kBlock) {  // pairs of blocks: one rescale per 8 vectors
        Vec a[4], b[4];
        load4(x + j, a);
        load4(x + j + kBlock, b);
        const Vec v[8] = {tx(a[0]), tx(a[1]), tx(a[2]), tx(a[3]), tx(b[0]), tx(b[1]), tx(b[2]), tx(b[3])};
        s = fm::online_sq_update_block(s, v);
      }
      for (; j + kBlock <= end; j += kBlock) {
        Vec v[4];
        load4(x + j, v);
        for (auto& e : v) e = tx(e);
        s = fm::online_sq_update_block(s, v);
      }
      const float m = lane_max(s.m);
      const Vec r = fm::exp_nonpos(s.m - Vec(m));
      total = fm::online_sq_merge(total, {widen(m), hsum(s.d * r), hsum(s.d2 * (r * r))});
    }
  }
  auto tail = fm::online_sq_init<acc>();
  for (; j < n; ++j) tail = fm::online_sq_update(tail, tx(static_cast<acc>(x[j])));
  total = fm::online_sq_merge(total, {widen(tail.m), double(tail.d), double(tail.d2)});
  const acc m = (std::is_same_v<acc, float> && total.m == -DBL_MAX) ? acc(-FLT_MAX) : acc(total.m);
  return {fm::OnlineState<acc>{m, acc(total.d)}, total.d2 / (total.d * total.d), total.d2};
}

// sum_c p_c^2 of a row from its saved lse (the backward's extra pass for squentropy).
template <typename scalar_t, class Tx>
double row_sum_sq(const scalar_t* x, int64_t C, const Tx& tx, acc_t<scalar_t> m, acc_t<scalar_t> inv_d) {
  return sum_row(x, x, C, [&](auto v, auto) {
    using T = decltype(v);
    const T p = fm::softmax_at(tx(v), splat_like<T>(m), splat_like<T>(inv_d));
    return p * p;
  });
}

// The first transformed logit when finite (else 0): the shift of the fused sums.
template <typename scalar_t, class Tx>
acc_t<scalar_t> row_shift(const scalar_t* x, int64_t C, const Tx& tx) {
  using acc = acc_t<scalar_t>;
  const acc v = C > 0 ? tx(static_cast<acc>(x[0])) : acc(0);
  return std::isfinite(static_cast<double>(v)) ? v : acc(0);
}

// A float64 lse as (m, 1/d) for softmax_at (fastloss/math.h lse_parts).
template <typename acc>
inline fm::OnlineState<acc> normaliser_from_lse(double lse) {
  const auto p = fm::lse_parts<acc>(lse);
  return {p.m, p.scale};
}

// grad[c] = (a p_c - b w_c) * dx'/dx, then the target entry recomputed as (a p_t - b w_t - c_t) * dx'/dx in acc.
// out may alias x (in-place variant): x_t_capped was read before the pass.
template <typename scalar_t, class Tx>
void write_index_grad(const scalar_t* x, scalar_t* out, int64_t C, const Tx& tx, acc_t<scalar_t> m,
                      acc_t<scalar_t> inv_d, fm::CeRow<acc_t<scalar_t>> k, const acc_t<scalar_t>* w, int64_t t,
                      acc_t<scalar_t> x_t_capped) {
  using acc = acc_t<scalar_t>;
  // Two instantiations of the row loop: the p_c^2 term (squentropy) only where it is nonzero, so the other losses
  // pay nothing for it.
  auto run = [&](auto with_sq) {
    constexpr bool kSq = decltype(with_sq)::value;
    auto f = [&](auto v, auto wv) {
      using T = decltype(v);
      T xp = tx(v);
      const T p = fm::softmax_at(xp, splat_like<T>(m), splat_like<T>(inv_d));
      T g = splat_like<T>(k.a) * p - splat_like<T>(k.b) * wv;
      if constexpr (kSq) g = g + splat_like<T>(k.a2) * p * p;
      return g * transform_grad(tx, xp);
    };
    int64_t j = 0;
    if constexpr (kVectorized<scalar_t>) {
      for (; j + kStep <= C; j += kStep) {
        Vec a0, a1;
        load2(x + j, a0, a1);
        Vec w0(1.0f), w1(1.0f);
        if (w) {
          w0 = Vec::loadu(w + j);
          w1 = Vec::loadu(w + j + Vec::size());
        }
        store2(out + j, f(a0, w0), f(a1, w1));
      }
    }
    for (; j < C; ++j) out[j] = static_cast<scalar_t>(f(static_cast<acc>(x[j]), w ? w[j] : acc(1)));
  };
  if (k.a2 != acc(0)) run(std::true_type{});
  else run(std::false_type{});
  if (t >= 0) {
    const acc p_t = fm::softmax_at(x_t_capped, m, inv_d);
    const acc w_t = w ? acc(w[t]) : acc(1);
    out[t] = static_cast<scalar_t>((k.a * p_t + k.a2 * p_t * p_t - k.b * w_t - k.c_t) * transform_grad(tx, x_t_capped));
  }
}

// The reduction pass over one row of class-index cross-entropy (index_forward and the shard forward): the
// normaliser, with the label-smoothing sum or squentropy's squares fused in.
template <typename acc>
struct IndexRow {
  fm::OnlineState<acc> st;
  double sum_w_dx = 0;  // label smoothing: sum_c w_c (x'_c - shift)
  acc shift = 0;
  double sq = 0;  // squentropy: sum_c p_c^2 ...
  double d2 = 0;  // ... and sum_c e^(2 (x'_c - m))
};

template <typename scalar_t, class Tx>
IndexRow<acc_t<scalar_t>> index_row(const scalar_t* xr, int64_t C, const CrossEntropyParams& p, const Tx& tx,
                                    const acc_t<scalar_t>* w) {
  using acc = acc_t<scalar_t>;
  IndexRow<acc> r;
  if (acc(p.label_smoothing) != acc(0)) {
    r.shift = row_shift(xr, C, tx);
    SmoothSum<acc> sums{w, r.shift};
    r.st = row_state(xr, C, p.algorithm, tx, sums);
    r.sum_w_dx = sums.total;
  } else if (p.loss_kind == fm::kLossSquentropy) {
    const auto q = row_state_sq(xr, C, tx);
    r.st = q.st;
    r.sq = q.sq;
    r.d2 = q.d2;
  } else {
    r.st = row_state(xr, C, p.algorithm, tx);
  }
  return r;
}

template <typename scalar_t>
void zero_row(scalar_t* out, int64_t C) {
  std::fill(out, out + C, scalar_t(0));
}

inline void ce_index_forward(const CrossEntropyInputs& in, const CrossEntropyParams& p, const at::Tensor& loss,
                             const at::Tensor& lse, const at::Tensor& grad_scale, const at::Tensor& grad_logits) {
  const int64_t N = in.logits.size(0), C = in.logits.size(1);
  const int64_t* tgt = in.target.const_data_ptr<int64_t>();
  const double W = in.weight_sum.defined() ? in.weight_sum.item<double>() : double(C);
  const bool fused = grad_logits.defined();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, in.logits.scalar_type(), "fastloss_ce_fwd_cpu", [&] {
    using acc = acc_t<scalar_t>;
    const acc* w = in.weight.defined() ? in.weight.const_data_ptr<acc>() : nullptr;
    const double* gs = fused ? grad_scale.const_data_ptr<double>() : nullptr;
    double* ploss = loss.mutable_data_ptr<double>();
    double* plse = lse.mutable_data_ptr<double>();
    const scalar_t* px = in.logits.const_data_ptr<scalar_t>();
    scalar_t* pg = fused ? grad_logits.mutable_data_ptr<scalar_t>() : nullptr;
    const acc eps = acc(p.label_smoothing), invC = acc(1.0 / double(C)), z = acc(p.z_loss);
    const double inv_cm1 = C > 1 ? 1.0 / double(C - 1) : 0.0;
    double* psq = in.sum_sq.defined() ? in.sum_sq.mutable_data_ptr<double>() : nullptr;
    with_transform(p, [&](auto tx) {
      at::parallel_for(0, N, row_grain(C), [&](int64_t b, int64_t e) {
        for (int64_t r = b; r < e; ++r) {
          const scalar_t* xr = px + r * C;
          const int64_t t = tgt[r];
          if (t == p.ignore_index) {
            if (psq) psq[r] = 0.0;
            ploss[r] = 0.0;
            plse[r] = 0.0;
            if (fused) zero_row(pg + r * C, C);
            continue;
          }
          const auto row = index_row(xr, C, p, tx, w);
          const auto st = row.st;
          const double sq = row.sq;
          const double l = finish_lse(st, xr, C);
          const acc x_t = tx(static_cast<acc>(xr[t]));
          const acc w_t = w ? w[t] : acc(1);
          ploss[r] = fm::ce_index_loss_kind<double>(p.loss_kind, p.loss_param, l, x_t, w_t, row.sum_w_dx, row.shift,
                                                    W, p.label_smoothing, 1.0 / double(C), p.z_loss, sq, inv_cm1);
          plse[r] = l;
          if (psq) psq[r] = sq;
          if (fused) {
            auto k = fm::ce_index_coefs_kind(p.loss_kind, acc(p.loss_param), acc(gs[r]), acc(0), acc(l), x_t, w_t,
                                             acc(W), eps, invC, z, acc(sq), acc(inv_cm1));
            write_index_grad(xr, pg + r * C, C, tx, st.m, acc(1) / st.d, k, w, t, x_t);
          }
        }
      });
    });
  });
}

// A row's saved statistics for its gradient pass: lse, x'_t, w_t, squentropy's sum_c p_c^2, and the target's column
// in these logits (-1: the target lies in another vocabulary shard).
struct GradRow {
  double lse, x_t, w_t, sq;
  int64_t t;
};

// grad_logits[r] = grad_loss[r] dloss_r/dlogits + grad_lse[r] softmax (grad_lse may be undefined) for every row whose
// target is not ignore_index (others zero), from stats(r, xr, tx, w) -> GradRow: index_backward's rows and a
// vocabulary shard's. W, inv_C, inv_cm1: the vocabulary's class-weight sum, 1 / V and 1 / (V - 1) (0 when V = 1).
template <class Stats>
void index_backward_rows(const CrossEntropyInputs& in, const CrossEntropyParams& p, double W, double inv_C,
                         double inv_cm1, const at::Tensor& grad_loss, const at::Tensor& grad_lse,
                         const at::Tensor& grad_logits, const Stats& stats) {
  const int64_t N = in.logits.size(0), C = in.logits.size(1);
  const int64_t* tgt = in.target.const_data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, in.logits.scalar_type(), "fastloss_ce_bwd_cpu", [&] {
    using acc = acc_t<scalar_t>;
    const acc* w = in.weight.defined() ? in.weight.const_data_ptr<acc>() : nullptr;
    const double* gl = grad_loss.const_data_ptr<double>();
    const double* gz = grad_lse.defined() ? grad_lse.const_data_ptr<double>() : nullptr;
    const scalar_t* px = in.logits.const_data_ptr<scalar_t>();
    scalar_t* pg = grad_logits.mutable_data_ptr<scalar_t>();
    const acc eps = acc(p.label_smoothing), invC = acc(inv_C), z = acc(p.z_loss);
    with_transform(p, [&](auto tx) {
      at::parallel_for(0, N, row_grain(C), [&](int64_t b, int64_t e) {
        for (int64_t r = b; r < e; ++r) {
          if (tgt[r] == p.ignore_index) {
            zero_row(pg + r * C, C);
            continue;
          }
          const scalar_t* xr = px + r * C;
          const GradRow s = stats(r, xr, tx, w);
          const auto nd = normaliser_from_lse<acc>(s.lse);
          auto k = fm::ce_index_coefs_kind(p.loss_kind, acc(p.loss_param), acc(gl[r]), gz ? acc(gz[r]) : acc(0),
                                           acc(s.lse), acc(s.x_t), acc(s.w_t), acc(W), eps, invC, z, acc(s.sq),
                                           acc(inv_cm1));
          write_index_grad(xr, pg + r * C, C, tx, nd.m, nd.d, k, w, s.t, acc(s.x_t));
        }
      });
    });
  });
}

template <class W>
using acc_of = std::remove_const_t<std::remove_pointer_t<W>>;

inline void ce_index_backward(const CrossEntropyInputs& in, const CrossEntropyParams& p, const at::Tensor& grad_loss,
                              const at::Tensor& grad_lse, const at::Tensor& lse, const at::Tensor& grad_logits) {
  const int64_t C = in.logits.size(1);
  const int64_t* tgt = in.target.const_data_ptr<int64_t>();
  const double W = in.weight_sum.defined() ? in.weight_sum.item<double>() : double(C);
  const bool squentropy = p.loss_kind == fm::kLossSquentropy;
  const double* plse = lse.const_data_ptr<double>();
  const double* psq = in.sum_sq.defined() ? in.sum_sq.const_data_ptr<double>() : nullptr;
  index_backward_rows(in, p, W, 1.0 / double(C), C > 1 ? 1.0 / double(C - 1) : 0.0, grad_loss, grad_lse, grad_logits,
                      [&](int64_t r, const auto* xr, const auto& tx, const auto* w) {
    using acc = acc_of<decltype(w)>;
    const int64_t t = tgt[r];
    const acc x_t = tx(static_cast<acc>(xr[t]));
    double sq = 0.0;
    if (squentropy) {
      const auto nd = normaliser_from_lse<acc>(plse[r]);
      sq = psq ? psq[r] : row_sum_sq(xr, C, tx, nd.m, nd.d);
    }
    return GradRow{plse[r], double(x_t), w ? double(w[t]) : 1.0, sq, t};
  });
}

// ---------------------------------------------------------------- vocabulary shards (fastloss/loss_math.h)

// stats[r] = (m, d, x'_t or 0, sum_c w_c x'_c or d2 or 0) of the shard's row from index_forward's reduction pass;
// ignored rows zero and not read. The op layer handles C = 0.
inline void ce_shard_forward(const CrossEntropyInputs& in, const CrossEntropyParams& p, const at::Tensor& stats) {
  const int64_t N = in.logits.size(0), C = in.logits.size(1);
  const int64_t* tgt = in.target.const_data_ptr<int64_t>();
  const double W_local = in.weight_sum.defined() ? in.weight_sum.item<double>() : double(C);
  const bool smooth = p.label_smoothing != 0.0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, in.logits.scalar_type(), "fastloss_ce_shard_fwd_cpu", [&] {
    using acc = acc_t<scalar_t>;
    const acc* w = in.weight.defined() ? in.weight.const_data_ptr<acc>() : nullptr;
    const scalar_t* px = in.logits.const_data_ptr<scalar_t>();
    double* ps = stats.mutable_data_ptr<double>();
    with_transform(p, [&](auto tx) {
      at::parallel_for(0, N, row_grain(C), [&](int64_t b, int64_t e) {
        for (int64_t r = b; r < e; ++r) {
          double* o = ps + r * fm::kShardStats;
          const int64_t t = tgt[r];
          if (t == p.ignore_index) {
            std::fill(o, o + fm::kShardStats, 0.0);
            continue;
          }
          const scalar_t* xr = px + r * C;
          const auto row = index_row(xr, C, p, tx, w);
          o[0] = fm::shard_max(row.st.m, row.st.d);
          o[1] = double(row.st.d);
          // t >= vocab_start first: a negative target never overflows t - vocab_start
          o[2] = t >= p.vocab_start && t - p.vocab_start < C ? double(tx(static_cast<acc>(xr[t - p.vocab_start])))
                                                             : 0.0;
          o[3] = smooth ? row.sum_w_dx + W_local * double(row.shift) : row.d2;
        }
      });
    });
  });
}

inline void ce_shard_loss(const at::Tensor& rows, const at::Tensor& target, const at::Tensor& weight_sum,
                          const CrossEntropyParams& p, const at::Tensor& loss) {
  const int64_t N = rows.size(0), V = p.vocab_size;
  const double W = weight_sum.defined() ? weight_sum.item<double>() : double(V);
  const double inv_vm1 = V > 1 ? 1.0 / double(V - 1) : 0.0;
  const double* pr = rows.const_data_ptr<double>();
  const int64_t* tgt = target.const_data_ptr<int64_t>();
  double* pl = loss.mutable_data_ptr<double>();
  at::parallel_for(0, N, 4096, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      const double* s = pr + r * fm::kShardStats;
      pl[r] = tgt[r] == p.ignore_index ? 0.0
                                       : fm::ce_shard_loss(p.loss_kind, p.loss_param, s[0], s[1], s[2], s[3], W,
                                                           p.label_smoothing, 1.0 / double(V), p.z_loss, inv_vm1);
    }
  });
}

// The shard's columns of the gradient: the coefficients from the combined rows, the target entry only in its shard.
inline void ce_shard_backward(const CrossEntropyInputs& in, const CrossEntropyParams& p, const at::Tensor& grad_loss,
                              const at::Tensor& grad_lse, const at::Tensor& rows, const at::Tensor& weight_sum,
                              const at::Tensor& grad_logits) {
  const int64_t C = in.logits.size(1), V = p.vocab_size, v0 = p.vocab_start;
  const int64_t* tgt = in.target.const_data_ptr<int64_t>();
  const double* pr = rows.const_data_ptr<double>();
  index_backward_rows(in, p, weight_sum.item<double>(), 1.0 / double(V), V > 1 ? 1.0 / double(V - 1) : 0.0, grad_loss,
                      grad_lse, grad_logits, [&](int64_t r, const auto* xr, const auto& tx, const auto*) {
    using acc = acc_t<std::remove_const_t<std::remove_pointer_t<decltype(xr)>>>;
    const double* s = pr + r * fm::kShardStats;
    const int64_t t = tgt[r];
    const bool owned = t >= v0 && t - v0 < C;
    const double x_t = owned ? double(tx(static_cast<acc>(xr[t - v0]))) : s[1];
    return GradRow{s[0], x_t, s[2], s[3], owned ? t - v0 : -1};
  });
}

inline void ce_prob_forward(const CrossEntropyInputs& in, const CrossEntropyParams& p, const at::Tensor& loss,
                            const at::Tensor& lse, const at::Tensor& sum_wy) {
  const int64_t N = in.logits.size(0), C = in.logits.size(1);
  const double keep = 1.0 - p.label_smoothing, add = p.label_smoothing / double(C);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, in.logits.scalar_type(), "fastloss_ce_prob_fwd_cpu", [&] {
    using acc = acc_t<scalar_t>;
    const acc* w = in.weight.defined() ? in.weight.const_data_ptr<acc>() : nullptr;
    double* ploss = loss.mutable_data_ptr<double>();
    double* plse = lse.mutable_data_ptr<double>();
    double* psy = sum_wy.mutable_data_ptr<double>();
    const scalar_t* px = in.logits.const_data_ptr<scalar_t>();
    const scalar_t* py = in.target.const_data_ptr<scalar_t>();
    with_transform(p, [&](auto tx) {
      at::parallel_for(0, N, row_grain(C), [&](int64_t b, int64_t e) {
        for (int64_t r = b; r < e; ++r) {
          const scalar_t* xr = px + r * C;
          const acc shift = row_shift(xr, C, tx);
          ProbSums<scalar_t> sums{py + r * C, w, keep, add, shift};
          auto st = row_state(xr, C, p.algorithm, tx, sums);
          const double l = finish_lse(st, xr, C);
          ploss[r] = fm::ce_prob_loss<double>(l, sums.total_y, sums.total_yx, shift, p.z_loss);
          plse[r] = l;
          psy[r] = sums.total_y;
        }
      });
    });
  });
}

inline void ce_prob_backward(const CrossEntropyInputs& in, const CrossEntropyParams& p, const at::Tensor& grad_loss,
                             const at::Tensor& grad_lse, const at::Tensor& lse, const at::Tensor& sum_wy,
                             const at::Tensor& grad_logits) {
  const int64_t N = in.logits.size(0), C = in.logits.size(1);
  const double keep = 1.0 - p.label_smoothing, add = p.label_smoothing / double(C);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, in.logits.scalar_type(), "fastloss_ce_prob_bwd_cpu", [&] {
    using acc = acc_t<scalar_t>;
    const acc* w = in.weight.defined() ? in.weight.const_data_ptr<acc>() : nullptr;
    const double* gl = grad_loss.const_data_ptr<double>();
    const double* gz = grad_lse.defined() ? grad_lse.const_data_ptr<double>() : nullptr;
    const double* plse = lse.const_data_ptr<double>();
    const double* psy = sum_wy.const_data_ptr<double>();
    const scalar_t* px = in.logits.const_data_ptr<scalar_t>();
    const scalar_t* py = in.target.const_data_ptr<scalar_t>();
    scalar_t* pg = grad_logits.mutable_data_ptr<scalar_t>();
    with_transform(p, [&](auto tx) {
      at::parallel_for(0, N, row_grain(C), [&](int64_t b, int64_t e) {
        for (int64_t r = b; r < e; ++r) {
          const acc g = acc(gl[r]);
          const acc a = acc(gl[r] * (psy[r] + 2.0 * p.z_loss * plse[r]) + (gz ? gz[r] : 0.0));
          const auto nd = normaliser_from_lse<acc>(plse[r]);
          const scalar_t* xr = px + r * C;
          const scalar_t* yr = py + r * C;
          scalar_t* out = pg + r * C;
          // grad_c = (a p_c - g w_c y'_c) dx'/dx
          auto f = [&](auto v, auto y, auto wv) {
            using T = decltype(v);
            T xp = tx(v);
            T yp = y * splat_like<T>(keep) + splat_like<T>(add);
            T gv = splat_like<T>(a) * fm::softmax_at(xp, splat_like<T>(nd.m), splat_like<T>(nd.d)) -
                   splat_like<T>(g) * wv * yp;
            return gv * transform_grad(tx, xp);
          };
          int64_t j = 0;
          if constexpr (kVectorized<scalar_t>) {
            for (; j + kStep <= C; j += kStep) {
              Vec x0, x1, y0, y1, w0(1.0f), w1(1.0f);
              load2(xr + j, x0, x1);
              load2(yr + j, y0, y1);
              if (w) {
                w0 = Vec::loadu(w + j);
                w1 = Vec::loadu(w + j + Vec::size());
              }
              store2(out + j, f(x0, y0, w0), f(x1, y1, w1));
            }
          }
          for (; j < C; ++j)
            out[j] = static_cast<scalar_t>(f(acc(xr[j]), acc(yr[j]), w ? w[j] : acc(1)));
        }
      });
    });
  });
}

inline void scale_rows_kernel(const at::Tensor& x, const at::Tensor& scale) {
  const int64_t N = x.size(0), C = x.size(1);
  const bool per_row = scale.numel() == N && scale.dim() == 1;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "fastloss_scale_rows_cpu", [&] {
    using acc = acc_t<scalar_t>;
    const double* ps = scale.const_data_ptr<double>();
    scalar_t* px = x.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, N, row_grain(C), [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) {
        const acc s = acc(ps[per_row ? r : 0]);
        if (ps[per_row ? r : 0] == 1.0) continue;
        scalar_t* xr = px + r * C;
        map_row(xr, xr, xr, C, [&](auto v, auto) { return v * splat_like<decltype(v)>(s); });
      }
    });
  });
}

const CrossEntropyKernels& ce_kernel_table() {
  static const CrossEntropyKernels table{&ce_index_forward, &ce_index_backward, &ce_prob_forward, &ce_prob_backward,
                                         &scale_rows_kernel, &ce_shard_forward, &ce_shard_loss, &ce_shard_backward};
  return table;
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace fastloss

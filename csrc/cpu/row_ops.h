// The row machinery every CPU kernel shares: typed loads as float lanes, the chunked reduction of a row to its
// normaliser (either algorithm, with an optional per-element transform and extra accumulators fused into the same
// pass), and elementwise row maps. Included once per instruction set (CPU_CAPABILITY inline namespace).
#pragma once

#include <ATen/NumericUtils.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <cfloat>
#include <limits>
#include <type_traits>

#include "fastloss/math.h"
#include "fastloss/softmax_kernels.h"
#include "vec_ops.h"

namespace fastloss {
namespace cpu {
inline namespace CPU_CAPABILITY {

namespace fm = fastloss::math;
using Vec = at::vec::Vectorized<float>;

template <typename scalar_t>
using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// float64 rows run the scalar double instantiation of the same formulas (no SIMD).
template <typename scalar_t>
constexpr bool kVectorized = !std::is_same_v<scalar_t, double>;

// kStep elements of any input type <-> two float vectors; reductions fold two steps (kBlock) at a time.
constexpr int64_t kStep = 2 * Vec::size();
constexpr int64_t kBlock = 2 * kStep;

// SIMD lane states are flushed into a double accumulator every kChunk elements: a float lane summing more than
// 2^24 terms of similar size stops growing (a row of 2^30 equal logits would lose half its log-sum-exp).
constexpr int64_t kChunk = 8192;

template <typename scalar_t>
inline void load2(const scalar_t* p, Vec& a, Vec& b) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    a = Vec::loadu(p);
    b = Vec::loadu(p + Vec::size());
  } else {
    static_assert(at::vec::Vectorized<scalar_t>::size() == kStep);
    std::tie(a, b) = at::vec::convert_to_float<scalar_t>(at::vec::Vectorized<scalar_t>::loadu(p));
  }
}

inline void load4(const float* p, Vec (&v)[4]) {
  for (int i = 0; i < 4; ++i) v[i] = Vec::loadu(p + i * Vec::size());
}

template <typename scalar_t>
inline void load4(const scalar_t* p, Vec (&v)[4]) {
  load2(p, v[0], v[1]);
  load2(p + kStep, v[2], v[3]);
}

template <typename scalar_t>
inline void store2(scalar_t* p, Vec a, Vec b) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    a.store(p);
    b.store(p + Vec::size());
  } else {
    at::vec::convert_from_float<scalar_t>(a, b).store(p);
  }
}

template <typename T>
inline T lane(const Vec& v, int i) {  // cold path: once per lane per chunk
  float tmp[Vec::size()];
  v.store(tmp);
  return tmp[i];
}

inline double hsum(const Vec& v) {
  float tmp[Vec::size()];
  v.store(tmp);
  double s = 0;
  for (int l = 0; l < Vec::size(); ++l) s += tmp[l];
  return s;
}

// A per-row scalar broadcast to whatever a generic lambda is called with (a Vec or one scalar).
template <typename T, typename S>
inline T splat_like(S c) {
  if constexpr (std::is_same_v<T, Vec>) return Vec(static_cast<float>(c));
  else return static_cast<T>(c);
}

// ---------------------------------------------------------------- per-element transforms and extra sums

struct Identity {
  template <class V>
  V operator()(V v) const { return v; }
};

// Extra accumulators fused into a reduction pass see every transformed element: vec() a block of kBlock at
// offset j, scalar() one tail element; flush() closes a chunk; reset() starts over (two-pass fallback).
struct NoExtra {
  void vec(int64_t, const Vec (&)[4]) {}
  template <class A>
  void scalar(int64_t, A) {}
  void flush() {}
  void reset() {}
};

// ---------------------------------------------------------------- reduction of a row to its normaliser

// The lanes of a SIMD state folded into one scalar state: the lanes' max, then one vector rescale and a horizontal
// sum (the same merge rule, without a scalar exp per lane).
inline float lane_max(const Vec& v) {
  float tmp[Vec::size()];
  v.store(tmp);
  float m = tmp[0];
  for (int l = 1; l < Vec::size(); ++l) m = fm::Ops<float>::max(m, tmp[l]);
  return m;
}

inline fm::OnlineState<float> fold_lanes(const fm::OnlineState<Vec>& s) {
  const float m = lane_max(s.m);
  const Vec d = s.d * fm::exp_nonpos(s.m - Vec(m));
  return {m, static_cast<float>(hsum(d))};
}

inline fm::ExpState<float> fold_lanes(const fm::ExpState<Vec>& s) {
  const float k = lane_max(s.k);
  const Vec a = s.a * fm::pow2_or_zero(s.k - Vec(k));
  return {static_cast<float>(hsum(a)), k};
}

template <bool kTwoPass, typename T>
using StateT = std::conditional_t<kTwoPass, fm::ExpState<T>, fm::OnlineState<T>>;

// One pass over x[0..n): the online (m, d) or the two-pass (a, k) state of tx(x), SIMD lanes over blocks,
// flushed into double per chunk, scalar tail.
template <bool kTwoPass, typename scalar_t, class Tx, class Extra>
StateT<kTwoPass, acc_t<scalar_t>> reduce_row(const scalar_t* x, int64_t n, const Tx& tx, Extra& extra) {
  using acc = acc_t<scalar_t>;
  StateT<kTwoPass, double> total;
  if constexpr (kTwoPass) total = fm::exp_init<double>();
  else total = fm::online_init<double>();
  // The initial exponent / max of a float state is -FLT_MAX; in double it is -DBL_MAX. Map between them.
  auto widen = [](acc v) { return (std::is_same_v<acc, float> && v == acc(-FLT_MAX)) ? -DBL_MAX : double(v); };
  int64_t j = 0;
  if constexpr (kVectorized<scalar_t>) {
    while (j + kBlock <= n) {
      const int64_t end = std::min(n, j + kChunk);
      StateT<kTwoPass, Vec> s;
      if constexpr (kTwoPass) s = fm::exp_init<float, Vec>();
      else s = fm::online_init<float, Vec>();
      // Pairs of blocks first: one rescale of the running state per 8 vectors (9 exponentials per 8 vectors for
      // online instead of 10), measured ~5% faster on the AVX2 CI machine; then at most one single block.
      for (; j + 2 * kBlock <= end; j += 2 * kBlock) {
        Vec a[4], b[4];
        load4(x + j, a);
        load4(x + j + kBlock, b);
        for (auto& e : a) e = tx(e);
        for (auto& e : b) e = tx(e);
        extra.vec(j, a);
        extra.vec(j + kBlock, b);
        const Vec v[8] = {a[0], a[1], a[2], a[3], b[0], b[1], b[2], b[3]};
        if constexpr (kTwoPass) s = fm::exp_update_block(s, v);
        else s = fm::online_update_block(s, v);
      }
      for (; j + kBlock <= end; j += kBlock) {
        Vec v[4];
        load4(x + j, v);
        for (auto& e : v) e = tx(e);
        extra.vec(j, v);
        if constexpr (kTwoPass) s = fm::exp_update_block(s, v);
        else s = fm::online_update_block(s, v);
      }
      extra.flush();
      const auto f = fold_lanes(s);
      if constexpr (kTwoPass) total = fm::exp_merge(total, {double(f.a), widen(f.k)});
      else total = fm::online_merge(total, {widen(f.m), double(f.d)});
    }
  }
  StateT<kTwoPass, acc> tail;
  if constexpr (kTwoPass) tail = fm::exp_init<acc>();
  else tail = fm::online_init<acc>();
  for (; j < n; ++j) {
    const acc v = tx(static_cast<acc>(x[j]));
    extra.scalar(j, v);
    if constexpr (kTwoPass) tail = fm::exp_update(tail, fm::split_exp(v));
    else tail = fm::online_update(tail, v);
  }
  extra.flush();
  // Back to acc: exponents / maxima are exact in acc, sums round once.
  auto narrow = [](double v) { return (std::is_same_v<acc, float> && v == -DBL_MAX) ? acc(-FLT_MAX) : acc(v); };
  if constexpr (kTwoPass) {
    total = fm::exp_merge(total, {double(tail.a), widen(tail.k)});
    return {acc(total.a), narrow(total.k)};
  } else {
    total = fm::online_merge(total, {widen(tail.m), double(tail.d)});
    return {narrow(total.m), acc(total.d)};
  }
}

// The row's normaliser (m, d) by either algorithm (two-pass falls back to online where its split is inexact).
template <typename scalar_t, class Tx = Identity, class Extra = NoExtra>
fm::OnlineState<acc_t<scalar_t>> row_state(const scalar_t* x, int64_t n, Algorithm alg, const Tx& tx = {},
                                           Extra&& extra = {}) {
  if (alg == Algorithm::TwoPass) {
    auto s = reduce_row<true>(x, n, tx, extra);
    if (!fm::exp_needs_fallback(s)) return fm::exp_to_online(s);
    extra.reset();
  }
  return reduce_row<false>(x, n, tx, extra);
}

// lse (in double: m + log d) from a finished state. The one case the state cannot express (a +inf in the row:
// m = inf, d = NaN) looks at the row: torch.logsumexp gives +inf there unless the row also holds a NaN.
template <typename scalar_t>
double finish_lse(fm::OnlineState<acc_t<scalar_t>> s, const scalar_t* x, int64_t n) {
  if (s.m == std::numeric_limits<acc_t<scalar_t>>::infinity()) {
    for (int64_t j = 0; j < n; ++j)
      if (at::_isnan(x[j])) return std::numeric_limits<double>::quiet_NaN();
    return std::numeric_limits<double>::infinity();
  }
  return double(s.m) + std::log(double(s.d));
}

// ---------------------------------------------------------------- elementwise row passes

// out[j] = f(a[j], b[j]) with f a generic lambda over Vec and scalar acc_t.
template <typename scalar_t, typename F>
inline void map_row(const scalar_t* a, const scalar_t* b, scalar_t* out, int64_t n, const F& f) {
  using acc = acc_t<scalar_t>;
  int64_t j = 0;
  if constexpr (kVectorized<scalar_t>) {
    for (; j + kStep <= n; j += kStep) {
      Vec a0, a1, b0, b1;
      load2(a + j, a0, a1);
      load2(b + j, b0, b1);
      store2(out + j, f(a0, b0), f(a1, b1));
    }
  }
  for (; j < n; ++j) out[j] = static_cast<scalar_t>(f(static_cast<acc>(a[j]), static_cast<acc>(b[j])));
}

// sum_j f(a[j], b[j]) accumulated in acc_t lanes (double across chunks).
template <typename scalar_t, typename F>
inline double sum_row(const scalar_t* a, const scalar_t* b, int64_t n, const F& f) {
  using acc = acc_t<scalar_t>;
  double total = 0;
  int64_t j = 0;
  if constexpr (kVectorized<scalar_t>) {
    while (j + kStep <= n) {
      const int64_t end = std::min(n, j + kChunk);
      Vec s0(0.0f), s1(0.0f);
      for (; j + kStep <= end; j += kStep) {
        Vec a0, a1, b0, b1;
        load2(a + j, a0, a1);
        load2(b + j, b0, b1);
        s0 = s0 + f(a0, b0);
        s1 = s1 + f(a1, b1);
      }
      total += hsum(s0 + s1);
    }
  }
  for (; j < n; ++j) total += f(static_cast<acc>(a[j]), static_cast<acc>(b[j]));
  return total;
}

inline int64_t row_grain(int64_t V) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(V, 1)); }

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace fastloss

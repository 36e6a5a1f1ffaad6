// CPU row kernels for softmax / log_softmax / logsumexp and their backwards.
//
// Included once per instruction set (kernels_default.cpp, kernels_avx2.cpp) with CPU_CAPABILITY set; everything
// lives in that inline namespace. Rows run in parallel (at::parallel_for); the body of a row runs on
// at::vec::Vectorized<float> lanes with the formulas of fastloss/math.h, its tail on the scalar instantiation of
// the same formulas. float64 input runs the scalar double instantiation (no SIMD).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/NumericUtils.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <type_traits>
#include <vector>

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

template <typename scalar_t>
constexpr bool kVectorized = !std::is_same_v<scalar_t, double>;

// kStep elements of any input type <-> two float vectors.
constexpr int64_t kStep = 2 * Vec::size();

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

// ---------------------------------------------------------------- reductions of a row segment to a state

// SIMD lane states are flushed into a double accumulator every kChunk elements: a float lane summing more than
// 2^24 terms of similar size stops growing (a row of 2^30 equal logits would lose half its log-sum-exp).
constexpr int64_t kChunk = 8192;

// Online (m, d) of x[0..n): SIMD lanes over blocks of 2*kStep, lanes merged per chunk, scalar tail.
template <typename scalar_t>
fm::OnlineState<acc_t<scalar_t>> online_state(const scalar_t* x, int64_t n) {
  using acc = acc_t<scalar_t>;
  auto total = fm::online_init<double>();
  int64_t j = 0;
  if constexpr (kVectorized<scalar_t>) {
    while (j + 2 * kStep <= n) {
      const int64_t end = std::min(n, j + kChunk);
      auto s = fm::online_init<float, Vec>();
      for (; j + 2 * kStep <= end; j += 2 * kStep) {
        Vec v[4];
        load2(x + j, v[0], v[1]);
        load2(x + j + kStep, v[2], v[3]);
        s = fm::online_update_block(s, v);
      }
      for (int l = 0; l < Vec::size(); ++l) total = fm::online_merge(total, {lane<double>(s.m, l), lane<double>(s.d, l)});
    }
  }
  auto tail = fm::online_init<acc>();
  for (; j < n; ++j) tail = fm::online_update(tail, static_cast<acc>(x[j]));
  total = fm::online_merge(total, {static_cast<double>(tail.m), static_cast<double>(tail.d)});
  // Back to acc: m is an input value (or the -FLT_MAX start) and so exact; d rounds once.
  if constexpr (std::is_same_v<acc, float>) {
    if (total.m == -DBL_MAX) total.m = -FLT_MAX;
  }
  return {static_cast<acc>(total.m), static_cast<acc>(total.d)};
}

// Two-pass (mantissa, exponent) state of x[0..n), chunked like online_state. The exponents are integers well
// inside float's exact range wherever the split is exact, so the double accumulator converts back losslessly.
template <typename scalar_t>
fm::ExpState<acc_t<scalar_t>> exp_state(const scalar_t* x, int64_t n) {
  using acc = acc_t<scalar_t>;
  auto total = fm::exp_init<double>();
  int64_t j = 0;
  if constexpr (kVectorized<scalar_t>) {
    while (j + 2 * kStep <= n) {
      const int64_t end = std::min(n, j + kChunk);
      auto s = fm::exp_init<float, Vec>();
      for (; j + 2 * kStep <= end; j += 2 * kStep) {
        Vec v[4];
        load2(x + j, v[0], v[1]);
        load2(x + j + kStep, v[2], v[3]);
        s = fm::exp_update_block(s, v);
      }
      for (int l = 0; l < Vec::size(); ++l) {
        const float k = lane<float>(s.k, l);
        total = fm::exp_merge(total, {lane<double>(s.a, l), k == -FLT_MAX ? -DBL_MAX : double(k)});
      }
    }
  }
  auto tail = fm::exp_init<acc>();
  for (; j < n; ++j) tail = fm::exp_update(tail, fm::split_exp(static_cast<acc>(x[j])));
  const double tail_k = (std::is_same_v<acc, float> && tail.k == acc(-FLT_MAX)) ? -DBL_MAX : double(tail.k);
  total = fm::exp_merge(total, {static_cast<double>(tail.a), tail_k});
  if constexpr (std::is_same_v<acc, float>) {
    if (total.k == -DBL_MAX) total.k = -FLT_MAX;
  }
  return {static_cast<acc>(total.a), static_cast<acc>(total.k)};
}

// lse from a merged online state; the one case the state cannot express (a +inf in the row) looks at the row.
template <typename scalar_t>
acc_t<scalar_t> finish_online(fm::OnlineState<acc_t<scalar_t>> s, const scalar_t* x, int64_t n) {
  using acc = acc_t<scalar_t>;
  if (s.m == std::numeric_limits<acc>::infinity()) {
    for (int64_t j = 0; j < n; ++j)
      if (at::_isnan(x[j])) return std::numeric_limits<acc>::quiet_NaN();
    return s.m;
  }
  return fm::online_lse(s);
}

// The row's normaliser (m, d) by either algorithm (two-pass falls back to online where its split is inexact).
template <typename scalar_t>
fm::OnlineState<acc_t<scalar_t>> row_state(const scalar_t* x, int64_t n, Algorithm alg) {
  if (alg == Algorithm::TwoPass) {
    auto s = exp_state(x, n);
    if (!fm::exp_needs_fallback(s)) return fm::exp_to_online(s);
  }
  return online_state(x, n);
}

// One long row split over the thread pool: per-chunk states merged with the same rules.
template <typename scalar_t>
acc_t<scalar_t> row_lse_parallel(const scalar_t* x, int64_t n, Algorithm alg) {
  using acc = acc_t<scalar_t>;
  const int64_t chunks = std::min<int64_t>(at::get_num_threads(), n / (16 * kStep));
  if (chunks <= 1) return finish_online(row_state(x, n, alg), x, n);
  const int64_t len = (n + chunks - 1) / chunks;
  if (alg == Algorithm::TwoPass) {
    std::vector<fm::ExpState<acc>> parts(chunks, fm::exp_init<acc>());
    at::parallel_for(0, chunks, 1, [&](int64_t b, int64_t e) {
      for (int64_t c = b; c < e; ++c) parts[c] = exp_state(x + c * len, std::min(len, n - c * len));
    });
    auto s = fm::exp_init<acc>();
    for (auto& p : parts) s = fm::exp_merge(s, p);
    if (!fm::exp_needs_fallback(s)) return finish_online(fm::exp_to_online(s), x, n);
  }
  std::vector<fm::OnlineState<acc>> parts(chunks, fm::online_init<acc>());
  at::parallel_for(0, chunks, 1, [&](int64_t b, int64_t e) {
    for (int64_t c = b; c < e; ++c) parts[c] = online_state(x + c * len, std::min(len, n - c * len));
  });
  auto s = fm::online_init<acc>();
  for (auto& p : parts) s = fm::online_merge(s, p);
  return finish_online(s, x, n);
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

// sum_j f(a[j], b[j]) accumulated in acc_t.
template <typename scalar_t, typename F>
inline acc_t<scalar_t> sum_row(const scalar_t* a, const scalar_t* b, int64_t n, const F& f) {
  using acc = acc_t<scalar_t>;
  acc total = 0;
  int64_t j = 0;
  if constexpr (kVectorized<scalar_t>) {
    Vec s0(0.0f), s1(0.0f);
    for (; j + kStep <= n; j += kStep) {
      Vec a0, a1, b0, b1;
      load2(a + j, a0, a1);
      load2(b + j, b0, b1);
      s0 = s0 + f(a0, b0);
      s1 = s1 + f(a1, b1);
    }
    float lanes[Vec::size()];
    (s0 + s1).store(lanes);
    for (int l = 0; l < Vec::size(); ++l) total += lanes[l];
  }
  for (; j < n; ++j) total += f(static_cast<acc>(a[j]), static_cast<acc>(b[j]));
  return total;
}

// A per-row scalar broadcast to whatever the lambda is called with (a Vec lane group or one scalar).
template <typename T, typename S>
inline T splat_like(S c) {
  if constexpr (std::is_same_v<T, Vec>) return Vec(static_cast<float>(c));
  else return static_cast<T>(c);
}

// ---------------------------------------------------------------- the kernel table

inline int64_t row_grain(int64_t V) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(V, 1)); }

inline bool few_long_rows(int64_t rows, int64_t V) {
  return rows < at::get_num_threads() && V >= 65536;
}

inline void logsumexp_kernel(const at::Tensor& x, const at::Tensor& out, Algorithm alg) {
  const int64_t rows = x.size(0), V = x.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "fastloss_logsumexp_cpu", [&] {
    const scalar_t* px = x.const_data_ptr<scalar_t>();
    scalar_t* po = out.mutable_data_ptr<scalar_t>();
    if (few_long_rows(rows, V)) {
      for (int64_t r = 0; r < rows; ++r) po[r] = static_cast<scalar_t>(row_lse_parallel(px + r * V, V, alg));
      return;
    }
    at::parallel_for(0, rows, row_grain(V), [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) po[r] = static_cast<scalar_t>(finish_online(row_state(px + r * V, V, alg), px + r * V, V));
    });
  });
}

inline void softmax_kernel(const at::Tensor& x, const at::Tensor& out, bool log, Algorithm alg) {
  const int64_t rows = x.size(0), V = x.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "fastloss_softmax_cpu", [&] {
    const scalar_t* px = x.const_data_ptr<scalar_t>();
    scalar_t* po = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, rows, row_grain(V), [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) {
        const scalar_t* xr = px + r * V;
        const auto st = row_state(xr, V, alg);
        if (log) {
          const auto log_d = std::log(st.d);
          map_row(xr, xr, po + r * V, V, [&](auto v, auto) {
            using T = decltype(v);
            return fm::log_softmax_at(v, splat_like<T>(st.m), splat_like<T>(log_d));
          });
        } else {
          const auto inv_d = 1 / st.d;
          map_row(xr, xr, po + r * V, V, [&](auto v, auto) {
            using T = decltype(v);
            return fm::softmax_at(v, splat_like<T>(st.m), splat_like<T>(inv_d));
          });
        }
      }
    });
  });
}

inline void softmax_backward_kernel(const at::Tensor& grad, const at::Tensor& out, const at::Tensor& gin, bool log) {
  const int64_t rows = out.size(0), V = out.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out.scalar_type(), "fastloss_softmax_backward_cpu", [&] {
    const scalar_t* pg = grad.const_data_ptr<scalar_t>();
    const scalar_t* py = out.const_data_ptr<scalar_t>();
    scalar_t* pi = gin.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, rows, row_grain(V), [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) {
        const scalar_t* gr = pg + r * V;
        const scalar_t* yr = py + r * V;
        if (log) {
          const auto s = sum_row(gr, gr, V, [](auto g, auto) { return g; });
          map_row(gr, yr, pi + r * V, V, [&](auto g, auto y) {
            using T = decltype(g);
            return g - fm::exp_nonpos(y) * splat_like<T>(s);
          });
        } else {
          const auto s = sum_row(gr, yr, V, [](auto g, auto y) { return g * y; });
          map_row(gr, yr, pi + r * V, V, [&](auto g, auto y) {
            using T = decltype(g);
            return y * (g - splat_like<T>(s));
          });
        }
      }
    });
  });
}

inline void logsumexp_backward_kernel(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& lse,
                                      const at::Tensor& gin) {
  const int64_t rows = x.size(0), V = x.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "fastloss_logsumexp_backward_cpu", [&] {
    using acc = acc_t<scalar_t>;
    const scalar_t* pg = grad.const_data_ptr<scalar_t>();
    const scalar_t* px = x.const_data_ptr<scalar_t>();
    const scalar_t* pl = lse.const_data_ptr<scalar_t>();
    scalar_t* pi = gin.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, rows, row_grain(V), [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) {
        const acc g = static_cast<acc>(pg[r]), l = static_cast<acc>(pl[r]);
        map_row(px + r * V, px + r * V, pi + r * V, V, [&](auto v, auto) {
          using T = decltype(v);
          return splat_like<T>(g) * fm::exp_nonpos(v - splat_like<T>(l));
        });
      }
    });
  });
}

// Measured on the 2-core AMD EPYC CI machine (bench: fastloss-bench --suite softmax): see README.
inline Algorithm choose_algorithm(int64_t rows, int64_t V, at::ScalarType dtype) { return Algorithm::Online; }

const SoftmaxKernels& kernel_table() {
  static const SoftmaxKernels table{&logsumexp_kernel, &softmax_kernel, &softmax_backward_kernel,
                                    &logsumexp_backward_kernel, &choose_algorithm};
  return table;
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace fastloss

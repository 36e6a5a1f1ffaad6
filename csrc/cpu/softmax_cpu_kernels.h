// CPU row kernels for softmax / log_softmax / logsumexp and their backwards.
//
// Included once per instruction set (kernels_default.cpp, kernels_avx2.cpp) with CPU_CAPABILITY set; everything
// lives in that inline namespace. Rows run in parallel (at::parallel_for); the body of a row runs on
// at::vec::Vectorized<float> lanes with the formulas of fastloss/math.h, its tail on the scalar instantiation of
// the same formulas. float64 input runs the scalar double instantiation (no SIMD).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <vector>

#include "row_ops.h"

namespace fastloss {
namespace cpu {
inline namespace CPU_CAPABILITY {

// One long row split over the thread pool: per-chunk states merged with the same rules.
template <typename scalar_t>
acc_t<scalar_t> row_lse_parallel(const scalar_t* x, int64_t n, Algorithm alg) {
  using acc = acc_t<scalar_t>;
  const int64_t chunks = std::min<int64_t>(at::get_num_threads(), n / (16 * kStep));
  if (chunks <= 1) return finish_lse(row_state(x, n, alg), x, n);
  const int64_t len = (n + chunks - 1) / chunks;
  auto reduce_parts = [&](auto two_pass) {
    constexpr bool kTwoPass = decltype(two_pass)::value;
    std::vector<StateT<kTwoPass, acc>> parts(chunks);
    at::parallel_for(0, chunks, 1, [&](int64_t b, int64_t e) {
      NoExtra none;
      for (int64_t c = b; c < e; ++c) parts[c] = reduce_row<kTwoPass>(x + c * len, std::min(len, n - c * len), Identity{}, none);
    });
    StateT<kTwoPass, acc> s = parts[0];
    for (int64_t c = 1; c < chunks; ++c) {
      if constexpr (kTwoPass) s = fm::exp_merge(s, parts[c]);
      else s = fm::online_merge(s, parts[c]);
    }
    return s;
  };
  if (alg == Algorithm::TwoPass) {
    auto s = reduce_parts(std::true_type{});
    if (!fm::exp_needs_fallback(s)) return finish_lse(fm::exp_to_online(s), x, n);
  }
  return finish_lse(reduce_parts(std::false_type{}), x, n);
}

// ---------------------------------------------------------------- the kernel table

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
      for (int64_t r = b; r < e; ++r) po[r] = static_cast<scalar_t>(finish_lse(row_state(px + r * V, V, alg), px + r * V, V));
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

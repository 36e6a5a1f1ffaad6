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

#include "fastloss/topk.h"
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

// Softmax with one exponential per element. The reduction pass stores each element's exponential relative to its
// lane's running reference (the running max for online, the running exponent for two-pass, both from
// fastloss/math.h) and remembers that reference per block; the second pass only rescales by
// exp(ref - M) / D (online) or 2^(ref - K) / A (two-pass, exact), one vector factor per block. Exponentials live in
// a float scratch row (the output itself for float). Returns false when the two-pass split is inexact for the row
// (the caller redoes it with the online rule).
template <bool kTwoPass, typename scalar_t>
bool softmax_row_stored(const scalar_t* x, scalar_t* out, int64_t V, std::vector<float>& scratch) {
  constexpr int L = Vec::size();
  const int64_t nblocks = V / kBlock, vend = nblocks * kBlock, ntail = V - vend;
  const size_t need = size_t(std::is_same_v<scalar_t, float> ? 0 : V) + size_t(nblocks * L + ntail);
  if (scratch.size() < need) scratch.resize(need);
  float* e = std::is_same_v<scalar_t, float> ? reinterpret_cast<float*>(out) : scratch.data();
  float* refs = scratch.data() + (std::is_same_v<scalar_t, float> ? 0 : V);
  float* tail_refs = refs + nblocks * L;

  StateT<kTwoPass, double> total;
  if constexpr (kTwoPass) total = fm::exp_init<double>();
  else total = fm::online_init<double>();
  auto widen = [](float v) { return v == -FLT_MAX ? -DBL_MAX : double(v); };
  auto merge = [&](const StateT<kTwoPass, float>& f) {
    if constexpr (kTwoPass) total = fm::exp_merge(total, {double(f.a), widen(f.k)});
    else total = fm::online_merge(total, {widen(f.m), double(f.d)});
  };
  int64_t j = 0;
  while (j < vend) {
    const int64_t end = std::min(vend, j + kChunk);
    StateT<kTwoPass, Vec> s;
    if constexpr (kTwoPass) s = fm::exp_init<float, Vec>();
    else s = fm::online_init<float, Vec>();
    for (; j < end; j += kBlock) {
      Vec v[4];
      load4(x + j, v);
      if constexpr (kTwoPass) {
        fm::Split<Vec> sp[4];
        Vec k = s.k;
        for (int i = 0; i < 4; ++i) {
          sp[i] = fm::split_exp(v[i]);
          k = fm::Ops<Vec>::max(k, sp[i].n);
        }
        Vec sum(0.0f);
        for (int i = 0; i < 4; ++i) {
          const Vec ei = fm::scale_pow2(sp[i].p, sp[i].n - k);
          ei.store(e + j + i * L);
          sum = sum + ei;
        }
        s.a = s.a * fm::pow2_or_zero(s.k - k) + sum;
        s.k = k;
        k.store(refs + (j / kBlock) * L);
      } else {
        Vec m = s.m;
        for (int i = 0; i < 4; ++i) m = fm::Ops<Vec>::max(m, v[i]);
        Vec sum(0.0f);
        for (int i = 0; i < 4; ++i) {
          const Vec ei = fm::exp_nonpos(v[i] - m);
          ei.store(e + j + i * L);
          sum = sum + ei;
        }
        s.d = at::vec::fmadd(s.d, fm::exp_nonpos(s.m - m), sum);
        s.m = m;
        m.store(refs + (j / kBlock) * L);
      }
    }
    merge(fold_lanes(s));
  }
  if (ntail) {
    StateT<kTwoPass, float> t;
    if constexpr (kTwoPass) t = fm::exp_init<float>();
    else t = fm::online_init<float>();
    for (int64_t i = 0; i < ntail; ++i) {
      const float v = static_cast<float>(x[vend + i]);
      if constexpr (kTwoPass) {
        const auto sp = fm::split_exp(v);
        const float k = fm::Ops<float>::max(t.k, sp.n);
        e[vend + i] = fm::scale_pow2(sp.p, sp.n - k);
        t = {t.a * fm::pow2_or_zero(t.k - k) + e[vend + i], k};
        tail_refs[i] = k;
      } else {
        const float m = fm::Ops<float>::max(t.m, v);
        e[vend + i] = fm::exp_nonpos(v - m);
        t = {m, t.d * fm::exp_nonpos(t.m - m) + e[vend + i]};
        tail_refs[i] = m;
      }
    }
    merge(t);
  }
  // The final reference and 1 / sum. Exponents and maxima are exact in float; -DBL_MAX maps back to -FLT_MAX.
  float ref;
  float inv;
  if constexpr (kTwoPass) {
    ref = total.k == -DBL_MAX ? -FLT_MAX : float(total.k);
    if (fm::exp_needs_fallback(fm::ExpState<float>{float(total.a), ref})) return false;
    inv = float(1.0 / total.a);
  } else {
    ref = total.m == -DBL_MAX ? -FLT_MAX : float(total.m);
    inv = float(1.0 / total.d);
  }
  auto factor = [&](auto r) {
    using T = decltype(r);
    if constexpr (kTwoPass) return fm::pow2_or_zero(r - splat_like<T>(ref)) * splat_like<T>(inv);
    else return fm::exp_nonpos(r - splat_like<T>(ref)) * splat_like<T>(inv);
  };
  for (int64_t b = 0; b < nblocks; ++b) {
    const Vec f = factor(Vec::loadu(refs + b * L));
    float* eb = e + b * kBlock;
    store2(out + b * kBlock, Vec::loadu(eb) * f, Vec::loadu(eb + L) * f);
    store2(out + b * kBlock + kStep, Vec::loadu(eb + 2 * L) * f, Vec::loadu(eb + 3 * L) * f);
  }
  for (int64_t i = 0; i < ntail; ++i) out[vend + i] = static_cast<scalar_t>(e[vend + i] * factor(tail_refs[i]));
  return true;
}

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
        if constexpr (kVectorized<scalar_t>) {
          if (!log) {
            thread_local std::vector<float> scratch;
            if (alg == Algorithm::TwoPass && softmax_row_stored<true>(xr, po + r * V, V, scratch)) continue;
            softmax_row_stored<false>(xr, po + r * V, V, scratch);
            continue;
          }
        }
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

// ---------------------------------------------------------------- softmax + top-k in one pass

// The running top-k as an Extra of the reduction pass: it sees every element the (m, d) state sees. Once the list
// is full, a block of kBlock elements costs four vector compares against the current k-th value (NaN always
// passes); only a block holding a candidate goes through the scalar insertion.
template <typename acc>
struct TopKExtra {
  fm::TopKList<acc> list;

  void vec(int64_t j, const Vec (&v)[4]) {
    if constexpr (std::is_same_v<acc, float>) {
      if (list.n == list.k) {
        if (list.k == 0) return;
        const Vec thr(list.val[list.k - 1]);
        Vec hit = (v[0] > thr) | v[0].isnan();
        for (int i = 1; i < 4; ++i) hit = hit | (v[i] > thr) | v[i].isnan();
        if (hit.zero_mask() == (1 << Vec::size()) - 1) return;  // no lane can enter
      }
      float tmp[kBlock];
      for (int i = 0; i < 4; ++i) v[i].store(tmp + i * Vec::size());
      for (int64_t l = 0; l < kBlock; ++l) list.push(tmp[l], j + l);
    }
  }
  template <class A>
  void scalar(int64_t j, A v) { list.push(static_cast<acc>(v), j); }
  void flush() {}
  void reset() { list.n = 0; }
};

inline void softmax_topk_kernel(const at::Tensor& x, int64_t k, const at::Tensor& values, const at::Tensor& indices,
                                Algorithm alg) {
  const int64_t rows = x.size(0), V = x.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "fastloss_softmax_topk_cpu", [&] {
    using acc = acc_t<scalar_t>;
    const scalar_t* px = x.const_data_ptr<scalar_t>();
    scalar_t* pv = values.mutable_data_ptr<scalar_t>();
    int64_t* pi = indices.mutable_data_ptr<int64_t>();
    at::parallel_for(0, rows, row_grain(V), [&](int64_t b, int64_t e) {
      std::vector<acc> val(k);
      std::vector<int64_t> idx(k);
      for (int64_t r = b; r < e; ++r) {
        const scalar_t* xr = px + r * V;
        TopKExtra<acc> top{fm::TopKList<acc>(val.data(), idx.data(), k)};
        const double lse = finish_lse<scalar_t>(row_state(xr, V, alg, Identity{}, top), xr, V);
        for (int64_t i = 0; i < k; ++i) {
          pv[r * k + i] = static_cast<scalar_t>(fm::topk_probability(val[i], lse));
          pi[r * k + i] = idx[i];
        }
      }
    });
  });
}

// Measured on the 2-core AMD EPYC CI machine (bench: fastloss-bench --suite softmax): see README.
inline Algorithm choose_algorithm(int64_t rows, int64_t V, at::ScalarType dtype) { return Algorithm::Online; }

const SoftmaxKernels& kernel_table() {
  static const SoftmaxKernels table{&logsumexp_kernel,          &softmax_kernel,   &softmax_backward_kernel,
                                    &logsumexp_backward_kernel, &choose_algorithm, &softmax_topk_kernel,
                                    std::numeric_limits<int64_t>::max()};
  return table;
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace fastloss

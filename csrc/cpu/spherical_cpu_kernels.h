// CPU row kernels for the spherical-family losses (the table of fastloss/spherical_kernels.h).
//
// Forward: one pass per row keeps (count, mean, M2) per float SIMD lane, a block of four vectors folded in at a
// time (fastloss/spherical_math.h: moment_add_block), lanes merged into a double state once per chunk of kChunk
// elements, the tail in double; the one-hot MSE adds a pass for the sum of squares without the target.
// Backward: one elementwise pass, affine in o_k (spherical_grad_coef), plus the target's term, which may write
// over the logits. Included once per instruction set (CPU_CAPABILITY inline namespace).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>

#include "fastloss/spherical_kernels.h"
#include "fastloss/spherical_math.h"
#include "row_ops.h"

namespace fastloss {
namespace cpu {
inline namespace CPU_CAPABILITY {

// (count, mean, M2) of x[0..n) - pivot in double (the differences taken in acc_t).
template <typename scalar_t>
fm::MomentState<double> row_moments(const scalar_t* x, int64_t n, acc_t<scalar_t> pivot) {
  fm::MomentState<double> total = fm::moment_init<double>();
  int64_t j = 0;
  if constexpr (kVectorized<scalar_t>) {
    constexpr int kL = Vec::size();
    while (j + kBlock <= n) {
      const int64_t end = std::min(n, j + kChunk);
      fm::MomentState<Vec> s = fm::moment_init<Vec>();
      for (; j + kBlock <= end; j += kBlock) {
        Vec v[4];
        load4(x + j, v);
        for (auto& e : v) e = e - Vec(pivot);
        s = fm::moment_add_block(s, v);
      }
      float cnt[kL], mean[kL], m2[kL];
      s.n.store(cnt);
      s.mean.store(mean);
      s.m2.store(m2);
      for (int l = 0; l < kL; ++l) total = fm::moment_merge(total, {double(cnt[l]), double(mean[l]), double(m2[l])});
    }
  }
  for (; j < n; ++j) {
    const double v[1] = {double(static_cast<acc_t<scalar_t>>(x[j]) - pivot)};
    total = fm::moment_add_block(total, v);
  }
  return total;
}

inline void spherical_forward(const at::Tensor& x, const at::Tensor& target, const SphericalParams& p,
                              const at::Tensor& loss, const at::Tensor& stats) {
  const int64_t N = x.size(0), V = x.size(1);
  const int64_t* tgt = target.const_data_ptr<int64_t>();
  double* pl = loss.mutable_data_ptr<double>();
  double* ps = stats.mutable_data_ptr<double>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "fastloss_spherical_fwd_cpu", [&] {
    const scalar_t* px = x.const_data_ptr<scalar_t>();
    at::parallel_for(0, N, row_grain(V), [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) {
        double* st = ps + r * kSphericalStats;
        const int64_t c = tgt[r];
        if (c == p.ignore_index) {
          pl[r] = 0.0;
          st[kStatShift] = st[kStatVar] = st[kStatTarget] = 0.0;
          continue;
        }
        const scalar_t* row = px + r * V;
        const auto pivot = static_cast<acc_t<scalar_t>>(row[c]);
        const fm::MomentState<double> m = row_moments(row, V, pivot);
        const double var = m.m2 / static_cast<double>(V);
        const double oc = static_cast<double>(pivot);
        if (p.kind == fm::kOneHotMSE) {  // the value as a sum of squares without the target (no cancellation)
          auto sq = [](auto v, auto) { return v * v; };
          const double rest = sum_row(row, row, c, sq) + sum_row(row + c + 1, row + c + 1, V - c - 1, sq);
          pl[r] = fm::onehot_mse_value(rest, oc);
        } else {
          pl[r] = fm::spherical_terms(p.kind, oc, m.mean, var, static_cast<double>(V), p.a, p.b).loss;
        }
        st[kStatShift] = m.mean;
        st[kStatVar] = var;
        st[kStatTarget] = oc;
      }
    });
  });
}

inline void spherical_backward(const at::Tensor& x, const at::Tensor& target, const SphericalParams& p,
                               const at::Tensor& grad_loss, const at::Tensor& stats, const at::Tensor& grad) {
  const int64_t N = x.size(0), V = x.size(1);
  const int64_t* tgt = target.const_data_ptr<int64_t>();
  const double* gl = grad_loss.const_data_ptr<double>();
  const double* ps = stats.const_data_ptr<double>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "fastloss_spherical_bwd_cpu", [&] {
    using acc = acc_t<scalar_t>;
    const scalar_t* px = x.const_data_ptr<scalar_t>();
    scalar_t* pg = grad.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, N, row_grain(V), [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) {
        scalar_t* out = pg + r * V;
        const int64_t c = tgt[r];
        if (c == p.ignore_index) {
          std::fill(out, out + V, scalar_t(0));
          continue;
        }
        const double* st = ps + r * kSphericalStats;
        const double Vd = static_cast<double>(V);
        const double oc = st[kStatTarget];
        const fm::SphericalGradCoef k = fm::spherical_grad_coef(
            p.kind, fm::spherical_terms(p.kind, oc, st[kStatShift], st[kStatVar], Vd, p.a, p.b), gl[r], Vd, oc,
            st[kStatShift]);
        const acc c0 = static_cast<acc>(k.c0), c1 = static_cast<acc>(k.c1);
        const acc p1 = static_cast<acc>(k.p1), p2 = static_cast<acc>(k.p2);
        const scalar_t* row = px + r * V;
        // The target's own term from the saved statistics (the row may be overwritten below).
        const double at_c = fm::spherical_grad_at_target(k, oc);
        map_row(row, row, out, V, [&](auto v, auto) {
          using T = decltype(v);
          return splat_like<T>(c0) + splat_like<T>(c1) * ((v - splat_like<T>(p1)) - splat_like<T>(p2));
        });
        out[c] = static_cast<scalar_t>(at_c);
      }
    });
  });
}

inline void spherical_terms(const at::Tensor& stats, const at::Tensor& target, int64_t V, const SphericalParams& p,
                            const at::Tensor& loss, const at::Tensor& partials) {
  const int64_t N = stats.size(0);
  const double* st = stats.const_data_ptr<double>();
  const int64_t* tgt = target.const_data_ptr<int64_t>();
  double* pl = loss.mutable_data_ptr<double>();
  double* pd = partials.mutable_data_ptr<double>();
  at::parallel_for(0, N, 4096, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      const double* s = st + r * kSphericalStats;
      const fm::SphericalTerms t = tgt[r] == p.ignore_index
                                       ? fm::SphericalTerms{0.0, 0.0, 0.0, 0.0}
                                       : fm::spherical_terms(p.kind, s[kStatTarget], s[kStatShift], s[kStatVar],
                                                             static_cast<double>(V), p.a, p.b);
      pl[r] = t.loss;
      pd[3 * r] = t.d_oc;
      pd[3 * r + 1] = t.d_mu;
      pd[3 * r + 2] = t.d_var;
    }
  });
}

const SphericalKernels& spherical_kernel_table() {
  static const SphericalKernels table{&spherical_forward, &spherical_backward, &spherical_terms};
  return table;
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace fastloss

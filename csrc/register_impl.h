// Registers the generic op layer for one device, given that device's kernel table.
#pragma once

#include <torch/library.h>

#include "cross_entropy_ops.h"
#include "policy_ops.h"
#include "softmax_ops.h"
#include "spherical_ops.h"

namespace fastloss {

template <const SoftmaxKernels& (*K)()>
struct SoftmaxDeviceOps {
  static at::Tensor softmax(const at::Tensor& x, int64_t dim, c10::string_view alg) {
    return softmax_op(x, dim, alg, /*log=*/false, K());
  }
  static at::Tensor log_softmax(const at::Tensor& x, int64_t dim, c10::string_view alg) {
    return softmax_op(x, dim, alg, /*log=*/true, K());
  }
  static at::Tensor logsumexp(const at::Tensor& x, int64_t dim, bool keepdim, c10::string_view alg) {
    return logsumexp_op(x, dim, keepdim, alg, K());
  }
  static at::Tensor softmax_backward(const at::Tensor& g, const at::Tensor& out, int64_t dim) {
    return softmax_backward_op(g, out, dim, /*log=*/false, K());
  }
  static at::Tensor log_softmax_backward(const at::Tensor& g, const at::Tensor& out, int64_t dim) {
    return softmax_backward_op(g, out, dim, /*log=*/true, K());
  }
  static at::Tensor logsumexp_backward(const at::Tensor& g, const at::Tensor& x, const at::Tensor& result,
                                       int64_t dim, bool keepdim) {
    return logsumexp_backward_op(g, x, result, dim, keepdim, K());
  }
  static std::string resolve_algorithm(const at::Tensor& x, int64_t dim, c10::string_view alg) {
    return resolve_algorithm_op(x, dim, alg, K());
  }
  static std::tuple<at::Tensor, at::Tensor> softmax_topk(const at::Tensor& x, int64_t k, int64_t dim,
                                                         c10::string_view alg) {
    return softmax_topk_op(x, k, dim, alg, K());
  }

  static void register_all(torch::Library& m) {
    m.impl("softmax", &softmax);
    m.impl("log_softmax", &log_softmax);
    m.impl("logsumexp", &logsumexp);
    m.impl("softmax_backward", &softmax_backward);
    m.impl("log_softmax_backward", &log_softmax_backward);
    m.impl("logsumexp_backward", &logsumexp_backward);
    m.impl("resolve_algorithm", &resolve_algorithm);
    m.impl("softmax_topk", &softmax_topk);
  }
};

template <const SoftmaxKernels& (*K)(), const CrossEntropyKernels& (*KC)()>
struct CrossEntropyDeviceOps {
  using OptT = std::optional<at::Tensor>;
  static std::tuple<at::Tensor, at::Tensor, at::Tensor> fwd(const at::Tensor& x, const at::Tensor& t, const OptT& w, int64_t ii,
                                                double ls, double z, std::optional<double> cap,
                                                c10::string_view alg, c10::string_view loss, double lp) {
    return cross_entropy_fwd_op(x, t, w, ii, ls, z, cap, alg, loss, lp, K(), KC());
  }
  static at::Tensor bwd(const at::Tensor& g, const OptT& gz, const at::Tensor& x, const at::Tensor& t, const OptT& w,
                        const at::Tensor& lse, int64_t ii, double ls, double z, std::optional<double> cap,
                        c10::string_view loss, double lp, const OptT& sq) {
    return cross_entropy_bwd_op(g, gz, x, t, w, lse, ii, ls, z, cap, loss, lp, sq, KC());
  }
  static std::tuple<at::Tensor, at::Tensor> fwd_inplace(const at::Tensor& x, const at::Tensor& t, const OptT& w,
                                                        const at::Tensor& gs, int64_t ii, double ls, double z,
                                                        std::optional<double> cap, c10::string_view alg,
                                                        c10::string_view loss, double lp) {
    return cross_entropy_fwd_inplace_grad_op(x, t, w, gs, ii, ls, z, cap, alg, loss, lp, K(), KC());
  }
  static std::tuple<at::Tensor, at::Tensor, at::Tensor> prob_fwd(const at::Tensor& x, const at::Tensor& t,
                                                                 const OptT& w, double ls, double z,
                                                                 std::optional<double> cap, c10::string_view alg) {
    return cross_entropy_prob_fwd_op(x, t, w, ls, z, cap, alg, K(), KC());
  }
  static at::Tensor prob_bwd(const at::Tensor& g, const OptT& gz, const at::Tensor& x, const at::Tensor& t,
                             const OptT& w, const at::Tensor& lse, const at::Tensor& sy, double ls, double z,
                             std::optional<double> cap) {
    return cross_entropy_prob_bwd_op(g, gz, x, t, w, lse, sy, ls, z, cap, KC());
  }
  static void scale_rows(const at::Tensor& x, const at::Tensor& s) { scale_rows_op(x, s, KC()); }
  static at::Tensor shard_fwd(const at::Tensor& x, const at::Tensor& t, const OptT& w, int64_t v0, int64_t ii,
                              double ls, std::optional<double> cap, c10::string_view alg, c10::string_view loss) {
    return cross_entropy_shard_fwd_op(x, t, w, v0, ii, ls, cap, alg, loss, K(), KC());
  }
  static at::Tensor shard_loss(const at::Tensor& rows, const at::Tensor& t, const OptT& ws, int64_t V, int64_t ii,
                               double ls, double z, c10::string_view loss, double lp) {
    return cross_entropy_shard_loss_op(rows, t, ws, V, ii, ls, z, loss, lp, KC());
  }
  static at::Tensor shard_bwd(const at::Tensor& g, const OptT& gz, const at::Tensor& x, const at::Tensor& t,
                              const OptT& w, const at::Tensor& rows, const OptT& ws, int64_t v0, int64_t V, int64_t ii,
                              double ls, double z, std::optional<double> cap, c10::string_view loss, double lp) {
    return cross_entropy_shard_bwd_op(g, gz, x, t, w, rows, ws, v0, V, ii, ls, z, cap, loss, lp, KC());
  }

  static void register_all(torch::Library& m) {
    m.impl("cross_entropy_fwd", &fwd);
    m.impl("cross_entropy_bwd", &bwd);
    m.impl("cross_entropy_fwd_inplace_grad", &fwd_inplace);
    m.impl("cross_entropy_prob_fwd", &prob_fwd);
    m.impl("cross_entropy_prob_bwd", &prob_bwd);
    m.impl("scale_rows_", &scale_rows);
    m.impl("cross_entropy_shard_fwd", &shard_fwd);
    m.impl("cross_entropy_shard_loss", &shard_loss);
    m.impl("cross_entropy_shard_bwd", &shard_bwd);
  }
};

template <const PolicyKernels& (*K)()>
struct PolicyDeviceOps {
  using OptT = std::optional<at::Tensor>;
  static std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> logprobs_fwd(
      const at::Tensor& x, const at::Tensor& tok, double temp, bool ent, bool stats) {
    return token_logprobs_fwd_op(x, tok, temp, ent, stats, K());
  }
  static at::Tensor logprobs_bwd(const OptT& glp, const OptT& gh, const at::Tensor& x, const at::Tensor& tok,
                                 const at::Tensor& lse, const at::Tensor& ent, double temp,
                                 std::optional<int64_t> start) {
    return token_logprobs_bwd_op(glp, gh, x, tok, lse, ent, temp, start, K());
  }
  static void logprobs_bwd_(const at::Tensor& x, const OptT& glp, const OptT& gh, const at::Tensor& tok,
                            const at::Tensor& lse, const at::Tensor& ent, double temp) {
    token_logprobs_bwd_inplace_op(x, glp, gh, tok, lse, ent, temp, K());
  }
  static std::tuple<at::Tensor, at::Tensor> distill_fwd(const at::Tensor& s, const at::Tensor& t, const OptT& y,
                                                        c10::string_view div, double beta, double temp, int64_t ii,
                                                        double hw, bool ent) {
    return distill_fwd_op(s, t, y, div, beta, temp, ii, hw, ent, K());
  }
  static at::Tensor distill_bwd(const at::Tensor& g, const at::Tensor& s, const at::Tensor& t, const OptT& y,
                                const at::Tensor& stats, c10::string_view div, double beta, double temp, int64_t ii,
                                double hw) {
    return distill_bwd_op(g, s, t, y, stats, div, beta, temp, ii, hw, K());
  }
  static std::tuple<at::Tensor, at::Tensor> distill_fwd_inplace(const at::Tensor& s, const at::Tensor& t,
                                                                const OptT& y, const at::Tensor& gs,
                                                                c10::string_view div, double beta, double temp,
                                                                int64_t ii, double hw, bool ent) {
    return distill_fwd_inplace_grad_op(s, t, y, gs, div, beta, temp, ii, hw, ent, K());
  }

  static std::tuple<at::Tensor, at::Tensor, at::Tensor> distill_fwd_grad(const at::Tensor& s, const at::Tensor& t,
                                                                         const OptT& y, const at::Tensor& gs,
                                                                         c10::string_view div, double beta,
                                                                         double temp, int64_t ii, double hw,
                                                                         bool ent) {
    return distill_fwd_grad_op(s, t, y, gs, div, beta, temp, ii, hw, ent, K());
  }

  static void register_all(torch::Library& m) {
    m.impl("distill_fwd_grad", &distill_fwd_grad);
    m.impl("token_logprobs_fwd", &logprobs_fwd);
    m.impl("token_logprobs_bwd", &logprobs_bwd);
    m.impl("token_logprobs_bwd_", &logprobs_bwd_);
    m.impl("distill_fwd", &distill_fwd);
    m.impl("distill_bwd", &distill_bwd);
    m.impl("distill_fwd_inplace_grad", &distill_fwd_inplace);
  }
};

template <const SphericalKernels& (*K)()>
struct SphericalDeviceOps {
  static std::tuple<at::Tensor, at::Tensor> fwd(const at::Tensor& x, const at::Tensor& t, c10::string_view loss,
                                                double a, double b, int64_t ii) {
    return spherical_fwd_op(x, t, loss, a, b, ii, K());
  }
  static at::Tensor bwd(const at::Tensor& g, const at::Tensor& x, const at::Tensor& t, const at::Tensor& stats,
                        c10::string_view loss, double a, double b, int64_t ii) {
    return spherical_bwd_op(g, x, t, stats, loss, a, b, ii, K());
  }

  static std::tuple<at::Tensor, at::Tensor> terms(const at::Tensor& stats, const at::Tensor& t, int64_t V,
                                                  c10::string_view loss, double a, double b, int64_t ii) {
    return spherical_terms_op(stats, t, V, loss, a, b, ii, K());
  }

  static void register_all(torch::Library& m) {
    m.impl("spherical_loss_terms", &terms);
    m.impl("spherical_loss_fwd", &fwd);
    m.impl("spherical_loss_bwd", &bwd);
  }
};

}  // namespace fastloss

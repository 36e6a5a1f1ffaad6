#include "spherical_ops.h"

#include "fastloss/spherical_math.h"
#include "row_op_checks.h"

#include <ATen/ATen.h>

#include <cmath>
#include <string>

namespace fastloss {
namespace {

constexpr const char* kOp = "fastloss.spherical_loss";

SphericalParams make_params(c10::string_view loss, double a, double b, int64_t ignore_index) {
  SphericalParams p;
  if (loss == "z") {
    p.kind = math::kZLoss;
  } else if (loss == "taylor_softmax") {
    p.kind = math::kTaylorSoftmax;
  } else {
    TORCH_CHECK(loss == "mse", kOp, ": `loss` must be \"z\", \"taylor_softmax\" or \"mse\", got \"",
                std::string(loss), "\"");
    p.kind = math::kOneHotMSE;
  }
  TORCH_CHECK(std::isfinite(a) && a > 0.0, kOp, ": `a` (the Z-loss's softplus sharpness) must be a finite value > 0, "
              "got ", a);
  TORCH_CHECK(std::isfinite(b), kOp, ": `b` (the Z-loss's offset) must be finite, got ", b);
  p.a = a;
  p.b = b;
  p.ignore_index = ignore_index;
  return p;
}

at::Tensor inputs(const at::Tensor& logits, const at::Tensor& target, int64_t ignore_index) {
  check_logits(logits, kOp, "input");
  TORCH_CHECK(logits.size(0) == 0 || logits.size(1) >= 2, kOp,
              ": a spherical loss needs at least 2 classes (the mean and variance of a single logit say nothing), "
              "got `input` of shape ", logits.sizes());
  return check_indices(target, logits, kOp, "target", ignore_index);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> spherical_fwd_op(const at::Tensor& logits, const at::Tensor& target,
                                                    c10::string_view loss, double a, double b, int64_t ignore_index,
                                                    const SphericalKernels& k) {
  const SphericalParams p = make_params(loss, a, b, ignore_index);
  const at::Tensor t = inputs(logits, target, ignore_index);
  const int64_t N = logits.size(0);
  at::Tensor rows = new_rows(logits, N), stats = at::empty({N, kSphericalStats}, rows.options());
  if (N == 0) return {rows, stats};
  k.forward(logits.contiguous(), t, p, rows, stats);
  return {rows, stats};
}

at::Tensor spherical_bwd_op(const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& target,
                            const at::Tensor& stats, c10::string_view loss, double a, double b, int64_t ignore_index,
                            const SphericalKernels& k) {
  const SphericalParams p = make_params(loss, a, b, ignore_index);
  const at::Tensor t = inputs(logits, target, ignore_index);
  const int64_t N = logits.size(0);
  TORCH_CHECK(stats.dim() == 2 && stats.size(0) == N && stats.size(1) == kSphericalStats, kOp,
              ": `stats` must have shape [", N, ", ", kSphericalStats, "], got ", stats.sizes());
  TORCH_CHECK(stats.device() == logits.device(), kOp, ": `stats` is on ", stats.device(), " but `input` is on ",
              logits.device());
  const at::Tensor x = logits.contiguous();
  at::Tensor grad = at::empty_like(x);
  if (grad.numel() == 0) return grad;
  k.backward(x, t, p, as_rows(grad_loss, logits, kOp, "grad_loss"), stats.to(at::kDouble).contiguous(), grad);
  return grad;
}

std::tuple<at::Tensor, at::Tensor> spherical_terms_op(const at::Tensor& stats, const at::Tensor& target, int64_t V,
                                                      c10::string_view loss, double a, double b, int64_t ignore_index,
                                                      const SphericalKernels& k) {
  const SphericalParams p = make_params(loss, a, b, ignore_index);
  TORCH_CHECK(V >= 2, kOp, ": a spherical loss needs at least 2 classes, got V = ", V);
  TORCH_CHECK(stats.dim() == 2 && stats.size(1) == kSphericalStats && stats.is_floating_point(), kOp,
              ": `stats` must be a floating-point tensor of shape [N, ", kSphericalStats, "], got ", stats.sizes(), " ",
              stats.scalar_type());
  const at::Tensor st = stats.to(at::kDouble).contiguous();
  const int64_t N = st.size(0);
  const at::Tensor t = check_indices(target, N, V, st.device(), kOp, "target", ignore_index);
  at::Tensor rows = new_rows(st, N), partials = at::empty({N, 3}, rows.options());
  if (N > 0) k.terms(st, t, V, p, rows, partials);
  return {rows, partials};
}

}  // namespace fastloss

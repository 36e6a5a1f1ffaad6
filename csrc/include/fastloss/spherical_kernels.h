// The contract between the spherical-loss op layer (csrc/spherical_ops.cpp) and the per-device row kernels.
// Formulas: fastloss/spherical_math.h.
//
// Every kernel sees contiguous [N, V] logits, int64 [N] targets (ignore_index rows: loss 0, gradient 0; every other
// target in [0, V)), and float64 per-row arrays. The gradient may alias the logits (each element is read before
// its gradient is written).
#pragma once

#include <ATen/core/Tensor.h>

namespace fastloss {

struct SphericalParams {
  int kind = 0;  // fastloss/spherical_math.h: kZLoss, kTaylorSoftmax, kOneHotMSE
  double a = 1.0, b = 0.0;  // the Z-loss's softplus sharpness (> 0) and offset
  int64_t ignore_index = -100;
};

// Per-row statistics of the forward, float64 [N, kSphericalStats]: what the backward needs.
constexpr int64_t kSphericalStats = 3;
enum SphericalStat : int64_t {
  kStatShift = 0,   // mu - o_c: the row's mean relative to its target logit (fastloss/spherical_math.h)
  kStatVar = 1,     // population variance of the row
  kStatTarget = 2,  // o_c
};

struct SphericalKernels {
  // loss[r] (0 for ignored rows) and stats [N, kSphericalStats] (0 for ignored rows).
  void (*forward)(const at::Tensor& x, const at::Tensor& target, const SphericalParams& p, const at::Tensor& loss,
                  const at::Tensor& stats);
  // grad = grad_loss[r] * d loss[r] / d x (0 for ignored rows); grad may alias x.
  void (*backward)(const at::Tensor& x, const at::Tensor& target, const SphericalParams& p,
                   const at::Tensor& grad_loss, const at::Tensor& stats, const at::Tensor& grad);
  // From statistics alone (the linear version, which forms them from the head without logits): stats float64
  // [N, kSphericalStats] of rows of V classes -> loss[r] and partials [N, 3] = (dL/do_c, dL/dmu, dL/dvar); rows
  // whose target is ignore_index get 0 for all four.
  void (*terms)(const at::Tensor& stats, const at::Tensor& target, int64_t V, const SphericalParams& p,
                const at::Tensor& loss, const at::Tensor& partials);
};

const SphericalKernels& cpu_spherical_kernels();
#if defined(FASTLOSS_WITH_CUDA) || defined(FASTLOSS_CUDA_EMU)
const SphericalKernels& cuda_spherical_kernels();
#endif

}  // namespace fastloss

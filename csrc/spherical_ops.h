// Device-generic op layer of the spherical-family losses: argument checks, output allocation.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <tuple>

#include "fastloss/spherical_kernels.h"

namespace fastloss {

std::tuple<at::Tensor, at::Tensor> spherical_fwd_op(const at::Tensor& logits, const at::Tensor& target,
                                                    c10::string_view loss, double a, double b, int64_t ignore_index,
                                                    const SphericalKernels& k);
at::Tensor spherical_bwd_op(const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& target,
                            const at::Tensor& stats, c10::string_view loss, double a, double b, int64_t ignore_index,
                            const SphericalKernels& k);

std::tuple<at::Tensor, at::Tensor> spherical_terms_op(const at::Tensor& stats, const at::Tensor& target, int64_t V,
                                                      c10::string_view loss, double a, double b, int64_t ignore_index,
                                                      const SphericalKernels& k);

}  // namespace fastloss

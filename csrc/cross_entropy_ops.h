// Device-generic cross-entropy op layer: argument checks, weight preparation, output allocation.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <optional>
#include <tuple>

#include "fastloss/cross_entropy_kernels.h"

namespace fastloss {

std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_entropy_fwd_op(const at::Tensor& logits, const at::Tensor& target,
                                                        const std::optional<at::Tensor>& weight, int64_t ignore_index,
                                                        double label_smoothing, double z_loss,
                                                        std::optional<double> softcap, c10::string_view algorithm,
                                                        c10::string_view loss, double loss_param,
                                                        const SoftmaxKernels& sk, const CrossEntropyKernels& k);
at::Tensor cross_entropy_bwd_op(const at::Tensor& grad_loss, const std::optional<at::Tensor>& grad_lse,
                                const at::Tensor& logits, const at::Tensor& target,
                                const std::optional<at::Tensor>& weight, const at::Tensor& lse, int64_t ignore_index,
                                double label_smoothing, double z_loss, std::optional<double> softcap,
                                c10::string_view loss, double loss_param, const std::optional<at::Tensor>& sum_sq,
                                const CrossEntropyKernels& k);
std::tuple<at::Tensor, at::Tensor> cross_entropy_fwd_inplace_grad_op(
    const at::Tensor& logits, const at::Tensor& target, const std::optional<at::Tensor>& weight,
    const at::Tensor& grad_scale, int64_t ignore_index, double label_smoothing, double z_loss,
    std::optional<double> softcap, c10::string_view algorithm, c10::string_view loss, double loss_param,
    const SoftmaxKernels& sk, const CrossEntropyKernels& k);
std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_entropy_prob_fwd_op(
    const at::Tensor& logits, const at::Tensor& target, const std::optional<at::Tensor>& weight,
    double label_smoothing, double z_loss, std::optional<double> softcap, c10::string_view algorithm,
    const SoftmaxKernels& sk, const CrossEntropyKernels& k);
at::Tensor cross_entropy_prob_bwd_op(const at::Tensor& grad_loss, const std::optional<at::Tensor>& grad_lse,
                                     const at::Tensor& logits, const at::Tensor& target,
                                     const std::optional<at::Tensor>& weight, const at::Tensor& lse,
                                     const at::Tensor& sum_wy, double label_smoothing, double z_loss,
                                     std::optional<double> softcap, const CrossEntropyKernels& k);
void scale_rows_op(const at::Tensor& self, const at::Tensor& scale, const CrossEntropyKernels& k);

// Vocabulary-parallel cross-entropy (csrc/ops.cpp cross_entropy_shard_*).
at::Tensor cross_entropy_shard_fwd_op(const at::Tensor& logits, const at::Tensor& target,
                                      const std::optional<at::Tensor>& weight, int64_t vocab_start,
                                      int64_t ignore_index, double label_smoothing, std::optional<double> softcap,
                                      c10::string_view algorithm, c10::string_view loss, const SoftmaxKernels& sk,
                                      const CrossEntropyKernels& k);
at::Tensor cross_entropy_shard_loss_op(const at::Tensor& rows, const at::Tensor& target,
                                       const std::optional<at::Tensor>& weight_sum, int64_t vocab_size,
                                       int64_t ignore_index, double label_smoothing, double z_loss,
                                       c10::string_view loss, double loss_param, const CrossEntropyKernels& k);
at::Tensor cross_entropy_shard_bwd_op(const at::Tensor& grad_loss, const std::optional<at::Tensor>& grad_lse,
                                      const at::Tensor& logits, const at::Tensor& target,
                                      const std::optional<at::Tensor>& weight, const at::Tensor& rows,
                                      const std::optional<at::Tensor>& weight_sum, int64_t vocab_start,
                                      int64_t vocab_size, int64_t ignore_index, double label_smoothing,
                                      double z_loss, std::optional<double> softcap, c10::string_view loss,
                                      double loss_param, const CrossEntropyKernels& k);

}  // namespace fastloss

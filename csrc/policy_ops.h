// Device-generic op layer of the distillation and token log-probability ops: argument checks, output allocation.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <optional>
#include <tuple>

#include "fastloss/policy_kernels.h"

namespace fastloss {

// logprobs, entropy ([0] unless entropy), lse, stats ([N, kTokenStats] float64, [0, kTokenStats] unless stats),
// argmax (int64 [N], [0] unless stats).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> token_logprobs_fwd_op(
    const at::Tensor& logits, const at::Tensor& tokens, double temperature, bool entropy, bool stats,
    const PolicyKernels& k);
at::Tensor token_logprobs_bwd_op(const std::optional<at::Tensor>& grad_logprobs,
                                 const std::optional<at::Tensor>& grad_entropy, const at::Tensor& logits,
                                 const at::Tensor& tokens, const at::Tensor& lse, const at::Tensor& entropy,
                                 double temperature, std::optional<int64_t> vocab_start, const PolicyKernels& k);
void token_logprobs_bwd_inplace_op(const at::Tensor& logits, const std::optional<at::Tensor>& grad_logprobs,
                                   const std::optional<at::Tensor>& grad_entropy, const at::Tensor& tokens,
                                   const at::Tensor& lse, const at::Tensor& entropy, double temperature,
                                   const PolicyKernels& k);
std::tuple<at::Tensor, at::Tensor> distill_fwd_op(const at::Tensor& student, const at::Tensor& teacher,
                                                  const std::optional<at::Tensor>& target,
                                                  c10::string_view divergence, double beta, double temperature,
                                                  int64_t ignore_index, double hard_weight, bool student_entropy,
                                                  const PolicyKernels& k);
at::Tensor distill_bwd_op(const at::Tensor& grad_loss, const at::Tensor& student, const at::Tensor& teacher,
                          const std::optional<at::Tensor>& target, const at::Tensor& stats,
                          c10::string_view divergence, double beta, double temperature, int64_t ignore_index,
                          double hard_weight, const PolicyKernels& k);
std::tuple<at::Tensor, at::Tensor> distill_fwd_inplace_grad_op(const at::Tensor& student, const at::Tensor& teacher,
                                                               const std::optional<at::Tensor>& target,
                                                               const at::Tensor& grad_scale,
                                                               c10::string_view divergence, double beta,
                                                               double temperature, int64_t ignore_index,
                                                               double hard_weight, bool student_entropy,
                                                               const PolicyKernels& k);

// The same gradient into a new tensor (the logits are kept): loss, stats, grad. student_entropy (the distill_fwd*
// ops): stats[:, kStudentEntropy] is the student's entropy from the same pass (the kernels with the accumulator).
std::tuple<at::Tensor, at::Tensor, at::Tensor> distill_fwd_grad_op(const at::Tensor& student,
                                                                   const at::Tensor& teacher,
                                                                   const std::optional<at::Tensor>& target,
                                                                   const at::Tensor& grad_scale,
                                                                   c10::string_view divergence, double beta,
                                                                   double temperature, int64_t ignore_index,
                                                                   double hard_weight, bool student_entropy,
                                                                   const PolicyKernels& k);

}  // namespace fastloss

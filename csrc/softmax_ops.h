// Device-generic op layer: argument checks, dim handling, output allocation. Calls a SoftmaxKernels table.
#pragma once

#include <ATen/core/Tensor.h>
#include <tuple>
#include <c10/util/string_view.h>

#include "fastloss/softmax_kernels.h"

namespace fastloss {

at::Tensor softmax_op(const at::Tensor& self, int64_t dim, c10::string_view algorithm, bool log,
                      const SoftmaxKernels& k);
at::Tensor logsumexp_op(const at::Tensor& self, int64_t dim, bool keepdim, c10::string_view algorithm,
                        const SoftmaxKernels& k);
at::Tensor softmax_backward_op(const at::Tensor& grad, const at::Tensor& output, int64_t dim, bool log,
                               const SoftmaxKernels& k);
at::Tensor logsumexp_backward_op(const at::Tensor& grad, const at::Tensor& self, const at::Tensor& result,
                                 int64_t dim, bool keepdim, const SoftmaxKernels& k);
std::tuple<at::Tensor, at::Tensor> softmax_topk_op(const at::Tensor& self, int64_t k, int64_t dim,
                                                   c10::string_view algorithm, const SoftmaxKernels& kt);
std::string resolve_algorithm_op(const at::Tensor& self, int64_t dim, c10::string_view algorithm,
                                 const SoftmaxKernels& k);

}  // namespace fastloss

// Registers the generic op layer for one device, given that device's kernel table.
#pragma once

#include <torch/library.h>

#include "softmax_ops.h"

namespace fastloss {

template <const SoftmaxKernels& (*K)()>
struct DeviceOps {
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

  static void register_all(torch::Library& m) {
    m.impl("softmax", &softmax);
    m.impl("log_softmax", &log_softmax);
    m.impl("logsumexp", &logsumexp);
    m.impl("softmax_backward", &softmax_backward);
    m.impl("log_softmax_backward", &log_softmax_backward);
    m.impl("logsumexp_backward", &logsumexp_backward);
    m.impl("resolve_algorithm", &resolve_algorithm);
  }
};

}  // namespace fastloss

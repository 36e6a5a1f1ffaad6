// The contract between the device-generic op layer (csrc/softmax_ops.cpp) and the per-device row kernels.
//
// Every kernel sees a contiguous [rows, V] problem: the op layer has already moved the reduced dimension last,
// validated dtypes and shapes, and allocated the outputs. Kernels never allocate, never synchronise the host,
// and index with int64_t.
#pragma once

#include <ATen/core/Tensor.h>

namespace fastloss {

enum class Algorithm : int { Online = 0, TwoPass = 1 };

struct SoftmaxKernels {
  // out[r] = log(sum_j exp(x[r, j])), out has x's dtype and shape [rows].
  void (*logsumexp)(const at::Tensor& x, const at::Tensor& out, Algorithm algorithm);
  // out = softmax(x) (or log_softmax when `log`), same dtype and shape as x.
  void (*softmax)(const at::Tensor& x, const at::Tensor& out, bool log, Algorithm algorithm);
  // grad_input = out * (grad - sum(grad * out))        (softmax; out = softmax(x))
  // grad_input = grad - exp(out) * sum(grad)           (log_softmax; out = log_softmax(x))
  void (*softmax_backward)(const at::Tensor& grad, const at::Tensor& out, const at::Tensor& grad_input, bool log);
  // grad_input[r, j] = grad[r] * exp(x[r, j] - lse[r]); grad and lse have shape [rows].
  void (*logsumexp_backward)(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& lse,
                             const at::Tensor& grad_input);
  // The algorithm "auto" resolves to, from benchmark measurements on this device.
  Algorithm (*choose_algorithm)(int64_t rows, int64_t V, at::ScalarType dtype);
  // values[r, :] / indices[r, :] = the k largest softmax(x[r, :]) entries and their columns, best first (ranking in
  // fastloss/topk.h), from one pass over the row. values has x's dtype, indices int64, both [rows, k]; 0 <= k <= V.
  void (*softmax_topk)(const at::Tensor& x, int64_t k, const at::Tensor& values, const at::Tensor& indices,
                       Algorithm algorithm);
  // The largest k softmax_topk handles; beyond it the op layer computes softmax then at::topk (same values).
  int64_t max_topk;
};

const SoftmaxKernels& cpu_softmax_kernels();
#if defined(FASTLOSS_WITH_CUDA) || defined(FASTLOSS_CUDA_EMU)  // the emulated build runs these on the CPU
const SoftmaxKernels& cuda_softmax_kernels();
#endif

}  // namespace fastloss

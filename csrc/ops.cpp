// Every fastloss schema in one place. Device kernels register in csrc/cpu/register.cpp and
// csrc/cuda/register.cpp; autograd and fake (meta) kernels are registered from Python (python/fastloss/_ops.py).
#include <torch/library.h>

TORCH_LIBRARY(fastloss, m) {
  // `algorithm`: "auto" | "online" (Milakov & Gimelshein) | "two_pass" (Dukhan & Ablavatski).
  m.def("softmax(Tensor self, int dim, str algorithm=\"auto\") -> Tensor");
  m.def("log_softmax(Tensor self, int dim, str algorithm=\"auto\") -> Tensor");
  m.def("logsumexp(Tensor self, int dim, bool keepdim=False, str algorithm=\"auto\") -> Tensor");
  m.def("softmax_backward(Tensor grad_output, Tensor output, int dim) -> Tensor");
  m.def("log_softmax_backward(Tensor grad_output, Tensor output, int dim) -> Tensor");
  m.def("logsumexp_backward(Tensor grad_output, Tensor self, Tensor result, int dim, bool keepdim) -> Tensor");
  // Which algorithm "auto" picks for a [rows, V] problem of this dtype on this device ("online" / "two_pass").
  m.def("resolve_algorithm(Tensor self, int dim, str algorithm) -> str");
}

#include "softmax_ops.h"

#include <ATen/ATen.h>
#include <ATen/WrapDimUtils.h>

#include <algorithm>
#include <cstdlib>

namespace fastloss {
namespace {

void check_floating(const at::Tensor& t, const char* op, const char* arg) {
  auto st = t.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kBFloat16 || st == at::kHalf, "fastloss.", op,
              ": expected `", arg, "` to be a floating-point tensor (float32, float64, bfloat16 or float16), got ",
              st);
}

Algorithm parse_algorithm(c10::string_view name, int64_t rows, int64_t V, at::ScalarType dtype,
                          const SoftmaxKernels& k, const char* op) {
  if (name == "online") return Algorithm::Online;
  if (name == "two_pass") return Algorithm::TwoPass;
  TORCH_CHECK(name == "auto", "fastloss.", op, ": `algorithm` must be \"auto\", \"online\" or \"two_pass\", got \"",
              std::string(name), "\"");
  return k.choose_algorithm(rows, V, dtype);
}

// A reduction over `dim` seen as a contiguous [rows, V] matrix: the reduced dimension moved last.
struct RowView {
  at::Tensor x2d;           // contiguous [rows, V]
  std::vector<int64_t> moved_shape;  // shape of self with `dim` moved last
  int64_t dim;              // wrapped dim (0 for a 0-d tensor)
  int64_t rows;
  int64_t V;
};

RowView as_rows(const at::Tensor& self, int64_t dim) {
  RowView r;
  if (self.dim() == 0) {
    r.dim = at::maybe_wrap_dim(dim, 1);  // torch accepts dim in [-1, 0] for a 0-d tensor
    r.x2d = self.reshape({1, 1});
    r.moved_shape = {};
    r.rows = 1;
    r.V = 1;
    return r;
  }
  r.dim = at::maybe_wrap_dim(dim, self.dim());
  at::Tensor moved = self.movedim(r.dim, -1);
  r.moved_shape = moved.sizes().vec();
  r.V = moved.size(-1);
  r.rows = r.V == 0 ? 0 : moved.numel() / r.V;
  if (r.rows == 0 && r.V == 0) {
    r.rows = 1;
    for (int64_t i = 0; i + 1 < moved.dim(); ++i) r.rows *= moved.size(i);
  }
  r.x2d = moved.contiguous().view({r.rows, r.V});
  return r;
}

// Allocates the output in the layout the fake kernel promises: contiguous in "dim last" order, then moved back.
at::Tensor alloc_like_rows(const at::Tensor& self, const RowView& r) {
  if (self.dim() == 0) return at::empty({}, self.options());
  return at::empty(r.moved_shape, self.options().memory_format(at::MemoryFormat::Contiguous)).movedim(-1, r.dim);
}

}  // namespace

at::Tensor softmax_op(const at::Tensor& self, int64_t dim, c10::string_view algorithm, bool log,
                      const SoftmaxKernels& k) {
  const char* op = log ? "log_softmax" : "softmax";
  check_floating(self, op, "self");
  RowView r = as_rows(self, dim);
  Algorithm alg = parse_algorithm(algorithm, r.rows, r.V, self.scalar_type(), k, op);
  at::Tensor out = alloc_like_rows(self, r);
  if (out.numel() == 0) return out;
  at::Tensor out2d = self.dim() == 0 ? out.view({1, 1}) : out.movedim(r.dim, -1).view({r.rows, r.V});
  k.softmax(r.x2d, out2d, log, alg);
  return out;
}

at::Tensor logsumexp_op(const at::Tensor& self, int64_t dim, bool keepdim, c10::string_view algorithm,
                        const SoftmaxKernels& k) {
  check_floating(self, "logsumexp", "self");
  RowView r = as_rows(self, dim);
  Algorithm alg = parse_algorithm(algorithm, r.rows, r.V, self.scalar_type(), k, "logsumexp");
  std::vector<int64_t> out_shape(r.moved_shape.begin(), r.moved_shape.empty() ? r.moved_shape.end()
                                                                               : r.moved_shape.end() - 1);
  at::Tensor out = at::empty(out_shape, self.options());
  if (r.rows > 0) {
    if (r.V == 0) {
      out.fill_(-std::numeric_limits<double>::infinity());  // log of an empty sum, as torch.logsumexp
    } else {
      k.logsumexp(r.x2d, out.view({r.rows}), alg);
    }
  }
  if (keepdim && self.dim() > 0) out = out.unsqueeze(r.dim);
  return out;
}

at::Tensor softmax_backward_op(const at::Tensor& grad, const at::Tensor& output, int64_t dim, bool log,
                               const SoftmaxKernels& k) {
  const char* op = log ? "log_softmax_backward" : "softmax_backward";
  check_floating(output, op, "output");
  TORCH_CHECK(grad.sizes() == output.sizes(), "fastloss.", op, ": `grad_output` has shape ", grad.sizes(),
              " but `output` has shape ", output.sizes());
  TORCH_CHECK(grad.device() == output.device(), "fastloss.", op, ": `grad_output` is on ", grad.device(),
              " but `output` is on ", output.device());
  RowView r = as_rows(output, dim);
  at::Tensor g2d = as_rows(grad.to(output.scalar_type()), dim).x2d;
  at::Tensor gin = alloc_like_rows(output, r);
  if (gin.numel() == 0) return gin;
  at::Tensor gin2d = output.dim() == 0 ? gin.view({1, 1}) : gin.movedim(r.dim, -1).view({r.rows, r.V});
  k.softmax_backward(g2d, r.x2d, gin2d, log);
  return gin;
}

at::Tensor logsumexp_backward_op(const at::Tensor& grad, const at::Tensor& self, const at::Tensor& result,
                                 int64_t dim, bool keepdim, const SoftmaxKernels& k) {
  check_floating(self, "logsumexp_backward", "self");
  RowView r = as_rows(self, dim);
  at::Tensor g = grad.to(self.scalar_type());
  at::Tensor lse = result.to(self.scalar_type());
  if (keepdim && self.dim() > 0) {
    g = g.squeeze(r.dim);
    lse = lse.squeeze(r.dim);
  }
  TORCH_CHECK(g.numel() == r.rows && lse.numel() == r.rows, "fastloss.logsumexp_backward: `grad_output` and `result` ",
              "must have one value per reduced row (", r.rows, "), got ", grad.sizes(), " and ", result.sizes());
  at::Tensor gin = alloc_like_rows(self, r);
  if (gin.numel() == 0) return gin;
  at::Tensor gin2d = self.dim() == 0 ? gin.view({1, 1}) : gin.movedim(r.dim, -1).view({r.rows, r.V});
  k.logsumexp_backward(g.contiguous().view({r.rows}), r.x2d, lse.contiguous().view({r.rows}), gin2d);
  return gin;
}

// The largest k the device's fused kernel takes; larger k runs the composite path. FASTLOSS_TOPK_FUSED_LIMIT (a
// debugging knob) lowers it, so the composite path can be tested on any device, the CPU included.
static int64_t topk_fused_limit(const SoftmaxKernels& kt) {
  int64_t limit = kt.max_topk;
  if (const char* env = std::getenv("FASTLOSS_TOPK_FUSED_LIMIT"); env != nullptr && *env != '\0') {
    limit = std::min<int64_t>(limit, std::max<int64_t>(0, std::atoll(env)));
  }
  return limit;
}

std::tuple<at::Tensor, at::Tensor> softmax_topk_op(const at::Tensor& self, int64_t k, int64_t dim,
                                                   c10::string_view algorithm, const SoftmaxKernels& kt) {
  check_floating(self, "softmax_topk", "self");
  RowView r = as_rows(self, dim);
  TORCH_CHECK(k >= 0 && k <= r.V, "fastloss.softmax_topk: `k` must be in [0, ", r.V, "] (the size of dimension ",
              r.dim, "), got ", k);
  Algorithm alg = parse_algorithm(algorithm, r.rows, r.V, self.scalar_type(), kt, "softmax_topk");
  std::vector<int64_t> shape = r.moved_shape;
  if (!shape.empty()) shape.back() = k;
  at::Tensor values = at::empty(shape, self.options());
  at::Tensor indices = at::empty(shape, self.options().dtype(at::kLong));
  if (r.rows > 0 && k > 0) {
    if (k <= topk_fused_limit(kt)) {
      kt.softmax_topk(r.x2d, k, values.view({r.rows, k}), indices.view({r.rows, k}), alg);
    } else {
      // Beyond the device kernel's list capacity: the values from the softmax, the order from a stable descending
      // sort of the logits themselves -- the fused kernels' rule (larger logit first, ties by the smaller index,
      // NaN first). Ranking the probabilities instead would tie distinct logits that round to one bf16 / fp16
      // probability, and torch.topk leaves the order of ties unspecified.
      at::Tensor p = at::empty_like(r.x2d);
      kt.softmax(r.x2d, p, /*log=*/false, alg);
      at::Tensor order = std::get<1>(at::sort(r.x2d, /*stable=*/true, /*dim=*/-1, /*descending=*/true));
      at::Tensor idx = order.narrow(-1, 0, k);
      values.view({r.rows, k}).copy_(p.gather(-1, idx));
      indices.view({r.rows, k}).copy_(idx);
    }
  }
  if (self.dim() > 0) {
    values = values.movedim(-1, r.dim);
    indices = indices.movedim(-1, r.dim);
  }
  return {values, indices};
}

std::string resolve_algorithm_op(const at::Tensor& self, int64_t dim, c10::string_view algorithm,
                                 const SoftmaxKernels& k) {
  RowView r = as_rows(self, dim);
  return parse_algorithm(algorithm, r.rows, r.V, self.scalar_type(), k, "resolve_algorithm") == Algorithm::Online
             ? "online"
             : "two_pass";
}

}  // namespace fastloss

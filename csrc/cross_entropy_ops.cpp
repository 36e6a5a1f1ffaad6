#include "cross_entropy_ops.h"

#include "fastloss/loss_math.h"

#include <ATen/ATen.h>

#include <cmath>

namespace fastloss {
namespace {

constexpr const char* kOp = "fastloss.cross_entropy";

// Class weights are float32, or float64 for float64 logits (the kernels' accumulation type).
at::ScalarType weight_dtype(const at::Tensor& logits) {
  return logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// Per-row values (losses, lse, incoming gradients) are float64 whatever the logits: N numbers cost nothing, and
// a float32 lse near 1e4 is off by 1e-3, which p = exp(x - lse) in the backward would carry into every gradient.
at::ScalarType row_dtype(const at::Tensor&) { return at::kDouble; }

void check_logits(const at::Tensor& logits) {
  auto st = logits.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kBFloat16 || st == at::kHalf, kOp,
              ": expected `input` (logits) to be a floating-point tensor (float32, float64, bfloat16 or float16), "
              "got ",
              st);
  TORCH_CHECK(logits.dim() == 2, kOp, ": the op expects logits of shape [N, C], got ", logits.sizes(),
              " (fastloss.cross_entropy reshapes (C), (N, C) and (N, C, d1, ...) for you)");
  TORCH_CHECK(logits.size(1) > 0 || logits.size(0) == 0, kOp, ": `input` has zero classes");
}

void check_params(double label_smoothing, double z_loss, std::optional<double> softcap) {
  TORCH_CHECK(label_smoothing >= 0.0 && label_smoothing <= 1.0, kOp,
              ": `label_smoothing` must be in [0, 1], got ", label_smoothing);
  TORCH_CHECK(std::isfinite(z_loss) && z_loss >= 0.0, kOp, ": `z_loss` must be a finite value >= 0, got ", z_loss);
  TORCH_CHECK(!softcap || (std::isfinite(*softcap) && *softcap > 0.0), kOp,
              ": `softcap` must be a finite value > 0 (or None), got ", softcap ? *softcap : 0.0);
}

Algorithm pick(c10::string_view name, const at::Tensor& logits, const SoftmaxKernels& sk) {
  if (name == "online") return Algorithm::Online;
  if (name == "two_pass") return Algorithm::TwoPass;
  TORCH_CHECK(name == "auto", kOp, ": `algorithm` must be \"auto\", \"online\" or \"two_pass\", got \"",
              std::string(name), "\"");
  return sk.choose_algorithm(logits.size(0), logits.size(1), logits.scalar_type());
}

CrossEntropyParams make_params(int64_t ignore_index, double label_smoothing, double z_loss,
                               std::optional<double> softcap, Algorithm alg) {
  CrossEntropyParams p;
  p.ignore_index = ignore_index;
  p.label_smoothing = label_smoothing;
  p.z_loss = z_loss;
  p.has_softcap = softcap.has_value();
  p.softcap = softcap.value_or(0.0);
  p.algorithm = alg;
  return p;
}

// "ce" / "focal" / "poly1" into p.loss_kind / p.loss_param (fastloss/loss_math.h), with their constraints.
void set_loss(CrossEntropyParams& p, c10::string_view loss, double param) {
  if (loss == "ce") {
    p.loss_kind = math::kLossCE;
  } else if (loss == "focal") {
    p.loss_kind = math::kLossFocal;
    TORCH_CHECK(std::isfinite(param) && param >= 0.0, kOp, ": focal `gamma` must be a finite value >= 0, got ",
                param);
  } else if (loss == "poly1") {
    p.loss_kind = math::kLossPoly1;
    TORCH_CHECK(std::isfinite(param), kOp, ": poly1 `epsilon` must be finite, got ", param);
  } else if (loss == "squentropy") {
    p.loss_kind = math::kLossSquentropy;
  } else {
    TORCH_CHECK(false, kOp, ": `loss` must be \"ce\", \"focal\", \"poly1\" or \"squentropy\", got \"",
                std::string(loss), "\"");
  }
  TORCH_CHECK(p.loss_kind == math::kLossCE || p.label_smoothing == 0.0, kOp, ": loss=\"", std::string(loss),
              "\" does not take label_smoothing");
  p.loss_param = param;
}

// Class weights as contiguous float32 (float64 for float64 logits) on the logits' device, with their sum kept on
// the device: kWv = 16 / element-size copies in one buffer, copy j starting j elements past a 16-byte boundary
// (the buffer is allocator-aligned; the stride is 1 more than a multiple of kWv), so that the CUDA kernels read
// the weights of any row as aligned 16-byte vectors (csrc/cuda/row_reduce.cuh row_weights). One copy kernel.
void prepare_weight(CrossEntropyInputs& in, const std::optional<at::Tensor>& weight) {
  if (!weight || !weight->defined()) return;
  const at::Tensor& w = *weight;
  TORCH_CHECK(at::isFloatingType(w.scalar_type()), kOp, ": `weight` must be a floating-point tensor, got ",
              w.scalar_type());
  TORCH_CHECK(w.dim() == 1 && w.size(0) == in.logits.size(1), kOp, ": `weight` must have shape [C] = [",
              in.logits.size(1), "], got ", w.sizes());
  TORCH_CHECK(w.device() == in.logits.device(), kOp, ": `weight` is on ", w.device(), " but `input` is on ",
              in.logits.device());
  const at::ScalarType dt = weight_dtype(in.logits);
  const int64_t C = w.size(0);
  const int64_t kwv = 16 / static_cast<int64_t>(c10::elementSize(dt));
  const int64_t stride = (C + kwv - 1) / kwv * kwv + kwv + 1;  // = 1 (mod kwv), room for C
  at::Tensor buf = at::empty({kwv * stride}, w.options().dtype(dt));
  buf.as_strided({kwv, C}, {stride, 1}).copy_(w.expand({kwv, C}));
  in.weight = buf.as_strided({C}, {1});
  in.weight_copy_stride = stride;
  in.weight_sum = in.weight.sum();
}

CrossEntropyInputs index_inputs(const at::Tensor& logits, const at::Tensor& target,
                                const std::optional<at::Tensor>& weight, int64_t ignore_index) {
  check_logits(logits);
  TORCH_CHECK(target.scalar_type() == at::kLong, kOp, ": class-index `target` must be int64 (torch.long), got ",
              target.scalar_type());
  TORCH_CHECK(target.dim() == 1 && target.size(0) == logits.size(0), kOp, ": `target` must have shape [N] = [",
              logits.size(0), "] for logits of shape ", logits.sizes(), ", got ", target.sizes());
  TORCH_CHECK(target.device() == logits.device(), kOp, ": `target` is on ", target.device(), " but `input` is on ",
              logits.device());
  CrossEntropyInputs in;
  in.logits = logits.contiguous();
  in.target = target.contiguous();
  prepare_weight(in, weight);
  if (in.target.is_cpu()) {
    // Never an out-of-bounds read: name the first bad target. (CUDA kernels check on the device instead.)
    const int64_t* t = in.target.const_data_ptr<int64_t>();
    const int64_t C = logits.size(1);
    for (int64_t i = 0; i < in.target.numel(); ++i) {
      TORCH_CHECK_INDEX(t[i] == ignore_index || (t[i] >= 0 && t[i] < C), kOp, ": target ", t[i], " at position ", i,
                        " is out of bounds for ", C, " classes (and is not ignore_index=", ignore_index, ")");
    }
  }
  return in;
}

CrossEntropyInputs prob_inputs(const at::Tensor& logits, const at::Tensor& target,
                               const std::optional<at::Tensor>& weight) {
  check_logits(logits);
  TORCH_CHECK(at::isFloatingType(target.scalar_type()), kOp,
              ": probability `target` must be a floating-point tensor, got ", target.scalar_type());
  TORCH_CHECK(target.sizes() == logits.sizes(), kOp, ": probability `target` must have the logits' shape ",
              logits.sizes(), ", got ", target.sizes());
  TORCH_CHECK(target.device() == logits.device(), kOp, ": `target` is on ", target.device(), " but `input` is on ",
              logits.device());
  CrossEntropyInputs in;
  in.logits = logits.contiguous();
  in.target = target.to(logits.scalar_type()).contiguous();
  prepare_weight(in, weight);
  return in;
}

at::Tensor new_rows(const at::Tensor& logits, int64_t n) {
  return at::empty({n}, logits.options().dtype(row_dtype(logits)));
}

at::Tensor as_rows(const at::Tensor& t, const at::Tensor& logits, int64_t n, const char* name) {
  TORCH_CHECK(t.numel() == n, kOp, ": `", name, "` must have one value per row (", n, "), got ", t.sizes());
  TORCH_CHECK(t.device() == logits.device(), kOp, ": `", name, "` is on ", t.device(), " but `input` is on ",
              logits.device());
  return t.to(row_dtype(logits)).contiguous().view({n});
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_entropy_fwd_op(const at::Tensor& logits, const at::Tensor& target,
                                                        const std::optional<at::Tensor>& weight, int64_t ignore_index,
                                                        double label_smoothing, double z_loss,
                                                        std::optional<double> softcap, c10::string_view algorithm,
                                                        c10::string_view loss_name, double loss_param,
                                                        const SoftmaxKernels& sk, const CrossEntropyKernels& k) {
  check_params(label_smoothing, z_loss, softcap);
  auto p = make_params(ignore_index, label_smoothing, z_loss, softcap, Algorithm::Online);
  set_loss(p, loss_name, loss_param);
  CrossEntropyInputs in = index_inputs(logits, target, weight, ignore_index);
  const int64_t N = logits.size(0);
  at::Tensor loss = new_rows(logits, N), lse = new_rows(logits, N);
  at::Tensor sum_sq = new_rows(logits, p.loss_kind == math::kLossSquentropy ? N : 0);
  if (N == 0) return {loss, lse, sum_sq};
  p.algorithm = pick(algorithm, logits, sk);
  if (sum_sq.numel() > 0) in.sum_sq = sum_sq;
  k.index_forward(in, p, loss, lse, at::Tensor(), at::Tensor());
  return {loss, lse, sum_sq};
}

at::Tensor cross_entropy_bwd_op(const at::Tensor& grad_loss, const std::optional<at::Tensor>& grad_lse,
                                const at::Tensor& logits, const at::Tensor& target,
                                const std::optional<at::Tensor>& weight, const at::Tensor& lse, int64_t ignore_index,
                                double label_smoothing, double z_loss, std::optional<double> softcap,
                                c10::string_view loss_name, double loss_param,
                                const std::optional<at::Tensor>& sum_sq, const CrossEntropyKernels& k) {
  check_params(label_smoothing, z_loss, softcap);
  auto p = make_params(ignore_index, label_smoothing, z_loss, softcap, Algorithm::Online);
  set_loss(p, loss_name, loss_param);
  CrossEntropyInputs in = index_inputs(logits, target, weight, ignore_index);
  const int64_t N = logits.size(0);
  at::Tensor grad = at::empty_like(in.logits);
  if (grad.numel() == 0) return grad;
  at::Tensor gz = grad_lse && grad_lse->defined() ? as_rows(*grad_lse, logits, N, "grad_lse") : at::Tensor();
  if (p.loss_kind == math::kLossSquentropy && sum_sq && sum_sq->defined() && sum_sq->numel() > 0) {
    in.sum_sq = as_rows(*sum_sq, logits, N, "sum_sq");
  }
  k.index_backward(in, p, as_rows(grad_loss, logits, N, "grad_loss"), gz, as_rows(lse, logits, N, "lse"), grad);
  return grad;
}

std::tuple<at::Tensor, at::Tensor> cross_entropy_fwd_inplace_grad_op(
    const at::Tensor& logits, const at::Tensor& target, const std::optional<at::Tensor>& weight,
    const at::Tensor& grad_scale, int64_t ignore_index, double label_smoothing, double z_loss,
    std::optional<double> softcap, c10::string_view algorithm, c10::string_view loss_name, double loss_param,
    const SoftmaxKernels& sk, const CrossEntropyKernels& k) {
  check_params(label_smoothing, z_loss, softcap);
  auto p = make_params(ignore_index, label_smoothing, z_loss, softcap, Algorithm::Online);
  set_loss(p, loss_name, loss_param);
  TORCH_CHECK(logits.is_contiguous(), kOp, ": the in-place gradient needs contiguous logits");
  CrossEntropyInputs in = index_inputs(logits, target, weight, ignore_index);
  const int64_t N = logits.size(0);
  at::Tensor loss = new_rows(logits, N), lse = new_rows(logits, N);
  if (N == 0) return {loss, lse};
  at::Tensor scale = grad_scale.numel() == 1
                         ? grad_scale.to(row_dtype(logits)).reshape({1}).expand({N}).contiguous()
                         : as_rows(grad_scale, logits, N, "grad_scale");
  p.algorithm = pick(algorithm, logits, sk);
  k.index_forward(in, p, loss, lse, scale, logits);
  return {loss, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_entropy_prob_fwd_op(
    const at::Tensor& logits, const at::Tensor& target, const std::optional<at::Tensor>& weight,
    double label_smoothing, double z_loss, std::optional<double> softcap, c10::string_view algorithm,
    const SoftmaxKernels& sk, const CrossEntropyKernels& k) {
  check_params(label_smoothing, z_loss, softcap);
  CrossEntropyInputs in = prob_inputs(logits, target, weight);
  const int64_t N = logits.size(0);
  at::Tensor loss = new_rows(logits, N), lse = new_rows(logits, N), sum_wy = new_rows(logits, N);
  if (N == 0) return {loss, lse, sum_wy};
  auto p = make_params(-100, label_smoothing, z_loss, softcap, pick(algorithm, logits, sk));
  k.prob_forward(in, p, loss, lse, sum_wy);
  return {loss, lse, sum_wy};
}

at::Tensor cross_entropy_prob_bwd_op(const at::Tensor& grad_loss, const std::optional<at::Tensor>& grad_lse,
                                     const at::Tensor& logits, const at::Tensor& target,
                                     const std::optional<at::Tensor>& weight, const at::Tensor& lse,
                                     const at::Tensor& sum_wy, double label_smoothing, double z_loss,
                                     std::optional<double> softcap, const CrossEntropyKernels& k) {
  check_params(label_smoothing, z_loss, softcap);
  CrossEntropyInputs in = prob_inputs(logits, target, weight);
  const int64_t N = logits.size(0);
  at::Tensor grad = at::empty_like(in.logits);
  if (grad.numel() == 0) return grad;
  at::Tensor gz = grad_lse && grad_lse->defined() ? as_rows(*grad_lse, logits, N, "grad_lse") : at::Tensor();
  auto p = make_params(-100, label_smoothing, z_loss, softcap, Algorithm::Online);
  k.prob_backward(in, p, as_rows(grad_loss, logits, N, "grad_loss"), gz, as_rows(lse, logits, N, "lse"),
                  as_rows(sum_wy, logits, N, "sum_wy"), grad);
  return grad;
}

void scale_rows_op(const at::Tensor& self, const at::Tensor& scale, const CrossEntropyKernels& k) {
  TORCH_CHECK(self.dim() == 2 && self.is_contiguous(), "fastloss.scale_rows_: expected a contiguous [N, C] tensor, got ",
              self.sizes());
  TORCH_CHECK(scale.numel() == 1 || scale.numel() == self.size(0),
              "fastloss.scale_rows_: `scale` must hold 1 or N values, got ", scale.sizes());
  TORCH_CHECK(scale.device() == self.device(), "fastloss.scale_rows_: `scale` is on ", scale.device(),
              " but `self` is on ", self.device());
  if (self.numel() == 0) return;
  at::Tensor s = scale.to(row_dtype(self)).contiguous().view({scale.numel()});
  k.scale_rows(self, s);
}

}  // namespace fastloss

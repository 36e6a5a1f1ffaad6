#include "cross_entropy_ops.h"

#include "fastloss/loss_math.h"

#include <ATen/ATen.h>

#include <cmath>
#include <limits>

namespace fastloss {
namespace {

constexpr const char* kOp = "fastloss.cross_entropy";
constexpr const char* kShardOp = "fastloss.cross_entropy_shard";

// Class weights are float32, or float64 for float64 logits (the kernels' accumulation type).
at::ScalarType weight_dtype(const at::Tensor& logits) {
  return logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// Per-row values (losses, lse, incoming gradients) are float64 whatever the logits: N numbers cost nothing, and
// a float32 lse near 1e4 is off by 1e-3, which p = exp(x - lse) in the backward would carry into every gradient.
at::ScalarType row_dtype(const at::Tensor&) { return at::kDouble; }

// `op` names the op in messages; a vocabulary shard (shard = true) may hold no classes.
void check_logits(const at::Tensor& logits, const char* op = kOp, bool shard = false) {
  auto st = logits.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kBFloat16 || st == at::kHalf, op,
              ": expected `input` (logits) to be a floating-point tensor (float32, float64, bfloat16 or float16), "
              "got ",
              st);
  TORCH_CHECK(logits.dim() == 2, op, ": the op expects logits of shape [N, C], got ", logits.sizes(),
              shard ? "" : " (fastloss.cross_entropy reshapes (C), (N, C) and (N, C, d1, ...) for you)");
  TORCH_CHECK(shard || logits.size(1) > 0 || logits.size(0) == 0, op, ": `input` has zero classes");
}

void check_params(double label_smoothing, double z_loss, std::optional<double> softcap, const char* op = kOp) {
  TORCH_CHECK(label_smoothing >= 0.0 && label_smoothing <= 1.0, op,
              ": `label_smoothing` must be in [0, 1], got ", label_smoothing);
  TORCH_CHECK(std::isfinite(z_loss) && z_loss >= 0.0, op, ": `z_loss` must be a finite value >= 0, got ", z_loss);
  TORCH_CHECK(!softcap || (std::isfinite(*softcap) && *softcap > 0.0), op,
              ": `softcap` must be a finite value > 0 (or None), got ", softcap ? *softcap : 0.0);
}

Algorithm pick(c10::string_view name, const at::Tensor& logits, const SoftmaxKernels& sk, const char* op = kOp) {
  if (name == "online") return Algorithm::Online;
  if (name == "two_pass") return Algorithm::TwoPass;
  TORCH_CHECK(name == "auto", op, ": `algorithm` must be \"auto\", \"online\" or \"two_pass\", got \"",
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
void set_loss(CrossEntropyParams& p, c10::string_view loss, double param, const char* op = kOp) {
  if (loss == "ce") {
    p.loss_kind = math::kLossCE;
  } else if (loss == "focal") {
    p.loss_kind = math::kLossFocal;
    TORCH_CHECK(std::isfinite(param) && param >= 0.0, op, ": focal `gamma` must be a finite value >= 0, got ",
                param);
  } else if (loss == "poly1") {
    p.loss_kind = math::kLossPoly1;
    TORCH_CHECK(std::isfinite(param), op, ": poly1 `epsilon` must be finite, got ", param);
  } else if (loss == "squentropy") {
    p.loss_kind = math::kLossSquentropy;
  } else {
    TORCH_CHECK(false, op, ": `loss` must be \"ce\", \"focal\", \"poly1\" or \"squentropy\", got \"",
                std::string(loss), "\"");
  }
  TORCH_CHECK(p.loss_kind == math::kLossCE || p.label_smoothing == 0.0, op, ": loss=\"", std::string(loss),
              "\" does not take label_smoothing");
  p.loss_param = param;
}

// Class weights as contiguous float32 (float64 for float64 logits) on the logits' device, with their sum kept on
// the device: kWv = 16 / element-size copies in one buffer, copy j starting j elements past a 16-byte boundary
// (the buffer is allocator-aligned; the stride is 1 more than a multiple of kWv), so that the CUDA kernels read
// the weights of any row as aligned 16-byte vectors (csrc/cuda/row_reduce.cuh row_weights). One copy kernel.
void prepare_weight(CrossEntropyInputs& in, const std::optional<at::Tensor>& weight, const char* op = kOp) {
  if (!weight || !weight->defined()) return;
  const at::Tensor& w = *weight;
  TORCH_CHECK(at::isFloatingType(w.scalar_type()), op, ": `weight` must be a floating-point tensor, got ",
              w.scalar_type());
  TORCH_CHECK(w.dim() == 1 && w.size(0) == in.logits.size(1), op, ": `weight` must have shape [C] = [",
              in.logits.size(1), "], got ", w.sizes());
  TORCH_CHECK(w.device() == in.logits.device(), op, ": `weight` is on ", w.device(), " but `input` is on ",
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

// class_bound: targets other than ignore_index must lie in [0, class_bound) (C; a shard's: V, or 0 for no check).
CrossEntropyInputs index_inputs(const at::Tensor& logits, const at::Tensor& target,
                                const std::optional<at::Tensor>& weight, int64_t ignore_index, const char* op = kOp,
                                int64_t class_bound = -1) {
  const bool shard = op == kShardOp;
  check_logits(logits, op, shard);
  TORCH_CHECK(target.scalar_type() == at::kLong, op, ": class-index `target` must be int64 (torch.long), got ",
              target.scalar_type());
  TORCH_CHECK(target.dim() == 1 && target.size(0) == logits.size(0), op, ": `target` must have shape [N] = [",
              logits.size(0), "] for logits of shape ", logits.sizes(), ", got ", target.sizes());
  TORCH_CHECK(target.device() == logits.device(), op, ": `target` is on ", target.device(), " but `input` is on ",
              logits.device());
  CrossEntropyInputs in;
  in.logits = logits.contiguous();
  in.target = target.contiguous();
  prepare_weight(in, weight, op);
  if (in.target.is_cpu() && class_bound != 0) {
    // Never an out-of-bounds read: name the first bad target. (CUDA kernels check on the device instead.)
    const int64_t* t = in.target.const_data_ptr<int64_t>();
    const int64_t C = class_bound > 0 ? class_bound : logits.size(1);
    for (int64_t i = 0; i < in.target.numel(); ++i) {
      TORCH_CHECK_INDEX(t[i] == ignore_index || (t[i] >= 0 && t[i] < C), op, ": target ", t[i], " at position ", i,
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

at::Tensor as_rows(const at::Tensor& t, const at::Tensor& logits, int64_t n, const char* name, const char* op = kOp) {
  TORCH_CHECK(t.numel() == n, op, ": `", name, "` must have one value per row (", n, "), got ", t.sizes());
  TORCH_CHECK(t.device() == logits.device(), op, ": `", name, "` is on ", t.device(), " but `input` is on ",
              logits.device());
  return t.to(row_dtype(logits)).contiguous().view({n});
}

// ---------------------------------------------------------------- vocabulary shards

// The shard ops' parameters: the shard [vocab_start, vocab_start + C) inside a vocabulary of vocab_size classes.
void check_shard(int64_t C, int64_t vocab_start, int64_t vocab_size) {
  TORCH_CHECK(vocab_start >= 0, kShardOp, ": `vocab_start` must be >= 0, got ", vocab_start);
  TORCH_CHECK(vocab_size >= 1 && vocab_size >= vocab_start + C, kShardOp, ": `vocab_size` (", vocab_size,
              ") must be >= 1 and hold the shard's classes [vocab_start, vocab_start + C) = [", vocab_start, ", ",
              vocab_start + C, ")");
}

// The combined per-row statistics: float64 [N, 4], on `device`.
at::Tensor shard_rows(const at::Tensor& rows, int64_t n, const c10::Device& device) {
  TORCH_CHECK(rows.scalar_type() == at::kDouble, kShardOp, ": `rows` must be float64, got ", rows.scalar_type());
  TORCH_CHECK(rows.dim() == 2 && rows.size(0) == n && rows.size(1) == math::kShardStats, kShardOp,
              ": `rows` must have shape [N, ", math::kShardStats, "] = [", n, ", ", math::kShardStats,
              "] (lse, target logit, target weight, sum), got ", rows.sizes());
  TORCH_CHECK(rows.device() == device, kShardOp, ": `rows` is on ", rows.device(), " but `input` is on ", device);
  return rows.contiguous();
}

// The vocabulary's class-weight sum as a 0-d tensor of `dtype` on `device` (vocab_size when none is given).
at::Tensor shard_weight_sum(const std::optional<at::Tensor>& weight_sum, int64_t vocab_size, at::ScalarType dtype,
                            const c10::Device& device) {
  if (!weight_sum || !weight_sum->defined()) {
    return at::full({}, static_cast<double>(vocab_size), at::TensorOptions().dtype(dtype).device(device));
  }
  const at::Tensor& w = *weight_sum;
  TORCH_CHECK(at::isFloatingType(w.scalar_type()) && w.numel() == 1, kShardOp,
              ": `weight_sum` must be a floating-point tensor holding one value, got ", w.scalar_type(), " of shape ",
              w.sizes());
  TORCH_CHECK(w.device() == device, kShardOp, ": `weight_sum` is on ", w.device(), " but `input` is on ", device);
  return w.to(dtype).reshape({});
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

// Shard forward: stats [N, 4] (fastloss/loss_math.h kShardStats). An empty shard (C = 0) needs no kernel: m = -inf
// for the rows that are not ignored, everything else 0.
at::Tensor cross_entropy_shard_fwd_op(const at::Tensor& logits, const at::Tensor& target,
                                      const std::optional<at::Tensor>& weight, int64_t vocab_start,
                                      int64_t ignore_index, double label_smoothing, std::optional<double> softcap,
                                      c10::string_view algorithm, c10::string_view loss_name,
                                      const SoftmaxKernels& sk, const CrossEntropyKernels& k) {
  check_params(label_smoothing, 0.0, softcap, kShardOp);
  auto p = make_params(ignore_index, label_smoothing, 0.0, softcap, Algorithm::Online);
  set_loss(p, loss_name, 0.0, kShardOp);
  CrossEntropyInputs in = index_inputs(logits, target, weight, ignore_index, kShardOp, /*class_bound=*/0);
  TORCH_CHECK(vocab_start >= 0, kShardOp, ": `vocab_start` must be >= 0, got ", vocab_start);
  const int64_t N = logits.size(0), C = logits.size(1);
  at::Tensor stats = at::zeros({N, math::kShardStats}, logits.options().dtype(at::kDouble));
  if (N == 0) return stats;
  if (C == 0) {
    stats.select(1, 0).masked_fill_(in.target != ignore_index, -std::numeric_limits<double>::infinity());
    return stats;
  }
  p.vocab_start = vocab_start;
  p.algorithm = pick(algorithm, logits, sk, kShardOp);
  // The shard's weight sum in float64: sum_c w_c x'_c = S + W shift, and a float32 W would cost W shift (~1e4 C for
  // logits near 1e4) its last digits.
  if (in.weight.defined()) in.weight_sum = in.weight.sum(at::kDouble);
  k.shard_forward(in, p, stats);
  return stats;
}

at::Tensor cross_entropy_shard_loss_op(const at::Tensor& rows, const at::Tensor& target,
                                       const std::optional<at::Tensor>& weight_sum, int64_t vocab_size,
                                       int64_t ignore_index, double label_smoothing, double z_loss,
                                       c10::string_view loss_name, double loss_param, const CrossEntropyKernels& k) {
  check_params(label_smoothing, z_loss, std::nullopt, kShardOp);
  auto p = make_params(ignore_index, label_smoothing, z_loss, std::nullopt, Algorithm::Online);
  set_loss(p, loss_name, loss_param, kShardOp);
  check_shard(0, 0, vocab_size);
  TORCH_CHECK(target.scalar_type() == at::kLong && target.dim() == 1, kShardOp,
              ": class-index `target` must be an int64 (torch.long) tensor of shape [N], got ", target.scalar_type(),
              " of shape ", target.sizes());
  const int64_t N = target.size(0);
  TORCH_CHECK(target.device() == rows.device(), kShardOp, ": `target` is on ", target.device(), " but `rows` is on ",
              rows.device());
  const at::Tensor r = shard_rows(rows, N, rows.device());
  const at::Tensor t = target.contiguous();
  if (t.is_cpu()) {
    const int64_t* pt = t.const_data_ptr<int64_t>();
    for (int64_t i = 0; i < N; ++i) {
      TORCH_CHECK_INDEX(pt[i] == ignore_index || (pt[i] >= 0 && pt[i] < vocab_size), kShardOp, ": target ", pt[i],
                        " at position ", i, " is out of bounds for ", vocab_size,
                        " classes (and is not ignore_index=", ignore_index, ")");
    }
  }
  at::Tensor loss = at::empty({N}, rows.options().dtype(at::kDouble));
  if (N == 0) return loss;
  p.vocab_size = vocab_size;
  at::Tensor W = weight_sum && weight_sum->defined()
                     ? shard_weight_sum(weight_sum, vocab_size, at::kDouble, rows.device())
                     : at::Tensor();
  k.shard_loss(r, t, W, p, loss);
  return loss;
}

at::Tensor cross_entropy_shard_bwd_op(const at::Tensor& grad_loss, const std::optional<at::Tensor>& grad_lse,
                                      const at::Tensor& logits, const at::Tensor& target,
                                      const std::optional<at::Tensor>& weight, const at::Tensor& rows,
                                      const std::optional<at::Tensor>& weight_sum, int64_t vocab_start,
                                      int64_t vocab_size, int64_t ignore_index, double label_smoothing,
                                      double z_loss, std::optional<double> softcap, c10::string_view loss_name,
                                      double loss_param, const CrossEntropyKernels& k) {
  check_params(label_smoothing, z_loss, softcap, kShardOp);
  auto p = make_params(ignore_index, label_smoothing, z_loss, softcap, Algorithm::Online);
  set_loss(p, loss_name, loss_param, kShardOp);
  CrossEntropyInputs in = index_inputs(logits, target, weight, ignore_index, kShardOp, vocab_size > 0 ? vocab_size : 0);
  const int64_t N = logits.size(0);
  check_shard(logits.size(1), vocab_start, vocab_size);
  const at::Tensor r = shard_rows(rows, N, logits.device());
  at::Tensor grad = at::empty_like(in.logits);
  at::Tensor gl = as_rows(grad_loss, logits, N, "grad_loss", kShardOp);
  at::Tensor gz =
      grad_lse && grad_lse->defined() ? as_rows(*grad_lse, logits, N, "grad_lse", kShardOp) : at::Tensor();
  const at::Tensor W = shard_weight_sum(weight_sum, vocab_size, weight_dtype(logits), logits.device());
  if (grad.numel() == 0) return grad;
  p.vocab_start = vocab_start;
  p.vocab_size = vocab_size;
  k.shard_backward(in, p, gl, gz, r, W, grad);
  return grad;
}

}  // namespace fastloss

#include "policy_ops.h"

#include "fastloss/policy_math.h"
#include "row_op_checks.h"

#include <ATen/ATen.h>

#include <cmath>
#include <limits>
#include <string>

namespace fastloss {
namespace {

constexpr const char* kLogprobOp = "fastloss.token_logprobs";
constexpr const char* kDistillOp = "fastloss.distillation_loss";

void check_temperature(double temperature, const char* op) {
  TORCH_CHECK(std::isfinite(temperature) && temperature > 0.0, op,
              ": `temperature` must be a finite value > 0, got ", temperature);
}

// Every distillation op's options, checked: the one prologue they share (the tensors go through distill_inputs).
DistillParams make_distill_params(c10::string_view divergence, double beta, double temperature, int64_t ignore_index,
                                  double hard_weight, const std::optional<at::Tensor>& target) {
  const bool has_target = target && target->defined();
  check_temperature(temperature, kDistillOp);
  TORCH_CHECK(beta >= 0.0 && beta <= 1.0, kDistillOp, ": `beta` must be in [0, 1], got ", beta);
  TORCH_CHECK(std::isfinite(hard_weight) && hard_weight >= 0.0, kDistillOp,
              ": `hard_weight` must be a finite value >= 0, got ", hard_weight);
  TORCH_CHECK(hard_weight == 0.0 || has_target, kDistillOp,
              ": `hard_weight` > 0 adds the cross-entropy against `target`, which is None");
  DistillParams p;
  if (divergence == "forward_kl") {
    p.divergence = math::kForwardKL;
  } else if (divergence == "reverse_kl") {
    p.divergence = math::kReverseKL;
  } else {
    TORCH_CHECK(divergence == "jsd", kDistillOp,
                ": `divergence` must be \"forward_kl\", \"reverse_kl\" or \"jsd\", got \"", std::string(divergence),
                "\"");
    // TRL's generalized_jsd_loss special-cases the ends: beta = 0 is KL(teacher || student), beta = 1 is
    // KL(student || teacher) (the mixture formula itself degenerates to 0 there).
    p.divergence = beta == 0.0 ? math::kForwardKL : beta == 1.0 ? math::kReverseKL : math::kJSD;
  }
  p.beta = beta;
  p.inv_temperature = 1.0 / temperature;
  p.ignore_index = ignore_index;
  p.hard_weight = hard_weight;
  return p;
}

struct DistillInputs {
  at::Tensor student, teacher, target;
};

DistillInputs distill_inputs(const at::Tensor& student, const at::Tensor& teacher,
                             const std::optional<at::Tensor>& target, int64_t ignore_index) {
  check_logits(student, kDistillOp, "student_logits");
  check_logits(teacher, kDistillOp, "teacher_logits");
  TORCH_CHECK(student.sizes() == teacher.sizes(), kDistillOp, ": `teacher_logits` must have the shape of "
              "`student_logits` ", student.sizes(), " (the same vocabulary), got ", teacher.sizes());
  TORCH_CHECK(student.scalar_type() == teacher.scalar_type(), kDistillOp, ": `teacher_logits` (",
              teacher.scalar_type(), ") must have the dtype of `student_logits` (", student.scalar_type(), ")");
  TORCH_CHECK(student.device() == teacher.device(), kDistillOp, ": `teacher_logits` is on ", teacher.device(),
              " but `student_logits` is on ", student.device());
  DistillInputs in{student.contiguous(), teacher.contiguous(), at::Tensor()};
  if (target && target->defined()) in.target = check_indices(*target, student, kDistillOp, "target", ignore_index);
  return in;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> token_logprobs_fwd_op(
    const at::Tensor& logits, const at::Tensor& tokens, double temperature, bool entropy, bool stats,
    const PolicyKernels& k) {
  check_logits(logits, kLogprobOp, "logits");
  check_temperature(temperature, kLogprobOp);
  const at::Tensor tok = check_indices(tokens, logits, kLogprobOp, "tokens", std::nullopt);
  const int64_t N = logits.size(0);
  at::Tensor lp = new_rows(logits, N), lse = new_rows(logits, N), ent = new_rows(logits, entropy ? N : 0);
  at::Tensor st = at::empty({stats ? N : 0, kTokenStats}, lp.options());
  at::Tensor am = at::empty({stats ? N : 0}, lp.options().dtype(at::kLong));
  if (N == 0) return {lp, ent, lse, st, am};
  k.logprob_forward(logits.contiguous(), tok, 1.0 / temperature, lp, entropy ? ent : at::Tensor(), lse,
                    stats ? st : at::Tensor(), stats ? am : at::Tensor());
  return {lp, ent, lse, st, am};
}

namespace {
// The backward's checks and incoming gradients; grad is written by the kernel (it may be the logits).
// vocab_start: the logits are a slice of the vocabulary starting there, tokens index the whole vocabulary (any
// value >= 0 here; the caller knows its size) and one outside the slice gets no + g_lp.
void logprob_backward(const at::Tensor& logits, const std::optional<at::Tensor>& g_lp,
                      const std::optional<at::Tensor>& g_h, const at::Tensor& tokens, const at::Tensor& lse,
                      const at::Tensor& entropy, double temperature, std::optional<int64_t> vocab_start,
                      const at::Tensor& grad, const PolicyKernels& k) {
  check_temperature(temperature, kLogprobOp);
  TORCH_CHECK(!vocab_start || *vocab_start >= 0, kLogprobOp, ": `vocab_start` must be >= 0, got ",
              vocab_start.value_or(0));
  // A slice's tokens index the whole vocabulary, whose size only the caller knows: here only >= 0 (int64 max as
  // the bound; CPU tensors) -- what falls outside the slice is another rank's.
  if (vocab_start && tokens.is_cpu() && tokens.scalar_type() == at::kLong && tokens.numel() > 0) {
    const at::Tensor c = tokens.contiguous();
    const int64_t* p = c.const_data_ptr<int64_t>();
    for (int64_t i = 0; i < c.numel(); ++i) {
      TORCH_CHECK_INDEX(p[i] >= 0, kLogprobOp, ": `tokens` value ", p[i], " at position ", i,
                        " is negative (with vocab_start, tokens index the whole vocabulary: >= 0)");
    }
  }
  const at::Tensor tok = check_indices(tokens, logits.size(0),
                                       vocab_start ? std::numeric_limits<int64_t>::max() : logits.size(1),
                                       logits.device(), kLogprobOp, "tokens", std::nullopt);
  if (logits.numel() == 0) return;
  at::Tensor glp = as_rows(g_lp, logits, kLogprobOp, "grad_logprobs");
  at::Tensor gh = as_rows(g_h, logits, kLogprobOp, "grad_entropy");
  at::Tensor ent;
  if (gh.defined()) {
    ent = as_rows(entropy, logits, kLogprobOp, "entropy");
  }
  k.logprob_backward(logits.contiguous(), tok, vocab_start.value_or(0), vocab_start.has_value(), 1.0 / temperature,
                     glp, gh, as_rows(lse, logits, kLogprobOp, "lse"), ent, grad);
}
}  // namespace

at::Tensor token_logprobs_bwd_op(const std::optional<at::Tensor>& grad_logprobs,
                                 const std::optional<at::Tensor>& grad_entropy, const at::Tensor& logits,
                                 const at::Tensor& tokens, const at::Tensor& lse, const at::Tensor& entropy,
                                 double temperature, std::optional<int64_t> vocab_start, const PolicyKernels& k) {
  check_logits(logits, kLogprobOp, "logits");
  at::Tensor grad = at::empty_like(logits, at::MemoryFormat::Contiguous);
  logprob_backward(logits, grad_logprobs, grad_entropy, tokens, lse, entropy, temperature, vocab_start, grad, k);
  return grad;
}

void token_logprobs_bwd_inplace_op(const at::Tensor& logits, const std::optional<at::Tensor>& grad_logprobs,
                                   const std::optional<at::Tensor>& grad_entropy, const at::Tensor& tokens,
                                   const at::Tensor& lse, const at::Tensor& entropy, double temperature,
                                   const PolicyKernels& k) {
  check_logits(logits, kLogprobOp, "logits");
  TORCH_CHECK(logits.is_contiguous(), kLogprobOp, ": the in-place gradient needs contiguous logits");
  logprob_backward(logits, grad_logprobs, grad_entropy, tokens, lse, entropy, temperature, std::nullopt, logits, k);
}

std::tuple<at::Tensor, at::Tensor> distill_fwd_op(const at::Tensor& student, const at::Tensor& teacher,
                                                  const std::optional<at::Tensor>& target,
                                                  c10::string_view divergence, double beta, double temperature,
                                                  int64_t ignore_index, double hard_weight, bool student_entropy,
                                                  const PolicyKernels& k) {
  DistillParams p = make_distill_params(divergence, beta, temperature, ignore_index, hard_weight, target);
  p.student_entropy = student_entropy;
  const DistillInputs in = distill_inputs(student, teacher, target, ignore_index);
  const int64_t N = student.size(0);
  at::Tensor loss = new_rows(student, N), stats = at::empty({N, kDistillStats}, loss.options());
  if (N == 0) return {loss, stats};
  k.distill_forward(in.student, in.teacher, in.target, p, loss, stats, at::Tensor(), at::Tensor());
  return {loss, stats};
}

at::Tensor distill_bwd_op(const at::Tensor& grad_loss, const at::Tensor& student, const at::Tensor& teacher,
                          const std::optional<at::Tensor>& target, const at::Tensor& stats,
                          c10::string_view divergence, double beta, double temperature, int64_t ignore_index,
                          double hard_weight, const PolicyKernels& k) {
  const DistillParams p = make_distill_params(divergence, beta, temperature, ignore_index, hard_weight, target);
  const DistillInputs in = distill_inputs(student, teacher, target, ignore_index);
  const int64_t N = student.size(0);
  TORCH_CHECK(stats.dim() == 2 && stats.size(0) == N && stats.size(1) == kDistillStats, kDistillOp,
              ": `stats` must have shape [", N, ", ", kDistillStats, "], got ", stats.sizes());
  at::Tensor grad = at::empty_like(in.student);
  if (grad.numel() == 0) return grad;
  k.distill_backward(in.student, in.teacher, in.target, p, as_rows(grad_loss, student, kDistillOp, "grad_loss"),
                     stats.to(at::kDouble).contiguous(), grad);
  return grad;
}

namespace {
// The forward that also writes d loss_r / d student * grad_scale[r] into grad (student itself, or a new tensor).
std::tuple<at::Tensor, at::Tensor> distill_forward_with_grad(const at::Tensor& student, const at::Tensor& teacher,
                                                             const std::optional<at::Tensor>& target,
                                                             const at::Tensor& grad_scale, const DistillParams& p,
                                                             const at::Tensor& grad, const PolicyKernels& k) {
  const DistillInputs in = distill_inputs(student, teacher, target, p.ignore_index);
  const int64_t N = student.size(0);
  at::Tensor loss = new_rows(student, N), stats = at::empty({N, kDistillStats}, loss.options());
  if (N == 0) return {loss, stats};
  TORCH_CHECK(grad_scale.device() == student.device(), kDistillOp, ": `grad_scale` is on ", grad_scale.device(),
              " but `student_logits` is on ", student.device());
  at::Tensor scale = grad_scale.numel() == 1
                         ? grad_scale.to(at::kDouble).reshape({1}).expand({N}).contiguous()
                         : as_rows(grad_scale, student, kDistillOp, "grad_scale");
  k.distill_forward(in.student, in.teacher, in.target, p, loss, stats, scale, grad);
  return {loss, stats};
}
}  // namespace

std::tuple<at::Tensor, at::Tensor> distill_fwd_inplace_grad_op(const at::Tensor& student, const at::Tensor& teacher,
                                                               const std::optional<at::Tensor>& target,
                                                               const at::Tensor& grad_scale,
                                                               c10::string_view divergence, double beta,
                                                               double temperature, int64_t ignore_index,
                                                               double hard_weight, bool student_entropy,
                                                               const PolicyKernels& k) {
  DistillParams p = make_distill_params(divergence, beta, temperature, ignore_index, hard_weight, target);
  p.student_entropy = student_entropy;
  TORCH_CHECK(student.is_contiguous(), kDistillOp, ": the in-place gradient needs contiguous student logits");
  return distill_forward_with_grad(student, teacher, target, grad_scale, p, student, k);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> distill_fwd_grad_op(const at::Tensor& student,
                                                                   const at::Tensor& teacher,
                                                                   const std::optional<at::Tensor>& target,
                                                                   const at::Tensor& grad_scale,
                                                                   c10::string_view divergence, double beta,
                                                                   double temperature, int64_t ignore_index,
                                                                   double hard_weight, bool student_entropy,
                                                                   const PolicyKernels& k) {
  DistillParams p = make_distill_params(divergence, beta, temperature, ignore_index, hard_weight, target);
  p.student_entropy = student_entropy;
  check_logits(student, kDistillOp, "student_logits");
  at::Tensor grad = at::empty(student.sizes(), student.options());
  auto [loss, stats] = distill_forward_with_grad(student, teacher, target, grad_scale, p, grad, k);
  return {loss, stats, grad};
}

}  // namespace fastloss

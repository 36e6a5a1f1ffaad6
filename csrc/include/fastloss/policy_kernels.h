// The contract between the distillation / token log-probability op layer (csrc/policy_ops.cpp) and the per-device
// row kernels. Formulas: fastloss/policy_math.h.
//
// Every kernel sees contiguous [N, V] logits (student and teacher of the same shape and dtype), int64 [N] tokens /
// targets, and float64 per-row arrays. The logits' gradient may alias the (student) logits: the in-place variants,
// where each element is read before its gradient is written.
#pragma once

#include <ATen/core/Tensor.h>

namespace fastloss {

struct DistillParams {
  int divergence = 0;  // fastloss/policy_math.h: kForwardKL, kReverseKL, kJSD
  double beta = 0.5;   // JSD only (0 < beta < 1; the op layer maps 0 / 1 to the KLs)
  double inv_temperature = 1.0;
  int64_t ignore_index = -100;
  double hard_weight = 0.0;  // > 0 needs a target
  // The forward also writes the entropy of softmax(student / T) (stats column kStudentEntropy), from the same pass:
  // the kernels carrying the entropy accumulator (fastloss/policy_math.h OnlineEntState, WEntState). Without it the
  // column is written as 0 by the kernels that do not carry it.
  bool student_entropy = false;
};

// Per-row statistics of the distillation forward, float64 [N, kDistillStats]: what the backward needs, and the
// student's entropy (for logging; the backward does not read it).
constexpr int64_t kDistillStats = 5;
enum DistillStat : int64_t {
  kLseStudent = 0,  // lse of the tempered student logits
  kLseTeacher = 1,  // lse of the tempered teacher logits
  kRowAux = 2,      // reverse KL: the row's KL; JSD: KL(s || M); forward KL: 0
  kLseHard = 3,     // lse of the untempered student logits (hard-label term; 0 without one)
  kStudentEntropy = 4,  // entropy of softmax(student / T) with DistillParams::student_entropy; else 0. 0 for ignored
                        // rows
};

// Per-row statistics of token_logprobs_fwd(stats=True), float64 [N, kTokenStats].
constexpr int64_t kTokenStats = 2;
enum TokenStat : int64_t {
  kLogSumSqProbs = 0,  // log sum_j softmax(x / T)_j^2
  kMeanLogits = 1,     // mean_j x_j / T
};

struct PolicyKernels {
  // logp[r] = log softmax(x[r] / T)[tokens[r]], lse[r] of x[r] / T, and (entropy defined) its entropy. With stats
  // defined (float64 [N, kTokenStats]) and argmax (int64 [N]), from the same pass: log sum_j p_j^2, the mean of
  // x[r] / T, and the first index of the row's max (fastloss/policy_math.h StatState, ArgMax).
  void (*logprob_forward)(const at::Tensor& x, const at::Tensor& tokens, double inv_temperature,
                          const at::Tensor& logp, const at::Tensor& entropy, const at::Tensor& lse,
                          const at::Tensor& stats, const at::Tensor& argmax);
  // grad = d(sum_r g_lp[r] logp[r] + g_h[r] H[r]) / dx (either incoming gradient may be undefined: zero).
  // `entropy` is read only with g_h. grad may alias x. Row r's token is column tokens[r] - vocab_start; with
  // shard (x a slice of a larger vocabulary, lse / entropy the whole vocabulary's) a column outside [0, V) is
  // another slice's token: no + g_lp here. Without shard every column is in [0, V) (checked by the op).
  void (*logprob_backward)(const at::Tensor& x, const at::Tensor& tokens, int64_t vocab_start, bool shard,
                           double inv_temperature,
                           const at::Tensor& g_lp, const at::Tensor& g_h, const at::Tensor& lse,
                           const at::Tensor& entropy, const at::Tensor& grad);
  // loss[r] (0 for ignored rows) and stats [N, kDistillStats] (the entropy column with p.student_entropy).
  // target may be undefined (no masking, no hard term).
  // With grad defined (it may alias student) also writes d loss[r] / d student * grad_scale[r] (grad_scale [N]).
  void (*distill_forward)(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& target,
                          const DistillParams& p, const at::Tensor& loss, const at::Tensor& stats,
                          const at::Tensor& grad_scale, const at::Tensor& grad);
  // grad = grad_loss[r] * d loss[r] / d student.
  void (*distill_backward)(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& target,
                           const DistillParams& p, const at::Tensor& grad_loss, const at::Tensor& stats,
                           const at::Tensor& grad);
};

const PolicyKernels& cpu_policy_kernels();
#if defined(FASTLOSS_WITH_CUDA) || defined(FASTLOSS_CUDA_EMU)
const PolicyKernels& cuda_policy_kernels();
#endif

}  // namespace fastloss

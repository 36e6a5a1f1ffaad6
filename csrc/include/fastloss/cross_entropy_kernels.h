// The contract between the cross-entropy op layer (csrc/cross_entropy_ops.cpp) and the per-device row kernels.
//
// Every kernel sees contiguous [N, C] logits (class dimension last), a contiguous target ([N] int64 class
// indices, or [N, C] probabilities of the logits' dtype), and optional class weights [C] (float32; float64 for
// float64 logits) with their sum as a 0-d tensor kept on the device (no host synchronisation). Every per-row
// array (loss, lse, sum_wy, incoming gradients, scales) is float64 [N]. The formulas are those of
// fastloss/loss_math.h. Reductions over rows happen above, in ATen.
#pragma once

#include <ATen/core/Tensor.h>

#include "fastloss/softmax_kernels.h"

namespace fastloss {

struct CrossEntropyParams {
  int64_t ignore_index = -100;
  double label_smoothing = 0.0;
  double z_loss = 0.0;
  bool has_softcap = false;
  double softcap = 0.0;
  Algorithm algorithm = Algorithm::Online;
  int loss_kind = 0;        // fastloss/loss_math.h: kLossCE, kLossFocal (loss_param = gamma), kLossPoly1 (epsilon)
  double loss_param = 0.0;
  // Vocabulary shards (the shard_* kernels only): the logits' C columns are the classes [vocab_start, vocab_start
  // + C) of a vocabulary of vocab_size classes; targets are global class indices.
  int64_t vocab_start = 0;
  int64_t vocab_size = 0;
};

struct CrossEntropyInputs {
  at::Tensor logits;      // [N, C]
  at::Tensor target;      // [N] int64, or [N, C] probabilities
  at::Tensor weight;      // [C] float32 (float64 for float64 logits), or undefined
  at::Tensor weight_sum;  // 0-d sum of weight, same dtype, or undefined
  // `weight` is copy 0 of 16 / sizeof(weight element) copies in one buffer, copy j starting j elements past a
  // 16-byte boundary and weight_copy_stride elements after copy j - 1: every row finds one whose 16-byte vectors
  // line up with its own (csrc/cuda/row_reduce.cuh row_weights). 0 when weight is undefined.
  int64_t weight_copy_stride = 0;
  at::Tensor sum_sq;      // squentropy: [N] float64 sum_c p_c^2, written by index_forward / read by index_backward
                          // when defined (undefined: the backward recomputes it with a pass over the row)
};

struct CrossEntropyKernels {
  // Class-index targets: loss[N] (0 for ignored rows), lse[N]. When grad_logits is defined (it may alias logits:
  // the in-place variant), also writes dloss_r/dlogits * grad_scale[r] in the same pass over each row.
  // (Per-row tensors below: float64 [N].)
  void (*index_forward)(const CrossEntropyInputs& in, const CrossEntropyParams& p, const at::Tensor& loss,
                        const at::Tensor& lse, const at::Tensor& grad_scale, const at::Tensor& grad_logits);
  // grad_logits = grad_loss[r] * dloss_r/dlogits + grad_lse[r] * softmax (grad_lse may be undefined).
  void (*index_backward)(const CrossEntropyInputs& in, const CrossEntropyParams& p, const at::Tensor& grad_loss,
                         const at::Tensor& grad_lse, const at::Tensor& lse, const at::Tensor& grad_logits);
  // Probability targets: loss[N], lse[N], and sum_wy[N] = sum_c w_c y'_c (kept for the backward).
  void (*prob_forward)(const CrossEntropyInputs& in, const CrossEntropyParams& p, const at::Tensor& loss,
                       const at::Tensor& lse, const at::Tensor& sum_wy);
  void (*prob_backward)(const CrossEntropyInputs& in, const CrossEntropyParams& p, const at::Tensor& grad_loss,
                        const at::Tensor& grad_lse, const at::Tensor& lse, const at::Tensor& sum_wy,
                        const at::Tensor& grad_logits);
  // x[r, :] *= scale[r] in place (scale: [N] float64, or a single value for all rows); rows whose scale is exactly 1 are
  // left untouched, so the usual loss.backward() (incoming gradient 1) costs no pass over the logits.
  void (*scale_rows)(const at::Tensor& x, const at::Tensor& scale);

  // Vocabulary-parallel cross-entropy (the logits are one shard of the vocabulary, p.vocab_start / p.vocab_size;
  // the caller combines the shards' statistics). stats: float64 [N, 4] per row from one pass over the shard's row:
  // (m, d) of its online normaliser (m = -inf, d = 0 for an all -inf or empty row), x'_t when the target lies in
  // the shard (else 0), and sum_c w_c x'_c (label smoothing; in.weight_sum: the shard's, float64) or d2 =
  // sum_c e^(2 (x'_c - m)) (squentropy), else 0. Ignored rows: zeros, not read.
  void (*shard_forward)(const CrossEntropyInputs& in, const CrossEntropyParams& p, const at::Tensor& stats);
  // loss[N] from the combined rows float64 [N, 4] = (lse, x'_t, w_t, s) (s: sum_c w_c x'_c over the vocabulary,
  // or sum_c p_c^2 for squentropy), W = weight_sum (float64 0-d, undefined: vocab_size). No logits.
  void (*shard_loss)(const at::Tensor& rows, const at::Tensor& target, const at::Tensor& weight_sum,
                     const CrossEntropyParams& p, const at::Tensor& loss);
  // The shard's gradient columns from the combined rows and weight_sum (as shard_loss): index_backward's row pass
  // with p from the global lse, the target entry only when the target lies in the shard; ignored rows zero.
  void (*shard_backward)(const CrossEntropyInputs& in, const CrossEntropyParams& p, const at::Tensor& grad_loss,
                         const at::Tensor& grad_lse, const at::Tensor& rows, const at::Tensor& weight_sum,
                         const at::Tensor& grad_logits);
};

const CrossEntropyKernels& cpu_cross_entropy_kernels();
#if defined(FASTLOSS_WITH_CUDA) || defined(FASTLOSS_CUDA_EMU)  // the emulated build runs these on the CPU
const CrossEntropyKernels& cuda_cross_entropy_kernels();
#endif

}  // namespace fastloss

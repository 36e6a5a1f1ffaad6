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
  // The k largest softmax(self) entries along `dim` and their indices, best first, from one pass (no softmax
  // tensor): the online normaliser carried with a running top-k. Ties: the smaller index first; NaN ranks first.
  m.def("softmax_topk(Tensor self, int k, int dim=-1, str algorithm=\"auto\") -> (Tensor values, Tensor indices)");
}

TORCH_LIBRARY_FRAGMENT(fastloss, m) {
  // Cross-entropy from logits [N, C] (class dimension last). Per-row float32 losses (0 for ignored rows) and
  // log-sum-exps; reductions and their denominators are applied by the caller (python/fastloss/functional.py).
  m.def(
      "cross_entropy_fwd(Tensor logits, Tensor target, Tensor? weight, int ignore_index, float label_smoothing, "
      "float z_loss, float? softcap, str algorithm=\"auto\", str loss=\"ce\", float loss_param=0.0) "
      "-> (Tensor loss, Tensor lse, Tensor sum_sq)");
  m.def(
      "cross_entropy_bwd(Tensor grad_loss, Tensor? grad_lse, Tensor logits, Tensor target, Tensor? weight, "
      "Tensor lse, int ignore_index, float label_smoothing, float z_loss, float? softcap, str loss=\"ce\", "
      "float loss_param=0.0, Tensor? sum_sq=None) -> Tensor");
  // Forward that also writes dloss_r/dlogits * grad_scale[r] over the logits (Liger's trick: no second N x C
  // buffer). The logits are destroyed.
  m.def(
      "cross_entropy_fwd_inplace_grad(Tensor(a!) logits, Tensor target, Tensor? weight, Tensor grad_scale, "
      "int ignore_index, float label_smoothing, float z_loss, float? softcap, str algorithm=\"auto\", "
      "str loss=\"ce\", float loss_param=0.0) -> (Tensor loss, Tensor lse)");
  // `loss`: "ce", or the comp-sum losses "focal" (loss_param = gamma), "poly1" (loss_param = epsilon) and
  // "squentropy", which take class-index targets and no label smoothing (fastloss/loss_math.h). sum_sq: squentropy's
  // per-row sum of p^2 ([N] float64; empty for the other losses), handed to the backward so it need not re-read.
  // Probability (soft) targets [N, C].
  m.def(
      "cross_entropy_prob_fwd(Tensor logits, Tensor target, Tensor? weight, float label_smoothing, float z_loss, "
      "float? softcap, str algorithm=\"auto\") -> (Tensor loss, Tensor lse, Tensor sum_wy)");
  m.def(
      "cross_entropy_prob_bwd(Tensor grad_loss, Tensor? grad_lse, Tensor logits, Tensor target, Tensor? weight, "
      "Tensor lse, Tensor sum_wy, float label_smoothing, float z_loss, float? softcap) -> Tensor");
  // self[r, :] *= scale[r] (scale [N] or a single value), skipping rows whose scale is exactly 1.
  m.def("scale_rows_(Tensor(a!) self, Tensor scale) -> ()");
}

TORCH_LIBRARY_FRAGMENT(fastloss, m) {
  // RL policy terms from logits [N, V]: log softmax(logits / T)[tokens] per row and (entropy=True) the entropy of the
  // tempered softmax; float64 rows (entropy empty when not requested) and the per-row lse for the backward. With
  // stats=True, from the same pass: stats float64 [N, 2] (log sum_j p_j^2, mean_j logits_j / T) and argmax int64
  // [N] (the first index of the row's max), both non-differentiable; [0, 2] and [0] otherwise.
  m.def(
      "token_logprobs_fwd(Tensor logits, Tensor tokens, float temperature, bool entropy, bool stats=False) "
      "-> (Tensor logprobs, Tensor entropy, Tensor lse, Tensor stats, Tensor argmax)");
  // With vocab_start (vocabulary parallelism): logits [N, C] are the classes [vocab_start, vocab_start + C) of a
  // larger vocabulary, tokens are indices into that vocabulary (>= 0), and lse / entropy are the whole
  // vocabulary's; a token outside the slice contributes no + g_lp (another rank's slice holds it).
  m.def(
      "token_logprobs_bwd(Tensor? grad_logprobs, Tensor? grad_entropy, Tensor logits, Tensor tokens, Tensor lse, "
      "Tensor entropy, float temperature, int? vocab_start=None) -> Tensor");
  // The same gradient written over the logits (the chunked linear version's recomputed logits).
  m.def(
      "token_logprobs_bwd_(Tensor(a!) logits, Tensor? grad_logprobs, Tensor? grad_entropy, Tensor tokens, "
      "Tensor lse, Tensor entropy, float temperature) -> ()");
  // Distillation from student and teacher logits [N, V]: per-row divergence ("forward_kl" = KL(teacher || student),
  // "reverse_kl", "jsd" with GKD's beta) of the tempered softmaxes, plus hard_weight * cross-entropy of the untempered
  // student against `target` (rows with target == ignore_index: 0). stats: float64 [N, 5] for the backward; its last
  // column is the entropy of softmax(student / T) from the same pass with student_entropy=True (0 for ignored rows),
  // else 0 (the kernels without the entropy accumulator).
  m.def(
      "distill_fwd(Tensor student, Tensor teacher, Tensor? target, str divergence, float beta, float temperature, "
      "int ignore_index, float hard_weight, bool student_entropy=False) -> (Tensor loss, Tensor stats)");
  m.def(
      "distill_bwd(Tensor grad_loss, Tensor student, Tensor teacher, Tensor? target, Tensor stats, str divergence, "
      "float beta, float temperature, int ignore_index, float hard_weight) -> Tensor");
  // Forward that also writes d loss_r / d student * grad_scale[r] over the student logits (destroyed).
  m.def(
      "distill_fwd_inplace_grad(Tensor(a!) student, Tensor teacher, Tensor? target, Tensor grad_scale, "
      "str divergence, float beta, float temperature, int ignore_index, float hard_weight, "
      "bool student_entropy=False) -> (Tensor loss, Tensor stats)");
  // The same into a new tensor: the gradient of a reduced loss computed in the forward (Liger's trick without
  // destroying the logits; the backward only rescales it).
  m.def(
      "distill_fwd_grad(Tensor student, Tensor teacher, Tensor? target, Tensor grad_scale, str divergence, "
      "float beta, float temperature, int ignore_index, float hard_weight, bool student_entropy=False) "
      "-> (Tensor loss, Tensor stats, Tensor grad)");
}

TORCH_LIBRARY_FRAGMENT(fastloss, m) {
  // Spherical-family losses from logits [N, V] (fastloss/spherical_math.h): `loss` "z" (de Brebisson & Vincent's
  // Z-loss, softplus(a (b - z_c)) / a of the z-normalised target logit -- not cross_entropy's z_loss), "taylor_softmax"
  // (log-Taylor-softmax) or "mse" (squared error to the one-hot target). Per-row float64 losses (0 for ignored rows)
  // and stats float64 [N, 3] = (mean - target logit, variance, target logit) for the backward.
  m.def(
      "spherical_loss_fwd(Tensor input, Tensor target, str loss, float a, float b, int ignore_index) "
      "-> (Tensor loss, Tensor stats)");
  m.def(
      "spherical_loss_bwd(Tensor grad_loss, Tensor input, Tensor target, Tensor stats, str loss, float a, float b, "
      "int ignore_index) -> Tensor");
  // The per-row loss and its partials (dL/do_c, dL/dmu, dL/dvar) [N, 3] from stats [N, 3] of rows of V classes
  // (0 where target == ignore_index; every other target checked in [0, V)): the linear version's rows, whose
  // statistics come from the head without logits (python/fastloss/_linear_spherical.py).
  m.def(
      "spherical_loss_terms(Tensor stats, Tensor target, int V, str loss, float a, float b, int ignore_index) "
      "-> (Tensor loss, Tensor partials)");
}

TORCH_LIBRARY_FRAGMENT(fastloss, m) {
  // Vocabulary-parallel (tensor-parallel) cross-entropy: `logits` [N, C] are the classes [vocab_start, vocab_start
  // + C) of a vocabulary of V, `target` [N] global class indices. The caller combines the shards' statistics with a
  // collective (python/fastloss/_vocab_parallel.py), then calls the loss and backward ops; no autograd here.
  // Per row, float64 [N, 4] from one pass over the shard's row (fastloss/loss_math.h kShardStats): m and d of the
  // online normaliser of x' = softcap(x) (m = -inf, d = 0 for an all -inf row or C = 0), x'_t when the target lies
  // in the shard (else 0), and sum_c w_c x'_c (label_smoothing > 0; weight: the shard's slice) or d2 = sum_c
  // exp(2 (x'_c - m)) (loss="squentropy"), else 0. Rows with target == ignore_index: zeros, never read.
  m.def(
      "cross_entropy_shard_fwd(Tensor logits, Tensor target, Tensor? weight, int vocab_start, int ignore_index, "
      "float label_smoothing, float? softcap, str algorithm=\"auto\", str loss=\"ce\") -> Tensor stats");
  // Per-row float64 losses (0 for ignored rows) from the combined rows [N, 4] = (lse, x'_t, w_t, s) (s: sum_c w_c x'_c
  // over the vocabulary for label smoothing, sum_c p_c^2 for squentropy), weight_sum the vocabulary's class-weight
  // sum (None: vocab_size); `loss` and its checks as cross_entropy_fwd.
  m.def(
      "cross_entropy_shard_loss(Tensor rows, Tensor target, Tensor? weight_sum, int vocab_size, int ignore_index, "
      "float label_smoothing, float z_loss, str loss=\"ce\", float loss_param=0.0) -> Tensor loss");
  // The shard's columns of grad_loss[r] * dloss_r/dlogits + grad_lse[r] * softmax (the logits' dtype), from the
  // combined rows: concatenated over the shards, cross_entropy_bwd of the whole vocabulary.
  m.def(
      "cross_entropy_shard_bwd(Tensor grad_loss, Tensor? grad_lse, Tensor logits, Tensor target, Tensor? weight, "
      "Tensor rows, Tensor? weight_sum, int vocab_start, int vocab_size, int ignore_index, float label_smoothing, "
      "float z_loss, float? softcap, str loss=\"ce\", float loss_param=0.0) -> Tensor grad");
}

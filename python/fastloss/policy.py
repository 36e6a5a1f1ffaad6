"""Distillation and RL-policy losses over large vocabularies: from logits, or (``linear_*``) from hidden states and the
LM head without the N x V logits. The kernels keep every softmax reduction in one pass over a row
(fastloss/policy_math.h); nothing here builds a log-softmax tensor.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch.autograd.function import once_differentiable

from ._common import (check_temperature, check_tensor, check_tokens, distill_options, logprob_outputs, out_dtype,
                      reduce_rows, unmasked_count)
from ._common import TokenLogprobs  # noqa: F401  (fastloss.policy.TokenLogprobs, as before)
from ._linear_policy import linear_distillation_loss_impl, linear_token_logprobs_impl


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, *, temperature: float = 1.0,
                   return_entropy: bool = False, return_stats: bool = False):
    """``log_softmax(logits / temperature)`` at ``tokens``, per position, without the log-softmax tensor (and with
    ``return_entropy=True`` also the entropy ``-sum p log p`` of the same tempered softmax), as PPO / GRPO need for
    the policy. logits (..., V), tokens (...) int64 in [0, V).

    Both outputs are differentiable in the logits, with any incoming gradients. They are float32 (float64 for
    float64 logits) whatever the logits' dtype -- RL frameworks upcast before the log-softmax, since a bf16
    log-probability would make ``exp(logp - old_logp)`` useless. Returns a tensor, or
    :class:`TokenLogprobs` ``(logprobs, entropy)``.

    ``return_stats=True`` adds, from the same pass over the logits, TRL's per-token statistics and returns
    :class:`TokenStats` ``(logprobs, entropy, log_sum_sq_probs, mean_logits, argmax)``: log sum_j p_j^2, the mean
    of the tempered logits over the vocabulary, and the first index of the row's maximum (int64); entropy is None
    unless ``return_entropy=True``. The statistics carry no gradient.
    """
    fn = "token_logprobs"
    check_tensor(fn, "logits", logits)
    if logits.dim() == 0:
        raise ValueError(f"fastloss.{fn}: `logits` must have at least one dimension (the vocabulary)")
    lead = tuple(logits.shape[:-1])
    check_tokens(fn, "tokens", tokens, lead)
    temperature = check_temperature(fn, temperature)
    V = logits.shape[-1]
    lp, ent, _, st, am = torch.ops.fastloss.token_logprobs_fwd(logits.reshape(-1, V), tokens.reshape(-1),
                                                               temperature, bool(return_entropy), bool(return_stats))
    return logprob_outputs(lp, ent, st, am, logits.dtype, lead, return_entropy, return_stats)


class _DistillFused(torch.autograd.Function):
    """A reduced loss whose gradient is computed in the forward (one pass over the student and teacher logits
    instead of two; the backward only rescales the stored gradient, and not at all for the usual incoming 1).
    A second backward through the graph (retain_graph, gradcheck) recomputes it with the backward op."""

    @staticmethod
    def forward(ctx, s2d, t2d, t, opts, reduction, lead, denom, student_entropy=False):
        scale = (1.0 / denom).reshape(1) if reduction == "mean" else torch.ones(1, dtype=torch.float64,
                                                                                 device=s2d.device)
        rows, stats, grad = torch.ops.fastloss.distill_fwd_grad(s2d.detach(), t2d, t, scale, *opts, student_entropy)
        ctx.grad = grad  # a ctx attribute, not a saved tensor: the backward scales it in place, once
        ctx.save_for_backward(s2d, t2d, t, stats, scale)
        ctx.opts = opts
        # the student's entropy per row (float64; empty unless asked): no gradient
        ent = stats[:, _STUDENT_ENTROPY].clone() if student_entropy else stats.new_empty(0)
        ctx.mark_non_differentiable(ent)
        return reduce_rows(rows, reduction, lead, denom), ent

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, _grad_entropy=None):
        s2d, t2d, t, stats, scale = ctx.saved_tensors
        if ctx.grad is not None:
            grad, ctx.grad = ctx.grad, None
            torch.ops.fastloss.scale_rows_(grad, grad_loss.reshape(1))  # skipped when the incoming gradient is 1
        else:
            rows_grad = (grad_loss.reshape(1).to(torch.float64) * scale).expand(s2d.shape[0])
            grad = torch.ops.fastloss.distill_bwd(rows_grad, s2d, t2d, t, stats, *ctx.opts)
        return grad, None, None, None, None, None, None, None


# The column of distill_fwd's float64 statistics with the student's entropy (csrc kStudentEntropy).
_STUDENT_ENTROPY = 4


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, divergence: str = "forward_kl",
                      beta: float = 0.5, temperature: float = 1.0, target: Optional[torch.Tensor] = None,
                      ignore_index: int = -100, reduction: str = "mean", hard_weight: float = 0.0,
                      return_student_entropy: bool = False):
    """Knowledge-distillation loss between the student's and the teacher's softmax over the vocabulary, per token,
    from one pass over each pair of rows (no log-softmax tensors).

    student_logits, teacher_logits: (..., V), the same shape. With s = softmax(student / T), t = softmax(teacher / T):

    * ``"forward_kl"``: KL(t || s) (Hinton's distillation; ``F.kl_div(log s, log t, log_target=True)`` summed over V);
    * ``"reverse_kl"``: KL(s || t);
    * ``"jsd"``: the generalized Jensen-Shannon divergence of GKD (TRL's ``generalized_jsd_loss``): with
      M = (1 - beta) s + beta t, beta KL(t || M) + (1 - beta) KL(s || M). As in TRL, beta = 0 is exactly the forward
      KL and beta = 1 exactly the reverse KL (the mixture formula itself would give 0 there).

    temperature divides both logits; the loss is **not** multiplied by T^2 -- Hinton-style callers scale it
    themselves. target (...) int64 with ``ignore_index`` masks tokens (padding, prompt): their loss is 0 and
    "mean" averages over the unmasked ones (all masked: nan, as ``F.cross_entropy``); without target "mean" is over
    all tokens. hard_weight adds hard_weight times the cross-entropy of the untempered student logits against
    target, from the same pass.

    The gradient flows to the student logits only: the teacher's are constants (detached; if they require grad
    they get none). With "mean" / "sum" and student logits that require grad (grad mode on), the forward also
    computes their gradient (one pass over both logits instead of two) and keeps it, N x V, until the backward:
    call it under ``torch.no_grad()`` when no backward follows (evaluation). Teacher logits of another dtype are
    converted to the student's. Accumulation is float32 for bf16 / fp16 (float64 for float64); the loss has the
    student's dtype, as ``F.kl_div``'s would.

    ``return_student_entropy=True`` returns ``(loss, student_entropy)``: the entropy of softmax(student / T) per
    token (the leading shape, float32 -- float64 for float64 logits --, no gradient, 0 at tokens whose target is
    ``ignore_index``), from the same pass over the logits as the loss (the student's normaliser grows by the
    entropy's accumulator; the loss and its gradient are those without it). The reduction applies to the loss only.
    """
    fn = "distillation_loss"
    check_tensor(fn, "student_logits", student_logits)
    check_tensor(fn, "teacher_logits", teacher_logits)
    beta, temperature, hard_weight = distill_options(fn, divergence, beta, temperature, reduction, hard_weight,
                                                      target)
    if student_logits.dim() == 0:
        raise ValueError(f"fastloss.{fn}: `student_logits` must have at least one dimension (the vocabulary)")
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(f"fastloss.{fn}: `teacher_logits` must have the shape of `student_logits` "
                         f"{tuple(student_logits.shape)} (the same vocabulary), got {tuple(teacher_logits.shape)}")
    lead = tuple(student_logits.shape[:-1])
    if target is not None:
        check_tokens(fn, "target", target, lead)
    V = student_logits.shape[-1]
    teacher = teacher_logits.detach()
    if teacher.is_floating_point() and teacher.dtype != student_logits.dtype:
        teacher = teacher.to(student_logits.dtype)
    s2d = student_logits.reshape(-1, V)
    t = target.reshape(-1) if target is not None else None
    opts = (divergence, beta, temperature, int(ignore_index), hard_weight)
    denom = unmasked_count(reduction, t, int(ignore_index), s2d.shape[0], s2d.device)
    ent = bool(return_student_entropy)
    if (reduction != "none" and student_logits.requires_grad and torch.is_grad_enabled()
            and student_logits.dtype != torch.float16 and not torch.compiler.is_compiling()):
        out, ent_rows = _DistillFused.apply(s2d, teacher.reshape(-1, V), t, opts, reduction, lead, denom, ent)
    else:  # the registered autograd of distill_fwd: the backward makes its own pass (torch.compile, "none", and
        # float16, whose stored p / N entries would underflow before a GradScaler's factor could lift them)
        rows, stats = torch.ops.fastloss.distill_fwd(s2d, teacher.reshape(-1, V), t, *opts, ent)
        out = reduce_rows(rows, reduction, lead, denom)
        ent_rows = stats[:, _STUDENT_ENTROPY] if ent else None
    out = out.to(student_logits.dtype)
    if not ent:
        return out
    return out, ent_rows.detach().to(out_dtype(student_logits.dtype)).reshape(lead)


def linear_token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, tokens: torch.Tensor, *,
                          bias: Optional[torch.Tensor] = None, temperature: float = 1.0, return_entropy: bool = False,
                          return_stats: bool = False, softcap: Optional[float] = None, chunk_size="auto"):
    """:func:`token_logprobs` of ``hidden @ weight.T (+ bias)`` without the N x V logits: token chunks, one chunk's
    logits alive at a time. hidden (..., D), weight (V, D), bias (V,), tokens (...). Differentiable in hidden,
    weight and bias; the backward recomputes each chunk's logits (the incoming gradients are per token, unknown
    before it), so training costs four GEMMs where the materialised logits cost three.

    ``return_stats=True``: a :class:`TokenStats`, as :func:`token_logprobs`, the statistics from the forward's
    chunks (no extra pass; the backward is the same).
    softcap: the logits are ``softcap * tanh(logits / softcap)`` (Gemma 2 / 3's final-logit softcapping, before
    the temperature), with its gradient: applied to each chunk's logits by torch in place, not fused into the
    kernel (one more read and write of the chunk; the backward keeps ``1 - tanh^2`` beside it). A -inf logit (a
    -inf bias entry) becomes -softcap, as in the model's own code.
    Outputs whose gradient is not needed (an entropy for logging) add nothing to the backward.
    chunk_size: tokens per chunk, or "auto" (a logits budget of 256 MiB, as :func:`linear_cross_entropy`).
    """

    return linear_token_logprobs_impl(hidden, weight, tokens, bias, temperature, return_entropy, chunk_size,
                                      return_stats, softcap)


def linear_distillation_loss(student_hidden: torch.Tensor, student_weight: torch.Tensor,
                             teacher_hidden: torch.Tensor, teacher_weight: torch.Tensor, *,
                             student_bias: Optional[torch.Tensor] = None, teacher_bias: Optional[torch.Tensor] = None,
                             divergence: str = "forward_kl", beta: float = 0.5, temperature: float = 1.0,
                             target: Optional[torch.Tensor] = None, ignore_index: int = -100,
                             reduction: str = "mean", hard_weight: float = 0.0, chunk_size="auto",
                             return_student_entropy: bool = False, student_softcap: Optional[float] = None,
                             teacher_softcap: Optional[float] = None):
    """:func:`distillation_loss` of the student's ``student_hidden @ student_weight.T (+ student_bias)`` against the
    teacher's ``teacher_hidden @ teacher_weight.T (+ teacher_bias)`` without either N x V logits: token chunks, the
    two heads' logits for one chunk at a time. student_hidden (..., Ds) and teacher_hidden (..., Dt) share their
    leading shape; the weights are (V, Ds) and (V, Dt) with the same V.

    Gradients flow to student_hidden, student_weight and student_bias (the teacher is a constant). With "mean" or
    "sum" they are computed during the forward, written over each chunk's logits, and scaled in the backward: three
    GEMMs for the student as without chunking, plus the teacher's one. "none" recomputes the chunks in the backward.
    chunk_size: tokens per chunk, or "auto" (a budget of 256 MiB for the chunk's two logits buffers).
    student_softcap / teacher_softcap: each head's logits become ``softcap * tanh(logits / softcap)`` (Gemma's
    final-logit softcapping) before the temperature, with the student's gradient through it; applied to each chunk
    by torch in place, not fused into the kernels (a third chunk buffer holds the student's ``1 - tanh^2``); the
    hard-label term then sees the capped student logits.
    ``return_student_entropy=True``: ``(loss, student_entropy)`` as :func:`distillation_loss`, the entropy of the
    tempered student softmax from the forward's chunks (no extra pass, no extra GEMM), whatever the reduction.
    """

    return linear_distillation_loss_impl(student_hidden, student_weight, teacher_hidden, teacher_weight,
                                         student_bias, teacher_bias, divergence, beta, temperature, target,
                                         ignore_index, reduction, hard_weight, chunk_size, return_student_entropy,
                                         student_softcap, teacher_softcap)

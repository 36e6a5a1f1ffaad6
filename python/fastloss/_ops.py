"""Fake (meta) kernels and autograd formulas for every ``torch.ops.fastloss`` op.

The C++ side registers schemas and CPU/CUDA kernels; this module gives the ops what torch.compile and autograd
need. Backward passes are themselves fastloss ops, so a compiled graph stays on fastloss kernels.
"""

from __future__ import annotations

import torch

_lib = torch.ops.fastloss


def _wrap_dim(x: torch.Tensor, dim: int) -> int:
    n = max(x.dim(), 1)
    if not -n <= dim < n:
        raise IndexError(f"Dimension out of range (expected to be in range of [{-n}, {n - 1}], but got {dim})")
    return dim % n


def _like_rows(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Output layout of the row kernels: contiguous with `dim` last, then moved back (mirrors softmax_ops.cpp)."""
    if x.dim() == 0:
        return x.new_empty(())
    d = _wrap_dim(x, dim)
    moved = x.movedim(d, -1)
    return torch.empty(moved.shape, dtype=x.dtype, device=x.device).movedim(-1, d)


@torch.library.register_fake("fastloss::softmax")
def _softmax_fake(x, dim, algorithm="auto"):
    return _like_rows(x, dim)


@torch.library.register_fake("fastloss::log_softmax")
def _log_softmax_fake(x, dim, algorithm="auto"):
    return _like_rows(x, dim)


@torch.library.register_fake("fastloss::logsumexp")
def _logsumexp_fake(x, dim, keepdim=False, algorithm="auto"):
    if x.dim() == 0:
        _wrap_dim(x, dim)
        return x.new_empty(())
    d = _wrap_dim(x, dim)
    shape = list(x.shape)
    if keepdim:
        shape[d] = 1
        moved = [s for i, s in enumerate(x.shape) if i != d]
        out = x.new_empty(moved)
        return out.unsqueeze(d)
    del shape[d]
    return x.new_empty(shape)


@torch.library.register_fake("fastloss::softmax_backward")
def _softmax_backward_fake(grad, output, dim):
    return _like_rows(output, dim)


@torch.library.register_fake("fastloss::log_softmax_backward")
def _log_softmax_backward_fake(grad, output, dim):
    return _like_rows(output, dim)


@torch.library.register_fake("fastloss::logsumexp_backward")
def _logsumexp_backward_fake(grad, x, result, dim, keepdim):
    return _like_rows(x, dim)


@torch.library.register_fake("fastloss::softmax_topk")
def _softmax_topk_fake(x, k, dim=-1, algorithm="auto"):
    if x.dim() == 0:
        _wrap_dim(x, dim)
        shape, d = [], None
    else:
        d = _wrap_dim(x, dim)
        shape = list(x.shape)
    size = 1 if x.dim() == 0 else shape[d]
    torch._check(0 <= k <= size, lambda: f"fastloss.softmax_topk: `k` must be in [0, {size}], got {k}")
    if d is not None:
        shape[d] = k
    return x.new_empty(shape), x.new_empty(shape, dtype=torch.long)


# ---------------------------------------------------------------- autograd


def _save_output(ctx, inputs, output):
    ctx.dim = inputs[1]
    ctx.save_for_backward(output)


def _softmax_bwd(ctx, grad):
    (out,) = ctx.saved_tensors
    return _lib.softmax_backward(grad, out, ctx.dim), None, None


def _log_softmax_bwd(ctx, grad):
    (out,) = ctx.saved_tensors
    return _lib.log_softmax_backward(grad, out, ctx.dim), None, None


def _logsumexp_setup(ctx, inputs, output):
    x, dim = inputs[0], inputs[1]
    ctx.dim = dim
    ctx.keepdim = inputs[2] if len(inputs) > 2 else False
    ctx.save_for_backward(x, output)


def _logsumexp_bwd(ctx, grad):
    x, out = ctx.saved_tensors
    return _lib.logsumexp_backward(grad, x, out, ctx.dim, ctx.keepdim), None, None, None


def _softmax_topk_setup(ctx, inputs, output):
    x, _k, dim = inputs[0], inputs[1], inputs[2] if len(inputs) > 2 else -1
    ctx.dim = dim
    ctx.save_for_backward(x, output[0], output[1])


def _softmax_topk_bwd(ctx, grad_values, _grad_indices):
    # values_i = p[idx_i], d p_a / d x_j = p_a (delta_aj - p_j):
    # d x = scatter(g * v at idx) - p * sum_i g_i v_i.
    x, values, indices = ctx.saved_tensors
    if x.dim() == 0:
        return torch.zeros_like(x), None, None, None
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    gv = grad_values.to(acc) * values.to(acc)
    p = _lib.softmax(x, ctx.dim).to(acc)
    gx = torch.zeros_like(p).scatter_add_(ctx.dim, indices, gv) - p * gv.sum(ctx.dim, keepdim=True)
    return gx.to(x.dtype), None, None, None


torch.library.register_autograd("fastloss::softmax_topk", _softmax_topk_bwd, setup_context=_softmax_topk_setup)
torch.library.register_autograd("fastloss::softmax", _softmax_bwd, setup_context=_save_output)
torch.library.register_autograd("fastloss::log_softmax", _log_softmax_bwd, setup_context=_save_output)
torch.library.register_autograd("fastloss::logsumexp", _logsumexp_bwd, setup_context=_logsumexp_setup)


# ---------------------------------------------------------------- cross-entropy


def _rows(logits):
    """Per-row values are float64 whatever the logits (mirrors row_dtype in cross_entropy_ops.cpp)."""
    return logits.new_empty((logits.shape[0],), dtype=torch.float64)


@torch.library.register_fake("fastloss::cross_entropy_fwd")
def _ce_fwd_fake(logits, target, weight, ignore_index, label_smoothing, z_loss, softcap, algorithm="auto", loss="ce",
                 loss_param=0.0):
    n_sq = logits.shape[0] if loss == "squentropy" else 0
    return _rows(logits), _rows(logits), logits.new_empty((n_sq,), dtype=torch.float64)


@torch.library.register_fake("fastloss::cross_entropy_bwd")
def _ce_bwd_fake(grad_loss, grad_lse, logits, target, weight, lse, ignore_index, label_smoothing, z_loss, softcap,
                 loss="ce", loss_param=0.0, sum_sq=None):
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


@torch.library.register_fake("fastloss::cross_entropy_fwd_inplace_grad")
def _ce_fwd_inplace_fake(logits, target, weight, grad_scale, ignore_index, label_smoothing, z_loss, softcap,
                         algorithm="auto", loss="ce", loss_param=0.0):
    return _rows(logits), _rows(logits)


@torch.library.register_fake("fastloss::cross_entropy_prob_fwd")
def _ce_prob_fwd_fake(logits, target, weight, label_smoothing, z_loss, softcap, algorithm="auto"):
    return _rows(logits), _rows(logits), _rows(logits)


@torch.library.register_fake("fastloss::cross_entropy_prob_bwd")
def _ce_prob_bwd_fake(grad_loss, grad_lse, logits, target, weight, lse, sum_wy, label_smoothing, z_loss, softcap):
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


@torch.library.register_fake("fastloss::scale_rows_")
def _scale_rows_fake(x, scale):
    return None


# Vocabulary shards: no autograd here (the caller, fastloss/_vocab_parallel.py, combines the shards and owns it).
@torch.library.register_fake("fastloss::cross_entropy_shard_fwd")
def _ce_shard_fwd_fake(logits, target, weight, vocab_start, ignore_index, label_smoothing, softcap, algorithm="auto",
                       loss="ce"):
    return logits.new_empty((logits.shape[0], 4), dtype=torch.float64)


@torch.library.register_fake("fastloss::cross_entropy_shard_loss")
def _ce_shard_loss_fake(rows, target, weight_sum, vocab_size, ignore_index, label_smoothing, z_loss, loss="ce",
                        loss_param=0.0):
    return rows.new_empty((target.shape[0],), dtype=torch.float64)


@torch.library.register_fake("fastloss::cross_entropy_shard_bwd")
def _ce_shard_bwd_fake(grad_loss, grad_lse, logits, target, weight, rows, weight_sum, vocab_start, vocab_size,
                       ignore_index, label_smoothing, z_loss, softcap, loss="ce", loss_param=0.0):
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


def _ce_setup(ctx, inputs, output):
    logits, target, weight, ignore_index, label_smoothing, z_loss, softcap = inputs[:7]
    loss = inputs[8] if len(inputs) > 8 else "ce"
    loss_param = inputs[9] if len(inputs) > 9 else 0.0
    ctx.args = (ignore_index, label_smoothing, z_loss, softcap, loss, loss_param)
    ctx.save_for_backward(logits, target, weight, output[1], output[2])
    _no_zeros(ctx)


def _no_zeros(ctx):
    # Unused outputs get no gradient rather than autograd's zeros: no N-sized buffers for nothing, and no plain
    # zeros beside DTensor arguments (tensor parallelism, fastloss._dtensor).
    ctx.set_materialize_grads(False)


def _ce_bwd(ctx, grad_loss, grad_lse, _grad_sum_sq):
    logits, target, weight, lse, sum_sq = ctx.saved_tensors
    if grad_loss is None and grad_lse is None:
        return (None,) * 10
    if grad_loss is None:
        grad_loss = torch.zeros_like(lse)
    grad = _lib.cross_entropy_bwd(grad_loss, grad_lse, logits, target, weight, lse, *ctx.args, sum_sq)
    return grad, None, None, None, None, None, None, None, None, None


def _ce_prob_setup(ctx, inputs, output):
    logits, target, weight, label_smoothing, z_loss, softcap = inputs[:6]
    ctx.args = (label_smoothing, z_loss, softcap)
    ctx.save_for_backward(logits, target, weight, output[1], output[2])
    _no_zeros(ctx)


def _ce_prob_bwd(ctx, grad_loss, grad_lse, _grad_sum_wy):
    logits, target, weight, lse, sum_wy = ctx.saved_tensors
    if grad_loss is None and grad_lse is None:
        return (None,) * 7
    if grad_loss is None:
        grad_loss = torch.zeros_like(lse)
    grad = _lib.cross_entropy_prob_bwd(grad_loss, grad_lse, logits, target, weight, lse, sum_wy, *ctx.args)
    # The target's gradient (soft labels that require grad) is not provided, as in Liger and Cut Cross-Entropy.
    return grad, None, None, None, None, None, None


torch.library.register_autograd("fastloss::cross_entropy_fwd", _ce_bwd, setup_context=_ce_setup)
torch.library.register_autograd("fastloss::cross_entropy_prob_fwd", _ce_prob_bwd, setup_context=_ce_prob_setup)


# ---------------------------------------------------------------- distillation and token log-probabilities


@torch.library.register_fake("fastloss::token_logprobs_fwd")
def _logprobs_fwd_fake(logits, tokens, temperature, entropy, stats=False):
    n_ent = logits.shape[0] if entropy else 0
    n_st = logits.shape[0] if stats else 0
    return (_rows(logits), logits.new_empty((n_ent,), dtype=torch.float64), _rows(logits),
            logits.new_empty((n_st, 2), dtype=torch.float64), logits.new_empty((n_st,), dtype=torch.int64))


@torch.library.register_fake("fastloss::token_logprobs_bwd")
def _logprobs_bwd_fake(grad_logprobs, grad_entropy, logits, tokens, lse, entropy, temperature, vocab_start=None):
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


@torch.library.register_fake("fastloss::token_logprobs_bwd_")
def _logprobs_bwd_inplace_fake(logits, grad_logprobs, grad_entropy, tokens, lse, entropy, temperature):
    return None


def _stats(logits):
    # the backward's four columns and the student's entropy (0 unless student_entropy=True)
    return logits.new_empty((logits.shape[0], 5), dtype=torch.float64)


@torch.library.register_fake("fastloss::distill_fwd")
def _distill_fwd_fake(student, teacher, target, divergence, beta, temperature, ignore_index, hard_weight,
                      student_entropy=False):
    return _rows(student), _stats(student)


@torch.library.register_fake("fastloss::distill_bwd")
def _distill_bwd_fake(grad_loss, student, teacher, target, stats, divergence, beta, temperature, ignore_index,
                      hard_weight):
    return torch.empty(student.shape, dtype=student.dtype, device=student.device)


@torch.library.register_fake("fastloss::distill_fwd_inplace_grad")
def _distill_fwd_inplace_fake(student, teacher, target, grad_scale, divergence, beta, temperature, ignore_index,
                              hard_weight, student_entropy=False):
    return _rows(student), _stats(student)


@torch.library.register_fake("fastloss::distill_fwd_grad")
def _distill_fwd_grad_fake(student, teacher, target, grad_scale, divergence, beta, temperature, ignore_index,
                           hard_weight, student_entropy=False):
    return _rows(student), _stats(student), torch.empty(student.shape, dtype=student.dtype, device=student.device)


def _logprobs_setup(ctx, inputs, output):
    logits, tokens, temperature = inputs[:3]
    ctx.temperature = temperature
    ctx.save_for_backward(logits, tokens, output[2], output[1])
    ctx.mark_non_differentiable(output[3], output[4])  # the per-token statistics and the argmax
    _no_zeros(ctx)


def _logprobs_bwd(ctx, grad_logprobs, grad_entropy, _grad_lse, _grad_stats=None, _grad_argmax=None):
    logits, tokens, lse, entropy = ctx.saved_tensors
    if grad_logprobs is None and grad_entropy is None:
        return None, None, None, None, None
    if grad_entropy is not None and entropy.shape[0] != logits.shape[0]:
        grad_entropy = None  # the entropy was not computed (an empty output): nothing flows from it
    grad = _lib.token_logprobs_bwd(grad_logprobs, grad_entropy, logits, tokens, lse, entropy, ctx.temperature)
    return grad, None, None, None, None


def _distill_setup(ctx, inputs, output):
    student, teacher, target = inputs[:3]
    ctx.args = tuple(inputs[3:8])  # without student_entropy, which the backward does not take
    ctx.save_for_backward(student, teacher, target, output[1])
    ctx.mark_non_differentiable(output[1])  # the statistics (the student's entropy is for logging)
    _no_zeros(ctx)


def _distill_bwd(ctx, grad_loss, _grad_stats):
    student, teacher, target, stats = ctx.saved_tensors
    if grad_loss is None:
        return (None,) * 9
    grad = _lib.distill_bwd(grad_loss, student, teacher, target, stats, *ctx.args)
    # The teacher is a constant: its logits get no gradient even when they require one.
    return grad, None, None, None, None, None, None, None, None


torch.library.register_autograd("fastloss::token_logprobs_fwd", _logprobs_bwd, setup_context=_logprobs_setup)
torch.library.register_autograd("fastloss::distill_fwd", _distill_bwd, setup_context=_distill_setup)


# ---------------------------------------------------------------- spherical-family losses


@torch.library.register_fake("fastloss::spherical_loss_fwd")
def _spherical_fwd_fake(input, target, loss, a, b, ignore_index):
    return _rows(input), input.new_empty((input.shape[0], 3), dtype=torch.float64)


@torch.library.register_fake("fastloss::spherical_loss_bwd")
def _spherical_bwd_fake(grad_loss, input, target, stats, loss, a, b, ignore_index):
    return torch.empty(input.shape, dtype=input.dtype, device=input.device)


@torch.library.register_fake("fastloss::spherical_loss_terms")
def _spherical_terms_fake(stats, target, V, loss, a, b, ignore_index):
    n = stats.shape[0]
    return stats.new_empty((n,), dtype=torch.float64), stats.new_empty((n, 3), dtype=torch.float64)


def _spherical_setup(ctx, inputs, output):
    x, target = inputs[:2]
    ctx.args = tuple(inputs[2:])
    ctx.save_for_backward(x, target, output[1])
    _no_zeros(ctx)


def _spherical_bwd(ctx, grad_loss, _grad_stats):
    x, target, stats = ctx.saved_tensors
    if grad_loss is None:
        return (None,) * 6
    return _lib.spherical_loss_bwd(grad_loss, x, target, stats, *ctx.args), None, None, None, None, None


torch.library.register_autograd("fastloss::spherical_loss_fwd", _spherical_bwd, setup_context=_spherical_setup)

"""The public functional API, with torch's signatures for the arguments fastloss shares with torch."""

from __future__ import annotations

import math
from typing import Optional

import torch

from ._common import (ALGORITHMS, REDUCTIONS, CrossEntropyOutput, SoftmaxTopK, check_choice, check_input,
                      check_tensor, is_dtensor, loss_kind, mean_denominator, reduce_rows)
from . import _vocab_parallel
from ._linear_ce import LinearCrossEntropyFunction, resolve_chunk_rows

try:  # DTensor support: its imports reach into torch.distributed.tensor's private modules
    from . import _dtensor
except ImportError:  # a torch without torch.distributed (or one whose DTensor internals moved): no DTensor rules
    _dtensor = None


def _is_dtensor(x) -> bool:
    return _dtensor is not None and is_dtensor(x)  # (a DTensor without the rules: the plain path's own error)


def softmax(
    input: torch.Tensor, dim: int = -1, *, algorithm: str = "auto", dtype: Optional[torch.dtype] = None
) -> torch.Tensor:
    """``torch.softmax(input, dim, dtype=dtype)`` computed by fastloss's kernels.

    algorithm: ``"online"`` (Milakov & Gimelshein running max and rescaled sum), ``"two_pass"`` (Dukhan &
    Ablavatski mantissa/exponent accumulation, no max pass) or ``"auto"`` (the faster one measured for the shape
    and device). Reduced-precision inputs accumulate in float32.
    """
    check_input("softmax", input, algorithm)
    if dtype is not None:
        input = input.to(dtype)
    return torch.ops.fastloss.softmax(input, dim, algorithm)


def log_softmax(
    input: torch.Tensor, dim: int = -1, *, algorithm: str = "auto", dtype: Optional[torch.dtype] = None
) -> torch.Tensor:
    """``torch.log_softmax(input, dim, dtype=dtype)`` computed by fastloss's kernels (see :func:`softmax`)."""
    check_input("log_softmax", input, algorithm)
    if dtype is not None:
        input = input.to(dtype)
    return torch.ops.fastloss.log_softmax(input, dim, algorithm)


def logsumexp(input: torch.Tensor, dim=-1, keepdim: bool = False, *, algorithm: str = "auto") -> torch.Tensor:
    """``torch.logsumexp(input, dim, keepdim)`` computed by fastloss's kernels.

    dim: an int or a tuple / list of ints, as torch.logsumexp (an empty tuple reduces every dimension, as
    ``torch.amax`` does). Several dims reduce as one row: a view when they can be flattened in place (adjacent in
    memory), otherwise through a copy with the reduced dims moved last.
    """
    check_input("logsumexp", input, algorithm)
    if isinstance(dim, bool) or not isinstance(dim, (int, tuple, list, torch.Size)):
        raise TypeError(f"fastloss.logsumexp: `dim` must be an int or a tuple of ints, got {dim!r}")
    if isinstance(dim, int):
        return torch.ops.fastloss.logsumexp(input, dim, keepdim, algorithm)
    dims = _normalize_dims(input, tuple(dim), "logsumexp")
    if len(dims) == 1 or input.dim() == 0:
        return torch.ops.fastloss.logsumexp(input, dims[0] if dims else 0, keepdim, algorithm)
    kept = [d for d in range(input.dim()) if d not in dims]
    rows = input.permute(*kept, *dims)  # a view; reshape below copies only when the reduced dims are not flat
    lead = rows.shape[:len(kept)]
    row = math.prod(input.shape[d] for d in dims)
    out = torch.ops.fastloss.logsumexp(rows.reshape(*lead, row), -1, False, algorithm)
    if keepdim:
        for d in dims:  # ascending: each unsqueeze lands at its final position
            out = out.unsqueeze(d)
    return out


def _normalize_dims(input: torch.Tensor, dims: tuple, name: str) -> tuple:
    nd = max(input.dim(), 1)
    if not dims:
        return tuple(range(input.dim()))
    out = []
    for d in dims:
        if isinstance(d, bool) or not isinstance(d, int):
            raise TypeError(f"fastloss.{name}: `dim` entries must be ints, got {d!r}")
        if not -nd <= d < nd:
            raise IndexError(f"fastloss.{name}: dimension {d} is out of range for a tensor of {input.dim()} "
                             f"dimensions (expected in [{-nd}, {nd - 1}])")
        d %= nd
        if d in out:
            raise RuntimeError(f"fastloss.{name}: dim {d} appears multiple times in the list of dims")
        out.append(d)
    return tuple(sorted(out))


def softmax_topk(input: torch.Tensor, k: int, dim: int = -1, *, algorithm: str = "auto") -> SoftmaxTopK:
    """``torch.topk(torch.softmax(input, dim), k, dim)`` from one pass over ``input``, without the softmax tensor.

    The online normaliser is carried together with a running top-k of the logits (softmax is monotone), and only
    the k winners are exponentiated (Milakov & Gimelshein). Returns (values, indices), sorted best first; values
    have ``input``'s dtype (float32 accumulation for bf16 / fp16), indices int64. Ties are deterministic: among
    equal logits the smaller index comes first (torch.topk leaves that order unspecified), and NaN ranks above
    every number, as in torch.topk. A row whose softmax is undefined (all -inf, a +inf, a NaN) gives NaN values,
    as torch.softmax does. Differentiable in ``input``. On CUDA, k <= 128 runs the fused kernel; larger k
    computes the softmax and ranks the logits with a stable descending sort (the same order rule), then gathers
    the probabilities. (FASTLOSS_TOPK_FUSED_LIMIT=n lowers the fused limit on any device, for testing.)
    """
    check_input("softmax_topk", input, algorithm)
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"fastloss.softmax_topk: `k` must be an int, got {k!r}")
    if not isinstance(dim, int):
        raise TypeError(f"fastloss.softmax_topk: `dim` must be a single int, got {dim!r}")
    values, indices = torch.ops.fastloss.softmax_topk(input, k, dim, algorithm)
    return SoftmaxTopK(values, indices)


def resolve_algorithm(input: torch.Tensor, dim: int = -1, algorithm: str = "auto") -> str:
    """The algorithm ("online" or "two_pass") that ``algorithm`` resolves to for this input."""
    check_input("resolve_algorithm", input, algorithm)
    return torch.ops.fastloss.resolve_algorithm(input, dim, algorithm)


# ---------------------------------------------------------------- cross-entropy

def _flatten_for_ce(input: torch.Tensor, target: torch.Tensor, soft: bool):
    """(C), (N, C) and (N, C, d1, ..., dK) to [rows, C] logits and [rows] (or [rows, C]) targets."""
    if input.dim() == 0:
        raise ValueError("fastloss.cross_entropy: `input` must have at least one dimension (the classes)")
    C = input.shape[0] if input.dim() == 1 else input.shape[1]
    if soft:
        if target.shape != input.shape:
            raise ValueError(f"fastloss.cross_entropy: probability `target` must have `input`'s shape "
                             f"{tuple(input.shape)}, got {tuple(target.shape)}")
    else:
        want = () if input.dim() == 1 else (input.shape[0],) + tuple(input.shape[2:])
        if tuple(target.shape) != want:
            raise ValueError(f"fastloss.cross_entropy: class-index `target` must have shape {want} for `input` of "
                             f"shape {tuple(input.shape)}, got {tuple(target.shape)}")
    if input.dim() == 1:
        x2d = input.unsqueeze(0)
        t = target.unsqueeze(0)
        out_shape = ()
    elif input.dim() == 2:
        x2d, t, out_shape = input, target, (input.shape[0],)
    else:
        x2d = input.movedim(1, -1).reshape(-1, C)
        t = target.movedim(1, -1).reshape(-1, C) if soft else target.reshape(-1)
        out_shape = (input.shape[0],) + tuple(input.shape[2:])
    return x2d, t, out_shape


class _CrossEntropyInplace(torch.autograd.Function):
    """Forward writes d loss / d logits into the logits' own buffer; backward only rescales it (and skips even
    that when the incoming gradient is exactly 1), so no second N x C tensor ever exists."""

    @staticmethod
    def forward(ctx, x2d, t, weight, ignore_index, label_smoothing, z_loss, softcap, algorithm, reduction, denom,
                out_shape, loss_kind, loss_param):
        buf = x2d.detach()
        scale = (1.0 / denom).reshape(1) if reduction == "mean" else torch.ones(1, device=x2d.device)
        rows, lse = torch.ops.fastloss.cross_entropy_fwd_inplace_grad(
            buf, t, weight, scale, ignore_index, label_smoothing, z_loss, softcap, algorithm, loss_kind, loss_param)
        ctx.save_for_backward(buf)
        ctx.reduction = reduction
        ctx.mark_non_differentiable(lse)
        return reduce_rows(rows, reduction, out_shape, denom), lse

    @staticmethod
    def backward(ctx, grad, _grad_lse):
        (buf,) = ctx.saved_tensors
        torch.ops.fastloss.scale_rows_(buf, grad.reshape(-1))
        return buf, None, None, None, None, None, None, None, None, None, None, None, None


def cross_entropy(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    *,
    z_loss: float = 0.0,
    softcap: Optional[float] = None,
    return_lse: bool = False,
    return_z_loss: bool = False,
    inplace_backward: bool = False,
    algorithm: str = "auto",
    loss: str = "ce",
    gamma: Optional[float] = None,
    epsilon: Optional[float] = None,
):
    """Drop-in ``torch.nn.functional.cross_entropy`` computed by fastloss's fused kernels.

    Same semantics as torch for every shared argument: input (C), (N, C) or (N, C, d1, ..., dK); class-index
    (int64) or class-probability targets; ``weight``; ``ignore_index`` (any value, class-index targets only);
    ``reduction`` "none" / "mean" / "sum" ("mean" divides by the summed weight of the non-ignored targets, so all
    targets ignored gives nan, as torch); ``label_smoothing`` (combined with ``weight`` as torch does).

    LLM extras:
      z_loss: adds ``z_loss * lse**2`` per (non-ignored) token, reduced like the loss (not class-weighted):
        PaLM's auxiliary z-loss. De Brebisson & Vincent's spherical Z-loss is another loss altogether:
        :func:`fastloss.spherical_loss` (``loss="z"``).
      softcap: applies ``softcap * tanh(logits / softcap)`` before the loss, with its gradient; -inf logits (masked
        vocabulary entries) stay -inf.
      return_lse / return_z_loss: return a :class:`CrossEntropyOutput` (loss, z_loss term, per-token lse).
      inplace_backward: the forward writes the gradient into ``input``'s buffer (which is destroyed): no second
        N x C tensor. Class-index targets only; eager mode; the returned lse / z_loss are then not differentiable.
      algorithm: "auto" | "online" | "two_pass" for the log-sum-exp (see :func:`softmax`).
      loss: "ce" (default), or a comp-sum loss computed by the same fused row pass (class-index targets, no label
        smoothing; class weights, ignore_index, reductions, z_loss and softcap as for "ce"):
        "focal": ``-(1 - p_t)**gamma * log p_t`` (Lin et al.; ``gamma`` default 2.0);
        "poly1": ``-log p_t + epsilon * (1 - p_t)`` (PolyLoss, Leng et al.; ``epsilon`` default 1.0);
        "squentropy": ``-log p_t + sum_{c != t} p_c**2 / (C - 1)`` (Hui & Belkin), its sum of squares from a second
        running accumulator in the same reduction pass (the backward from saved lse adds one pass over the row).
        Weighted per token by ``weight[t]``; "mean" divides by the summed weight, as for "ce".

    The loss has ``input``'s dtype; internally everything accumulates in float32 (float64 for float64 input).
    """
    check_input("cross_entropy", input, algorithm)
    check_tensor("cross_entropy", "target", target)
    check_choice("cross_entropy", "reduction", reduction, REDUCTIONS)
    soft = target.is_floating_point()
    if soft and ignore_index >= 0:
        raise ValueError("fastloss.cross_entropy: ignore_index is not supported for probability targets")
    if softcap is not None:
        softcap = float(softcap)
    kind, param = loss_kind("cross_entropy", loss, gamma, epsilon, float(label_smoothing), soft)
    if _is_dtensor(input):  # a plain target / weight beside DTensor logits: this rank's rows / replicated
        target = _dtensor.rows_like(input, target, 0 if input.dim() == 1 else 1)
        weight = _dtensor.replicate_like(input, weight)
    x2d, t, out_shape = _flatten_for_ce(input, target, soft)
    ls, z = float(label_smoothing), float(z_loss)
    ops = torch.ops.fastloss

    if soft:
        if inplace_backward:
            raise ValueError("fastloss.cross_entropy: inplace_backward supports class-index targets only")
        rows, lse, _ = ops.cross_entropy_prob_fwd(x2d, t, weight, ls, z, softcap, algorithm)
        valid = None
        denom = mean_denominator(reduction, t, None, weight, input.dtype)  # torch: mean over samples
    else:
        valid = t != ignore_index
        denom = mean_denominator(reduction, t, valid, weight, input.dtype)
        if inplace_backward and x2d.requires_grad and torch.is_grad_enabled():
            x2d = x2d if x2d.is_contiguous() else x2d.contiguous()
            out, lse = _CrossEntropyInplace.apply(x2d, t, weight, ignore_index, ls, z, softcap, algorithm,
                                                  reduction, denom, out_shape, kind, param)
            return _finish(out.to(input.dtype), lse, valid, z, reduction, out_shape, denom, return_lse,
                           return_z_loss)
        rows, lse, _ = ops.cross_entropy_fwd(x2d, t, weight, ignore_index, ls, z, softcap, algorithm, kind, param)
    out = reduce_rows(rows, reduction, out_shape, denom).to(input.dtype)
    return _finish(out, lse, valid, z, reduction, out_shape, denom, return_lse, return_z_loss)


def _finish(loss, lse, valid, z, reduction, out_shape, denom, return_lse, return_z_loss):
    if not (return_lse or return_z_loss):
        return loss
    z_term = None
    if return_z_loss:
        zr = z * lse * lse
        if valid is not None:
            zr = zr * valid
        z_term = reduce_rows(zr, reduction, out_shape, denom)
    if z_term is not None:
        z_term = z_term.to(loss.dtype)
    lse_out = None
    if return_lse:  # float32 (float64 for float64 input); computed in float64
        lse_out = lse.view(out_shape).to(torch.float64 if loss.dtype == torch.float64 else torch.float32)
    return CrossEntropyOutput(loss, z_term, lse_out)


# ---------------------------------------------------------------- linear cross-entropy


def _resolve_filter_eps(filter_eps, dtype: torch.dtype) -> float:
    if filter_eps is None:
        return 0.0
    if isinstance(filter_eps, str):
        if filter_eps != "auto":
            raise ValueError(f"fastloss.linear_cross_entropy: `filter_eps` must be None, a float >= 0 or 'auto', "
                             f"got {filter_eps!r}")
        return torch.finfo(dtype).eps / 32
    eps = float(filter_eps)
    if not (eps >= 0 and math.isfinite(eps)):
        raise ValueError(f"fastloss.linear_cross_entropy: `filter_eps` must be a finite float >= 0, got {filter_eps!r}")
    return eps


def linear_cross_entropy(
    input: torch.Tensor,
    linear_weight: torch.Tensor,
    target: torch.Tensor,
    *,
    linear_bias: Optional[torch.Tensor] = None,
    weight: Optional[torch.Tensor] = None,
    reduction: str = "mean",
    ignore_index: Optional[int] = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: Optional[float] = None,
    chunk_size="auto",
    filter_eps=None,
    loss_dtype: Optional[torch.dtype] = None,
    return_lse: bool = False,
    return_z_loss: bool = False,
    algorithm: str = "auto",
    loss: str = "ce",
    gamma: Optional[float] = None,
    epsilon: Optional[float] = None,
    options=None,
):
    """``cross_entropy(linear(input, linear_weight, linear_bias), target, ...)`` without the N x V logits.

    The signature of torch 2.13's ``F.linear_cross_entropy`` (``options`` is accepted and ignored: fastloss always
    chunks), plus fastloss's extras (``z_loss``, ``softcap``, ``return_lse``, ``return_z_loss``, ``algorithm``; see
    :func:`cross_entropy`). input (..., D) or (D,); linear_weight (V, D); linear_bias (V,); target class indices of
    shape input.shape[:-1], or class probabilities (..., V).

    chunk_size: tokens per chunk, or "auto": as many as fit a logits budget of 256 MiB (CPU and CUDA)
    (``fastloss._linear_ce.CHUNK_BUDGET_BYTES``). Extra memory is one chunk of logits plus the gradients
    themselves (d W accumulated in float32). When gradients are needed they are computed during the forward and
    scaled in the backward, so the returned lse / z-loss are for logging (not differentiable).

    filter_eps: gradient filtering as in Cut Cross-Entropy. None or 0 (default): exact. A float: in each chunk the
    vocabulary columns whose d loss / d logits entries are all below ``filter_eps`` times the incoming gradient
    (1/N for a mean: without class weights or softcap, softmax values below ``filter_eps``) skip the two backward
    GEMMs; each dropped entry is below that bound, which is the whole error. "auto": ``finfo(input.dtype).eps / 32``
    (2^-12 for bf16, CCE's choice; 2^-15 fp16; 2^-28 fp32). It pays when most of a chunk's columns fall below the
    bound (a trained model's peaked softmax; not random logits) and costs one host sync per chunk on CUDA.

    loss, gamma, epsilon: the comp-sum losses, as in :func:`cross_entropy`.

    loss_dtype: dtype of the returned loss; default the input's (as ``F.cross_entropy``). The rows are reduced in
    float64 either way, so ``torch.float32`` on bf16 input gives the loss that upcasting the logits would (what
    Hugging Face models report) without any float32 logits.
    """
    return _linear_cross_entropy(
        input, linear_weight, target, None, linear_bias=linear_bias, weight=weight, reduction=reduction,
        ignore_index=ignore_index, label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap,
        chunk_size=chunk_size, filter_eps=filter_eps, loss_dtype=loss_dtype, return_lse=return_lse,
        return_z_loss=return_z_loss, algorithm=algorithm, loss=loss, gamma=gamma, epsilon=epsilon)


def _linear_cross_entropy(input, linear_weight, target, lowrank, *, linear_bias, weight, reduction, ignore_index,
                          label_smoothing, z_loss, softcap, chunk_size, filter_eps, loss_dtype, return_lse,
                          return_z_loss, algorithm, loss, gamma, epsilon):
    """:func:`linear_cross_entropy` with an optional low-rank block ``lowrank = (U, B)``: the logits are
    ``input W^T + b + U B^T``, one linear map of the widened operands [input, U] and [W, B] (a LoRA adapter on the
    head, U already scaled), still without the N x V logits. U (..., R) with input's leading shape, B (V, R)."""
    fn = "linear_cross_entropy"
    for name, val in (("input", input), ("linear_weight", linear_weight), ("target", target)):
        check_tensor(fn, name, val)
    check_choice(fn, "reduction", reduction, REDUCTIONS)
    check_choice(fn, "algorithm", algorithm, ALGORITHMS)
    if linear_weight.dim() != 2:
        raise ValueError(f"fastloss.linear_cross_entropy: `linear_weight` must have shape (V, D), got "
                         f"{tuple(linear_weight.shape)}")
    V, D = linear_weight.shape
    if input.dim() == 0 or input.shape[-1] != D:
        raise ValueError(f"fastloss.linear_cross_entropy: `input` must have shape (..., {D}) to match "
                         f"`linear_weight` {tuple(linear_weight.shape)}, got {tuple(input.shape)}")
    if linear_bias is not None and tuple(linear_bias.shape) != (V,):
        raise ValueError(f"fastloss.linear_cross_entropy: `linear_bias` must have shape ({V},), got "
                         f"{tuple(linear_bias.shape)}")
    if input.dtype != linear_weight.dtype:
        raise ValueError(f"fastloss.linear_cross_entropy: `input` ({input.dtype}) and `linear_weight` "
                         f"({linear_weight.dtype}) must have the same dtype")
    ignore_index = -100 if ignore_index is None else int(ignore_index)
    lead = tuple(input.shape[:-1])
    soft = target.is_floating_point()
    if soft:
        if tuple(target.shape) != lead + (V,):
            raise ValueError(f"fastloss.linear_cross_entropy: probability `target` must have shape {lead + (V,)}, "
                             f"got {tuple(target.shape)}")
        if ignore_index >= 0:
            raise ValueError("fastloss.linear_cross_entropy: ignore_index is not supported for probability targets")
        t = target.reshape(-1, V)
    else:
        if tuple(target.shape) != lead:
            raise ValueError(f"fastloss.linear_cross_entropy: class-index `target` must have shape {lead}, got "
                             f"{tuple(target.shape)}")
        t = target.reshape(-1)
    if _is_dtensor(linear_weight) or _is_dtensor(input):
        return _dtensor_linear_cross_entropy(input, linear_weight, target, linear_bias, weight, reduction,
                                             ignore_index, label_smoothing, z_loss, softcap, chunk_size, loss_dtype,
                                             return_lse, return_z_loss, soft, lowrank, filter_eps, loss, gamma,
                                             epsilon)
    h = input.reshape(-1, D)
    N = h.shape[0]
    valid = None if soft else t != ignore_index
    denom = mean_denominator(reduction, t, valid, weight, input.dtype)
    want = (input.requires_grad, linear_weight.requires_grad,
            linear_bias is not None and linear_bias.requires_grad)
    if not torch.is_grad_enabled():
        want = (False, False, False)
    U = B = None
    if lowrank is not None:
        U, B = lowrank
        R = B.shape[-1]
        if B.dim() != 2 or B.shape[0] != V or tuple(U.shape) != lead + (R,) or not U.is_floating_point() \
                or not B.is_floating_point():
            raise ValueError(f"fastloss.linear_cross_entropy: the low-rank block must be U {lead + (R,)} and B "
                             f"({V}, {R}), floating point (computed in the input's dtype, gradients in their own), "
                             f"got U {tuple(U.shape)} {U.dtype} and B {tuple(B.shape)} {B.dtype}")
        U = U.reshape(-1, R).contiguous()
        B = B.contiguous()
        want = want + (U.requires_grad and torch.is_grad_enabled(), B.requires_grad and torch.is_grad_enabled())
    else:
        want = want + (False, False)
    chunk_rows = resolve_chunk_rows(chunk_size, N, V, input.dtype, h.device)
    filter_eps = _resolve_filter_eps(filter_eps, input.dtype)
    kind, param = loss_kind("linear_cross_entropy", loss, gamma, epsilon, float(label_smoothing), soft)
    if softcap is not None:
        softcap = float(softcap)
    out, lse = LinearCrossEntropyFunction.apply(
        h.contiguous(), linear_weight.contiguous(), linear_bias, U, B, t, weight, ignore_index, float(label_smoothing),
        float(z_loss), softcap, algorithm, reduction, chunk_rows, denom, lead, want, filter_eps, (kind, param))
    return _finish(out.to(input.dtype if loss_dtype is None else loss_dtype), lse, valid, float(z_loss), reduction,
                   lead, denom, return_lse, return_z_loss)


def _dtensor_linear_cross_entropy(input, linear_weight, target, linear_bias, weight, reduction, ignore_index,
                                  label_smoothing, z_loss, softcap, chunk_size, loss_dtype, return_lse, return_z_loss,
                                  soft, lowrank, filter_eps, loss, gamma, epsilon):
    """A DTensor head (tensor parallelism): the vocabulary-parallel linear cross-entropy on the local rows."""
    fn = "linear_cross_entropy"
    if soft or lowrank is not None or _resolve_filter_eps(filter_eps, input.dtype) != 0.0:
        raise NotImplementedError(f"fastloss.{fn}: with a DTensor head only class-index targets, no low-rank block "
                                  "and filter_eps=None are supported")
    kind, param = loss_kind(fn, loss, gamma, epsilon, float(label_smoothing), False)
    ops = _dtensor.LinearOperands(fn, input, linear_weight, linear_bias, target, weight, ignore_index)
    if ops.shard is None:  # a replicated head: the ordinary path on the local tensors
        return ops.wrap(linear_cross_entropy(
            ops.h, ops.W, ops.t, linear_bias=ops.b, weight=ops.weight, reduction=reduction, ignore_index=ignore_index,
            label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap, chunk_size=chunk_size,
            loss_dtype=loss_dtype, return_lse=return_lse, return_z_loss=return_z_loss, loss=loss, gamma=gamma,
            epsilon=epsilon))
    opts = _vocab_parallel.CeOptions(ignore_index, float(label_smoothing), float(z_loss),
                                     None if softcap is None else float(softcap), kind, float(param))
    t = ops.t.reshape(-1)
    rows, lse = _vocab_parallel.linear_rows(ops.h, ops.W, ops.b, t, ops.weights, ops.shard, opts,
                                            reduction != "none", chunk_size)
    valid = t != ignore_index
    lead = tuple(ops.h.shape[:-1])
    denom = mean_denominator(reduction, t, valid, ops.weights.full, input.dtype)
    out = reduce_rows(rows, reduction, lead, denom).to(input.dtype if loss_dtype is None else loss_dtype)
    return ops.wrap(_finish(out, lse, valid, float(z_loss), reduction, lead, denom, return_lse, return_z_loss))

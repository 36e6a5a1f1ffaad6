"""Vocab-parallel (tensor-parallel) cross-entropy, linear cross-entropy and token log-probabilities over
torch.distributed.

Each rank of ``group`` holds a contiguous slice of the vocabulary, ranks in order, slices of any sizes (worked
out with one small all-gather unless ``vocab_sizes`` is given). ``target`` holds global class indices on every
rank. Thin wrappers over :mod:`fastloss._vocab_parallel`, the implementation DTensor inputs use too: one fused
kernel pass over the local logits, one small collective per token block (3 numbers per token, 4 with label
smoothing or squentropy, float32; never the logits), the loss from loss_math.h, and a backward that needs no
communication for the logits' gradient. The linear version adds one all-reduce of d input (D values per token).

Math and semantics are those of :func:`fastloss.cross_entropy` / :func:`fastloss.linear_cross_entropy` on the
full vocabulary (class-index targets; class weights, ignore_index, reduction, label_smoothing, z_loss, softcap,
the comp-sum losses), accumulated in float32 (float64 for float64 input). Label smoothing is over the *global*
vocabulary (Megatron's smoothing under TP > 1 used the local one, NVIDIA/Megatron-LM#737). All ranks must call
with the same targets and options.

The token log-probabilities (:func:`vocab_parallel_token_logprobs`, :func:`vocab_parallel_linear_token_logprobs`)
are those of :func:`fastloss.token_logprobs` / :func:`fastloss.linear_token_logprobs` on the full vocabulary
(entropy, TRL's statistics, temperature, softcap for the linear one): one log-prob kernel pass over the local
logits, one all-gather of a few numbers per token, a backward with no communication for the logits' gradient.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.distributed as dist

from . import _vocab_parallel as _vp
from ._common import REDUCTIONS as _REDUCTIONS
from ._common import check_temperature as _check_temperature
from ._common import logprob_outputs as _logprob_outputs
from ._common import loss_kind as _loss_kind
from ._common import mean_denominator as _mean_denominator
from ._common import reduce_rows as _reduce_rows

_NAME = "fastloss.distributed"


# ---------------------------------------------------------------- shard layout


def _shard(local_vocab: int, group, vocab_sizes: Optional[Sequence[int]], device) -> _vp.VocabShard:
    """This rank's slice: its start, size, the global vocabulary size and the largest slice."""
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    if vocab_sizes is None:
        sizes = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(world)]
        dist.all_gather(sizes, torch.tensor([local_vocab], dtype=torch.int64, device=device), group=group)
        vocab_sizes = torch.cat(sizes).tolist()
    vocab_sizes = [int(v) for v in vocab_sizes]
    if len(vocab_sizes) != world:
        raise ValueError(f"{_NAME}: `vocab_sizes` has {len(vocab_sizes)} entries for a group of {world} ranks")
    if vocab_sizes[rank] != local_vocab:
        raise ValueError(f"{_NAME}: rank {rank} holds {local_vocab} vocabulary entries but `vocab_sizes` says "
                         f"{vocab_sizes[rank]}")
    if any(v < 0 for v in vocab_sizes) or sum(vocab_sizes) == 0:
        raise ValueError(f"{_NAME}: `vocab_sizes` must be >= 0 with a positive total, got {vocab_sizes}")
    return _vp.VocabShard(sum(vocab_sizes[:rank]), local_vocab, sum(vocab_sizes), group, max(vocab_sizes))


def _check_args(reduction, label_smoothing, softcap):
    if reduction not in _REDUCTIONS:
        raise ValueError(f"{_NAME}: `reduction` must be one of {_REDUCTIONS}, got {reduction!r}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"{_NAME}: `label_smoothing` must be in [0, 1], got {label_smoothing}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"{_NAME}: `softcap` must be > 0 or None, got {softcap}")


# ---------------------------------------------------------------- cross-entropy on sharded logits


def _options(fn, reduction, label_smoothing, softcap, ignore_index, z_loss, loss, gamma, epsilon):
    _check_args(reduction, label_smoothing, softcap)
    kind, param = _loss_kind(fn, loss, gamma, epsilon, float(label_smoothing), False)
    return _vp.CeOptions(int(ignore_index), float(label_smoothing), float(z_loss),
                         None if softcap is None else float(softcap), kind, float(param))


def _finish(rows, t, weights, opts, reduction, dtype, shape):
    valid = t != opts.ignore_index
    denom = _mean_denominator(reduction, t, valid, weights.full, dtype)
    return _reduce_rows(rows, reduction, shape, denom).to(dtype)


def vocab_parallel_cross_entropy(
    local_logits: torch.Tensor,
    target: torch.Tensor,
    group=None,
    *,
    vocab_sizes: Optional[Sequence[int]] = None,
    weight: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: Optional[float] = None,
    loss: str = "ce",
    gamma: Optional[float] = None,
    epsilon: Optional[float] = None,
) -> torch.Tensor:
    """Cross-entropy of logits whose vocabulary (last) dimension is sharded over ``group``.

    local_logits: (..., V_r), this rank's contiguous vocabulary slice (rank order = vocabulary order).
    target: (...,) global class indices, the same on every rank. vocab_sizes: every rank's V_r, in rank order
    (saves one small all-gather). weight: the class weights of the *whole* vocabulary (V,), the same on every rank.
    loss / gamma / epsilon: the comp-sum losses of :func:`fastloss.cross_entropy`. Returns what
    :func:`fastloss.cross_entropy` returns on the gathered logits, on every rank; the gradient flows to each rank's
    own slice with no communication in the backward.
    """
    fn = f"{_NAME}.vocab_parallel_cross_entropy"
    opts = _options(fn, reduction, label_smoothing, softcap, ignore_index, z_loss, loss, gamma, epsilon)
    if not isinstance(local_logits, torch.Tensor) or not isinstance(target, torch.Tensor):
        raise TypeError(f"{fn}: `local_logits` and `target` must be tensors")
    if local_logits.dim() < 1 or tuple(target.shape) != tuple(local_logits.shape[:-1]):
        raise ValueError(f"{fn}: `target` must have shape local_logits.shape[:-1]"
                         f" = {tuple(local_logits.shape[:-1])}, got {tuple(target.shape)}")
    if target.is_floating_point():
        raise TypeError(f"{fn}: `target` must hold class indices (int64)")
    shard = _shard(local_logits.shape[-1], group, vocab_sizes, local_logits.device)
    V = shard.V
    weights = _class_weights(fn, weight, shard, local_logits)
    t = target.reshape(-1)
    _vp.check_targets(fn, t, V, opts.ignore_index)
    x = local_logits.reshape(t.shape[0], local_logits.shape[-1])  # (not -1: a rank's slice may be empty)
    rows, _ = _vp.VocabParallelCE.apply(x.contiguous(), t.contiguous(), weights, shard, opts)
    return _finish(rows, t, weights, opts, reduction, local_logits.dtype, tuple(target.shape))


def _class_weights(fn, weight, shard, like):
    if weight is not None:
        if not isinstance(weight, torch.Tensor) or tuple(weight.shape) != (shard.V,) or \
                not weight.is_floating_point():
            raise ValueError(f"{fn}: `weight` must be the class weights of the whole vocabulary, a floating-point "
                             f"tensor of shape ({shard.V},), got {getattr(weight, 'shape', weight)}")
        if weight.device != like.device:
            raise ValueError(f"{fn}: `weight` is on {weight.device}, the logits on {like.device}")
    return _vp.ClassWeights(weight, shard, like.dtype)


# ---------------------------------------------------------------- linear cross-entropy, weight sharded by rows


def vocab_parallel_linear_cross_entropy(
    hidden: torch.Tensor,
    local_weight: torch.Tensor,
    target: torch.Tensor,
    group=None,
    *,
    local_bias: Optional[torch.Tensor] = None,
    vocab_sizes: Optional[Sequence[int]] = None,
    weight: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: Optional[float] = None,
    loss: str = "ce",
    gamma: Optional[float] = None,
    epsilon: Optional[float] = None,
    chunk_size="auto",
) -> torch.Tensor:
    """Cross-entropy of ``hidden @ W.T (+ b)`` with ``W`` (V, D) sharded by vocabulary rows over ``group``.

    hidden: (..., D), the same on every rank (tensor parallelism replicates it); local_weight: (V_r, D), this
    rank's rows; local_bias: (V_r,); weight: class weights of the whole vocabulary (V,). Token chunks as
    :func:`fastloss.linear_cross_entropy` (``chunk_size``), so no rank ever holds (N, V_r) logits. Gradients:
    d local_weight and d local_bias stay local; d hidden is summed over the ranks (one all-reduce), so every rank
    gets the full input gradient.
    """
    fn = f"{_NAME}.vocab_parallel_linear_cross_entropy"
    opts = _options(fn, reduction, label_smoothing, softcap, ignore_index, z_loss, loss, gamma, epsilon)
    _check_linear(fn, hidden, local_weight, local_bias, "target", target)
    shard = _shard(local_weight.shape[0], group, vocab_sizes, hidden.device)
    V = shard.V
    weights = _class_weights(fn, weight, shard, hidden)
    t = target.reshape(-1).contiguous()
    _vp.check_targets(fn, t, V, opts.ignore_index)
    return _linear(hidden, local_weight, local_bias, t, weights, shard, opts, reduction, chunk_size,
                   tuple(target.shape))


def _check_linear(fn, hidden, local_weight, local_bias, name, indices):
    """The linear versions' arguments: hidden (..., D), local_weight (V_r, D) of one dtype, local_bias (V_r,),
    indices (targets / tokens) int64 of hidden's leading shape."""
    for arg, val in (("hidden", hidden), ("local_weight", local_weight), (name, indices)):
        if not isinstance(val, torch.Tensor):
            raise TypeError(f"{fn}: `{arg}` must be a tensor")
    if local_weight.dim() != 2 or hidden.dim() < 1 or hidden.shape[-1] != local_weight.shape[1]:
        raise ValueError(f"{fn}: `local_weight` must be (V_r, D) and `hidden` (..., D); got "
                         f"{tuple(local_weight.shape)} and {tuple(hidden.shape)}")
    if hidden.dtype != local_weight.dtype:
        raise ValueError(f"{fn}: `hidden` ({hidden.dtype}) and `local_weight` ({local_weight.dtype}) must have the "
                         f"same dtype")
    if local_bias is not None and tuple(local_bias.shape) != (local_weight.shape[0],):
        raise ValueError(f"{fn}: `local_bias` must have shape ({local_weight.shape[0]},), got "
                         f"{tuple(local_bias.shape)}")
    if indices.dtype != torch.int64 or tuple(indices.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"{fn}: `{name}` must be int64 indices of shape {tuple(hidden.shape[:-1])}, got "
                         f"{indices.dtype} {tuple(indices.shape)}")


def _linear(hidden, local_weight, local_bias, t, weights, shard, opts, reduction, chunk_size, shape):
    rows, _ = _vp.linear_rows(hidden, local_weight, local_bias, t, weights, shard, opts, reduction != "none",
                              chunk_size)
    return _finish(rows, t, weights, opts, reduction, hidden.dtype, shape)


# ---------------------------------------------------------------- token log-probabilities (RL policies)


def vocab_parallel_token_logprobs(
    local_logits: torch.Tensor,
    tokens: torch.Tensor,
    group=None,
    *,
    vocab_sizes: Optional[Sequence[int]] = None,
    temperature: float = 1.0,
    return_entropy: bool = False,
    return_stats: bool = False,
):
    """:func:`fastloss.token_logprobs` of logits whose vocabulary (last) dimension is sharded over ``group``.

    local_logits: (..., V_r), this rank's contiguous vocabulary slice (rank order = vocabulary order); tokens:
    (...,) global token indices, the same on every rank. Returns what :func:`fastloss.token_logprobs` returns on
    the gathered logits, on every rank (float32, float64 for float64 logits); the gradient flows to each rank's
    own slice with no communication in the backward.
    """
    fn = f"{_NAME}.vocab_parallel_token_logprobs"
    for name, val in (("local_logits", local_logits), ("tokens", tokens)):
        if not isinstance(val, torch.Tensor):
            raise TypeError(f"{fn}: `{name}` must be a tensor")
    if local_logits.dim() < 1 or tuple(tokens.shape) != tuple(local_logits.shape[:-1]) or \
            tokens.dtype != torch.int64:
        raise ValueError(f"{fn}: `tokens` must be int64 of shape local_logits.shape[:-1] = "
                         f"{tuple(local_logits.shape[:-1])}, got {tokens.dtype} {tuple(tokens.shape)}")
    temperature = _check_temperature(fn[len("fastloss."):], temperature)
    shard = _shard(local_logits.shape[-1], group, vocab_sizes, local_logits.device)
    V = shard.V
    t = tokens.reshape(-1).contiguous()
    _vp.check_targets(fn, t, V, None)
    x = local_logits.reshape(t.shape[0], local_logits.shape[-1]).contiguous()  # (a slice may be empty)
    lp, ent, st, am = _vp.VocabParallelLogprobs.apply(x, t, shard, temperature, bool(return_entropy),
                                                      bool(return_stats))
    return _logprob_outputs(lp, ent, st, am, local_logits.dtype, tuple(tokens.shape), return_entropy, return_stats)


def vocab_parallel_linear_token_logprobs(
    hidden: torch.Tensor,
    local_weight: torch.Tensor,
    tokens: torch.Tensor,
    group=None,
    *,
    local_bias: Optional[torch.Tensor] = None,
    vocab_sizes: Optional[Sequence[int]] = None,
    temperature: float = 1.0,
    return_entropy: bool = False,
    return_stats: bool = False,
    softcap: Optional[float] = None,
    chunk_size="auto",
):
    """:func:`fastloss.linear_token_logprobs` of ``hidden @ W.T (+ b)`` with ``W`` (V, D) sharded by vocabulary
    rows over ``group``: hidden (..., D) the same on every rank, local_weight (V_r, D), local_bias (V_r,), tokens
    (...,) global indices. Token chunks (``chunk_size``): no rank holds (N, V_r) logits. d local_weight and
    d local_bias stay local; d hidden is summed over the ranks (one all-reduce)."""
    fn = f"{_NAME}.vocab_parallel_linear_token_logprobs"
    _check_linear(fn, hidden, local_weight, local_bias, "tokens", tokens)
    temperature = _check_temperature(fn[len("fastloss."):], temperature)
    if softcap is not None and not softcap > 0:
        raise ValueError(f"{fn}: `softcap` must be > 0 or None, got {softcap}")
    shard = _shard(local_weight.shape[0], group, vocab_sizes, hidden.device)
    V = shard.V
    t = tokens.reshape(-1).contiguous()
    _vp.check_targets(fn, t, V, None)
    lp, ent, st, am = _vp.linear_logprobs(hidden, local_weight, local_bias, t, shard, temperature,
                                          bool(return_entropy), bool(return_stats),
                                          None if softcap is None else float(softcap), chunk_size)
    return _logprob_outputs(lp, ent, st, am, hidden.dtype, tuple(tokens.shape), return_entropy, return_stats)

"""Vocab-parallel (tensor-parallel) cross-entropy and linear cross-entropy over torch.distributed.

Each rank of ``group`` holds a contiguous slice of the vocabulary, ranks in order, slices of any sizes (worked
out with one small all-gather unless ``vocab_sizes`` is given). ``target`` holds global class indices on every
rank. What crosses the network per token, never the logits:

1. all-reduce MAX of the local row maxima (one float);
2. all-reduce SUM of the packed ``[sum exp(z - M), target logit, sum z]`` (the last only with label smoothing):
   the online-normalizer merge with the global maximum known, the target logit from the rank that owns it (0
   elsewhere), and the global logit sum that label smoothing needs (over the *global* vocabulary; Megatron's
   smoothing under TP > 1 used the local one, NVIDIA/Megatron-LM#737).

So 2 collectives and 12 bytes per token in float32 (16 with label smoothing), where Megatron's vocab-parallel
cross-entropy does 3 all-reduces of 4 bytes each. The backward needs no communication for the logits' gradient:
every rank has the global lse and the target, so d loss / d local logits is local. The linear version adds one
all-reduce of d input (D values per token), the partial products of all ranks' vocabulary slices.

Math and semantics are those of :func:`fastloss.cross_entropy` / :func:`fastloss.linear_cross_entropy` on the
full vocabulary (class-index targets; ignore_index, reduction, label_smoothing, z_loss, softcap), accumulated in
float32 (float64 for float64 input). All ranks must call with the same targets and options.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.distributed as dist

from ._common import REDUCTIONS as _REDUCTIONS

_NAME = "fastloss.distributed"


# ---------------------------------------------------------------- shard layout


def _shard_layout(local_vocab: int, group, vocab_sizes: Optional[Sequence[int]], device) -> tuple[int, int]:
    """(start of this rank's slice, global vocabulary size)."""
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
    return sum(vocab_sizes[:rank]), sum(vocab_sizes)


def _check_args(reduction, label_smoothing, softcap):
    if reduction not in _REDUCTIONS:
        raise ValueError(f"{_NAME}: `reduction` must be one of {_REDUCTIONS}, got {reduction!r}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"{_NAME}: `label_smoothing` must be in [0, 1], got {label_smoothing}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"{_NAME}: `softcap` must be > 0 or None, got {softcap}")


def _check_targets(t: torch.Tensor, V: int, ignore_index: int) -> None:
    bad = ((t < 0) | (t >= V)) & (t != ignore_index)
    if t.device.type == "cpu":
        if bool(bad.any()):
            pos = int(bad.nonzero()[0, 0])
            raise IndexError(f"{_NAME}: target {int(t[pos])} at position {pos} is out of range for a global "
                             f"vocabulary of {V} (and is not ignore_index={ignore_index})")
    else:  # no host sync on the device: an asynchronous assert
        torch._assert_async(~bad.any(), f"{_NAME}: target out of range for the global vocabulary")


# ---------------------------------------------------------------- per-shard math


def _capped(x: torch.Tensor, softcap: Optional[float]) -> torch.Tensor:
    if softcap is None:
        return x
    # -inf (masked vocabulary entries) stays -inf, as fastloss.cross_entropy does.
    return torch.where(x == float("-inf"), x, torch.tanh(x / softcap) * softcap)


class _Stats:
    """Per-row global statistics of one block of rows: lse, target logit, logit sum (label smoothing)."""

    def __init__(self, lse, tgt, sum_z):
        self.lse, self.tgt, self.sum_z = lse, tgt, sum_z


def _global_stats(z: torch.Tensor, t_local: torch.Tensor, owned: torch.Tensor, smoothing: bool, group) -> _Stats:
    """z: (n, V_r) capped logits in the accumulation dtype. Two all-reduces: MAX, then one packed SUM."""
    n = z.shape[0]
    m = z.amax(-1) if z.shape[1] > 0 else z.new_full((n,), float("-inf"))
    dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
    m_safe = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    packed = z.new_zeros((3 if smoothing else 2, n))
    torch.sum(torch.exp(z - m_safe[:, None]), dim=-1, out=packed[0])
    if z.shape[1] > 0:
        picked = z.gather(1, t_local.clamp(0, z.shape[1] - 1)[:, None]).squeeze(1)
        packed[1] = torch.where(owned, picked, torch.zeros_like(picked))
    if smoothing:
        torch.sum(z, dim=-1, out=packed[2])
    dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)
    lse = torch.log(packed[0]) + m_safe
    lse = torch.where(torch.isfinite(m), lse, m)  # all -inf row: -inf; +inf / nan propagate
    return _Stats(lse, packed[1], packed[2] if smoothing else None)


def _row_losses(st: _Stats, valid, V, label_smoothing, z_loss):
    nll = st.lse - st.tgt
    if label_smoothing > 0:
        nll = (1 - label_smoothing) * nll + label_smoothing * (st.lse - st.sum_z / V)
    if z_loss:
        nll = nll + z_loss * st.lse * st.lse
    return torch.where(valid, nll, torch.zeros_like(nll))


def _local_grad(x: torch.Tensor, z: torch.Tensor, lse, t_local, owned, valid, scale, V, label_smoothing, z_loss,
                softcap):
    """d loss / d local logits (before the softcap) of a block of rows, scaled per row: purely local."""
    p = torch.exp(z - lse[:, None])
    coef = scale * valid.to(z.dtype)
    if z_loss:
        p = p * (1 + 2 * z_loss * lse)[:, None]
    g = p
    if label_smoothing > 0:
        g = g - label_smoothing / V
    if z.shape[1] > 0:
        hit = torch.where(owned, torch.full_like(lse, 1 - label_smoothing), torch.zeros_like(lse))
        g.scatter_add_(1, t_local.clamp(0, z.shape[1] - 1)[:, None], -hit[:, None])
    g = g * coef[:, None]
    if softcap is not None:
        y = z / softcap
        g = g * torch.where(z == float("-inf"), torch.zeros_like(z), 1 - y * y)
    return g.to(x.dtype)


def _acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _localize(t, start, V_r, ignore_index):
    valid = t != ignore_index
    owned = valid & (t >= start) & (t < start + V_r)
    return t - start, owned, valid


def _scale_rows(reduction, grad_out, valid, denom, acc):
    if reduction == "none":
        return grad_out.reshape(-1).to(acc)
    s = grad_out.reshape(()).to(acc)
    return (s / denom if reduction == "mean" else s).expand(valid.shape[0])


def _reduce_rows(rows, reduction, denom, shape):
    if reduction == "none":
        return rows.view(shape)
    total = rows.sum()
    return total / denom if reduction == "mean" else total


# ---------------------------------------------------------------- cross-entropy on sharded logits


class _VocabParallelCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, t, start, V, group, ignore_index, reduction, label_smoothing, z_loss, softcap, shape):
        acc = _acc_dtype(x.dtype)
        z = _capped(x.to(acc), softcap)
        t_local, owned, valid = _localize(t, start, x.shape[1], ignore_index)
        st = _global_stats(z, t_local, owned, label_smoothing > 0, group)
        rows = _row_losses(st, valid, V, label_smoothing, z_loss)
        denom = valid.sum().to(acc)
        ctx.save_for_backward(x, st.lse, t_local, owned, valid, denom)
        ctx.opts = (V, reduction, label_smoothing, z_loss, softcap)
        return _reduce_rows(rows, reduction, denom, shape).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        x, lse, t_local, owned, valid, denom = ctx.saved_tensors
        V, reduction, label_smoothing, z_loss, softcap = ctx.opts
        acc = lse.dtype
        z = _capped(x.to(acc), softcap)
        scale = _scale_rows(reduction, grad_out, valid, denom, acc)
        g = _local_grad(x, z, lse, t_local, owned, valid, scale, V, label_smoothing, z_loss, softcap)
        return (g,) + (None,) * 10


def vocab_parallel_cross_entropy(
    local_logits: torch.Tensor,
    target: torch.Tensor,
    group=None,
    *,
    vocab_sizes: Optional[Sequence[int]] = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: Optional[float] = None,
) -> torch.Tensor:
    """Cross-entropy of logits whose vocabulary (last) dimension is sharded over ``group``.

    local_logits: (..., V_r), this rank's contiguous vocabulary slice (rank order = vocabulary order).
    target: (...,) global class indices, the same on every rank. vocab_sizes: every rank's V_r, in rank order
    (saves one small all-gather). Returns what :func:`fastloss.cross_entropy` returns on the gathered logits, on
    every rank; the gradient flows to each rank's own slice with no communication in the backward.
    """
    _check_args(reduction, label_smoothing, softcap)
    if not isinstance(local_logits, torch.Tensor) or not isinstance(target, torch.Tensor):
        raise TypeError(f"{_NAME}.vocab_parallel_cross_entropy: `local_logits` and `target` must be tensors")
    if local_logits.dim() < 1 or tuple(target.shape) != tuple(local_logits.shape[:-1]):
        raise ValueError(f"{_NAME}.vocab_parallel_cross_entropy: `target` must have shape local_logits.shape[:-1]"
                         f" = {tuple(local_logits.shape[:-1])}, got {tuple(target.shape)}")
    if target.is_floating_point():
        raise TypeError(f"{_NAME}.vocab_parallel_cross_entropy: `target` must hold class indices (int64)")
    start, V = _shard_layout(local_logits.shape[-1], group, vocab_sizes, local_logits.device)
    t = target.reshape(-1)
    _check_targets(t, V, ignore_index)
    x = local_logits.reshape(-1, local_logits.shape[-1])
    return _VocabParallelCE.apply(x, t, start, V, group, ignore_index, reduction, float(label_smoothing),
                                  float(z_loss), None if softcap is None else float(softcap), tuple(target.shape))


# ---------------------------------------------------------------- linear cross-entropy, weight sharded by rows


def _chunk_rows(chunk_size, n, v_local, dtype, device):
    from ._linear_ce import resolve_chunk_rows

    return resolve_chunk_rows(chunk_size, n, max(v_local, 1), dtype, device)


class _VocabParallelLinearCE(torch.autograd.Function):
    """Token chunks as in :mod:`fastloss._linear_ce`: per chunk the local logits (one GEMM), the two all-reduces
    of the statistics, and -- when gradients are wanted and the reduction is mean / sum -- d local logits and the
    two backward GEMMs right away (three GEMMs in all). d input is all-reduced once at the end. reduction="none"
    keeps the per-row lse and recomputes in the backward (no statistics collectives there)."""

    @staticmethod
    def forward(ctx, h, W, b, t, start, V, group, ignore_index, reduction, label_smoothing, z_loss, softcap,
                chunk_rows, shape, want):
        acc = _acc_dtype(h.dtype)
        N = h.shape[0]
        t_local, owned, valid = _localize(t, start, W.shape[0], ignore_index)
        denom = valid.sum().to(acc)
        precompute = reduction != "none" and any(want)
        scale = _scale_rows(reduction, torch.ones((), dtype=acc, device=h.device), valid, denom, acc) \
            if precompute else None
        rows = torch.empty(N, dtype=acc, device=h.device)
        lse = torch.empty(N, dtype=acc, device=h.device)
        grads = _GradAcc(h, W, b, want) if precompute else None
        for s in range(0, N, chunk_rows):
            e = min(N, s + chunk_rows)
            x = torch.nn.functional.linear(h[s:e], W, b)
            z = _capped(x.to(acc), softcap)
            st = _global_stats(z, t_local[s:e], owned[s:e], label_smoothing > 0, group)
            rows[s:e] = _row_losses(st, valid[s:e], V, label_smoothing, z_loss)
            lse[s:e] = st.lse
            if precompute:
                g = _local_grad(x, z, st.lse, t_local[s:e], owned[s:e], valid[s:e], scale[s:e], V,
                                label_smoothing, z_loss, softcap)
                grads.add(g, s, e)
            del x, z
        ctx.opts = (V, group, reduction, label_smoothing, z_loss, softcap, chunk_rows, want, precompute)
        if precompute:
            gh, gW, gb = grads.finish(group)
            ctx.save_for_backward(gh, gW, gb)
        else:
            ctx.save_for_backward(h, W, b, lse, t_local, owned, valid, denom)
        return _reduce_rows(rows, reduction, denom, shape).to(h.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        V, group, reduction, label_smoothing, z_loss, softcap, chunk_rows, want, precompute = ctx.opts
        if precompute:
            gh, gW, gb = ctx.saved_tensors
            g = grad_out.reshape(())
            out = [None if x is None else x * g.to(x.dtype) for x in (gh, gW, gb)]
        else:
            h, W, b, lse, t_local, owned, valid, denom = ctx.saved_tensors
            acc = lse.dtype
            scale = _scale_rows(reduction, grad_out, valid, denom, acc)
            grads = _GradAcc(h, W, b, want)
            for s in range(0, h.shape[0], chunk_rows):
                e = min(h.shape[0], s + chunk_rows)
                x = torch.nn.functional.linear(h[s:e], W, b)
                z = _capped(x.to(acc), softcap)
                g = _local_grad(x, z, lse[s:e], t_local[s:e], owned[s:e], valid[s:e], scale[s:e], V,
                                label_smoothing, z_loss, softcap)
                grads.add(g, s, e)
            out = list(grads.finish(group))
        return (*out,) + (None,) * 12


class _GradAcc:
    """d h (this rank's partial, all-reduced at the end), d W_r and d b_r (local, float32 accumulation)."""

    def __init__(self, h, W, b, want):
        acc = _acc_dtype(h.dtype)
        self.h, self.W = h, W
        self.gh = torch.zeros(h.shape, dtype=acc, device=h.device) if want[0] else None
        self.gW = torch.zeros(W.shape, dtype=acc, device=W.device) if want[1] else None
        self.gb = torch.zeros(W.shape[0], dtype=acc, device=W.device) if (b is not None and want[2]) else None
        self.b = b

    def add(self, g, s, e):
        if self.gh is not None:
            self.gh[s:e] += (g @ self.W).to(self.gh.dtype)
        if self.gW is not None:
            self.gW += (g.t() @ self.h[s:e]).to(self.gW.dtype)
        if self.gb is not None:
            self.gb += g.sum(0, dtype=self.gb.dtype)

    def finish(self, group):
        gh = self.gh
        if gh is not None:
            dist.all_reduce(gh, op=dist.ReduceOp.SUM, group=group)  # the one collective of the input gradient
            gh = gh.to(self.h.dtype)
        gW = None if self.gW is None else self.gW.to(self.W.dtype)
        gb = None if self.gb is None else self.gb.to(self.b.dtype)
        return gh, gW, gb


def vocab_parallel_linear_cross_entropy(
    hidden: torch.Tensor,
    local_weight: torch.Tensor,
    target: torch.Tensor,
    group=None,
    *,
    local_bias: Optional[torch.Tensor] = None,
    vocab_sizes: Optional[Sequence[int]] = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: Optional[float] = None,
    chunk_size="auto",
) -> torch.Tensor:
    """Cross-entropy of ``hidden @ W.T (+ b)`` with ``W`` (V, D) sharded by vocabulary rows over ``group``.

    hidden: (..., D), the same on every rank (tensor parallelism replicates it); local_weight: (V_r, D), this
    rank's rows; local_bias: (V_r,). Token chunks as :func:`fastloss.linear_cross_entropy` (``chunk_size``), so no
    rank ever holds (N, V_r) logits. Gradients: d local_weight and d local_bias stay local; d hidden is summed over
    the ranks (one all-reduce), so every rank gets the full input gradient.
    """
    _check_args(reduction, label_smoothing, softcap)
    for name, val in (("hidden", hidden), ("local_weight", local_weight), ("target", target)):
        if not isinstance(val, torch.Tensor):
            raise TypeError(f"{_NAME}.vocab_parallel_linear_cross_entropy: `{name}` must be a tensor")
    if local_weight.dim() != 2 or hidden.dim() < 1 or hidden.shape[-1] != local_weight.shape[1]:
        raise ValueError(f"{_NAME}.vocab_parallel_linear_cross_entropy: `local_weight` must be (V_r, D) and "
                         f"`hidden` (..., D); got {tuple(local_weight.shape)} and {tuple(hidden.shape)}")
    if hidden.dtype != local_weight.dtype:
        raise ValueError(f"{_NAME}.vocab_parallel_linear_cross_entropy: `hidden` ({hidden.dtype}) and "
                         f"`local_weight` ({local_weight.dtype}) must have the same dtype")
    if local_bias is not None and tuple(local_bias.shape) != (local_weight.shape[0],):
        raise ValueError(f"{_NAME}.vocab_parallel_linear_cross_entropy: `local_bias` must have shape "
                         f"({local_weight.shape[0]},), got {tuple(local_bias.shape)}")
    if target.is_floating_point() or tuple(target.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"{_NAME}.vocab_parallel_linear_cross_entropy: `target` must be class indices of shape "
                         f"{tuple(hidden.shape[:-1])}, got {target.dtype} {tuple(target.shape)}")
    start, V = _shard_layout(local_weight.shape[0], group, vocab_sizes, hidden.device)
    t = target.reshape(-1)
    _check_targets(t, V, ignore_index)
    h = hidden.reshape(-1, hidden.shape[-1]).contiguous()
    want = (hidden.requires_grad, local_weight.requires_grad, local_bias is not None and local_bias.requires_grad)
    if not torch.is_grad_enabled():
        want = (False, False, False)
    rows = _chunk_rows(chunk_size, h.shape[0], local_weight.shape[0], hidden.dtype, hidden.device)
    return _VocabParallelLinearCE.apply(
        h, local_weight.contiguous(), local_bias, t, start, V, group, ignore_index, reduction,
        float(label_smoothing), float(z_loss), None if softcap is None else float(softcap), rows,
        tuple(target.shape), want)

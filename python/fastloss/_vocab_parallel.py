"""Vocabulary-parallel cross-entropy and token log-probabilities on fastloss's kernels: the one implementation of
the shard math behind :mod:`fastloss.distributed` (plain tensors and a process group) and the DTensor rules
(:mod:`fastloss._dtensor`).

Each rank holds a contiguous slice [start, start + C) of a vocabulary of V classes. Per row:

1. ``torch.ops.fastloss.cross_entropy_shard_fwd``: one pass over the local logits gives (m_r, d_r, x_t, s_r): the
   online normaliser of the (softcapped) slice, the target logit when this slice owns the target (else 0) and,
   when the loss needs it, the weighted logit sum (label smoothing) or sum exp(2 (x - m_r)) (squentropy);
2. one small collective combines them (:func:`combine`): an all-gather of the packed rows on 2 ranks, an
   all-reduce MAX of m_r then one packed all-reduce SUM on more (fewer bytes per rank there); every rank merges
   in the same order, so every rank gets bitwise the same rows;
3. ``cross_entropy_shard_loss``: the row's loss from the global (lse, x_t, w_t, s) (fastloss/loss_math.h);
4. backward: ``cross_entropy_shard_bwd``, one pass over the local logits, no communication.

What crosses the network per token: 3 numbers (m, d, x_t), 4 with label smoothing or squentropy, in float32
(float64 for float64 logits; m and x_t in bf16 / fp16 for such logits without a softcap, where they are exact):
12 bytes per token in float32 (8 in bf16), as many as loss_parallel's three all-reduces. Never the logits.

The token log-probabilities (:func:`logprobs_forward` / :func:`logprobs_backward`, the last section) reuse the
log-prob kernel on the local slice and ``token_logprobs_bwd(..., vocab_start)``: one all-gather per token, a
backward with no communication. Chunked linear versions size their token chunks by the group's largest slice,
so every rank runs the same chunks and the same collectives.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

_ops = torch.ops.fastloss


@dataclass(frozen=True)
class VocabShard:
    """This rank's slice of the vocabulary: classes [start, start + size) of V, over ``group``; ``largest``: the
    largest slice of the group, the same on every rank (what token chunks are sized by, so that every rank runs
    the same chunks and so the same collectives)."""

    start: int
    size: int
    V: int
    group: object
    largest: int


@dataclass(frozen=True)
class CeOptions:
    ignore_index: int = -100
    label_smoothing: float = 0.0
    z_loss: float = 0.0
    softcap: Optional[float] = None
    loss: str = "ce"
    loss_param: float = 0.0
    algorithm: str = "auto"

    @property
    def extra(self) -> bool:
        """Whether the 4th statistic (logit sum / squared-probability sum) is needed."""
        return self.label_smoothing > 0 or self.loss == "squentropy"


def wire_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def combine(stats: torch.Tensor, shard: VocabShard, opts: CeOptions, dtype: torch.dtype) -> torch.Tensor:
    """Local [N, 4] (m, d, x_t, s) -> global float64 [N, 4] (lse, x_t, 0, s); column 2 (w_t) is the caller's."""
    k = 4 if opts.extra else 3
    world = dist.get_world_size(shard.group)
    n = stats.shape[0]
    sq = opts.loss == "squentropy"
    # bf16 / fp16 logits without a softcap: m and x_t are logits, exact in the logits' dtype, so they travel in
    # it (packed in pairs into 32-bit words for the all-gather); d and s in float32.
    exact16 = dtype in (torch.bfloat16, torch.float16) and opts.softcap is None
    if world == 2:
        if exact16:
            pair = torch.stack([stats[:, 0], stats[:, 2]], 1).to(dtype).contiguous().view(torch.float32)
            wire = torch.cat([pair, stats[:, 1:2].float()] + ([stats[:, 3:4].float()] if k == 4 else []), 1)
        else:
            wire = stats[:, :k].to(wire_dtype(dtype)).contiguous()
        got = wire.new_empty((world * n, wire.shape[1]))
        _all_gather(got, wire, shard.group)
        if exact16:
            pair = got[:, :1].contiguous().view(dtype).to(torch.float64)
            got = torch.cat([pair[:, :1], got[:, 1:2].double(), pair[:, 1:2], got[:, 2:].double()], 1)
        got = got.view(world, n, k).to(torch.float64)
        m = got[..., 0]
        M = m.amax(0) if n else m.new_empty((0,))
        Ms = torch.where(torch.isfinite(M), M, torch.zeros_like(M))
        sc = torch.exp(m - Ms)
        D = (got[..., 1] * sc).sum(0)
        xt = got[..., 2].sum(0)
        s = None if k == 3 else ((got[..., 3] * sc * sc).sum(0) if sq else got[..., 3].sum(0))
    else:
        M = stats[:, 0].to(dtype if exact16 else wire_dtype(dtype), copy=True).contiguous()  # (stats' m: below)
        dist.all_reduce(M, op=dist.ReduceOp.MAX, group=shard.group)
        M = M.to(torch.float64)
        Ms = torch.where(torch.isfinite(M), M, torch.zeros_like(M))
        sc = torch.exp(stats[:, 0] - Ms)
        packed = torch.stack([stats[:, 1] * sc, stats[:, 2]] + ([] if k == 3 else [stats[:, 3] * sc * sc if sq
                                                                                   else stats[:, 3]]))
        packed = packed.to(wire_dtype(dtype))
        dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=shard.group)
        packed = packed.to(torch.float64)
        D, xt = packed[0], packed[1]
        s = None if k == 3 else packed[2]
    lse = torch.where(torch.isfinite(M), torch.log(D) + Ms, M)  # an all -inf row: -inf; +inf / nan propagate
    if sq:
        s = s / (D * D)
    rows = torch.zeros((n, 4), dtype=torch.float64, device=stats.device)
    rows[:, 0] = lse
    rows[:, 1] = xt
    if s is not None:
        rows[:, 3] = s
    return rows


def _all_gather(out: torch.Tensor, inp: torch.Tensor, group) -> None:
    # all_gather_single from torch 2.13 (all_gather_into_tensor is deprecated there); the older name before
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, inp, group=group)


class ClassWeights:
    """The class weights as the shard kernels see them: this rank's slice, the per-row w_t and the global sum."""

    def __init__(self, full: Optional[torch.Tensor], shard: VocabShard, dtype: torch.dtype):
        self.full = None if full is None else full.to(wire_dtype(dtype))
        self.local = None if full is None else self.full[shard.start:shard.start + shard.size].contiguous()
        self.total = None if full is None else self.full.sum().to(torch.float64)

    def at(self, t: torch.Tensor, ignore_index: int) -> torch.Tensor:
        if self.full is None:
            return torch.ones(t.shape, dtype=torch.float64, device=t.device)
        return self.full[t.masked_fill(t == ignore_index, 0)].to(torch.float64)


def shard_forward(x, t, weights: ClassWeights, shard: VocabShard, opts: CeOptions):
    """Per-row losses (float64 [N]) and the global rows (float64 [N, 4]: lse, x_t, w_t, s) of local logits x."""
    stats = _ops.cross_entropy_shard_fwd(x, t, weights.local, shard.start, opts.ignore_index, opts.label_smoothing,
                                         opts.softcap, opts.algorithm, opts.loss)
    rows = combine(stats, shard, opts, x.dtype)
    ignored = t == opts.ignore_index
    rows[:, 0].masked_fill_(ignored, 0.0)  # an ignored row's lse is 0, as cross_entropy_fwd reports it
    rows[:, 2] = weights.at(t, opts.ignore_index)
    loss = _ops.cross_entropy_shard_loss(rows, t, weights.total, shard.V, opts.ignore_index, opts.label_smoothing,
                                         opts.z_loss, opts.loss, opts.loss_param)
    return loss, rows


def shard_backward(grad_loss, grad_lse, x, t, weights: ClassWeights, rows, shard: VocabShard, opts: CeOptions):
    """d loss / d local logits (x's dtype), from the global rows: one pass, no communication."""
    return _ops.cross_entropy_shard_bwd(grad_loss, grad_lse, x, t, weights.local, rows, weights.total, shard.start,
                                        shard.V, opts.ignore_index, opts.label_smoothing, opts.z_loss, opts.softcap,
                                        opts.loss, opts.loss_param)


def target_logit(x: torch.Tensor, t: torch.Tensor, shard: VocabShard, opts: CeOptions) -> torch.Tensor:
    """The global (softcapped) target logit of each row, float64 [N]: one gather and one all-reduce SUM (the
    backward of the comp-sum losses when only the lse was kept)."""
    tl = t - shard.start
    owned = (t != opts.ignore_index) & (tl >= 0) & (tl < shard.size)
    xt = torch.zeros(t.shape, dtype=wire_dtype(x.dtype), device=x.device)
    if shard.size:
        v = x.gather(1, tl.clamp(0, shard.size - 1)[:, None]).squeeze(1).to(xt.dtype)
        if opts.softcap is not None:
            v = torch.where(v == float("-inf"), v, torch.tanh(v / opts.softcap) * opts.softcap)
        xt = torch.where(owned, v, xt)
    dist.all_reduce(xt, op=dist.ReduceOp.SUM, group=shard.group)
    return xt.to(torch.float64)


def check_targets(fn: str, t: torch.Tensor, V: int, ignore_index: Optional[int]) -> None:
    """Targets (or, ignore_index None, tokens) in [0, V) of the global vocabulary."""
    bad = (t < 0) | (t >= V)
    if ignore_index is not None:
        bad &= t != ignore_index
    if t.device.type == "cpu":
        if bool(bad.any()):
            pos = int(bad.nonzero()[0, 0])
            what = "token" if ignore_index is None else "target"
            tail = "" if ignore_index is None else f" (and is not ignore_index={ignore_index})"
            raise IndexError(f"{fn}: {what} {int(t[pos])} at position {pos} is out of range for a global "
                             f"vocabulary of {V}{tail}")
    else:  # no host sync on the device: an asynchronous assert
        what = "token" if ignore_index is None else "target"
        torch._assert_async(~bad.any(), f"{fn}: {what} out of range for the global vocabulary")


class VocabParallelCE(torch.autograd.Function):
    """Per-row losses (float64 [N]) and lse of local logits [N, C]; the gradient flows to the local logits only."""

    @staticmethod
    def forward(ctx, x, t, weights, shard, opts):
        loss, rows = shard_forward(x, t, weights, shard, opts)
        ctx.save_for_backward(x, t, rows)
        ctx.meta = (weights, shard, opts)
        lse = rows[:, 0].clone()
        ctx.mark_non_differentiable(lse)
        return loss, lse

    @staticmethod
    def backward(ctx, grad_loss, _grad_lse):
        x, t, rows = ctx.saved_tensors
        weights, shard, opts = ctx.meta
        g = shard_backward(grad_loss.to(torch.float64).contiguous(), None, x, t, weights, rows, shard, opts)
        return g, None, None, None, None


class VocabParallelLinearCE(torch.autograd.Function):
    """Linear cross-entropy with the head's rows (and bias) sharded over the vocabulary: token chunks as in
    :mod:`fastloss._linear_ce`. Per chunk the local logits (one GEMM), the shard pass, the collective, and -- when
    gradients are wanted and the caller reduces the rows with one weight for all (mean / sum) -- the gradient pass
    for an incoming gradient of 1 per row and the two backward GEMMs right away; the backward then only rescales.
    d input is all-reduced once at the end. Otherwise the rows are kept and the backward recomputes the logits."""

    @staticmethod
    def forward(ctx, h, W, b, t, weights, shard, opts, uniform, chunk_rows, want):
        N = h.shape[0]
        precompute = uniform and any(want)
        scale = torch.ones(N, dtype=torch.float64, device=h.device) if precompute else None
        loss = torch.empty(N, dtype=torch.float64, device=h.device)
        rows = torch.empty((N, 4), dtype=torch.float64, device=h.device)
        grads = _GradAcc(h, W, b, want) if precompute else None
        for s in range(0, N, chunk_rows):
            e = min(N, s + chunk_rows)
            x = torch.nn.functional.linear(h[s:e], W, b)
            loss[s:e], rows[s:e] = shard_forward(x, t[s:e], weights, shard, opts)
            if precompute:
                grads.add(shard_backward(scale[s:e], None, x, t[s:e], weights, rows[s:e], shard, opts), s, e)
            del x
        ctx.meta = (weights, shard, opts, chunk_rows, want, precompute)
        if precompute:
            ctx.save_for_backward(*grads.finish(shard.group))
        else:
            ctx.save_for_backward(h, W, b, t, rows)
        lse = rows[:, 0].clone()
        ctx.mark_non_differentiable(lse)
        return loss, lse

    @staticmethod
    def backward(ctx, grad_loss, _grad_lse):
        weights, shard, opts, chunk_rows, want, precompute = ctx.meta
        if precompute:  # the forward's gradients are for an incoming gradient of 1 on every row
            gh, gW, gb = ctx.saved_tensors
            g = grad_loss.reshape(-1)[:1].reshape(())  # mean / sum: every row's incoming gradient is the same
            if grad_loss.numel() == 0:
                g = torch.zeros((), dtype=torch.float64, device=grad_loss.device)
            out = [None if v is None else v * g.to(v.dtype) for v in (gh, gW, gb)]
        else:
            h, W, b, t, rows = ctx.saved_tensors
            gl = grad_loss.to(torch.float64).contiguous()
            grads = _GradAcc(h, W, b, want)
            for s in range(0, h.shape[0], chunk_rows):
                e = min(h.shape[0], s + chunk_rows)
                x = torch.nn.functional.linear(h[s:e], W, b)
                grads.add(shard_backward(gl[s:e], None, x, t[s:e], weights, rows[s:e], shard, opts), s, e)
            out = list(grads.finish(shard.group))
        return (*out,) + (None,) * 7


def linear_rows(hidden, local_weight, local_bias, t, weights, shard, opts, uniform: bool, chunk_size):
    """Per-row losses and lse of ``hidden @ W_r.T (+ b_r)`` over the sharded vocabulary (local tensors);
    ``uniform``: the caller reduces the rows with one weight for all (mean / sum)."""
    from ._linear_ce import resolve_chunk_rows

    h = hidden.reshape(-1, hidden.shape[-1]).contiguous()
    want = (hidden.requires_grad, local_weight.requires_grad, local_bias is not None and local_bias.requires_grad)
    if not torch.is_grad_enabled():
        want = (False, False, False)
    chunk_rows = resolve_chunk_rows(chunk_size, h.shape[0], max(shard.largest, 1), hidden.dtype, hidden.device)
    return VocabParallelLinearCE.apply(h, local_weight.contiguous(), local_bias, t.contiguous(), weights, shard,
                                       opts, uniform, chunk_rows, want)


class _GradAcc:
    """d h (this rank's partial, all-reduced at the end), d W_r and d b_r (local, float32 accumulation)."""

    def __init__(self, h, W, b, want):
        acc = wire_dtype(h.dtype)
        self.h, self.W, self.b = h, W, b
        self.gh = torch.zeros(h.shape, dtype=acc, device=h.device) if want[0] else None
        self.gW = torch.zeros(W.shape, dtype=acc, device=W.device) if want[1] else None
        self.gb = torch.zeros(W.shape[0], dtype=acc, device=W.device) if (b is not None and want[2]) else None

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


# ---------------------------------------------------------------- token log-probabilities (RL policies)


def _pack8(v: torch.Tensor, wd: torch.dtype) -> torch.Tensor:
    """An 8-byte column (float64 or int64 [n]) as columns of the wire dtype, bit-exact: [n, 8 // itemsize]."""
    n = v.shape[0]
    return v.contiguous().view(wd).reshape(n, 8 // torch.empty((), dtype=wd).element_size())


def _unpack8(cols: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[world, n, k] wire columns back to an 8-byte dtype [world, n]."""
    world, n = cols.shape[0], cols.shape[1]
    return cols.contiguous().view(dtype).reshape(world, n)


def logprobs_forward(x, t, shard: VocabShard, temperature: float, entropy: bool, stats: bool):
    """token_logprobs_fwd over a sharded vocabulary. Local logits x [N, C] (classes [start, start + C) of V),
    tokens t [N] indexing the whole vocabulary -> the whole vocabulary's float64 rows, bitwise the same on every
    rank: (logprobs, entropy ([0] unless entropy), lse, stats ([N, 2] / [0, 2]), argmax (int64 [N] / [0])).

    One pass of fastloss's log-prob kernel over the local logits gives the slice's lse_r and, as asked, the
    entropy H_r of its own softmax, log sum p_r^2, the tempered logit sum and the argmax; one all-gather per token
    of lse_r (float64, bit-packed: the combination subtracts numbers of its size), the token's raw logit if the
    slice holds it, H_r, ... and the argmax's value and global index; then, merged in rank order, with
    q_r = exp(lse_r - lse): lse = log sum_r exp(lse_r), log p_t = x_t / T - lse, H = sum_r q_r (H_r - log q_r)
    (the entropy of a mixture of the slices' softmaxes), log sum p^2 = log sum_r q_r^2 sum p_r^2, the mean over all
    V, and the first index of the largest value (NaN first, as torch.argmax)."""
    n, C = t.shape[0], shard.size
    if x.shape[0] != n:  # (checked before the collective, on every rank alike)
        raise ValueError(f"fastloss.token_logprobs: `tokens` has {n} rows, the logits {x.shape[0]}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"fastloss.token_logprobs: `temperature` must be a finite float > 0, got {temperature!r}")
    wd = wire_dtype(x.dtype)
    tl = t - shard.start
    owned = (tl >= 0) & (tl < C)
    if C:
        tc = tl.clamp(0, C - 1)
        _, ent_r, lse_r, st_r, am_r = _ops.token_logprobs_fwd(x, tc, temperature, entropy, stats)
        xt = torch.where(owned, x.gather(1, tc[:, None]).squeeze(1).to(wd), torch.zeros((), dtype=wd))
    else:  # an empty slice (V smaller than the group): contributes nothing
        lse_r = torch.full((n,), float("-inf"), dtype=torch.float64, device=x.device)
        ent_r, xt = torch.zeros_like(lse_r), torch.zeros((n,), dtype=wd, device=x.device)
        st_r = torch.stack([lse_r, torch.zeros_like(lse_r)], 1)
        am_r = torch.zeros((n,), dtype=torch.int64, device=x.device)
    empty = lse_r == float("-inf")  # a slice whose row is all -inf (or no slice): weight 0, nothing else read
    cols = [xt]
    if entropy:
        cols.append(torch.where(empty, 0.0, ent_r).to(wd))
    if stats:
        amax = x.gather(1, am_r[:, None]).squeeze(1).to(wd) if C else torch.full((n,), float("-inf"), dtype=wd,
                                                                               device=x.device)
        cols += [torch.where(empty, float("-inf"), st_r[:, 0]).to(wd), (st_r[:, 1] * C).to(wd), amax]
    k = len(cols)
    packed = [_pack8(lse_r.to(torch.float64), wd)] + ([_pack8(am_r + shard.start, wd)] if stats else [])
    wire = torch.cat([c.reshape(n, 1) for c in cols] + packed, 1).contiguous()
    world = dist.get_world_size(shard.group)
    got = wire.new_empty((world * n, wire.shape[1]))
    _all_gather(got, wire, shard.group)
    got = got.view(world, n, wire.shape[1])
    g = got[..., :k].to(torch.float64)
    w8 = packed[0].shape[1]
    L = _unpack8(got[..., k:k + w8], torch.float64)
    M = L.amax(0) if n else L.new_empty((0,))
    Ms = torch.where(torch.isfinite(M), M, torch.zeros_like(M))
    S = torch.exp(L - Ms).sum(0)
    lse = torch.where(torch.isfinite(M), torch.log(S) + Ms, M)
    lp = g[..., 0].sum(0) * (1.0 / temperature) - lse
    none = L == float("-inf")
    log_q = L - lse
    if entropy:
        q = torch.exp(log_q)
        H = torch.where(none, 0.0, q * (g[..., 1] - log_q)).sum(0)
        # NaN rows stay NaN; a row of -inf only has no distribution: NaN, as the single-device kernel
        H = torch.where(torch.isnan(lse) | (lse == float("-inf")), float("nan"), H)
    else:
        H = lse.new_empty((0,))
    if not stats:
        return lp, H, lse, lse.new_empty((0, 2)), torch.empty((0,), dtype=torch.int64, device=x.device)
    c = 2 if entropy else 1
    lsq = torch.logsumexp(g[..., c] + 2 * log_q, 0)
    mean = g[..., c + 1].sum(0) / shard.V
    val = g[..., c + 2]
    gidx = _unpack8(got[..., k + w8:], torch.int64)
    best_v, best_i = val[0], gidx[0]
    for r in range(1, world):  # ranks hold increasing classes: a tie keeps the earlier (smaller) index
        better = (val[r] > best_v) | (torch.isnan(val[r]) & ~torch.isnan(best_v))
        best_v, best_i = torch.where(better, val[r], best_v), torch.where(better, gidx[r], best_i)
    return lp, H, lse, torch.stack([lsq, mean], 1), best_i


def logprobs_backward(g_lp, g_h, x, t, lse, entropy, shard: VocabShard, temperature: float):
    """d (sum g_lp log p_t + g_h H) / d local logits from the whole vocabulary's lse and entropy: one pass of the
    log-prob backward kernel over the slice (the token's + g_lp only where the slice holds it), no communication."""
    if shard.size == 0:
        return torch.empty_like(x)
    return _ops.token_logprobs_bwd(g_lp, g_h, x, t, lse, entropy, temperature, shard.start)


class VocabParallelLogprobs(torch.autograd.Function):
    """(logprobs, entropy, stats, argmax) of local logits [N, C] over the sharded vocabulary; the gradient of the
    first two flows to the local logits only (no communication)."""

    @staticmethod
    def forward(ctx, x, t, shard, temperature, entropy, stats):
        ctx.set_materialize_grads(False)  # an output nobody differentiates adds nothing to the backward
        lp, ent, lse, st, am = logprobs_forward(x, t, shard, temperature, entropy, stats)
        ctx.save_for_backward(x, t, lse, ent)
        ctx.meta = (shard, temperature)
        ctx.mark_non_differentiable(st, am)
        return lp, ent, st, am

    @staticmethod
    def backward(ctx, g_lp, g_ent, _g_st, _g_am):
        x, t, lse, ent = ctx.saved_tensors
        shard, temperature = ctx.meta
        if g_ent is not None and ent.shape[0] != x.shape[0]:
            g_ent = None
        if g_lp is None and g_ent is None:
            return (None,) * 6
        glp = None if g_lp is None else g_lp.to(torch.float64).contiguous()
        gh = None if g_ent is None else g_ent.to(torch.float64).contiguous()
        return (logprobs_backward(glp, gh, x, t, lse, ent, shard, temperature),) + (None,) * 5


def _capped(x: torch.Tensor, softcap: Optional[float]) -> torch.Tensor:
    return x if softcap is None else torch.tanh(x / softcap) * softcap  # (-inf -> -softcap, as the model's code)


class VocabParallelLinearLogprobs(torch.autograd.Function):
    """linear_token_logprobs with the head's rows (and bias) sharded over the vocabulary: token chunks as in
    :mod:`fastloss._linear_policy` (the same head and gradient helpers of :mod:`fastloss._linear_ce`: the same
    compute dtype and accumulation). Per
    chunk the local logits (one GEMM; softcapped by torch when asked) and :func:`logprobs_forward` (one log-prob
    pass, one all-gather). The backward recomputes each chunk's local logits, runs :func:`logprobs_backward` and
    the two GEMMs; d hidden is all-reduced once at the end."""

    @staticmethod
    def forward(ctx, h, W, b, t, shard, temperature, entropy, stats, softcap, chunk_rows, want):
        from ._linear_ce import Head, no_autocast

        ctx.set_materialize_grads(False)
        N = h.shape[0]
        f64 = dict(dtype=torch.float64, device=h.device)
        lp, lse = torch.empty(N, **f64), torch.empty(N, **f64)
        ent = torch.empty(N if entropy else 0, **f64)
        st = torch.empty((N if stats else 0, 2), **f64)
        am = torch.empty(N if stats else 0, dtype=torch.int64, device=h.device)
        head = Head(h, W, b)
        for s in range(0, N, chunk_rows):  # (the same chunks on every rank: the hidden states are replicated)
            e = min(N, s + chunk_rows)
            with no_autocast(h.device):
                x = _capped(head.logits(head.rows(s, e)), softcap).contiguous()
            c_lp, c_ent, c_lse, c_st, c_am = logprobs_forward(x, t[s:e], shard, temperature, entropy, stats)
            lp[s:e], lse[s:e] = c_lp, c_lse
            if entropy:
                ent[s:e] = c_ent
            if stats:
                st[s:e], am[s:e] = c_st, c_am
            del x
        ctx.save_for_backward(h, W, b, t, lse, ent)
        ctx.meta = (shard, temperature, softcap, chunk_rows, want)
        ctx.mark_non_differentiable(st, am)
        return lp, ent, st, am

    @staticmethod
    def backward(ctx, g_lp, g_ent, _g_st, _g_am):
        from ._linear_ce import Head, HeadGrads, no_autocast

        h, W, b, t, lse, ent = ctx.saved_tensors
        shard, temperature, softcap, chunk_rows, want = ctx.meta
        if g_ent is not None and ent.shape[0] != h.shape[0]:
            g_ent = None  # the entropy was not computed: nothing flows from it
        if g_lp is None and g_ent is None:
            return (None,) * 11
        glp = None if g_lp is None else g_lp.to(torch.float64).contiguous()
        gh = None if g_ent is None else g_ent.to(torch.float64).contiguous()
        head = Head(h, W, b)
        grads = HeadGrads(head, W, want)
        for s in range(0, h.shape[0], chunk_rows):
            e = min(h.shape[0], s + chunk_rows)
            with no_autocast(h.device):
                hc = head.rows(s, e)
                x = _capped(head.logits(hc), softcap).contiguous()
                g = logprobs_backward(None if glp is None else glp[s:e], None if gh is None else gh[s:e], x, t[s:e],
                                      lse[s:e], ent[s:e] if gh is not None else ent, shard, temperature)
                if softcap is not None:  # d cap(z) / dz = 1 - (cap(z) / softcap)^2
                    g = g * (1 - (x / softcap) ** 2)
                grads.add_chunk(g, hc, head, s, e)
        if grads.gh is not None:  # d hidden: the one collective, summed in float32 (float64) whatever h's dtype
            acc = grads.gh.to(wire_dtype(grads.gh.dtype))
            dist.all_reduce(acc, op=dist.ReduceOp.SUM, group=shard.group)
            if acc is not grads.gh:
                grads.gh.copy_(acc)
        return (*grads.result(h, W, b),) + (None,) * 8


def linear_logprobs(hidden, local_weight, local_bias, t, shard, temperature, entropy, stats, softcap, chunk_size):
    """(logprobs, entropy, stats, argmax) float64 / int64 rows of ``hidden @ W_r.T (+ b_r)`` over the sharded
    vocabulary (local tensors, the hidden states replicated over the group)."""
    from ._linear_ce import resolve_chunk_rows

    h = hidden.reshape(-1, hidden.shape[-1]).contiguous()
    want = (hidden.requires_grad, local_weight.requires_grad, local_bias is not None and local_bias.requires_grad)
    if not torch.is_grad_enabled():
        want = (False, False, False)
    # the backward holds the chunk's logits and their gradient (and the softcap's factor): 2 or 3 buffers
    chunk_rows = resolve_chunk_rows(chunk_size, h.shape[0], max(shard.largest, 1), hidden.dtype, hidden.device,
                                    fn="linear_token_logprobs", buffers=2 if softcap is None else 3)
    return VocabParallelLinearLogprobs.apply(h, local_weight.contiguous(), local_bias, t.contiguous(), shard,
                                             temperature, entropy, stats, softcap, chunk_rows, want)

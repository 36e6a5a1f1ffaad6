"""Chunked linear distillation and token log-probabilities: the losses of ``hidden @ W.T (+ b)`` without the N x V
logits, on the chunk machinery of :mod:`fastloss._linear_ce` (chunk sizing, float32 accumulation of d W, the
backward GEMMs of a chunk).

Distillation with "mean" / "sum" knows its incoming gradient up to one scalar, so each chunk's student logits are
turned in place into d loss / d logits during the forward (``distill_fwd_inplace_grad``) and the backward only scales
the stored gradients, as the linear cross-entropy does. "none" and the token log-probabilities (per-token outputs)
keep what the backward needs -- per-row statistics, never logits -- and recompute each chunk's logits there.
"""

from __future__ import annotations

import math

import torch

from torch.autograd.function import once_differentiable

from . import _vocab_parallel
from ._linear_ce import Head, HeadGrads, _acc_dtype, no_autocast, resolve_chunk_rows
from ._common import (check_temperature, check_tensor, check_tokens, distill_options, is_dtensor, logprob_outputs,
                      out_dtype, reduce_rows, refuse_dtensors, unmasked_count)


def _check_head(fn: str, hname: str, wname: str, bname: str, h, W, b) -> None:
    check_tensor(fn, hname, h)
    check_tensor(fn, wname, W)
    if W.dim() != 2:
        raise ValueError(f"fastloss.{fn}: `{wname}` must have shape (V, D), got {tuple(W.shape)}")
    if h.dim() == 0 or h.shape[-1] != W.shape[1]:
        raise ValueError(f"fastloss.{fn}: `{hname}` must have shape (..., {W.shape[1]}) to match `{wname}` "
                         f"{tuple(W.shape)}, got {tuple(h.shape)}")
    if h.dtype != W.dtype:
        raise ValueError(f"fastloss.{fn}: `{hname}` ({h.dtype}) and `{wname}` ({W.dtype}) must have the same dtype")
    if b is not None and tuple(b.shape) != (W.shape[0],):
        raise ValueError(f"fastloss.{fn}: `{bname}` must have shape ({W.shape[0]},), got {tuple(b.shape)}")


def _wants(*tensors) -> tuple:
    if not torch.is_grad_enabled():
        return tuple(False for _ in tensors)
    return tuple(t is not None and t.requires_grad for t in tensors)


def _softcap_(logits, softcap):
    """logits <- softcap * tanh(logits / softcap), in place (the formula of Gemma's head and of TRL: a -inf logit
    gives -softcap)."""
    return logits.div_(softcap).tanh_().mul_(softcap)


def _softcap_keep_grad_(logits, softcap):
    """:func:`_softcap_` that also returns d cap / d logits = 1 - tanh^2 (a second chunk-sized buffer)."""
    t = logits.div_(softcap).tanh_()
    dcap = torch.addcmul(torch.ones_like(t), t, t, value=-1)
    t.mul_(softcap)
    return dcap


def _check_softcap(fn: str, name: str, softcap):
    if softcap is None:
        return None
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)) or not 0 < softcap < math.inf:
        raise ValueError(f"fastloss.{fn}: `{name}` must be a finite value > 0 (or None), got {softcap!r}")
    return float(softcap)


# ---------------------------------------------------------------- distillation


def _distill_chunks(student: Head, teacher: Head, t, opts, chunk_rows, scale, want, W, N, ent_rows=None,
                    caps=(None, None)):
    """One pass over token chunks: per-row losses, and (scale given) the student's gradients; with ent_rows (float64
    [N]) the student's entropy per row from the same kernels (distill_fwd*'s student_entropy). caps: the student's
    and the teacher's softcap (or None), applied to each chunk's logits in place."""
    ops = torch.ops.fastloss
    ent = ent_rows is not None
    loss_rows = torch.empty(N, dtype=torch.float64, device=student.h.device)
    grads = HeadGrads(student, W, want) if scale is not None else None
    per_row = scale is not None and scale.numel() == N and N != 1
    for s in range(0, N, chunk_rows):
        e = min(N, s + chunk_rows)
        hc = student.rows(s, e)
        logits = student.logits(hc)
        dcap = None
        if caps[0] is not None:
            if grads is not None:
                dcap = _softcap_keep_grad_(logits, caps[0])
            else:
                _softcap_(logits, caps[0])
        with torch.no_grad():
            tlogits = teacher.logits(teacher.rows(s, e)).to(logits.dtype)
            if caps[1] is not None:
                _softcap_(tlogits, caps[1])
        tc = t[s:e] if t is not None else None
        if grads is not None:
            sc = scale[s:e] if per_row else scale
            rows, stats = ops.distill_fwd_inplace_grad(logits, tlogits, tc, sc, *opts, ent)
            del tlogits
            if dcap is not None:  # d loss / d capped logits -> d loss / d logits
                logits.mul_(dcap)
                del dcap
            grads.add_chunk(logits, hc, student, s, e)  # logits now hold d loss / d logits, scaled
        else:
            rows, stats = ops.distill_fwd(logits, tlogits, tc, *opts, ent)
        loss_rows[s:e] = rows
        if ent:
            ent_rows[s:e] = stats[:, 4]  # kStudentEntropy
        del logits  # one chunk's logits alive at a time
    return loss_rows, grads


class _LinearDistillation(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hs, Ws, bs, ht, Wt, bt, t, opts, reduction, chunk_rows, denom, lead, want,
                student_entropy=False, caps=(None, None)):
        N = hs.shape[0]
        # the student's entropy per row (empty unless asked): from the forward's chunks, no gradient
        ent_rows = torch.zeros(N if student_entropy else 0, dtype=torch.float64, device=hs.device)
        precompute = reduction != "none" and any(want)
        scale = None
        if precompute:
            acc = _acc_dtype(hs.dtype)
            scale = ((1.0 / denom).to(acc).reshape(1) if reduction == "mean"
                     else torch.ones(1, dtype=acc, device=hs.device))
        with no_autocast(hs.device):
            rows, grads = _distill_chunks(Head(hs, Ws, bs), Head(ht, Wt, bt), t, opts, chunk_rows, scale, want,
                                          Ws, N, ent_rows if student_entropy else None, caps)
        ctx.precompute, ctx.want, ctx.opts, ctx.chunk_rows, ctx.scale = precompute, want, opts, chunk_rows, scale
        ctx.caps = caps
        ctx.consumed = False
        if any(want):
            # float16 gradients stay float32 until the incoming gradient (a GradScaler's factor) has scaled them:
            # entries of order 1 / N would underflow in float16 first.
            # (a ctx attribute, not a saved tensor: the backward scales them in place, once)
            ctx.grads = grads.result(hs, Ws, bs, keep_acc=hs.dtype == torch.float16) if precompute else None
            ctx.save_for_backward(hs, Ws, bs, ht, Wt, bt, t)
        ctx.mark_non_differentiable(ent_rows)
        return reduce_rows(rows, reduction, lead, denom), ent_rows

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, _grad_entropy=None):
        hs, Ws, bs, ht, Wt, bt, t = ctx.saved_tensors
        if ctx.precompute and not ctx.consumed:
            ctx.consumed = True  # a second backward (retain_graph) recomputes below instead of scaling twice
            (gh, gW, gb), ctx.grads = ctx.grads, None
            g = grad_loss.reshape(())
            grads = [None if x is None else x.mul_(g.to(x.dtype)).to(like.dtype)
                     for x, like in ((gh, hs), (gW, Ws), (gb, bs))]
        else:
            scale = grad_loss.reshape(-1).to(_acc_dtype(hs.dtype))
            if ctx.precompute:
                scale = scale * ctx.scale
            with no_autocast(hs.device):
                _, g = _distill_chunks(Head(hs, Ws, bs), Head(ht, Wt, bt), t, ctx.opts, ctx.chunk_rows, scale,
                                       ctx.want, Ws, hs.shape[0], caps=ctx.caps)
            grads = list(g.result(hs, Ws, bs))
        return (*grads, None, None, None, None, None, None, None, None, None, None, None, None)


def linear_distillation_loss_impl(hs, Ws, ht, Wt, bs, bt, divergence, beta, temperature, target, ignore_index,
                                  reduction, hard_weight, chunk_size, return_student_entropy=False,
                                  student_softcap=None, teacher_softcap=None):
    fn = "linear_distillation_loss"
    refuse_dtensors(fn, student_hidden=hs, student_weight=Ws, student_bias=bs, teacher_hidden=ht, teacher_weight=Wt,
                    teacher_bias=bt, target=target)
    _check_head(fn, "student_hidden", "student_weight", "student_bias", hs, Ws, bs)
    _check_head(fn, "teacher_hidden", "teacher_weight", "teacher_bias", ht, Wt, bt)
    if Ws.shape[0] != Wt.shape[0]:
        raise ValueError(f"fastloss.{fn}: the student's vocabulary (`student_weight` {tuple(Ws.shape)}) and the "
                         f"teacher's (`teacher_weight` {tuple(Wt.shape)}) must have the same size")
    lead = tuple(hs.shape[:-1])
    if tuple(ht.shape[:-1]) != lead:
        raise ValueError(f"fastloss.{fn}: `teacher_hidden` must have the leading shape of `student_hidden` {lead}, "
                         f"got {tuple(ht.shape[:-1])}")
    beta, temperature, hard_weight = distill_options(fn, divergence, beta, temperature, reduction, hard_weight,
                                                      target)
    if target is not None:
        check_tokens(fn, "target", target, lead)
    h = hs.reshape(-1, hs.shape[-1]).contiguous()
    N, V = h.shape[0], Ws.shape[0]
    t = target.reshape(-1) if target is not None else None
    want = _wants(hs, Ws, bs)
    caps = (_check_softcap(fn, "student_softcap", student_softcap),
            _check_softcap(fn, "teacher_softcap", teacher_softcap))
    # the student's and the teacher's chunk logits, and d cap / d logits beside them with a student softcap
    chunk_rows = resolve_chunk_rows(chunk_size, N, V, hs.dtype, h.device, fn=fn,
                                    buffers=2 if caps[0] is None else 3)
    denom = unmasked_count(reduction, t, int(ignore_index), N, h.device)
    opts = (divergence, beta, temperature, int(ignore_index), hard_weight)
    ent = bool(return_student_entropy)
    out, ent_rows = _LinearDistillation.apply(h, Ws.contiguous(), bs,
                                              ht.detach().reshape(-1, ht.shape[-1]).contiguous(),
                                              Wt.detach().contiguous(), bt.detach() if bt is not None else None, t,
                                              opts, reduction, chunk_rows, denom, lead, want, ent, caps)
    out = out.to(hs.dtype)
    if not ent:
        return out
    return out, ent_rows.to(out_dtype(hs.dtype)).reshape(lead)


# ---------------------------------------------------------------- token log-probabilities


class _LinearTokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, W, b, tokens, temperature, entropy, chunk_rows, want, stats=False, softcap=None):
        # Outputs nobody differentiates get no gradient (None, not zeros): an entropy computed for logging adds no
        # term to the backward (TRL's ChunkedLogProbFunction does the same).
        ctx.set_materialize_grads(False)
        with no_autocast(h.device):
            return _LinearTokenLogprobs._forward(ctx, h, W, b, tokens, temperature, entropy, chunk_rows, want, stats,
                                                 softcap)

    @staticmethod
    def _forward(ctx, h, W, b, tokens, temperature, entropy, chunk_rows, want, stats, softcap):
        ops = torch.ops.fastloss
        head = Head(h, W, b)
        N = h.shape[0]
        dev = h.device
        lp = torch.empty(N, dtype=torch.float64, device=dev)
        ent = torch.empty(N if entropy else 0, dtype=torch.float64, device=dev)
        lse = torch.empty(N, dtype=torch.float64, device=dev)
        st = torch.empty((N if stats else 0, 2), dtype=torch.float64, device=dev)
        am = torch.empty(N if stats else 0, dtype=torch.int64, device=dev)
        for s in range(0, N, chunk_rows):
            e = min(N, s + chunk_rows)
            logits = head.logits(head.rows(s, e))
            if softcap is not None:
                _softcap_(logits, softcap)
            lp_c, ent_c, lse_c, st_c, am_c = ops.token_logprobs_fwd(logits, tokens[s:e], temperature, entropy, stats)
            lp[s:e], lse[s:e] = lp_c, lse_c
            if entropy:
                ent[s:e] = ent_c
            if stats:  # the statistics of the same pass over the chunk's logits
                st[s:e], am[s:e] = st_c, am_c
            del logits
        ctx.args = (temperature, chunk_rows, want, entropy, softcap, dev)
        if any(want):
            ctx.save_for_backward(h, W, b, tokens, lse, ent)
        ctx.mark_non_differentiable(lse, st, am)
        return lp, ent, lse, st, am

    @staticmethod
    @once_differentiable
    def backward(ctx, g_lp, g_ent, _g_lse, _g_st, _g_am):
        if g_lp is None and (g_ent is None or not ctx.args[3]):
            return (None,) * 10
        with no_autocast(ctx.args[5]):
            return _LinearTokenLogprobs._backward(ctx, g_lp, g_ent)

    @staticmethod
    def _backward(ctx, g_lp, g_ent):
        ops = torch.ops.fastloss
        temperature, chunk_rows, want, entropy, softcap, _ = ctx.args
        h, W, b, tokens, lse, ent = ctx.saved_tensors
        head = Head(h, W, b)
        grads = HeadGrads(head, W, want)
        N = h.shape[0]
        for s in range(0, N, chunk_rows):
            e = min(N, s + chunk_rows)
            hc = head.rows(s, e)
            logits = head.logits(hc)
            if softcap is not None:  # d cap / d logits = 1 - tanh^2, kept beside the chunk (its budget counts two)
                dcap = _softcap_keep_grad_(logits, softcap)
            ops.token_logprobs_bwd_(logits, g_lp[s:e] if g_lp is not None else None,
                                    g_ent[s:e] if (entropy and g_ent is not None) else None, tokens[s:e], lse[s:e],
                                    ent[s:e] if entropy else ent, temperature)
            if softcap is not None:
                logits.mul_(dcap)
                del dcap
            grads.add_chunk(logits, hc, head, s, e)
            del logits
        return (*grads.result(h, W, b), None, None, None, None, None, None, None)


def linear_token_logprobs_impl(hidden, weight, tokens, bias, temperature, return_entropy, chunk_size,
                               return_stats=False, softcap=None):
    fn = "linear_token_logprobs"
    _check_head(fn, "hidden", "weight", "bias", hidden, weight, bias)
    lead = tuple(hidden.shape[:-1])
    check_tokens(fn, "tokens", tokens, lead)
    temperature = check_temperature(fn, temperature)
    softcap = _check_softcap(fn, "softcap", softcap)
    if is_dtensor(weight) or is_dtensor(hidden):  # a DTensor head (tensor parallelism)
        from . import _dtensor

        ops = _dtensor.LinearOperands(fn, hidden, weight, bias, tokens, None, None,
                                      ("hidden", "weight", "bias", "tokens"))
        if ops.shard is None:  # replicated: the ordinary path on the local tensors
            return ops.wrap(linear_token_logprobs_impl(ops.h, ops.W, ops.t, ops.b, temperature, return_entropy,
                                                       chunk_size, return_stats, softcap))
        lp, ent, st, am = _vocab_parallel.linear_logprobs(ops.h, ops.W, ops.b, ops.t.reshape(-1), ops.shard,
                                                          temperature, bool(return_entropy), bool(return_stats),
                                                          softcap, chunk_size)
        return ops.wrap(logprob_outputs(lp, ent, st, am, hidden.dtype, tuple(ops.h.shape[:-1]), return_entropy,
                                         return_stats))
    h = hidden.reshape(-1, hidden.shape[-1]).contiguous()
    N, V = h.shape[0], weight.shape[0]
    # with a softcap the backward keeps d cap / d logits beside each chunk: two chunk buffers in the budget
    chunk_rows = resolve_chunk_rows(chunk_size, N, V, hidden.dtype, h.device, fn=fn,
                                    buffers=1 if softcap is None else 2)
    want = _wants(hidden, weight, bias)
    lp, ent, _, st, am = _LinearTokenLogprobs.apply(h, weight.contiguous(), bias, tokens.reshape(-1), temperature,
                                                    bool(return_entropy), chunk_rows, want, bool(return_stats),
                                                    softcap)
    return logprob_outputs(lp, ent, st, am, hidden.dtype, lead, return_entropy, return_stats)

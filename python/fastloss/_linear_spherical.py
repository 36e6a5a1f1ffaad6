"""The spherical losses of ``input @ W.T (+ bias)`` computed exactly without the logits.

A spherical loss sees a row of logits o = W h + b only through o_c, its mean mu and its variance var
(fastloss/spherical_math.h). With the head augmented for the bias, w~_k = [w_k, b_k] and h~ = [h, 1]:

    o_c       = w~_c . h~                                (a gather: N D)
    mu - o_c  = (m~ - w~_c) . h~,   m~ = mean_k w~_k      (centred: no difference of two large dot products)
    var       = h~^T C h~,          C = (1/V) sum_k (w~_k - m~)(w~_k - m~)^T, the head's centred Gram matrix

and with per-row partials (alpha, beta, gamma) = g (dL/do_c, dL/dmu, dL/dvar) the exact gradients are

    d h~   = alpha w~_c + beta m~ + 2 gamma C h~
    d w~_k = sum_{i: c_i = k} alpha_i h~_i + (1/V) sum_i beta_i h~_i + (2/V) (w~_k - m~) G,
    G      = sum_i gamma_i h~_i h~_i^T.

Cost with N rows, V classes, D = hidden size (+1 with a bias), in multiply-adds: the forward reads W twice (its
mean, then C by chunks of V rows: V D^2) and forms H~ C (N D^2); the backward forms G (N D^2), H~ C again (N D^2)
and d W by chunks ((W~ - m~) G: V D^2). In all 2 V D^2 + 3 N D^2 against the 3 N V D of any cross-entropy over a
linear head, so at N = 16384, D = 1024, V = 131072 about 19x fewer -- and nothing grows with N x V. The order of
products is the cheap one for the usual shapes (D << V, D << N): every N x V or V x V product is avoided, and
each D x D product is formed once. Memory beyond the inputs and the gradients: C and G ((D+1)^2), the gathered
target rows and H~ C (N x D each, like the hidden states), and one chunk of V rows of the head in the compute
dtype (64 MiB); d W is written chunk by chunk in W's dtype, never held in float32 whole.

bf16 / fp16 inputs compute in float32 (float64 stays float64).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch.autograd.function import once_differentiable

from ._common import reduce_rows
from ._linear_ce import no_autocast

# Head rows per chunk of the Gram / gradient passes: this many bytes of the chunk in the compute dtype.
CHUNK_BYTES = 64 << 20


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _aug(x: torch.Tensor, col: Optional[torch.Tensor]) -> torch.Tensor:
    """[x, col] along the last dimension (x itself without a bias)."""
    return x if col is None else torch.cat([x, col.unsqueeze(-1)], dim=-1)


def _chunks(V: int, width: int, acc: torch.dtype):
    rows = max(1, CHUNK_BYTES // max(1, width * torch.empty((), dtype=acc).element_size()))
    for s in range(0, V, rows):
        yield s, min(V, s + rows)


def _hidden_rows(h, bias, valid, acc):
    """h~ = [h, 1] (h without a bias) in the compute dtype, ignored rows zeroed: a non-finite hidden state of an
    ignored token must not reach the head's gradient through G or the target rows (0 * inf)."""
    hv = torch.where(valid.unsqueeze(1), h.to(acc), 0)
    return _aug(hv, None if bias is None else h.new_ones(h.shape[0], dtype=acc))


def _head_chunk(W, bias, s, e, acc, m):
    """Rows s..e of the augmented head, centred, in the compute dtype."""
    return _aug(W[s:e].to(acc), None if bias is None else bias[s:e].to(acc)) - m


class LinearSphericalFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, W, bias, t, loss, a, b, ignore_index, reduction, lead, denom):
        with no_autocast(h.device):  # the products in the compute dtype, whatever autocast the caller runs
            return LinearSphericalFunction._forward(ctx, h, W, bias, t, loss, a, b, ignore_index, reduction, lead,
                                                    denom)

    @staticmethod
    def _forward(ctx, h, W, bias, t, loss, a, b, ignore_index, reduction, lead, denom):
        acc = _acc_dtype(h.dtype)
        V = W.shape[0]
        valid = t != ignore_index
        tc = t.masked_fill(~valid, 0)
        ht = _hidden_rows(h, bias, valid, acc)
        width = ht.shape[1]
        m = _aug(W.sum(0, dtype=acc) / V, None if bias is None else bias.sum(dtype=acc) / V)
        C = torch.zeros(width, width, dtype=acc, device=h.device)
        for s, e in _chunks(V, width, acc):
            Wt = _head_chunk(W, bias, s, e, acc, m)
            C.addmm_(Wt.T, Wt)
        C.div_(V)
        wc = _aug(W[tc].to(acc), None if bias is None else bias[tc].to(acc))  # w~_c per row
        oc = (wc * ht).sum(1)
        dmu = ((m - wc) * ht).sum(1)
        var = ((ht @ C) * ht).sum(1).clamp_min_(0)
        stats = torch.stack([dmu, var, oc], 1).to(torch.float64)
        # The op checks the targets (in [0, V) or ignore_index; on the CPU before anything is returned, on CUDA by a
        # device assert) and gives ignored rows 0: loss and partials.
        rows, partials = torch.ops.fastloss.spherical_loss_terms(stats, t, V, loss, a, b, ignore_index)
        ctx.save_for_backward(h, W, bias, tc, valid, C, m, partials, denom)
        ctx.reduction = reduction
        return reduce_rows(rows, reduction, lead, denom)

    @staticmethod
    @once_differentiable  # the backward's products treat the saved partials as constants: no second derivative
    def backward(ctx, grad_out):
        with no_autocast(grad_out.device):
            return LinearSphericalFunction._backward(ctx, grad_out)

    @staticmethod
    def _backward(ctx, grad_out):
        h, W, bias, tc, valid, C, m, partials, denom = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        acc = C.dtype
        N, V = h.shape[0], W.shape[0]
        g = grad_out.reshape(-1).to(torch.float64)
        if ctx.reduction == "mean":
            g = g / denom  # inf when every row is ignored (denom 0): masked next, as F.cross_entropy's zero gradient
        g = torch.where(valid, g.expand(N) if g.numel() == 1 else g, 0)
        alpha, beta, gamma = (partials * g.unsqueeze(1)).to(acc).unbind(1)
        ht = _hidden_rows(h, bias, valid, acc)
        grad_h = grad_w = grad_b = None
        if need_h:
            wc = _aug(W[tc].to(acc), None if bias is None else bias[tc].to(acc))
            dh = alpha.unsqueeze(1) * wc + beta.unsqueeze(1) * m + (2 * gamma).unsqueeze(1) * (ht @ C)
            grad_h = dh[:, : h.shape[1]].to(h.dtype)
        if need_w or need_b:
            G = (ht * gamma.unsqueeze(1)).T @ ht
            G.mul_(2.0 / V)
            mean_term = (beta @ ht) / V  # (1/V) sum_i beta_i h~_i, the same for every class
            ah = alpha.unsqueeze(1) * ht
            grad_w = torch.empty_like(W) if need_w else None
            grad_b = torch.empty_like(bias) if need_b else None
            D = W.shape[1]
            for s, e in _chunks(V, ht.shape[1], acc):
                # One spare row after the chunk: the tokens whose target falls in the chunk add alpha h~ to their
                # row, all others to the spare one. No data-dependent shapes (the backward compiles without a
                # graph break) and no masked copy of alpha h~ per chunk.
                buf = torch.empty(e - s + 1, ht.shape[1], dtype=acc, device=h.device)
                chunk = buf[: e - s]
                torch.addmm(mean_term.unsqueeze(0), _head_chunk(W, bias, s, e, acc, m), G, out=chunk)
                buf.index_add_(0, torch.where((tc >= s) & (tc < e), tc - s, e - s), ah)
                if need_w:
                    grad_w[s:e] = chunk[:, :D]
                if need_b:
                    grad_b[s:e] = chunk[:, D]
        return grad_h, grad_w, grad_b, None, None, None, None, None, None, None, None


def linear_spherical_loss_impl(h, W, bias, t, loss, a, b, ignore_index, reduction, lead, denom):
    return LinearSphericalFunction.apply(h, W, bias, t, loss, a, b, ignore_index, reduction, lead, denom)

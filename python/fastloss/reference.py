"""Plain-PyTorch references that the tests compare fastloss against.

Two kinds:
  * ``*_reference``: torch's own ops evaluated in float64 (the ground truth for error norms);
  * ``online_lse_literal`` / ``two_pass_lse_literal``: literal float64 transcriptions of the two algorithms,
    element by element along the reduced dimension (vectorised over rows), to check that the kernels implement the
    algorithms they claim to and that the algorithms themselves agree with the definition.
"""

from __future__ import annotations

import math

import torch


def softmax_reference(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    return torch.softmax(x.double(), dim)


def log_softmax_reference(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    return torch.log_softmax(x.double(), dim)


def logsumexp_reference(x: torch.Tensor, dim: int = -1, keepdim: bool = False) -> torch.Tensor:
    return torch.logsumexp(x.double(), dim, keepdim=keepdim)


def online_lse_literal(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Milakov & Gimelshein: one pass keeping (m, d); m' = max(m, x), d' = d e^(m - m') + e^(x - m').

    m starts at the most negative finite double, so e^(m - m') is never e^(-inf - (-inf)).
    """
    rows = x.double().movedim(dim, -1)
    m = torch.full(rows.shape[:-1], -torch.finfo(torch.float64).max, dtype=torch.float64, device=x.device)
    d = torch.zeros_like(m)
    for j in range(rows.shape[-1]):
        xj = rows[..., j]
        m_new = torch.maximum(m, xj)
        d = d * torch.exp(m - m_new) + torch.exp(xj - m_new)
        m = m_new
    return m + torch.log(d)


def two_pass_lse_literal(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Dukhan & Ablavatski: e^x = p 2^n with n = round(x log2 e), p = e^(x - n ln 2); accumulate (a, k) with
    exact power-of-two rescales a' = a 2^(k - k') + p 2^(n - k'), k' = max(k, n). No max pass."""
    rows = x.double().movedim(dim, -1)
    a = torch.zeros(rows.shape[:-1], dtype=torch.float64, device=x.device)
    k = torch.full_like(a, -math.inf)
    for j in range(rows.shape[-1]):
        xj = rows[..., j]
        n = torch.round(xj * (1 / math.log(2)))
        finite = torch.isfinite(n)
        p = torch.where(finite, torch.exp(xj - torch.where(finite, n, 0.0) * math.log(2)), torch.zeros_like(xj))
        n = torch.where(finite, n, torch.full_like(n, -math.inf))
        k_new = torch.maximum(k, n)
        scale_old = torch.where(torch.isfinite(k), torch.exp2(k - k_new), torch.zeros_like(k))
        scale_new = torch.where(finite, torch.exp2(n - k_new), torch.zeros_like(n))
        a = a * scale_old + p * scale_new
        k = k_new
    return torch.log(a) + k * math.log(2)


def comp_sum_loss_reference(logits: torch.Tensor, target: torch.Tensor, loss: str, *, weight=None,
                            reduction: str = "mean", ignore_index: int = -100, gamma: float = 2.0,
                            epsilon: float = 1.0) -> torch.Tensor:
    """The comp-sum losses in plain PyTorch (float64 when given float64), torch's weighting and reductions:
    per token w_t * l(p_t), "mean" divides by the summed weight of the non-ignored tokens.

    focal (Lin et al.): l = -(1 - p_t)^gamma log p_t;   poly1 (Leng et al.): l = -log p_t + epsilon (1 - p_t);
    squentropy (Hui & Belkin): l = -log p_t + sum_{c != t} p_c^2 / (C - 1).
    """
    valid = target != ignore_index
    t = target.masked_fill(~valid, 0)
    logp_t = torch.log_softmax(logits, -1).gather(-1, t[..., None]).squeeze(-1)
    p_t = logp_t.exp()
    if loss == "focal":
        rows = -((1 - p_t) ** gamma) * logp_t
    elif loss == "poly1":
        rows = -logp_t + epsilon * (1 - p_t)
    elif loss == "squentropy":
        C = logits.shape[-1]
        p = torch.softmax(logits, -1)
        rest = (p * p).sum(-1) - p_t * p_t
        rows = -logp_t + (rest / (C - 1) if C > 1 else torch.zeros_like(rest))
    else:
        raise ValueError(loss)
    w = weight[t] if weight is not None else torch.ones_like(rows)
    w = w * valid
    rows = rows * w
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    return rows.sum() / w.sum()

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


# ---------------------------------------------------------------- distillation and policy log-probs (issue #14)
#
# Everything below runs in float64 whatever the input dtype (the inputs are upcast; a float64 leaf keeps its graph,
# so autograd through these functions gives the reference gradients). Zero-probability entries (-inf log-probs,
# from -inf logits: a masked vocabulary) contribute 0 to every p log p / p log q sum, in the value and in the
# gradient: the differences are replaced by 0 *before* the product (a where on the product alone would send
# 0 * nan into the backward).


def _masked_kl_rows(lp: torch.Tensor, lq: torch.Tensor) -> torch.Tensor:
    """KL(p || q) = sum_v p (log p - log q) over the last dim, from log-probabilities; 0 log 0 = 0 (also when
    log q = -inf there); p > 0 where q = 0 gives +inf. Equals F.kl_div(lq, lp, reduction="none", log_target=True)
    .sum(-1) wherever that is finite."""
    live = lp > -math.inf
    diff = torch.where(live, lp - lq, torch.zeros((), dtype=lp.dtype, device=lp.device))
    return (torch.exp(lp) * diff).sum(-1)


def _mixture_log_probs(ls: torch.Tensor, lt: torch.Tensor, beta: float) -> torch.Tensor:
    """log((1 - beta) p_s + beta p_t) as TRL's generalized_jsd_loss forms it (logsumexp of the shifted log-probs),
    0 < beta < 1; entries where both are -inf stay -inf with a zero (not NaN) gradient."""
    a = ls + math.log(1.0 - beta)
    b = lt + math.log(beta)
    dead = (a == -math.inf) & (b == -math.inf)
    zero = torch.zeros((), dtype=a.dtype, device=a.device)
    m = torch.logsumexp(torch.stack([torch.where(dead, zero, a), torch.where(dead, zero, b)]), dim=0)
    return torch.where(dead, torch.full((), -math.inf, dtype=a.dtype, device=a.device), m)


def distillation_loss_reference(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *,
                                divergence: str = "forward_kl", beta: float = 0.5, temperature: float = 1.0,
                                target=None, ignore_index: int = -100, reduction: str = "mean",
                                hard_weight: float = 0.0, return_student_entropy: bool = False):
    """fastloss.distillation_loss in plain float64 PyTorch (the result is float64 whatever the inputs' dtype).

    ls, lt = log_softmax(student / T), log_softmax(teacher / T) (teacher detached: a constant), per token
      forward_kl: KL(teacher || student) = sum pt (lt - ls)
      reverse_kl: KL(student || teacher) = sum ps (ls - lt)
      jsd:        TRL's generalized JSD, M = (1 - beta) ps + beta pt, beta KL(pt || M) + (1 - beta) KL(ps || M);
                  beta == 0 is forward_kl and beta == 1 reverse_kl (TRL's special cases)
    plus hard_weight * cross-entropy(untempered student logits, target); no T^2 rescaling. Tokens whose target is
    ignore_index have loss 0 and no gradient (their logits are not even looked at); "mean" divides by the number
    of unmasked tokens (all tokens without a target; 0 / 0 = nan when there are none).

    return_student_entropy: the tuple (loss, entropy) with entropy = -sum ps log ps per token (0 log 0 = 0; 0 at
    masked tokens; detached, float64), whatever the reduction.
    """
    if divergence not in ("forward_kl", "reverse_kl", "jsd"):
        raise ValueError(f"divergence: unknown {divergence!r}")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction: unknown {reduction!r}")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be positive and finite, got {temperature}")
    if hard_weight != 0 and target is None:
        raise ValueError("hard_weight != 0 needs a target")
    s = student_logits.double()
    t = teacher_logits.detach().double()
    if s.shape != t.shape:
        raise ValueError(f"student_logits {tuple(s.shape)} and teacher_logits {tuple(t.shape)} differ")
    lead = s.shape[:-1]
    if target is not None:
        if target.shape != lead:
            raise ValueError(f"target shape {tuple(target.shape)} != {tuple(lead)}")
        valid = target != ignore_index
        # masked tokens: replace their logits by zeros, so nothing in them (inf, nan) reaches the value or gradient
        keep = valid.unsqueeze(-1)
        zero = torch.zeros((), dtype=s.dtype, device=s.device)
        s = torch.where(keep, s, zero)
        t = torch.where(keep, t, zero)
    else:
        valid = torch.ones(lead, dtype=torch.bool, device=s.device)
    if divergence == "jsd" and beta == 0.0:
        divergence = "forward_kl"
    elif divergence == "jsd" and beta == 1.0:
        divergence = "reverse_kl"
    ls = torch.log_softmax(s / temperature, -1)
    lt = torch.log_softmax(t / temperature, -1)
    if divergence == "forward_kl":
        rows = _masked_kl_rows(lt, ls)
    elif divergence == "reverse_kl":
        rows = _masked_kl_rows(ls, lt)
    else:
        lm = _mixture_log_probs(ls, lt, beta)
        rows = beta * _masked_kl_rows(lt, lm) + (1.0 - beta) * _masked_kl_rows(ls, lm)
    if hard_weight != 0:
        tt = target.masked_fill(~valid, 0).unsqueeze(-1)
        ce = -torch.log_softmax(s, -1).gather(-1, tt).squeeze(-1)
        rows = rows + hard_weight * ce
    rows = torch.where(valid, rows, torch.zeros((), dtype=rows.dtype, device=rows.device))
    if reduction == "none":
        out = rows
    elif reduction == "sum":
        out = rows.sum()
    else:
        out = rows.sum() / valid.sum()
    if not return_student_entropy:
        return out
    lsd = ls.detach()
    lsd_safe = torch.where(lsd > -math.inf, lsd, torch.zeros((), dtype=lsd.dtype, device=lsd.device))
    ent = -(torch.exp(lsd) * lsd_safe).sum(-1)
    return out, torch.where(valid, ent, torch.zeros((), dtype=ent.dtype, device=ent.device))


def token_logprobs_reference(logits: torch.Tensor, tokens: torch.Tensor, *, temperature: float = 1.0,
                             return_entropy: bool = False, return_stats: bool = False):
    """fastloss.token_logprobs in plain float64 PyTorch: log softmax(logits / T)[token] per position (shape
    tokens.shape == logits.shape[:-1]) and, with return_entropy, the tuple (logprobs, entropy) with
    entropy = -sum p log p of the same tempered softmax (0 log 0 = 0, with a zero gradient there).

    return_stats: the 5-tuple (logprobs, entropy or None, log_sum_sq_probs, mean_logits, argmax) of
    fastloss.TokenStats, with log_sum_sq_probs = log sum_j p_j^2 (a logsumexp of 2 log p), mean_logits the mean of
    logits / T over the vocabulary and argmax = torch.argmax of the logits; the last three detached (float64,
    int64)."""
    if return_stats:
        lp_ent = token_logprobs_reference(logits, tokens, temperature=temperature, return_entropy=True)
        x = logits.detach().double()
        lsm = torch.log_softmax(x / temperature, -1)
        stats = (torch.logsumexp(2 * lsm, -1), (x / temperature).mean(-1), torch.argmax(x, -1))
        return (lp_ent[0], lp_ent[1] if return_entropy else None) + stats
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be positive and finite, got {temperature}")
    x = logits.double()
    if tokens.shape != x.shape[:-1]:
        raise ValueError(f"tokens shape {tuple(tokens.shape)} != {tuple(x.shape[:-1])}")
    lp = torch.log_softmax(x / temperature, -1)
    out = lp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    if not return_entropy:
        return out
    live = lp > -math.inf
    lp_safe = torch.where(live, lp, torch.zeros((), dtype=lp.dtype, device=lp.device))
    entropy = -(torch.exp(lp) * lp_safe).sum(-1)
    return out, entropy


def spherical_loss_reference(logits: torch.Tensor, target: torch.Tensor, loss: str, *, a: float = 1.0,
                             b: float = 0.0, ignore_index: int = -100) -> torch.Tensor:
    """Per-row float64 spherical losses on materialised logits (..., V) (fastloss.spherical): the Z-loss
    softplus(a (b - z_c)) / a with z_c = (o_c - mean) / std (population std; z_c = 0 where std = 0), the
    log-Taylor-softmax and the one-hot squared error; 0 for rows with target == ignore_index."""
    x = logits.double()
    V = x.shape[-1]
    valid = target != ignore_index
    tc = target.masked_fill(~valid, 0).unsqueeze(-1)
    oc = x.gather(-1, tc).squeeze(-1)
    if loss == "z":
        mu = x.mean(-1)
        var = ((x - mu.unsqueeze(-1)) ** 2).mean(-1)
        z = torch.where(var > 0, (oc - mu) / var.clamp_min(torch.finfo(torch.float64).tiny).sqrt(),
                        torch.zeros_like(oc))
        rows = torch.nn.functional.softplus(a * (b - z)) / a
    elif loss == "taylor_softmax":
        t = 1 + x + x * x / 2
        rows = t.sum(-1).log() - t.gather(-1, tc).squeeze(-1).log()
    elif loss == "mse":
        rows = ((x - torch.nn.functional.one_hot(tc.squeeze(-1), V).double()) ** 2).sum(-1)
    else:
        raise ValueError(f"unknown spherical loss {loss!r}")
    return torch.where(valid, rows, torch.zeros_like(rows))


# ---------------------------------------------------------------- vocabulary-parallel cross-entropy (shards)
#
# The per-shard statistics, the loss of the combined rows and a shard's gradient columns, as the ops
# torch.ops.fastloss.cross_entropy_shard_fwd / _loss / _bwd define them (fastloss/loss_math.h kShardStats), in float64.


def _softcap_ref(x: torch.Tensor, softcap) -> torch.Tensor:
    if softcap is None:
        return x
    return torch.where(x == -math.inf, x, softcap * torch.tanh(x / softcap))


def ce_shard_fwd_ref(logits: torch.Tensor, target: torch.Tensor, weight=None, vocab_start: int = 0,
                     ignore_index: int = -100, label_smoothing: float = 0.0, softcap=None,
                     loss: str = "ce") -> torch.Tensor:
    """float64 [N, 4] per row of the shard logits [N, C] (classes [vocab_start, vocab_start + C)), x' = softcap(x):
    (m = max x' (-inf for an all -inf or empty row), d = sum exp(x' - m), x'_t when vocab_start <= t < vocab_start
    + C else 0, sum_c w_c x'_c with label smoothing / sum_c exp(2 (x'_c - m)) for squentropy / else 0); rows with
    target == ignore_index all 0."""
    x = _softcap_ref(logits.double(), softcap)
    N, C = x.shape
    valid = target != ignore_index
    m = x.amax(-1) if C > 0 else torch.full((N,), -math.inf, dtype=torch.float64, device=x.device)
    e = torch.exp(x - torch.where(m == -math.inf, torch.zeros_like(m), m)[:, None])
    d = e.sum(-1)
    tl = target - vocab_start
    owned = valid & (tl >= 0) & (tl < C)
    if C > 0:
        xt = x.gather(1, tl.clamp(0, C - 1)[:, None]).squeeze(1)
        xt = torch.where(owned, xt, torch.zeros_like(xt))
    else:
        xt = torch.zeros_like(m)
    if label_smoothing > 0:
        w = weight.double() if weight is not None else torch.ones(C, dtype=torch.float64, device=x.device)
        s = (x * w).sum(-1)
    elif loss == "squentropy":
        s = (e * e).sum(-1)
    else:
        s = torch.zeros_like(m)
    stats = torch.stack([m, d, xt, s], 1)
    return torch.where(valid[:, None], stats, torch.zeros_like(stats))


def _shard_row_loss(lse, xt, wt, s, vocab_size, weight_sum, label_smoothing, z_loss, loss, loss_param):
    V = vocab_size
    W = float(weight_sum) if weight_sum is not None else float(V)
    nll = lse - xt
    p_t = torch.exp(-nll)
    if loss == "ce":
        rows = (1 - label_smoothing) * wt * nll + label_smoothing / V * (W * lse - s)
    elif loss == "focal":
        rows = wt * ((1 - p_t) ** loss_param if loss_param != 0 else 1.0) * nll
    elif loss == "poly1":
        rows = wt * (nll + loss_param * (1 - p_t))
    elif loss == "squentropy":
        rows = wt * (nll + ((s - p_t * p_t).clamp_min(0) / (V - 1) if V > 1 else 0.0))
    else:
        raise ValueError(loss)
    return rows + z_loss * lse * lse


def ce_shard_loss_ref(rows: torch.Tensor, target: torch.Tensor, weight_sum=None, vocab_size: int = 1,
                      ignore_index: int = -100, label_smoothing: float = 0.0, z_loss: float = 0.0, loss: str = "ce",
                      loss_param: float = 0.0) -> torch.Tensor:
    """float64 [N] losses from the combined rows [N, 4] = (lse, x'_t, w_t, s) (s: sum_c w_c x'_c over the vocabulary
    with label smoothing, sum_c p_c^2 for squentropy); 0 where target == ignore_index."""
    lse, xt, wt, s = rows.double().unbind(1)
    out = _shard_row_loss(lse, xt, wt, s, vocab_size, weight_sum, label_smoothing, z_loss, loss, loss_param)
    return torch.where(target != ignore_index, out, torch.zeros_like(out))


def ce_shard_bwd_ref(grad_loss: torch.Tensor, grad_lse, logits: torch.Tensor, target: torch.Tensor, weight,
                     rows: torch.Tensor, weight_sum=None, vocab_start: int = 0, vocab_size: int = 1,
                     ignore_index: int = -100, label_smoothing: float = 0.0, z_loss: float = 0.0, softcap=None,
                     loss: str = "ce", loss_param: float = 0.0) -> torch.Tensor:
    """float64 [N, C]: the shard's columns of d(sum_r grad_loss[r] loss_r + grad_lse[r] lse_r)/dlogits. The row loss's
    partials in (lse, x'_t, s) by autograd, then the chain rule: dlse/dx'_c = p_c, dx'_t/dx'_c = [c == t],
    ds/dx'_c = w_c (label smoothing) or 2 p_c (p_c - s) (squentropy), times dx'/dx."""
    valid = target != ignore_index
    lse, xt, wt, s = (c.clone().requires_grad_() for c in rows.double().unbind(1))
    out = _shard_row_loss(lse, xt, wt, s, vocab_size, weight_sum, label_smoothing, z_loss, loss, loss_param)
    g = torch.where(valid, grad_loss.double(), torch.zeros_like(lse))
    d_lse, d_xt, d_s = torch.autograd.grad((out * g).sum(), (lse, xt, s), allow_unused=True, materialize_grads=True)
    if grad_lse is not None:
        d_lse = d_lse + torch.where(valid, grad_lse.double(), torch.zeros_like(lse))
    x = logits.double()
    xc = _softcap_ref(x, softcap)
    N, C = x.shape
    p = torch.exp(xc - lse.detach()[:, None])
    grad = d_lse[:, None] * p
    if label_smoothing > 0:
        w = weight.double() if weight is not None else torch.ones(C, dtype=torch.float64, device=x.device)
        grad = grad + d_s[:, None] * w[None, :]
    elif loss == "squentropy":
        grad = grad + d_s[:, None] * 2 * p * (p - s.detach()[:, None])
    tl = target - vocab_start
    owned = valid & (tl >= 0) & (tl < C)
    if C > 0:
        onehot = torch.nn.functional.one_hot(tl.clamp(0, C - 1), C).double() * owned[:, None]
        grad = grad + d_xt[:, None] * onehot
    if softcap is not None:
        grad = grad * torch.where(xc == -math.inf, torch.zeros_like(xc), 1 - (xc / softcap) ** 2)
    return torch.where(valid[:, None], grad, torch.zeros_like(grad))


def ce_shard_combine_ref(stats: list, target: torch.Tensor, weight=None, ignore_index: int = -100,
                         label_smoothing: float = 0.0, loss: str = "ce") -> torch.Tensor:
    """The collective of the distributed layer, in one process: the combined rows [N, 4] = (lse, x'_t, w_t, s) from
    the shards' statistics (one [N, 4] tensor per shard, in vocabulary order): M = max m_r, D = sum d_r e^(m_r - M),
    lse = M + log D, x'_t = sum of the shards' x'_t, s = sum of the shards' sum_c w_c x'_c (label smoothing) or
    sum_r d2_r e^(2 (m_r - M)) / D^2 (squentropy); w_t = weight[t] (1 without weights); ignored rows 0."""
    S = torch.stack([s.double() for s in stats])
    m, d = S[..., 0], S[..., 1]
    M = m.amax(0)
    Ms = torch.where(M == -math.inf, torch.zeros_like(M), M)
    scale = torch.exp(m - Ms)
    D = (d * scale).sum(0)
    lse = Ms + torch.log(D)
    xt = S[..., 2].sum(0)
    if label_smoothing > 0:
        s = S[..., 3].sum(0)
    elif loss == "squentropy":
        s = (S[..., 3] * scale * scale).sum(0) / (D * D)
    else:
        s = torch.zeros_like(lse)
    valid = target != ignore_index
    wt = weight.double()[target.masked_fill(~valid, 0)] if weight is not None else torch.ones_like(lse)
    rows = torch.stack([lse, xt, wt, s], 1)
    return torch.where(valid[:, None], rows, torch.zeros_like(rows))


def cross_entropy_rows_reference(logits: torch.Tensor, target: torch.Tensor, *, weight=None, ignore_index: int = -100,
                                 label_smoothing: float = 0.0, z_loss: float = 0.0, softcap=None, loss: str = "ce",
                                 loss_param: float = 0.0) -> torch.Tensor:
    """Per-row losses of fastloss.cross_entropy(reduction="none") in the dtype of the logits (float64 for a float64
    leaf, which keeps its graph): torch's F.cross_entropy or comp_sum_loss_reference (loss_param = gamma / epsilon) of
    softcap(logits), plus z_loss * lse^2 on the rows that are not ignored."""
    xc = _softcap_ref(logits, softcap)
    if loss == "ce":
        rows = torch.nn.functional.cross_entropy(xc, target, weight=weight, ignore_index=ignore_index,
                                                 reduction="none", label_smoothing=label_smoothing)
    else:
        kw = {"gamma": loss_param} if loss == "focal" else {"epsilon": loss_param} if loss == "poly1" else {}
        rows = comp_sum_loss_reference(xc, target, loss, weight=weight, reduction="none", ignore_index=ignore_index,
                                       **kw)
    lse = torch.logsumexp(xc, -1)
    return rows + z_loss * lse * lse * (target != ignore_index)

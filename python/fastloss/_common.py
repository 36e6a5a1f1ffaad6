"""What the public API modules and their implementations share: argument checks and option validation, the
reductions and their mean denominators, the result types. The bottom layer of the Python package: it imports torch
only, and every other module may import it (see the README's "How it is built")."""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch

ALGORITHMS = ("auto", "online", "two_pass")
REDUCTIONS = ("none", "mean", "sum")
LOSSES = ("ce", "focal", "poly1", "squentropy")
DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")
SPHERICAL_LOSSES = ("z", "taylor_softmax", "mse")


# ---------------------------------------------------------------- result types


class SoftmaxTopK(NamedTuple):
    values: torch.Tensor
    indices: torch.Tensor


class CrossEntropyOutput(NamedTuple):
    """What :func:`fastloss.cross_entropy` returns when ``return_z_loss`` or ``return_lse`` is set."""

    loss: torch.Tensor
    z_loss: Optional[torch.Tensor]  # the z-loss term alone, reduced like the loss (for logging)
    lse: Optional[torch.Tensor]  # per-token log-sum-exp of the (softcapped) logits, float32; 0 for ignored tokens


class TokenLogprobs(NamedTuple):
    """What :func:`fastloss.token_logprobs` returns with ``return_entropy=True``."""

    logprobs: torch.Tensor
    entropy: torch.Tensor


class TokenStats(NamedTuple):
    """What :func:`fastloss.token_logprobs` / :func:`fastloss.linear_token_logprobs` return with
    ``return_stats=True``: per token, with p = softmax(logits / T) and z = logits / T,

    * ``logprobs``: log p[token] (differentiable);
    * ``entropy``: -sum p log p (differentiable), or None unless ``return_entropy=True``;
    * ``log_sum_sq_probs``: log sum_j p_j^2;
    * ``mean_logits``: mean_j z_j over the whole vocabulary (the tempered logits);
    * ``argmax``: int64, the first index of the row's maximum logit (``torch.argmax``); ``argmax == tokens`` is
      TRL's "is the sampled token the top-1".

    The last three come from the same pass over the logits and carry no gradient.
    """

    logprobs: torch.Tensor
    entropy: Optional[torch.Tensor]
    log_sum_sq_probs: torch.Tensor
    mean_logits: torch.Tensor
    argmax: torch.Tensor


def logprob_outputs(lp, ent, stats, argmax, dtype, lead, return_entropy, return_stats):
    """What token_logprobs and its linear / vocabulary-parallel versions return, from the float64 rows (the
    log-probs and entropy in float32, float64 for float64 logits of ``dtype``)."""
    out = out_dtype(dtype)
    lp = lp.to(out).view(lead)
    ent = ent.to(out).view(lead) if return_entropy else None
    if return_stats:
        return token_stats(lp, ent, stats, argmax, out, lead)
    if return_entropy:
        return TokenLogprobs(lp, ent)
    return lp


def token_stats(lp, ent, stats, argmax, out, lead) -> TokenStats:
    """TokenStats from token_logprobs_fwd's outputs: logprobs / entropy already in `out` with shape `lead`, the
    float64 [N, 2] statistics and int64 [N] argmax reshaped and cast here."""
    col = lambda j: stats[:, j].to(out).contiguous().view(lead)  # noqa: E731
    return TokenStats(lp, ent, col(0), col(1), argmax.view(lead))


# ---------------------------------------------------------------- argument checks


def is_dtensor(x) -> bool:
    """Whether x is a torch.distributed DTensor (False without torch.distributed)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        return False
    return isinstance(x, DTensor)


def refuse_dtensors(fn: str, **tensors) -> None:
    """A clear error for DTensor arguments of a call with no tensor-parallel version (instead of DTensor's own
    about mixed tensors, or a silent gather)."""
    for name, x in tensors.items():
        if is_dtensor(x):
            raise NotImplementedError(
                f"fastloss.{fn}: `{name}` is a DTensor (placements {tuple(x.placements)}); this call has no "
                "tensor-parallel version (linear_cross_entropy and linear_token_logprobs take a vocabulary-sharded "
                f"head): pass plain tensors, e.g. `{name}.full_tensor()`")


def check_tensor(fn: str, name: str, value) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"fastloss.{fn}: `{name}` must be a torch.Tensor, got {type(value).__name__}")


def check_choice(fn: str, name: str, value, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"fastloss.{fn}: `{name}` must be one of {choices}, got {value!r}")


def check_input(fn: str, input, algorithm: str) -> None:
    """The softmax family's common checks: a tensor input and a known algorithm."""
    check_tensor(fn, "input", input)
    check_choice(fn, "algorithm", algorithm, ALGORITHMS)


def loss_kind(fn: str, loss: str, gamma, epsilon, label_smoothing: float, soft: bool) -> tuple[str, float]:
    """Validates ``loss`` and its parameter; returns (loss, loss_param) for the ops."""
    check_choice(fn, "loss", loss, LOSSES)
    if gamma is not None and loss != "focal":
        raise ValueError(f"fastloss.{fn}: `gamma` is the parameter of loss='focal', not of loss={loss!r}")
    if epsilon is not None and loss != "poly1":
        raise ValueError(f"fastloss.{fn}: `epsilon` is the parameter of loss='poly1', not of loss={loss!r}")
    if loss == "ce":
        return loss, 0.0
    if soft:
        raise ValueError(f"fastloss.{fn}: loss={loss!r} needs class-index targets, not probability targets")
    if label_smoothing:
        raise ValueError(f"fastloss.{fn}: loss={loss!r} does not take label_smoothing")
    if loss == "squentropy":
        return loss, 0.0
    if loss == "focal":
        g = 2.0 if gamma is None else float(gamma)
        if not (g >= 0 and math.isfinite(g)):
            raise ValueError(f"fastloss.{fn}: `gamma` must be a finite float >= 0, got {gamma!r}")
        return loss, g
    e = 1.0 if epsilon is None else float(epsilon)
    if not math.isfinite(e):
        raise ValueError(f"fastloss.{fn}: `epsilon` must be finite, got {epsilon!r}")
    return loss, e


def check_ce_options(fn: str, reduction: str, algorithm: str, loss: str, gamma, epsilon,
                     label_smoothing: float) -> None:
    """The option checks of the cross-entropy calls that do not depend on the tensors (the nn modules run them when
    constructed, so a bad option fails where it was written)."""
    check_choice(fn, "reduction", reduction, REDUCTIONS)
    check_choice(fn, "algorithm", algorithm, ALGORITHMS)
    loss_kind(fn, loss, gamma, epsilon, float(label_smoothing), soft=False)


def check_temperature(fn: str, temperature) -> float:
    t = float(temperature)
    if not (math.isfinite(t) and t > 0):
        raise ValueError(f"fastloss.{fn}: `temperature` must be a finite float > 0, got {temperature!r}")
    return t


def check_tokens(fn: str, name: str, tokens: torch.Tensor, lead: tuple) -> None:
    check_tensor(fn, name, tokens)
    if tokens.dtype != torch.long:
        raise TypeError(f"fastloss.{fn}: `{name}` must be int64 (torch.long), got {tokens.dtype}")
    if tuple(tokens.shape) != lead:
        raise ValueError(f"fastloss.{fn}: `{name}` must have shape {lead} (the logits' leading dimensions), got "
                         f"{tuple(tokens.shape)}")


def distill_options(fn: str, divergence, beta, temperature, reduction, hard_weight, target):
    """Validated (beta, temperature, hard_weight) of the distillation calls."""
    check_choice(fn, "divergence", divergence, DIVERGENCES)
    check_choice(fn, "reduction", reduction, REDUCTIONS)
    beta = float(beta)
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"fastloss.{fn}: `beta` must be in [0, 1], got {beta!r}")
    hard_weight = float(hard_weight)
    if not (math.isfinite(hard_weight) and hard_weight >= 0):
        raise ValueError(f"fastloss.{fn}: `hard_weight` must be a finite float >= 0, got {hard_weight!r}")
    if hard_weight and target is None:
        raise ValueError(f"fastloss.{fn}: `hard_weight` > 0 adds the cross-entropy against `target`; pass `target`")
    return beta, check_temperature(fn, temperature), hard_weight


def spherical_options(fn: str, loss, a, b, reduction) -> tuple[float, float]:
    """Validated (a, b) of the spherical losses: required for the Z-loss, refused for the others (which have none)."""
    check_choice(fn, "loss", loss, SPHERICAL_LOSSES)
    check_choice(fn, "reduction", reduction, REDUCTIONS)
    if loss != "z":
        if a is not None or b is not None:
            raise ValueError(f"fastloss.{fn}: `a` and `b` are the Z-loss's parameters; loss={loss!r} has none")
        return 1.0, 0.0
    if a is None or b is None:
        raise ValueError(f"fastloss.{fn}: the Z-loss needs `a` (softplus sharpness, > 0) and `b` (offset of the "
                         "z-score); they set which z-scores the loss still pushes (de Brebisson & Vincent tune both)")
    a, b = float(a), float(b)
    if not (math.isfinite(a) and a > 0):
        raise ValueError(f"fastloss.{fn}: `a` must be a finite float > 0, got {a!r}")
    if not math.isfinite(b):
        raise ValueError(f"fastloss.{fn}: `b` must be a finite float, got {b!r}")
    return a, b


def out_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32, or float64 for float64 inputs: the dtype of per-token statistics (lse, log-probs)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------- reductions


def reduce_rows(rows: torch.Tensor, reduction: str, out_shape, denom: Optional[torch.Tensor]) -> torch.Tensor:
    if reduction == "none":
        return rows.view(out_shape)
    if reduction == "sum":
        return rows.sum()
    return rows.sum() / denom


def mean_denominator(reduction: str, t: torch.Tensor, valid: Optional[torch.Tensor], weight: Optional[torch.Tensor],
                     dtype: torch.dtype):
    """torch's "mean": the summed class weight of the non-ignored targets (their count when unweighted), or the
    number of samples for probability targets (valid is None). A device tensor: no host synchronisation."""
    if reduction != "mean":
        return None
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    if valid is None:
        return torch.tensor(float(t.shape[0]), dtype=acc, device=t.device)
    if weight is not None:
        return (weight.to(acc)[t.masked_fill(~valid, 0)] * valid).sum()
    return valid.sum().to(acc)


def unmasked_count(reduction: str, target: Optional[torch.Tensor], ignore_index: int, n: int,
                   device) -> Optional[torch.Tensor]:
    """The distillation "mean": unmasked tokens (all n without a target), on the device: no host synchronisation."""
    if reduction != "mean":
        return None
    if target is None:
        return torch.tensor(float(n), dtype=torch.float64, device=device)
    return (target != ignore_index).sum().to(torch.float64)

"""Spherical-family classification losses (Vincent et al. 2015; de Brebisson & Vincent 2016): losses that see a row
of logits only through its target entry, its mean and its variance -- so from a linear head they need no logits.

* ``loss="z"``: the **spherical Z-loss** of de Brebisson & Vincent, "The Z-loss: a shift and scale invariant
  classification loss belonging to the Spherical Family" (2016): with z_c = (o_c - mean(o)) / std(o) (population
  std), ``softplus(a * (b - z_c)) / a``. Invariant to shifting and scaling the logits. This is **not** PaLM's
  auxiliary z-loss (``z * logsumexp^2``), which is :func:`fastloss.cross_entropy`'s ``z_loss=`` option.
* ``loss="taylor_softmax"``: the log-Taylor-softmax, the softmax cross-entropy with ``exp`` replaced by its
  second-order Taylor polynomial ``1 + o + o^2 / 2``.
* ``loss="mse"``: the squared error between the logits and the one-hot target, summed over the classes. From
  logits its value is summed as sum_{k != c} o_k^2 + (o_c - 1)^2 (accurate for rows near their target) and its
  gradient 2 (o - onehot) elementwise. The linear version has only the row's moments: its value,
  V (var + mean^2) - 2 o_c + 1, has an absolute error of about eps * sum o^2, so a row already close to its one-hot
  target loses relative precision in the loss *value* there (that form, from float32 logits at V = 1000 with 1e-4
  noise: ~2e-2); its gradients are those of the exact formula.

Rows whose logits are all equal (std = 0) have z_c = 0 by definition: the Z-loss is ``softplus(a * b) / a`` there
and its gradient 0. A NaN or infinite logit makes its row's loss NaN (the MSE: +inf for an infinite logit).
"""

from __future__ import annotations

from typing import Optional

import torch

from ._common import check_tensor, check_tokens, reduce_rows, refuse_dtensors, spherical_options, unmasked_count
from ._linear_spherical import linear_spherical_loss_impl


def spherical_loss(input: torch.Tensor, target: torch.Tensor, *, loss: str = "z", a: Optional[float] = None,
                   b: Optional[float] = None, ignore_index: int = -100, reduction: str = "mean") -> torch.Tensor:
    """A spherical-family loss of the logits ``input`` (..., V) against class indices ``target`` (...) int64, from one
    pass over each row (its (count, mean, M2) merged like the online softmax's (m, d)) and one elementwise pass for
    the gradient.

    loss: "z" (the spherical Z-loss of de Brebisson & Vincent; needs ``a`` > 0 and ``b``; not PaLM's auxiliary
    z-loss ``z * lse^2``, which is ``fastloss.cross_entropy(z_loss=...)``), "taylor_softmax" or "mse" (see the
    module doc).
    Rows with ``target == ignore_index`` give 0 and no gradient; ``reduction`` "mean" (over the other rows, NaN when
    there are none, as ``F.cross_entropy``), "sum" or "none" (shape of ``target``). The classes are the last
    dimension (LLM layout), V >= 2. The loss has ``input``'s dtype; rows accumulate in float32 (float64 for float64
    input) and finish in float64.
    """
    fn = "spherical_loss"
    check_tensor(fn, "input", input)
    a, b = spherical_options(fn, loss, a, b, reduction)
    if input.dim() == 0:
        raise ValueError(f"fastloss.{fn}: `input` must have at least one dimension (the classes)")
    lead = tuple(input.shape[:-1])
    check_tokens(fn, "target", target, lead)
    V = input.shape[-1]
    t = target.reshape(-1)
    rows, _ = torch.ops.fastloss.spherical_loss_fwd(input.reshape(-1, V), t, loss, a, b, int(ignore_index))
    denom = unmasked_count(reduction, t, int(ignore_index), t.shape[0], input.device)
    return reduce_rows(rows, reduction, lead, denom).to(input.dtype)


def linear_spherical_loss(input: torch.Tensor, linear_weight: torch.Tensor, target: torch.Tensor,
                          bias: Optional[torch.Tensor] = None, *, loss: str = "z", a: Optional[float] = None,
                          b: Optional[float] = None, ignore_index: int = -100, reduction: str = "mean") -> torch.Tensor:
    """:func:`spherical_loss` of ``input @ linear_weight.T (+ bias)`` computed exactly **without the logits**: from
    the target rows of the head, its mean row and its centred Gram matrix (D x D), with exact gradients to ``input``,
    ``linear_weight`` and ``bias``. Cost 2 V D^2 + 3 N D^2 multiply-adds for N tokens, V classes, hidden size D,
    against the 3 N V D of any linear cross-entropy; nothing of size N x V is ever formed
    (python/fastloss/_linear_spherical.py has the formulas, costs and memory).

    input (..., D), linear_weight (V, D), bias (V,) or None, all of one floating dtype (bf16 / fp16 compute in
    float32); target (...) int64. The other arguments and the result are those of :func:`spherical_loss`.
    """
    fn = "linear_spherical_loss"
    refuse_dtensors(fn, input=input, linear_weight=linear_weight, bias=bias, target=target)
    check_tensor(fn, "input", input)
    check_tensor(fn, "linear_weight", linear_weight)
    a, b = spherical_options(fn, loss, a, b, reduction)
    if input.dim() == 0 or linear_weight.dim() != 2 or input.shape[-1] != linear_weight.shape[1]:
        raise ValueError(f"fastloss.{fn}: `input` (..., D) and `linear_weight` (V, D) must agree on D, got "
                         f"{tuple(input.shape)} and {tuple(linear_weight.shape)}")
    if not input.is_floating_point() or input.dtype != linear_weight.dtype:
        raise ValueError(f"fastloss.{fn}: `input` ({input.dtype}) and `linear_weight` ({linear_weight.dtype}) must "
                         "have the same floating-point dtype")
    V, D = linear_weight.shape
    if V < 2:
        raise ValueError(f"fastloss.{fn}: a spherical loss needs at least 2 classes, got linear_weight of shape "
                         f"{tuple(linear_weight.shape)}")
    if bias is not None:
        check_tensor(fn, "bias", bias)
        if tuple(bias.shape) != (V,) or bias.dtype != linear_weight.dtype:
            raise ValueError(f"fastloss.{fn}: `bias` must have shape ({V},) and dtype {linear_weight.dtype}, got "
                             f"{tuple(bias.shape)} {bias.dtype}")
    lead = tuple(input.shape[:-1])
    check_tokens(fn, "target", target, lead)
    for name, x in (("linear_weight", linear_weight), ("bias", bias), ("target", target)):
        if x is not None and x.device != input.device:
            raise ValueError(f"fastloss.{fn}: `{name}` is on {x.device} but `input` is on {input.device}")
    t = target.reshape(-1)  # checked by the op (torch.ops.fastloss.spherical_loss_terms) before any result
    denom = unmasked_count(reduction, t, int(ignore_index), t.shape[0], input.device)
    out = linear_spherical_loss_impl(input.reshape(-1, D), linear_weight, bias, t, loss, a, b, int(ignore_index),
                                     reduction, lead, denom)
    return out.to(input.dtype)

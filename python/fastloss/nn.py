"""Modules mirroring torch.nn for fastloss's losses."""

from __future__ import annotations

from typing import Optional

import torch

from . import functional as F
from ._common import check_ce_options, check_temperature, distill_options, spherical_options
from . import policy as fastloss_policy
from . import spherical as fastloss_spherical


# The modules' signatures repeat the functions' on purpose (as torch.nn's do): a user reads the options where the
# module is built. What is not repeated is the checking: the functions' own checks (fastloss._common) run here.
class _CrossEntropyOptions(torch.nn.Module):
    """The options both cross-entropy modules hold, checked when the module is built (a bad option fails where it
    was written, by the same checks the functions run)."""

    def __init__(self, fn: str, weight, ignore_index, reduction, label_smoothing, z_loss, softcap, algorithm, loss,
                 gamma, epsilon):
        super().__init__()
        check_ce_options(fn, reduction, algorithm, loss, gamma, epsilon, label_smoothing)
        self.register_buffer("weight", weight)
        self.ignore_index, self.reduction, self.label_smoothing = ignore_index, reduction, label_smoothing
        self.z_loss, self.softcap, self.algorithm = z_loss, softcap, algorithm
        self.loss, self.gamma, self.epsilon = loss, gamma, epsilon


class CrossEntropyLoss(_CrossEntropyOptions):
    """``torch.nn.CrossEntropyLoss`` backed by :func:`fastloss.cross_entropy`, plus its LLM extras."""

    def __init__(
        self,
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
        super().__init__("CrossEntropyLoss", weight, ignore_index, reduction, label_smoothing, z_loss, softcap,
                         algorithm, loss, gamma, epsilon)
        self.return_lse = return_lse
        self.return_z_loss = return_z_loss
        self.inplace_backward = inplace_backward

    def forward(self, input: torch.Tensor, target: torch.Tensor):
        return F.cross_entropy(
            input, target, self.weight, self.ignore_index, self.reduction, self.label_smoothing,
            z_loss=self.z_loss, softcap=self.softcap, return_lse=self.return_lse, return_z_loss=self.return_z_loss,
            inplace_backward=self.inplace_backward, algorithm=self.algorithm, loss=self.loss, gamma=self.gamma,
            epsilon=self.epsilon,
        )


class LinearCrossEntropyLoss(_CrossEntropyOptions):
    """Loss of ``input @ linear_weight.T (+ bias)`` against ``target`` with :func:`fastloss.linear_cross_entropy`:
    the N x V logits are never materialised. Holds no parameters: pass the LM head's weight (and bias) in."""

    def __init__(
        self,
        weight: Optional[torch.Tensor] = None,
        ignore_index: int = -100,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        *,
        z_loss: float = 0.0,
        softcap: Optional[float] = None,
        chunk_size="auto",
        filter_eps=None,
        algorithm: str = "auto",
        loss: str = "ce",
        gamma: Optional[float] = None,
        epsilon: Optional[float] = None,
    ):
        super().__init__("LinearCrossEntropyLoss", weight, ignore_index, reduction, label_smoothing, z_loss, softcap,
                         algorithm, loss, gamma, epsilon)
        self.chunk_size = chunk_size
        self.filter_eps = filter_eps

    def forward(self, input: torch.Tensor, linear_weight: torch.Tensor, target: torch.Tensor,
                linear_bias: Optional[torch.Tensor] = None):
        return F.linear_cross_entropy(
            input, linear_weight, target, linear_bias=linear_bias, weight=self.weight,
            reduction=self.reduction, ignore_index=self.ignore_index, label_smoothing=self.label_smoothing,
            z_loss=self.z_loss, softcap=self.softcap, chunk_size=self.chunk_size, algorithm=self.algorithm,
            filter_eps=self.filter_eps, loss=self.loss, gamma=self.gamma, epsilon=self.epsilon,
        )


class DistillationLoss(torch.nn.Module):
    """:func:`fastloss.distillation_loss` as a module: ``loss(student_logits, teacher_logits, target=None)``."""

    def __init__(self, divergence: str = "forward_kl", beta: float = 0.5, temperature: float = 1.0,
                 ignore_index: int = -100, reduction: str = "mean", hard_weight: float = 0.0):
        super().__init__()
        # (the target comes with each call: not checked here)
        distill_options(type(self).__name__, divergence, beta, temperature, reduction, hard_weight, target=True)
        self.divergence, self.beta, self.temperature = divergence, beta, temperature
        self.ignore_index, self.reduction, self.hard_weight = ignore_index, reduction, hard_weight

    def _options(self) -> dict:
        return dict(divergence=self.divergence, beta=self.beta, temperature=self.temperature,
                    ignore_index=self.ignore_index, reduction=self.reduction, hard_weight=self.hard_weight)

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                target: Optional[torch.Tensor] = None):
        return fastloss_policy.distillation_loss(student_logits, teacher_logits, target=target, **self._options())


class LinearDistillationLoss(DistillationLoss):
    """:func:`fastloss.linear_distillation_loss` as a module: neither head's N x V logits are materialised. Holds
    no parameters: pass both LM heads' weights (and biases) in."""

    def __init__(self, divergence: str = "forward_kl", beta: float = 0.5, temperature: float = 1.0,
                 ignore_index: int = -100, reduction: str = "mean", hard_weight: float = 0.0, chunk_size="auto"):
        super().__init__(divergence, beta, temperature, ignore_index, reduction, hard_weight)
        self.chunk_size = chunk_size

    def forward(self, student_hidden: torch.Tensor, student_weight: torch.Tensor, teacher_hidden: torch.Tensor,
                teacher_weight: torch.Tensor, target: Optional[torch.Tensor] = None,
                student_bias: Optional[torch.Tensor] = None, teacher_bias: Optional[torch.Tensor] = None):
        return fastloss_policy.linear_distillation_loss(
            student_hidden, student_weight, teacher_hidden, teacher_weight, student_bias=student_bias,
            teacher_bias=teacher_bias, target=target, chunk_size=self.chunk_size, **self._options())


class TokenLogprobs(torch.nn.Module):
    """:func:`fastloss.token_logprobs` as a module: ``logp = m(logits, tokens)`` (with ``return_entropy=True``
    a :class:`fastloss.TokenLogprobs` ``(logprobs, entropy)``)."""

    def __init__(self, temperature: float = 1.0, return_entropy: bool = False):
        super().__init__()
        check_temperature(type(self).__name__, temperature)
        self.temperature, self.return_entropy = temperature, return_entropy

    def forward(self, logits: torch.Tensor, tokens: torch.Tensor):
        return fastloss_policy.token_logprobs(logits, tokens, temperature=self.temperature,
                                              return_entropy=self.return_entropy)


class LinearTokenLogprobs(TokenLogprobs):
    """:func:`fastloss.linear_token_logprobs` as a module: ``m(hidden, weight, tokens, bias=None)`` without the
    logits. Holds no parameters: pass the LM head's weight (and bias) in."""

    def __init__(self, temperature: float = 1.0, return_entropy: bool = False, chunk_size="auto"):
        super().__init__(temperature, return_entropy)
        self.chunk_size = chunk_size

    def forward(self, hidden: torch.Tensor, weight: torch.Tensor, tokens: torch.Tensor,
                bias: Optional[torch.Tensor] = None):
        return fastloss_policy.linear_token_logprobs(hidden, weight, tokens, bias=bias, temperature=self.temperature,
                                                     return_entropy=self.return_entropy, chunk_size=self.chunk_size)


class SphericalLoss(torch.nn.Module):
    """:func:`fastloss.spherical_loss` as a module: ``loss(input, target)`` with the spherical Z-loss (``loss="z"``,
    de Brebisson & Vincent; needs ``a`` and ``b``; not the cross-entropy's PaLM ``z_loss``), the log-Taylor-softmax
    or the one-hot squared error."""

    def __init__(self, loss: str = "z", a: Optional[float] = None, b: Optional[float] = None,
                 ignore_index: int = -100, reduction: str = "mean"):
        super().__init__()
        spherical_options(type(self).__name__, loss, a, b, reduction)
        self.loss, self.a, self.b, self.ignore_index, self.reduction = loss, a, b, ignore_index, reduction

    def _options(self) -> dict:
        return dict(loss=self.loss, a=self.a, b=self.b, ignore_index=self.ignore_index, reduction=self.reduction)

    def forward(self, input: torch.Tensor, target: torch.Tensor):
        return fastloss_spherical.spherical_loss(input, target, **self._options())


class LinearSphericalLoss(SphericalLoss):
    """:func:`fastloss.linear_spherical_loss` as a module: ``m(hidden, weight, target, bias=None)`` without any
    logits. Holds no parameters: pass the output layer's weight (and bias) in."""

    def forward(self, input: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                bias: Optional[torch.Tensor] = None):
        return fastloss_spherical.linear_spherical_loss(input, weight, target, bias, **self._options())

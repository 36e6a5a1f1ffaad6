"""The spherical Z-loss (issue #25): fastloss against the PyTorch composite a user would write.

Two opt-in suites (``--suite spherical,linear_spherical``; the presets ``spherical-tiny``, ``spherical-cpu`` and
``spherical-gpu-quick`` select them, together with ``linear_cross_entropy`` on the same head so that one report puts
the Z-loss next to the cross-entropy it would replace):

* ``spherical``: mean Z-loss of [N, V] logits against [N] targets (gradient for the logits). fastloss: one pass
  for the row's (mean, M2) and one for the gradient. Composite: ``x.float()``, ``mean`` / ``std(correction=0)``,
  gather, ``softplus(a (b - z)) / a``, mean.
* ``linear_spherical``: the same loss of h [N, D] @ W[V, D].T (gradients for h and W). fastloss: no logits at all
  (the head's centred Gram matrix; 2 V D^2 + 3 N D^2 multiply-adds). Composite: ``h @ W.T`` then the logits
  composite (N V D, and N x V logits in memory).

The Z-loss's parameters are fixed at a = 1, b = 6 (its cost does not depend on them). Errors: the logits suite
against fastloss.reference.spherical_loss_reference in float64 on the same inputs; the linear suite against the
same formula evaluated in float64 from the head (mean row, centred Gram matrix, autograd for the gradients) -- a
plain-torch reference of a few D x D products, so the error of an N = 16384, V = 131072 problem takes seconds, not
the N V D float64 GEMM a materialised reference would (tests/test_spherical.py checks that formula against the
materialised logits to 1e-12).

Bytes-moved model (an ideal kernel): spherical fwd reads the logits (N V), fwd+bwd reads them twice and writes the
gradient (3 N V); linear_spherical fwd reads W twice and h once, fwd+bwd adds W twice more, h once and writes dh, dW.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F

import fastloss
from fastloss.reference import spherical_loss_reference

from ..accuracy import mean_loss_error
from ..inputs import INPUT_SCALE
from ..problems import Problem
from ..registry import Impl, Inputs, Suite, fastloss_kernel_check, register_suite

Z_A, Z_B = 1.0, 6.0
IGNORE_INDEX = -100
EAGER_LOGITS_BYTES = 6 << 30
"""The composites materialise float32 logits and their gradient: skipped above this many bytes of logits."""


def _hidden(problem: Problem) -> int:
    return int(problem.extra.get("hidden", 1024))


def _targets(problem: Problem, gen: torch.Generator) -> torch.Tensor:
    return torch.randint(0, problem.v, (problem.n,), generator=gen, device=problem.device, dtype=torch.int64)


def _count(inputs: Inputs) -> int:
    return int((inputs[-1] != IGNORE_INDEX).sum())


def _fits(problem: Problem) -> Optional[str]:
    need = problem.n * problem.v * 4
    if need > EAGER_LOGITS_BYTES:
        return (f"the composite's float32 logits alone take {need / 2**30:.1f} GiB "
                f"(limit {EAGER_LOGITS_BYTES >> 30} GiB)")
    return None


def torch_z_loss(logits: torch.Tensor, targets: torch.Tensor, a: float = Z_A, b: float = Z_B) -> torch.Tensor:
    """The mean spherical Z-loss as a user writes it (float32 math for low-precision logits)."""
    x = logits.float()
    mu = x.mean(-1)
    sd = x.std(-1, correction=0)
    valid = targets != IGNORE_INDEX
    oc = x.gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    rows = F.softplus(a * (b - (oc - mu) / sd)) / a
    return (rows * valid).sum() / valid.sum()


# ---------------------------------------------------------------- spherical (logits given)


def _logits_inputs(problem: Problem, gen: torch.Generator) -> Inputs:
    x = torch.randn((problem.n, problem.v), generator=gen, dtype=torch.float32, device=problem.device)
    return (x.mul_(INPUT_SCALE).to(problem.dtype), _targets(problem, gen))


def _logits_ref_sum(problem: Problem, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return spherical_loss_reference(logits, targets, "z", a=Z_A, b=Z_B, ignore_index=IGNORE_INDEX).sum()


SPHERICAL = register_suite(Suite(
    name="spherical",
    description="mean spherical Z-loss (a=1, b=6) of [N, V] logits against [N] targets, gradient for the logits",
    make_inputs=_logits_inputs,
    bytes_moved=lambda p, mode: {"fwd": 1, "fwdbwd": 3}[mode] * p.numel * p.elem_size + 8 * p.n,
    output_shape=lambda p: (),
    rel_error=mean_loss_error(_logits_ref_sum, row_args=(0, 1), grad_inputs=(0,), count=_count),
    default=False,
))
SPHERICAL.add(Impl("fastloss", lambda p: lambda x, t: fastloss.spherical_loss(x, t, loss="z", a=Z_A, b=Z_B),
                   "fastloss.spherical_loss(loss='z')", check=fastloss_kernel_check("spherical_loss_fwd")))
SPHERICAL.add(Impl("torch-eager", lambda p: torch_z_loss, "x.float(), mean / std, gather, softplus (eager)",
                   baseline=True))
SPHERICAL.add(Impl("torch-compile", lambda p: torch_z_loss, "torch.compile of the composite", compiled=True))


# ---------------------------------------------------------------- linear_spherical (h @ W.T, no logits)


def _linear_inputs(problem: Problem, gen: torch.Generator) -> Inputs:
    d = _hidden(problem)
    h = torch.randn((problem.n, d), generator=gen, dtype=torch.float32, device=problem.device)
    w = torch.randn((problem.v, d), generator=gen, dtype=torch.float32, device=problem.device)
    w.mul_(INPUT_SCALE / math.sqrt(d))  # logits with standard deviation INPUT_SCALE, as the other suites
    return (h.to(problem.dtype), w.to(problem.dtype), _targets(problem, gen))


def _linear_bytes(problem: Problem, mode: str) -> int:
    h = problem.n * _hidden(problem) * problem.elem_size
    w = problem.v * _hidden(problem) * problem.elem_size
    return {"fwd": 2 * w + h, "fwdbwd": 4 * w + 2 * h + w + h}[mode] + 8 * problem.n


def head_z_loss_sum64(h: torch.Tensor, w: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Sum of the rows' Z-losses of h @ w.T in float64 from the head alone (plain torch; differentiable)."""
    h, w = h.double(), w.double()
    m = w.mean(0)
    wc = w - m
    gram = wc.T @ wc / w.shape[0]
    valid = targets != IGNORE_INDEX
    tc = targets.clamp_min(0)
    d = ((w[tc] - m) * h).sum(1)  # o_c - mu
    var = ((h @ gram) * h).sum(1)
    rows = F.softplus(Z_A * (Z_B - d / var.sqrt())) / Z_A
    return (rows * valid).sum()


def _linear_ref_sum(problem: Problem, h: torch.Tensor, w: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return head_z_loss_sum64(h, w, targets)


def _linear_composite(problem: Problem) -> Callable[..., torch.Tensor]:
    return lambda h, w, t: torch_z_loss(h @ w.t(), t)


LINEAR_SPHERICAL = register_suite(Suite(
    name="linear_spherical",
    description="mean spherical Z-loss (a=1, b=6) of h [N, D] @ W[V, D].T against [N] targets, gradients for h and W",
    make_inputs=_linear_inputs,
    bytes_moved=_linear_bytes,
    output_shape=lambda p: (),
    # The float64 reference is the head formula on whole rows: chunks of N rows need no per-row V elements.
    rel_error=mean_loss_error(_linear_ref_sum, row_args=(0, 2), grad_inputs=(0, 1), count=_count,
                              row_elements=lambda p: _hidden(p)),
    grad_inputs=(0, 1),
    default=False,
))
LINEAR_SPHERICAL.add(Impl("fastloss", lambda p: lambda h, w, t: fastloss.linear_spherical_loss(h, w, t, loss="z",
                                                                                               a=Z_A, b=Z_B),
                          "fastloss.linear_spherical_loss(loss='z'): no logits",
                          check=fastloss_kernel_check("spherical_loss_terms")))
LINEAR_SPHERICAL.add(Impl("torch-eager", _linear_composite, "h @ W.T, then the Z-loss composite (eager)",
                          baseline=True, check=_fits))
LINEAR_SPHERICAL.add(Impl("torch-compile", _linear_composite, "torch.compile of h @ W.T + the composite",
                          compiled=True, check=_fits))

"""Random inputs the suites share: below the suites and the registry's users, so suites need not import each
other for them."""

from __future__ import annotations

import torch

from .problems import Problem
from .registry import Inputs

INPUT_SCALE = 3.0
"""Standard deviation of the random logits: a realistic spread of exponents, never all zeros."""


def random_rows(problem: Problem, gen: torch.Generator) -> Inputs:
    """One [N, V] tensor ~ N(0, 3^2) in the problem's dtype, drawn on the problem's device (no host transfer)."""
    x = torch.randn((problem.n, problem.v), generator=gen, dtype=torch.float32, device=problem.device)
    return (x.mul_(INPUT_SCALE).to(problem.dtype),)

"""softmax_topk: the k largest softmax probabilities of each row of [N, V] and their indices.

fastloss's one-pass kernel (online normaliser + running top-k, no softmax tensor) against the composite
``torch.topk(torch.softmax(x, -1), k, -1)``, eager and compiled. ``k`` comes from the problem (``--topk``, default
5; the ``topk`` preset sweeps V = 32K / 128K / 256K and k = 1 / 5 / 50). Implementations return the values (the
indices are computed too); the error is that of the values against the float64 composite.

Bytes moved by an ideal kernel: read N V, write N k values and N k int64 indices.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

import fastloss

from ..inputs import random_rows
from ..problems import Problem
from ..registry import Impl, Inputs, Suite, fastloss_kernel_check, register_suite


def topk_of(problem: Problem) -> int:
    return int(problem.extra.get("topk", 5))


def _bytes(problem: Problem, mode: str) -> int:
    k = topk_of(problem)
    return problem.numel * problem.elem_size + problem.n * k * (problem.elem_size + 8)


def _error(problem: Problem, inputs: Inputs, grad_output, got: Any, got_grads, cache: dict) -> float:
    """Relative error norm of the values against float64 softmax + topk, in row chunks."""
    (x,) = inputs
    k = topk_of(problem)
    step = max(1, 2**24 // max(1, problem.v))
    num = den = 0.0
    for a in range(0, problem.n, step):
        ref = torch.topk(torch.softmax(x[a:a + step].double(), -1), k, -1).values
        num += float(torch.linalg.vector_norm(got[a:a + step].double() - ref)) ** 2
        den += float(torch.linalg.vector_norm(ref)) ** 2
    return (num / den) ** 0.5 if den > 0 else num ** 0.5


def _fastloss(problem: Problem) -> Callable[[torch.Tensor], torch.Tensor]:
    k = topk_of(problem)
    return lambda x: fastloss.softmax_topk(x, k).values


def _torch(problem: Problem) -> Callable[[torch.Tensor], torch.Tensor]:
    k = topk_of(problem)
    return lambda x: torch.topk(torch.softmax(x, -1), k, -1).values


SOFTMAX_TOPK = register_suite(Suite(
    name="softmax_topk",
    description="top-k of softmax over the last dim of [N, V] (k from --topk, default 5)",
    make_inputs=random_rows,
    bytes_moved=_bytes,
    rel_error=_error,
    output_shape=lambda p: (p.n, topk_of(p)),
    grad_inputs=(0,),
    default=False,
))
SOFTMAX_TOPK.add(Impl("fastloss", _fastloss, "fastloss.softmax_topk(x, k): one pass, no softmax tensor",
                      check=fastloss_kernel_check("softmax_topk")))
SOFTMAX_TOPK.add(Impl("torch-eager", _torch, "torch.topk(torch.softmax(x, -1), k), eager", baseline=True))
SOFTMAX_TOPK.add(Impl("torch-compile", _torch, "torch.compile of softmax + topk", compiled=True))

"""The public functional API, with torch's signatures for the arguments fastloss shares with torch."""

from __future__ import annotations

from typing import Optional

import torch

_ALGORITHMS = ("auto", "online", "two_pass")


def _check(input, name: str, algorithm: str) -> None:
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"fastloss.{name}: `input` must be a torch.Tensor, got {type(input).__name__}")
    if algorithm not in _ALGORITHMS:
        raise ValueError(f"fastloss.{name}: `algorithm` must be one of {_ALGORITHMS}, got {algorithm!r}")


def softmax(
    input: torch.Tensor, dim: int = -1, *, algorithm: str = "auto", dtype: Optional[torch.dtype] = None
) -> torch.Tensor:
    """``torch.softmax(input, dim, dtype=dtype)`` computed by fastloss's kernels.

    algorithm: ``"online"`` (Milakov & Gimelshein running max and rescaled sum), ``"two_pass"`` (Dukhan &
    Ablavatski mantissa/exponent accumulation, no max pass) or ``"auto"`` (the faster one measured for the shape
    and device). Reduced-precision inputs accumulate in float32.
    """
    _check(input, "softmax", algorithm)
    if dtype is not None:
        input = input.to(dtype)
    return torch.ops.fastloss.softmax(input, dim, algorithm)


def log_softmax(
    input: torch.Tensor, dim: int = -1, *, algorithm: str = "auto", dtype: Optional[torch.dtype] = None
) -> torch.Tensor:
    """``torch.log_softmax(input, dim, dtype=dtype)`` computed by fastloss's kernels (see :func:`softmax`)."""
    _check(input, "log_softmax", algorithm)
    if dtype is not None:
        input = input.to(dtype)
    return torch.ops.fastloss.log_softmax(input, dim, algorithm)


def logsumexp(input: torch.Tensor, dim: int = -1, keepdim: bool = False, *, algorithm: str = "auto") -> torch.Tensor:
    """``torch.logsumexp(input, dim, keepdim)`` over a single dimension, computed by fastloss's kernels."""
    _check(input, "logsumexp", algorithm)
    if not isinstance(dim, int):
        raise TypeError(f"fastloss.logsumexp: `dim` must be a single int, got {dim!r}")
    return torch.ops.fastloss.logsumexp(input, dim, keepdim, algorithm)


def resolve_algorithm(input: torch.Tensor, dim: int = -1, algorithm: str = "auto") -> str:
    """The algorithm ("online" or "two_pass") that ``algorithm`` resolves to for this input."""
    _check(input, "resolve_algorithm", algorithm)
    return torch.ops.fastloss.resolve_algorithm(input, dim, algorithm)

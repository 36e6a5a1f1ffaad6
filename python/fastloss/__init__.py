"""fastloss: fast, lean, exact softmax / log-sum-exp / cross-entropy for large-vocabulary LLM training.

Importing the package loads the compiled operator library, so ``torch.ops.fastloss.*`` exists afterwards.
"""

from __future__ import annotations

import glob
import os

import torch

__version__ = "0.1.0"


def _load_library() -> str:
    here = os.path.dirname(os.path.abspath(__file__))
    candidates = sorted(glob.glob(os.path.join(here, "libfastloss_ops*.so")))
    if not candidates:
        raise ImportError(
            f"fastloss: compiled library libfastloss_ops.so not found in {here}. Build and install the package "
            "(`make install`, or `pip install --no-build-isolation .` in an environment that has torch)."
        )
    torch.ops.load_library(candidates[0])
    return candidates[0]


_library_path = _load_library()

from . import _ops  # noqa: E402,F401  (registers fake kernels and autograd)
from .functional import (  # noqa: E402
    CrossEntropyOutput,
    SoftmaxTopK,
    cross_entropy,
    linear_cross_entropy,
    log_softmax,
    logsumexp,
    softmax,
    softmax_topk,
)
from .policy import (  # noqa: E402
    TokenLogprobs,
    distillation_loss,
    linear_distillation_loss,
    linear_token_logprobs,
    token_logprobs,
)
from . import nn  # noqa: E402,F401

cuda_built: bool = hasattr(torch.ops.fastloss, "softmax") and torch._C._dispatch_has_kernel_for_dispatch_key(
    "fastloss::softmax", "CUDA"
)
"""True when the library was compiled with its CUDA kernels."""

from . import _cuda_emu  # noqa: E402

cuda_emulated: bool = _cuda_emu.available
"""True for a ``FASTLOSS_CUDA_EMU=ON`` build: the CUDA kernels run on the CPU in place of the CPU kernels."""

__all__ = [
    "softmax",
    "log_softmax",
    "logsumexp",
    "softmax_topk",
    "SoftmaxTopK",
    "cross_entropy",
    "linear_cross_entropy",
    "CrossEntropyOutput",
    "distillation_loss",
    "linear_distillation_loss",
    "token_logprobs",
    "linear_token_logprobs",
    "TokenLogprobs",
    "nn",
    "cuda_built",
    "cuda_emulated",
    "__version__",
]

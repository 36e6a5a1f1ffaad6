"""fastloss: fast, lean, exact softmax / log-sum-exp / cross-entropy for large-vocabulary LLM training.

Importing the package loads the compiled operator library, so ``torch.ops.fastloss.*`` exists afterwards.
"""

from __future__ import annotations

import torch

__version__ = "0.1.0"

from ._library import library_path as _library_path  # noqa: E402,F401  (loads the compiled operator library)
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
    distillation_loss,
    linear_distillation_loss,
    linear_token_logprobs,
    token_logprobs,
)
from ._common import TokenLogprobs, TokenStats  # noqa: E402
from .spherical import linear_spherical_loss, spherical_loss  # noqa: E402
from . import nn  # noqa: E402,F401

from .functional import _dtensor  # noqa: E402  (None without torch.distributed)

if _dtensor is not None:
    _dtensor.register()  # fastloss's ops on DTensor inputs (tensor parallelism)

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
    "TokenStats",
    "spherical_loss",
    "linear_spherical_loss",
    "nn",
    "cuda_built",
    "cuda_emulated",
    "__version__",
]

"""Loads the compiled operator library, so ``torch.ops.fastloss.*`` exists afterwards: the first thing
``import fastloss`` does, and what the modules that talk to the library directly (``_cuda_emu``) import."""

from __future__ import annotations

import glob
import os

import torch


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


library_path: str = _load_library()

"""Problem shapes and the named presets.

A :class:`Problem` is one benchmark point: ``n`` rows (tokens) of ``v`` entries (vocabulary) in one dtype on one
device, plus suite-specific extras (``hidden`` for linear cross-entropy, ``softcap`` for Gemma-2 style capped
logits). Suites that do not use an extra ignore it, so one preset can feed every suite. A problem may also name
the suites it is meant for (``suites``: the gpu-quick preset runs linear cross-entropy on the model head's shape
only); a preset may bring command-line defaults of its own (:data:`PRESET_OPTIONS`).

Presets depend on the device because the same name has to mean something runnable on a 2-core CPU and something
representative on an H100: the LLM presets use N=8192 tokens on CUDA but fewer on CPU.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "float64": torch.float64,
    "fp64": torch.float64,
    "double": torch.float64,
}


def parse_dtype(name: str) -> torch.dtype:
    """``"bf16"`` / ``"bfloat16"`` / ``"torch.bfloat16"`` -> ``torch.bfloat16`` (argparse ``type=``)."""
    key = name.strip().lower().removeprefix("torch.")
    if key not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; expected one of {sorted(set(DTYPES))}")
    return DTYPES[key]


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"`` (the spelling used in reports and JSON)."""
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class Problem:
    """One benchmark point. Frozen and hashable so it can key caches (copy bandwidth, references)."""

    n: int
    v: int
    dtype: torch.dtype
    device: str
    extras: tuple[tuple[str, Any], ...] = field(default=())
    suites: tuple[str, ...] = field(default=())
    """The suites this point is meant for (a preset's choice, e.g. linear cross-entropy only on a model's head
    shape); empty: every selected suite. ``--suite`` selects among them; other suites skip the point silently."""

    def runs(self, suite: str) -> bool:
        return not self.suites or suite in self.suites

    @property
    def extra(self) -> Mapping[str, Any]:
        return dict(self.extras)

    @property
    def elem_size(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    @property
    def numel(self) -> int:
        return self.n * self.v

    def label(self) -> str:
        ex = "".join(f" {k}={v}" for k, v in self.extras)
        only = f" (suites: {','.join(self.suites)})" if self.suites else ""
        return f"N={self.n} V={self.v} {dtype_name(self.dtype)} {self.device}{ex}{only}"


def make_problem(n: int, v: int, dtype: torch.dtype, device: str, *, suites: Sequence[str] = (),
                 **extras: Any) -> Problem:
    return Problem(n=n, v=v, dtype=dtype, device=device, extras=tuple(sorted(extras.items())),
                   suites=tuple(suites))


# ---------------------------------------------------------------- presets


def _default(device: str) -> list[Problem]:
    # A vocabulary-sized row (fastloss's target regime) and a short-row shape, both small enough for CI laptops.
    if device == "cuda":
        return [make_problem(4096, 32768, torch.float32, device), make_problem(4096, 32768, torch.bfloat16, device)]
    return [make_problem(1024, 32768, torch.float32, device), make_problem(1024, 4096, torch.float32, device)]


def _cpu_goal(device: str) -> list[Problem]:
    # The project's CPU goal: logsumexp >= torch.compile'd torch.logsumexp, softmax >= eager and compiled softmax.
    return [make_problem(4096, 32768, torch.float32, device)]


def _model(v: int, hidden: int, **extras: Any) -> Callable[[str], list[Problem]]:
    """LLM vocabularies: N=8192 tokens on CUDA (bf16 logits, the usual training dtype, and fp32 ones, which HF
    upcasts to); fewer fp32 rows on CPU so a run stays in minutes."""

    def build(device: str) -> list[Problem]:
        if device == "cuda":
            return [make_problem(8192, v, dt, device, hidden=hidden, **extras)
                    for dt in (torch.bfloat16, torch.float32)]
        return [make_problem(256, v, torch.float32, device, hidden=hidden, **extras)]

    return build


def _gpu_sweep(device: str) -> list[Problem]:
    # N*V ~ 2^28 elements: 512 MiB of bf16 / 1 GiB of fp32, far past any L2, across row lengths from tiny to 256k.
    out = []
    for dt in (torch.bfloat16, torch.float32):
        for v in (128, 512, 2048, 8192, 32768, 131072, 262144):
            out.append(make_problem(max(1, 2**28 // v), v, dt, device))
    return out


LOGITS_SUITES = ("softmax", "logsumexp", "cross_entropy")


def _gpu_quick(device: str) -> list[Problem]:
    # bench/gpu_check.sh's benchmark, sized to about 2 minutes of an H200 with torch.compile and the peers: bf16
    # logits of the Llama 3 and Gemma vocabularies (softmax, logsumexp, cross-entropy), and linear cross-entropy
    # and the linear spherical Z-loss (issue #25, last: the time budget cuts it first) on the Llama-3-8B head
    # (D=4096). Every torch.compile entry compiles once per (shape, suite, mode), which is
    # most of the time: hence two logits shapes, and the preset's options (PRESET_OPTIONS) keep fwd+bwd only.
    n = 8192 if device == "cuda" else 256
    bf16 = torch.bfloat16
    return [make_problem(n, 128256, bf16, device, suites=LOGITS_SUITES),
            make_problem(n, 128256, bf16, device, hidden=4096, suites=("linear_cross_entropy", "linear_spherical")),
            make_problem(n, 256000, bf16, device, suites=LOGITS_SUITES)]


def _topk(device: str) -> list[Problem]:
    # Milakov & Gimelshein's softmax + top-k regime: LLM vocabularies, k = 1 / 5 / 50; N * V = 2^25 on CPU (128
    # MiB of fp32), 2^28 on CUDA.
    total = 2**28 if device == "cuda" else 2**25
    return [make_problem(total // v, v, torch.float32, device, topk=k)
            for v in (32768, 131072, 262144) for k in (1, 5, 50)]


DISTILL_LOGITS_SUITES = ("distillation", "distillation_jsd", "token_logprobs")
DISTILL_LINEAR_SUITES = ("linear_distillation", "linear_distillation_jsd", "linear_token_logprobs")
DISTILL_DEFAULT_SUITES = ("distillation", "token_logprobs", "linear_distillation", "linear_token_logprobs")
"""Issue #14's suites (suites/distillation.py); the ``*_jsd`` ones run only when asked for with ``--suite``."""


def _distill_cpu_goal(device: str) -> list[Problem]:
    # Issue #14's CPU goals, fp32 fwd+bwd: distillation and token log-probs on N=4096 x V=32768 logits; the linear
    # versions on N=4096 tokens, D=1024, V=65536.
    return [make_problem(4096, 32768, torch.float32, device, suites=DISTILL_LOGITS_SUITES),
            make_problem(4096, 65536, torch.float32, device, hidden=1024, suites=DISTILL_LINEAR_SUITES)]


def _distill_gpu_quick(device: str) -> list[Problem]:
    # The GPU script's distillation / RL-policy run: bf16 logits of the Llama 3 vocabulary, and the linear versions
    # on the heads of a Llama-3.2-1B student (D=2048) and a Llama-3.1-8B teacher (D=4096), same vocabulary.
    n = 8192 if device == "cuda" else 256
    bf16 = torch.bfloat16
    return [make_problem(n, 128256, bf16, device, suites=DISTILL_LOGITS_SUITES),
            make_problem(n, 128256, bf16, device, hidden=2048, teacher_hidden=4096, suites=DISTILL_LINEAR_SUITES)]


def _distill_tiny(device: str) -> list[Problem]:
    # Seconds on any machine (tests): small logits, and a small head with a wider teacher.
    return [make_problem(64, 512, torch.float32, device, suites=DISTILL_LOGITS_SUITES),
            make_problem(48, 1000, torch.float32, device, hidden=32, teacher_hidden=48, suites=DISTILL_LINEAR_SUITES)]


TRL_SUITES = ("linear_token_logprobs", "linear_distillation_jsd")
"""Issue #21: fastloss against TRL's fused LM head and chunked divergence (the ``trl`` implementations)."""


def _trl_cpu_goal(device: str) -> list[Problem]:
    # Issue #21's CPU goal: N=2048 tokens, D=1024, V=32768, fp32, log-probs + entropy forward + backward; the
    # divergence on the same head shape (GKD's beta 0.5; TRL's DistillationTrainer default).
    return [make_problem(2048, 32768, torch.float32, device, hidden=1024, suites=TRL_SUITES)]


def _trl_tiny(device: str) -> list[Problem]:
    return [make_problem(48, 1000, torch.float32, device, hidden=32, teacher_hidden=48, suites=TRL_SUITES)]


SPHERICAL_SUITES = ("spherical", "linear_spherical", "linear_cross_entropy")
"""Issue #25's suites (suites/spherical.py) and the linear cross-entropy on the same head, for comparison."""


def _spherical_tiny(device: str) -> list[Problem]:
    # Seconds on any machine (tests).
    return [make_problem(64, 512, torch.float32, device, suites=("spherical",)),
            make_problem(48, 1000, torch.float32, device, hidden=32,
                         suites=("linear_spherical", "linear_cross_entropy"))]


def _spherical_gpu_quick(device: str) -> list[Problem]:
    # The GPU script's Z-loss run: bf16 logits of the Llama 3 vocabulary, and the Llama-3-8B head (D=4096) with the
    # linear Z-loss next to the linear cross-entropy.
    n = 8192 if device == "cuda" else 256
    bf16 = torch.bfloat16
    return [make_problem(n, 128256, bf16, device, suites=("spherical",)),
            make_problem(n, 128256, bf16, device, hidden=4096, suites=("linear_spherical", "linear_cross_entropy"))]


PRESETS: dict[str, tuple[str, Callable[[str], list[Problem]]]] = {
    "default": ("small shapes; about a minute on a 2-core CPU", _default),
    "cpu-goal": ("N=4096 V=32768 fp32: the project's CPU performance goal", _cpu_goal),
    "llama3": ("Llama 3 vocabulary V=128256 (hidden 4096), N=8192 on CUDA", _model(128256, 4096)),
    "gemma2": ("Gemma 2 vocabulary V=256000 (hidden 3584, logit softcap 30 for CE), N=8192 on CUDA",
               _model(256000, 3584, softcap=30.0)),
    "gpt2": ("GPT-2 vocabulary V=50257 (hidden 768), N=8192 on CUDA", _model(50257, 768)),
    "gpu-sweep": ("V in 128..262144 with N*V ~ 2^28, bf16 and fp32 (CUDA)", _gpu_sweep),
    "topk": ("softmax_topk: V = 32K / 128K / 256K x k = 1 / 5 / 50, fp32", _topk),
    "gpu-quick": ("bench/gpu_check.sh's ~2 min GPU run: softmax, logsumexp, cross-entropy at N=8192 x V=128256 / "
                  "256000, linear CE on the Llama-3-8B head (D=4096), bf16, fwd+bwd", _gpu_quick),
    "distill-cpu-goal": ("issue #14's CPU goals: distillation / token log-probs at N=4096 V=32768, linear versions at "
                         "N=4096 D=1024 V=65536, fp32, fwd+bwd", _distill_cpu_goal),
    "distill-gpu-quick": ("distillation / token log-probs at N=8192 V=128256 bf16, linear versions on a D=2048 "
                          "student and D=4096 teacher head, fwd+bwd (CUDA)", _distill_gpu_quick),
    "distill-tiny": ("distillation suites on tiny shapes (seconds; tests)", _distill_tiny),
    "spherical-tiny": ("spherical Z-loss suites on tiny shapes (seconds; tests)", _spherical_tiny),
    "trl-cpu-goal": ("issue #21's CPU goal: fastloss against TRL's fused LM head (log-probs + entropy) and chunked "
                     "divergence at N=2048 D=1024 V=32768, fp32, fwd+bwd", _trl_cpu_goal),
    "trl-tiny": ("the TRL comparison suites on tiny shapes (seconds; tests)", _trl_tiny),
    "spherical-gpu-quick": ("the spherical Z-loss at N=8192 V=128256 bf16, the linear one on the Llama-3-8B head "
                            "(D=4096) next to linear cross-entropy, fwd+bwd (CUDA)", _spherical_gpu_quick),
}

PRESET_DEVICE: dict[str, str] = {"cpu-goal": "cpu", "gpu-sweep": "cuda", "gpu-quick": "cuda",
                                 "distill-cpu-goal": "cpu", "distill-gpu-quick": "cuda", "spherical-gpu-quick": "cuda",
                                 "trl-cpu-goal": "cpu"}
"""Presets that only make sense on one device pick it when ``--device`` is not given."""

PRESET_OPTIONS: dict[str, dict[str, Any]] = {
    "gpu-quick": {"suite": ",".join(LOGITS_SUITES + ("linear_cross_entropy", "linear_spherical")), "mode": "fwdbwd",
                  "min_time": 0.05, "max_repeats": 30},
    "distill-cpu-goal": {"suite": ",".join(DISTILL_DEFAULT_SUITES), "mode": "fwdbwd"},
    "distill-gpu-quick": {"suite": ",".join(DISTILL_DEFAULT_SUITES), "mode": "fwdbwd", "min_time": 0.05,
                          "max_repeats": 30},
    "distill-tiny": {"suite": ",".join(DISTILL_LOGITS_SUITES + DISTILL_LINEAR_SUITES)},
    "spherical-tiny": {"suite": ",".join(SPHERICAL_SUITES)},
    "trl-cpu-goal": {"suite": ",".join(TRL_SUITES), "mode": "fwdbwd"},
    "trl-tiny": {"suite": ",".join(TRL_SUITES)},
    "spherical-gpu-quick": {"suite": ",".join(SPHERICAL_SUITES), "mode": "fwdbwd", "min_time": 0.05,
                            "max_repeats": 30},
}
"""Command-line defaults a preset brings (``suite``, ``mode``, ``min_time``, ``max_repeats``): used for the
options not given on the command line; with several presets the first that sets one wins."""


def preset_options(names: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in names:
        for key, value in PRESET_OPTIONS.get(name, {}).items():
            out.setdefault(key, value)
    return out


def preset_problems(name: str, device: str) -> list[Problem]:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; expected one of {list(PRESETS)}")
    return PRESETS[name][1](device)


def explicit_problems(
    ns: list[int], vs: list[int], dtypes: list[torch.dtype], device: str, extras: Mapping[str, Any]
) -> list[Problem]:
    """The cartesian product of ``--n``, ``--v`` and ``--dtype`` lists."""
    return [make_problem(n, v, dt, device, **extras) for dt in dtypes for v in vs for n in ns]


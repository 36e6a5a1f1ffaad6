"""Result records and run metadata (the JSON schema is documented in :mod:`fastloss.bench`)."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import sys
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Optional

import torch

import fastloss

from .problems import Problem, dtype_name

STATUSES = ("ok", "skipped", "error")


@dataclass
class Result:
    """One (suite, mode, implementation, problem) measurement. Numeric fields are None unless status is "ok"
    (``peak_mem_mb`` is also None on CPU without ``--memory``; ``rel_err`` when the check itself failed)."""

    suite: str
    mode: str
    impl: str
    n: int
    v: int
    dtype: str
    device: str
    status: str = "ok"
    reason: str = ""
    time_ms: Optional[float] = None
    time_ms_min: Optional[float] = None
    repeats: Optional[int] = None
    gbps: Optional[float] = None
    copy_gbps: Optional[float] = None
    pct_copy: Optional[float] = None
    speedup_vs_eager: Optional[float] = None
    peak_mem_mb: Optional[float] = None
    rel_err: Optional[float] = None
    bytes_moved: Optional[int] = None
    compile_s: Optional[float] = None
    note: str = ""
    extras: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def for_problem(cls, suite: str, mode: str, impl: str, problem: Problem, **kw: Any) -> "Result":
        return cls(suite=suite, mode=mode, impl=impl, n=problem.n, v=problem.v, dtype=dtype_name(problem.dtype),
                   device=problem.device, extras=dict(problem.extras), **kw)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _peer_versions(modules: Iterable[str]) -> dict[str, Optional[str]]:
    """Version of each peer's top-level package, or None when it is not installed (does not import it)."""
    from importlib import metadata

    out: dict[str, Optional[str]] = {}
    for mod in sorted({m.split(".")[0] for m in modules}):
        dist = mod.replace("_", "-")
        try:
            out[mod] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[mod] = None
    return out


def collect_meta(devices: Iterable[str], peer_modules: Iterable[str], argv: list[str]) -> dict[str, Any]:
    """Everything needed to compare two runs: where, what versions, how many threads."""
    devices = sorted(set(devices))
    cuda = torch.cuda.is_available()
    meta: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device_name": torch.cuda.get_device_name() if ("cuda" in devices and cuda) else _cpu_name(),
        "devices": devices,
        "cpu_name": _cpu_name(),
        "torch_version": torch.__version__,
        "fastloss_version": fastloss.__version__,
        "fastloss_cuda_built": bool(fastloss.cuda_built),
        "python_version": platform.python_version(),
        "platform": platform.platform(),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "cuda": {
            "available": cuda,
            "version": torch.version.cuda,
            "device_count": torch.cuda.device_count() if cuda else 0,
            "capability": ".".join(map(str, torch.cuda.get_device_capability())) if cuda else None,
            "total_memory_gb": round(torch.cuda.get_device_properties(0).total_memory / 1e9, 1) if cuda else None,
        },
        "peers": _peer_versions(peer_modules),
        "argv": list(argv),
        "executable": sys.executable,
    }
    return meta


@dataclass
class RunReport:
    """A whole run: metadata, the copy bandwidth per problem, and the results in run order."""

    meta: dict[str, Any]
    copy_bandwidth_gbps: dict[str, float] = field(default_factory=dict)
    results: list[Result] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": 1,
            "meta": self.meta,
            "copy_bandwidth_gbps": self.copy_bandwidth_gbps,
            "results": [r.to_dict() for r in self.results],
        }


def copy_key(problem: Problem) -> str:
    """Key of ``copy_bandwidth_gbps``: ``"<device>:<dtype>:<N>x<V>"``."""
    return f"{problem.device}:{dtype_name(problem.dtype)}:{problem.n}x{problem.v}"

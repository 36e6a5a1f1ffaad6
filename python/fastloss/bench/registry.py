"""The suite / implementation registry.

A :class:`Suite` is one operation to benchmark (``softmax``, ``logsumexp``, later ``cross_entropy``...). It owns
everything that is the same for every implementation of that operation:

* ``make_inputs(problem, generator)``: the positional arguments every implementation is called with (random, never
  all zeros: a kernel that skips work on zeros would otherwise look fast);
* ``grad_inputs``: which of those arguments are differentiated in ``fwdbwd`` mode;
* ``output_shape(problem)``: the shape of the result, from which the upstream gradient of ``fwdbwd`` is drawn
  (standard normal, or ones for a scalar loss);
* ``bytes_moved(problem, mode)``: the minimum DRAM traffic of an ideal kernel, for the GB/s column;
* ``rel_error``: the relative error norm of an implementation's results against a float64 reference computed on the
  same input (see :mod:`fastloss.bench.accuracy`).

An :class:`Impl` is one way to compute the suite's operation. It is a factory ``make(problem) -> callable`` taking
the suite's inputs, plus declarative availability: ``requires`` (modules that must import: a peer library that is
missing is reported as ``skipped: <module> not importable``, never silently dropped), ``devices`` and an optional
``check(problem)`` for anything else. ``compiled=True`` wraps the callable in ``torch.compile`` (the runner
does it so compile time stays out of the timing and a compile failure is reported as skipped).

New operations register a Suite with :func:`register_suite`; new implementations are appended with
:meth:`Suite.add`. Nothing else in the benchmark needs to change.
"""

from __future__ import annotations

import fnmatch
import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch

from .problems import Problem

MODES = ("fwd", "fwdbwd")

Inputs = tuple[Any, ...]
"""Positional arguments of an implementation call (tensors, and possibly non-tensor constants)."""

ErrorFn = Callable[[Problem, Inputs, Optional[torch.Tensor], Any, Sequence[torch.Tensor], dict], float]
"""``rel_error(problem, inputs, grad_output or None, got_output, got_grads, cache) -> float``; ``cache`` is a dict
that lives as long as the inputs, for references shared by all implementations."""


@dataclass(frozen=True)
class Impl:
    """One implementation of a suite's operation."""

    name: str
    make: Callable[[Problem], Callable[..., Any]]
    """Factory: returns the callable that takes the suite's inputs and returns the output tensor (or loss)."""
    description: str = ""
    requires: tuple[str, ...] = ()
    """Modules that must import for this implementation to run (peer libraries)."""
    devices: tuple[str, ...] = ("cpu", "cuda")
    compiled: bool = False
    """Wrap the callable with ``torch.compile`` (compile time is excluded; a failing compile is a skip)."""
    check: Optional[Callable[[Problem], Optional[str]]] = None
    """Extra availability test: returns a reason to skip, or None."""
    baseline: bool = False
    """The reference point of the ``speedup_vs_eager`` column (torch eager)."""
    note: Optional[Callable[[Problem, Inputs], Optional[str]]] = None
    """Extra information for the report, e.g. which algorithm ``auto`` resolved to."""


@dataclass
class Suite:
    """One operation to benchmark, with its implementations (see the module docstring)."""

    name: str
    description: str
    make_inputs: Callable[[Problem, torch.Generator], Inputs]
    bytes_moved: Callable[[Problem, str], int]
    rel_error: ErrorFn
    output_shape: Callable[[Problem], tuple[int, ...]] = lambda p: (p.n, p.v)
    grad_inputs: tuple[int, ...] = (0,)
    default: bool = True
    """Part of the default ``--suite`` selection."""
    inputs_may_be_mutated: bool = False
    """Some peers write into their inputs (Liger's cross-entropy stores the gradient in the logits): then the error
    check runs on a fresh copy of pristine inputs."""
    impls: list[Impl] = field(default_factory=list)

    def add(self, impl: Impl) -> Impl:
        if any(i.name == impl.name for i in self.impls):
            raise ValueError(f"suite {self.name!r} already has an implementation named {impl.name!r}")
        self.impls.append(impl)
        return impl

    def grad_output(self, problem: Problem, gen: torch.Generator) -> torch.Tensor:
        """Upstream gradient for ``fwdbwd``: ones for a scalar loss, otherwise standard normal (never zeros)."""
        shape = self.output_shape(problem)
        if not shape:
            return torch.ones((), dtype=problem.dtype, device=problem.device)
        g = torch.randn(shape, generator=gen, dtype=torch.float32, device=problem.device)
        return g.to(problem.dtype)

    def baseline_name(self) -> Optional[str]:
        return next((i.name for i in self.impls if i.baseline), None)


SUITES: dict[str, Suite] = {}


def register_suite(suite: Suite) -> Suite:
    if suite.name in SUITES:
        raise ValueError(f"suite {suite.name!r} is already registered")
    SUITES[suite.name] = suite
    return suite


def unregister_suite(name: str) -> None:
    """Remove a suite (tests register throwaway suites)."""
    SUITES.pop(name, None)


# ---------------------------------------------------------------- availability

_import_cache: dict[str, Optional[str]] = {}


def import_problem(module: str) -> Optional[str]:
    """None when ``module`` imports, otherwise why not. Cached: a peer is probed once per process.

    Any exception counts, not just ImportError: a peer built on Triton can fail at import time on a CPU-only
    machine with a RuntimeError, and that still means "not usable here"."""
    if module not in _import_cache:
        try:
            importlib.import_module(module)
            _import_cache[module] = None
        except Exception as e:  # noqa: BLE001 (any import failure makes the peer unavailable)
            msg = str(e).splitlines()[0] if str(e) else ""
            _import_cache[module] = f"{module} not importable ({type(e).__name__}: {msg})"
    return _import_cache[module]


def skip_reason(impl: Impl, problem: Problem) -> Optional[str]:
    """Why ``impl`` cannot run on ``problem`` (the text after ``skipped:``), or None when it can."""
    for mod in impl.requires:
        why = import_problem(mod)
        if why:
            return why
    if problem.device not in impl.devices:
        return f"requires {' or '.join(impl.devices)} (problem is on {problem.device})"
    if impl.check is not None:
        return impl.check(problem)
    return None


def fastloss_kernel_check(*ops: str) -> Callable[[Problem], Optional[str]]:
    """Availability of fastloss's own kernels: every ``torch.ops.fastloss`` op in ``ops`` must exist and have a
    kernel for the problem's device (a library built without CUDA, or an op whose CUDA kernel has not landed yet,
    is a skip, not an error)."""

    def check(problem: Problem) -> Optional[str]:
        key = "CUDA" if problem.device == "cuda" else "CPU"
        for op in ops:
            try:
                ok = torch._C._dispatch_has_kernel_for_dispatch_key(f"fastloss::{op}", key)
            except RuntimeError:
                return f"torch.ops.fastloss.{op} does not exist in this build"
            if not ok:
                return f"torch.ops.fastloss.{op} has no {key} kernel in this build"
        return None

    return check


# ---------------------------------------------------------------- selection


def select_impls(suite: Suite, include: Optional[Sequence[str]], exclude: Sequence[str] = (),
                 no_compile: bool = False) -> list[Impl]:
    """Filter by shell-style patterns (``fastloss-*``).

    What the user asked for is exactly what runs: if the baseline is filtered out, ``speedup_vs_eager`` is null
    for the group rather than silently paying for an extra measurement."""
    out = []
    for impl in suite.impls:
        if include and not any(fnmatch.fnmatchcase(impl.name, p) for p in include):
            continue
        if any(fnmatch.fnmatchcase(impl.name, p) for p in exclude):
            continue
        if no_compile and impl.compiled:
            continue
        out.append(impl)
    return out

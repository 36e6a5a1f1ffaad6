"""Runs the selected suites x modes x implementations over the selected problems.

Order of work for one problem: measure the copy bandwidth of an [N, V] tensor, then for every suite build the
rotated input buffers once, and for every mode and implementation: check availability (skip with a reason), build
the callable (``torch.compile`` it after resetting dynamo, so every shape gets its own static compilation and never
hits the recompile limit), time it, check its result against the float64 reference on the first buffer, and
measure its peak memory. Failures are recorded per implementation and never stop the run.
"""

from __future__ import annotations

import gc
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch

from . import memory as mem
from .problems import Problem, dtype_name
from .registry import Impl, Suite, select_impls, skip_reason
from .results import Result, RunReport, collect_meta, copy_key
from .timing import L2Flusher, Timing, measure, rotation_count

Progress = Callable[[str], None]


@dataclass
class RunConfig:
    problems: list[Problem]
    suites: list[Suite]
    modes: tuple[str, ...] = ("fwd", "fwdbwd")
    include: Optional[list[str]] = None
    exclude: list[str] = field(default_factory=list)
    no_compile: bool = False
    repeats: Optional[int] = None
    warmup: int = 1
    min_time_s: Optional[float] = None
    """Target total time of the timed calls per measurement; None: 0.3 s on CPU, 0.25 s on CUDA."""
    max_repeats: int = 100
    flush_l2: bool = True
    cpu_memory: bool = False
    seed: int = 0
    time_budget_s: Optional[float] = None
    memory_cap_bytes: Optional[int] = None
    """Upper bound on the bytes of rotated input buffers; None: 2 GiB on CPU, 8 GiB on CUDA."""
    argv: list[str] = field(default_factory=list)
    on_group: Optional[Callable[[RunReport], None]] = None
    """Called with the report so far (``meta.complete`` false) after every (problem, suite, mode) group: the CLI
    rewrites its --json / --md files there, so a run cut short still leaves what it measured."""


def _short(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0][:300] if msg else ''}".rstrip(": ")


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


def _free(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def prepare_impl(impl: Impl, problem: Problem) -> Callable[..., Any]:
    """The implementation's callable; compiled ones are wrapped lazily (compilation happens on the first call)."""
    fn = impl.make(problem)
    if impl.compiled:
        torch._dynamo.reset()
        fn = torch.compile(fn, dynamic=False)
    return fn


def build_call(fn: Callable[..., Any], mode: str, bufs: Sequence[tuple], grad_outs: Optional[Sequence[torch.Tensor]],
               grad_inputs: tuple[int, ...]) -> Callable[[int], Any]:
    """``call(i)`` runs one forward (``fwd``) or forward + backward (``fwdbwd``) on buffer ``i`` and returns the
    output (``fwd``) or ``(output, input gradients)`` (``fwdbwd``).

    Backward uses ``torch.autograd.grad`` so gradients are returned, not accumulated into ``.grad`` (which would
    add a read-modify-write pass the implementations are not responsible for)."""
    if mode == "fwd":
        return lambda i: fn(*bufs[i])
    assert grad_outs is not None
    leaves = [tuple(t.detach().requires_grad_(True) if k in grad_inputs else t for k, t in enumerate(b)) for b in bufs]

    def call(i: int) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        inp = leaves[i]
        out = fn(*inp)
        g = grad_outs[i] if grad_outs[i].dtype == out.dtype else grad_outs[i].to(out.dtype)
        return out.detach(), torch.autograd.grad(out, [inp[k] for k in grad_inputs], g)

    return call


def _split(mode: str, returned: Any) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """(output, input gradients) from what a :func:`build_call` call returned."""
    return (returned, ()) if mode == "fwd" else returned


def _clone_inputs(inputs: tuple) -> tuple:
    return tuple(t.clone() if isinstance(t, torch.Tensor) else t for t in inputs)


def _restore(bufs: list[tuple], pristine: list[tuple]) -> None:
    with torch.no_grad():
        for buf, orig in zip(bufs, pristine):
            for t, o in zip(buf, orig):
                if isinstance(t, torch.Tensor):
                    t.copy_(o)


class Runner:
    """One benchmark run: holds the clock (for ``--time-budget`` and SIGTERM), the L2 flusher and the counters."""

    def __init__(self, cfg: RunConfig, progress: Progress) -> None:
        self.cfg = cfg
        self.progress = progress
        self.start = time.monotonic()
        self.interrupted = False
        self.flusher: Optional[L2Flusher] = None
        self.done = 0
        self.total = sum(
            len(select_impls(s, cfg.include, cfg.exclude, cfg.no_compile)) * len(cfg.modes)
            for p in cfg.problems for s in cfg.suites if p.runs(s.name)
        )

    # ------------------------------------------------------------ budget

    def _out_of_time(self) -> Optional[str]:
        if self.interrupted:
            return "run interrupted"
        if self.cfg.time_budget_s is not None and time.monotonic() - self.start > self.cfg.time_budget_s:
            return f"time budget of {self.cfg.time_budget_s:.0f} s exhausted"
        return None

    def _min_time(self, device: str) -> float:
        if self.cfg.min_time_s is not None:
            return self.cfg.min_time_s
        return 0.25 if device == "cuda" else 0.3

    def _mem_cap(self, device: str) -> int:
        if self.cfg.memory_cap_bytes is not None:
            return self.cfg.memory_cap_bytes
        return (8 if device == "cuda" else 2) * 2**30

    def _measure(self, call: Callable[[int], Any], device: str, n_buffers: int, compiled: bool = False) -> Timing:
        return measure(call, device=device, n_buffers=n_buffers, warmup=self.cfg.warmup, repeats=self.cfg.repeats,
                       min_time_s=self._min_time(device), max_repeats=self.cfg.max_repeats,
                       flush=self.flusher if device == "cuda" else None, compiled=compiled)

    # ------------------------------------------------------------ run

    def run(self) -> RunReport:
        cfg = self.cfg
        peers = [m for s in cfg.suites for i in s.impls for m in i.requires]
        report = RunReport(meta=collect_meta([p.device for p in cfg.problems], peers, cfg.argv))
        report.meta["config"] = {
            "modes": list(cfg.modes), "repeats": cfg.repeats, "warmup": cfg.warmup, "min_time_s": cfg.min_time_s,
            "max_repeats": cfg.max_repeats, "flush_l2": cfg.flush_l2, "seed": cfg.seed,
            "suites": [s.name for s in cfg.suites], "time_budget_s": cfg.time_budget_s,
        }
        report.meta["complete"] = False
        old_handler = None
        try:
            old_handler = signal.signal(signal.SIGTERM, self._on_sigterm)
        except ValueError:  # not the main thread
            pass
        try:
            for problem in cfg.problems:
                self._run_problem(problem, report)
        finally:
            if old_handler is not None:
                signal.signal(signal.SIGTERM, old_handler)
            self.flusher = None
        report.meta["wall_s"] = round(time.monotonic() - self.start, 1)
        report.meta["complete"] = True
        return report

    def _checkpoint(self, report: RunReport) -> None:
        if self.cfg.on_group is None:
            return
        report.meta["wall_s"] = round(time.monotonic() - self.start, 1)
        try:
            self.cfg.on_group(report)
        except Exception as e:  # noqa: BLE001 (a failed intermediate write must not stop the measurements)
            self.progress(f"   writing the partial report failed: {_short(e)}")

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        # `timeout` sends SIGTERM: finish the measurement under way, skip the rest, and still write the reports.
        self.interrupted = True
        self.progress("SIGTERM received: skipping the remaining measurements")

    def _run_problem(self, problem: Problem, report: RunReport) -> None:
        if problem.device == "cuda":
            if not torch.cuda.is_available():
                self._skip_all(problem, report, "CUDA is not available")
                return
            if self.cfg.flush_l2 and self.flusher is None:
                self.flusher = L2Flusher("cuda")
        suites = [s for s in self.cfg.suites if problem.runs(s.name)]
        if not suites:
            return
        self.progress(f"== {problem.label()}")
        # One copy-bandwidth measurement per (device, dtype, shape), shared by the problems that have that shape.
        copy_gbps = report.copy_bandwidth_gbps.get(copy_key(problem))
        if copy_gbps is None:
            copy_gbps = self._copy_bandwidth(problem)
            if copy_gbps is not None:
                report.copy_bandwidth_gbps[copy_key(problem)] = copy_gbps
        for suite in suites:
            self._run_suite(suite, problem, copy_gbps, report)

    def _skip_all(self, problem: Problem, report: RunReport, reason: str) -> None:
        for suite in self.cfg.suites:
            if not problem.runs(suite.name):
                continue
            for mode in self.cfg.modes:
                for impl in select_impls(suite, self.cfg.include, self.cfg.exclude, self.cfg.no_compile):
                    report.results.append(Result.for_problem(suite.name, mode, impl.name, problem, status="skipped",
                                                             reason=reason))
                    self.done += 1

    def _copy_bandwidth(self, problem: Problem) -> Optional[float]:
        """GB/s of ``dst.copy_(src)`` for an [N, V] tensor of the problem's dtype, counting read + write."""
        if self._out_of_time():
            return None
        nbytes = problem.numel * problem.elem_size
        try:
            nbuf = rotation_count(nbytes, self._mem_cap(problem.device))
            gen = torch.Generator(device=problem.device).manual_seed(self.cfg.seed)
            src = [torch.randn((problem.n, problem.v), generator=gen, device=problem.device).to(problem.dtype)
                   for _ in range(nbuf)]
            dst = torch.empty_like(src[0])
            t = self._measure(lambda i: dst.copy_(src[i]), problem.device, nbuf)
            gbps = 2 * nbytes / (t.median_ms * 1e-3) / 1e9
            self.progress(f"   copy bandwidth: {gbps:.1f} GB/s ({t.median_ms:.3f} ms, {nbuf} buffer(s))")
            return gbps
        except Exception as e:  # noqa: BLE001 (the benchmark goes on without the % of copy column)
            self.progress(f"   copy bandwidth failed: {_short(e)}")
            return None
        finally:
            src = dst = None  # noqa: F841
            _free(problem.device)

    def _run_suite(self, suite: Suite, problem: Problem, copy_gbps: Optional[float], report: RunReport) -> None:
        cfg = self.cfg
        impls = select_impls(suite, cfg.include, cfg.exclude, cfg.no_compile)
        if not impls:
            return
        runnable = [i for i in impls if skip_reason(i, problem) is None]
        bufs: list[tuple] = []
        pristine: list[tuple] = []  # copies of bufs when implementations may overwrite their inputs
        cache: dict = {}
        setup_error = ""
        if runnable and not self._out_of_time():
            try:
                gen = torch.Generator(device=problem.device).manual_seed(cfg.seed)
                first = suite.make_inputs(problem, gen)
                per_buf = sum(t.numel() * t.element_size() for t in first if isinstance(t, torch.Tensor))
                nbuf = rotation_count(per_buf, self._mem_cap(problem.device))
                bufs = [first] + [suite.make_inputs(problem, gen) for _ in range(nbuf - 1)]
                pristine = [_clone_inputs(b) for b in bufs] if suite.inputs_may_be_mutated else bufs
            except Exception as e:  # noqa: BLE001
                setup_error = f"building inputs failed: {_short(e)}"
                bufs = []
        try:
            for mode in cfg.modes:
                group: list[Result] = []
                grad_outs: Optional[list[torch.Tensor]] = None
                if mode == "fwdbwd" and bufs:
                    gen = torch.Generator(device=problem.device).manual_seed(cfg.seed + 1)
                    grad_outs = [suite.grad_output(problem, gen) for _ in bufs]
                for impl in impls:
                    if pristine is not bufs:  # undo what an earlier implementation wrote into its inputs
                        _restore(bufs, pristine)
                    res = self._run_impl(suite, impl, problem, mode, bufs, pristine[0] if bufs else (), grad_outs,
                                         cache, copy_gbps, setup_error)
                    group.append(res)
                    self.done += 1
                    self.progress(_progress_line(self.done, self.total, time.monotonic() - self.start, res))
                _fill_speedups(group, suite.baseline_name())
                report.results.extend(group)
                self._checkpoint(report)
        finally:
            bufs = []
            pristine = []
            cache.clear()
            _free(problem.device)

    def _run_impl(self, suite: Suite, impl: Impl, problem: Problem, mode: str, bufs: list[tuple], pristine: tuple,
                  grad_outs: Optional[list[torch.Tensor]], cache: dict, copy_gbps: Optional[float],
                  setup_error: str) -> Result:
        res = Result.for_problem(suite.name, mode, impl.name, problem)
        why = skip_reason(impl, problem) or self._out_of_time()
        if why:
            res.status, res.reason = "skipped", why
            return res
        if setup_error or not bufs:
            res.status, res.reason = "error", setup_error or "no inputs"
            return res
        device = problem.device
        try:
            fn = prepare_impl(impl, problem)
            call = build_call(fn, mode, bufs, grad_outs, suite.grad_inputs)
            timing = self._measure(call, device, len(bufs), compiled=impl.compiled)
        except Exception as e:  # noqa: BLE001 (recorded per implementation)
            _free(device)
            if impl.compiled and not _is_oom(e):
                res.status, res.reason = "skipped", f"torch.compile failed: {_short(e)}"
            else:
                res.status, res.reason = "error", ("out of memory: " if _is_oom(e) else "") + _short(e)
            return res

        res.time_ms, res.time_ms_min, res.repeats = timing.median_ms, timing.min_ms, timing.repeats
        if impl.compiled:
            res.compile_s = round(timing.first_call_s, 2)
        res.bytes_moved = suite.bytes_moved(problem, mode)
        res.gbps = res.bytes_moved / (timing.median_ms * 1e-3) / 1e9
        if copy_gbps:
            res.copy_gbps = copy_gbps
            res.pct_copy = 100.0 * res.gbps / copy_gbps
        notes = []
        if impl.note is not None:
            n = impl.note(problem, bufs[0])
            if n:
                notes.append(n)
        # The first (warm-up) call ran on buffer 0 as generated, so its result can be checked, unless the suite's
        # implementations may write into their inputs: their result may alias a buffer that later calls overwrote,
        # so call once more on a fresh copy.
        returned, timing.first_output = timing.first_output, None
        try:
            if suite.inputs_may_be_mutated:
                returned = None
                returned = build_call(fn, mode, [_clone_inputs(pristine)], grad_outs[:1] if grad_outs else None,
                                      suite.grad_inputs)(0)
            got, grads = _split(mode, returned)
            g0 = grad_outs[0] if grad_outs is not None else None
            res.rel_err = float(suite.rel_error(problem, pristine, g0, got, grads, cache))
        except Exception as e:  # noqa: BLE001 (a failed check leaves rel_err null and says why)
            notes.append(f"error check failed: {_short(e)}")
        finally:
            returned = got = grads = None  # release before the memory measurement
            if device == "cuda":
                _free(device)
        try:
            if device == "cuda":
                res.peak_mem_mb = mem.cuda_peak_mb(lambda: call(0))
            elif self.cfg.cpu_memory:
                res.peak_mem_mb, note = mem.cpu_peak_mb_subprocess(self._probe_spec(suite, impl, problem, mode))
                if note:
                    notes.append(note)
        except Exception as e:  # noqa: BLE001
            notes.append(f"memory measurement failed: {_short(e)}")
            _free(device)
        res.note = "; ".join(notes)
        return res

    def _probe_spec(self, suite: Suite, impl: Impl, problem: Problem, mode: str) -> dict[str, Any]:
        return {"suite": suite.name, "impl": impl.name, "mode": mode, "n": problem.n, "v": problem.v,
                "dtype": dtype_name(problem.dtype), "device": problem.device, "extras": dict(problem.extras),
                "seed": self.cfg.seed, "threads": torch.get_num_threads()}


def _fill_speedups(group: list[Result], baseline: Optional[str]) -> None:
    base = next((r for r in group if r.impl == baseline and r.status == "ok"), None)
    if base is None or not base.time_ms:
        return
    for r in group:
        if r.status == "ok" and r.time_ms:
            r.speedup_vs_eager = base.time_ms / r.time_ms


def _progress_line(done: int, total: int, elapsed_s: float, r: Result) -> str:
    width = len(str(total))
    head = f"[{done:>{width}}/{total} {elapsed_s:5.0f}s] {r.suite} {r.mode} {r.impl} N={r.n} V={r.v} {r.dtype}"
    if r.status == "ok":
        err = f"{r.rel_err:.1e}" if r.rel_err is not None else "n/a"
        return f"{head}: {r.time_ms:.3f} ms, {r.gbps:.1f} GB/s, rel_err {err}"
    return f"{head}: {r.status}: {r.reason}"


def run(cfg: RunConfig, progress: Optional[Progress] = None) -> RunReport:
    """Run the benchmark described by ``cfg``; ``progress`` receives one line per measurement (default: stderr)."""
    if progress is None:
        def progress(line: str) -> None:
            print(line, file=sys.stderr, flush=True)
    return Runner(cfg, progress).run()

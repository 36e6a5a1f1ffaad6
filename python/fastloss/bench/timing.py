"""Timing: warm-up, then the median of repeated calls, with inputs rotated so none is cache-resident.

CUDA: every call is bracketed by its own pair of CUDA events (so host overhead between calls is not counted) and,
unless disabled, preceded by a write of a 256 MiB buffer that evicts L2 (50 MiB on an H100); the flush runs
before the start event, so it is not timed. CPU: ``time.perf_counter`` around each call (CPU ops are synchronous),
with the garbage collector paused so a collection does not land inside one sample.

Inputs are rotated among several buffers (``n_buffers``, see :func:`rotation_count`) so a call never reads what
the previous call left in cache. The median is reported because the samples on a shared machine have a long
right tail; ``min`` is kept alongside.
"""

from __future__ import annotations

import gc
import math
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

FLUSH_BYTES = 256 * 2**20
ROTATE_BYTES = 256 * 2**20
"""Rotate among enough input buffers to touch at least this much memory between two uses of one buffer."""
MAX_BUFFERS = 8


@dataclass
class Timing:
    median_ms: float
    min_ms: float
    repeats: int
    first_call_s: float
    """Duration of the first warm-up call: for torch.compile this is (mostly) the compile time."""
    first_output: Any = None
    """What the first call (on buffer 0) returned, so the accuracy check need not call again."""


def rotation_count(bytes_per_buffer: int, memory_cap_bytes: int) -> int:
    """How many input buffers to rotate through: enough to exceed :data:`ROTATE_BYTES`, at most
    :data:`MAX_BUFFERS`, and never more than ``memory_cap_bytes`` of inputs (at least one)."""
    want = math.ceil(ROTATE_BYTES / max(1, bytes_per_buffer))
    cap = max(1, memory_cap_bytes // max(1, bytes_per_buffer))
    return max(1, min(want, MAX_BUFFERS, cap))


class L2Flusher:
    """Writes a 256 MiB buffer to evict the GPU's L2 between timed calls."""

    def __init__(self, device: str) -> None:
        self.buf = torch.empty(FLUSH_BYTES // 4, dtype=torch.int32, device=device)

    def __call__(self) -> None:
        self.buf.fill_(1)


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def measure(
    call: Callable[[int], Any],
    *,
    device: str,
    n_buffers: int,
    warmup: int,
    repeats: Optional[int],
    min_time_s: float,
    max_repeats: int,
    flush: Optional[L2Flusher] = None,
    compiled: bool = False,
) -> Timing:
    """Time ``call(buffer_index)``.

    ``warmup`` calls run first (at least one: it compiles, allocates, faults pages in; with ``compiled`` one more,
    since the first call is mostly compilation). With ``repeats=None`` the number of timed calls is chosen from
    the last warm-up call so that they take about ``min_time_s`` in total, clamped to [3, max_repeats].
    """
    t0 = time.perf_counter()
    first_output = call(0)
    synchronize(device)
    first = time.perf_counter() - t0
    last = first
    for i in range(1, max(1, warmup) + int(compiled)):
        t0 = time.perf_counter()
        call(i % n_buffers)
        synchronize(device)
        last = time.perf_counter() - t0
    if repeats is None:
        repeats = int(min(max_repeats, max(3, math.ceil(min_time_s / max(last, 1e-6)))))
    samples = _timed_cuda(call, n_buffers, repeats, flush) if device == "cuda" else _timed_cpu(call, n_buffers,
                                                                                               repeats)
    return Timing(statistics.median(samples), min(samples), repeats, first, first_output)


def _timed_cpu(call: Callable[[int], Any], n_buffers: int, repeats: int) -> list[float]:
    samples = []
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for r in range(repeats):
            t0 = time.perf_counter()
            out = call(r % n_buffers)
            t1 = time.perf_counter()
            del out  # freed outside the timed region, like the previous call's output in a training step
            samples.append((t1 - t0) * 1e3)
    finally:
        if gc_was_enabled:
            gc.enable()
    return samples


def _timed_cuda(call: Callable[[int], Any], n_buffers: int, repeats: int, flush: Optional[L2Flusher]) -> list[float]:
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    for r in range(repeats):
        if flush is not None:
            flush()
        starts[r].record()
        out = call(r % n_buffers)
        ends[r].record()
        del out
    torch.cuda.synchronize()
    return [s.elapsed_time(e) for s, e in zip(starts, ends)]

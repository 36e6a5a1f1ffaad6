"""Peak memory of one call, above what existed before it (inputs, upstream gradients, other buffers).

CUDA: ``torch.cuda.reset_peak_memory_stats`` then ``max_memory_allocated() - memory_allocated()`` around one call,
in the benchmark process. The figure includes the outputs and gradients the call returns, which is what a training
step has to hold.

CPU (``--memory``): each implementation runs in a fresh subprocess (``python -m fastloss.bench.memory_probe SPEC``), so
nothing the parent allocated or cached counts. The subprocess builds the inputs, warms the implementation up (which
compiles it), and then measures one more call as an increase of the resident set size over a baseline taken just
before it:

* Linux: writing ``5`` to ``/proc/self/clear_refs`` resets the peak RSS (``VmHWM``) to the current RSS, so the
  peak of that one call is ``VmHWM - VmRSS``, compilation excluded.
* elsewhere: ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` is the process-lifetime maximum and cannot be reset,
  so there is no warm-up: baseline after the inputs, one call, read again. For ``torch.compile`` the figure then
  includes compilation (the result's reason says so).

glibc keeps freed small blocks in its heap, which would hide the measured call's allocations behind the warm-up's;
the subprocess therefore runs with ``MALLOC_MMAP_THRESHOLD_=65536`` so buffers of 64 KiB and more come from and go
back to the kernel.
"""

from __future__ import annotations

import gc
import json
import os
import resource
import subprocess
import sys
from typing import Any, Callable, Optional

import torch

MIB = 2**20


def cuda_peak_mb(run_once: Callable[[], Any]) -> float:
    torch.cuda.synchronize()
    gc.collect()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = run_once()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del out
    return peak / MIB


def status_kib(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0). False when unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    hwm, rss = status_kib("VmHWM"), status_kib("VmRSS")
    return hwm is not None and rss is not None and hwm <= rss + 1024


def maxrss_kib() -> int:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r // 1024 if sys.platform == "darwin" else r  # bytes on macOS, KiB on Linux


def cpu_peak_mb_subprocess(spec: dict[str, Any], timeout_s: float = 600.0) -> tuple[Optional[float], str]:
    """Run :mod:`fastloss.bench.memory_probe` in a fresh interpreter. Returns (peak MiB or None, note)."""
    env = dict(os.environ)
    env.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
    try:
        proc = subprocess.run([sys.executable, "-m", "fastloss.bench.memory_probe", json.dumps(spec)], env=env,
                              capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return None, f"memory probe timed out after {timeout_s:.0f} s"
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            data = json.loads(line)
            return data.get("peak_mb"), data.get("note", "")
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return None, f"memory probe failed (exit {proc.returncode}): {tail}"

"""The child side of the CPU peak-memory measurement (:func:`fastloss.bench.memory.cpu_peak_mb_subprocess`): one
call of one implementation in a fresh interpreter, ``python -m fastloss.bench.memory_probe SPEC``. Its own module
(on top of the runner and the suites) so that :mod:`fastloss.bench.memory`, which the runner uses, imports neither."""

from __future__ import annotations

import gc
import json
import sys
from typing import Any

import torch

from .memory import maxrss_kib, reset_peak_rss, status_kib
from .problems import make_problem, parse_dtype
from .registry import SUITES
from .runner import build_call, prepare_impl
from .suites import select_suites


def probe(spec: dict[str, Any]) -> dict[str, Any]:
    """Child side: measure one call of one implementation (see the module docstring)."""
    torch.set_num_threads(int(spec["threads"]))
    select_suites("all")
    suite = SUITES[spec["suite"]]
    impl = next(i for i in suite.impls if i.name == spec["impl"])
    problem = make_problem(spec["n"], spec["v"], parse_dtype(spec["dtype"]), spec["device"], **spec["extras"])
    gen = torch.Generator(device=problem.device).manual_seed(int(spec["seed"]))
    bufs = [suite.make_inputs(problem, gen)]
    grads = [suite.grad_output(problem, gen)] if spec["mode"] == "fwdbwd" else None
    call = build_call(prepare_impl(impl, problem), spec["mode"], bufs, grads, suite.grad_inputs)

    resettable = reset_peak_rss()
    note = ""
    if resettable:
        out = call(0)  # warm-up: compiles, loads kernels, faults in code pages
        del out
        gc.collect()
        reset_peak_rss()
        base = status_kib("VmRSS") or 0
        out = call(0)
        peak = (status_kib("VmHWM") or 0) - base
    else:
        gc.collect()
        base = maxrss_kib()
        out = call(0)
        peak = maxrss_kib() - base
        if impl.compiled:
            note = "peak RSS includes compilation (no peak reset on this OS)"
    del out
    return {"peak_mb": max(0, peak) / 1024, "note": note}


if __name__ == "__main__":
    print(json.dumps(probe(json.loads(sys.argv[1]))), flush=True)

"""fastloss-bench: microbenchmarks of fastloss against torch eager, torch.compile and peer libraries.

Run ``fastloss-bench --help`` (or ``python -m fastloss.bench``). Modules:

* :mod:`.cli`: arguments and ``main()``;
* :mod:`.problems`: shapes and presets;
* :mod:`.registry`: suites (operations) and their implementations; :mod:`.suites` registers the built-in ones;
* :mod:`.timing`: warm-up, rotated inputs, L2 flush, median of repeats;
* :mod:`.accuracy`: relative error against float64 references;
* :mod:`.memory`: peak memory per implementation (CUDA allocator stats; CPU peak RSS in a subprocess);
* :mod:`.runner`: the loop over problems x suites x modes x implementations;
* :mod:`.report`: text table, Markdown, JSON and plot.

JSON schema (``--json FILE``; ``schema_version`` 1). Units: times in milliseconds, bandwidths in GB/s (10^9
bytes/s), memory in MiB (2^20 bytes)::

    {
      "schema_version": 1,
      "meta": {
        "date": str,                 # ISO 8601, UTC
        "device_name": str,          # GPU name on CUDA runs, CPU model otherwise
        "devices": [str],            # devices of the problems ("cpu", "cuda")
        "cpu_name": str,
        "torch_version": str, "fastloss_version": str, "fastloss_cuda_built": bool,
        "python_version": str, "platform": str,
        "threads": int,              # torch.get_num_threads() during the run
        "cpu_count": int,
        "cuda": {"available": bool, "version": str|null, "device_count": int, "capability": str|null,
                 "total_memory_gb": float|null},
        "peers": {module: version|null},   # peer libraries, null when not installed
        "argv": [str], "executable": str,
        "config": {"modes": [str], "repeats": int|null, "warmup": int, "min_time_s": float|null,
                   "max_repeats": int, "flush_l2": bool, "seed": int, "suites": [str],
                   "time_budget_s": float|null},
        "complete": bool,            # false in the copies written during the run (after every group of
                                     # measurements), true in the final one
        "wall_s": float              # seconds since the start (so far, when incomplete)
      },
      "copy_bandwidth_gbps": {"<device>:<dtype>:<N>x<V>": float},   # dst.copy_(src) of an [N, V] tensor
      "results": [
        {
          "suite": str, "mode": "fwd"|"fwdbwd", "impl": str,
          "n": int, "v": int, "dtype": str, "device": str,
          "status": "ok"|"skipped"|"error",
          "reason": str,               # why skipped / what failed; "" when ok
          "time_ms": float|null,       # median over repeats
          "time_ms_min": float|null, "repeats": int|null,
          "gbps": float|null,          # bytes_moved / time_ms
          "copy_gbps": float|null,     # the copy bandwidth of this problem's [N, V] tensor
          "pct_copy": float|null,      # 100 * gbps / copy_gbps
          "speedup_vs_eager": float|null,   # torch eager's time / this time (same suite, mode, problem)
          "peak_mem_mb": float|null,   # peak allocation of one call above what existed before it (outputs
                                       # included); CUDA always, CPU with --memory only
          "rel_err": float|null,       # ||got - ref|| / ||ref||, ref in float64 on the same input; fwdbwd: max
                                       # over the output and the input gradients
          "bytes_moved": int|null,     # the suite's minimum-traffic model for this mode
          "compile_s": float|null,     # torch.compile: duration of the first (compiling) call
          "note": str,                 # e.g. "auto=online", or why rel_err / peak_mem_mb is missing
          "extras": {str: any}         # problem extras (hidden, softcap)
        }
      ]
    }

Status "skipped" means the implementation could not run here (a peer library that does not import, a device it
does not support, a torch.compile failure, the time budget); "error" means it ran and failed.
"""

from .cli import main

__all__ = ["main"]

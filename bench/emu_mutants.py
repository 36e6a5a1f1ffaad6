#!/usr/bin/env python3
"""Plants defects in the CUDA kernels, one at a time, in a scratch copy of the tree, and reports which the emulated
test suite (make test-emu's build: the CUDA kernels on the CPU execution layer) catches.

Each mutant is one textual change to csrc/cuda/*: a removed __syncthreads in a block reduction, a warp reduction
that skips its first exchange, a shuffle width of 16 where 32 is needed, an off-by-one in a row tail, a shared
slot indexed by the lane where the warp was meant, and a few more of the same kinds. For each, the scratch copy is
built with FASTLOSS_CUDA_EMU=ON (one build folder for all, so only the changed files recompile) and the kernel
tests run on it with the mixed schedule until the first failure. Nothing here touches the working tree; the
mutants are never committed.

With --sanitize the scratch copy is built with AddressSanitizer + UndefinedBehaviorSanitizer and the mutants are
those that leave results right but touch memory they must not (a write past a row, misaligned vector loads); the
kernel workload (bench/gpu_workload.py, as in make test-emu) runs under the sanitizers.

Usage:  python bench/emu_mutants.py [--python PY] [--only NAME,...] [--tests "pytest args"] [--keep DIR] [--sanitize]
Exit:   0 every mutant caught (and the unmutated copy passes), 1 otherwise.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# name -> (file, text, replacement, what it plants). Each text must occur exactly once.
MUTANTS = {
    "block-reduce-no-barrier": (
        "csrc/cuda/row_reduce.cuh",
        "  if (lane == 0) warp_part[warp] = s;\n  __syncthreads();\n",
        "  if (lane == 0) warp_part[warp] = s;\n",
        "block_allreduce: the __syncthreads between writing the per-warp slots and reading them removed",
    ),
    "block-reduce-no-leading-barrier": (
        "csrc/cuda/row_reduce.cuh",
        "  s = warp_allreduce<kWarpSize>(s);\n  __syncthreads();\n",
        "  s = warp_allreduce<kWarpSize>(s);\n",
        "block_allreduce: the leading barrier removed (a slot rewritten while another warp still reads it)",
    ),
    "warp-reduce-skips-first-exchange": (
        "csrc/cuda/row_reduce.cuh",
        "for (int off = kWidth / 2; off > 0; off /= 2)",
        "for (int off = kWidth / 4; off > 0; off /= 2)",
        "warp_allreduce: the first butterfly exchange (offset kWidth / 2) skipped",
    ),
    "shuffle-width-16": (
        "csrc/cuda/row_reduce.cuh",
        "  s = warp_allreduce<kWarpSize>(s);\n  __syncthreads();\n",
        "  s = warp_allreduce<16>(s);\n  __syncthreads();\n",
        "block_allreduce: the warp reduction with width 16 where the whole warp (32) is needed",
    ),
    "row-tail-off-by-one": (
        "csrc/cuda/row_reduce.cuh",
        "  for (int64_t j = head + nvec * kVec + tid; j < n; j += nthreads) scalar(j);\n}\n\n// Elementwise visit",
        "  for (int64_t j = head + nvec * kVec + tid; j < n - 1; j += nthreads) scalar(j);\n}\n\n// Elementwise visit",
        "segment_visit: the scalar tail of a row stops one element short",
    ),
    "shared-slot-by-lane": (
        "csrc/cuda/row_reduce.cuh",
        "  if (lane == 0) warp_part[warp] = s;",
        "  if (lane == 0) warp_part[lane] = s;",
        "block_allreduce: the per-warp slot indexed by the lane instead of the warp",
    ),
    "warp-path-tail-off-by-one": (
        "csrc/cuda/softmax_cuda.cu",
        "      if (e < row.extras) v[kItems + x] = static_cast<acc>(p[row.extra_col(e)]);",
        "      if (e + 1 < row.extras) v[kItems + x] = static_cast<acc>(p[row.extra_col(e)]);",
        "warp_load: a row's last head / tail element read as padding",
    ),
    "ce-group-reduce-no-barrier": (
        "csrc/cuda/cross_entropy_cuda.cu",
        "  if (lane == 0) part[warp] = s;\n  __syncthreads();\n",
        "  if (lane == 0) part[warp] = s;\n",
        "cross-entropy group_allreduce: the barrier between writing and reading the per-warp slots removed",
    ),
    "topk-no-rescan": (
        "csrc/cuda/softmax_topk_kernel.cuh",
        "if (list.empty() && more && q + 1 < k) {",
        "if (false) {",
        "softmax_topk: a thread that gives more than its 8 listed winners never rescans its share",
    ),
    # For the sanitizer run (--sanitize): defects that leave the results right on x86 but touch memory they must not.
    "row-tail-writes-past-the-end": (
        "csrc/cuda/row_reduce.cuh",
        "  for (int64_t j = head + nvec * kVec + tid; j < n; j += nthreads) scalar(j);\n}\n\n// -----",
        "  for (int64_t j = head + nvec * kVec + tid; j <= n; j += nthreads) scalar(j);\n}\n\n// -----",
        "segment_map: the scalar tail writes one element past the segment (the next row's first, or past the tensor)",
    ),
    "vector-loads-misaligned": (
        "csrc/cuda/row_reduce.cuh",
        "  return head < n ? head : n;",
        "  return 0;",
        "aligned_head: no scalar head, so a row that does not start on a 16-byte boundary is read with misaligned "
        "16-byte vector loads",
    ),
}
SANITIZE_ONLY = {"row-tail-writes-past-the-end", "vector-loads-misaligned"}

DEFAULT_TESTS = ["tests/test_cuda_emu.py", "tests/test_softmax.py", "tests/test_cross_entropy.py",
                 "tests/test_softmax_topk.py", "-x", "-q", "-p", "no:cacheprovider", "-k", "not test_emulated"]


def _run(cmd, env=None, cwd=None, timeout=1800):
    return subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--python", default=sys.executable, help="a Python whose environment has torch and the build "
                                                            "tools (e.g. .venv-emu/bin/python)")
    p.add_argument("--only", default="", help="comma list of mutant names (default: all)")
    p.add_argument("--tests", default=None, help="pytest arguments (default: the kernel tests, -x)")
    p.add_argument("--keep", default=None, help="scratch folder to use and keep (default: a temporary one)")
    p.add_argument("--sanitize", action="store_true",
                   help="build with -fsanitize=address,undefined and run bench/gpu_workload.py under it instead of "
                        "the tests (make test-emu's sanitizer run); default mutants: the memory ones")
    args = p.parse_args(argv)
    names = [n for n in args.only.split(",") if n] or [
        n for n in MUTANTS if (n in SANITIZE_ONLY) == args.sanitize]
    bad = [n for n in names if n not in MUTANTS]
    if bad:
        p.error(f"unknown mutants {bad}; known: {list(MUTANTS)}")
    tests = args.tests.split() if args.tests else DEFAULT_TESTS
    args.python = os.path.abspath(args.python)  # (not resolved: a venv's python is a symlink)

    scratch = Path(args.keep or tempfile.mkdtemp(prefix="fastloss-mutants-"))
    src, site, build = scratch / "src", scratch / "site", scratch / "build"
    if src.exists():
        shutil.rmtree(src)
    # copy (not copy2): fresh modification times, so a kept build folder recompiles what differs from its last build
    shutil.copytree(ROOT, src, copy_function=shutil.copy, ignore=shutil.ignore_patterns(".git", ".venv*", "build", "*.egg-info", "__pycache__",
                                                                ".whl", "results"))
    originals = {f: (src / f).read_text() for f, *_ in MUTANTS.values()}
    env = dict(os.environ, FASTLOSS_CUDA_EMU="ON", FASTLOSS_EMU_SCHEDULE="mix", PYTHONPATH=str(site))
    env.pop("FASTLOSS_SANITIZE", None)
    run_env = env
    if args.sanitize:
        env["FASTLOSS_SANITIZE"] = "address,undefined"
        cxx = os.environ.get("CXX") or shutil.which("g++") or "c++"
        # libstdc++ preloaded too: ASan's __cxa_throw interceptor must find it at start-up (python does not link it)
        libs = [subprocess.run([cxx, f"-print-file-name={lib}"], capture_output=True, text=True).stdout.strip()
                for lib in ("libasan.so", "libstdc++.so.6")]
        run_env = dict(env, LD_PRELOAD=" ".join(libs), ASAN_OPTIONS="detect_leaks=0",
                       UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1")
        tests = None

    def build_and_test(label: str) -> tuple[str, float]:
        t0 = time.monotonic()
        b = _run([args.python, "-m", "pip", "install", "-q", "--no-build-isolation", "--no-deps", "--upgrade",
                  "-C", f"build-dir={build}", "--target", str(site), str(src)], env=env)
        if b.returncode != 0:
            return f"build failed: {b.stderr[-400:]}", time.monotonic() - t0
        if tests is None:  # the sanitizer's workload
            t = _run([args.python, "bench/gpu_workload.py", "--device", "cpu", "--size", "small"], env=run_env, cwd=src)
            out = t.stdout + t.stderr
            report = next((ln.strip() for ln in out.splitlines() if "ERROR: AddressSanitizer" in ln
                           or "runtime error:" in ln or ln.startswith("gpu_workload:") and "failure" in ln), "")
            return ("passed" if t.returncode == 0 else f"failed: {report[:250]}"), time.monotonic() - t0
        t = _run([args.python, "-m", "pytest", *tests], env=run_env, cwd=src)
        last = [ln for ln in t.stdout.splitlines() if ln.strip()][-1:] or ["(no output)"]
        first_fail = next((ln for ln in t.stdout.splitlines() if ln.startswith("FAILED") or ln.startswith("ERROR")),
                          "")
        return ("passed" if t.returncode == 0 else f"failed: {first_fail or last[0]}"), time.monotonic() - t0

    print(f"emu_mutants: scratch copy at {scratch}", flush=True)
    status, secs = build_and_test("unmutated")
    print(f"  {'(unmutated)':34s} {status}  [{secs:.0f} s]", flush=True)
    ok = status == "passed"
    for name in names:
        f, text, repl, what = MUTANTS[name]
        body = originals[f]
        if body.count(text) != 1:
            print(f"  {name:34s} NOT APPLIED: the text to mutate occurs {body.count(text)} times in {f}")
            ok = False
            continue
        for g, orig in originals.items():
            (src / g).write_text(orig)
        (src / f).write_text(body.replace(text, repl))
        status, secs = build_and_test(name)
        caught = status.startswith("failed")
        ok &= caught
        print(f"  {name:34s} {'CAUGHT' if caught else 'MISSED'}  [{secs:.0f} s]  {what}\n"
              f"  {'':34s} {status[:300]}", flush=True)
    if not args.keep:
        shutil.rmtree(scratch, ignore_errors=True)
    print("emu_mutants: every mutant caught" if ok else "emu_mutants: some mutant was missed (or the base failed)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

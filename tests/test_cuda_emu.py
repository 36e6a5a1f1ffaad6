"""The CUDA execution layer for the CPU (csrc/cuda_emu), built with the host compiler (warnings as errors) and once
more under AddressSanitizer + UndefinedBehaviorSanitizer:
* its self-test: CUDA's shuffle, vote and barrier semantics under every schedule, deadlocks reported as errors, and
  the planted bugs (missing __syncthreads, skipped warp exchange, wrong shuffle width, off-by-one row tail, shared
  slot by lane instead of warp, slot reused without a leading barrier) caught;
* fastloss's own CUDA kernel bodies run on it (softmax_topk today) against a long-double reference."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EMU = ROOT / "csrc" / "cuda_emu"
CXX = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
pytestmark = pytest.mark.skipif(CXX is None or not EMU.exists(), reason="needs a C++ compiler and the source tree")

SANITIZERS = {
    "plain": ["-O2", "-Werror"],
    "asan-ubsan": ["-O1", "-fsanitize=address,undefined", "-fno-sanitize-recover=undefined", "-fno-omit-frame-pointer"],
}


PROGRAMS = {
    "selftest": ["selftest.cpp"],
    # the kernel headers compiled as C++ with the layer force-included (the .cu files stay nvcc's)
    "kernels": ["kernel_tests.cpp", "-include", str(EMU / "cuda_emu.h"), f"-I{ROOT / 'csrc' / 'include'}",
                f"-I{ROOT / 'csrc' / 'cuda'}", "-Wno-unknown-pragmas"],
}


CASES = [pytest.param(p, f, marks=[pytest.mark.slow] if (p, f) == ("kernels", "asan-ubsan") else [])
         for p in PROGRAMS for f in SANITIZERS]  # ASan's fiber switches make the kernel run take minutes


@pytest.mark.parametrize("program,flavour", CASES)
def test_emulated(program, flavour, tmp_path):
    exe = tmp_path / program
    main, *extra = PROGRAMS[program]
    cmd = [CXX, "-std=c++20", "-g", "-Wall", "-Wextra", *SANITIZERS[flavour], f"-I{EMU}", *extra,
           str(EMU / "cuda_emu.cpp"), str(EMU / main), "-o", str(exe)]
    build = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if flavour != "plain" and build.returncode != 0 and "sanitize" in build.stderr:
        pytest.skip(f"{CXX} cannot build with sanitizers here: {build.stderr[-300:]}")
    assert build.returncode == 0, build.stderr
    env = dict(os.environ, ASAN_OPTIONS="detect_leaks=0", UBSAN_OPTIONS="print_stacktrace=1")
    args = ["quick"] if flavour != "plain" else []  # fewer schedules under the sanitizers (fiber switches are slow)
    run = subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=600, env=env)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "0 failed" in run.stdout and "runtime error" not in run.stderr, run.stdout + run.stderr

"""CMake's FASTLOSS_CUDA decision (configure step only, a few seconds each), against the torch this suite runs with
and fake CUDA toolkits: OFF always configures CPU-only, AUTO falls back to CPU-only with one line saying why, ON
fails naming what is missing. The real builds of each configuration (no toolkit, OFF, newest torch, CPU torch) run
in .ci/run."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CMAKE = shutil.which("cmake", path=os.path.dirname(sys.executable)) or shutil.which("cmake")
pytestmark = pytest.mark.skipif(CMAKE is None or not (ROOT / "CMakeLists.txt").exists(),
                                reason="needs cmake and the source tree")


def _fake_toolkit(tmp_path: Path, version_line: str, rc: int = 0) -> Path:
    root = tmp_path / "fake-cuda"
    (root / "bin").mkdir(parents=True)
    (root / "include").mkdir()
    (root / "include" / "cuda_runtime.h").write_text("")
    nvcc = root / "bin" / "nvcc"
    nvcc.write_text(f"#!/bin/sh\necho '{version_line}'\nexit {rc}\n")
    nvcc.chmod(0o755)
    return root


def _configure(tmp_path: Path, mode: str, cuda_home=None):
    env = {k: v for k, v in os.environ.items() if k not in ("CUDA_HOME", "CUDA_PATH", "FASTLOSS_CUDA")}
    if cuda_home is not None:
        env["CUDA_HOME"] = str(cuda_home)
    env["FASTLOSS_CUDA"] = mode
    proc = subprocess.run([CMAKE, "-S", str(ROOT), "-B", str(tmp_path / "build"), f"-DPython_EXECUTABLE={sys.executable}"],
                          env=env, capture_output=True, text=True, timeout=300)
    return proc.returncode, proc.stdout + proc.stderr


def test_off_is_cpu_only_whatever_torch_is(tmp_path):
    rc, out = _configure(tmp_path, "OFF")
    assert rc == 0, out
    assert "fastloss: CPU-only build (FASTLOSS_CUDA=OFF)" in out
    assert "Caffe2" not in out  # torch's CUDA config (which demands a toolkit) is never loaded


@pytest.mark.skipif(torch.version.cuda is not None, reason="for a CPU-only torch")
def test_cpu_torch_auto_and_on(tmp_path):
    rc, out = _configure(tmp_path, "AUTO")
    assert rc == 0 and "CPU-only build (torch" in out and "is a CPU-only build" in out, out
    rc, out = _configure(tmp_path, "ON")
    assert rc != 0 and "FASTLOSS_CUDA=ON but CUDA cannot be built" in out and "CPU-only build" in out, out


@pytest.mark.skipif(torch.version.cuda is None, reason="for a CUDA build of torch")
def test_cuda_torch_with_a_broken_compiler(tmp_path):
    home = _fake_toolkit(tmp_path, "nvcc: cannot run", rc=1)
    rc, out = _configure(tmp_path, "AUTO", home)
    assert rc == 0 and "CPU-only build (torch is a CUDA" in out and "no working CUDA compiler" in out, out
    rc, out = _configure(tmp_path, "ON", home)
    assert rc != 0 and "FASTLOSS_CUDA=ON but CUDA cannot be built" in out and "set CUDA_HOME" in out, out


@pytest.mark.skipif(torch.version.cuda is None, reason="for a CUDA build of torch")
def test_cuda_torch_with_another_major_version(tmp_path):
    major = int(torch.version.cuda.split(".")[0])
    home = _fake_toolkit(tmp_path, f"Cuda compilation tools, release {major - 1}.8, V{major - 1}.8.93")
    rc, out = _configure(tmp_path, "AUTO", home)
    assert rc == 0 and "CPU-only build" in out and "different major versions" in out, out
    assert f"CUDA {major - 1}.8" in out and f"CUDA {torch.version.cuda}" in out
    rc, out = _configure(tmp_path, "ON", home)
    assert rc != 0 and "different major versions" in out, out

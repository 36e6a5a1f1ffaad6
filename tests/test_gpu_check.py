"""bench/gpu_check.sh and bench/gpu_workload.py, checked without a GPU.

* ``--dry-run`` lists every step with its timeout and exact command (build with FASTLOSS_CUDA=ON and the GPU's
  arch only, CUDA tests, slow CUDA tests, the sanitizer probe and three sanitizers, the benchmark) and runs nothing.
* A run against a fake GPU (stub ``nvidia-smi``, ``compute-sanitizer`` and ``python``) goes through every step,
  side by side where it should, writes its log and timings into $OUT, and maps outcomes to exit statuses.
* On a machine without CUDA a real run stops after the preflight with exit status 3.
* The pytest ``-k`` expression the script uses picks exactly the device-parametrized tests (checked with the CPU
  twin of the expression, since this machine's ids say "cpu" where a GPU machine's say "cuda").
* The compute-sanitizer kernel filter (``kns=fastloss``) covers every kernel in csrc/cuda.
* The workload runs every call on the CPU at its smallest size, and reports wrong results.
"""

import importlib.util
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
from datetime import datetime, timezone

import pytest
import torch

import fastloss

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.sh"
WORKLOAD = ROOT / "bench" / "gpu_workload.py"
STEPS = ["preflight", "wheels", "build", "verify", "audit", "tests-cuda", "tests-cuda-slow", "sanitizer-probe",
         "memcheck", "racecheck", "synccheck", "bench"]

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="needs bash and coreutils' timeout")


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPU_CHECK_") and k not in ("OUT", "PYTHON")}
    env.update(extra)
    return env


def _dry_run(tmp_path, *args, **env):
    out = tmp_path / "out"
    proc = subprocess.run(["bash", str(SCRIPT), "--dry-run", *args], capture_output=True, text=True, timeout=60,
                          env=_env(OUT=str(out), **env))
    return proc, out


def _steps(text):
    """{step: (header line, command)} from the dry run's blocks: '[name] header' then indented command lines."""
    steps, name = {}, None
    for line in text.splitlines():
        m = re.match(r"^\[([a-z-]+)\] (.*)$", line)
        if m:
            name = m.group(1)
            steps[name] = [m.group(2), ""]
        elif name and line.startswith("    ") and not steps[name][1]:
            steps[name][1] = line.strip()
        elif name and line.startswith("    ") and not line.strip().startswith("("):
            steps[name][1] += "\n" + line.strip()
        elif not line.strip():
            name = None
    return {k: tuple(v) for k, v in steps.items()}


def test_dry_run_lists_every_step_with_its_timeout_and_command(tmp_path):
    proc, out = _dry_run(tmp_path)
    assert proc.returncode == 0, proc.stderr
    steps = _steps(proc.stdout)
    assert list(steps) == STEPS, proc.stdout
    for name, (header, cmd) in steps.items():
        assert cmd, name
        if name == "wheels" and "NOT NEEDED" in header:  # no .whl/*.whl in this checkout
            continue
        assert re.search(r"\b(gate|info), timeout \d+s", header), (name, header)
    day = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    prefix = f"{out}/{day}-nvidia-h200"

    build = steps["build"][1]
    for word in ("FASTLOSS_CUDA=ON", "TORCH_CUDA_ARCH_LIST=9.0", "pip install", "--no-build-isolation", "--no-deps",
                 "-C build-dir=build/gpu-check"):
        assert word in build, build
    assert "gate" in steps["build"][0]
    # No fallback that repeats a failing compile with plain CMake.
    assert "cmake -S" not in proc.stdout and "cmake --build" not in proc.stdout
    assert "fastloss.cuda_built" in steps["verify"][1]

    tests = steps["tests-cuda"][1]
    for word in ("-m pytest tests", "-k '[cuda] or [cuda- or -cuda] or -cuda-'", "-m 'not slow'", "-rfE",
                 "--timeout=", f"--junitxml={prefix}-junit-cuda.xml"):
        assert word in tests, tests
    slow = steps["tests-cuda-slow"][1]
    for word in ("FASTLOSS_SLOW=1", "-m slow", "-k '[cuda] or [cuda- or -cuda] or -cuda-'",
                 f"--junitxml={prefix}-junit-cuda-slow.xml"):
        assert word in slow, slow

    assert "compute-sanitizer --tool memcheck" in steps["sanitizer-probe"][1]
    for tool in ("memcheck", "racecheck", "synccheck"):
        cmd = steps[tool][1]
        assert f"compute-sanitizer --tool {tool} --kernel-name kns=fastloss" in cmd, cmd
        assert "--error-exitcode" in cmd and "bench/gpu_workload.py --device cuda" in cmd, cmd
    assert steps["memcheck"][1].startswith("env PYTORCH_NO_CUDA_MEMORY_CACHING=1 ")

    assert "bench/audit_cuda.py --out" in steps["audit"][1]
    bench = steps["bench"][1]
    for word in ("-m fastloss.bench --preset gpu-quick", "--time-budget", f"--json {prefix}.json",
                 f"--md {prefix}.md"):
        assert word in bench, bench
    assert "exit status: 0 all passed; 1 a gate step failed" in proc.stdout
    assert not out.exists()  # a dry run writes nothing


def test_dry_run_follows_the_gpu_and_the_options(tmp_path):
    proc, out = _dry_run(tmp_path, "--skip", "tests,bench", GPU_CHECK_ARCH="8.0",
                         GPU_CHECK_GPU_NAME="NVIDIA A100-SXM4-80GB", GPU_CHECK_NPROC="7")
    assert proc.returncode == 0, proc.stderr
    steps = _steps(proc.stdout)
    assert "TORCH_CUDA_ARCH_LIST=8.0" in steps["build"][1] and "CMAKE_BUILD_PARALLEL_LEVEL=7" in steps["build"][1]
    assert "-nvidia-a100-sxm4-80gb.json" in steps["bench"][1]
    for name in ("tests-cuda", "tests-cuda-slow", "bench"):
        assert "SKIPPED" in steps[name][0], steps[name]
    assert "SKIPPED" not in steps["memcheck"][0]
    for bad in (["--skip", "nope"], ["--frobnicate"]):
        proc = subprocess.run(["bash", str(SCRIPT), *bad], capture_output=True, text=True, timeout=60, env=_env())
        assert proc.returncode == 2 and "gpu_check" in proc.stderr, (bad, proc.stderr)
    proc = subprocess.run(["bash", str(SCRIPT), "--help"], capture_output=True, text=True, timeout=60, env=_env())
    assert proc.returncode == 0 and "Exit status" in proc.stdout and "--dry-run" in proc.stdout


# ---------------------------------------------------------------- a run against a fake GPU

FAKE_SMI = """#!/bin/bash
case "$*" in
  *query-gpu=name*) echo "NVIDIA Fake H200" ;;
  *query-gpu=compute_cap*) echo "9.0" ;;
  *) echo "fake nvidia-smi $*" ;;
esac
"""
FAKE_SANITIZER = """#!/bin/bash
echo "fake compute-sanitizer $*"
if [[ -n ${FAKE_FAIL:-} && "$*" == *${FAKE_FAIL}* ]]; then echo "ERROR SUMMARY: 1 error"; exit 99; fi
echo "ERROR SUMMARY: 0 errors"
"""
FAKE_PYTHON = """#!/bin/bash
echo "fakepy $*"
[[ -n ${FAKE_SLEEP:-} && "$*" == *${FAKE_SLEEP}* ]] && sleep 30
[[ -n ${FAKE_FAIL:-} && "$*" == *${FAKE_FAIL}* ]] && exit 1
exit 0
"""


@pytest.fixture
def fake_gpu(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("nvidia-smi", FAKE_SMI), ("compute-sanitizer", FAKE_SANITIZER), ("python", FAKE_PYTHON)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)

    def run(name, **env):
        out = tmp_path / name
        proc = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=120,
                              env=_env(PATH=f"{bin_dir}:{os.environ['PATH']}", PYTHON=str(bin_dir / "python"),
                                       OUT=str(out), **env))
        timings = list(out.glob("*-timings.tsv"))
        assert len(timings) == 1, (list(out.iterdir()), proc.stdout)
        rows = [line.split("\t") for line in timings[0].read_text().splitlines()]
        assert rows[0][:4] == ["step", "kind", "status", "exit"]
        last = {r[0]: r for r in rows[1:]}  # a step's outcome is its last row
        return proc, out, last

    return run


def test_fake_gpu_run_goes_through_every_step(fake_gpu):
    proc, out, last = fake_gpu("ok")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert list(last) != [] and set(last) == set(STEPS)
    for name, row in last.items():
        assert row[2] in ("ok", "skipped"), row  # wheels: skipped when no .whl/*.whl
        assert row[2] == "skipped" or re.fullmatch(r"\d+", row[4]), row  # wall seconds
    assert "TORCH_CUDA_ARCH_LIST=9.0 FASTLOSS_CUDA=ON" in last["build"][8]
    files = sorted(p.name for p in out.iterdir())
    day = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    assert f"{day}-nvidia-fake-h200-gpu_check.log" in files
    log = (out / f"{day}-nvidia-fake-h200-gpu_check.log").read_text()
    assert "gpu_check: passed (exit 0)" in log and "=== gpu_check summary" in log
    # The tests and the sanitizers ran side by side, each line tagged with its step.
    assert "running side by side" in log and "[tests-cuda] fakepy -m pytest" in log
    assert "[memcheck] fake compute-sanitizer --tool memcheck" in log
    assert len(files) <= 8  # what a device call brings back


def test_fake_gpu_failures_and_gaps_set_the_exit_status(fake_gpu):
    proc, _, last = fake_gpu("tests-fail", FAKE_FAIL="-m pytest tests")
    assert proc.returncode == 1, proc.stdout
    assert last["tests-cuda"][2] == "failed" and last["tests-cuda-slow"][2] == "failed"
    assert last["memcheck"][2] == "ok" and last["bench"][2] == "ok"  # the rest still ran

    proc, _, last = fake_gpu("race", FAKE_FAIL="--tool racecheck")
    assert proc.returncode == 1 and last["racecheck"][2:4] == ["failed", "99"], last["racecheck"]

    proc, _, last = fake_gpu("no-sanitizer", FAKE_FAIL="sanitizer probe")
    assert proc.returncode == 4, proc.stdout  # incomplete, not failed
    assert last["sanitizer-probe"][2] == "failed"
    assert all(last[t][2] == "not-run" for t in ("memcheck", "racecheck", "synccheck"))

    proc, _, last = fake_gpu("slow-build", FAKE_SLEEP="--no-build-isolation", GPU_CHECK_DEADLINE_S="3",
                             GPU_CHECK_MIN_STEP_S="1")
    assert proc.returncode == 4, proc.stdout
    assert last["build"][2] == "timed-out" and last["bench"][2] == "not-run"


@pytest.mark.skipif(torch.cuda.is_available() or shutil.which("nvidia-smi") is not None,
                    reason="checks the no-GPU path")
def test_without_a_gpu_the_real_run_exits_3(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(["bash", str(SCRIPT), "--skip", "preflight"], capture_output=True, text=True, timeout=120,
                          env=_env(OUT=str(out), PYTHON=sys.executable))
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "no CUDA device" in proc.stdout
    names = sorted(p.name for p in out.iterdir())
    assert len(names) == 2 and names[0].endswith("-no-gpu-gpu_check.log") and names[1].endswith("-timings.tsv")


# ---------------------------------------------------------------- what the steps select


COLLECT = """
import json, sys
import pytest

class Grab:
    ids = None
    def pytest_collection_finish(self, session):
        self.ids = [item.nodeid for item in session.items]

out = {}
for name, args in (("all", []), ("expr", ["-k", sys.argv[1]]), ("slow", ["-m", "slow", "-k", sys.argv[1]])):
    grab = Grab()
    rc = pytest.main(["tests", "-p", "no:cacheprovider", "--collect-only", "-q", *args], plugins=[grab])
    out[name] = [int(rc), grab.ids]
print("COLLECTED " + json.dumps(out))
"""


def test_cuda_test_selection_is_the_device_parametrized_tests(tmp_path):
    proc, _ = _dry_run(tmp_path)
    expr = re.search(r"-k '([^']+)'", _steps(proc.stdout)["tests-cuda"][1]).group(1)
    assert expr == re.search(r"-k '([^']+)'", _steps(proc.stdout)["tests-cuda-slow"][1]).group(1)
    # This machine's twin ids: conftest parametrizes `device` with "cpu", plus "cuda" where CUDA works, so the
    # CPU version of the expression must pick the CPU twins of exactly the tests the script runs on a GPU.
    cpu_expr = expr.replace("cuda", "cpu")
    # One process, three collections (importing torch and the test modules once).
    p = subprocess.run([sys.executable, "-c", COLLECT, cpu_expr], capture_output=True, text=True, cwd=ROOT,
                       timeout=300)
    line = next((ln for ln in p.stdout.splitlines() if ln.startswith("COLLECTED ")), None)
    assert line, p.stdout[-3000:] + p.stderr[-3000:]
    got = {k: (rc, set(ids)) for k, (rc, ids) in json.loads(line[len("COLLECTED "):]).items()}
    assert all(rc == 0 for rc, _ in got.values()), {k: v[0] for k, v in got.items()}
    everything, selected, slow = got["all"][1], got["expr"][1], got["slow"][1]
    device_ids = {i for i in everything if re.search(r"\[(.*-)?cpu(-.*)?\]$", i)}
    assert len(device_ids) > 100 and selected == device_ids
    assert {"tests/test_softmax.py::test_past_2_pow_31_elements[cpu]",
            "tests/test_cross_entropy.py::test_past_2_pow_31_elements[cpu]"} <= slow <= device_ids
    # A bare `-k cuda` would also take tests whose names say cuda without being CUDA-parametrized.
    assert {i for i in everything - device_ids if "cuda" in i.lower()}


def test_sanitizer_filter_covers_every_kernel():
    kernels = 0
    for path in sorted((ROOT / "csrc" / "cuda").glob("*.cu*")):
        text = path.read_text()
        starts = [m.start() for m in re.finditer(r"__global__", text)]
        if not starts:
            continue
        kernels += len(starts)
        opened = text.find("namespace fastloss {")
        closed = text.rfind("}  // namespace fastloss")
        assert 0 <= opened < starts[0] and starts[-1] < closed, f"{path.name}: a kernel outside namespace fastloss"
    assert kernels >= 10


# ---------------------------------------------------------------- the workload


def _load_workload():
    spec = importlib.util.spec_from_file_location("gpu_workload", WORKLOAD)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_workload_runs_every_call_on_the_cpu():
    proc = subprocess.run([sys.executable, str(WORKLOAD), "--device", "cpu", "--size", "tiny"], capture_output=True,
                          text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    counts = dict(re.findall(r"^  (\w+) +(\d+) calls,", proc.stdout, re.M))
    for cat in ("softmax", "log_softmax", "logsumexp", "softmax_topk", "cross_entropy", "linear_cross_entropy"):
        assert int(counts.get(cat, 0)) > 0, (cat, proc.stdout)
    assert re.search(r"gpu_workload: \d+ calls in [\d.]+ s, 0 failure\(s\)", proc.stdout), proc.stdout


def test_workload_reports_wrong_results_and_errors(monkeypatch, capsys):
    w = _load_workload()
    real = fastloss.softmax
    monkeypatch.setattr(fastloss, "softmax", lambda x, dim=-1, **kw: real(x, dim, **kw) * 1.5)
    assert w.main(["--device", "cpu", "--size", "tiny", "--parts", "row_ops"]) == 1
    out = capsys.readouterr().out
    assert "FAIL softmax" in out and "relative error" in out and "FAIL log_softmax" not in out
    monkeypatch.setattr(fastloss, "softmax", real)

    def broken(*a, **kw):
        raise RuntimeError("kernel exploded")

    monkeypatch.setattr(fastloss, "linear_cross_entropy", broken)
    assert w.main(["--device", "cpu", "--size", "tiny", "--parts", "linear_cross_entropy"]) == 1
    assert "kernel exploded" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        w.main(["--parts", "nope", "--device", "cpu"])
    assert e.value.code == 2


def test_workload_shapes_reach_every_cuda_kernel_shape():
    w = _load_workload()
    vs = [v for _, _, v in w.ROW_SHAPES["small"]]
    assert any(v <= 8 for v in vs) and any(9 <= v <= 16 for v in vs)  # warp groups of 8 and 16 lanes
    assert any(17 <= v <= 32 for v in vs) and any(513 <= v <= 1024 for v in vs)  # 32 lanes x 1 and x 32 items
    assert any(1024 < v < 256 * 1024 for v in vs)  # block path
    assert any(v >= 256 * 1024 and rows < 2 * 132 for _, rows, v in w.ROW_SHAPES["small"])  # split path
    ks = [k for _, v, kk in w.TOPK["small"] for k in kk]
    assert min(ks) <= 8 and any(8 < k <= 32 for k in ks) and 128 in ks and max(ks) > 128
    assert set(w.DTYPES) == {torch.float32, torch.bfloat16, torch.float16, torch.float64}
    assert set(w.ALGS) == {"online", "two_pass"}

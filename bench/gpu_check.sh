#!/usr/bin/env bash
# One-shot GPU validation of fastloss, meant for a lent GPU machine (torch preinstalled, no network):
#
#   1. peers' wheels from .whl/ (if present) -> /tmp/site, put on PYTHONPATH (build tools carried there too)
#   2. pip install --no-build-isolation .        and check that the CUDA kernels were built (if pip cannot build,
#                                                 e.g. no scikit-build-core here, a plain CMake build is tested)
#   3. python -m pytest tests -q                 (the CUDA tests run because a GPU is present)
#   4. compute-sanitizer memcheck and racecheck  on a small smoke workload that calls every op x algorithm x dtype,
#                                                 forward and backward, on CUDA (skipped if no compute-sanitizer)
#   5. fastloss-bench, GPU presets (bf16) with peers, all suites -> bench/results/<date>-<gpu>.json / .md
#   6. fastloss-bench, gpu-sweep (if time left)  -> bench/results/<date>-<gpu>-sweep.json / .md (/ .png)
#   7. memcheck over the CUDA tests themselves   (with whatever time is left)
#
# Every step runs under `timeout`, and the whole script under one deadline (GPU_CHECK_TOTAL_S, default 530 s,
# so it ends within ~9 minutes on an H100). A failing step does not stop the others. Exit status: 0 when the build,
# the tests and the sanitizers passed; 1 when any of them failed (or could not run in time); 3 when there is no
# CUDA device (nothing GPU-specific was checked). Benchmark steps never change the exit status.
# Results, and this script's log, are copied to $OUT when it is set.
#
# Usage: bash bench/gpu_check.sh        (from anywhere; it works in the repository root)
# Env:   PYTHON (default python3), OUT, GPU_CHECK_TOTAL_S, GPU_CHECK_BENCH_S (default 170)

set -u -o pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1

PY=${PYTHON:-python3}
START=$(date +%s)
DEADLINE=$((START + ${GPU_CHECK_TOTAL_S:-530}))
BENCH_S=${GPU_CHECK_BENCH_S:-170}
WORK=$(mktemp -d /tmp/gpu_check.XXXXXX)
LOG=$WORK/gpu_check.log
exec > >(tee -a "$LOG") 2>&1

export PIP_BREAK_SYSTEM_PACKAGES=1 PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1
export PYTHONUNBUFFERED=1

SUMMARY=()
FAILED=()

left() { echo $((DEADLINE - $(date +%s))); }

# step NAME LIMIT_S KIND CMD...   KIND: gate (any failure fails the check), gate-nt (failure fails, a timeout
# only warns: sanitizers whose workload did not finish), info (never fails the check).
step() {
    local name=$1 cap=$2 kind=$3
    shift 3
    local t
    t=$(left)
    ((cap < t)) && t=$cap
    if ((t < 15)); then
        SUMMARY+=("$name: not run (out of time)")
        [[ $kind != info ]] && FAILED+=("$name")
        return 1
    fi
    echo
    echo "=== [$name] limit ${t}s: $*"
    local s rc d status
    s=$(date +%s)
    timeout -k 20 "$t" "$@"
    rc=$?
    d=$(($(date +%s) - s))
    if ((rc == 0)); then
        status="ok (${d}s)"
    elif ((rc == 124 || rc == 137)); then
        status="TIMED OUT after ${d}s"
        [[ $kind == gate ]] && FAILED+=("$name")
    else
        status="FAILED, exit $rc (${d}s)"
        [[ $kind != info ]] && FAILED+=("$name")
    fi
    SUMMARY+=("$name: $status")
    echo "=== [$name] $status"
    return $rc
}

echo "gpu_check: $(date -u +%FT%TZ) in $(pwd), deadline in $(left)s"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo "nvidia-smi: not available"
$PY -c 'import sys, torch; print("python", sys.version.split()[0], "| torch", torch.__version__, "| CUDA", torch.version.cuda, "| GPU", torch.cuda.is_available())'

# ---------------------------------------------------------------- 1. peers' wheels
if compgen -G ".whl/*.whl" >/dev/null; then
    step wheels 120 info $PY -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
else
    SUMMARY+=("wheels: none (.whl/ absent): peers will be reported as skipped")
fi

# ---------------------------------------------------------------- 2. build and install
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}
if ! step build 300 info $PY -m pip install --no-build-isolation --no-deps --no-index -C build-dir=build/gpu-check .
then
    # Without the build backend (scikit-build-core) on this machine pip cannot build: build the library with CMake
    # directly and run from a copy of the package with the library in it. A real build error fails here too.
    if command -v cmake >/dev/null; then
        PYEXE=$(command -v "$PY")
        if step build-cmake 300 gate bash -c "cmake -S . -B build/gpu-check-cmake -DCMAKE_BUILD_TYPE=Release \
                -DPython_EXECUTABLE='$PYEXE' && cmake --build build/gpu-check-cmake -j $(nproc)"; then
            mkdir -p "$WORK/site"
            cp -r python/fastloss "$WORK/site/"
            cp build/gpu-check-cmake/libfastloss_ops*.so "$WORK/site/fastloss/"
            export PYTHONPATH=$WORK/site${PYTHONPATH:+:$PYTHONPATH}
            SUMMARY+=("build: WARNING: pip install failed; testing a CMake build of the library instead")
        fi
    else
        FAILED+=(build)
    fi
fi

HAVE_CUDA=0
if $PY -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    HAVE_CUDA=1
    step cuda-kernels-built 60 gate $PY -c '
import sys, fastloss
print("fastloss", fastloss.__version__, "from", fastloss.__file__, "| cuda_built:", fastloss.cuda_built)
sys.exit(0 if fastloss.cuda_built else "fastloss was built without CUDA kernels: the CUDA tests would not run")'
else
    echo "gpu_check: no CUDA device: GPU steps are skipped"
fi

# ---------------------------------------------------------------- 3. tests
step tests 240 gate $PY -m pytest tests -q -p no:cacheprovider

GPU=cpu
if ((HAVE_CUDA)); then
    GPU=$($PY -c 'import re, torch; print(re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(0).lower()).strip("-"))')
fi
DAY=$(date -u +%F)
RES=bench/results
mkdir -p "$RES"

if ((HAVE_CUDA)); then
    # ------------------------------------------------------------ 4. sanitizers on a small smoke workload
    SMOKE=$WORK/sanitizer_smoke.py
    cat >"$SMOKE" <<'EOF'
"""Every fastloss op x algorithm x dtype on small CUDA shapes (V=1, odd sizes, tails, a long row), forward and
backward, plus a non-contiguous input and special values: a short workload for compute-sanitizer."""
import math
import sys

import torch

import fastloss

dev = "cuda"
failures = []
shapes = [(1, 1), (3, 7), (5, 33), (4, 1000), (3, 4099), (2, 65537)]
for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
    inputs = [(torch.randn(s, device=dev) * 3).to(dtype) for s in shapes]
    special = torch.tensor([[-math.inf] * 40, [math.inf] + [0.0] * 39, [math.nan] + [1.0] * 39], device=dev)
    inputs += [special.to(dtype), (torch.randn(70, 50, device=dev) * 3).to(dtype).t()]  # last: non-contiguous
    for x in inputs:
        for alg in ("online", "two_pass", "auto"):
            for op in ("softmax", "log_softmax", "logsumexp"):
                try:
                    xr = x.detach().requires_grad_(True)
                    y = getattr(fastloss, op)(xr, -1, algorithm=alg)
                    y.backward(torch.randn_like(y))
                    torch.cuda.synchronize()
                except Exception as e:  # keep going: report every failing combination
                    failures.append(f"{op} {alg} {dtype} {tuple(x.shape)}: {type(e).__name__}: {e}")
print(f"sanitizer smoke: {len(failures)} failure(s)")
for f in failures:
    print("  ", f)
sys.exit(1 if failures else 0)
EOF
    SAN=$(command -v compute-sanitizer || true)
    NVCC=$(command -v nvcc || true)
    for c in "${CUDA_HOME:-/nonexistent}/bin/compute-sanitizer" /usr/local/cuda/bin/compute-sanitizer \
        ${NVCC:+"$(dirname "$(readlink -f "$NVCC")")/compute-sanitizer"} /usr/local/cuda-*/bin/compute-sanitizer; do
        [[ -z $SAN && -x $c ]] && SAN=$c
    done
    if [[ -n $SAN ]]; then
        echo "compute-sanitizer: $SAN"
        # Without the caching allocator every tensor is its own cudaMalloc, so memcheck sees exact bounds.
        PYTORCH_NO_CUDA_MEMORY_CACHING=1 step memcheck 120 gate-nt \
            "$SAN" --tool memcheck --error-exitcode 99 --print-limit 20 $PY "$SMOKE"
        step racecheck 120 gate-nt "$SAN" --tool racecheck --error-exitcode 99 --print-limit 20 $PY "$SMOKE"
    else
        SUMMARY+=("sanitizers: compute-sanitizer not found: memcheck/racecheck not run")
        step sanitizer-smoke-plain 60 gate $PY "$SMOKE"
    fi

    # ------------------------------------------------------------ 5. GPU presets with peers
    bench() {  # bench NAME BUDGET_S OUTBASE ARGS...
        local name=$1 budget=$2 base=$3
        shift 3
        local t
        t=$(left)
        ((budget > t - 60)) && budget=$((t - 60))
        if ((budget < 30)); then
            SUMMARY+=("$name: not run (out of time)")
            return
        fi
        # The bench stops starting measurements after --time-budget and still writes its reports; `timeout` is
        # only the backstop (SIGTERM also makes it skip the rest and write).
        step "$name" $((budget + 50)) info $PY -m fastloss.bench "$@" --time-budget "$budget" \
            --json "$base.json" --md "$base.md"
    }
    # bf16 logits only here (fp32 is in the sweep): every torch.compile entry compiles once per shape, and the
    # three vocabularies x all suites already need ~30 compilations.
    bench bench-presets "$BENCH_S" "$RES/$DAY-$GPU" --preset llama3,gemma2,gpt2 --dtype bf16 --suite all
    # ------------------------------------------------------------ 6. the sweep, with what is left
    PLOT=()
    $PY -c 'import matplotlib' 2>/dev/null && PLOT=(--plot "$RES/$DAY-$GPU-sweep.png")
    bench bench-sweep 150 "$RES/$DAY-$GPU-sweep" --preset gpu-sweep ${PLOT[@]+"${PLOT[@]}"}

    # ------------------------------------------------------------ 7. memcheck over the CUDA tests, time permitting
    if [[ -n $SAN ]] && (($(left) >= 60)); then
        PYTORCH_NO_CUDA_MEMORY_CACHING=1 step memcheck-tests 150 gate-nt "$SAN" --tool memcheck --error-exitcode 99 \
            --print-limit 20 $PY -m pytest tests -q -x -p no:cacheprovider -k "cuda and not bench"
    fi
fi

# ---------------------------------------------------------------- summary and artifacts
echo
echo "=== gpu_check summary ($(($(date +%s) - START))s, GPU: $GPU)"
printf '  %s\n' "${SUMMARY[@]}"
ls -l "$RES"/"$DAY"-"$GPU"* 2>/dev/null
if [[ -n ${OUT:-} ]]; then
    mkdir -p "$OUT"
    cp "$RES"/"$DAY"-"$GPU"*.json "$RES"/"$DAY"-"$GPU"*.md "$RES"/"$DAY"-"$GPU"*.png "$OUT"/ 2>/dev/null
fi
status=0
if ((${#FAILED[@]})); then
    echo "gpu_check: FAILED: ${FAILED[*]}"
    status=1
elif ((!HAVE_CUDA)); then
    echo "gpu_check: no CUDA device, nothing GPU-specific was checked"
    status=3
else
    echo "gpu_check: passed"
fi
if [[ -n ${OUT:-} ]]; then
    sleep 1  # let tee flush the log
    cp "$LOG" "$OUT"/gpu_check.log
fi
exit $status

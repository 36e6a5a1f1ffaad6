#!/usr/bin/env bash
# bench/gpu_check.sh: validate and benchmark fastloss on the CUDA GPU of this machine in one call (about 5 minutes
# on an H200; a lent machine has torch preinstalled and no network). bench/GPU.md says how to run it on a lent
# machine, what to carry there and how long each step takes.
#
# Steps (each under its own `timeout`, all under one deadline; a step that would start with less than 15 s left
# is not run). The three middle groups run side by side (GPU_CHECK_SERIAL=1: one after another); the benchmark
# runs alone on the GPU:
#   preflight        versions of the driver, torch, toolkit, build tools, pytest plugins, peers, compute-sanitizer
#   wheels           carried wheels .whl/*.whl -> /tmp/site (PYTHONPATH, PATH): build tools or peers the machine
#                    lacks (only when .whl/ holds wheels)
#   build            pip install --no-build-isolation --no-deps with FASTLOSS_CUDA=ON and TORCH_CUDA_ARCH_LIST set
#                    to this GPU's compute capability only (9.0 on Hopper)
#   verify           the installed fastloss has its CUDA kernels
#   audit            bench/audit_cuda.py on the library just built: the static predictions (registers, narrow
#                    accesses, bytes in flight, ceilings) next to the measurements, <date>-audit-cuda-sm90.md
#   tests-cuda       the CUDA-parametrized tests (ids [cuda...] / [...-cuda-...]), not the slow ones
#   tests-cuda-slow  the CUDA tests past 2^31 elements (FASTLOSS_SLOW=1, -m slow)
#   sanitizer-probe  compute-sanitizer on a trivial fastloss launch: does this machine support it?
#   memcheck, racecheck, synccheck
#                    compute-sanitizer over bench/gpu_workload.py (every fastloss kernel, small shapes), checking
#                    fastloss's kernels only (--kernel-name kns=fastloss)
#   bench            fastloss-bench --preset gpu-quick (~110 s budget): ms, GB/s, % of copy bandwidth, peak
#                    memory, error vs float64, against torch eager, torch.compile, Liger Kernel, Cut Cross-Entropy
#
# Output folder: $OUT when set, else bench/results. Everything is written there as it goes, named
# <date>-<gpu>[-what]: <date>-<gpu>.json / .md (benchmark, rewritten after every group of measurements),
# -gpu_check.log (all output), -timings.tsv (a row when each step starts and one when it ends: status, exit
# code, wall seconds, limit, command), -junit-cuda.xml, -junit-cuda-slow.xml.
#
# Exit status: 0 every step ran and passed; 1 a gate step failed (build, verify, tests, a sanitizer finding or a
# workload failure); 2 bad arguments; 3 no CUDA device (nothing GPU-specific was checked); 4 nothing failed but
# the check is incomplete (a step timed out, ran out of time, could not run here, e.g. no compute-sanitizer, or
# the benchmark failed).
#
# Usage: bash bench/gpu_check.sh [--dry-run] [--skip STEP[,STEP...]] [--help]
#   --dry-run   print every step, its timeout and the exact command, and run nothing (works without a GPU; it
#               assumes the lent H200: GPU_CHECK_GPU_NAME, GPU_CHECK_ARCH, GPU_CHECK_NPROC change that)
#   --skip      leave steps out (also "tests" and "sanitizers" for their groups); e.g. a second call on a warm
#               machine: --skip build,tests,sanitizers re-runs the benchmark on the installed build
#   --env-report  print the preflight report and exit (what the preflight step runs)
# Env: PYTHON (default python3), OUT, GPU_CHECK_DEADLINE_S (default 360), GPU_CHECK_BENCH_S (benchmark budget,
#      default 110), GPU_CHECK_SERIAL (1: no side-by-side steps), GPU_CHECK_TEST_WORKERS (pytest-xdist workers,
#      default 4; 0: none), GPU_CHECK_ARCH (force TORCH_CUDA_ARCH_LIST), CMAKE_BUILD_PARALLEL_LEVEL,
#      GPU_CHECK_MIN_STEP_S (default 15; for tests of this script).

set -u -o pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2

SELF=bench/gpu_check.sh
PY=${PYTHON:-python3}
STEPS=(preflight wheels build verify audit tests-cuda tests-cuda-slow sanitizer-probe memcheck racecheck synccheck bench)
MIN_STEP_S=${GPU_CHECK_MIN_STEP_S:-15}

usage() { sed -n '2,/^$/p' "$SELF" | sed 's/^# \{0,1\}//'; }

# ---------------------------------------------------------------- the preflight report (--env-report)
env_report() {
    echo "date: $(date -u +%FT%TZ); host: $(uname -n); kernel: $(uname -r) (4.4.0 is gVisor: no compute-sanitizer)"
    echo "cpus: $(nproc); memory: $(awk '/MemTotal/ {printf "%.0f GiB", $2 / 2^20}' /proc/meminfo 2>/dev/null)"
    nvidia-smi --query-gpu=index,name,compute_cap,driver_version,memory.total,clocks.sm,clocks.mem \
        --format=csv 2>/dev/null || echo "nvidia-smi: not available"
    "$PY" - <<'EOF' || echo "python: $PY does not run"
import importlib, shutil, subprocess, sys
print("python", sys.version.split()[0], "at", sys.executable)
try:
    import torch
    cuda = torch.cuda.is_available()
    print("torch", torch.__version__, "| CUDA build", torch.version.cuda, "| cuda available", cuda,
          "| devices", torch.cuda.device_count() if cuda else 0)
    if cuda:
        p = torch.cuda.get_device_properties(0)
        print(f"device 0: {p.name}, compute capability {p.major}.{p.minor}, {p.multi_processor_count} SMs, "
              f"{p.total_memory / 2**30:.0f} GiB; torch arch list {torch.cuda.get_arch_list()}")
except Exception as e:  # noqa: BLE001
    print("torch: not importable:", e)
for mod in ("scikit_build_core", "pybind11", "ninja", "cmake", "numpy", "pytest", "pytest_timeout", "xdist",
            "triton", "liger_kernel", "cut_cross_entropy", "transformers", "fastloss"):
    try:
        m = importlib.import_module(mod)
        print(f"  {mod:18s} {getattr(m, '__version__', 'present')} ({getattr(m, '__file__', '') or ''})")
    except Exception as e:  # noqa: BLE001
        print(f"  {mod:18s} MISSING ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
for tool in ("cmake", "ninja", "nvcc"):
    path = shutil.which(tool)
    ver = subprocess.run([path, "--version"], capture_output=True, text=True).stdout.strip().splitlines() if path else []
    line = (ver[-1] if tool == "nvcc" else ver[0]) if ver else "not on PATH"
    print(f"  {tool:18s} {line} ({path or '-'})")
EOF
    local san
    san=$(find_sanitizer)
    if [[ -n $san ]]; then
        echo "compute-sanitizer: $san ($("$san" --version 2>/dev/null | tail -1))"
    else
        echo "compute-sanitizer: not found"
    fi
    return 0
}

find_sanitizer() {
    local c nvcc
    c=$(command -v compute-sanitizer 2>/dev/null) && { echo "$c"; return; }
    nvcc=$(command -v nvcc 2>/dev/null || true)
    for c in "${CUDA_HOME:-/nonexistent}/bin/compute-sanitizer" /usr/local/cuda/bin/compute-sanitizer \
        ${nvcc:+"$(dirname "$(readlink -f "$nvcc")")/compute-sanitizer"} /usr/local/cuda-*/bin/compute-sanitizer \
        /usr/local/cuda/compute-sanitizer/compute-sanitizer; do
        [[ -x $c ]] && { echo "$c"; return; }
    done
    echo ""
}

# ---------------------------------------------------------------- arguments
DRY=0
SKIP=" "
while (($#)); do
    case $1 in
        --dry-run) DRY=1 ;;
        --skip) shift; SKIP+="${1:-} " ;;
        --skip=*) SKIP+="${1#--skip=} " ;;
        --env-report) env_report; exit 0 ;;
        -h | --help) usage; exit 0 ;;
        *) echo "gpu_check: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
    shift
done
SKIP=${SKIP//,/ }
SKIP=${SKIP//" tests "/" tests-cuda tests-cuda-slow "}
SKIP=${SKIP//" sanitizers "/" sanitizer-probe memcheck racecheck synccheck "}
for s in $SKIP; do
    [[ " ${STEPS[*]} " == *" $s "* ]] || { echo "gpu_check: --skip: unknown step '$s' (steps: ${STEPS[*]})" >&2; exit 2; }
done

DEADLINE_S=${GPU_CHECK_DEADLINE_S:-360}
BENCH_S=${GPU_CHECK_BENCH_S:-110}
SERIAL=${GPU_CHECK_SERIAL:-0}
WORKERS=${GPU_CHECK_TEST_WORKERS:-4}
for v in DEADLINE_S BENCH_S SERIAL WORKERS; do
    [[ ${!v} =~ ^[0-9]+$ ]] || { echo "gpu_check: $v must be a whole number, got '${!v}'" >&2; exit 2; }
done
START=$(date +%s)
DEADLINE=$((START + DEADLINE_S))
DAY=$(date -u +%F)

export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore PIP_NO_INPUT=1 PIP_BREAK_SYSTEM_PACKAGES=1

# ---------------------------------------------------------------- the GPU, its architecture, the tools
# pytest ids carry the device fixture's value: [cuda], [cuda-...], [...-cuda] or [...-cuda-...] (tests/conftest.py
# parametrizes `device` with "cpu" and, where CUDA works, "cuda"). A bare `-k cuda` would also pick tests whose
# *names* say cuda (test_build_config's toolkit-configure tests, a CPU-only usage-error test).
KEXPR="[cuda] or [cuda- or -cuda] or -cuda-"

if ((DRY)); then
    GPU_NAME=${GPU_CHECK_GPU_NAME:-NVIDIA H200}
    ARCH=${GPU_CHECK_ARCH:-9.0}
    JOBS=${CMAKE_BUILD_PARALLEL_LEVEL:-${GPU_CHECK_NPROC:-16}}
    HAVE_TIMEOUT=1 HAVE_XDIST=1
    SAN=$(find_sanitizer)
    SAN=${SAN:-/usr/local/cuda/bin/compute-sanitizer}
else
    GPU_NAME=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
    CAPS=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | sort -u | paste -sd';')
    if [[ -z $GPU_NAME || ! $CAPS =~ ^[0-9]+\.[0-9]+(\;[0-9]+\.[0-9]+)*$ ]]; then
        # No nvidia-smi, or one too old for compute_cap: ask torch.
        read -r CAPS GPU_NAME < <("$PY" -c '
import torch
if torch.cuda.is_available():
    caps = sorted({"%d.%d" % torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
    print(";".join(caps), torch.cuda.get_device_name(0))' 2>/dev/null)
    fi
    ARCH=${GPU_CHECK_ARCH:-${CAPS:-}}
    JOBS=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}
    HAVE_TIMEOUT=0 HAVE_XDIST=0
    "$PY" -c 'import pytest_timeout' 2>/dev/null && HAVE_TIMEOUT=1
    ((WORKERS > 0)) && "$PY" -c 'import xdist' 2>/dev/null && HAVE_XDIST=1
    SAN=$(find_sanitizer)
fi
SLUG=$(printf '%s' "${GPU_NAME:-no-gpu}" | tr 'A-Z' 'a-z' | sed -E 's/[^a-z0-9]+/-/g; s/^-+|-+$//g')
SLUG=${SLUG:-no-gpu}

OUTDIR=${OUT:-bench/results}
PFX=$OUTDIR/$DAY-$SLUG
LOG=$PFX-gpu_check.log
TIMES=$PFX-timings.tsv
JUNIT=$PFX-junit-cuda.xml
JUNIT_SLOW=$PFX-junit-cuda-slow.xml
BENCH_JSON=$PFX.json
BENCH_MD=$PFX.md

# ---------------------------------------------------------------- step runner
# A printable, copy-pastable command line: words with shell metacharacters are single-quoted.
quote() {
    local out="" w
    for w in "$@"; do
        if [[ $w =~ ^[A-Za-z0-9_./=:,+@%^-]+$ ]]; then
            out+="$w "
        else
            out+="'${w//\'/\'\\\'\'}' "
        fi
    done
    printf '%s' "${out% }"
}

# record STEP KIND STATUS EXIT WALL LIMIT NOTE CMD: one row of the timings file (appends are atomic: the side by
# side steps write it too). The last row of a step is its outcome; a final "running" row is a step cut short.
record() {
    ((DRY)) && return 0
    local note=${7//$'\t'/ } cmd=${8//$'\t'/ }
    note=${note//$'\n'/\\n}
    cmd=${cmd//$'\n'/\\n}
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$5" "$6" "$(date -u +%T)" "$note" "$cmd" >>"$TIMES"
}

skipped() { [[ " $SKIP " == *" $1 "* ]]; }

# run_step NAME KIND CAP_S SIGNAL CMD...   KIND: gate (a failure fails the check) or info. SIGNAL: what `timeout`
# sends first (INT for pytest, which then still writes its junit file; TERM otherwise); KILL follows 15 s later.
run_step() {
    local name=$1 kind=$2 cap=$3 sig=$4
    shift 4
    local cmd limit left
    cmd=$(quote "$@")
    if skipped "$name"; then
        ((DRY)) && printf '\n[%s] SKIPPED (--skip)\n    %s\n' "$name" "$cmd"
        record "$name" "$kind" skipped - 0 - "--skip" "$cmd"
        return 0
    fi
    if ((DRY)); then
        printf '\n[%s] %s, timeout %ss (less if the deadline is nearer)\n    %s\n' "$name" "$kind" "$cap" "$cmd"
        return 0
    fi
    left=$((DEADLINE - $(date +%s)))
    limit=$((cap < left ? cap : left))
    if ((limit < MIN_STEP_S)); then
        echo "=== [$name] NOT RUN: ${left}s left before the deadline"
        record "$name" "$kind" not-run - 0 "$cap" "out of time (${left}s left)" "$cmd"
        return 1
    fi
    echo "=== [$name] start $(date -u +%T), limit ${limit}s: $cmd"
    record "$name" "$kind" running - 0 "$limit" "" "$cmd"
    local s rc d status
    s=$(date +%s)
    if ((PREFIX)); then
        timeout -s "$sig" -k 15 "$limit" "$@" 2>&1 | sed -u "s/^/[$name] /"
        rc=${PIPESTATUS[0]}
    else
        timeout -s "$sig" -k 15 "$limit" "$@"
        rc=$?
    fi
    d=$(($(date +%s) - s))
    if ((rc == 0)); then
        status=ok
    elif ((rc == 124 || rc == 137)); then
        status=timed-out
    else
        status=failed
    fi
    record "$name" "$kind" "$status" "$rc" "$d" "$limit" "" "$cmd"
    echo "=== [$name] $status (exit $rc) after ${d}s"
    return "$rc"
}

# not_run NAME KIND WHY CMD...: a step that cannot run (its prerequisite failed or is missing here): the check
# is then incomplete. not_needed: the same for a step with nothing to do (no wheels carried), which is fine.
not_run() { _no_run not-run "NOT RUN" "$@"; }
not_needed() { _no_run skipped "NOT NEEDED" "$@"; }
_no_run() {
    local status=$1 say=$2 name=$3 kind=$4 why=$5 cmd
    shift 5
    cmd=$(quote "$@")
    if ((DRY)); then
        printf '\n[%s] %s: %s: %s\n    %s\n' "$name" "$kind" "$say" "$why" "$cmd"
        return 0
    fi
    skipped "$name" && { record "$name" "$kind" skipped - 0 - "--skip" "$cmd"; return 0; }
    echo "=== [$name] $say: $why"
    record "$name" "$kind" "$status" - 0 - "$why" "$cmd"
}

# ---------------------------------------------------------------- start
PREFIX=0
if ((DRY)); then
    echo "gpu_check --dry-run: nothing is run. Each step: [name] kind, timeout; then the exact command."
    echo "assumed machine (the lent H200; GPU_CHECK_GPU_NAME / GPU_CHECK_ARCH / GPU_CHECK_NPROC change it): $GPU_NAME,"
    echo "  compute capability $ARCH, $JOBS cores, pytest-timeout and pytest-xdist importable (both are in its image),"
    echo "  compute-sanitizer at $SAN"
    echo "output folder: $OUTDIR${OUT:+ (\$OUT)}; files: $(basename "$LOG"), $(basename "$TIMES"), $(basename "$JUNIT"),"
    echo "  $(basename "$JUNIT_SLOW"), $(basename "$BENCH_JSON"), $(basename "$BENCH_MD")"
    echo "deadline: ${DEADLINE_S}s for the whole script; a step starting with under ${MIN_STEP_S}s left is not run"
else
    mkdir -p "$OUTDIR" || exit 2
    exec > >(tee -a "$LOG") 2>&1
    TEE_PID=$!
    printf 'step\tkind\tstatus\texit\twall_s\tlimit_s\tutc\tnote\tcommand\n' >"$TIMES"
    echo "gpu_check: $(date -u +%FT%TZ) in $(pwd); deadline in ${DEADLINE_S}s; output in $OUTDIR ($PFX-*)"
    echo "gpu_check: GPU ${GPU_NAME:-none}, compute capability ${ARCH:-unknown}, python $(command -v "$PY" || echo "$PY missing")"
fi

run_step preflight info 60 TERM bash "$SELF" --env-report

if ((!DRY)) && [[ -z ${GPU_NAME:-} ]]; then
    echo "gpu_check: no CUDA device (nvidia-smi and torch see none): nothing GPU-specific can be checked"
    for s in "${STEPS[@]:1}"; do record "$s" gate not-run - 0 - "no CUDA device" ""; done
    echo "gpu_check: exit 3"
    exec >&- 2>&-
    wait "$TEE_PID" 2>/dev/null
    exit 3
fi

# ---------------------------------------------------------------- wheels, build, verify
shopt -s nullglob
WHEELS=(.whl/*.whl)
shopt -u nullglob
WHEEL_CMD=("$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site)
if ((${#WHEELS[@]})); then
    run_step wheels gate 90 TERM "${WHEEL_CMD[@]}" "${WHEELS[@]}"
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} PATH=/tmp/site/bin:$PATH
    ((DRY)) && echo "    then: export PYTHONPATH=/tmp/site:\$PYTHONPATH PATH=/tmp/site/bin:\$PATH"
else
    not_needed wheels info "no .whl/*.whl here (only needed for missing build tools or peers; see bench/GPU.md)" \
        "${WHEEL_CMD[@]}" '.whl/*.whl'
fi

BUILD_CMD=(env "TORCH_CUDA_ARCH_LIST=$ARCH" FASTLOSS_CUDA=ON "CMAKE_BUILD_PARALLEL_LEVEL=$JOBS"
    "$PY" -m pip install --no-build-isolation --no-deps --no-index -v -C build-dir=build/gpu-check .)
VERIFY_PY='import sys, fastloss; print("fastloss", fastloss.__version__, "from", fastloss._library_path, '
VERIFY_PY+='"| cuda_built:", fastloss.cuda_built); sys.exit(0 if fastloss.cuda_built else "no CUDA kernels built")'
VERIFY_CMD=("$PY" -c "$VERIFY_PY")
BUILD_OK=1
if [[ -z ${ARCH:-} ]]; then
    not_run build gate "the GPU's compute capability could not be read (set GPU_CHECK_ARCH, e.g. 9.0)" "${BUILD_CMD[@]}"
    BUILD_OK=0
elif ! run_step build gate 240 TERM "${BUILD_CMD[@]}"; then
    BUILD_OK=0
fi
if ((BUILD_OK)) || skipped build; then  # --skip build: verify checks the fastloss installed before
    BUILD_OK=1
    run_step verify gate 60 TERM "${VERIFY_CMD[@]}" || BUILD_OK=0
else
    not_run verify gate "no build (the build step failed or did not finish)" "${VERIFY_CMD[@]}"
fi
AUDIT_CMD=("$PY" bench/audit_cuda.py --out "$OUTDIR" --md-only)
if ((BUILD_OK)); then
    run_step audit info 90 TERM "${AUDIT_CMD[@]}"
else
    not_run audit info "no working build (see build / verify)" "${AUDIT_CMD[@]}"
fi

# ---------------------------------------------------------------- tests, slow tests, sanitizers (side by side)
PYTEST=("$PY" -m pytest tests -p no:cacheprovider -q -rfE --durations=10)
((HAVE_XDIST)) && PYTEST+=(-n "$WORKERS")
TIMEOUT_ARG=()
((HAVE_TIMEOUT)) && TIMEOUT_ARG=(--timeout=120)
TESTS_CMD=("${PYTEST[@]}" -m "not slow" -k "$KEXPR" "${TIMEOUT_ARG[@]}" "--junitxml=$JUNIT")
SLOW_CMD=(env FASTLOSS_SLOW=1 "$PY" -m pytest tests -p no:cacheprovider -q -rfE -m slow -k "$KEXPR"
    "${TIMEOUT_ARG[@]}" "--junitxml=$JUNIT_SLOW")
# compute-sanitizer checks fastloss's kernels only (all live in namespace fastloss::cuda: "fastloss" is in every
# one's name, mangled or not); torch's, cuBLAS's and the peers' kernels run unchecked. torch's own API calls that
# fail on purpose (capability probes) are not reported. Without the caching allocator every tensor is its own
# cudaMalloc, so memcheck sees exact bounds.
SAN_ARGS=(--kernel-name kns=fastloss --report-api-errors no --error-exitcode 99 --print-limit 50
    --show-backtrace device)
PROBE_PY='import torch, fastloss; y = fastloss.softmax(torch.randn(4, 13, device="cuda"), -1); '
PROBE_PY+='torch.cuda.synchronize(); print("sanitizer probe: ok", tuple(y.shape))'
PROBE_CMD=("$SAN" --tool memcheck "${SAN_ARGS[@]}" "$PY" -c "$PROBE_PY")
WORKLOAD=("$PY" bench/gpu_workload.py --device cuda --size small)
MEMCHECK_CMD=(env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SAN" --tool memcheck "${SAN_ARGS[@]}" "${WORKLOAD[@]}")
RACECHECK_CMD=("$SAN" --tool racecheck "${SAN_ARGS[@]}" "${WORKLOAD[@]}")
SYNCCHECK_CMD=("$SAN" --tool synccheck "${SAN_ARGS[@]}" "${WORKLOAD[@]}")
((HAVE_TIMEOUT)) || echo "gpu_check: pytest-timeout is not importable here: no per-test timeout (only the step's)"
((HAVE_XDIST)) || echo "gpu_check: pytest-xdist not importable here (or GPU_CHECK_TEST_WORKERS=0): tests in one process"

lane_tests() { run_step tests-cuda gate 180 INT "${TESTS_CMD[@]}"; }
lane_slow() { run_step tests-cuda-slow gate 150 INT "${SLOW_CMD[@]}"; }
lane_sanitizers() {
    local why=""
    if [[ -z $SAN ]]; then
        why="compute-sanitizer not found (PATH, CUDA_HOME, /usr/local/cuda*)"
        not_run sanitizer-probe info "$why" "${PROBE_CMD[@]}"
    elif skipped sanitizer-probe; then
        run_step sanitizer-probe info 90 TERM "${PROBE_CMD[@]}"
    elif ! run_step sanitizer-probe info 90 TERM "${PROBE_CMD[@]}"; then
        why="compute-sanitizer does not work on this machine or with these options (see the sanitizer-probe output)"
    fi
    if [[ -n $why ]]; then
        not_run memcheck gate "$why" "${MEMCHECK_CMD[@]}"
        not_run racecheck gate "$why" "${RACECHECK_CMD[@]}"
        not_run synccheck gate "$why" "${SYNCCHECK_CMD[@]}"
        return
    fi
    if ((SERIAL || DRY)); then
        run_step memcheck gate 150 TERM "${MEMCHECK_CMD[@]}"
        run_step racecheck gate 150 TERM "${RACECHECK_CMD[@]}"
        run_step synccheck gate 150 TERM "${SYNCCHECK_CMD[@]}"
    else
        local pids=()
        run_step memcheck gate 150 TERM "${MEMCHECK_CMD[@]}" &
        pids+=($!)
        run_step racecheck gate 150 TERM "${RACECHECK_CMD[@]}" &
        pids+=($!)
        run_step synccheck gate 150 TERM "${SYNCCHECK_CMD[@]}" &
        pids+=($!)
        wait "${pids[@]}"
    fi
}

if ((!BUILD_OK)); then
    why="no working build (see build / verify)"
    not_run tests-cuda gate "$why" "${TESTS_CMD[@]}"
    not_run tests-cuda-slow gate "$why" "${SLOW_CMD[@]}"
    not_run sanitizer-probe info "$why" "${PROBE_CMD[@]}"
    not_run memcheck gate "$why" "${MEMCHECK_CMD[@]}"
    not_run racecheck gate "$why" "${RACECHECK_CMD[@]}"
    not_run synccheck gate "$why" "${SYNCCHECK_CMD[@]}"
elif ((SERIAL || DRY)); then
    ((DRY)) && ((!SERIAL)) && printf '\n(the next steps run side by side in three lanes: tests-cuda | tests-cuda-slow | %s)\n' \
        "sanitizer-probe, then memcheck + racecheck + synccheck side by side"
    lane_tests
    lane_slow
    lane_sanitizers
else
    echo "gpu_check: running side by side: tests-cuda | tests-cuda-slow | sanitizers (output lines prefixed [step])"
    PREFIX=1
    lane_tests &
    L1=$!
    lane_slow &
    L2=$!
    lane_sanitizers &
    L3=$!
    wait "$L1" "$L2" "$L3"
    PREFIX=0
fi

# ---------------------------------------------------------------- benchmark (alone on the GPU)
bench_cmd() {
    BENCH_CMD=(env PYTHONUNBUFFERED=1 "$PY" -m fastloss.bench --preset gpu-quick --time-budget "$1"
        --json "$BENCH_JSON" --md "$BENCH_MD")
}
if ((!BUILD_OK)); then
    bench_cmd "$BENCH_S"
    not_run bench info "no working build (see build / verify)" "${BENCH_CMD[@]}"
elif ((DRY)); then
    bench_cmd "$BENCH_S"
    run_step bench info $((BENCH_S + 50)) TERM "${BENCH_CMD[@]}"
    echo "    (--time-budget: measurements not started by then are reported as skipped; it shrinks to the time left"
    echo "     before the deadline minus 50 s; on timeout SIGTERM makes it stop and write what it has)"
else
    left=$((DEADLINE - $(date +%s)))
    budget=$((left - 50 < BENCH_S ? left - 50 : BENCH_S))
    bench_cmd "$budget"
    if ((budget < 30)) && ! skipped bench; then
        not_run bench info "out of time (${left}s left before the deadline)" "${BENCH_CMD[@]}"
    else
        run_step bench info $((budget + 50)) TERM "${BENCH_CMD[@]}"
    fi
fi

# ---------------------------------------------------------------- summary and exit status
if ((DRY)); then
    echo
    echo "exit status: 0 all passed; 1 a gate step failed; 2 bad arguments; 3 no CUDA device; 4 incomplete"
    exit 0
fi
# The outcome of each step is its last row in the timings file.
SUMMARY=$(awk -F'\t' 'NR > 1 { last[$1] = $0; if (!($1 in seen)) { seen[$1] = 1; order[++n] = $1 } }
    END { for (i = 1; i <= n; i++) print last[order[i]] }' "$TIMES")
echo
echo "=== gpu_check summary ($(($(date +%s) - START))s; GPU $GPU_NAME, TORCH_CUDA_ARCH_LIST=$ARCH)"
printf '%s\n' "$SUMMARY" | awk -F'\t' '{ printf "  %-16s %-5s %-10s exit %-4s %5ss of %4ss  %s\n", $1, $2, $3, $4, $5, $6, $8 }'
status=0
while IFS=$'\t' read -r name kind st _rest; do
    case $st in
        ok | skipped) ;;
        failed) if [[ $kind == gate ]]; then status=1; elif ((status == 0)); then status=4; fi ;;
        *) ((status == 0)) && status=4 ;;
    esac
done <<<"$SUMMARY"
ls -l "$PFX"* 2>/dev/null | sed 's/^/  /'
case $status in
    0) echo "gpu_check: passed (exit 0)" ;;
    1) echo "gpu_check: FAILED (exit 1): a gate step failed; see the summary above and $LOG" ;;
    4) echo "gpu_check: INCOMPLETE (exit 4): nothing failed, but not everything ran to the end" ;;
esac
exec >&- 2>&-
wait "$TEE_PID" 2>/dev/null
exit $status

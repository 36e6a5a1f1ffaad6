"""The CUDA execution layer for the CPU (csrc/cuda_emu), built with the host compiler (warnings as errors) and once
more under AddressSanitizer + UndefinedBehaviorSanitizer:
* its self-test: CUDA's shuffle, vote and barrier semantics under every schedule, deadlocks reported as errors, and
  the planted bugs (missing __syncthreads, skipped warp exchange, wrong shuffle width, off-by-one row tail, shared
  slot by lane instead of warp, slot reused without a leading barrier) caught;
* the softmax_topk kernel body run on it against a long-double reference;
* in an emulated build of the library (FASTLOSS_CUDA_EMU=ON, make test-emu), where the rest of the suite runs the
  CUDA kernels on the "cpu" device: the kernel each problem selects, and bit-identical results under every thread
  schedule, with and without grid-stride loops."""

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


# ---------------------------------------------------------------- the library's own CUDA kernels (emulated build)
# In a FASTLOSS_CUDA_EMU=ON build (make test-emu) the whole suite runs the CUDA kernels on the "cpu" device; these
# tests check what only that build can: which kernel each problem selects, and that the result does not depend on
# the order in which the emulated threads run.

import torch  # noqa: E402

import fastloss  # noqa: E402

emulated = pytest.mark.skipif(not fastloss.cuda_emulated, reason="needs a FASTLOSS_CUDA_EMU=ON build (make test-emu)")


def _launched(fn):
    """Names of the kernel instantiations fn() launched."""
    from fastloss import _cuda_emu

    before = _cuda_emu.launch_counts()
    fn()
    after = _cuda_emu.launch_counts()
    return {k for k, n in after.items() if n > before.get(k, 0)}


def _x(rows, v, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, v, generator=g, dtype=torch.float64) * 3).to(dtype)


# (problem, the kernels it must launch) -- the kernel selection of csrc/cuda/*.cu, branch by branch.
SELECTION = [
    ("softmax V=7", lambda: fastloss.softmax(_x(5, 7), -1), {"warp_forward_kernel<float, 2, 4>"}),
    ("softmax V=13", lambda: fastloss.softmax(_x(5, 13), -1), {"warp_forward_kernel<float, 4, 4>"}),
    ("softmax V=31", lambda: fastloss.softmax(_x(5, 31), -1), {"warp_forward_kernel<float, 8, 4>"}),
    ("softmax V=100", lambda: fastloss.softmax(_x(5, 100), -1), {"warp_forward_kernel<float, 32, 4>"}),
    ("softmax V=1000", lambda: fastloss.softmax(_x(3, 1000), -1), {"warp_forward_kernel<float, 32, 32>"}),
    ("softmax V=1000 double", lambda: fastloss.softmax(_x(3, 1000, torch.float64), -1),
     {"block_forward_kernel<double>"}),
    ("logsumexp V=5000 bf16", lambda: fastloss.logsumexp(_x(3, 5000, torch.bfloat16), -1),
     {"block_forward_kernel<c10::BFloat16>"}),
    ("softmax split", lambda: fastloss.softmax(_x(2, 262147), -1),
     {"split_state_kernel<float>", "split_merge_kernel<float>", "split_softmax_kernel<float>"}),
    ("logsumexp split", lambda: fastloss.logsumexp(_x(2, 262147), -1),
     {"split_state_kernel<float>", "split_merge_kernel<float>"}),
    ("softmax backward warp", lambda: torch.ops.fastloss.softmax_backward(_x(4, 300), _x(4, 300, seed=1), -1),
     {"warp_backward_kernel<float, 32, 16>"}),
    ("log_softmax backward block", lambda: torch.ops.fastloss.log_softmax_backward(_x(2, 3000), _x(2, 3000), -1),
     {"block_backward_kernel<float>"}),
    ("softmax backward split",
     lambda: torch.ops.fastloss.softmax_backward(_x(2, 262147), _x(2, 262147, seed=1), -1),
     {"split_backward_sum_kernel<float>", "split_backward_apply_kernel<float>"}),
    ("logsumexp backward V=70", lambda: torch.ops.fastloss.logsumexp_backward(
        _x(1, 3)[0], _x(3, 70), torch.logsumexp(_x(3, 70), -1), -1, False), {"logsumexp_backward_flat_kernel<float>"}),
    ("logsumexp backward V=300", lambda: torch.ops.fastloss.logsumexp_backward(
        _x(1, 3)[0], _x(3, 300), torch.logsumexp(_x(3, 300), -1), -1, False),
     {"logsumexp_backward_rows_kernel<float>"}),
    ("softmax_topk k=5", lambda: fastloss.softmax_topk(_x(3, 300), 5), {"softmax_topk_kernel<float>"}),
    ("softmax_topk k=20 half", lambda: fastloss.softmax_topk(_x(3, 300, torch.float16), 20),
     {"softmax_topk_kernel<c10::Half>"}),
    ("softmax_topk k=128", lambda: fastloss.softmax_topk(_x(2, 300), 128), {"softmax_topk_kernel<float>"}),
    ("cross_entropy", lambda: fastloss.cross_entropy(_x(6, 13), torch.arange(6) % 13),
     {"ce_index_kernel<float, Identity, Mode::Forward, false>"}),
    ("token_logprobs", lambda: fastloss.token_logprobs(_x(3, 300), torch.arange(3)),
     {"logprob_forward_kernel<float, false>"}),
    ("token_logprobs entropy", lambda: fastloss.token_logprobs(_x(3, 300), torch.arange(3), return_entropy=True),
     {"logprob_forward_kernel<float, true>"}),
    ("token_logprobs stats", lambda: fastloss.token_logprobs(_x(3, 300), torch.arange(3), return_stats=True),
     {"logprob_stats_forward_kernel<float>"}),
    ("token_logprobs stats entropy bf16",
     lambda: fastloss.token_logprobs(_x(3, 300, torch.bfloat16), torch.arange(3), return_entropy=True,
                                     return_stats=True), {"logprob_stats_forward_kernel<c10::BFloat16>"}),
    ("distillation jsd", lambda: fastloss.distillation_loss(_x(3, 300), _x(3, 300, seed=1), divergence="jsd",
                                                            beta=0.3), {"distill_kernel<float, 2, Mode::Forward>"}),
    ("distillation jsd beta=1 is the reverse KL",
     lambda: fastloss.distillation_loss(_x(3, 300), _x(3, 300, seed=1), divergence="jsd", beta=1.0),
     {"distill_kernel<float, 1, Mode::Forward>"}),
]


@emulated
@pytest.mark.parametrize("name,fn,kernels", SELECTION, ids=[s[0] for s in SELECTION])
def test_kernel_selection(name, fn, kernels):
    from fastloss._cuda_emu import kernel_of

    launched = _launched(fn)
    # These instantiations, and no kernel of another family (an extra pass would be a defect too).
    assert kernels <= launched and {kernel_of(k) for k in launched} == {kernel_of(k) for k in kernels}, (
        f"{name}: expected {sorted(kernels)}, launched {sorted(launched)}")


@emulated
def test_topk_past_the_fused_limit_takes_the_composite_path():
    # k > 128: the op layer's CUDA branch (softmax, then top-k), which before this layer only a GPU reached.
    x = _x(3, 400)
    launched = _launched(lambda: fastloss.softmax_topk(x, 129))
    assert not any(k.startswith("softmax_topk_kernel") for k in launched), launched
    assert any(k.startswith("warp_forward_kernel") or k.startswith("block_forward_kernel") for k in launched)
    v, i = fastloss.softmax_topk(x, 129)
    want_v, want_i = torch.softmax(x.double(), -1).topk(129)
    assert torch.allclose(v.double(), want_v, rtol=1e-5) and torch.equal(i, want_i)


def _every_path():
    """Forward and backward of every kernel family, in float32 and bfloat16: the outputs, for a bitwise comparison."""
    out = []
    for dtype in (torch.float32, torch.bfloat16):
        for rows, v in [(5, 7), (5, 100), (3, 1000), (2, 5000), (2, 262147)]:
            x = _x(rows, v, dtype).requires_grad_(True)
            for alg in ("online", "two_pass"):
                for f in (fastloss.softmax, fastloss.log_softmax, fastloss.logsumexp):
                    y = f(x, -1, algorithm=alg)
                    (g,) = torch.autograd.grad(y, x, torch.ones_like(y))
                    out += [y.detach(), g]
        x = _x(4, 3000, dtype)
        out += list(fastloss.softmax_topk(x, 40))
        xc = _x(8, 3000, dtype).requires_grad_(True)
        t = torch.arange(8) * 7 % 3000
        t[3] = -100
        loss = fastloss.cross_entropy(xc, t, label_smoothing=0.1, softcap=20.0)
        out += [loss.detach(), torch.autograd.grad(loss, xc)[0]]
        xs, xt = _x(8, 3000, dtype, seed=2).requires_grad_(True), _x(8, 3000, dtype, seed=3)
        for div in ("forward_kl", "reverse_kl", "jsd"):
            loss = fastloss.distillation_loss(xs, xt, divergence=div, beta=0.3, temperature=2.0, target=t,
                                              hard_weight=0.5, reduction="none")
            out += [loss.detach(), torch.autograd.grad(loss.sum(), xs)[0]]
            buf = xs.detach().clone()
            out += [*torch.ops.fastloss.distill_fwd_inplace_grad(buf, xt, t, torch.ones(1), div, 0.3, 2.0, -100, 0.5),
                    buf]
        lp, ent = fastloss.token_logprobs(xs, t.clamp(min=0), temperature=0.7, return_entropy=True)
        out += [lp.detach(), ent.detach(), torch.autograd.grad(lp.sum() + ent.sum(), xs)[0]]
        out += [o.detach() for o in fastloss.token_logprobs(xs, t.clamp(min=0), temperature=0.7, return_entropy=True,
                                                            return_stats=True)]
    return out


@emulated
def test_results_do_not_depend_on_the_thread_schedule():
    # A race (a missing barrier, a shared slot reused too early, a shuffle that reads a lane that has not written)
    # makes the result depend on the order the threads run in. Every schedule must give bit-identical outputs.
    from fastloss import _cuda_emu

    # With the grid capped at 2 blocks every kernel also runs its grid-stride loop (a block handles several rows in
    # turn: a shared slot reused for the next row before every warp has read it shows up there).
    saved = _cuda_emu.schedule(), _cuda_emu.max_grid()
    try:
        _cuda_emu.set_schedule(0)
        _cuda_emu.set_max_grid(0)  # CUDA's limit: one row per block
        ref = _every_path()
        for seed, grid in ((1, 0), (2, 0), (3, 0), (4, 2), (5, 2), (6, 2)):  # reverse, warp-greedy, random rounds
            _cuda_emu.set_schedule(seed)
            _cuda_emu.set_max_grid(grid)
            got = _every_path()
            for i, (a, b) in enumerate(zip(got, ref)):
                assert torch.equal(a.nan_to_num(), b.nan_to_num()) and torch.equal(a.isnan(), b.isnan()), (
                    f"schedule {seed}, max grid {grid or 'CUDA'}: output {i} differs from lane order")
    finally:
        _cuda_emu.set_schedule(saved[0])
        _cuda_emu.set_max_grid(saved[1])

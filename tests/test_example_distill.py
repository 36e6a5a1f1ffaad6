"""examples/distill_tiny_lm.py: the teacher -> student distillation, torch composite vs fastloss, runs and PASSes.

The end-to-end test trains a 32K-entry BPE (a few seconds) and starts three child processes (teacher, torch
student, fastloss student) that each import transformers, so it takes ~25 s per run on a 2-core CPU: it is marked slow
(FASTLOSS_SLOW=1), like test_example_tiny_lm.py. The other tests check the example's plain-PyTorch loss in-process.
"""

import importlib.util
import subprocess
import sys

import pytest
from conftest import EXAMPLES, run_example
import torch

import fastloss

EXAMPLE = EXAMPLES / "distill_tiny_lm.py"


def _example_module():
    """The example as a module (it puts examples/ on sys.path itself, for train_tiny_lm)."""
    spec = importlib.util.spec_from_file_location("distill_tiny_lm", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return run_example("distill_tiny_lm.py", *args, timeout=timeout)


def test_help():
    proc = _run("--help", timeout=60)
    assert proc.returncode == 0, proc.stdout
    for flag in ("--steps", "--batch-size", "--seq-len", "--vocab-size", "--hidden", "--layers", "--seed",
                 "--cache-dir", "--plot", "--threads", "--teacher-hidden", "--teacher-steps", "--divergence",
                 "--beta", "--temperature", "--hard-weight", "--fastloss-op", "--tolerance"):
        assert flag in proc.stdout, flag
    assert "--worker" not in proc.stdout and "--teacher-path" not in proc.stdout  # internal flags stay hidden


@pytest.mark.parametrize("bad, message", [
    (["--vocab-size", "1000"], "at least 30000"),
    (["--beta", "1.5"], "must be in [0, 1]"),
    (["--temperature", "0"], "positive"),
    (["--teacher-hidden", "100", "--teacher-heads", "3"], "multiple of --teacher-heads"),
])
def test_rejects_bad_arguments(bad, message):
    proc = _run(*bad, timeout=60)
    assert proc.returncode != 0
    assert message in proc.stdout, proc.stdout


def _logits(n=12, v=40, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(n, v, generator=g, dtype=dtype) * 3
    t = 0.8 * s + 1.8 * torch.randn(n, v, generator=g, dtype=dtype)
    target = torch.randint(0, v, (n,), generator=g)
    target[::4] = -100  # masked tokens
    return s, t, target


CASES = [("forward_kl", 0.5, 2.0, 0.5), ("reverse_kl", 0.5, 1.0, 0.0), ("jsd", 0.3, 0.5, 0.25), ("jsd", 0.0, 1.0, 0.0),
         ("jsd", 1.0, 2.0, 1.0)]


@pytest.mark.parametrize("divergence, beta, temperature, hard_weight", CASES)
def test_plain_torch_loss_matches_the_float64_reference(divergence, beta, temperature, hard_weight):
    from fastloss import reference

    if not hasattr(reference, "distillation_loss_reference"):
        pytest.skip("fastloss.reference.distillation_loss_reference not in this fastloss")
    ex = _example_module()
    s, t, target = _logits()
    kw = dict(divergence=divergence, beta=beta, temperature=temperature, hard_weight=hard_weight)
    got = ex.torch_distillation_loss(s, t, target, **kw)
    ref = reference.distillation_loss_reference(s, t, target=target, **kw)
    assert torch.allclose(got, ref, rtol=1e-12, atol=1e-12), (got, ref)


@pytest.mark.skipif(not hasattr(fastloss, "distillation_loss"), reason="fastloss.distillation_loss not implemented")
@pytest.mark.parametrize("divergence, beta, temperature, hard_weight", CASES)
def test_plain_torch_loss_matches_fastloss(divergence, beta, temperature, hard_weight):
    # The two runs of the example differ only in this loss: same value and same student gradient on one step.
    ex = _example_module()
    s, t, target = _logits(dtype=torch.float32)
    kw = dict(divergence=divergence, beta=beta, temperature=temperature, hard_weight=hard_weight)
    s1 = s.clone().requires_grad_()
    s2 = s.clone().requires_grad_()
    a = ex.torch_distillation_loss(s1, t, target, **kw)
    b = fastloss.distillation_loss(s2, t, target=target, ignore_index=-100, **kw)
    a.backward()
    b.backward()
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s2.grad, s1.grad, rtol=1e-4, atol=1e-6)


@pytest.fixture(scope="module")
def bpe_cache(tmp_path_factory):
    """One tokenizer cache for both runs (the first trains the BPE, the second reads it)."""
    return tmp_path_factory.mktemp("fastloss-tokenizer")


@pytest.mark.slow
@pytest.mark.parametrize("op", ["linear", "logits"])
def test_tiny_run_passes(bpe_cache, op):
    pytest.importorskip("transformers")
    pytest.importorskip("tokenizers")
    need = "linear_distillation_loss" if op == "linear" else "distillation_loss"
    if not hasattr(fastloss, need):
        pytest.skip(f"fastloss.{need} not implemented")
    cache = bpe_cache
    proc = _run("--steps", "4", "--teacher-steps", "3", "--batch-size", "2", "--seq-len", "32", "--hidden", "32",
                "--layers", "1", "--heads", "2", "--teacher-hidden", "64", "--teacher-layers", "1",
                "--teacher-heads", "2", "--threads", "2", "--chunk-size", "24", "--fastloss-op", op,
                "--cache-dir", str(cache), "--plot", str(cache / "curves.png"))
    out = proc.stdout
    assert proc.returncode == 0, out
    assert "PASS" in out.splitlines()[-1], out
    assert "teacher:" in out and "entries" in out
    for run in ("torch", "fastloss"):
        assert any(line.startswith(run) and "MiB" in line for line in out.splitlines()), out
    assert (cache / "curves.png").exists() or "matplotlib is needed" in out
    assert any(cache.glob("bpe-v32768-*.json"))

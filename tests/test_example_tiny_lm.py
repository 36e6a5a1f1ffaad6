"""examples/train_tiny_lm.py: the torch-vs-fastloss training comparison runs end to end and PASSes.

The end-to-end test trains a real 32K-entry BPE (~7 s) and starts two child processes that each import
transformers (~8 s each here), so it takes ~25 s on a 2-core CPU: it is marked slow (FASTLOSS_SLOW=1).
"""

import subprocess

import pytest
from conftest import run_example



def _run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return run_example("train_tiny_lm.py", *args, timeout=timeout)


def test_help():
    proc = _run("--help", timeout=60)
    assert proc.returncode == 0, proc.stdout
    for flag in ("--steps", "--batch-size", "--seq-len", "--vocab-size", "--hidden", "--layers", "--seed",
                 "--cache-dir", "--plot", "--threads", "--z-loss"):
        assert flag in proc.stdout
    assert "--worker" not in proc.stdout  # internal flag stays hidden


def test_rejects_small_vocab():
    proc = _run("--vocab-size", "1000", timeout=60)
    assert proc.returncode != 0
    assert "at least 30000" in proc.stdout


@pytest.mark.slow
def test_tiny_run_passes(tmp_path_factory):
    pytest.importorskip("transformers")
    pytest.importorskip("tokenizers")
    cache = tmp_path_factory.mktemp("fastloss-tokenizer")
    proc = _run("--steps", "3", "--batch-size", "2", "--seq-len", "32", "--hidden", "64", "--layers", "1",
                "--heads", "2", "--threads", "2", "--cache-dir", str(cache), "--plot", str(cache / "curves.png"))
    out = proc.stdout
    assert proc.returncode == 0, out
    assert "PASS" in out.splitlines()[-1], out
    assert "entries" in out and any(cache.glob("bpe-v32768-*.json"))  # the tokenizer was trained and cached
    for run in ("torch", "fastloss"):
        assert any(line.startswith(run) and "MiB" in line for line in out.splitlines()), out
    # --plot either wrote the PNG or said that matplotlib is needed; it never fails the run.
    assert (cache / "curves.png").exists() or "matplotlib is needed" in out


def test_rejects_bad_z_loss():
    for bad in ("1", "0,5", "a,b", "-1,2"):
        proc = _run("--z-loss", bad, timeout=60)
        assert proc.returncode != 0 and "--z-loss" in proc.stdout, (bad, proc.stdout)


@pytest.mark.slow
def test_z_loss_comparison_runs(tmp_path_factory):
    pytest.importorskip("transformers")
    pytest.importorskip("tokenizers")
    cache = tmp_path_factory.mktemp("fastloss-tokenizer")
    proc = _run("--z-loss", "0.5,4", "--steps", "3", "--batch-size", "2", "--seq-len", "32", "--hidden", "64",
                "--layers", "1", "--heads", "2", "--threads", "2", "--cache-dir", str(cache))
    out = proc.stdout
    assert proc.returncode == 0, out
    assert out.splitlines()[-1] == "done", out
    lines = {line.split()[0]: line for line in out.splitlines() if line.startswith(("cross-entropy", "Z-loss"))}
    assert set(lines) == {"cross-entropy", "Z-loss"}, out
    for line in lines.values():
        assert "MiB" in line and line.count("%") == 2, line

import functools
import os
import pathlib
import subprocess
import sys

import hashlib
import tempfile

import pytest
import torch

import fastloss  # noqa: F401  (loads the ops)


def _inductor_cache_dir() -> str:
    """An inductor cache per build of fastloss: its FX-graph cache key does not cover a custom op's fake kernel, so a
    graph compiled against an older build (a different output shape) was served again to a newer one (seen when
    distill_fwd's stats went from 4 to 5 columns)."""
    h = hashlib.sha1()
    h.update(pathlib.Path(fastloss._library_path).read_bytes())
    h.update(pathlib.Path(fastloss._ops.__file__).read_bytes())
    return os.path.join(tempfile.gettempdir(), f"fastloss-inductor-{h.hexdigest()[:16]}")


os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", _inductor_cache_dir())

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() and fastloss.cuda_built else [])


def pytest_collection_modifyitems(config, items):
    # slow: sizes past 2^31 elements (FASTLOSS_SLOW=1); stacks: the transformers patch under PEFT, FSDP2, DDP,
    # checkpointing and compile (FASTLOSS_STACKS=1, `make test-stacks`, which installs peft): one CI configuration.
    gates = {"slow": "FASTLOSS_SLOW", "stacks": "FASTLOSS_STACKS"}
    for marker, env in gates.items():
        if os.environ.get(env) == "1":
            continue
        skip = pytest.mark.skip(reason=f"{marker}: set {env}=1 to run")
        for item in items:
            if marker in item.keywords:
                item.add_marker(skip)


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative error norm ||got - ref|| / ||ref|| over the finite entries of ref, in float64."""
    got = got.double().cpu()
    ref = ref.double().cpu()
    mask = torch.isfinite(ref)
    diff = (got[mask] - ref[mask]).norm()
    den = ref[mask].norm()
    return (diff / den).item() if den > 0 else diff.item()


def causal_lm_loss_float64(logits, labels, vocab_size, num_items_in_batch=None, ignore_index=-100,
                            shift_labels=None, **kwargs):
    """transformers' ForCausalLMLoss without its ``logits.float()``, which would round a float64 model's logits
    to float32: the float64 reference."""
    if shift_labels is None:
        shift_labels = torch.nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    reduction = "sum" if num_items_in_batch is not None else "mean"
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, vocab_size), shift_labels.reshape(-1),
                                             ignore_index=ignore_index, reduction=reduction)
    return loss / num_items_in_batch if num_items_in_batch is not None else loss


# Relative-error-norm tolerances against a float64 reference, per input dtype.
TOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}


# ---------------------------------------------------------------- emulated CUDA builds (make test-emu)
# There the "cpu" device runs the CUDA kernels on the CPU execution layer. The run ends with the launch report;
# with FASTLOSS_EMU_REQUIRE_ALL=1 (make test-emu, whole suite) a compiled kernel that never launched fails the run.
EMULATED = fastloss.cuda_emulated


def pytest_report_header(config):
    if EMULATED:
        from fastloss import _cuda_emu

        return ("fastloss: emulated CUDA build (CUDA kernels on the CPU execution layer), schedule "
                f"{_cuda_emu.schedule()}")
    return None


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not EMULATED:
        return
    from fastloss import _cuda_emu

    line, never = _cuda_emu.report()
    terminalreporter.write_sep("-", "CUDA execution layer")
    for k in never:
        terminalreporter.write_line(f"cuda-emu: never launched: {k}")
    terminalreporter.write_line(line)


def pytest_sessionfinish(session, exitstatus):
    # Only a run of the whole suite (`pytest tests`, nothing selected or deselected) must launch every kernel; not a
    # selection, a re-run of failures, or the suite's own collect-only subprocesses.
    opt, cfg = session.config.option, session.config
    partial = (getattr(opt, "collectonly", False) or getattr(opt, "keyword", "") or getattr(opt, "markexpr", "")
               or getattr(opt, "deselect", None) or getattr(opt, "lf", False) or getattr(opt, "failedfirst", False)
               or [os.path.normpath(a) for a in cfg.args] != ["tests"])
    if partial:
        return
    if EMULATED and os.environ.get("FASTLOSS_EMU_REQUIRE_ALL") == "1" and exitstatus == 0:
        from fastloss import _cuda_emu

        if _cuda_emu.report()[1]:
            session.exitstatus = 1


@functools.lru_cache(maxsize=None)
def _compile_unavailable():
    """Why torch.compile cannot run here (no C++ compiler for inductor, an unsupported Python), or None."""
    try:
        torch.compile(lambda x: x * 2 + 1, fullgraph=True)(torch.ones(3))
        return None
    except Exception as e:  # noqa: BLE001
        return f"torch.compile unavailable: {type(e).__name__}: {e}"[:300]


def compiled_or_skip(fn, *args):
    """torch.compile(fn, fullgraph=True)(*args); skips the test only when torch.compile cannot run at all here."""
    try:
        return torch.compile(fn, fullgraph=True)(*args)
    except Exception:
        why = _compile_unavailable()
        if why:
            pytest.skip(why)
        raise


EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"


def run_example(script: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """examples/<script> with these arguments in a child Python; stdout and stderr together in .stdout."""
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    return subprocess.run([sys.executable, str(EXAMPLES / script), *args], check=False, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=timeout, env=env)

"""fastloss-bench's issue #14 suites (suites/distillation.py): presets, a tiny CPU run of every suite through the CLI,
the fastloss entries skipped while the installed fastloss lacks the functions and checked against the float64
references once it has them, and the linear versions' peak memory.

Everything runs on tiny CPU shapes; torch.compile only in the slow test (FASTLOSS_SLOW=1).
"""

import json

import pytest
import torch

import fastloss
from fastloss.bench import cli, memory
from fastloss.bench.problems import DISTILL_DEFAULT_SUITES, DISTILL_LINEAR_SUITES, DISTILL_LOGITS_SUITES

SUITES = DISTILL_LOGITS_SUITES + DISTILL_LINEAR_SUITES
FUNCTION = {"distillation": "distillation_loss", "distillation_jsd": "distillation_loss",
            "token_logprobs": "token_logprobs", "linear_distillation": "linear_distillation_loss",
            "linear_distillation_jsd": "linear_distillation_loss", "linear_token_logprobs": "linear_token_logprobs"}
HAS_FASTLOSS = all(hasattr(fastloss, f) for f in set(FUNCTION.values()))
needs_fastloss = pytest.mark.skipif(not HAS_FASTLOSS, reason="fastloss lacks issue #14's functions "
                                    "(distillation_loss, linear_distillation_loss, token_logprobs, ...)")
TINY = ["--preset", "distill-tiny", "--device", "cpu", "--repeats", "1", "--quiet"]


def _run(tmp_path, *args):
    out = tmp_path / "r.json"
    rc = cli.main([*args, "--json", str(out)])
    return rc, json.loads(out.read_text())


def _results(doc, impl):
    return {(r["suite"], r["mode"]): r for r in doc["results"] if r["impl"] == impl}


def test_presets_and_their_defaults():
    parse = cli.build_parser().parse_args
    args = cli.apply_preset_options(parse(["--preset", "distill-cpu-goal"]))
    assert [(p.n, p.v, p.dtype, p.device, p.extra.get("hidden"), p.suites) for p in cli.resolve_problems(args)] == [
        (4096, 32768, torch.float32, "cpu", None, DISTILL_LOGITS_SUITES),
        (4096, 65536, torch.float32, "cpu", 1024, DISTILL_LINEAR_SUITES),
    ]
    assert (args.suite, args.mode) == (",".join(DISTILL_DEFAULT_SUITES), "fwdbwd")
    args = cli.apply_preset_options(parse(["--preset", "distill-gpu-quick"]))
    gpu = cli.resolve_problems(args)
    assert {(p.n, p.v, p.dtype, p.device) for p in gpu} == {(8192, 128256, torch.bfloat16, "cuda")}
    assert [(p.extra.get("hidden"), p.extra.get("teacher_hidden")) for p in gpu] == [(None, None), (2048, 4096)]
    assert (args.mode, args.min_time, args.max_repeats) == ("fwdbwd", 0.05, 30)
    tiny = cli.resolve_problems(cli.apply_preset_options(parse(TINY)))
    assert all(p.n * p.v <= 2**16 for p in tiny)


def test_list_shows_the_suites(capsys):
    assert cli.main(["--list", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    for suite in SUITES:
        assert f"\n{suite}: " in out, suite
    for preset in ("distill-cpu-goal", "distill-gpu-quick", "distill-tiny"):
        assert preset in out


def test_tiny_run_of_every_suite(tmp_path):
    # The torch composites run and agree with the float64 references; fastloss either does too or is skipped with
    # the reason (the functions land with issue #14).
    rc, doc = _run(tmp_path, *TINY, "--no-compile")
    assert rc == 0
    assert {r["suite"] for r in doc["results"]} == set(SUITES)
    eager = _results(doc, "torch-eager")
    assert set(eager) == {(s, m) for s in SUITES for m in ("fwd", "fwdbwd")}
    for key, r in eager.items():
        assert r["status"] == "ok" and r["rel_err"] < 1e-5 and r["speedup_vs_eager"] == 1.0, (key, r)
        assert r["bytes_moved"] > 0 and r["time_ms"] > 0
        if key[0].startswith("linear"):
            assert r["extras"]["hidden"] == 32 and r["extras"]["teacher_hidden"] == 48
    for (suite, mode), r in _results(doc, "fastloss").items():
        if hasattr(fastloss, FUNCTION[suite]):
            assert r["status"] == "ok" and r["rel_err"] < 1e-5, (suite, mode, r)
        else:
            assert r["status"] == "skipped" and f"fastloss.{FUNCTION[suite]} not implemented" in r["reason"], r


@needs_fastloss
@pytest.mark.parametrize("dtype, tol", [("float64", 1e-12), ("bfloat16", 5e-2)])
def test_fastloss_entries_match_the_references(tmp_path, dtype, tol):
    rc, doc = _run(tmp_path, *TINY, "--impl", "fastloss", "--dtype", dtype)
    assert rc == 0
    res = _results(doc, "fastloss")
    assert set(res) == {(s, m) for s in SUITES for m in ("fwd", "fwdbwd")}
    for key, r in res.items():
        assert r["status"] == "ok" and r["rel_err"] < tol, (key, r)


@needs_fastloss
def test_fastloss_temperature_extra(tmp_path):
    # The temperature extra reaches both the implementations and the references (no CLI flag: an explicit problem).
    from fastloss.bench.problems import make_problem
    from fastloss.bench.suites import select_suites
    from fastloss.bench.runner import RunConfig, run

    problems = [make_problem(16, 300, torch.float32, "cpu", temperature=0.7),
                make_problem(16, 300, torch.float32, "cpu", hidden=8, teacher_hidden=12, temperature=2.0)]
    cfg = RunConfig(problems=problems, suites=select_suites(",".join(SUITES)), repeats=1, include=["fastloss",
                    "torch-eager"])
    report = run(cfg, progress=lambda line: None)
    for r in report.results:
        assert r.status == "ok" and r.rel_err < 1e-5, r


@needs_fastloss
@pytest.mark.skipif(not memory.reset_peak_rss(), reason="needs a resettable peak RSS (/proc/self/clear_refs)")
def test_linear_versions_need_less_memory_than_the_composite():
    # N=512 tokens x V=16384: the composite's logits alone are 32 MiB per head, and it keeps several N x V tensors;
    # fastloss in chunks of 64 tokens holds 4 MiB of logits per head at a time.
    from fastloss.bench.problems import make_problem
    from fastloss.bench.suites import select_suites
    from fastloss.bench.runner import RunConfig, run

    problem = make_problem(512, 16384, torch.float32, "cpu", hidden=64, chunk_size=64)
    cfg = RunConfig(problems=[problem], suites=select_suites("linear_distillation,linear_token_logprobs"),
                    modes=("fwdbwd",), include=["fastloss", "torch-eager"], repeats=1, cpu_memory=True)
    report = run(cfg, progress=lambda line: None)
    peaks = {(r.suite, r.impl): r.peak_mem_mb for r in report.results}
    for suite in ("linear_distillation", "linear_token_logprobs"):
        eager, fused = peaks[(suite, "torch-eager")], peaks[(suite, "fastloss")]
        assert eager is not None and fused is not None, peaks
        assert eager > 64 and fused < eager / 4, (suite, fused, eager)


@pytest.mark.slow
def test_compiled_composites(tmp_path):
    rc, doc = _run(tmp_path, *TINY, "--impl", "torch-compile", "--mode", "fwdbwd", "--suite",
                   "distillation,token_logprobs,linear_distillation")
    assert rc == 0
    for key, r in _results(doc, "torch-compile").items():
        assert r["status"] == "ok" and r["rel_err"] < 1e-5 and r["compile_s"] > 0, (key, r)

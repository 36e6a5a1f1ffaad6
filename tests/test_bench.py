"""fastloss-bench: argument parsing, the JSON schema and Markdown of a tiny real run, skipped peers, failures.

Everything runs on the CPU on tiny shapes with torch.compile filtered out (one test stubs torch.compile), so the
file takes seconds.
"""

import collections
import json
import math
import pathlib
import subprocess
import sys

import pytest
import torch

from fastloss.bench import accuracy, cli, memory, report, timing
from fastloss.bench.problems import make_problem
from fastloss.bench.registry import Impl, Suite, register_suite, unregister_suite
from fastloss.bench.inputs import random_rows
from fastloss.bench.suites import select_suites

TINY = ["--n", "8", "--v", "64", "--repeats", "2", "--device", "cpu", "--quiet"]

RESULT_TYPES = {
    "suite": str, "mode": str, "impl": str, "n": int, "v": int, "dtype": str, "device": str, "status": str,
    "reason": str, "time_ms": float, "time_ms_min": float, "repeats": int, "gbps": float, "copy_gbps": float,
    "pct_copy": float, "speedup_vs_eager": float, "peak_mem_mb": float, "rel_err": float, "bytes_moved": int,
    "compile_s": float, "note": str, "extras": dict,
}
NULLABLE = {"time_ms", "time_ms_min", "repeats", "gbps", "copy_gbps", "pct_copy", "speedup_vs_eager",
            "peak_mem_mb", "rel_err", "bytes_moved", "compile_s"}


def _run(tmp_path, *args):
    out = tmp_path / "r.json"
    rc = cli.main([*args, "--json", str(out)])
    return rc, json.loads(out.read_text())


def _by_impl(doc, mode="fwd"):
    return {r["impl"]: r for r in doc["results"] if r["mode"] == mode}


@pytest.fixture
def temp_suite():
    """Registers throwaway suites named test_*; removes them afterwards."""
    names = []

    def make(name, impls, **kw):
        suite = Suite(name=name, description="test", make_inputs=random_rows,
                      bytes_moved=lambda p, m: 2 * p.numel * p.elem_size,
                      rel_error=accuracy.rowwise_error(lambda x: torch.softmax(x, -1)), default=False, **kw)
        for impl in impls:
            suite.add(impl)
        register_suite(suite)
        names.append(name)
        return suite

    select_suites("all")  # make sure the built-in suites are registered first
    yield make
    for n in names:
        unregister_suite(n)


def _softmax_impl(name, **kw):
    return Impl(name, lambda p: (lambda x: torch.softmax(x, -1)), **kw)


# ---------------------------------------------------------------- parsing


def test_parse_explicit_sizes_and_lists():
    args = cli.build_parser().parse_args(["--n", "8,16", "--v", "64", "--dtype", "fp32,bf16", "--device", "cpu",
                                          "--suite", "logsumexp", "--impl", "fastloss-*,torch-eager",
                                          "--mode", "fwd"])
    problems = cli.resolve_problems(args)
    assert [(p.n, p.v, p.dtype) for p in problems] == [
        (8, 64, torch.float32), (16, 64, torch.float32), (8, 64, torch.bfloat16), (16, 64, torch.bfloat16)]
    assert all(p.device == "cpu" for p in problems)
    assert args.impl == ["fastloss-*", "torch-eager"] and args.mode == "fwd"
    assert [s.name for s in select_suites(args.suite)] == ["logsumexp"]


def test_parse_presets_and_overrides():
    parse = cli.build_parser().parse_args
    default = cli.resolve_problems(parse(["--device", "cpu"]))
    assert {(p.n, p.v) for p in default} == {(1024, 32768), (1024, 4096)}
    assert all(p.dtype == torch.float32 for p in default)
    goal = cli.resolve_problems(parse(["--preset", "cpu-goal"]))
    assert [(p.n, p.v, p.dtype, p.device) for p in goal] == [(4096, 32768, torch.float32, "cpu")]
    gemma = cli.resolve_problems(parse(["--preset", "gemma2", "--device", "cuda", "--n", "1024"]))
    assert {p.v for p in gemma} == {256000} and {p.n for p in gemma} == {1024}
    assert all(p.extra["softcap"] == 30.0 for p in gemma)
    sweep = cli.resolve_problems(parse(["--preset", "gpu-sweep"]))
    assert {p.device for p in sweep} == {"cuda"} and {p.dtype for p in sweep} == {torch.float32, torch.bfloat16}
    assert {p.v for p in sweep} == {128, 512, 2048, 8192, 32768, 131072, 262144}
    assert all(abs(p.n * p.v - 2**28) <= p.v for p in sweep)
    # Two presets at once, duplicates removed.
    both = cli.resolve_problems(parse(["--preset", "cpu-goal,cpu-goal,llama3", "--device", "cpu"]))
    assert [p.v for p in both] == [32768, 128256]


def test_parse_errors_exit_with_usage(capsys):
    for bad in (["--dtype", "int7"], ["--n", "0"], ["--preset", "nope"], ["--mode", "sideways"],
                ["--suite", "nope", "--device", "cpu"]):
        with pytest.raises(SystemExit) as e:
            cli.main(bad)
        assert e.value.code == 2, bad
    assert "nope" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_problems_without_cuda_are_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--preset", "gpu-sweep"])
    assert e.value.code == 2 and "CUDA" in capsys.readouterr().err


def test_gpu_quick_preset_problems_and_defaults():
    parse = cli.build_parser().parse_args
    args = cli.apply_preset_options(parse(["--preset", "gpu-quick"]))
    logits = ("softmax", "logsumexp", "cross_entropy")
    assert [(p.n, p.v, p.dtype, p.device, p.extra.get("hidden"), p.suites) for p in cli.resolve_problems(args)] == [
        (8192, 128256, torch.bfloat16, "cuda", None, logits),
        (8192, 128256, torch.bfloat16, "cuda", 4096, ("linear_cross_entropy", "linear_spherical")),  # Llama-3-8B head
        (8192, 256000, torch.bfloat16, "cuda", None, logits),
    ]
    assert (args.suite, args.mode, args.min_time, args.max_repeats) == (
        "softmax,logsumexp,cross_entropy,linear_cross_entropy,linear_spherical", "fwdbwd", 0.05, 30)
    # What the command line says wins; presets without options keep the built-in defaults.
    args = cli.apply_preset_options(parse(["--preset", "gpu-quick", "--mode", "both", "--max-repeats", "5",
                                           "--suite", "softmax"]))
    assert (args.mode, args.max_repeats, args.suite, args.min_time) == ("both", 5, "softmax", 0.05)
    args = cli.apply_preset_options(parse(["--preset", "llama3"]))
    assert (args.suite, args.mode, args.min_time, args.max_repeats) == ("default", "both", None, 100)


def test_preset_suites_that_match_no_problem_are_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--preset", "gpu-quick", "--device", "cpu", "--suite", "log_softmax"])
    assert e.value.code == 2 and "meant for" in capsys.readouterr().err


# ---------------------------------------------------------------- a real tiny run


def test_json_schema_of_a_tiny_cpu_run(tmp_path):
    rc, doc = _run(tmp_path, "--suite", "logsumexp", *TINY, "--no-compile")
    assert rc == 0
    assert set(doc) == {"schema_version", "meta", "copy_bandwidth_gbps", "results"}
    meta = doc["meta"]
    for key, typ in {"date": str, "device_name": str, "torch_version": str, "fastloss_version": str,
                     "threads": int, "cuda": dict, "peers": dict, "argv": list, "config": dict}.items():
        assert isinstance(meta[key], typ), key
    assert meta["threads"] == torch.get_num_threads()
    assert meta["torch_version"] == torch.__version__
    assert list(doc["copy_bandwidth_gbps"]) == ["cpu:float32:8x64"]
    assert doc["copy_bandwidth_gbps"]["cpu:float32:8x64"] > 0

    results = doc["results"]
    impls = ["fastloss-online", "fastloss-two_pass", "fastloss-auto", "torch-eager"]
    assert [(r["mode"], r["impl"]) for r in results] == [(m, i) for m in ("fwd", "fwdbwd") for i in impls]
    for r in results:
        assert set(r) == set(RESULT_TYPES)
        for key, typ in RESULT_TYPES.items():
            if r[key] is None:
                assert key in NULLABLE, key
            else:
                assert isinstance(r[key], typ) or (typ is float and isinstance(r[key], int)), (key, r[key])
        assert (r["suite"], r["n"], r["v"], r["dtype"], r["device"]) == ("logsumexp", 8, 64, "float32", "cpu")
        assert r["status"] == "ok" and r["reason"] == "", r
        assert r["time_ms"] > 0 and r["time_ms_min"] <= r["time_ms"] and r["repeats"] == 2
        assert r["gbps"] == pytest.approx(r["bytes_moved"] / (r["time_ms"] * 1e-3) / 1e9)
        assert r["pct_copy"] == pytest.approx(100 * r["gbps"] / r["copy_gbps"])
        assert r["peak_mem_mb"] is None  # CPU without --memory
        assert 0 <= r["rel_err"] < 1e-5, r  # float32 against a float64 reference
    fwd = _by_impl(doc)
    assert fwd["torch-eager"]["speedup_vs_eager"] == 1.0
    assert fwd["fastloss-online"]["speedup_vs_eager"] == pytest.approx(
        fwd["torch-eager"]["time_ms"] / fwd["fastloss-online"]["time_ms"])
    assert fwd["fastloss-auto"]["note"] in ("auto=online", "auto=two_pass")
    # Bytes model: logsumexp fwd reads N*V and writes N elements; fwdbwd adds 2NV + 2N.
    assert fwd["torch-eager"]["bytes_moved"] == (8 * 64 + 8) * 4
    assert _by_impl(doc, "fwdbwd")["torch-eager"]["bytes_moved"] == (3 * 8 * 64 + 3 * 8) * 4


def test_gpu_quick_tiny_cpu_run_gives_each_problem_its_suites(tmp_path):
    rc, doc = _run(tmp_path, "--preset", "gpu-quick", "--device", "cpu", "--n", "6", "--v", "40", "--hidden", "8",
                   "--repeats", "1", "--no-compile", "--quiet")
    assert rc == 0
    results = doc["results"]
    assert {r["mode"] for r in results} == {"fwdbwd"} and {r["dtype"] for r in results} == {"bfloat16"}
    impls = collections.Counter(r["suite"] for r in results)
    # --n/--v fold the two logits shapes into one problem; the linear losses run on their own (head) problem only.
    assert impls == {"softmax": 4, "logsumexp": 4, "cross_entropy": 4, "linear_cross_entropy": 5,
                     "linear_spherical": 2}, impls
    assert list(doc["copy_bandwidth_gbps"]) == ["cpu:bfloat16:6x40"]  # measured once, shared by both problems
    for r in results:
        if r["status"] == "ok":
            assert r["pct_copy"] > 0 and r["rel_err"] < 5e-2 and r["gbps"] > 0, r
        else:
            assert r["status"] == "skipped" and r["impl"] in ("liger", "cce", "liger-fused", "torch-linear-ce"), r
    assert {r["impl"] for r in results if r["status"] == "ok"} >= {"fastloss", "fastloss-inplace", "torch-eager",
                                                                    "fastloss-online", "fastloss-two_pass"}
    meta = doc["meta"]
    assert meta["complete"] is True
    assert (meta["config"]["min_time_s"], meta["config"]["max_repeats"], meta["config"]["modes"]) == (
        0.05, 30, ["fwdbwd"])


def test_reports_are_rewritten_as_the_run_goes(tmp_path, monkeypatch):
    snapshots = []
    real = cli._write_reports

    def spy(result, args):
        real(result, args)
        snapshots.append((json.loads(pathlib.Path(args.json).read_text()), pathlib.Path(args.md).read_text()))

    monkeypatch.setattr(cli, "_write_reports", spy)
    rc, doc = _run(tmp_path, "--suite", "logsumexp,softmax", *TINY, "--no-compile", "--md", str(tmp_path / "r.md"))
    assert rc == 0
    # After each of the 2 suites x 2 modes groups, then the final write.
    assert [(d["meta"]["complete"], len(d["results"])) for d, _ in snapshots] == [
        (False, 4), (False, 8), (False, 12), (False, 16), (True, 16)]
    assert "INCOMPLETE" in snapshots[0][1] and "INCOMPLETE" not in snapshots[-1][1]
    assert doc == snapshots[-1][0]
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary file left


def test_markdown_and_text_tables(tmp_path, capsys):
    md = tmp_path / "r.md"
    rc = cli.main(["--suite", "softmax", *TINY, "--impl", "fastloss-online,torch-eager", "--mode", "fwd",
                   "--md", str(md)])
    assert rc == 0
    text = capsys.readouterr().out
    lines = md.read_text().splitlines()
    headers = [h for h, _, _ in report.COLUMNS]
    table = [ln for ln in lines if ln.startswith("|")]
    assert table[0] == "| " + " | ".join(headers) + " |"
    assert set(table[1].replace("|", "")) <= set("-:")
    assert len(table) == 2 + 2  # header, separator, two implementations
    for row in table[2:]:
        assert row.count(" | ") == len(headers) - 1
    assert any("fastloss-online" in row and "| ok" in row for row in table)
    assert any("CPU threads" in ln for ln in lines)
    # The terminal table has the same rows, aligned.
    assert "fastloss-online" in text and "torch-eager" in text and "threads" in text
    rows = [ln for ln in text.splitlines() if ln.startswith("softmax")]
    assert len(rows) == 2 and rows[0].index("float32") == rows[1].index("float32")


def test_list(capsys):
    assert cli.main(["--list", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    for name in ("softmax", "log_softmax", "logsumexp", "cross_entropy", "linear_cross_entropy", "liger", "cce"):
        assert name in out


def test_python_dash_m_entry_point():
    proc = subprocess.run([sys.executable, "-m", "fastloss.bench", "--help"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and "--preset" in proc.stdout and "gpu-sweep" in proc.stdout


# ---------------------------------------------------------------- skipped, failed, wrong


def test_missing_peer_is_listed_as_skipped(tmp_path, temp_suite, capsys):
    temp_suite("test_peer", [
        _softmax_impl("torch-eager", baseline=True),
        _softmax_impl("ghost-peer", requires=("fastloss_bench_no_such_peer",)),
        _softmax_impl("cuda-only", devices=("cuda",)),
    ])
    rc, doc = _run(tmp_path, "--suite", "test_peer", *TINY, "--mode", "fwd")
    assert rc == 0
    res = _by_impl(doc)
    assert set(res) == {"torch-eager", "ghost-peer", "cuda-only"}
    ghost = res["ghost-peer"]
    assert ghost["status"] == "skipped"
    assert "fastloss_bench_no_such_peer not importable" in ghost["reason"]
    assert ghost["time_ms"] is None and ghost["rel_err"] is None
    assert res["cuda-only"]["status"] == "skipped" and "cuda" in res["cuda-only"]["reason"]
    assert res["torch-eager"]["status"] == "ok"
    assert "skipped: fastloss_bench_no_such_peer not importable" in capsys.readouterr().out


def test_cross_entropy_suite_with_a_peer_skipped_on_cpu(tmp_path):
    # Liger Kernel needs CUDA (Triton): on a CPU problem it is skipped, whether or not it is installed. The in-place
    # fastloss variant overwrites its logits, so its error check must run on a fresh copy of the inputs.
    rc, doc = _run(tmp_path, "--suite", "cross_entropy", "--n", "6", "--v", "40", "--repeats", "2",
                   "--device", "cpu", "--quiet", "--no-compile", "--softcap", "4")
    assert rc == 0
    for mode in ("fwd", "fwdbwd"):
        res = _by_impl(doc, mode)
        assert res["liger"]["status"] == "skipped" and res["liger"]["reason"]
        for impl in ("torch-eager", "fastloss", "fastloss-inplace"):
            assert res[impl]["status"] == "ok" and res[impl]["rel_err"] < 1e-5, res[impl]


def test_linear_cross_entropy_reference_covers_both_gradients(tmp_path):
    rc, doc = _run(tmp_path, "--suite", "linear_cross_entropy", "--n", "6", "--v", "40", "--hidden", "8",
                   "--repeats", "1", "--device", "cpu", "--quiet", "--impl", "torch-eager,fastloss", "--softcap", "5")
    assert rc == 0
    for mode in ("fwd", "fwdbwd"):
        for impl in ("torch-eager", "fastloss"):
            r = _by_impl(doc, mode)[impl]
            assert r["status"] == "ok" and r["rel_err"] < 1e-5 and r["extras"] == {"hidden": 8, "softcap": 5.0}, r


def test_wrong_results_and_failures_are_visible(tmp_path, temp_suite):
    def boom(p):
        def run(x):
            raise RuntimeError("kernel exploded")
        return run

    temp_suite("test_bad", [
        _softmax_impl("torch-eager", baseline=True),
        Impl("off-by-a-bit", lambda p: (lambda x: torch.softmax(x, -1) * 1.01)),
        Impl("wrong-grad", lambda p: (lambda x: _WrongGrad.apply(x))),
        Impl("raises", boom),
    ])
    rc, doc = _run(tmp_path, "--suite", "test_bad", *TINY)
    assert rc == 0
    fwd, bwd = _by_impl(doc), _by_impl(doc, "fwdbwd")
    assert fwd["torch-eager"]["rel_err"] < 1e-5
    assert fwd["off-by-a-bit"]["status"] == "ok" and fwd["off-by-a-bit"]["rel_err"] == pytest.approx(0.01, rel=1e-3)
    assert fwd["wrong-grad"]["rel_err"] < 1e-5 and bwd["wrong-grad"]["rel_err"] > 0.5
    for res in (fwd, bwd):
        assert res["raises"]["status"] == "error" and "kernel exploded" in res["raises"]["reason"]
    assert cli.main(["--suite", "test_bad", *TINY, "--impl", "raises", "--fail-on-error"]) == 1


class _WrongGrad(torch.autograd.Function):
    """Right forward, wrong backward: only the fwdbwd error may flag it."""

    @staticmethod
    def forward(ctx, x):
        return torch.softmax(x, -1)

    @staticmethod
    def backward(ctx, g):
        return -g


def test_compile_failure_is_skipped_with_reason(tmp_path, temp_suite, monkeypatch):
    def broken_compile(fn, **kw):
        def run(*a):
            raise RuntimeError("inductor: no C++ compiler")
        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    temp_suite("test_compile", [_softmax_impl("torch-eager", baseline=True),
                                _softmax_impl("torch-compile", compiled=True)])
    rc, doc = _run(tmp_path, "--suite", "test_compile", *TINY, "--mode", "fwd")
    r = _by_impl(doc)["torch-compile"]
    assert rc == 0 and r["status"] == "skipped"
    assert r["reason"].startswith("torch.compile failed") and "no C++ compiler" in r["reason"]
    assert cli.main(["--suite", "test_compile", *TINY, "--mode", "fwd", "--no-compile", "--json",
                     str(tmp_path / "n.json")]) == 0
    assert [r["impl"] for r in json.loads((tmp_path / "n.json").read_text())["results"]] == ["torch-eager"]


def test_time_budget_skips_the_rest(tmp_path):
    rc, doc = _run(tmp_path, "--suite", "logsumexp", *TINY, "--no-compile", "--time-budget", "0")
    assert rc == 0 and doc["results"]
    assert all(r["status"] == "skipped" and "time budget" in r["reason"] for r in doc["results"])


# ---------------------------------------------------------------- memory, plot, helpers


@pytest.mark.skipif(not memory.reset_peak_rss(), reason="needs a resettable peak RSS (/proc/self/clear_refs)")
def test_cpu_memory_subprocess_measures_the_output(tmp_path):
    # softmax of [256, 4096] fp32 allocates a 4 MiB output; fwdbwd also its 4 MiB gradient.
    rc, doc = _run(tmp_path, "--suite", "softmax", "--impl", "torch-eager", "--n", "256", "--v", "4096",
                   "--repeats", "1", "--device", "cpu", "--quiet", "--memory")
    assert rc == 0
    fwd, bwd = _by_impl(doc)["torch-eager"], _by_impl(doc, "fwdbwd")["torch-eager"]
    assert 3.5 <= fwd["peak_mem_mb"] <= 12, fwd
    assert 7.5 <= bwd["peak_mem_mb"] <= 24, bwd


def test_plot(tmp_path, monkeypatch, capsys):
    png = tmp_path / "p.png"
    args = ["--suite", "logsumexp", "--n", "8", "--v", "64,128", "--repeats", "1", "--device", "cpu", "--quiet",
            "--impl", "torch-eager,fastloss-online", "--mode", "fwd", "--plot", str(png)]
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert cli.main(args) == 1
        assert "matplotlib" in capsys.readouterr().err
    else:
        assert cli.main(args) == 0 and png.stat().st_size > 1000
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    assert cli.main(args) == 1
    assert "pip install" in capsys.readouterr().err


def test_chunked_reference_matches_unchunked(monkeypatch):
    p = make_problem(37, 50, torch.float32, "cpu")
    (x,) = random_rows(p, torch.Generator().manual_seed(1))
    g = torch.randn(37, 50)
    got = torch.softmax(x, -1) * 1.001
    xr = x.detach().requires_grad_()
    got_grad = torch.autograd.grad(torch.softmax(xr, -1), xr, g)[0] * 0.999
    err = accuracy.rowwise_error(lambda t: torch.softmax(t, -1))
    whole = err(p, (x,), g, got, [got_grad], {})
    monkeypatch.setattr(accuracy, "CHUNK_ELEMENTS", 3 * 50)  # 13 chunks of 3 rows
    cache = {}
    chunked = err(p, (x,), g, got, [got_grad], cache)
    assert chunked == pytest.approx(whole, rel=1e-9) and len([k for k in cache if k != "_bytes"]) == 13
    assert math.isclose(err(p, (x,), g, got, [got_grad], cache), chunked)  # served from the cache


def test_rotation_and_measure():
    assert timing.rotation_count(2**30, 2**34) == 1
    assert timing.rotation_count(2**20, 2**34) == timing.MAX_BUFFERS
    assert timing.rotation_count(64 * 2**20, 2**34) == 4
    assert timing.rotation_count(64 * 2**20, 100 * 2**20) == 1  # memory cap wins
    seen = []
    t = timing.measure(lambda i: seen.append(i), device="cpu", n_buffers=3, warmup=2, repeats=5, min_time_s=0,
                       max_repeats=10)
    assert t.repeats == 5 and seen == [0, 1, 0, 1, 2, 0, 1] and t.median_ms >= t.min_ms >= 0


def test_chunked_loss_reference_matches_unchunked(monkeypatch):
    # linear_cross_entropy: h rows are chunked, W is shared and its float64 gradient accumulated over the chunks.
    suite = select_suites("linear_cross_entropy")[0]
    p = make_problem(10, 30, torch.float32, "cpu", hidden=6, softcap=3.0)
    inputs = suite.make_inputs(p, torch.Generator().manual_seed(2))
    h, w = (t.detach().requires_grad_() for t in inputs[:2])
    loss = suite.impls[[i.name for i in suite.impls].index("torch-eager")].make(p)(h, w, inputs[2])
    g = torch.ones(())
    dh, dw = torch.autograd.grad(loss, (h, w), g)
    got, grads = loss.detach() * 1.0001, [dh, dw * 0.99]
    whole = suite.rel_error(p, inputs, g, got, grads, {})
    assert whole == pytest.approx(0.01, rel=1e-3)  # the largest error: dW's 1%
    monkeypatch.setattr(accuracy, "CHUNK_ELEMENTS", 3 * 30)  # 4 chunks of at most 3 rows
    assert suite.rel_error(p, inputs, g, got, grads, {}) == pytest.approx(whole, rel=1e-9)
    assert suite.rel_error(p, inputs, None, got, [], {}) == pytest.approx(1e-4, rel=1e-2)  # fwd: the loss only

"""fastloss-bench's issue #25 suites (suites/spherical.py): the presets, a tiny CPU run of both suites through the
CLI with every fastloss entry checked against its float64 reference, the composite skipped where its logits would
not fit, and the plain-torch head reference of the linear suite against the materialised logits."""

import json

import torch

from fastloss.bench import cli
from fastloss.bench.problems import SPHERICAL_SUITES, make_problem
from fastloss.bench.suites import spherical as suite
from fastloss.reference import spherical_loss_reference

TINY = ["--preset", "spherical-tiny", "--device", "cpu", "--repeats", "1", "--quiet", "--no-compile"]


def test_presets():
    parse = cli.build_parser().parse_args
    args = cli.apply_preset_options(parse(["--preset", "spherical-gpu-quick"]))
    problems = cli.resolve_problems(args)
    assert {(p.n, p.v, p.dtype, p.device) for p in problems} == {(8192, 128256, torch.bfloat16, "cuda")}
    assert [p.extra.get("hidden") for p in problems] == [None, 4096]
    assert args.suite == ",".join(SPHERICAL_SUITES) and args.mode == "fwdbwd"


def test_tiny_run(tmp_path):
    out = tmp_path / "r.json"
    assert cli.main([*TINY, "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    rows = {(r["suite"], r["mode"], r["impl"]): r for r in doc["results"]}
    for name in ("spherical", "linear_spherical"):
        for mode in ("fwd", "fwdbwd"):
            for impl in ("fastloss", "torch-eager"):
                r = rows[(name, mode, impl)]
                assert r["status"] == "ok", r
                assert r["rel_err"] < 1e-5, r


def test_composite_skips_what_does_not_fit():
    assert suite._fits(make_problem(16384, 131072, torch.float32, "cpu", hidden=1024)) is not None
    assert suite._fits(make_problem(64, 512, torch.float32, "cpu")) is None


def test_head_reference_matches_materialised_logits():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(20, 6, generator=g, dtype=torch.float64)
    w = torch.randn(50, 6, generator=g, dtype=torch.float64)
    t = torch.randint(0, 50, (20,), generator=g)
    t[3] = suite.IGNORE_INDEX
    ref = spherical_loss_reference(h @ w.T, t, "z", a=suite.Z_A, b=suite.Z_B, ignore_index=suite.IGNORE_INDEX)
    assert torch.allclose(suite.head_z_loss_sum64(h, w, t), ref.sum(), rtol=1e-12)

import os

import pytest
import torch

import fastloss  # noqa: F401  (loads the ops)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() and fastloss.cuda_built else [])


def pytest_collection_modifyitems(config, items):
    if os.environ.get("FASTLOSS_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow: set FASTLOSS_SLOW=1 to run")
    for item in items:
        if "slow" in item.keywords:
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


# Relative-error-norm tolerances against a float64 reference, per input dtype.
TOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}

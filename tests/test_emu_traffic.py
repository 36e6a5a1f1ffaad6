"""Bytes moved, counted by the CUDA execution layer: every op's passes over its row data equal what its launcher
declares (`// fl-passes:` lines next to the launchers in csrc/cuda/*.cu), so a new pass cannot slip in unseen.

The row helpers of csrc/cuda/row_reduce.cuh count the bytes of each row segment they read or write (once per
segment; per-row scalars are not counted), so on an emulated build reads / (rows x V x element size) is the op's
number of read passes. bench/audit_cuda.py reads the same declarations for its pass-bound ceilings.
"""

import pathlib
import re

import pytest
import torch

import fastloss
from fastloss import _cuda_emu

ROOT = pathlib.Path(__file__).resolve().parents[1]
DECL = re.compile(r"fl-passes: (\S+) = (\d+)R \+ (\d+)W \(floor (\d+)R \+ (\d+)W\)")


def declarations():
    out = {}
    for path in sorted((ROOT / "csrc" / "cuda").glob("*.cu")):
        for m in DECL.finditer(path.read_text()):
            assert m.group(1) not in out, f"{m.group(1)} declared twice"
            out[m.group(1)] = tuple(int(g) for g in m.groups()[1:])
    return out


def _x(n, v, dtype=torch.bfloat16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, v, generator=g) * 2).to(dtype)


def _t(n, v, seed=1):
    return torch.randint(0, v, (n,), generator=torch.Generator().manual_seed(seed))


def _grad_of(f, *xs):
    """f's forward, then its backward, each counted: returns the two traffic pairs."""
    xs = [x.clone().requires_grad_() for x in xs]
    _cuda_emu.reset_traffic()
    out = f(*xs)
    fwd = _cuda_emu.traffic()
    _cuda_emu.reset_traffic()
    out.backward(torch.ones_like(out))
    return fwd, _cuda_emu.traffic()


def _fwd(f, *xs):
    _cuda_emu.reset_traffic()
    f(*xs)
    return _cuda_emu.traffic()


# Each declared op: a problem (rows, V, dtype) and what to run -> (bytes read, bytes written) of that op alone.
# Rows past 2 x 132 SMs keep softmax off its split path (few long rows), V past 1024 off its warp path.
N, V = 300, 1100


def _ce(**kw):
    return _grad_of(lambda x: fastloss.cross_entropy(x, _t(N, V), **kw), _x(N, V))


def _both(pair):
    (fr, fw), (br, bw) = pair
    return fr + br, fw + bw


def _distill(div):
    return _grad_of(lambda s: fastloss.distillation_loss(s, _x(N, V, seed=2), divergence=div), _x(N, V))


OPS = {
    "softmax": lambda: _fwd(lambda x: fastloss.softmax(x, -1), _x(N, V)),
    "softmax_warp": lambda: _fwd(lambda x: fastloss.softmax(x, -1), _x(N, 1000)),
    "logsumexp": lambda: _fwd(lambda x: fastloss.logsumexp(x, -1), _x(N, V)),
    "softmax_backward": lambda: _fwd(lambda g, y: torch.ops.fastloss.softmax_backward(g, y, -1), _x(N, V),
                                     _x(N, V, seed=3).softmax(-1)),
    "softmax_backward_warp": lambda: _fwd(lambda g, y: torch.ops.fastloss.softmax_backward(g, y, -1),
                                          _x(N, 1000), _x(N, 1000, seed=3).softmax(-1)),
    "logsumexp_backward": lambda: _grad_of(lambda x: fastloss.logsumexp(x, -1), _x(N, V))[1],
    "softmax_topk": lambda: _fwd(lambda x: fastloss.softmax_topk(x, 5), _x(N, V)),
    "cross_entropy": lambda: _ce()[0],
    "cross_entropy_backward": lambda: _ce()[1],
    "cross_entropy_train": lambda: _both(_ce()),
    "cross_entropy_inplace": lambda: _ce(inplace_backward=True)[0],
    "token_logprobs": lambda: _grad_of(lambda x: fastloss.token_logprobs(x, _t(N, V)), _x(N, V))[0],
    "token_logprobs_backward": lambda: _grad_of(lambda x: fastloss.token_logprobs(x, _t(N, V)), _x(N, V))[1],
    "token_logprobs_train": lambda: _both(_grad_of(lambda x: fastloss.token_logprobs(x, _t(N, V)), _x(N, V))),
    "distillation_forward_kl": lambda: _distill("forward_kl")[0],
    "distillation_jsd": lambda: _distill("jsd")[0],
    "spherical": lambda: _grad_of(lambda x: fastloss.spherical_loss(x, _t(N, V), a=1.0, b=2.0), _x(N, V))[0],
    "spherical_backward": lambda: _grad_of(lambda x: fastloss.spherical_loss(x, _t(N, V), a=1.0, b=2.0),
                                           _x(N, V))[1],
}
SHAPE = {"softmax_warp": (N, 1000), "softmax_backward_warp": (N, 1000)}


def test_every_declaration_has_a_check_and_back():
    assert set(declarations()) == set(OPS)
    for name, (r, w, fr, fw) in declarations().items():
        assert (fr, fw) <= (r, w) and fr <= r and fw <= w, (name, "a floor above the declared passes")


@pytest.mark.skipif(not _cuda_emu.available, reason="counts come from the CUDA execution layer (make test-emu)")
@pytest.mark.parametrize("name", sorted(OPS))
def test_passes_match_the_declaration(name):
    r, w, _, _ = declarations()[name]
    n, v = SHAPE.get(name, (N, V))
    row_bytes = n * v * 2  # bfloat16
    got_r, got_w = OPS[name]()
    assert (got_r / row_bytes, got_w / row_bytes) == (r, w), (name, got_r / row_bytes, got_w / row_bytes)

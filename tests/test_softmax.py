"""softmax / log_softmax / logsumexp: every op x algorithm x dtype against float64 references."""

import math

import pytest
import torch
from conftest import TOL, rel_err

import fastloss
from fastloss import reference as R

ALGS = ["online", "two_pass", "auto"]
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
# V=1, V below / at / above the SIMD block (32 floats on AVX2), odd sizes, and a long row.
SHAPES = [(4, 1), (3, 7), (5, 31), (5, 32), (5, 33), (2, 1000), (3, 4099), (2, 65537)]

OPS = {
    "softmax": (lambda x, a: fastloss.softmax(x, -1, algorithm=a), lambda x: R.softmax_reference(x, -1),
                lambda x: torch.softmax(x, -1)),
    "log_softmax": (lambda x, a: fastloss.log_softmax(x, -1, algorithm=a), lambda x: R.log_softmax_reference(x, -1),
                    lambda x: torch.log_softmax(x, -1)),
    "logsumexp": (lambda x, a: fastloss.logsumexp(x, -1, algorithm=a), lambda x: R.logsumexp_reference(x, -1),
                  lambda x: torch.logsumexp(x, -1)),
}


def _rand(shape, dtype, device, scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype).to(device)


@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("alg", ALGS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_float64_reference(op, alg, dtype, shape, device):
    fl, ref, torch_op = OPS[op]
    x = _rand(shape, dtype, device)
    got = fl(x, alg)
    want = ref(x)
    assert got.dtype == dtype and got.shape == want.shape and got.device == x.device
    err = rel_err(got, want)
    # Never worse than torch's own result in the same dtype (plus one rounding of the output).
    torch_err = rel_err(torch_op(x), want)
    eps = torch.finfo(dtype).eps
    assert err <= max(TOL[dtype], 1.5 * torch_err + eps), (err, torch_err)


@pytest.mark.parametrize("alg", ["online", "two_pass"])
def test_algorithms_match_their_literal_transcriptions(alg, device):
    x = _rand((6, 300), torch.float32, device, scale=20.0, seed=3)
    x[1, ::3] = -math.inf
    x[2] += 5000.0
    lit = (R.online_lse_literal if alg == "online" else R.two_pass_lse_literal)(x.cpu())
    assert rel_err(lit, R.logsumexp_reference(x.cpu())) < 1e-14
    assert rel_err(fastloss.logsumexp(x, algorithm=alg), lit) < TOL[torch.float32]


def _special_rows(dtype):
    big = torch.finfo(dtype).max
    inf, nan = math.inf, math.nan
    V = 67  # odd, longer than a SIMD block
    rows = []
    rows.append([-inf] * V)  # all -inf: lse -inf, softmax NaN (torch)
    rows.append([-inf] * (V - 2) + [1.0, 2.0])  # mix
    rows.append([2.0] + [-inf] * (V - 1))
    rows.append([inf] + [1.0] * (V - 1))  # +inf: lse inf, softmax all NaN
    rows.append([1.0] * (V - 1) + [nan])  # NaN propagates
    rows.append([inf, nan] + [0.0] * (V - 2))
    rows.append([1e4] + [0.0] * (V - 1))  # large magnitudes
    rows.append([-1e4 + j for j in range(V)])
    rows.append([big] * V)  # near the dtype's max: lse must not overflow the shift
    rows.append([-big] * V)
    rows.append([big] + [-big] * (V - 1))
    rows.append([0.5 * big] + [0.0] * (V - 1))
    rows.append([-0.5 * big] + [-1.0] * (V - 1))
    return torch.tensor(rows, dtype=torch.float64).to(dtype)


@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("alg", ["online", "two_pass"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_special_values_match_torch(op, alg, dtype, device):
    fl, ref, _ = OPS[op]
    x = _special_rows(dtype).to(device)
    got = fl(x, alg).double().cpu()
    # torch in float64 on the same (rounded) values, then rounded to the output dtype (whose range saturates).
    want = ref(x.cpu()).to(dtype).double()
    assert torch.equal(torch.isnan(got), torch.isnan(want)), (got, want)
    finite = ~torch.isnan(want)
    assert torch.equal(torch.isinf(got[finite]), torch.isinf(want[finite]))
    assert torch.equal(got[torch.isinf(want)], want[torch.isinf(want)])
    both = finite & torch.isfinite(want)
    tol = 2 * torch.finfo(dtype).eps
    assert torch.allclose(got[both], want[both], rtol=tol, atol=tol), (got - want)[both].abs().max()


@pytest.mark.parametrize("alg", ["online", "two_pass"])
def test_two_pass_exponent_range_fallback(alg, device):
    # Logits past the two-pass split's exact range (|x| > ~2.9e6) must still be right (recomputed online).
    x = torch.tensor([[3.0e6, 3.0e6 - 1.0, 0.0], [-5e6, -5e6 + 2.0, -5e6 + 1.0], [1e30, 1e30, -1e30]],
                     dtype=torch.float32, device=device)
    got = fastloss.logsumexp(x, algorithm=alg).double().cpu()
    want = torch.logsumexp(x.double().cpu(), -1)
    assert torch.allclose(got, want, rtol=1e-7)
    sm = fastloss.softmax(x, algorithm=alg).double().cpu()
    assert torch.allclose(sm, torch.softmax(x.double().cpu(), -1), atol=1e-6)


@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("alg", ["online", "two_pass"])
def test_few_long_rows(op, alg, device):
    # Few rows past 256K elements: on a GPU (and the emulated one) each row is split over several blocks whose
    # partial states are merged (csrc/cuda/softmax_cuda.cu's split path), forward and backward. Row 1 lies past the
    # two-pass split's exact range (the merge kernel's online fallback), row 2 holds a -inf.
    V = 262147
    x = _rand((3, V), torch.float32, device, seed=3)
    x[1] = x[1] + 3.0e6
    x[2, 5] = -math.inf
    x.requires_grad_(True)
    fl, ref, _ = OPS[op]
    y = fl(x, alg)
    x64 = x.detach().double().cpu().requires_grad_(True)
    want = ref(x64)
    assert rel_err(y.detach(), want.detach()) <= TOL[torch.float32]
    g = _rand(y.shape, torch.float32, device, seed=4)
    (gx,) = torch.autograd.grad(y, x, g)
    (gw,) = torch.autograd.grad(want, x64, g.double().cpu())
    # logsumexp's backward is exp(x - lse) with the lse rounded to float32: near 3e6 its ulp (0.25) is the error.
    exact = [0, 2] if op == "logsumexp" else [0, 1, 2]
    assert rel_err(gx[exact], gw[exact]) <= 4 * TOL[torch.float32]
    assert rel_err(gx[1], gw[1]) <= (0.25 if op == "logsumexp" else 4 * TOL[torch.float32])


def _offset_by_one(x):
    """The same values in a contiguous tensor whose data starts one element past an allocation (misaligned)."""
    buf = torch.empty(x.numel() + 1, dtype=x.dtype, device=x.device)
    y = buf[1:].view(x.shape)
    y.copy_(x)
    return y


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("V", [8, 64, 96, 100, 256, 1000, 1001])
def test_short_rows_packed_and_elementwise(dtype, V, device):
    # Rows up to 1024 elements: a lane reads its share in packs when every row starts on a pack boundary (V a
    # multiple of the pack, aligned tensors), else element by element (odd V, or data one element off an alignment).
    x = _rand((6, V), dtype, device, seed=V)
    g = _rand((6, V), dtype, device, seed=V + 1)
    for xx, gg in ((x, g), (_offset_by_one(x), _offset_by_one(g))):
        for op in ("softmax", "log_softmax", "logsumexp"):
            fl, ref, _ = OPS[op]
            assert rel_err(fl(xx, "auto"), ref(x)) <= TOL[dtype], (op, xx.data_ptr() % 16)
        for log in (False, True):
            y = (fastloss.log_softmax if log else fastloss.softmax)(x, -1)
            yy = _offset_by_one(y) if xx is not x else y
            gi = (torch.ops.fastloss.log_softmax_backward if log else torch.ops.fastloss.softmax_backward)(gg, yy, -1)
            yd, gd = y.double(), g.double()
            want = gd - yd.exp() * gd.sum(-1, keepdim=True) if log else yd * (gd - (gd * yd).sum(-1, keepdim=True))
            assert rel_err(gi, want) <= 4 * TOL[dtype], (log, xx.data_ptr() % 16)


@pytest.mark.parametrize("op", ["softmax", "log_softmax"])
@pytest.mark.parametrize("alg", ["online", "two_pass"])
def test_any_dim_and_layout(op, alg, device):
    x = _rand((4, 5, 6), torch.float32, device)
    f = getattr(fastloss, op)
    t = getattr(torch, op)
    for dim in (0, 1, 2, -1, -3):
        got = f(x, dim, algorithm=alg)
        assert got.shape == x.shape
        assert rel_err(got, t(x.double(), dim)) < TOL[torch.float32]
    xt = x.transpose(0, 2)  # non-contiguous
    assert rel_err(f(xt, -1, algorithm=alg), t(xt.double(), -1)) < TOL[torch.float32]
    xs = x[:, ::2, 1:]  # strided slice
    assert rel_err(f(xs, 1, algorithm=alg), t(xs.double(), 1)) < TOL[torch.float32]
    assert rel_err(f(x, 1, algorithm=alg, dtype=torch.float64), t(x.double(), 1)) < 1e-12


@pytest.mark.parametrize("alg", ["online", "two_pass"])
def test_logsumexp_dims_keepdim_and_layout(alg, device):
    x = _rand((4, 5, 6), torch.float32, device)
    for dim in (0, 1, 2, -1):
        for keepdim in (False, True):
            got = fastloss.logsumexp(x, dim, keepdim, algorithm=alg)
            want = torch.logsumexp(x.double(), dim, keepdim=keepdim)
            assert got.shape == want.shape
            assert rel_err(got, want) < TOL[torch.float32]
    xt = x.transpose(0, 2)
    assert rel_err(fastloss.logsumexp(xt, 0, algorithm=alg), torch.logsumexp(xt.double(), 0)) < TOL[torch.float32]


@pytest.mark.parametrize("alg", ["online", "two_pass"])
def test_logsumexp_tuple_dims(alg, device):
    x = _rand((4, 5, 6, 3), torch.float32, device)
    cases = [(1,), (-1,), (0, 1), (2, 3), (1, 3), (0, 2, 3), (3, 0), [0, 1, 2, 3], ()]
    for dims in cases:
        for keepdim in (False, True):
            got = fastloss.logsumexp(x, dims, keepdim, algorithm=alg)
            want = torch.logsumexp(x.double(), dims if dims != () else (0, 1, 2, 3), keepdim=keepdim)
            assert got.shape == want.shape, (dims, keepdim)
            assert rel_err(got, want) < TOL[torch.float32], (dims, keepdim)
    # non-contiguous input, a permuted copy; gradients through the same op
    xt = x.transpose(1, 3).detach().requires_grad_()
    got = fastloss.logsumexp(xt, (0, 2), algorithm=alg)
    xd = xt.detach().double().requires_grad_()
    want = torch.logsumexp(xd, (0, 2))
    assert rel_err(got, want) < TOL[torch.float32]
    got.sum().backward()
    want.sum().backward()
    assert rel_err(xt.grad, xd.grad) < TOL[torch.float32]
    # empty dims, 0-d input, errors as torch
    assert fastloss.logsumexp(torch.zeros(0, 3, 4, device=device), (1, 2)).shape == (0,)
    assert torch.isneginf(fastloss.logsumexp(torch.zeros(2, 0, 4, device=device), (1, 2))).all()
    assert fastloss.logsumexp(torch.tensor(2.0, device=device), (0,)).item() == 2.0
    with pytest.raises(RuntimeError, match="multiple times"):
        fastloss.logsumexp(x, (1, -3))
    with pytest.raises(IndexError, match="out of range"):
        fastloss.logsumexp(x, (0, 4))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_logsumexp_torch_opinfo_samples(dtype, device):
    """torch.logsumexp's own OpInfo reference inputs (tuple dims, 0-d, large magnitudes) through fastloss."""
    pytest.importorskip("expecttest")  # torch.testing._internal needs it (installed by the Makefile)
    from torch.testing._internal.common_methods_invocations import op_db

    (info,) = [o for o in op_db if o.name == "logsumexp"]
    n = 0
    for sample in info.reference_inputs(device, dtype, requires_grad=False):
        dim = sample.args[0] if sample.args else sample.kwargs.get("dim")
        keepdim = sample.args[1] if len(sample.args) > 1 else sample.kwargs.get("keepdim", False)
        got = fastloss.logsumexp(sample.input, dim, keepdim)
        want = torch.logsumexp(sample.input.double(), dim, keepdim)
        assert got.shape == want.shape and got.dtype == sample.input.dtype, (sample.input.shape, dim, keepdim)
        if want.numel():
            assert rel_err(got.double(), want) <= TOL[sample.input.dtype], (sample.input.shape, dim, keepdim)
        n += isinstance(dim, (tuple, list)) and len(dim) > 1
    assert n > 0  # the tuple-dim samples were among them


def test_empty_and_scalar(device):
    for shape, dim in [((0, 5), -1), ((5, 0), -1), ((0,), 0), ((3, 0, 2), 1), ((2, 0, 3), 0)]:
        x = torch.randn(shape, device=device)
        for op in ("softmax", "log_softmax"):
            got = getattr(fastloss, op)(x, dim)
            assert got.shape == x.shape
        got = fastloss.logsumexp(x, dim)
        want = torch.logsumexp(x, dim)
        assert got.shape == want.shape and torch.equal(got.cpu(), want.cpu())  # empty sums give -inf
        assert fastloss.logsumexp(x, dim, keepdim=True).shape == torch.logsumexp(x, dim, keepdim=True).shape
    s = torch.tensor(1.5, device=device)
    assert fastloss.softmax(s, 0).item() == 1.0
    assert fastloss.log_softmax(s, -1).item() == 0.0
    assert fastloss.logsumexp(s, 0).item() == 1.5
    assert fastloss.logsumexp(s, 0, keepdim=True).shape == torch.Size([])


def test_bad_input_errors_name_the_problem(device):
    with pytest.raises(RuntimeError, match="floating-point"):
        fastloss.softmax(torch.arange(6, device=device).view(2, 3))
    with pytest.raises(RuntimeError, match="floating-point"):
        fastloss.logsumexp(torch.ones(2, 3, dtype=torch.int32, device=device))
    with pytest.raises(IndexError, match="Dimension out of range"):
        fastloss.softmax(torch.ones(2, 3, device=device), 2)
    with pytest.raises(IndexError, match="Dimension out of range"):
        fastloss.logsumexp(torch.ones(2, 3, device=device), -3)
    with pytest.raises(ValueError, match="algorithm"):
        fastloss.log_softmax(torch.ones(2, 3, device=device), algorithm="three_pass")
    with pytest.raises(RuntimeError, match="algorithm"):
        torch.ops.fastloss.softmax(torch.ones(2, 3, device=device), -1, "fast")
    with pytest.raises(TypeError, match="input"):
        fastloss.softmax([1.0, 2.0])
    with pytest.raises(RuntimeError, match="shape"):
        torch.ops.fastloss.softmax_backward(torch.ones(2, 3, device=device), torch.ones(3, 2, device=device), -1)


# ---------------------------------------------------------------- autograd


@pytest.mark.parametrize("alg", ["online", "two_pass"])
def test_gradcheck_float64(alg, device):
    x = _rand((3, 11), torch.float64, device).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: fastloss.softmax(t, -1, algorithm=alg), (x,))
    assert torch.autograd.gradcheck(lambda t: fastloss.log_softmax(t, 0, algorithm=alg), (x,))
    assert torch.autograd.gradcheck(lambda t: fastloss.logsumexp(t, -1, algorithm=alg), (x,))
    assert torch.autograd.gradcheck(lambda t: fastloss.logsumexp(t, 0, True, algorithm=alg), (x,))


@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_matches_torch(op, dtype, device):
    fl, _, torch_op = OPS[op]
    x = _rand((5, 1031), dtype, device, seed=7)
    g = _rand(torch_op(x).shape, dtype, device, seed=8)
    xa = x.clone().requires_grad_()
    fl(xa, "auto").backward(g)
    xr = x.double().requires_grad_()
    torch_op(xr).backward(g.double())
    xt = x.clone().requires_grad_()
    torch_op(xt).backward(g)
    err = rel_err(xa.grad, xr.grad)
    assert err <= max(TOL[dtype], 1.5 * rel_err(xt.grad, xr.grad) + torch.finfo(dtype).eps), err


def test_opcheck(device):
    x = _rand((4, 37), torch.float32, device).requires_grad_()
    g = _rand((4, 37), torch.float32, device)
    ops = torch.ops.fastloss
    for alg in ("online", "two_pass", "auto"):
        torch.library.opcheck(ops.softmax.default, (x, -1, alg))
        torch.library.opcheck(ops.log_softmax.default, (x, 0, alg))
        torch.library.opcheck(ops.logsumexp.default, (x, -1, False, alg))
        torch.library.opcheck(ops.logsumexp.default, (x, 0, True, alg))
    y = torch.softmax(x.detach(), -1)
    torch.library.opcheck(ops.softmax_backward.default, (g, y, -1))
    torch.library.opcheck(ops.log_softmax_backward.default, (g, y.log(), -1))
    lse = torch.logsumexp(x.detach(), -1)
    torch.library.opcheck(ops.logsumexp_backward.default, (g[:, 0], x.detach(), lse, -1, False))
    xt = _rand((6, 5), torch.float32, device).t()  # non-contiguous input, dim 0
    torch.library.opcheck(ops.softmax.default, (xt, 0, "online"))


def test_torch_compile_fullgraph(device):
    def f(x):
        return (fastloss.log_softmax(x, -1) * 0.5).sum() + fastloss.logsumexp(x, 0).sum() + fastloss.softmax(x, 1)[0, 0]

    cf = torch.compile(f, fullgraph=True)
    x = _rand((8, 40), torch.float32, device, seed=11)
    xa = x.clone().requires_grad_()
    xb = x.clone().requires_grad_()
    out_c = cf(xa)
    out_e = f(xb)
    out_c.backward()
    out_e.backward()
    assert torch.allclose(out_c, out_e, rtol=1e-5, atol=1e-5)
    assert torch.allclose(xa.grad, xb.grad, rtol=1e-5, atol=1e-6)


def test_auto_resolves_to_a_real_algorithm(device):
    x = torch.randn(3, 100, device=device)
    assert fastloss.functional.resolve_algorithm(x) in ("online", "two_pass")
    assert fastloss.functional.resolve_algorithm(x, -1, "two_pass") == "two_pass"


@pytest.mark.slow
def test_past_2_pow_31_elements(device):
    # bf16 [3, 2^30 + 17]: rows past the 2^31-th element; one marked element per row checks the offsets.
    rows, V = 3, 2**30 + 17
    x = torch.zeros(rows, V, dtype=torch.bfloat16, device=device)
    for r in range(rows):
        x[r, V - 1 - r] = 8.0 + r
    for alg in ("online", "two_pass"):
        lse = fastloss.logsumexp(x, algorithm=alg).double().cpu()
        want = torch.tensor([math.log((V - 1) + math.exp(8.0 + r)) for r in range(rows)], dtype=torch.float64)
        assert torch.allclose(lse, want, rtol=1e-2), (lse, want)
    y = fastloss.softmax(x, algorithm="auto")
    for r in range(rows):
        peak = math.exp(8.0 + r) / ((V - 1) + math.exp(8.0 + r))
        assert abs(y[r, V - 1 - r].item() - peak) <= 1e-2 * peak
        assert y[r, 0].item() == pytest.approx(1 / ((V - 1) + math.exp(8.0 + r)), rel=2e-2)

"""fastloss.spherical_loss / linear_spherical_loss (issue #25: the spherical Z-loss of de Brebisson & Vincent, the
log-Taylor-softmax and the one-hot squared error) against float64 references on materialised logits
(fastloss.reference.spherical_loss_reference): values and every gradient, gradcheck, shift / scale invariance,
ignore_index, rows with std = 0, huge magnitudes and offsets, overflow, odd vocabulary sizes, empty batches, bad
input, and the linear version (no logits) against the logits version."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import TOL, compiled_or_skip, rel_err

import fastloss
import fastloss._linear_spherical as linear_spherical
from fastloss.reference import spherical_loss_reference as ref_rows

LOSSES = [("z", {"a": 0.7, "b": 2.5}), ("taylor_softmax", {}), ("mse", {})]
IDS = [name for name, _ in LOSSES]
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
GRAD_TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}


def _logits(shape, dtype=torch.float64, device="cpu", seed=0, scale=2.0, offset=0.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale + offset).to(dtype).to(device)


def _target(lead, V, device="cpu", seed=1, ignore=()):
    t = torch.randint(0, V, lead, generator=torch.Generator().manual_seed(seed))
    for i in ignore:
        t.view(-1)[i] = -100
    return t.to(device)


def _reduce(rows, reduction, t, ignore_index=-100):
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    return rows.sum() / (t != ignore_index).sum()


def _ref_loss(x, t, loss, kw, reduction):
    return _reduce(ref_rows(x, t, loss, **kw), reduction, t)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("loss,kw", LOSSES, ids=IDS)
@pytest.mark.parametrize("V", [2, 3, 17, 1003, 4099])
def test_matches_reference(dtype, loss, kw, V, device):
    lead = (6, 5)
    x = _logits(lead + (V,), dtype, device, offset=1.0)
    t = _target(lead, V, device, ignore=(3, 11))
    xa = x.clone().requires_grad_()
    xr = x.double().clone().requires_grad_()
    got = fastloss.spherical_loss(xa, t, loss=loss, reduction="none", **kw)
    ref = ref_rows(xr, t, loss, **kw)
    assert got.dtype == dtype and got.shape == lead
    assert rel_err(got, ref) < TOL[dtype] * (4 if dtype in (torch.bfloat16, torch.float16) else 1) + 1e-14
    w = _logits(lead, torch.float64, device, seed=7)  # a random upstream gradient per row
    (got.double() * w).sum().backward()
    (ref * w).sum().backward()
    if loss == "z" and V == 2:
        # Two classes: z_c = +-1 whatever the logits, so the Z-loss is constant and its gradient 0 (up to rounding).
        assert xa.grad.double().abs().max() < 1e-3 * TOL[dtype] ** 0.5
    else:
        assert rel_err(xa.grad, xr.grad) < GRAD_TOL[dtype]
    flat = xa.grad.reshape(-1, V)
    assert torch.all(flat[3] == 0) and torch.all(flat[11] == 0)  # ignored rows


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("loss,kw", LOSSES, ids=IDS)
def test_reductions(reduction, loss, kw, device):
    x = _logits((40, 33), device=device)
    t = _target((40,), 33, device, ignore=(0, 5, 39))
    xa, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    got = fastloss.spherical_loss(xa, t, loss=loss, reduction=reduction, **kw)
    ref = _ref_loss(xr, t, loss, kw, reduction)
    assert torch.allclose(got, ref, rtol=1e-12, atol=1e-12)
    got.sum().backward()
    ref.sum().backward()
    assert rel_err(xa.grad, xr.grad) < 1e-12


@pytest.mark.parametrize("loss,kw", LOSSES, ids=IDS)
def test_gradcheck(loss, kw, device):
    x = _logits((4, 7), device=device).requires_grad_()
    t = _target((4,), 7, device, ignore=(2,))
    assert torch.autograd.gradcheck(lambda v: fastloss.spherical_loss(v, t, loss=loss, reduction="none", **kw), (x,))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_z_loss_is_shift_and_scale_invariant(dtype, device):
    x = _logits((16, 513), dtype, device)
    t = _target((16,), 513, device)
    kw = {"a": 1.3, "b": 4.0}
    base = fastloss.spherical_loss(x, t, loss="z", reduction="none", **kw)
    for scale, shift in [(3.7, 0.0), (1.0, -250.0), (0.01, 40.0), (1e3, 1e4)]:
        y = x * scale + shift
        got = fastloss.spherical_loss(y, t, loss="z", reduction="none", **kw)
        # Exact in float64; in float32 only the rounding of y itself differs.
        assert rel_err(got, base) < (1e-12 if dtype == torch.float64 else 2e-5), (scale, shift)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("loss,kw", LOSSES, ids=IDS)
def test_large_offset_keeps_precision(dtype, loss, kw, device):
    # Logits far from 0 with a small spread: the rows accumulate o_k - o_c, so the z-score keeps the precision of the
    # spread (a float mean of the raw logits around 1e4 would lose ~1e-3 of it). bf16 cannot hold a unit spread at
    # 1e4 (its spacing there is 64): offset 1e2, spacing 0.5, spread 4.
    offset, scale = (1e4, 1.0) if dtype == torch.float32 else (1e2, 4.0)
    x = _logits((8, 4096), dtype, device, scale=scale, offset=offset)
    assert bool((x.double().var(-1) > 0.5 * scale**2).all())  # the rows really spread (not rounded to constants)
    t = _target((8,), 4096, device)
    xa, xr = x.clone().requires_grad_(), x.double().requires_grad_()
    got = fastloss.spherical_loss(xa, t, loss=loss, reduction="sum", **kw)
    ref = _ref_loss(xr, t, loss, kw, "sum")
    assert abs(got.double().item() - ref.item()) <= 4 * TOL[dtype] * abs(ref.item())
    got.backward()
    ref.backward()
    assert rel_err(xa.grad, xr.grad) < (1e-5 if dtype == torch.float32 else 2e-2)


@pytest.mark.parametrize("loss", ["mse", "taylor_softmax"])
def test_gradient_near_the_one_hot_target(loss, device):
    # Rows close to their one-hot target: the gradients of these two losses are affine in o_k itself (no pivot
    # subtraction), so the small entries keep float32 precision (the centred form lost 3e-4 at 1e-4 noise). The
    # MSE's loss value is documented to lose relative precision there; its gradient does not.
    V = 1000
    t = _target((16,), V, device)
    onehot = F.one_hot(t.cpu(), V).double()
    for eps in (1e-2, 1e-4):
        x = (onehot + eps * _logits((16, V), seed=5, scale=1.0)).float().to(device).requires_grad_()
        fastloss.spherical_loss(x, t, loss=loss, reduction="sum").backward()
        xr = x.detach().double().cpu().requires_grad_()
        ref_rows(xr, t.cpu(), loss).sum().backward()
        assert rel_err(x.grad, xr.grad) < 1e-6, eps


@pytest.mark.parametrize("loss,kw", LOSSES, ids=IDS)
def test_huge_magnitudes(loss, kw, device):
    x = _logits((4, 1000), torch.float32, device, scale=1e6)
    t = _target((4,), 1000, device)
    got = fastloss.spherical_loss(x, t, loss=loss, reduction="none", **kw)
    assert rel_err(got, ref_rows(x, t, loss, **kw)) < 1e-5


@pytest.mark.parametrize("loss,kw", LOSSES, ids=IDS)
def test_non_finite_and_overflow(loss, kw, device):
    # NaN wherever the true value is finite but cannot be computed (the Z-loss and the Taylor-softmax of a row with
    # an infinite logit, or whose variance overflowed the float accumulator); the one-hot MSE is +inf where its true
    # value is (an infinite logit, squares beyond float32), NaN for a NaN.
    x = _logits((4, 64), torch.float32, device)
    x[0, 5] = float("inf")
    x[1, 9] = float("nan")
    x[2, 3] = -float("inf")
    x[3] = _logits((64,), torch.float32, device, scale=1e25)  # finite, but its squares overflow float32
    t = torch.tensor([0, 1, 2, 7], device=device)
    got = fastloss.spherical_loss(x, t, loss=loss, reduction="none", **kw)
    if loss == "mse":
        assert torch.isinf(got[[0, 2, 3]]).all() and (got[[0, 2, 3]] > 0).all() and torch.isnan(got[1]), got
    else:
        assert torch.isnan(got).all(), got


def test_mse_value_near_the_one_hot_target(device):
    # Rows close to their one-hot target: the value is the sum of squares of the other logits plus (o_c - 1)^2,
    # not a difference of moments, so it keeps float32 precision (the moments form lost ~2e-2 at 1e-4 noise).
    V = 1000
    t = _target((16,), V, device)
    onehot = F.one_hot(t.cpu(), V).double()
    for dtype in (torch.float32, torch.bfloat16):
        x = (onehot + 1e-2 * _logits((16, V), seed=6, scale=1.0)).to(dtype).to(device)
        got = fastloss.spherical_loss(x, t, loss="mse", reduction="none")
        ref = ref_rows(x.cpu(), t.cpu(), "mse")
        assert rel_err(got.float(), ref) < (1e-6 if dtype == torch.float32 else 8e-3), dtype


def test_constant_rows(device):
    # std = 0: z_c = 0 by definition, the Z-loss is softplus(a b) / a with zero gradient; the other losses are
    # smooth there and follow their formulas.
    V, c = 50, 0.3
    x = torch.full((3, V), c, dtype=torch.float32, device=device)
    x[2] = -7.25
    t = torch.tensor([0, 17, 49], device=device)
    a, b = 0.5, 3.0
    xa = x.clone().requires_grad_()
    z = fastloss.spherical_loss(xa, t, loss="z", a=a, b=b, reduction="none")
    assert torch.allclose(z.double(), torch.full((3,), math.log1p(math.exp(a * b)) / a, dtype=torch.float64),
                          rtol=1e-6)
    z.sum().backward()
    assert torch.all(xa.grad == 0)
    for loss in ("taylor_softmax", "mse"):
        xa = x.double().requires_grad_()
        xr = x.double().requires_grad_()
        got = fastloss.spherical_loss(xa, t, loss=loss, reduction="sum")
        ref = ref_rows(xr, t, loss).sum()
        assert torch.allclose(got, ref, rtol=1e-12)
        got.backward()
        ref.backward()
        assert rel_err(xa.grad, xr.grad) < 1e-12


def test_ignored_and_empty(device):
    x = _logits((3, 10), device=device).requires_grad_()
    t = torch.full((3,), -100, device=device)
    out = fastloss.spherical_loss(x, t, loss="mse")
    assert torch.isnan(out)  # mean over no rows, as F.cross_entropy
    s = fastloss.spherical_loss(x, t, loss="mse", reduction="sum")
    assert s.item() == 0
    s.backward()
    assert torch.all(x.grad == 0)
    t2 = torch.full((3,), 4, device=device)
    assert fastloss.spherical_loss(x, t2, loss="mse", ignore_index=4, reduction="sum").item() == 0
    e = _logits((0, 10), device=device).requires_grad_()
    te = torch.zeros(0, dtype=torch.long, device=device)
    assert fastloss.spherical_loss(e, te, loss="z", a=1.0, b=1.0, reduction="sum").item() == 0
    r = fastloss.spherical_loss(e, te, loss="z", a=1.0, b=1.0, reduction="none")
    assert r.shape == (0,)
    fastloss.spherical_loss(e, te, loss="z", a=1.0, b=1.0, reduction="sum").backward()
    assert e.grad.shape == (0, 10)


def test_bad_input(device):
    x = _logits((4, 10), device=device)
    t = _target((4,), 10, device)
    sl = fastloss.spherical_loss
    with pytest.raises(ValueError, match="needs `a`"):
        sl(x, t, loss="z")
    with pytest.raises(ValueError, match="`a` must be a finite float > 0"):
        sl(x, t, loss="z", a=0.0, b=1.0)
    with pytest.raises(ValueError, match="`a` must be a finite float > 0"):
        sl(x, t, loss="z", a=-1.0, b=1.0)
    with pytest.raises(ValueError, match="`b` must be a finite float"):
        sl(x, t, loss="z", a=1.0, b=float("inf"))
    with pytest.raises(ValueError, match="has none"):
        sl(x, t, loss="mse", a=1.0, b=1.0)
    with pytest.raises(ValueError, match="`loss` must be one of"):
        sl(x, t, loss="z_loss", a=1.0, b=1.0)
    with pytest.raises(ValueError, match="`reduction` must be one of"):
        sl(x, t, loss="mse", reduction="avg")
    with pytest.raises(RuntimeError, match="at least 2 classes"):
        sl(_logits((4, 1), device=device), torch.zeros(4, dtype=torch.long, device=device), loss="mse")
    with pytest.raises(ValueError, match="`target` must have shape"):
        sl(x, t[:3], loss="mse")
    with pytest.raises(TypeError, match="int64"):
        sl(x, t.int(), loss="mse")
    if device == "cpu":
        with pytest.raises(IndexError, match="out of bounds"):
            sl(x, torch.tensor([0, 1, 10, 2], device=device), loss="mse")
        with pytest.raises(IndexError, match="out of bounds"):
            sl(x, torch.tensor([0, 1, -1, 2], device=device), loss="mse")
    with pytest.raises(RuntimeError, match="must be a floating-point tensor"):
        sl(torch.ones(4, 10, dtype=torch.long, device=device), t, loss="mse")


def test_names_cannot_be_confused_with_palm_z_loss():
    # Each docstring says which Z-loss it is and points at the other.
    assert "not PaLM's auxiliary\n    z-loss" in fastloss.spherical_loss.__doc__
    assert "spherical_loss" in fastloss.cross_entropy.__doc__ and "PaLM" in fastloss.cross_entropy.__doc__


def test_opcheck():
    x = _logits((5, 9), torch.float32)
    t = _target((5,), 9, ignore=(2,))
    torch.library.opcheck(torch.ops.fastloss.spherical_loss_fwd.default, (x.requires_grad_(), t, "z", 0.7, 2.5, -100))
    stats = torch.ops.fastloss.spherical_loss_fwd(x.detach(), t, "mse", 1.0, 0.0, -100)[1]
    torch.library.opcheck(torch.ops.fastloss.spherical_loss_bwd.default,
                          (torch.ones(5, dtype=torch.float64), x.detach(), t, stats, "mse", 1.0, 0.0, -100))
    torch.library.opcheck(torch.ops.fastloss.spherical_loss_terms.default,
                          (stats, t, 9, "taylor_softmax", 1.0, 0.0, -100))


def test_modules(device):
    x = _logits((6, 40), device=device)
    t = _target((6,), 40, device, ignore=(1,))
    m = fastloss.nn.SphericalLoss("z", a=0.7, b=2.5, reduction="sum")
    assert torch.equal(m(x, t), fastloss.spherical_loss(x, t, loss="z", a=0.7, b=2.5, reduction="sum"))
    h, W, bb = _head(6, 8, 40, torch.float64, device, True)
    lm = fastloss.nn.LinearSphericalLoss("taylor_softmax")
    assert torch.equal(lm(h, W, t, bb), fastloss.linear_spherical_loss(h, W, t, bb, loss="taylor_softmax"))
    with pytest.raises(ValueError, match="needs `a`"):
        fastloss.nn.SphericalLoss("z")  # checked where the module is built
    with pytest.raises(ValueError, match="has none"):
        fastloss.nn.LinearSphericalLoss("mse", a=1.0, b=1.0)


def test_compile(device):
    x = _logits((8, 100), torch.float32, device).requires_grad_()
    t = _target((8,), 100, device)

    def f(v):
        return fastloss.spherical_loss(v, t, loss="z", a=1.0, b=3.0)

    got = compiled_or_skip(f, x)
    assert torch.allclose(got, f(x))


# ---------------------------------------------------------------- the linear version, without logits


def _head(N, D, V, dtype, device, bias, seed=3):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, D, generator=g, dtype=torch.float64)
    W = torch.randn(V, D, generator=g, dtype=torch.float64) / math.sqrt(D)
    bb = torch.randn(V, generator=g, dtype=torch.float64) if bias else None
    cast = lambda v: None if v is None else v.to(dtype).to(device)  # noqa: E731
    return cast(h), cast(W), cast(bb)


def _grads(out, params):
    return torch.autograd.grad(out, [p for p in params if p is not None])


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("loss,kw", LOSSES, ids=IDS)
def test_linear_matches_logits_version(bias, reduction, loss, kw, device, monkeypatch):
    monkeypatch.setattr(linear_spherical, "CHUNK_BYTES", 24 * 8 * 17)  # 24-ish head rows per chunk: many chunks
    N, D, V = 45, 16, 301
    h, W, bb = _head(N, D, V, torch.float64, device, bias)
    t = _target((N,), V, device, ignore=(0, 7))
    params = [p.requires_grad_() for p in (h, W, bb) if p is not None]
    got = fastloss.linear_spherical_loss(h.view(5, 9, D), W, t.view(5, 9), bb, loss=loss, reduction=reduction, **kw)
    logits = h @ W.T + (bb if bias else 0)
    ref = _reduce(ref_rows(logits.view(5, 9, V), t.view(5, 9), loss, **kw), reduction, t)
    assert got.shape == ref.shape
    assert rel_err(got, ref) < 1e-12
    up = _logits(tuple(ref.shape), device=device, seed=11)
    for g_got, g_ref in zip(_grads((got * up).sum(), params), _grads((ref * up).sum(), params)):
        assert rel_err(g_got, g_ref) < 1e-11


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("loss,kw", LOSSES, ids=IDS)
def test_linear_gradcheck(bias, loss, kw, device):
    h, W, bb = _head(6, 3, 9, torch.float64, device, bias)
    t = _target((6,), 9, device, ignore=(1,))
    params = tuple(p.requires_grad_() for p in (h, W, bb) if p is not None)

    def f(*p):
        return fastloss.linear_spherical_loss(p[0], p[1], t, p[2] if bias else None, loss=loss, reduction="none",
                                              **kw)

    assert torch.autograd.gradcheck(f, params)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("loss,kw", LOSSES, ids=IDS)
def test_linear_low_precision(dtype, loss, kw, device):
    N, D, V = 64, 32, 1000
    h, W, bb = _head(N, D, V, dtype, device, True)
    t = _target((N,), V, device)
    params = [p.requires_grad_() for p in (h, W, bb)]
    got = fastloss.linear_spherical_loss(h, W, t, bb, loss=loss, **kw)
    assert got.dtype == dtype
    p64 = [p.detach().double().requires_grad_() for p in params]
    ref = _ref_loss(p64[0] @ p64[1].T + p64[2], t, loss, kw, "mean")
    assert rel_err(got, ref) < TOL[dtype] * 4
    for g_got, g_ref in zip(_grads(got, params), _grads(ref, p64)):
        assert g_got.dtype == dtype
        # the float32 computation is more exact than the bf16 inputs' own rounding of the reference
        assert rel_err(g_got, g_ref) < (1e-5 if dtype == torch.float32 else 1e-2)


def test_linear_constant_rows(device):
    # h = 0 without a bias: every logit 0, std = 0 -> z = 0, softplus(a b) / a, no gradient to anything.
    h, W, _ = _head(5, 4, 20, torch.float64, device, False)
    h = torch.zeros_like(h).requires_grad_()
    W.requires_grad_()
    t = _target((5,), 20, device)
    out = fastloss.linear_spherical_loss(h, W, t, loss="z", a=2.0, b=1.5, reduction="sum")
    assert torch.allclose(out, torch.tensor(5 * math.log1p(math.exp(3.0)) / 2.0, dtype=torch.float64))
    gh, gw = torch.autograd.grad(out, [h, W])
    assert torch.all(gh == 0) and torch.all(gw == 0)


def test_linear_shift_invariance_from_bias(device):
    # A constant added to every logit through the bias leaves the Z-loss unchanged (the centred Gram matrix
    # does not see it).
    h, W, bb = _head(30, 8, 50, torch.float64, device, True)
    t = _target((30,), 50, device)
    a = fastloss.linear_spherical_loss(h, W, t, bb, loss="z", a=1.0, b=2.0, reduction="none")
    b = fastloss.linear_spherical_loss(h, W, t, bb + 1e6, loss="z", a=1.0, b=2.0, reduction="none")
    assert rel_err(b, a) < 1e-9


def test_linear_bad_input(device):
    h, W, bb = _head(4, 8, 10, torch.float32, device, True)
    t = _target((4,), 10, device)
    ls = fastloss.linear_spherical_loss
    with pytest.raises(ValueError, match="must agree on D"):
        ls(h[:, :7], W, t, loss="mse")
    with pytest.raises(ValueError, match="same floating-point dtype"):
        ls(h.double(), W, t, loss="mse")
    with pytest.raises(ValueError, match="`bias` must have shape"):
        ls(h, W, t, bb[:9], loss="mse")
    with pytest.raises(ValueError, match="at least 2 classes"):
        ls(h, W[:1], t.clamp(max=0), loss="mse")
    with pytest.raises(ValueError, match="needs `a`"):
        ls(h, W, t, loss="z")
    with pytest.raises(ValueError, match="`target` must have shape"):
        ls(h, W, t[:2], loss="mse")
    if device == "cpu":
        for bad in (10, -1, -101):  # a negative index must not wrap around to the last rows of the head
            with pytest.raises(IndexError, match="out of bounds"):
                ls(h, W, torch.tensor([0, 1, bad, 2]), loss="mse")


def test_linear_compiles_without_graph_breaks(device):
    h, W, bb = _head(12, 8, 40, torch.float32, device, True)
    t = _target((12,), 40, device, ignore=(3,))
    params = [p.requires_grad_() for p in (h, W, bb)]

    def f(h, W, bb):
        return fastloss.linear_spherical_loss(h, W, t, bb, loss="z", a=1.0, b=3.0)

    got = compiled_or_skip(f, *params)
    ref = f(*params)
    assert torch.allclose(got, ref, rtol=1e-6)
    for g_got, g_ref in zip(torch.autograd.grad(got, params), torch.autograd.grad(ref, params)):
        assert torch.allclose(g_got, g_ref, rtol=1e-5, atol=1e-7)


def test_linear_ignored_rows_never_poison_the_gradients(device):
    # Every row ignored with a mean: a NaN loss (0 / 0, as F.cross_entropy) but zero gradients, not NaN; and an
    # ignored token's non-finite hidden state leaves the other rows' gradients finite.
    h, W, bb = _head(6, 4, 30, torch.float64, device, True)
    params = [p.requires_grad_() for p in (h, W, bb)]
    t = torch.full((6,), -100, device=device)
    out = fastloss.linear_spherical_loss(h, W, t, bb, loss="z", a=1.0, b=2.0)
    assert torch.isnan(out)
    for g in torch.autograd.grad(out, params):
        assert torch.all(g == 0)
    h2 = h.detach().clone()
    h2[2] = float("inf")
    h2[4] = float("nan")
    t2 = _target((6,), 30, device)
    t2[2] = t2[4] = -100
    p2 = [h2.requires_grad_(), W, bb]
    got = fastloss.linear_spherical_loss(h2, W, t2, bb, loss="taylor_softmax")
    keep = torch.tensor([0, 1, 3, 5], device=device)
    ref = fastloss.linear_spherical_loss(h[keep], W, t2[keep], bb, loss="taylor_softmax")
    assert torch.allclose(got, ref, rtol=1e-12)
    gh, gw, gb = torch.autograd.grad(got, p2)
    rh, rw, rb = torch.autograd.grad(ref, [h, W, bb])
    assert torch.all(gh[[2, 4]] == 0) and torch.allclose(gh[keep], rh[keep], rtol=1e-10, atol=1e-14)
    assert torch.allclose(gw, rw, rtol=1e-10, atol=1e-14) and torch.allclose(gb, rb, rtol=1e-10, atol=1e-14)


def test_linear_second_derivative_is_refused(device):
    h, W, _ = _head(5, 4, 20, torch.float64, device, False)
    params = [p.requires_grad_() for p in (h, W)]
    out = fastloss.linear_spherical_loss(h, W, _target((5,), 20, device), loss="z", a=1.0, b=2.0)
    (gh, _) = torch.autograd.grad(out, params, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|does not require grad"):
        gh.sum().backward()


def test_linear_under_autocast_computes_in_float32(device):
    # Like linear_cross_entropy: the products run in the inputs' dtype, not autocast's bf16.
    h, W, bb = _head(16, 8, 64, torch.float32, device, True)
    t = _target((16,), 64, device)
    ref = fastloss.linear_spherical_loss(h, W, t, bb, loss="z", a=1.0, b=2.0)
    with torch.autocast(device_type=device, dtype=torch.bfloat16):
        got = fastloss.linear_spherical_loss(h, W, t, bb, loss="z", a=1.0, b=2.0)
    assert got.dtype == torch.float32 and torch.allclose(got, ref, rtol=1e-6)


def test_linear_empty(device):
    h, W, bb = _head(0, 8, 10, torch.float32, device, True)
    params = [p.requires_grad_() for p in (h, W, bb)]
    t = torch.zeros(0, dtype=torch.long, device=device)
    out = fastloss.linear_spherical_loss(h, W, t, bb, loss="z", a=1.0, b=1.0, reduction="sum")
    assert out.item() == 0
    gh, gw, gb = torch.autograd.grad(out, params)
    assert gh.shape == (0, 8) and torch.all(gw == 0) and torch.all(gb == 0)


@pytest.mark.slow
def test_past_2_pow_31_elements(device):
    # bf16 [8200, 262144] = 2.15e9 elements (4.3 GB): rows whose offsets pass 2^31 read and write the right memory.
    N, V = 8200, 262144
    x = torch.empty(N, V, dtype=torch.bfloat16, device=device)
    x.fill_(0.5)
    rows = [0, 4096, 8191, N - 1]
    gen = torch.Generator().manual_seed(0)
    for r in rows:
        x[r] = (torch.randn(V, generator=gen) * 3).to(torch.bfloat16).to(device)
    t = torch.randint(0, V, (N,), generator=gen).to(device)
    kw = {"a": 1.0, "b": 3.0}
    xg = x.requires_grad_()
    loss = fastloss.spherical_loss(xg, t, loss="z", reduction="none", **kw)
    ref = ref_rows(x.detach()[rows], t[rows], "z", **kw)
    assert rel_err(loss[rows], ref) < 2e-2
    const = math.log1p(math.exp(3.0))  # constant rows: std = 0
    assert torch.allclose(loss[[1, 5000, 8190]].double().cpu(), torch.full((3,), const, dtype=torch.float64),
                          rtol=2e-2)
    loss.sum().backward()
    xr = x.detach()[rows].double().requires_grad_()
    ref_rows(xr, t[rows], "z", **kw).sum().backward()
    assert rel_err(xg.grad[rows], xr.grad) < 2e-2
    assert torch.all(xg.grad[[1, 5000, 8190]] == 0)

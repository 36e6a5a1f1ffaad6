"""The comp-sum losses of fastloss.cross_entropy / linear_cross_entropy (loss="focal" / "poly1" / "squentropy") against plain
PyTorch references in float64, with ignore_index, reductions and class weights; gradients by gradcheck."""

import itertools

import pytest
import torch
import torch.nn.functional as F
from conftest import TOL, rel_err

import fastloss
from fastloss.reference import comp_sum_loss_reference

C = 37
KINDS = [("focal", dict(gamma=2.0)), ("focal", dict(gamma=0.5)), ("focal", dict(gamma=0.0)),
         ("poly1", dict(epsilon=1.0)), ("poly1", dict(epsilon=-0.5)), ("squentropy", {})]


def _data(n=19, dtype=torch.float64, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, C, generator=g, dtype=torch.float64) * 2.5).to(dtype).to(device)
    t = torch.randint(0, C, (n,), generator=g)
    t[::6] = -100
    w = torch.rand(C, generator=g, dtype=torch.float64) + 0.5
    return x, t.to(device), w.to(device)


@pytest.mark.parametrize("kind,kw", KINDS)
@pytest.mark.parametrize("reduction,weighted", list(itertools.product(["mean", "sum", "none"], [False, True])))
@pytest.mark.parametrize("inplace", [False, True])
def test_matches_reference_float64(kind, kw, reduction, weighted, inplace, device):
    x, t, w = _data(device=device)
    w = w if weighted else None
    xr = x.clone().requires_grad_()
    ref = comp_sum_loss_reference(xr, t, kind, weight=w, reduction=reduction, **kw)
    up = torch.linspace(0.5, 1.5, ref.numel(), dtype=torch.float64, device=device).view(ref.shape)
    (g_ref,) = torch.autograd.grad(ref, xr, up)
    xf = x.clone().requires_grad_()
    # in place: the gradient is written over a copy of the logits (a non-leaf), as in training
    inp = xf.clone() if inplace else xf
    out = fastloss.cross_entropy(inp, t, weight=w, reduction=reduction, loss=kind, inplace_backward=inplace, **kw)
    (g,) = torch.autograd.grad(out, xf, up)
    assert torch.allclose(out, ref, rtol=1e-12, atol=1e-13), (out, ref)
    assert torch.allclose(g, g_ref, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("kind,kw", KINDS[:1] + KINDS[3:4] + KINDS[5:])
def test_gradcheck_and_extras(kind, kw, device):
    x, t, w = _data(n=5, device=device)
    x.requires_grad_()
    assert torch.autograd.gradcheck(lambda v: fastloss.cross_entropy(v, t, weight=w, loss=kind, **kw), (x,))
    assert torch.autograd.gradcheck(
        lambda v: fastloss.cross_entropy(v, t, reduction="none", loss=kind, z_loss=1e-2, softcap=3.0, **kw), (x,))
    # z-loss and softcap compose as with "ce": the same additive term, the same capped logits
    capped = 3.0 * torch.tanh(x / 3.0)
    ref = comp_sum_loss_reference(capped, t, kind, reduction="none", **kw)
    lse = torch.logsumexp(capped, -1)
    ref = ref + torch.where(t != -100, 1e-2 * lse * lse, torch.zeros_like(lse))
    out = fastloss.cross_entropy(x, t, reduction="none", loss=kind, z_loss=1e-2, softcap=3.0, **kw)
    assert torch.allclose(out, ref, rtol=1e-12, atol=1e-13)


def test_special_cases(device):
    x, t, _ = _data(device=device)
    # gamma = 0 focal and epsilon = 0 poly1 are cross-entropy
    ce = F.cross_entropy(x, t)
    assert torch.allclose(fastloss.cross_entropy(x, t, loss="focal", gamma=0.0), ce, rtol=1e-13)
    assert torch.allclose(fastloss.cross_entropy(x, t, loss="poly1", epsilon=0.0), ce, rtol=1e-13)
    # a confident correct prediction (p_t -> 1): focal loss and gradient -> 0 without NaN
    xc = torch.full((2, C), -30.0, dtype=torch.float64, device=device)
    tc = torch.tensor([3, 4], device=device)
    xc[0, 3] = 30.0
    xc[1, 4] = 30.0
    xc.requires_grad_()
    out = fastloss.cross_entropy(xc, tc, loss="focal", gamma=0.5, reduction="sum")
    (g,) = torch.autograd.grad(out, xc)
    assert torch.isfinite(out) and out.item() < 1e-20 and torch.isfinite(g).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind,kw", KINDS[:1] + KINDS[3:4] + KINDS[5:])
def test_low_precision(dtype, kind, kw, device):
    x, t, w = _data(n=64, dtype=dtype, device=device)
    xr = x.double().requires_grad_()
    ref = comp_sum_loss_reference(xr, t, kind, weight=w, **kw)
    (g_ref,) = torch.autograd.grad(ref, xr)
    xf = x.clone().requires_grad_()
    out = fastloss.cross_entropy(xf, t, weight=w.to(torch.float32), loss=kind, **kw)
    (g,) = torch.autograd.grad(out, xf)
    assert out.dtype == dtype
    assert rel_err(out.reshape(1), ref.reshape(1)) <= 2 * TOL[dtype]
    assert rel_err(g, g_ref) <= 4 * TOL[dtype]


@pytest.mark.parametrize("kind,kw", KINDS[:1] + KINDS[3:4] + KINDS[5:])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_linear_cross_entropy(kind, kw, reduction, device):
    g = torch.Generator().manual_seed(3)
    h = torch.randn(3, 7, 8, generator=g, dtype=torch.float64).to(device).requires_grad_()
    W = (torch.randn(C, 8, generator=g, dtype=torch.float64) * 0.7).to(device).requires_grad_()
    b = torch.randn(C, generator=g, dtype=torch.float64).to(device).requires_grad_()
    t = torch.randint(0, C, (3, 7), generator=g).to(device)
    t[0, :2] = -100
    out = fastloss.linear_cross_entropy(h, W, t, linear_bias=b, reduction=reduction, chunk_size=4, loss=kind, **kw)
    logits = F.linear(h, W, b)
    ref = comp_sum_loss_reference(logits.reshape(-1, C), t.reshape(-1), kind, reduction=reduction, **kw)
    ref = ref.view(3, 7) if reduction == "none" else ref
    assert torch.allclose(out, ref, rtol=1e-12, atol=1e-13)
    up = torch.rand(ref.shape, dtype=torch.float64, generator=g).to(device)
    for a, r in zip(torch.autograd.grad(out, (h, W, b), up), torch.autograd.grad(ref, (h, W, b), up)):
        assert torch.allclose(a, r, rtol=1e-10, atol=1e-13)


def test_bad_arguments(device):
    x, t, _ = _data(device=device)
    with pytest.raises(ValueError, match="`loss`"):
        fastloss.cross_entropy(x, t, loss="hinge")
    with pytest.raises(ValueError, match="label_smoothing"):
        fastloss.cross_entropy(x, t, loss="focal", label_smoothing=0.1)
    with pytest.raises(ValueError, match="probability"):
        fastloss.cross_entropy(x, torch.softmax(x, -1), loss="poly1")
    with pytest.raises(ValueError, match="gamma"):
        fastloss.cross_entropy(x, t, loss="focal", gamma=-1.0)
    with pytest.raises(ValueError, match="gamma"):
        fastloss.cross_entropy(x, t, loss="ce", gamma=2.0)
    with pytest.raises(ValueError, match="label_smoothing"):
        fastloss.cross_entropy(x, t, loss="squentropy", label_smoothing=0.1)
    with pytest.raises(RuntimeError, match="`loss`"):
        torch.ops.fastloss.cross_entropy_fwd(x, t, None, -100, 0.0, 0.0, None, "auto", "hinge", 0.0)


def test_modules(device):
    x, t, w = _data(device=device)
    m = fastloss.nn.CrossEntropyLoss(weight=w, loss="focal", gamma=1.5)
    assert torch.allclose(m(x, t), comp_sum_loss_reference(x, t, "focal", weight=w, gamma=1.5), rtol=1e-12)
    h = torch.randn(5, 4, dtype=torch.float64, device=device)
    W = torch.randn(C, 4, dtype=torch.float64, device=device)
    tt = t[:5]
    lm = fastloss.nn.LinearCrossEntropyLoss(loss="poly1", epsilon=2.0)
    ref = comp_sum_loss_reference(h @ W.T, tt, "poly1", epsilon=2.0)
    assert torch.allclose(lm(h, W, tt), ref, rtol=1e-12)


@pytest.mark.parametrize("alg", ["online", "two_pass"])
def test_squentropy_long_rows_and_sum_of_squares(alg, device):
    # long rows (the SIMD body, chunk flushes of the second accumulator), peaked and flat rows, one class
    g = torch.Generator().manual_seed(9)
    x = torch.randn(4, 20011, generator=g, dtype=torch.float64) * 4
    x[1] *= 0.01  # nearly uniform: sum p^2 ~ 1 / C
    x[2, 7] = 60.0  # one dominant class: sum p^2 ~ 1
    t = torch.tensor([5, 9, 7, 7])
    x, t = x.to(device), t.to(device)
    for dtype, tol in ((torch.float64, 1e-11), (torch.float32, 1e-5)):
        xi = x.to(dtype).requires_grad_()
        out = fastloss.cross_entropy(xi, t, loss="squentropy", reduction="none", algorithm=alg)
        xr = x.clone().requires_grad_()
        ref = comp_sum_loss_reference(xr, t, "squentropy", reduction="none")
        assert rel_err(out, ref) <= tol
        (ga,) = torch.autograd.grad(out.sum(), xi)
        (gr,) = torch.autograd.grad(ref.sum(), xr)
        assert rel_err(ga, gr) <= 10 * tol
    one = torch.randn(3, 1, dtype=torch.float64, device=device)
    assert torch.equal(fastloss.cross_entropy(one, torch.zeros(3, dtype=torch.long, device=device),
                                              loss="squentropy", reduction="none"),
                       torch.zeros(3, dtype=torch.float64, device=device))


def test_squentropy_saved_sum_of_squares_and_opcheck(device):
    x, t, _ = _data(device=device)
    ops = torch.ops.fastloss
    rows, lse, sq = ops.cross_entropy_fwd(x, t, None, -100, 0.0, 0.0, None, "auto", "squentropy", 0.0)
    p = torch.softmax(x, -1)
    valid = t != -100
    assert torch.allclose(sq[valid], (p * p).sum(-1)[valid], rtol=1e-12) and (sq[~valid] == 0).all()
    assert ops.cross_entropy_fwd(x, t, None, -100, 0.0, 0.0, None)[2].numel() == 0  # only squentropy keeps it
    g = torch.rand(x.shape[0], dtype=torch.float64, device=device)
    args = (g, None, x, t, None, lse, -100, 0.0, 0.0, None, "squentropy", 0.0)
    saved = ops.cross_entropy_bwd(*args, sq)
    recomputed = ops.cross_entropy_bwd(*args)  # no sum_sq: one more pass over each row
    assert torch.allclose(saved, recomputed, rtol=1e-12, atol=1e-15)
    torch.library.opcheck(ops.cross_entropy_fwd.default, (x, t, None, -100, 0.0, 0.0, None, "auto", "squentropy", 0.0))
    torch.library.opcheck(ops.cross_entropy_bwd.default, args + (sq,))

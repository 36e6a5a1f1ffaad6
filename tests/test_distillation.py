"""fastloss.distillation_loss / linear_distillation_loss (issue #14) against the plain float64 PyTorch reference
(fastloss.reference.distillation_loss_reference): every divergence, GKD's beta at both ends, temperatures, masked
tokens, reductions and the hard-label term; gradients (reference autograd and gradcheck); -inf logits (masked
vocabulary), peaked and flat distributions; low precision; odd vocabulary sizes, empty batches, leading shapes;
the chunked linear version against the logits on materialised logits, and its extra peak memory."""

import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from conftest import compiled_or_skip, TOL, rel_err

import fastloss
from fastloss.reference import distillation_loss_reference as ref_loss

V = 37  # not a multiple of any vector width
# (divergence, beta): beta only matters for "jsd"; 0 and 1 are TRL's special cases (forward / reverse KL)
DIVS = [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.0), ("jsd", 0.3), ("jsd", 1.0)]
DIVS3 = [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.3)]
REDUCTIONS = ["mean", "sum", "none"]
RTOL64 = 1e-10  # relative error norm, float64 inputs
GTOL64 = 1e-9  # same, gradients


def _pair(lead, v=V, dtype=torch.float64, device="cpu", seed=0, scale=2.0):
    """Student and teacher logits (teacher correlated with the student, as after some training)."""
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(lead + (v,), generator=g, dtype=torch.float64) * scale
    t = 0.6 * s + 0.8 * scale * torch.randn(lead + (v,), generator=g, dtype=torch.float64)
    return s.to(dtype).to(device), t.to(dtype).to(device)


def _target(lead, v=V, device="cpu", ignore_index=-100, seed=1):
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, v, lead, generator=g)
    flat = t.view(-1)
    flat[1::4] = ignore_index  # always some masked tokens (when there are 2 or more)
    if 0 <= ignore_index < v and flat.numel() > 2:
        flat[2] = (ignore_index + 1) % v  # a valid token next to the in-range ignore_index
    return t.to(device)


def _upstream(shape, device, dtype=torch.float64, seed=9):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(shape, generator=g, dtype=torch.float64) + 0.5).to(dtype).to(device)


def _loss_and_grad(fn, s, t, gout=None, **kw):
    x = s.detach().clone().requires_grad_()
    out = fn(x, t, **kw)
    if gout is None:
        gout = _upstream(out.shape, s.device, out.dtype)
    (g,) = torch.autograd.grad(out, x, gout)
    return out, g


# ---------------------------------------------------------------- float64 against the reference


@pytest.mark.parametrize("div,beta", DIVS)
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("tgt", ["none", "masked", "masked_hard"])
def test_matches_reference_float64(div, beta, temperature, reduction, tgt, device):
    lead = (3, 5)
    s, t = _pair(lead, device=device)
    kw = dict(divergence=div, beta=beta, temperature=temperature, reduction=reduction)
    valid = None
    if tgt == "masked":
        kw.update(target=_target(lead, device=device))
        valid = kw["target"] != -100
    elif tgt == "masked_hard":  # an ignore_index inside [0, V), and the hard-label term
        kw.update(target=_target(lead, device=device, ignore_index=5), ignore_index=5, hard_weight=0.7)
        valid = kw["target"] != 5
    ref, g_ref = _loss_and_grad(ref_loss, s, t, **kw)
    out, g = _loss_and_grad(fastloss.distillation_loss, s, t, gout=_upstream(ref.shape, device), **kw)
    assert out.shape == ref.shape == (lead if reduction == "none" else ())
    assert out.dtype == torch.float64 and out.device == s.device
    assert rel_err(out, ref) <= RTOL64, (out, ref)
    assert rel_err(g, g_ref) <= GTOL64
    assert g.shape == s.shape
    if valid is not None:
        masked = ~valid
        assert torch.equal(g[masked], torch.zeros_like(g[masked]))  # masked tokens: exactly no gradient
        if reduction == "none":
            assert torch.equal(out[masked], torch.zeros_like(out[masked]))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("end", [0.0, 1.0])
def test_jsd_beta_ends_are_exactly_the_kls(dtype, end, device):
    s, t = _pair((4, 6), dtype=dtype, device=device, seed=3)
    tgt = _target((4, 6), device=device)
    kl = "forward_kl" if end == 0.0 else "reverse_kl"
    for reduction in REDUCTIONS:
        kw = dict(temperature=1.5, target=tgt, reduction=reduction, hard_weight=0.25)
        a, ga = _loss_and_grad(fastloss.distillation_loss, s, t, divergence="jsd", beta=end, **kw)
        b, gb = _loss_and_grad(fastloss.distillation_loss, s, t, divergence=kl, **kw)
        assert torch.equal(a, b), (reduction, a, b)
        assert torch.equal(ga, gb), reduction


def test_divergence_properties(device):
    s, t = _pair((6,), v=50, device=device, seed=4, scale=5.0)
    kw = dict(reduction="none", temperature=1.3)
    fk = fastloss.distillation_loss(s, t, divergence="forward_kl", **kw)
    rk = fastloss.distillation_loss(s, t, divergence="reverse_kl", **kw)
    assert (fk > 0).all() and (rk > 0).all()
    # forward KL(teacher || student) is reverse KL with the roles swapped
    assert rel_err(fastloss.distillation_loss(t, s, divergence="reverse_kl", **kw), fk) <= RTOL64
    for beta in (0.3, 0.5, 0.8):
        j = fastloss.distillation_loss(s, t, divergence="jsd", beta=beta, **kw)
        assert rel_err(fastloss.distillation_loss(t, s, divergence="jsd", beta=1 - beta, **kw), j) <= RTOL64
        assert (j > 0).all()
    # the symmetric JSD is at most log 2, approached by disjoint peaked distributions
    j = fastloss.distillation_loss(s * 20, t * 20, divergence="jsd", beta=0.5, reduction="none")
    assert (j <= math.log(2) + 1e-12).all() and j.max() > 0.5
    for div, beta in DIVS:  # identical distributions (up to a shift of the logits): zero
        z = fastloss.distillation_loss(s, s + 3.25, divergence=div, beta=beta, **kw)
        assert z.abs().max() <= 1e-12, (div, z)


@pytest.mark.parametrize("div,beta", DIVS3)
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_gradcheck(div, beta, reduction, device):
    s, t = _pair((4,), v=7, device=device, seed=5)
    tgt = torch.tensor([1, -100, 6, 0], device=device)
    x = s.clone().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda v: fastloss.distillation_loss(v, t, divergence=div, beta=beta, temperature=1.7, target=tgt,
                                             hard_weight=0.4, reduction=reduction), (x,))
    assert torch.autograd.gradcheck(
        lambda v: fastloss.distillation_loss(v, t, divergence=div, beta=beta, temperature=0.6,
                                             reduction=reduction), (x,))


@pytest.mark.parametrize("div,beta", DIVS3)
def test_teacher_requiring_grad_gets_no_gradient(div, beta, device):
    s, t = _pair((5,), device=device, seed=6)
    tgt = _target((5,), device=device)
    kw = dict(divergence=div, beta=beta, temperature=2.0, target=tgt, hard_weight=0.3)
    xs, xt = s.clone().requires_grad_(), t.clone().requires_grad_()
    fastloss.distillation_loss(xs, xt, **kw).backward()
    assert xt.grad is None  # the teacher is a constant (detached)
    _, g_ref = _loss_and_grad(ref_loss, s, t, gout=torch.ones((), dtype=torch.float64, device=device), **kw)
    assert rel_err(xs.grad, g_ref) <= GTOL64
    # a teacher that is itself the output of a graph (a trainable teacher head): still no gradient into it
    w = torch.ones((), dtype=torch.float64, device=device, requires_grad=True)
    xs.grad = None
    fastloss.distillation_loss(xs, t * w, **kw).backward()
    assert w.grad is None
    assert rel_err(xs.grad, g_ref) <= GTOL64


# ---------------------------------------------------------------- special values and shapes of distributions


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("div,beta", DIVS3)
def test_masked_vocabulary_same_positions(dtype, div, beta, device):
    """-inf at the same entries of student and teacher (a padded vocabulary, banned tokens): the same loss and
    gradient as without those entries, the gradient exactly 0 there."""
    pad = 6
    s, t = _pair((5,), v=V + pad, device="cpu", seed=7, scale=3.0)
    s[:, V:] = -math.inf
    t[:, V:] = -math.inf
    s[2, :4] = -math.inf  # one token with more entries masked, in both
    t[2, :4] = -math.inf
    s, t = s.to(dtype).to(device), t.to(dtype).to(device)
    kw = dict(divergence=div, beta=beta, temperature=1.5, reduction="none")
    ref, g_ref = _loss_and_grad(ref_loss, s, t, **kw)
    out, g = _loss_and_grad(fastloss.distillation_loss, s, t, gout=_upstream(ref.shape, device, dtype), **kw)
    tol = RTOL64 if dtype == torch.float64 else 1e-5
    assert out.isfinite().all() and g.isfinite().all()
    assert rel_err(out, ref) <= tol and rel_err(g, g_ref) <= 10 * tol
    assert torch.equal(g[:, V:], torch.zeros_like(g[:, V:])) and torch.equal(g[2, :4], torch.zeros_like(g[2, :4]))
    # the padded columns change nothing
    rows = [0, 1, 3, 4]
    cut, g_cut = _loss_and_grad(fastloss.distillation_loss, s[rows, :V], t[rows, :V],
                                gout=_upstream(ref.shape, device, dtype)[rows], **kw)
    assert rel_err(out[rows], cut) <= tol and rel_err(g[rows, :V], g_cut) <= 10 * tol


@pytest.mark.parametrize("where", ["teacher", "student"])
@pytest.mark.parametrize("div,beta", DIVS3)
def test_zero_probability_in_one_distribution(where, div, beta, device):
    """-inf in only one of them. Teacher -inf where the student is finite: forward KL finite (0 log 0 = 0), reverse
    KL +inf. Student -inf where the teacher is finite: forward KL +inf, reverse KL finite. JSD always finite."""
    s, t = _pair((5,), device="cpu", seed=8)
    x = t if where == "teacher" else s
    x[0, 3:9] = -math.inf
    x[2, 0] = -math.inf
    x[2, V - 1] = -math.inf
    s, t = s.to(device), t.to(device)
    kw = dict(divergence=div, beta=beta, temperature=0.8, reduction="none")
    bad_rows = torch.tensor([True, False, True, False, False], device=device)
    infinite = (div == "reverse_kl") == (where == "teacher") and div != "jsd"
    ref = ref_loss(s, t, **kw)
    out = fastloss.distillation_loss(s, t, **kw)
    assert torch.equal(ref.isinf(), bad_rows if infinite else torch.zeros_like(bad_rows))  # the reference agrees
    assert torch.equal(out.isinf(), ref.isinf()), out
    assert (out[out.isinf()] > 0).all()
    fin = ref.isfinite()
    assert not out[fin].isnan().any()
    assert rel_err(out[fin], ref[fin]) <= RTOL64
    # gradient of the finite tokens: the reference's (and finite)
    xs = s.clone().requires_grad_()
    xr = s.clone().requires_grad_()
    up = _upstream((5,), device)
    (fastloss.distillation_loss(xs, t, **kw)[fin] * up[fin]).sum().backward()
    (ref_loss(xr, t, **kw)[fin] * up[fin]).sum().backward()
    assert xs.grad[fin].isfinite().all()
    assert rel_err(xs.grad[fin], xr.grad[fin]) <= GTOL64
    dead = ~torch.isfinite(s) & fin[:, None]  # p_student = 0 there: p log p -> 0, so no gradient (not 0 * inf)
    assert torch.equal(xs.grad[dead], torch.zeros_like(xs.grad[dead]))
    # the finite-loss reductions agree too
    if not infinite:
        for reduction in ("mean", "sum"):
            kw2 = dict(kw, reduction=reduction)
            assert rel_err(fastloss.distillation_loss(s, t, **kw2), ref_loss(s, t, **kw2)) <= RTOL64
    else:
        assert fastloss.distillation_loss(s, t, **dict(kw, reduction="mean")).item() == math.inf


def test_masked_token_with_infinite_divergence_is_zero(device):
    """A masked token (target == ignore_index) has loss 0 and zero gradient even when its divergence is +inf."""
    s, t = _pair((4,), device="cpu", seed=10)
    s[1, :5] = -math.inf  # forward KL of token 1 is +inf
    t[3, 2:] = -math.inf  # reverse KL of token 3 is +inf
    s, t = s.to(device), t.to(device)
    tgt = torch.tensor([2, -100, 7, -100], device=device)
    for reduction in REDUCTIONS:
        kw = dict(target=tgt, reduction=reduction, hard_weight=0.5)
        ref, g_ref = _loss_and_grad(ref_loss, s, t, **kw)
        out, g = _loss_and_grad(fastloss.distillation_loss, s, t, gout=_upstream(ref.shape, device), **kw)
        assert out.isfinite().all() and g.isfinite().all(), (reduction, out)
        assert rel_err(out, ref) <= RTOL64 and rel_err(g, g_ref) <= GTOL64
        assert torch.equal(g[1::2], torch.zeros_like(g[1::2]))
        rk = fastloss.distillation_loss(s, t, divergence="reverse_kl", target=tgt, reduction=reduction)
        assert rk.isfinite().all() and rel_err(rk, ref_loss(s, t, divergence="reverse_kl", target=tgt,
                                                            reduction=reduction)) <= RTOL64


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kind", ["peaked", "flat_student", "flat_teacher"])
@pytest.mark.parametrize("div,beta", DIVS3)
def test_peaked_and_flat_distributions(dtype, kind, div, beta, device):
    T = 2.0
    s, t = _pair((6,), v=300, device="cpu", seed=11)
    if kind == "peaked":  # logits scaled by 100: nearly one-hot softmaxes, log-probs down to ~ -1e3
        s, t = s * 100, t * 100
    elif kind == "flat_student":
        s = torch.full_like(s, 2.5)
    else:
        t = torch.full_like(t, -7.0)
    s, t = s.to(dtype).to(device), t.to(dtype).to(device)
    tgt = _target((6,), v=300, device=device)
    hard = 0.0 if kind == "peaked" else 0.1  # (the peaked CE would dwarf the divergence)
    kw = dict(divergence=div, beta=beta, temperature=T, target=tgt, reduction="none", hard_weight=hard)
    gout = _upstream((6,), device, dtype)
    ref, g_ref = _loss_and_grad(ref_loss, s, t, gout=gout.double(), **kw)
    out, g = _loss_and_grad(fastloss.distillation_loss, s, t, gout=gout, **kw)
    assert out.isfinite().all() and g.isfinite().all()
    if kind == "peaked":
        # Peaked rows: a divergence or gradient entry can be tiny (e^-100) next to logits of ~300 / T, so an
        # error of a few ulps of the logits is the bound (absolute), with a relative one on top.
        scale = max(s.abs().max().item(), t.abs().max().item()) / T
        eps = torch.finfo(dtype).eps
        rtol = 1e-10 if dtype == torch.float64 else 1e-5
        assert ((out.double() - ref).abs() <= rtol * ref.abs() + 64 * eps * scale).all(), (out, ref)
        gbound = rtol * g_ref.abs().max() + 64 * eps * scale * gout.abs().max()
        assert ((g.double() - g_ref).abs() <= gbound).all(), (g.double() - g_ref).abs().max()
        return
    tol = RTOL64 if dtype == torch.float64 else 1e-5
    assert rel_err(out, ref) <= tol and rel_err(g, g_ref) <= 10 * tol


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("div,beta", DIVS)
def test_both_flat_is_zero(dtype, div, beta, device):
    s = torch.full((3, 1000), 4.0, dtype=dtype, device=device)
    t = torch.full((3, 1000), -1.0, dtype=dtype, device=device)
    out, g = _loss_and_grad(fastloss.distillation_loss, s, t, divergence=div, beta=beta, reduction="none")
    atol = 1e-12 if dtype == torch.float64 else 1e-5  # a few ulps of the log-sum-exps (~11)
    assert out.abs().max() <= atol and g.abs().max() <= atol


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("div,beta", DIVS3)
def test_low_precision_within_bounds(dtype, div, beta, device):
    """Against the float64 reference of the same rounded inputs: the output is in the student's dtype (one
    rounding of each loss), accumulation in float32, the gradient in the input dtype."""
    lead = (48,)
    s, t = _pair(lead, v=1000, dtype=dtype, device=device, seed=12, scale=3.0)
    tgt = _target(lead, v=1000, device=device)
    kw = dict(divergence=div, beta=beta, temperature=1.5, target=tgt, reduction="none", hard_weight=0.5)
    gout = _upstream(lead, device, dtype)
    ref, g_ref = _loss_and_grad(ref_loss, s.double(), t.double(), gout=gout.double(), **kw)
    out, g = _loss_and_grad(fastloss.distillation_loss, s, t, gout=gout, **kw)
    assert out.dtype == dtype and g.dtype == dtype
    loss_tol = 1e-5 if dtype == torch.float32 else torch.finfo(dtype).eps  # 2x the output's unit roundoff
    grad_tol = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: TOL[torch.bfloat16]}[dtype]
    assert rel_err(out, ref) <= loss_tol, rel_err(out, ref)
    assert rel_err(g, g_ref) <= grad_tol, rel_err(g, g_ref)
    for reduction in ("mean", "sum"):
        kw2 = dict(kw, reduction=reduction)
        a = fastloss.distillation_loss(s, t, **kw2)
        assert a.dtype == dtype and rel_err(a.reshape(1), ref_loss(s, t, **kw2).reshape(1)) <= loss_tol


@pytest.mark.parametrize("v", [1, 7, 33, 1000, 4099])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("div,beta", DIVS3)
def test_vocabulary_sizes(v, dtype, div, beta, device):
    lead = (5,)
    s, t = _pair(lead, v=v, dtype=dtype, device=device, seed=13)
    tgt = _target(lead, v=v, device=device)
    kw = dict(divergence=div, beta=beta, temperature=0.7, target=tgt, reduction="none", hard_weight=0.3)
    gout = _upstream(lead, device, dtype)
    ref, g_ref = _loss_and_grad(ref_loss, s.double(), t.double(), gout=gout.double(), **kw)
    out, g = _loss_and_grad(fastloss.distillation_loss, s, t, gout=gout, **kw)
    assert out.shape == lead and g.shape == s.shape and out.dtype == dtype
    if v == 1:  # one class: every divergence and the cross-entropy are 0
        atol = 1e-12 if dtype == torch.float64 else 1e-6
        assert out.abs().max() <= atol and g.abs().max() <= atol
        return
    tol = {torch.float64: RTOL64, torch.float32: 1e-5, torch.bfloat16: TOL[torch.bfloat16]}[dtype]
    assert rel_err(out, ref) <= tol and rel_err(g, g_ref) <= tol * (10 if dtype != torch.bfloat16 else 1)


@pytest.mark.parametrize("lead", [(0,), (2, 0)])
@pytest.mark.parametrize("with_target", [False, True])
def test_empty_batch(lead, with_target, device):
    s, t = _pair(lead, v=7, device=device)
    kw = dict(target=torch.empty(lead, dtype=torch.long, device=device), hard_weight=0.5) if with_target else {}
    for div, beta in DIVS3:
        for reduction in REDUCTIONS:
            x = s.clone().requires_grad_()
            out = fastloss.distillation_loss(x, t, divergence=div, beta=beta, reduction=reduction, **kw)
            assert out.dtype == torch.float64
            if reduction == "none":
                assert out.shape == lead
            elif reduction == "sum":
                assert out.shape == () and out.item() == 0.0
            else:
                assert out.shape == () and out.isnan()  # mean of nothing, as F.cross_entropy
            out.sum().backward()
            assert x.grad.shape == s.shape


def test_all_tokens_masked(device):
    s, t = _pair((4,), device=device)
    tgt = torch.full((4,), -100, device=device)
    x = s.clone().requires_grad_()
    assert fastloss.distillation_loss(x, t, target=tgt, hard_weight=1.0).isnan()
    assert fastloss.distillation_loss(x, t, target=tgt, reduction="sum").item() == 0.0
    assert torch.equal(fastloss.distillation_loss(x, t, target=tgt, reduction="none"), torch.zeros(4, dtype=s.dtype,
                                                                                                   device=device))
    fastloss.distillation_loss(x, t, divergence="jsd", target=tgt, reduction="sum", hard_weight=1.0).backward()
    assert torch.equal(x.grad, torch.zeros_like(x))


def test_leading_shapes_and_strides(device):
    s, t = _pair((2, 3), device=device, seed=14)
    tgt = _target((2, 3), device=device)
    kw = dict(divergence="jsd", beta=0.3, temperature=1.2, target=tgt, hard_weight=0.2)
    flat = fastloss.distillation_loss(s.reshape(6, V), t.reshape(6, V), **dict(kw, target=tgt.reshape(6),
                                                                                reduction="none"))
    out = fastloss.distillation_loss(s, t, **dict(kw, reduction="none"))
    assert out.shape == (2, 3)
    assert torch.allclose(out.reshape(6), flat, rtol=1e-13, atol=0)
    assert rel_err(out, ref_loss(s, t, **dict(kw, reduction="none"))) <= RTOL64
    # a single token: leading shape ()
    one = fastloss.distillation_loss(s[1, 2], t[1, 2], **dict(kw, target=tgt[1, 2], reduction="none"))
    assert one.shape == () and rel_err(one, ref_loss(s[1, 2], t[1, 2], **dict(kw, target=tgt[1, 2],
                                                                                  reduction="none"))) <= RTOL64
    # non-contiguous inputs (classes last but strided rows; transposed leading dims)
    sb, tb = _pair((V, 6), v=8, device=device, seed=15)
    sn, tn = sb[:, :, 3].t(), tb[:, :, 5].t()  # (6, V), element stride along classes != 1
    assert not sn.is_contiguous()
    kw1 = dict(divergence="reverse_kl", temperature=0.9, reduction="none")
    ref, g_ref = _loss_and_grad(ref_loss, sn.contiguous(), tn.contiguous(), **kw1)
    xs = torch.empty_strided(sn.shape, (1, 6), dtype=sn.dtype, device=device).copy_(sn).requires_grad_()
    assert not xs.is_contiguous()
    out = fastloss.distillation_loss(xs, tn, **kw1)
    (g,) = torch.autograd.grad(out, xs, _upstream(ref.shape, device))
    assert rel_err(out, ref) <= RTOL64 and rel_err(g, g_ref) <= GTOL64
    s3 = s.transpose(0, 1)  # (3, 2, V)
    t3 = t.transpose(0, 1)
    assert rel_err(fastloss.distillation_loss(s3, t3, reduction="none"),
                   ref_loss(s3, t3, reduction="none")) <= RTOL64


# ---------------------------------------------------------------- errors


def test_bad_input(device):
    s, t = _pair((4,), device=device)
    tgt = _target((4,), device=device)
    E = (ValueError, RuntimeError)
    with pytest.raises(E, match="teacher_logits|student_logits"):
        fastloss.distillation_loss(s, t[:, :-1])
    with pytest.raises(E, match="teacher_logits|student_logits"):
        fastloss.distillation_loss(s, t[:3])
    for bad in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(E, match="temperature"):
            fastloss.distillation_loss(s, t, temperature=bad)
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="beta"):
            fastloss.distillation_loss(s, t, divergence="jsd", beta=bad)
    with pytest.raises(E + (TypeError,), match="student_logits"):
        fastloss.distillation_loss(torch.ones(4, V, dtype=torch.long, device=device), t)
    with pytest.raises(E + (TypeError,), match="teacher_logits"):
        fastloss.distillation_loss(s, torch.ones(4, V, dtype=torch.long, device=device))
    with pytest.raises(E, match="divergence"):
        fastloss.distillation_loss(s, t, divergence="kl")
    with pytest.raises(E, match="reduction"):
        fastloss.distillation_loss(s, t, reduction="avg")
    with pytest.raises(E, match="target"):
        fastloss.distillation_loss(s, t, target=tgt[:3])
    with pytest.raises(ValueError, match="hard_weight|target"):
        fastloss.distillation_loss(s, t, hard_weight=0.5)
    if device == "cpu":  # (on CUDA an out-of-range target may be a device-side assert)
        for bad_value in (V, -1):
            bad = tgt.clone()
            bad[0] = bad_value
            with pytest.raises(E + (IndexError,), match="target"):
                fastloss.distillation_loss(s, t, target=bad)
            with pytest.raises(E + (IndexError,), match="target"):
                fastloss.distillation_loss(s, t, target=bad, hard_weight=1.0)


# ---------------------------------------------------------------- module, compile


def test_nn_module(device):
    s, t = _pair((2, 4), device=device, seed=16)
    tgt = _target((2, 4), device=device, ignore_index=3)
    kw = dict(divergence="jsd", beta=0.3, temperature=2.0, ignore_index=3, reduction="sum", hard_weight=0.5)
    m = fastloss.nn.DistillationLoss(**kw)
    assert isinstance(m, torch.nn.Module)
    assert rel_err(m(s, t, tgt), ref_loss(s, t, target=tgt, **kw)) <= RTOL64
    assert rel_err(m(s, t, target=tgt), ref_loss(s, t, target=tgt, **kw)) <= RTOL64
    d = fastloss.nn.DistillationLoss()  # forward KL, mean over all tokens
    assert rel_err(d(s, t), ref_loss(s, t)) <= RTOL64


def test_torch_compile_fullgraph(device):
    def f(s, t, tgt):
        return fastloss.distillation_loss(s, t, divergence="jsd", beta=0.3, temperature=2.0, target=tgt,
                                          hard_weight=0.5)

    s, t = _pair((8,), v=300, dtype=torch.float32, device=device, seed=17)
    tgt = _target((8,), v=300, device=device)
    xa, xb = s.clone().requires_grad_(), s.clone().requires_grad_()
    a = compiled_or_skip(f, xa, t, tgt)
    b = f(xb, t, tgt)
    a.backward()
    b.backward()
    assert torch.allclose(a, b, rtol=1e-5)
    assert torch.allclose(xa.grad, xb.grad, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------- linear (chunked) version

DS, DT = 8, 12  # student and teacher hidden sizes differ


def _linear(lead, v=V, dtype=torch.float64, device="cpu", bias=True, seed=20):
    g = torch.Generator().manual_seed(seed)
    sh = torch.randn(lead + (DS,), generator=g, dtype=torch.float64)
    sw = torch.randn(v, DS, generator=g, dtype=torch.float64) * 0.7
    sb = torch.randn(v, generator=g, dtype=torch.float64) * 0.5 if bias else None
    th = torch.randn(lead + (DT,), generator=g, dtype=torch.float64)
    tw = torch.randn(v, DT, generator=g, dtype=torch.float64) * 0.6
    tb = torch.randn(v, generator=g, dtype=torch.float64) * 0.5 if bias else None
    cast = lambda x, grad: None if x is None else x.to(dtype).to(device).requires_grad_(grad)  # noqa: E731
    return cast(sh, True), cast(sw, True), cast(sb, True), cast(th, False), cast(tw, False), cast(tb, False)


def _linear_ref(sh, sw, sb, th, tw, tb, **kw):
    return ref_loss(F.linear(sh.double(), sw.double(), None if sb is None else sb.double()),
                    F.linear(th.double(), tw.double(), None if tb is None else tb.double()), **kw)


def _student_params(sh, sw, sb):
    return tuple(p for p in (sh, sw, sb) if p is not None)


@pytest.mark.parametrize("chunk", [3, 5, "auto"])
@pytest.mark.parametrize("div,beta", DIVS3)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("bias", [True, False])
def test_linear_matches_logits_version(chunk, div, beta, reduction, bias, device):
    lead = (10,)
    sh, sw, sb, th, tw, tb = _linear(lead, device=device, bias=bias)
    tgt = _target(lead, device=device)
    kw = dict(divergence=div, beta=beta, temperature=1.5, target=tgt, reduction=reduction, hard_weight=0.5)
    out = fastloss.linear_distillation_loss(sh, sw, th, tw, student_bias=sb, teacher_bias=tb, chunk_size=chunk,
                                            **kw)
    ref = _linear_ref(sh, sw, sb, th, tw, tb, **kw)
    assert out.shape == ref.shape and out.dtype == torch.float64
    assert rel_err(out, ref) <= RTOL64, (out, ref)
    params = _student_params(sh, sw, sb)
    gout = _upstream(ref.shape, device)
    for a, b in zip(torch.autograd.grad(out, params, gout), torch.autograd.grad(ref, params, gout)):
        assert a.shape == b.shape and rel_err(a, b) <= GTOL64
    # and the same as fastloss's own logits version on materialised logits
    logits = fastloss.distillation_loss(F.linear(sh, sw, sb), F.linear(th, tw, tb), **kw)
    assert rel_err(out, logits) <= RTOL64


@pytest.mark.parametrize("chunk", [4, "auto"])
def test_linear_leading_shape_and_frozen_teacher(chunk, device):
    lead = (2, 5)
    sh, sw, sb, th, tw, tb = _linear(lead, device=device, seed=21)
    for p in (th, tw, tb):
        p.requires_grad_()  # a teacher that could be trained gets no gradient from the distillation loss
    tgt = _target(lead, device=device)
    kw = dict(divergence="jsd", beta=0.3, temperature=0.8, target=tgt, reduction="none", hard_weight=0.2)
    out = fastloss.linear_distillation_loss(sh, sw, th, tw, student_bias=sb, teacher_bias=tb, chunk_size=chunk,
                                            **kw)
    ref = _linear_ref(sh, sw, sb, th, tw, tb, **kw)
    assert out.shape == lead and rel_err(out, ref) <= RTOL64
    gout = _upstream(lead, device)
    (out * gout).sum().backward()
    assert th.grad is None and tw.grad is None and tb.grad is None
    gr = torch.autograd.grad(ref, (sh, sw, sb), gout)
    for a, b in zip((sh.grad, sw.grad, sb.grad), gr):
        assert rel_err(a, b) <= GTOL64
    # weights that do not need a gradient (a frozen head), and no_grad
    sw2 = sw.detach()
    (g_h,) = torch.autograd.grad(fastloss.linear_distillation_loss(sh, sw2, th, tw, chunk_size=chunk), sh)
    (g_r,) = torch.autograd.grad(_linear_ref(sh, sw2, None, th, tw, None), sh)
    assert rel_err(g_h, g_r) <= GTOL64
    with torch.no_grad():
        out = fastloss.linear_distillation_loss(sh, sw, th, tw, chunk_size=chunk)
    assert rel_err(out, _linear_ref(sh, sw, None, th, tw, None)) <= RTOL64


def test_linear_empty_batch(device):
    sh, sw, sb, th, tw, tb = _linear((0,), device=device)
    for reduction in REDUCTIONS:
        out = fastloss.linear_distillation_loss(sh, sw, th, tw, student_bias=sb, teacher_bias=tb,
                                                reduction=reduction, chunk_size=3)
        if reduction == "none":
            assert out.shape == (0,)
        elif reduction == "sum":
            assert out.item() == 0.0
        else:
            assert out.isnan()
        gh, gw, gb = torch.autograd.grad(out.sum(), (sh, sw, sb), allow_unused=True)
        for g_, p in ((gh, sh), (gw, sw), (gb, sb)):
            assert g_ is None or (g_.shape == p.shape and not g_.any())


def test_linear_bf16_within_bounds(device):
    lead = (32,)
    sh, sw, sb, th, tw, tb = _linear(lead, v=300, dtype=torch.bfloat16, device=device, seed=22)
    tgt = _target(lead, v=300, device=device)
    kw = dict(divergence="jsd", beta=0.3, temperature=1.5, target=tgt, reduction="sum", hard_weight=0.5)
    out = fastloss.linear_distillation_loss(sh, sw, th, tw, student_bias=sb, teacher_bias=tb, chunk_size=7, **kw)
    assert out.dtype == torch.bfloat16
    r = [p.detach().double().requires_grad_() for p in (sh, sw, sb)]
    ref = _linear_ref(*r, th, tw, tb, **kw)
    # bf16 GEMMs (on CUDA) round the logits: a few bf16 ulps of the loss
    assert rel_err(out.reshape(1), ref.reshape(1)) <= 2e-2
    for a, b in zip(torch.autograd.grad(out, (sh, sw, sb)), torch.autograd.grad(ref, r)):
        assert a.dtype == torch.bfloat16 and rel_err(a, b) <= 3e-2


def test_linear_bad_input(device):
    sh, sw, sb, th, tw, tb = _linear((4,), device=device)
    E = (ValueError, RuntimeError)
    with pytest.raises(ValueError, match="(?i)vocab|teacher_weight|student_weight"):
        fastloss.linear_distillation_loss(sh, sw, th, tw[:-1])
    with pytest.raises(E, match="teacher_hidden|student_hidden"):
        fastloss.linear_distillation_loss(sh, sw, th[:3], tw)
    with pytest.raises(E, match="student_weight|student_hidden"):
        fastloss.linear_distillation_loss(sh, sw[:, :-1], th, tw)
    with pytest.raises(E, match="teacher_weight|teacher_hidden"):
        fastloss.linear_distillation_loss(sh, sw, th, tw[:, :-1])
    with pytest.raises(E, match="student_bias"):
        fastloss.linear_distillation_loss(sh, sw, th, tw, student_bias=sb[:-1])
    with pytest.raises(E, match="teacher_bias"):
        fastloss.linear_distillation_loss(sh, sw, th, tw, teacher_bias=tb[:-1])
    for bad in (0, -2):
        with pytest.raises(E, match="chunk_size"):
            fastloss.linear_distillation_loss(sh, sw, th, tw, chunk_size=bad)
    with pytest.raises(E, match="temperature"):
        fastloss.linear_distillation_loss(sh, sw, th, tw, temperature=0.0)
    with pytest.raises(ValueError, match="beta"):
        fastloss.linear_distillation_loss(sh, sw, th, tw, divergence="jsd", beta=2.0)
    with pytest.raises(ValueError, match="hard_weight|target"):
        fastloss.linear_distillation_loss(sh, sw, th, tw, hard_weight=1.0)
    with pytest.raises(E, match="target"):
        fastloss.linear_distillation_loss(sh, sw, th, tw, target=_target((3,), device=device))


def test_linear_nn_module(device):
    sh, sw, sb, th, tw, tb = _linear((6,), device=device, seed=23)
    tgt = _target((6,), device=device)
    kw = dict(divergence="reverse_kl", temperature=2.0, reduction="mean", hard_weight=0.3)
    m = fastloss.nn.LinearDistillationLoss(chunk_size=4, **kw)
    assert isinstance(m, torch.nn.Module)
    out = m(sh, sw, th, tw, tgt, sb, tb)
    assert rel_err(out, _linear_ref(sh, sw, sb, th, tw, tb, target=tgt, **kw)) <= RTOL64
    out = m(sh, sw, th, tw, target=tgt, student_bias=sb, teacher_bias=tb)
    assert rel_err(out, _linear_ref(sh, sw, sb, th, tw, tb, target=tgt, **kw)) <= RTOL64
    m0 = fastloss.nn.LinearDistillationLoss()
    assert rel_err(m0(sh, sw, th, tw), _linear_ref(sh, sw, None, th, tw, None)) <= RTOL64


# ---------------------------------------------------------------- extra peak memory of the linear version

_MEMORY_SCRIPT = textwrap.dedent(
    """
    import json, sys, torch, fastloss

    def hwm_kib():
        # this process's own peak resident set (VmHWM), not getrusage's (which a child inherits from its parent)
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1])

    which, N, D, V, chunk = sys.argv[1], *map(int, sys.argv[2:6])
    torch.manual_seed(0)
    sh = torch.randn(N, D, requires_grad=True)
    sw = torch.randn(V, D).mul_(0.05).requires_grad_()
    th = torch.randn(N, D)
    tw = torch.randn(V, D).mul_(0.05)
    t = torch.randint(0, V, (N,))
    t[::7] = -100
    sw.grad = torch.zeros_like(sw)  # the gradients' own memory is not "extra"
    sh.grad = torch.zeros_like(sh)
    kw = dict(divergence="jsd", beta=0.3, temperature=2.0, target=t, hard_weight=0.5)
    base = hwm_kib()
    if which == "fastloss":
        loss = fastloss.linear_distillation_loss(sh, sw, th, tw, chunk_size=chunk, **kw)
    else:  # the composite on materialised logits (forward KL; enough to show the logits in the measurement)
        with torch.no_grad():
            lt = torch.log_softmax(th @ tw.T / 2.0, -1)
        ls = torch.log_softmax(sh @ sw.T / 2.0, -1)
        loss = torch.nn.functional.kl_div(ls, lt, log_target=True, reduction="batchmean")
    loss.backward()
    print(json.dumps({"extra_mb": (hwm_kib() - base) / 1024}))
    """
)


def _extra_mb(which, n, d, v, chunk=0):
    out = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT, which, str(n), str(d), str(v), str(chunk)],
                         capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="2"))
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])["extra_mb"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads VmHWM from /proc/self/status")
def test_linear_extra_peak_memory_within_a_few_chunks():
    # fp32 N x V logits = 64 MiB per head here; chunks of 128 tokens = 8 MiB of logits per head. Allowed: the two
    # heads' chunk logits and two more chunk-sized buffers (4 chunks = 32 MiB), a d W accumulator and the fresh d W
    # autograd adds into W.grad (2 x V x D = 8 MiB), and 48 MiB of allocator / interpreter noise (as in
    # test_linear_cross_entropy). The composite on materialised logits needs several times the full logits.
    n, d, v, chunk = 1024, 64, 16384, 128
    chunk_mb = chunk * v * 4 / 2**20
    fl = _extra_mb("fastloss", n, d, v, chunk)
    naive = _extra_mb("naive", n, d, v)
    assert naive > 200, naive  # the measurement sees materialised logits
    assert fl < 4 * chunk_mb + 2 * v * d * 4 / 2**20 + 48, (fl, naive)


def test_opcheck():
    s, t = _pair((5,), v=37, dtype=torch.float32, device="cpu", seed=31)
    tgt = _target((5,), v=37, device="cpu")
    opts = ("jsd", 0.3, 2.0, -100, 0.5)
    torch.library.opcheck(torch.ops.fastloss.distill_fwd.default, (s, t, tgt, *opts))
    torch.library.opcheck(torch.ops.fastloss.distill_fwd.default, (s, t, None, "reverse_kl", 0.5, 1.0, -100, 0.0))
    torch.library.opcheck(torch.ops.fastloss.distill_fwd_grad.default, (s, t, tgt, torch.ones(1, dtype=torch.float64),
                                                                        *opts))
    torch.library.opcheck(torch.ops.fastloss.distill_fwd_inplace_grad.default,
                          (s.clone(), t, tgt, torch.ones(1, dtype=torch.float64), *opts))


def test_float16_gradients_do_not_underflow_before_the_loss_scale():
    # A reduced float16 loss must not store p / N in float16 before a GradScaler's factor multiplies it.
    s, t = _pair((2048,), v=512, dtype=torch.float16, device="cpu", seed=32)
    xs = s.clone().requires_grad_()
    (fastloss.distillation_loss(xs, t) * 32768.0).backward()
    xr = s.double().requires_grad_()
    (ref_loss(xr, t.double()) * 32768.0).backward()
    assert rel_err(xs.grad, xr.grad) <= 2e-3
    assert (xs.grad == 0).float().mean() < 0.01


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_linear_retain_graph_second_backward(reduction):
    g = torch.Generator().manual_seed(33)
    hs = torch.randn(7, 12, generator=g, dtype=torch.float64, requires_grad=True)
    Ws = torch.randn(30, 12, generator=g, dtype=torch.float64, requires_grad=True)
    ht, Wt = torch.randn(7, 9, generator=g, dtype=torch.float64), torch.randn(30, 9, generator=g, dtype=torch.float64)
    loss = fastloss.linear_distillation_loss(hs, Ws, ht, Wt, reduction=reduction, chunk_size=3)
    (g1,) = torch.autograd.grad(loss, hs, retain_graph=True)
    (g2,) = torch.autograd.grad(loss, hs, torch.tensor(3.0, dtype=torch.float64))
    assert rel_err(g2, 3 * g1) <= 1e-12


def test_linear_autocast():
    g = torch.Generator().manual_seed(34)
    hs = torch.randn(6, 16, generator=g, requires_grad=True)
    Ws = torch.randn(40, 16, generator=g, requires_grad=True)
    ht, Wt = torch.randn(6, 8, generator=g), torch.randn(40, 8, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = fastloss.linear_distillation_loss(hs, Ws, ht, Wt, chunk_size=4)
    loss.backward()
    hs64, Ws64 = hs.detach().double().requires_grad_(), Ws.detach().double().requires_grad_()
    ref_loss(hs64 @ Ws64.t(), ht.double() @ Wt.double().t()).backward()
    assert rel_err(loss, ref_loss(hs64 @ Ws64.t(), ht.double() @ Wt.double().t())) <= 1e-5
    assert rel_err(hs.grad, hs64.grad) <= 1e-5 and rel_err(Ws.grad, Ws64.grad) <= 1e-5


# ---------------------------------------------------------------- the student's entropy from the same pass (#21)
#
# return_student_entropy=True: the entropy of softmax(student / T) per token from the distillation kernels' own
# pass (distill_fwd*'s student_entropy: the student's normaliser grows by the entropy accumulator); the loss and its
# gradients must be those without it (the student's m and d are computed by the same expressions: bitwise,
# or within _unchanged's bound).

ETOL32 = 2e-6  # relative error norm of the float32 / bf16 / fp16 kernels' entropy against float64 on the same logits


def _unchanged(a, b):
    """The loss / gradient / statistics with the entropy requested against without it: the student's m and d are
    formed by the same expressions, so they agree bitwise but where the host compiler contracts a multiply-add
    differently in the two instantiations (seen on the double fold of the reverse KL's state: one ulp of the KL).
    Bound: a relative error norm of 4 units of the dtype's rounding."""
    if torch.equal(a, b):
        return True
    eps = torch.finfo(a.dtype).eps if a.dtype == torch.float64 else torch.finfo(torch.float32).eps
    return a.shape == b.shape and rel_err(a, b) <= 4 * eps


def _ref_entropy(s, t, **kw):
    return ref_loss(s, t, return_student_entropy=True, **kw)[1]


def _with_entropy_and_grad(s, t, gout=None, **kw):
    """(loss, entropy, grad) with return_student_entropy=True, and (loss, grad) without it, from equal leaves."""
    xa, xb = s.detach().clone().requires_grad_(), s.detach().clone().requires_grad_()
    out, ent = fastloss.distillation_loss(xa, t, return_student_entropy=True, **kw)
    plain = fastloss.distillation_loss(xb, t, **kw)
    if gout is None:
        gout = _upstream(out.shape, s.device, out.dtype)
    (ga,) = torch.autograd.grad(out, xa, gout)
    (gb,) = torch.autograd.grad(plain, xb, gout)
    return out, ent, ga, plain, gb


@pytest.mark.parametrize("div,beta", DIVS)
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("tgt", ["none", "masked", "masked_hard"])
def test_student_entropy_matches_reference(div, beta, temperature, reduction, tgt, device):
    lead = (3, 5)
    s, t = _pair(lead, device=device, seed=40)
    kw = dict(divergence=div, beta=beta, temperature=temperature, reduction=reduction)
    if tgt == "masked":
        kw.update(target=_target(lead, device=device))
    elif tgt == "masked_hard":
        kw.update(target=_target(lead, device=device, ignore_index=5), ignore_index=5, hard_weight=0.7)
    out, ent, ga, plain, gb = _with_entropy_and_grad(s, t, **kw)
    ref_out, ref_ent = ref_loss(s, t, return_student_entropy=True, **kw)
    assert ent.shape == lead and ent.dtype == torch.float64 and not ent.requires_grad
    assert rel_err(ent, ref_ent) <= RTOL64, (ent, ref_ent)
    assert rel_err(out, ref_out) <= RTOL64
    if tgt != "none":  # 0 at ignored tokens, and positive elsewhere
        valid = kw["target"] != kw.get("ignore_index", -100)
        assert (ent[~valid] == 0).all() and (ent[valid] > 0).all()
    # the loss and its gradient: those without the entropy
    assert _unchanged(out, plain) and _unchanged(ga, gb)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("div,beta", DIVS3)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_student_entropy_low_precision(dtype, div, beta, reduction, device):
    lead = (24,)
    s, t = _pair(lead, v=1000, dtype=dtype, device=device, seed=41)
    tgt = _target(lead, v=1000, device=device)
    kw = dict(divergence=div, beta=beta, temperature=1.5, target=tgt, reduction=reduction)
    out, ent, ga, plain, gb = _with_entropy_and_grad(s, t, **kw)
    assert ent.dtype == torch.float32 and ent.shape == lead
    # against float64 on the same rounded logits: only the float32 accumulation differs
    assert rel_err(ent, _ref_entropy(s.double(), t.double(), **kw)) <= ETOL32
    assert _unchanged(out, plain) and _unchanged(ga, gb)


@pytest.mark.parametrize("v", [1, 7, 37, 1001, 4099])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("div,beta", DIVS3)
def test_student_entropy_vocabulary_sizes(v, dtype, div, beta, device):
    lead = (6,)
    s, t = _pair(lead, v=v, dtype=dtype, device=device, seed=42, scale=3.0)
    kw = dict(divergence=div, beta=beta, temperature=0.7, reduction="none")
    out, ent = fastloss.distillation_loss(s, t, return_student_entropy=True, **kw)
    assert _unchanged(out, fastloss.distillation_loss(s, t, **kw))
    if v == 1:  # one class: p = 1, entropy 0
        assert ent.abs().max() <= 1e-7
        return
    assert rel_err(ent, _ref_entropy(s.double(), t.double(), **kw)) <= (RTOL64 if dtype == torch.float64 else ETOL32)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("div,beta", DIVS3)
def test_student_entropy_masked_vocabulary(dtype, div, beta, device):
    """-inf student logits count 0 in -sum p log p; a row with one finite logit has entropy 0; -inf at the same
    positions in both (a masked vocabulary) for the divergence to stay finite."""
    v = 1001
    s, t = _pair((5,), v=v, device="cpu", seed=43, scale=3.0)
    for x in (s, t):
        x[0, 500:] = -math.inf
        x[1, :] = -math.inf
        x[1, 777] = 2.5  # all but one
        x[2, 1:] = -math.inf  # all but the first
        x[3, : v - 1] = -math.inf  # all but the last
        x[4, ::3] = -math.inf
    s, t = s.to(dtype).to(device), t.to(dtype).to(device)
    kw = dict(divergence=div, beta=beta, temperature=0.8, reduction="none")
    s_req = s.clone().requires_grad_()
    out, ent = fastloss.distillation_loss(s_req, t, return_student_entropy=True, **kw)
    ref = _ref_entropy(s, t, **kw)
    assert torch.isfinite(ent).all()
    assert rel_err(ent, ref) <= (RTOL64 if dtype == torch.float64 else ETOL32)
    assert ent[1:4].abs().max() <= 1e-12
    assert _unchanged(out, fastloss.distillation_loss(s, t, **kw))


@pytest.mark.parametrize("lead", [(0,), (2, 0)])
@pytest.mark.parametrize("with_target", [False, True])
def test_student_entropy_empty_batch(lead, with_target, device):
    s, t = _pair(lead, device=device)
    x = s.clone().requires_grad_()
    tgt = torch.empty(lead, dtype=torch.long, device=device) if with_target else None
    for reduction in REDUCTIONS:
        out, ent = fastloss.distillation_loss(x, t, target=tgt, reduction=reduction, return_student_entropy=True)
        assert ent.shape == lead and ent.dtype == torch.float64
    sh, sw, sb, th, tw, tb = _linear(lead, device=device)
    lo, le = fastloss.linear_distillation_loss(sh, sw, th, tw, student_bias=sb, teacher_bias=tb, target=tgt,
                                               reduction="sum", return_student_entropy=True)
    assert le.shape == lead and float(lo.detach()) == 0.0


@pytest.mark.parametrize("div,beta", DIVS3)
@pytest.mark.parametrize("which", ["distill_fwd", "distill_fwd_grad", "distill_fwd_inplace_grad"])
def test_student_entropy_op_column(div, beta, which, device):
    """stats[:, 4]: the entropy with student_entropy=True, 0 without it, 0 for ignored rows; columns 0-3 and the
    loss (and gradient) the same either way."""
    s, t = _pair((9,), v=300, dtype=torch.float32, device=device, seed=44)
    tgt = _target((9,), v=300, device=device)
    opts = (div, beta, 1.3, -100, 0.4)
    ops = torch.ops.fastloss
    one = torch.ones(1, dtype=torch.float64, device=device)

    def call(ent):
        if which == "distill_fwd":
            return ops.distill_fwd(s, t, tgt, *opts, ent)
        if which == "distill_fwd_grad":
            return ops.distill_fwd_grad(s, t, tgt, one, *opts, student_entropy=ent)
        buf = s.clone()
        return (*ops.distill_fwd_inplace_grad(buf, t, tgt, one, *opts, ent), buf)

    on, off = call(True), call(False)
    assert on[1].shape == off[1].shape == (9, 5) and on[1].dtype == torch.float64
    assert (off[1][:, 4] == 0).all()
    valid = tgt != -100
    assert (on[1][~valid, 4] == 0).all() and (on[1][valid, 4] > 0).all()
    ref = _ref_entropy(s.double(), t.double(), divergence=div, beta=beta, temperature=1.3, target=tgt,
                       reduction="none")
    assert rel_err(on[1][:, 4], ref) <= ETOL32
    assert _unchanged(on[0], off[0]) and _unchanged(on[1][:, :4], off[1][:, :4])
    for a, b in zip(on[2:], off[2:]):
        assert _unchanged(a, b)
    # the default (no argument) is the kernels without the entropy
    assert torch.equal(ops.distill_fwd(s, t, tgt, *opts)[1], off[1])


@pytest.mark.parametrize("chunk", [3, 5, "auto"])
@pytest.mark.parametrize("div,beta", DIVS3)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_linear_student_entropy_matches_logits_version(chunk, div, beta, reduction, device):
    lead = (10,)
    sh, sw, sb, th, tw, tb = _linear(lead, v=1001, device=device, seed=45)
    tgt = _target(lead, v=1001, device=device)
    kw = dict(divergence=div, beta=beta, temperature=1.5, target=tgt, reduction=reduction, hard_weight=0.5)
    out, ent = fastloss.linear_distillation_loss(sh, sw, th, tw, student_bias=sb, teacher_bias=tb, chunk_size=chunk,
                                                 return_student_entropy=True, **kw)
    plain = fastloss.linear_distillation_loss(sh, sw, th, tw, student_bias=sb, teacher_bias=tb, chunk_size=chunk,
                                              **kw)
    assert ent.shape == lead and ent.dtype == torch.float64 and not ent.requires_grad
    ref_out, ref_ent = _linear_ref(sh, sw, sb, th, tw, tb, return_student_entropy=True, **kw)
    assert rel_err(ent, ref_ent) <= RTOL64 and (ent[tgt == -100] == 0).all()
    assert rel_err(out, ref_out) <= RTOL64
    # the logits version on materialised logits
    _, lent = fastloss.distillation_loss(F.linear(sh, sw, sb), F.linear(th, tw, tb), return_student_entropy=True,
                                         **kw)
    assert rel_err(ent, lent) <= RTOL64
    # the loss and the gradients: those without the entropy
    assert _unchanged(out, plain)
    params = _student_params(sh, sw, sb)
    gout = _upstream(out.shape, device)
    for a, b in zip(torch.autograd.grad(out, params, gout), torch.autograd.grad(plain, params, gout)):
        assert _unchanged(a, b)


def test_linear_student_entropy_bf16_and_no_grad(device):
    lead = (32,)
    sh, sw, sb, th, tw, tb = _linear(lead, v=300, dtype=torch.bfloat16, device=device, seed=46)
    kw = dict(divergence="jsd", beta=0.3, temperature=1.5, reduction="mean")
    out, ent = fastloss.linear_distillation_loss(sh, sw, th, tw, student_bias=sb, teacher_bias=tb, chunk_size=7,
                                                 return_student_entropy=True, **kw)
    assert ent.dtype == torch.float32 and ent.shape == lead and out.dtype == torch.bfloat16
    with torch.no_grad():
        _, lent = fastloss.distillation_loss(F.linear(sh, sw, sb), F.linear(th, tw, tb), return_student_entropy=True,
                                             **kw)
    # the chunks' GEMMs may run in another compute dtype than bf16 F.linear (float32 on the CPU): within bf16 rounding
    assert rel_err(ent, lent) <= 5e-3
    r = [p.detach().double() for p in (sh, sw, sb, th, tw, tb)]
    assert rel_err(ent, _linear_ref(*r, return_student_entropy=True, **kw)[1]) <= 2e-2
    with torch.no_grad():
        out2, ent2 = fastloss.linear_distillation_loss(sh, sw, th, tw, student_bias=sb, teacher_bias=tb,
                                                       chunk_size=7, return_student_entropy=True, **kw)
    assert torch.equal(ent, ent2) and torch.equal(out, out2)


def test_student_entropy_detects_a_wrong_column():
    """The tests above can fail: the teacher's entropy (a plausible mix-up of the accumulator's state) is far from
    the student's."""
    s, t = _pair((8,), v=300, device="cpu", seed=47)
    _, ent = fastloss.distillation_loss(s, t, divergence="forward_kl", reduction="none", return_student_entropy=True)
    teacher_ent = _ref_entropy(t, s, divergence="forward_kl", reduction="none")
    assert rel_err(ent, teacher_ent) > 1e-2


def test_student_entropy_opcheck():
    s, t = _pair((5,), v=37, dtype=torch.float32, device="cpu", seed=48)
    tgt = _target((5,), v=37, device="cpu")
    opts = ("jsd", 0.3, 2.0, -100, 0.5, True)
    one = torch.ones(1, dtype=torch.float64)
    torch.library.opcheck(torch.ops.fastloss.distill_fwd.default, (s, t, tgt, *opts))
    torch.library.opcheck(torch.ops.fastloss.distill_fwd_grad.default, (s, t, tgt, one, *opts))
    torch.library.opcheck(torch.ops.fastloss.distill_fwd_inplace_grad.default, (s.clone(), t, tgt, one, *opts))


def test_student_entropy_torch_compile_fullgraph(device):
    def f(s, t):
        loss, ent = fastloss.distillation_loss(s, t, divergence="jsd", beta=0.3, temperature=1.5,
                                               return_student_entropy=True)
        return loss, ent

    s, t = _pair((8,), v=300, dtype=torch.float32, device=device, seed=49)
    xa, xb = s.clone().requires_grad_(), s.clone().requires_grad_()
    a = compiled_or_skip(f, xa, t)
    b = f(xb, t)
    a[0].backward()
    b[0].backward()
    assert torch.allclose(a[0], b[0], rtol=1e-6) and torch.allclose(a[1], b[1], rtol=1e-6)
    assert torch.allclose(xa.grad, xb.grad, rtol=1e-5, atol=1e-8)


# ---------------------------------------------------------------- linear version: softcapped heads


@pytest.mark.parametrize("chunk", [3, "auto"])
@pytest.mark.parametrize("div,beta", DIVS3)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("caps", [(1.5, None), (None, 2.0), (1.5, 2.0)])
def test_linear_softcap_matches_reference(chunk, div, beta, reduction, caps, device):
    """student_softcap / teacher_softcap: c tanh(logits / c) of each head before the temperature (Gemma's head,
    TRL's chunked divergence), loss, student entropy and gradients against the float64 reference of the capped
    logits, the hard-label term on the capped student."""
    lead = (10,)
    sh, sw, sb, th, tw, tb = _linear(lead, device=device, seed=31)
    sh = (sh.detach() * 3).requires_grad_()  # logits across several caps: tanh bends them
    tgt = _target(lead, device=device)
    kw = dict(divergence=div, beta=beta, temperature=1.2, target=tgt, reduction=reduction, hard_weight=0.5)
    out, ent = fastloss.linear_distillation_loss(sh, sw, th, tw, student_bias=sb, teacher_bias=tb, chunk_size=chunk,
                                                 student_softcap=caps[0], teacher_softcap=caps[1],
                                                 return_student_entropy=True, **kw)
    cap = lambda x, c: x if c is None else c * torch.tanh(x / c)  # noqa: E731
    s_logits = cap(F.linear(sh.double(), sw.double(), sb.double()), caps[0])
    t_logits = cap(F.linear(th.double(), tw.double(), tb.double()), caps[1])
    ref = ref_loss(s_logits, t_logits, **kw)
    assert rel_err(out, ref) <= RTOL64
    _, ref_ent = fastloss.distillation_loss(s_logits.detach(), t_logits, return_student_entropy=True, **kw)
    assert rel_err(ent, ref_ent) <= RTOL64
    params = (sh, sw, sb)
    gout = _upstream(ref.shape, device)
    for a, b in zip(torch.autograd.grad(out, params, gout), torch.autograd.grad(ref, params, gout)):
        assert rel_err(a, b) <= GTOL64
    plain = fastloss.linear_distillation_loss(sh, sw, th, tw, student_bias=sb, teacher_bias=tb, **kw)
    assert rel_err(plain, ref) > 1e-4  # the caps change the loss


def test_linear_softcap_bad_values(device):
    sh, sw, sb, th, tw, tb = _linear((4,), device=device)
    for name in ("student_softcap", "teacher_softcap"):
        for bad in (0.0, -2.0, math.inf, math.nan, True):
            with pytest.raises(ValueError, match=f"`{name}` must be a finite value > 0"):
                fastloss.linear_distillation_loss(sh, sw, th, tw, **{name: bad})

"""fastloss.linear_cross_entropy against cross_entropy(linear(...)) unchunked, in float64 and bf16."""

import itertools
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from conftest import rel_err

import fastloss

D, V = 8, 37


def _inputs(lead, dtype=torch.float64, device="cpu", bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(lead + (D,), generator=g, dtype=torch.float64)
    W = torch.randn(V, D, generator=g, dtype=torch.float64) * 0.7
    b = torch.randn(V, generator=g, dtype=torch.float64) if bias else None
    cast = lambda x: None if x is None else x.to(dtype).to(device).requires_grad_()  # noqa: E731
    return cast(h), cast(W), cast(b)


def _index_target(lead, device, ignore_index=-100, seed=1):
    t = torch.randint(0, V, lead, generator=torch.Generator().manual_seed(seed))
    flat = t.view(-1)
    flat[:: 5] = ignore_index
    return t.to(device)


def _reference(h, W, b, t, **kw):
    return F.cross_entropy(F.linear(h, W, b).movedim(-1, 1) if h.dim() > 2 else F.linear(h, W, b), t, **kw)


CASES = list(itertools.product([1, 4, 6, 50, "auto"], ["mean", "sum", "none"], [0.0, 0.1], [False, True],
                               [(13,), (3, 5)]))


@pytest.mark.parametrize("chunk,reduction,smoothing,weighted,lead", CASES)
def test_matches_unchunked_float64(chunk, reduction, smoothing, weighted, lead, device):
    h, W, b = _inputs(lead, device=device)
    t = _index_target(lead, device)
    w = torch.rand(V, dtype=torch.float64, generator=torch.Generator().manual_seed(2)).to(device) if weighted else None
    kw = dict(weight=w, reduction=reduction, label_smoothing=smoothing)
    out = fastloss.linear_cross_entropy(h, W, t, linear_bias=b, chunk_size=chunk, **kw)
    ref = _reference(h, W, b, t, **kw)
    assert out.shape == ref.shape
    assert torch.allclose(out, ref, rtol=1e-12, atol=1e-12)
    g = torch.rand(ref.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3)).to(device)
    ga = torch.autograd.grad(out, (h, W, b), g)
    gr = torch.autograd.grad(ref, (h, W, b), g)
    for x, y in zip(ga, gr):
        assert torch.allclose(x, y, rtol=1e-11, atol=1e-13)


@pytest.mark.parametrize("chunk", [3, "auto"])
def test_extras_softcap_z_loss_ignore_inside_range(chunk, device):
    h, W, b = _inputs((11,), device=device, seed=4)
    t = _index_target((11,), device, ignore_index=2)
    s, z = 3.0, 1e-2
    out = fastloss.linear_cross_entropy(h, W, t, linear_bias=b, ignore_index=2, softcap=s, z_loss=z,
                                        chunk_size=chunk, return_z_loss=True, return_lse=True)
    logits = s * torch.tanh(F.linear(h, W, b) / s)
    lse = torch.logsumexp(logits, -1)
    valid = t != 2
    zr = z * (lse**2 * valid).sum() / valid.sum()
    ref = F.cross_entropy(logits, t, ignore_index=2) + zr
    assert torch.allclose(out.loss, ref, rtol=1e-12)
    assert torch.allclose(out.z_loss, zr, rtol=1e-12)
    assert torch.allclose(out.lse[valid], lse[valid], rtol=1e-12)
    ga = torch.autograd.grad(out.loss, (h, W, b))
    gr = torch.autograd.grad(ref, (h, W, b))
    for x, y in zip(ga, gr):
        assert torch.allclose(x, y, rtol=1e-11, atol=1e-13)


def test_probability_targets(device):
    h, W, b = _inputs((9,), device=device, seed=5)
    p = torch.softmax(torch.randn(9, V, dtype=torch.float64), -1).to(device)
    w = torch.rand(V, dtype=torch.float64).to(device)
    out = fastloss.linear_cross_entropy(h, W, p, linear_bias=b, weight=w, label_smoothing=0.2, chunk_size=4)
    ref = F.cross_entropy(F.linear(h, W, b), p, weight=w, label_smoothing=0.2)
    assert torch.allclose(out, ref, rtol=1e-12)
    for x, y in zip(torch.autograd.grad(out, (h, W, b)), torch.autograd.grad(ref, (h, W, b))):
        assert torch.allclose(x, y, rtol=1e-11, atol=1e-13)


def test_frozen_parts_and_no_grad(device):
    h, W, b = _inputs((7,), device=device, bias=False)
    t = _index_target((7,), device)
    W.requires_grad_(False)
    out = fastloss.linear_cross_entropy(h, W, t, chunk_size=2)
    (gh,) = torch.autograd.grad(out, h)
    (gr,) = torch.autograd.grad(_reference(h, W, None, t), h)
    assert torch.allclose(gh, gr, rtol=1e-11)
    with torch.no_grad():
        assert torch.allclose(fastloss.linear_cross_entropy(h, W, t), _reference(h, W, None, t), rtol=1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_low_precision_error_no_worse_than_unchunked(dtype, device):
    lead = (96,)
    g = torch.Generator().manual_seed(6)
    h64 = torch.randn(lead + (64,), generator=g, dtype=torch.float64)
    W64 = torch.randn(500, 64, generator=g, dtype=torch.float64) * 0.3
    t = torch.randint(0, 500, lead, generator=g).to(device)
    hq, Wq = h64.to(dtype), W64.to(dtype)
    # float64 reference on the same rounded inputs
    hr, Wr = hq.double().to(device).requires_grad_(), Wq.double().to(device).requires_grad_()
    ref = F.cross_entropy(F.linear(hr, Wr), t, label_smoothing=0.1)
    ref_g = torch.autograd.grad(ref, (hr, Wr))
    errs = {}
    for name in ("fastloss", "torch"):
        hi, Wi = hq.to(device).requires_grad_(), Wq.to(device).requires_grad_()
        if name == "fastloss":
            out = fastloss.linear_cross_entropy(hi, Wi, t, label_smoothing=0.1, chunk_size=32)
        else:
            out = F.cross_entropy(F.linear(hi, Wi), t, label_smoothing=0.1)
        gi = torch.autograd.grad(out, (hi, Wi))
        errs[name] = [rel_err(out.reshape(1), ref.reshape(1))] + [rel_err(a, b) for a, b in zip(gi, ref_g)]
    slack = torch.finfo(dtype).eps * (4 if dtype == torch.float32 else 1)
    for a, b in zip(errs["fastloss"], errs["torch"]):
        assert a <= b + slack, errs


def _peaked(n=64, d=16, v=300, dtype=torch.float64, device="cpu"):
    """Logits with a peaked softmax, as a trained LM head gives: each token's hidden state points at a few
    vocabulary rows (plus noise), so most columns of a chunk's softmax are far below 2^-12."""
    g = torch.Generator().manual_seed(11)
    W = torch.randn(v, d, generator=g, dtype=torch.float64)
    W = W / W.norm(dim=1, keepdim=True) * 4
    src = torch.randint(0, 8, (n,), generator=g)  # tokens only ever point at the first 8 rows
    h = W[src] + 0.3 * torch.randn(n, d, generator=g, dtype=torch.float64)
    t = src.clone()
    t[::7] = -100
    return h.to(dtype).to(device).requires_grad_(), W.to(dtype).to(device).requires_grad_(), t.to(device)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_gradient_filtering_error_within_bound(reduction, device, monkeypatch):
    import fastloss._linear_ce as lce

    kept = []
    real = lce._kept_columns

    def spy(g, scale, eps):
        k = real(g, scale, eps)
        kept.append(g.shape[1] if k is None else k.numel())
        return k

    monkeypatch.setattr(lce, "_kept_columns", spy)
    h, W, t = _peaked(device=device)
    b = torch.zeros(W.shape[0], dtype=torch.float64, device=device, requires_grad=True)
    eps = 2.0 ** -12
    out = {}
    for fe in (None, eps):
        loss = fastloss.linear_cross_entropy(h, W, t, linear_bias=b, reduction=reduction, chunk_size=16,
                                            filter_eps=fe)
        upstream = torch.ones_like(loss) if reduction != "none" else torch.linspace(0.5, 2, loss.numel(),
                                                                                   dtype=loss.dtype, device=device)
        out[fe] = (loss.detach(),) + torch.autograd.grad(loss, (h, W, b), upstream)
    # Filtering only touches the backward, and it really dropped columns.
    assert torch.equal(out[None][0], out[eps][0])
    assert kept and max(kept) < W.shape[0] // 2, kept
    # Each dropped entry of d loss / d logits is below eps * s (s: largest incoming per-token factor), so
    # |d h error| <= eps * s * sum_j |W_j| and |d W error| <= eps * s * sum_i |h_i| (and eps * s * n for d b).
    valid = (t != -100).sum().item()
    s = {"mean": 1 / valid, "sum": 1.0, "none": 2.0}[reduction]
    bound_h = eps * s * W.detach().abs().sum(0)
    bound_w = eps * s * h.detach().abs().sum(0)
    _, gh0, gW0, gb0 = out[None]
    _, gh1, gW1, gb1 = out[eps]
    assert ((gh1 - gh0).abs() <= bound_h).all()
    assert ((gW1 - gW0).abs() <= bound_w).all()
    assert ((gb1 - gb0).abs() <= eps * s * h.shape[0]).all()
    assert not torch.equal(gW0, gW1)  # something was really dropped (exact would need no bound)


def test_gradient_filtering_bf16_auto_and_nan(device):
    h64, W64, t = _peaked(device=device)
    ref_g = torch.autograd.grad(fastloss.linear_cross_entropy(h64, W64, t), (h64, W64))
    hq, Wq = h64.detach().bfloat16().requires_grad_(), W64.detach().bfloat16().requires_grad_()
    errs = {}
    for fe in (None, "auto"):
        g = torch.autograd.grad(fastloss.linear_cross_entropy(hq, Wq, t, chunk_size=16, filter_eps=fe), (hq, Wq))
        errs[fe] = [rel_err(a, r.to(a.dtype)) for a, r in zip(g, ref_g)]
    tg = torch.autograd.grad(F.cross_entropy(F.linear(hq, Wq).float(), t), (hq, Wq))
    torch_errs = [rel_err(a, r.to(a.dtype)) for a, r in zip(tg, ref_g)]
    for a, b in zip(errs["auto"], torch_errs):
        assert a <= b + 2.0 ** -8, (errs, torch_errs)
    # A NaN in the input is never filtered away into a zero.
    hn = h64.detach().clone()
    hn[3, 0] = float("nan")
    hn.requires_grad_()
    gW = torch.autograd.grad(fastloss.linear_cross_entropy(hn, W64, t, chunk_size=16, filter_eps=0.5), W64)[0]
    assert gW.isnan().any()
    with pytest.raises(ValueError, match="filter_eps"):
        fastloss.linear_cross_entropy(h64, W64, t, filter_eps=-1.0)
    with pytest.raises(ValueError, match="filter_eps"):
        fastloss.linear_cross_entropy(h64, W64, t, filter_eps="fast")


def test_bad_input(device):
    h, W, b = _inputs((4,), device=device)
    t = _index_target((4,), device)
    with pytest.raises(ValueError, match="linear_weight"):
        fastloss.linear_cross_entropy(h, W[:, :3], t)
    with pytest.raises(ValueError, match="linear_bias"):
        fastloss.linear_cross_entropy(h, W, t, linear_bias=b[:3])
    with pytest.raises(ValueError, match="target"):
        fastloss.linear_cross_entropy(h, W, t[:2])
    with pytest.raises(ValueError, match="chunk_size"):
        fastloss.linear_cross_entropy(h, W, t, chunk_size=0)
    with pytest.raises(ValueError, match="dtype"):
        fastloss.linear_cross_entropy(h.float(), W, t)


def test_nn_module(device):
    h, W, b = _inputs((6,), device=device)
    t = _index_target((6,), device)
    m = fastloss.nn.LinearCrossEntropyLoss(label_smoothing=0.1, chunk_size=4)
    assert torch.allclose(m(h, W, t, b), _reference(h, W, b, t, label_smoothing=0.1), rtol=1e-12)


_MEMORY_SCRIPT = textwrap.dedent(
    """
    import json, sys, torch, fastloss, fastloss._linear_ce

    def hwm_kib():
        # VmHWM belongs to this process's own address space. (getrusage's ru_maxrss does not: a child inherits
        # its parent's peak, so under a pytest that just ran the 13 GB slow tests every reading was 13 GB.)
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1])

    which, N, D, V, budget = sys.argv[1], *map(int, sys.argv[2:6])
    if budget:
        fastloss._linear_ce.CHUNK_BUDGET_BYTES["cpu"] = budget << 20
    torch.manual_seed(0)
    h = torch.randn(N, D, requires_grad=True)
    W = torch.randn(V, D).mul_(0.05).requires_grad_()
    t = torch.randint(0, V, (N,))
    W.grad = torch.zeros_like(W)  # the gradients' own memory is not "extra"
    h.grad = torch.zeros_like(h)
    base = hwm_kib()
    if which == "fastloss":
        loss = fastloss.linear_cross_entropy(h, W, t)
    else:
        loss = torch.nn.functional.cross_entropy(h @ W.T, t)
    loss.backward()
    print(json.dumps({"extra_mb": (hwm_kib() - base) / 1024}))
    """
)


def _extra_mb(which, n, d, v, budget_mib=0):
    out = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT, which, str(n), str(d), str(v), str(budget_mib)],
                         capture_output=True, text=True, check=True, env=dict(os.environ, OMP_NUM_THREADS="2"))
    return json.loads(out.stdout.strip().splitlines()[-1])["extra_mb"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads VmHWM from /proc/self/status")
def test_cpu_extra_peak_memory_within_budget():
    # N x V logits = 256 MiB here; with a 64 MiB budget fastloss's extra peak is one 64 MiB chunk of logits plus
    # the fresh d W that autograd adds into W.grad (32 MiB).
    fl = _extra_mb("fastloss", 2048, 256, 32768, budget_mib=64)
    naive = _extra_mb("naive", 2048, 256, 32768)
    assert naive > 400, naive  # the test can see a materialised logits tensor
    assert fl < 64 + 32 + 48, (fl, naive)
    # The default budget on a 1 GiB-logits problem: one chunk of logits + the fresh d W (16 MiB).
    budget = fastloss._linear_ce.CHUNK_BUDGET_BYTES["cpu"] >> 20
    fl = _extra_mb("fastloss", 4096, 64, 65536)
    assert fl < budget + 16 + 48, (fl, budget)


@pytest.mark.parametrize("supported", [None, False])
def test_float32_accumulation_of_bf16_products(supported, monkeypatch):
    """d W accumulates bf16 chunk products in float32: through addmm(out_dtype=) where this torch and device take
    it (probed once), else through a float32 mm + add_ (forced here: older torch rejects out_dtype)."""
    from fastloss import _linear_ce

    monkeypatch.setattr(_linear_ce, "_ADDMM_OUT_DTYPE", {})
    g = torch.Generator().manual_seed(0)
    a = torch.randn(37, 300, generator=g).bfloat16()
    b = torch.randn(300, 19, generator=g).bfloat16()
    acc = torch.randn(37, 19, generator=g)
    if supported is not None:
        _linear_ce._ADDMM_OUT_DTYPE[("cpu", torch.bfloat16, torch.float32)] = supported
    expected = acc.double() + a.double() @ b.double()
    _linear_ce._addmm_acc(acc, a, b)
    assert isinstance(_linear_ce._ADDMM_OUT_DTYPE[("cpu", torch.bfloat16, torch.float32)], bool)
    assert acc.dtype == torch.float32
    assert rel_err(acc.double(), expected) <= 1e-6  # float32 accumulation, no bf16 rounding of the product

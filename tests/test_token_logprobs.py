"""fastloss.token_logprobs / linear_token_logprobs (issue #14: the per-token log-probability of the sampled token
and the entropy of the tempered softmax, as PPO / GRPO use them) against the plain float64 PyTorch reference
(fastloss.reference.token_logprobs_reference): values, gradients with upstream gradients on either or both
outputs, gradcheck, -inf logits, peaked and flat rows, low precision, odd vocabulary sizes, empty batches, the
chunked linear version against the logits version on materialised logits. Issue #21: the per-token statistics of
return_stats=True (log sum p^2, the mean tempered logit, the argmax) from the same pass."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import compiled_or_skip, TOL, rel_err

import fastloss
from fastloss.reference import token_logprobs_reference as ref_lp

V = 37
RTOL64 = 1e-10
GTOL64 = 1e-9


def _logits(lead, v=V, dtype=torch.float64, device="cpu", seed=0, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(lead + (v,), generator=g, dtype=torch.float64) * scale).to(dtype).to(device)


def _tokens(lead, v=V, device="cpu", seed=1):
    return torch.randint(0, v, lead, generator=torch.Generator().manual_seed(seed)).to(device)


def _weights(shape, device, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64)).to(device)


def _objective(lp, ent, a, b, which):
    """A scalar with upstream gradient a on the log-probs and / or b on the entropy."""
    out = 0
    if which in ("logprobs", "both"):
        out = out + (lp.double() * a).sum()
    if which in ("entropy", "both"):
        out = out + (ent.double() * b).sum()
    return out


def _both(fn, x, tok, **kw):
    out = fn(x, tok, return_entropy=True, **kw)
    lp, ent = out  # unpacks as a pair
    return lp, ent


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("lead", [(13,), (2, 5)])
@pytest.mark.parametrize("which", ["logprobs", "entropy", "both"])
def test_matches_reference_float64(temperature, lead, which, device):
    x = _logits(lead, device=device)
    tok = _tokens(lead, device=device)
    xa, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    out = fastloss.token_logprobs(xa, tok, temperature=temperature, return_entropy=True)
    assert isinstance(out, fastloss.TokenLogprobs)
    lp, ent = out.logprobs, out.entropy
    rlp, rent = ref_lp(xr, tok, temperature=temperature, return_entropy=True)
    assert lp.shape == ent.shape == tok.shape and lp.dtype == ent.dtype == torch.float64
    assert rel_err(lp, rlp) <= RTOL64 and rel_err(ent, rent) <= RTOL64
    a, b = _weights(lead, device, 2), _weights(lead, device, 3)
    (g,) = torch.autograd.grad(_objective(lp, ent, a, b, which), xa)
    (gr,) = torch.autograd.grad(_objective(rlp, rent, a, b, which), xr)
    assert rel_err(g, gr) <= GTOL64
    # without the entropy: a plain tensor, the same log-probs and gradient
    xb, xr2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    lp2 = fastloss.token_logprobs(xb, tok, temperature=temperature)
    rlp2 = ref_lp(xr2, tok, temperature=temperature)
    assert isinstance(lp2, torch.Tensor) and not isinstance(lp2, tuple)
    assert lp2.shape == tok.shape and lp2.dtype == torch.float64
    assert rel_err(lp2, rlp2) <= RTOL64
    assert rel_err(torch.autograd.grad(lp2, xb, a)[0], torch.autograd.grad(rlp2, xr2, a)[0]) <= GTOL64


def test_known_values(device):
    # logprob = log softmax, entropy = the Categorical's
    x = _logits((6,), device=device, seed=4)
    tok = _tokens((6,), device=device)
    lp, ent = _both(fastloss.token_logprobs, x, tok, temperature=1.3)
    assert torch.allclose(lp, -F.cross_entropy(x / 1.3, tok, reduction="none"), rtol=1e-12)
    assert torch.allclose(ent, torch.distributions.Categorical(logits=x / 1.3).entropy(), rtol=1e-12)


@pytest.mark.parametrize("temperature", [0.7, 1.0])
def test_gradcheck(temperature, device):
    x = _logits((4,), v=7, device=device, seed=5).requires_grad_()
    tok = torch.tensor([0, 6, 3, 3], device=device)
    assert torch.autograd.gradcheck(
        lambda v: tuple(fastloss.token_logprobs(v, tok, temperature=temperature, return_entropy=True)), (x,))
    assert torch.autograd.gradcheck(lambda v: fastloss.token_logprobs(v, tok, temperature=temperature), (x,))
    x3 = _logits((2, 3), v=5, device=device, seed=6).requires_grad_()
    tok3 = _tokens((2, 3), v=5, device=device)
    assert torch.autograd.gradcheck(lambda v: fastloss.token_logprobs(v, tok3, return_entropy=True).entropy, (x3,))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_low_precision_within_bounds(dtype, device):
    """Outputs in float32 (accumulation in float32) against the float64 reference of the same rounded logits;
    the gradient in the logits' dtype."""
    lead = (48,)
    x = _logits(lead, v=1000, dtype=dtype, device=device, seed=7, scale=3.0)
    tok = _tokens(lead, v=1000, device=device)
    xa = x.clone().requires_grad_()
    xr = x.double().requires_grad_()
    lp, ent = _both(fastloss.token_logprobs, xa, tok, temperature=1.5)
    rlp, rent = ref_lp(xr, tok, temperature=1.5, return_entropy=True)
    assert lp.dtype == ent.dtype == torch.float32
    assert rel_err(lp, rlp) <= 1e-5 and rel_err(ent, rent) <= 1e-5
    a, b = _weights(lead, device, 2), _weights(lead, device, 3)
    (g,) = torch.autograd.grad(_objective(lp, ent, a, b, "both"), xa)
    (gr,) = torch.autograd.grad(_objective(rlp, rent, a, b, "both"), xr)
    assert g.dtype == dtype
    tol = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: TOL[torch.bfloat16]}[dtype]
    assert rel_err(g, gr) <= tol


def test_masked_vocabulary(device):
    """-inf logits: 0 log 0 = 0 in the entropy (finite, and a zero gradient there, not 0 * inf = nan); a token on
    a -inf logit has log-probability -inf."""
    x = _logits((5,), v=V + 6, device="cpu", seed=8, scale=3.0)
    x[:, V:] = -math.inf
    x[3, :10] = -math.inf
    x = x.to(device)
    tok = _tokens((5,), device=device)
    tok[3] = 12  # a finite entry of the partly masked row
    xa, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    lp, ent = _both(fastloss.token_logprobs, xa, tok, temperature=0.8)
    rlp, rent = ref_lp(xr, tok, temperature=0.8, return_entropy=True)
    assert lp.isfinite().all() and ent.isfinite().all()
    assert rel_err(lp, rlp) <= RTOL64 and rel_err(ent, rent) <= RTOL64
    a, b = _weights((5,), device, 2), _weights((5,), device, 3)
    (g,) = torch.autograd.grad(_objective(lp, ent, a, b, "both"), xa)
    (gr,) = torch.autograd.grad(_objective(rlp, rent, a, b, "both"), xr)
    assert g.isfinite().all() and rel_err(g, gr) <= GTOL64
    assert torch.equal(g[:, V:], torch.zeros_like(g[:, V:])) and torch.equal(g[3, :10], torch.zeros_like(g[3, :10]))
    # the masked columns change nothing
    lp_cut, ent_cut = _both(fastloss.token_logprobs, x[[0, 1, 2, 4], :V], tok[[0, 1, 2, 4]], temperature=0.8)
    assert rel_err(lp[[0, 1, 2, 4]], lp_cut) <= RTOL64 and rel_err(ent[[0, 1, 2, 4]], ent_cut) <= RTOL64
    # a token sitting on a -inf logit
    tok2 = tok.clone()
    tok2[0] = V + 2
    lp2, ent2 = _both(fastloss.token_logprobs, x, tok2)
    assert lp2[0].item() == -math.inf and lp2[1:].isfinite().all() and ent2.isfinite().all()
    # the entropy alone is differentiable there
    xe = x.clone().requires_grad_()
    (ge,) = torch.autograd.grad(fastloss.token_logprobs(xe, tok2, return_entropy=True).entropy.sum(), xe)
    assert ge.isfinite().all()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_peaked_and_flat(dtype, device):
    v = 300
    peaked = _logits((4,), v=v, dtype=dtype, device=device, seed=9) * 100
    tok = _tokens((4,), v=v, device=device)
    tok[0] = peaked[0].argmax()
    xa, xr = peaked.clone().requires_grad_(), peaked.double().requires_grad_()
    lp, ent = _both(fastloss.token_logprobs, xa, tok)
    rlp, rent = ref_lp(xr, tok, return_entropy=True)
    tol = RTOL64 if dtype == torch.float64 else 1e-5
    assert rel_err(lp, rlp) <= tol
    # the entropies are tiny (down to ~e^-100) next to logits of ~500: a few ulps of the logits, absolutely
    scale = peaked.abs().max().item()
    assert (ent.double() - rent).abs().max() <= 64 * torch.finfo(dtype).eps * scale
    assert (ent >= -64 * torch.finfo(dtype).eps * scale).all()
    a, b = _weights((4,), device, 2), _weights((4,), device, 3)
    (g,) = torch.autograd.grad(_objective(lp, ent, a, b, "both"), xa)
    (gr,) = torch.autograd.grad(_objective(rlp, rent, a, b, "both"), xr)
    assert g.isfinite().all() and rel_err(g, gr) <= 10 * tol
    # flat rows (any constant): log p = -log V, entropy = log V, and the entropy's gradient is 0
    flat = torch.full((3, v), -4.5, dtype=dtype, device=device, requires_grad=True)
    lp, ent = _both(fastloss.token_logprobs, flat, _tokens((3,), v=v, device=device), temperature=0.6)
    atol = 1e-12 if dtype == torch.float64 else 1e-5
    assert (lp + math.log(v)).abs().max() <= atol and (ent - math.log(v)).abs().max() <= atol
    (gf,) = torch.autograd.grad(ent.sum(), flat)
    assert gf.abs().max() <= (1e-14 if dtype == torch.float64 else 1e-7)


@pytest.mark.parametrize("v", [1, 7, 33, 1000, 4099])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_vocabulary_sizes(v, dtype, device):
    lead = (5,)
    x = _logits(lead, v=v, dtype=dtype, device=device, seed=10)
    tok = _tokens(lead, v=v, device=device)
    xa, xr = x.clone().requires_grad_(), x.double().requires_grad_()
    lp, ent = _both(fastloss.token_logprobs, xa, tok, temperature=0.7)
    rlp, rent = ref_lp(xr, tok, temperature=0.7, return_entropy=True)
    assert lp.shape == ent.shape == lead
    assert lp.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    a, b = _weights(lead, device, 2), _weights(lead, device, 3)
    (g,) = torch.autograd.grad(_objective(lp, ent, a, b, "both"), xa)
    (gr,) = torch.autograd.grad(_objective(rlp, rent, a, b, "both"), xr)
    if v == 1:  # one class: log p = 0, entropy 0, no gradient (up to float32 rounding of p = 1: g (1 - p))
        assert lp.abs().max() <= 1e-6 and ent.abs().max() <= 1e-6 and g.abs().max() <= 1e-6 * a.abs().max()
        return
    tol = RTOL64 if dtype == torch.float64 else 1e-5
    assert rel_err(lp, rlp) <= tol and rel_err(ent, rent) <= tol
    gtol = {torch.float64: GTOL64, torch.float32: 1e-5, torch.bfloat16: TOL[torch.bfloat16]}[dtype]
    assert rel_err(g, gr) <= gtol


@pytest.mark.parametrize("lead", [(0,), (3, 0)])
def test_empty_batch(lead, device):
    x = _logits(lead, device=device).requires_grad_()
    tok = torch.empty(lead, dtype=torch.long, device=device)
    lp, ent = _both(fastloss.token_logprobs, x, tok)
    assert lp.shape == ent.shape == lead
    (lp.sum() + ent.sum()).backward()
    assert x.grad.shape == x.shape
    assert fastloss.token_logprobs(x, tok).shape == lead


def test_leading_shapes_and_strides(device):
    x = _logits((2, 3), device=device, seed=11)
    tok = _tokens((2, 3), device=device)
    lp, ent = _both(fastloss.token_logprobs, x, tok, temperature=1.1)
    lpf, entf = _both(fastloss.token_logprobs, x.reshape(6, V), tok.reshape(6), temperature=1.1)
    assert lp.shape == (2, 3)
    assert torch.allclose(lp.reshape(6), lpf, rtol=1e-13, atol=0) and torch.allclose(ent.reshape(6), entf,
                                                                                      rtol=1e-13, atol=0)
    one = fastloss.token_logprobs(x[1, 2], tok[1, 2])  # leading shape ()
    assert one.shape == () and rel_err(one, ref_lp(x[1, 2], tok[1, 2])) <= RTOL64
    xt = x.transpose(0, 1)  # (3, 2, V), non-contiguous leading dims
    lpt, entt = _both(fastloss.token_logprobs, xt, tok.t())
    rlp, rent = ref_lp(xt, tok.t(), return_entropy=True)
    assert rel_err(lpt, rlp) <= RTOL64 and rel_err(entt, rent) <= RTOL64
    xs = torch.empty_strided((6, V), (1, 6), dtype=torch.float64, device=device).copy_(x.reshape(6, V))
    assert not xs.is_contiguous()  # class stride 6
    assert rel_err(fastloss.token_logprobs(xs, tok.reshape(6)), ref_lp(xs, tok.reshape(6))) <= RTOL64


def test_bad_input(device):
    x = _logits((4,), device=device)
    tok = _tokens((4,), device=device)
    E = (ValueError, RuntimeError)
    for bad in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(E, match="temperature"):
            fastloss.token_logprobs(x, tok, temperature=bad)
    with pytest.raises(E, match="tokens"):
        fastloss.token_logprobs(x, tok[:3])
    with pytest.raises(E + (TypeError,), match="logits"):
        fastloss.token_logprobs(torch.ones(4, V, dtype=torch.long, device=device), tok)
    if device == "cpu":  # (on CUDA an out-of-range token may be a device-side assert)
        for bad_value in (V, -1, -100):  # no ignore_index: every token must be a class
            bad = tok.clone()
            bad[2] = bad_value
            with pytest.raises(E + (IndexError,), match="tokens"):
                fastloss.token_logprobs(x, bad)
            with pytest.raises(E + (IndexError,), match="tokens"):
                fastloss.token_logprobs(x, bad, return_entropy=True)


def test_torch_compile_fullgraph(device):
    def f(x, tok):
        out = fastloss.token_logprobs(x, tok, temperature=0.7, return_entropy=True)
        return (out.logprobs * 0.5).sum() + out.entropy.sum()

    x = _logits((8,), v=300, dtype=torch.float32, device=device, seed=12)
    tok = _tokens((8,), v=300, device=device)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    a = compiled_or_skip(f, xa, tok)
    b = f(xb, tok)
    a.backward()
    b.backward()
    assert torch.allclose(a, b, rtol=1e-5)
    assert torch.allclose(xa.grad, xb.grad, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------- linear (chunked) version

D = 8


def _linear(lead, v=V, dtype=torch.float64, device="cpu", bias=True, seed=20):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(lead + (D,), generator=g, dtype=torch.float64)
    W = torch.randn(v, D, generator=g, dtype=torch.float64) * 0.7
    b = torch.randn(v, generator=g, dtype=torch.float64) * 0.5 if bias else None
    cast = lambda x: None if x is None else x.to(dtype).to(device).requires_grad_()  # noqa: E731
    return cast(h), cast(W), cast(b)


@pytest.mark.parametrize("chunk", [3, 5, "auto"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("which", ["logprobs", "entropy", "both"])
def test_linear_matches_logits_version(chunk, bias, which, device):
    lead = (10,)
    h, W, b = _linear(lead, device=device, bias=bias)
    tok = _tokens(lead, device=device)
    params = tuple(p for p in (h, W, b) if p is not None)
    out = fastloss.linear_token_logprobs(h, W, tok, bias=b, temperature=0.7, return_entropy=True, chunk_size=chunk)
    assert isinstance(out, fastloss.TokenLogprobs)
    lp, ent = out
    rlp, rent = ref_lp(F.linear(h, W, b), tok, temperature=0.7, return_entropy=True)
    assert lp.shape == ent.shape == lead and lp.dtype == torch.float64
    assert rel_err(lp, rlp) <= RTOL64 and rel_err(ent, rent) <= RTOL64
    a, bb = _weights(lead, device, 2), _weights(lead, device, 3)
    ga = torch.autograd.grad(_objective(lp, ent, a, bb, which), params)
    gr = torch.autograd.grad(_objective(rlp, rent, a, bb, which), params)
    for x, y in zip(ga, gr):
        assert x.shape == y.shape and rel_err(x, y) <= GTOL64
    # the log-probs alone, and the logits version on materialised logits
    lp1 = fastloss.linear_token_logprobs(h, W, tok, bias=b, temperature=0.7, chunk_size=chunk)
    assert isinstance(lp1, torch.Tensor) and rel_err(lp1, rlp) <= RTOL64
    (g1,) = torch.autograd.grad(lp1, h, a)
    (gr1,) = torch.autograd.grad(ref_lp(F.linear(h, W, b), tok, temperature=0.7), h, a)
    assert rel_err(g1, gr1) <= GTOL64
    lpl = fastloss.token_logprobs(F.linear(h, W, b), tok, temperature=0.7)
    assert rel_err(lp1, lpl) <= RTOL64


@pytest.mark.parametrize("chunk", [4, "auto"])
def test_linear_leading_shape_frozen_weight_no_grad(chunk, device):
    lead = (2, 5)
    h, W, b = _linear(lead, device=device, seed=21)
    tok = _tokens(lead, device=device)
    lp, ent = fastloss.linear_token_logprobs(h, W, tok, bias=b, return_entropy=True, chunk_size=chunk)
    rlp, rent = ref_lp(F.linear(h, W, b), tok, return_entropy=True)
    assert lp.shape == lead and rel_err(lp, rlp) <= RTOL64 and rel_err(ent, rent) <= RTOL64
    Wf = W.detach()  # a frozen head: gradient to the hidden states only
    lp, ent = fastloss.linear_token_logprobs(h, Wf, tok, return_entropy=True, chunk_size=chunk)
    (g,) = torch.autograd.grad(lp.sum() - ent.sum(), h)
    rlp, rent = ref_lp(F.linear(h, Wf), tok, return_entropy=True)
    (gr,) = torch.autograd.grad(rlp.sum() - rent.sum(), h)
    assert rel_err(g, gr) <= GTOL64
    with torch.no_grad():
        lp = fastloss.linear_token_logprobs(h, W, tok, bias=b, chunk_size=chunk)
    assert rel_err(lp, ref_lp(F.linear(h, W, b), tok)) <= RTOL64


def test_linear_empty_batch(device):
    h, W, b = _linear((0,), device=device)
    tok = torch.empty(0, dtype=torch.long, device=device)
    lp, ent = fastloss.linear_token_logprobs(h, W, tok, bias=b, return_entropy=True, chunk_size=3)
    assert lp.shape == ent.shape == (0,)
    grads = torch.autograd.grad(lp.sum() + ent.sum(), (h, W, b), allow_unused=True)
    for g_, p in zip(grads, (h, W, b)):
        assert g_ is None or (g_.shape == p.shape and not g_.any())


def test_linear_bf16_within_bounds(device):
    lead = (32,)
    h, W, b = _linear(lead, v=300, dtype=torch.bfloat16, device=device, seed=22)
    tok = _tokens(lead, v=300, device=device)
    lp, ent = fastloss.linear_token_logprobs(h, W, tok, bias=b, temperature=1.5, return_entropy=True, chunk_size=7)
    assert lp.dtype == ent.dtype == torch.float32
    r = [p.detach().double().requires_grad_() for p in (h, W, b)]
    rlp, rent = ref_lp(F.linear(*r), tok, temperature=1.5, return_entropy=True)
    # bf16 GEMMs (on CUDA) round the logits to bf16
    assert rel_err(lp, rlp) <= 2e-2 and rel_err(ent, rent) <= 2e-2
    a, bb = _weights(lead, device, 2), _weights(lead, device, 3)
    ga = torch.autograd.grad(_objective(lp, ent, a, bb, "both"), (h, W, b))
    gr = torch.autograd.grad(_objective(rlp, rent, a, bb, "both"), r)
    for x, y in zip(ga, gr):
        assert x.dtype == torch.bfloat16 and rel_err(x, y) <= 3e-2


def test_linear_bad_input(device):
    h, W, b = _linear((4,), device=device)
    tok = _tokens((4,), device=device)
    E = (ValueError, RuntimeError)
    with pytest.raises(E, match="weight|hidden"):
        fastloss.linear_token_logprobs(h, W[:, :-1], tok)
    with pytest.raises(E, match="bias"):
        fastloss.linear_token_logprobs(h, W, tok, bias=b[:-1])
    with pytest.raises(E, match="tokens"):
        fastloss.linear_token_logprobs(h, W, tok[:3])
    for bad in (0, -1):
        with pytest.raises(E, match="chunk_size"):
            fastloss.linear_token_logprobs(h, W, tok, chunk_size=bad)
    with pytest.raises(E, match="temperature"):
        fastloss.linear_token_logprobs(h, W, tok, temperature=-2.0)
    if device == "cpu":
        bad = tok.clone()
        bad[1] = V
        with pytest.raises(E + (IndexError,), match="tokens"):
            fastloss.linear_token_logprobs(h, W, bad, chunk_size=2)


def test_nn_modules():
    x = _logits((4,), v=50, dtype=torch.float64, device="cpu", seed=21)
    tok = _tokens((4,), v=50, device="cpu")
    m = fastloss.nn.TokenLogprobs(temperature=0.7, return_entropy=True)
    lp, ent = m(x, tok)
    rlp, rent = ref_lp(x, tok, temperature=0.7, return_entropy=True)
    assert rel_err(lp, rlp) <= RTOL64 and rel_err(ent, rent) <= RTOL64
    W = torch.randn(50, 8, dtype=torch.float64)
    h = torch.randn(4, 8, dtype=torch.float64)
    lin = fastloss.nn.LinearTokenLogprobs(temperature=0.7, chunk_size=3)
    assert rel_err(lin(h, W, tok), ref_lp(h @ W.t(), tok, temperature=0.7)) <= RTOL64


def test_opcheck():
    x = _logits((5,), v=37, dtype=torch.float32, device="cpu", seed=22)
    tok = _tokens((5,), v=37, device="cpu")
    for entropy in (False, True):
        torch.library.opcheck(torch.ops.fastloss.token_logprobs_fwd.default, (x, tok, 0.7, entropy))
    for entropy, stats in ((False, True), (True, True)):
        torch.library.opcheck(torch.ops.fastloss.token_logprobs_fwd.default, (x, tok, 0.7, entropy, stats))
    lp, ent, lse, st, am = torch.ops.fastloss.token_logprobs_fwd(x, tok, 0.7, True)
    assert st.shape == (0, 2) and st.dtype == torch.float64 and am.shape == (0,) and am.dtype == torch.int64
    _, _, _, st, am = torch.ops.fastloss.token_logprobs_fwd(x, tok, 0.7, False, True)
    assert st.shape == (5, 2) and st.dtype == torch.float64 and am.shape == (5,) and am.dtype == torch.int64
    torch.library.opcheck(torch.ops.fastloss.token_logprobs_bwd.default,
                          (torch.ones(5, dtype=torch.float64), torch.ones(5, dtype=torch.float64), x, tok, lse, ent,
                           0.7), test_utils=("test_schema", "test_faketensor"))


def test_linear_autocast():
    # Under torch.autocast the chunks still run in the inputs' dtype (their buffers are float32).
    h = torch.randn(6, 16, requires_grad=True)
    W = torch.randn(40, 16, requires_grad=True)
    tok = torch.randint(0, 40, (6,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lp = fastloss.linear_token_logprobs(h, W, tok, chunk_size=4)
    lp.sum().backward()
    h64, W64 = h.detach().double().requires_grad_(), W.detach().double().requires_grad_()
    ref_lp(h64 @ W64.t(), tok).sum().backward()
    assert rel_err(h.grad, h64.grad) <= 1e-5 and rel_err(W.grad, W64.grad) <= 1e-5


# ---------------------------------------------------------------- per-token statistics (return_stats, issue #21)


def _check_stats(out, ref, tol, argmax_equal=True):
    """TokenStats against the reference 5-tuple: relative-error norms on the finite values, the non-finite ones
    (a -inf mean) exactly, the argmax exactly."""
    assert isinstance(out, fastloss.TokenStats)
    for name, got, want in zip(("logprobs", "entropy", "log_sum_sq_probs", "mean_logits"), out[:4], ref[:4]):
        if want is None:
            assert got is None, name
            continue
        assert got.shape == want.shape, name
        assert rel_err(got, want) <= tol, (name, rel_err(got, want))
        bad = ~torch.isfinite(want.cpu())
        g, w = got.double().cpu()[bad], want.double().cpu()[bad]
        assert ((g == w) | (g.isnan() & w.isnan())).all(), name
    assert out.argmax.dtype == torch.int64 and out.argmax.shape == ref[4].shape
    if argmax_equal:
        assert torch.equal(out.argmax.cpu(), ref[4].cpu())


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("lead", [(13,), (2, 5)])
@pytest.mark.parametrize("entropy", [False, True])
def test_stats_match_reference_float64(temperature, lead, entropy, device):
    x = _logits(lead, device=device)
    tok = _tokens(lead, device=device)
    out = fastloss.token_logprobs(x, tok, temperature=temperature, return_entropy=entropy, return_stats=True)
    ref = ref_lp(x, tok, temperature=temperature, return_entropy=entropy, return_stats=True)
    _check_stats(out, ref, RTOL64)
    assert (out.entropy is None) == (not entropy)
    for t in out[2:4]:
        assert t.dtype == torch.float64 and t.shape == lead
    # the statistics are of the tempered softmax: log sum p^2 <= 0, the mean is mean(x) / T
    assert (out.log_sum_sq_probs <= 1e-12).all()
    assert torch.allclose(out.mean_logits, x.mean(-1) / temperature, rtol=1e-12, atol=1e-14)
    # the other outputs are those of the call without statistics
    plain = fastloss.token_logprobs(x, tok, temperature=temperature, return_entropy=entropy)
    assert rel_err(out.logprobs, plain[0] if entropy else plain) <= RTOL64
    if entropy:
        assert rel_err(out.entropy, plain[1]) <= RTOL64


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("v", [1, 7, 37, 1000, 1001, 4099])
def test_stats_vocabulary_sizes(v, dtype, device):
    lead = (6,)
    x = _logits(lead, v=v, dtype=dtype, device=device, seed=30, scale=3.0)
    tok = _tokens(lead, v=v, device=device)
    out = fastloss.token_logprobs(x, tok, temperature=0.7, return_entropy=True, return_stats=True)
    ref = ref_lp(x, tok, temperature=0.7, return_entropy=True, return_stats=True)
    want_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert all(t.dtype == want_dtype for t in out[:4])
    if v == 1:  # one class: p = 1, log sum p^2 = 0, the mean is the logit, argmax 0
        assert out.log_sum_sq_probs.abs().max() <= 1e-6 and torch.equal(out.argmax, torch.zeros_like(out.argmax))
        assert rel_err(out.mean_logits, ref[3]) <= 1e-7
        return
    _check_stats(out, ref, RTOL64 if dtype == torch.float64 else 2e-6)


def test_stats_masked_vocabulary(device):
    """-inf logits: they count 0 in sum p^2, make the mean -inf, and never win the argmax; a row with one finite
    logit has log sum p^2 = 0 and its argmax there; a row of -inf only has argmax 0 (torch.argmax)."""
    v = 1001
    x = _logits((6,), v=v, device="cpu", seed=31, scale=3.0)
    x[0, 500:] = -math.inf
    x[1, :] = -math.inf
    x[1, 777] = 2.5  # all but one -inf
    x[2, :] = -math.inf
    x[2, 0] = -40.0  # all but the first
    x[3, :] = -math.inf
    x[3, v - 1] = 0.0  # all but the last
    x[4, 1:] = -math.inf  # V - 1 masked after a finite first
    x = x.to(device)
    tok = torch.tensor([3, 777, 0, v - 1, 0, 5], device=device)
    for dtype in (torch.float64, torch.float32):
        xd = x.to(dtype)
        out = fastloss.token_logprobs(xd, tok, temperature=0.8, return_entropy=True, return_stats=True)
        ref = ref_lp(xd, tok, temperature=0.8, return_entropy=True, return_stats=True)
        _check_stats(out, ref, RTOL64 if dtype == torch.float64 else 2e-6)
        assert out.argmax.tolist()[:5] == [int(x[0, :500].argmax()), 777, 0, v - 1, 0]
        assert out.log_sum_sq_probs[1:5].abs().max() <= 1e-12
        assert (out.mean_logits[:5] == -math.inf).all() and out.mean_logits[5].isfinite()
    # a row of -inf only: argmax 0 as torch.argmax (the log-probability and the rest are NaN / inf)
    allmasked = torch.full((2, 37), -math.inf, dtype=torch.float32, device=device)
    out = fastloss.token_logprobs(allmasked, torch.tensor([0, 5], device=device), return_stats=True)
    assert out.argmax.tolist() == [0, 0]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("v", [37, 1001, 4099])
def test_stats_argmax_ties(v, dtype, device):
    """The first index of the max, as torch.argmax, whatever the positions: within one vector, across vectors,
    threads and SIMD chunks, the head or the tail of the row; a constant row gives 0."""
    rows = []
    positions = [(0, v - 1), (v - 1, 0), (3, 4), (5, v // 2), (v // 2, v // 2 + 1), (v - 2, v - 1), (1, 2, v - 3),
                 (v // 3, 2 * v // 3)]
    g = torch.Generator().manual_seed(32)
    for pos in positions:
        r = torch.randn(v, generator=g, dtype=torch.float64)
        r[list(pos)] = 7.0
        rows.append(r)
    rows.append(torch.full((v,), -2.0, dtype=torch.float64))  # all equal
    x = torch.stack(rows).to(dtype).to(device)
    tok = torch.zeros(x.shape[0], dtype=torch.long, device=device)
    out = fastloss.token_logprobs(x, tok, temperature=1.3, return_stats=True)
    want = [min(p) for p in positions] + [0]
    assert out.argmax.tolist() == want
    assert torch.equal(out.argmax.cpu(), x.cpu().argmax(-1))
    # a misaligned view (the row's head before its first 16-byte boundary): the same argmax
    buf = torch.zeros(x.numel() + 1, dtype=dtype, device=device)
    xm = buf[1:].view(x.shape)
    xm.copy_(x)
    assert xm.is_contiguous() and xm.storage_offset() == 1
    outm = fastloss.token_logprobs(xm, tok, temperature=1.3, return_stats=True)
    assert outm.argmax.tolist() == want
    # bf16 logits tie often (256 values per octave): still the first index
    if dtype == torch.bfloat16:
        xb = _logits((16,), v=v, dtype=dtype, device=device, seed=33, scale=0.5)
        ob = fastloss.token_logprobs(xb, torch.zeros(16, dtype=torch.long, device=device), return_stats=True)
        assert torch.equal(ob.argmax.cpu(), xb.double().cpu().argmax(-1))


def test_stats_argmax_nan(device):
    """NaN ranks above every number, as in torch.argmax (the first NaN)."""
    x = _logits((3,), v=1001, dtype=torch.float32, device="cpu", seed=34)
    x[0, 600] = math.nan
    x[1, 10] = math.nan
    x[1, 900] = math.nan
    x = x.to(device)
    out = fastloss.token_logprobs(x, torch.zeros(3, dtype=torch.long, device=device), return_stats=True)
    assert out.argmax.tolist() == [600, 10, int(x[2].argmax())]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_stats_low_precision_within_bounds(dtype, device):
    lead = (48,)
    x = _logits(lead, v=1000, dtype=dtype, device=device, seed=35, scale=3.0)
    tok = _tokens(lead, v=1000, device=device)
    out = fastloss.token_logprobs(x, tok, temperature=1.5, return_stats=True)
    ref = ref_lp(x.double(), tok, temperature=1.5, return_stats=True)  # the same rounded logits
    assert out.log_sum_sq_probs.dtype == out.mean_logits.dtype == torch.float32
    _check_stats(out, ref, 1e-5)


@pytest.mark.parametrize("lead", [(0,), (3, 0)])
def test_stats_empty_batch(lead, device):
    x = _logits(lead, device=device).requires_grad_()
    tok = torch.empty(lead, dtype=torch.long, device=device)
    out = fastloss.token_logprobs(x, tok, return_entropy=True, return_stats=True)
    assert all(t.shape == lead for t in out) and out.argmax.dtype == torch.int64
    (out.logprobs.sum() + out.entropy.sum()).backward()
    assert x.grad.shape == x.shape
    h, W, b = _linear(lead, device=device)
    lo = fastloss.linear_token_logprobs(h, W, tok, bias=b, return_stats=True, chunk_size=3)
    assert all(t is None or t.shape == lead for t in lo) and lo.entropy is None


@pytest.mark.parametrize("which", ["logprobs", "entropy", "both"])
def test_stats_no_gradient_and_gradients_unchanged(which, device):
    lead = (9,)
    x = _logits(lead, v=300, device=device, seed=36)
    tok = _tokens(lead, v=300, device=device)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    out = fastloss.token_logprobs(xa, tok, temperature=0.9, return_entropy=True, return_stats=True)
    plain = fastloss.token_logprobs(xb, tok, temperature=0.9, return_entropy=True)
    assert out.logprobs.requires_grad and out.entropy.requires_grad
    assert not any(t.requires_grad for t in out[2:])
    a, b = _weights(lead, device, 2), _weights(lead, device, 3)
    (ga,) = torch.autograd.grad(_objective(out.logprobs, out.entropy, a, b, which), xa)
    (gb,) = torch.autograd.grad(_objective(plain.logprobs, plain.entropy, a, b, which), xb)
    assert rel_err(ga, gb) <= GTOL64
    xr = x.clone().requires_grad_()
    rlp, rent = ref_lp(xr, tok, temperature=0.9, return_entropy=True)
    (gr,) = torch.autograd.grad(_objective(rlp, rent, a, b, which), xr)
    assert rel_err(ga, gr) <= GTOL64
    # gradcheck through the differentiable outputs of a stats call
    xs = _logits((3,), v=7, device=device, seed=37).requires_grad_()
    ts = torch.tensor([0, 6, 3], device=device)
    assert torch.autograd.gradcheck(
        lambda v: tuple(fastloss.token_logprobs(v, ts, temperature=0.7, return_entropy=True, return_stats=True)[:2]),
        (xs,))


@pytest.mark.parametrize("chunk", [3, 5, "auto"])
@pytest.mark.parametrize("entropy", [False, True])
def test_linear_stats_match_logits_version(chunk, entropy, device):
    lead = (10,)
    h, W, b = _linear(lead, v=1001, device=device, seed=38)
    tok = _tokens(lead, v=1001, device=device)
    out = fastloss.linear_token_logprobs(h, W, tok, bias=b, temperature=0.7, return_entropy=entropy,
                                         return_stats=True, chunk_size=chunk)
    logits = F.linear(h, W, b)
    ref = ref_lp(logits, tok, temperature=0.7, return_entropy=entropy, return_stats=True)
    _check_stats(out, ref, RTOL64)
    lo = fastloss.token_logprobs(logits.detach(), tok, temperature=0.7, return_entropy=entropy, return_stats=True)
    for got, want in zip(out, lo):
        assert (got is None) == (want is None)
        if got is not None:
            assert rel_err(got, want) <= RTOL64
    assert torch.equal(out.argmax, lo.argmax)
    assert not any(t.requires_grad for t in out[2:])
    # the backward is unchanged: the same gradients as without the statistics
    params = (h, W, b)
    a, bb = _weights(lead, device, 2), _weights(lead, device, 3)
    plain = fastloss.linear_token_logprobs(h, W, tok, bias=b, temperature=0.7, return_entropy=True, chunk_size=chunk)
    ent = out.entropy if entropy else None
    which = "both" if entropy else "logprobs"
    ga = torch.autograd.grad(_objective(out.logprobs, ent, a, bb, which), params)
    gp = torch.autograd.grad(_objective(plain.logprobs, plain.entropy, a, bb, which), params)
    for x, y in zip(ga, gp):
        assert rel_err(x, y) <= GTOL64


def test_linear_stats_bf16_within_bounds(device):
    lead = (32,)
    h, W, b = _linear(lead, v=300, dtype=torch.bfloat16, device=device, seed=39)
    tok = _tokens(lead, v=300, device=device)
    out = fastloss.linear_token_logprobs(h, W, tok, bias=b, temperature=1.5, return_stats=True, chunk_size=7)
    assert out.log_sum_sq_probs.dtype == out.mean_logits.dtype == torch.float32 and out.argmax.dtype == torch.int64
    r = [p.detach().double() for p in (h, W, b)]
    ref = ref_lp(F.linear(*r), tok, temperature=1.5, return_stats=True)
    # bf16 GEMMs (on CUDA) round the logits to bf16: values within bounds; the argmax of those logits themselves
    assert rel_err(out.log_sum_sq_probs, ref[2]) <= 2e-2 and rel_err(out.mean_logits, ref[3]) <= 5e-2
    with torch.no_grad():
        lo = fastloss.token_logprobs(F.linear(h, W, b), tok, temperature=1.5, return_stats=True)
    assert torch.equal(out.argmax, lo.argmax)


def test_stats_torch_compile_fullgraph(device):
    def f(x, tok):
        out = fastloss.token_logprobs(x, tok, temperature=0.7, return_entropy=True, return_stats=True)
        return out.logprobs.sum() + out.entropy.sum(), out.log_sum_sq_probs, out.mean_logits, out.argmax

    x = _logits((8,), v=300, dtype=torch.float32, device=device, seed=40)
    tok = _tokens((8,), v=300, device=device)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    a = compiled_or_skip(f, xa, tok)
    b = f(xb, tok)
    a[0].backward()
    b[0].backward()
    assert torch.allclose(a[0], b[0], rtol=1e-5) and torch.allclose(xa.grad, xb.grad, rtol=1e-5, atol=1e-7)
    assert torch.allclose(a[1], b[1]) and torch.allclose(a[2], b[2]) and torch.equal(a[3], b[3])


# ---------------------------------------------------------------- linear version: softcap, unused outputs


def _capped(h, W, b, c):
    return c * torch.tanh(F.linear(h, W, b) / c)


@pytest.mark.parametrize("chunk", [3, "auto"])
@pytest.mark.parametrize("which", ["logprobs", "entropy", "both"])
def test_linear_softcap_matches_reference(chunk, which, device):
    """linear_token_logprobs(softcap=c): c tanh(logits / c) before the temperature (Gemma's head, TRL's order),
    values, stats and gradients of h, W, b against the float64 reference on the capped logits."""
    lead = (11,)
    h, W, b = _linear(lead, device=device, seed=23)
    h2 = (h.detach() * 4).requires_grad_()  # logits across several caps: tanh bends them
    tok = _tokens(lead, device=device)
    c = 1.5
    out = fastloss.linear_token_logprobs(h2, W, tok, bias=b, temperature=0.8, return_entropy=True,
                                         return_stats=True, softcap=c, chunk_size=chunk)
    ref = ref_lp(_capped(h2, W, b, c), tok, temperature=0.8, return_entropy=True, return_stats=True)
    for got, want in zip(out[:4], ref[:4]):
        assert rel_err(got, want) <= RTOL64
    assert torch.equal(out.argmax, ref[4])
    a, bb = _weights(lead, device, 2), _weights(lead, device, 3)
    params = (h2, W, b)
    ga = torch.autograd.grad(_objective(out.logprobs, out.entropy, a, bb, which), params)
    gr = torch.autograd.grad(_objective(ref[0], ref[1], a, bb, which), params)
    for x, y in zip(ga, gr):
        assert rel_err(x, y) <= GTOL64
    # without a cap the same call is the plain head (the cap really changes the values)
    plain = fastloss.linear_token_logprobs(h2, W, tok, bias=b, temperature=0.8, chunk_size=chunk)
    assert rel_err(plain, ref[0]) > 1e-3


def test_linear_softcap_bad_values(device):
    h, W, b = _linear((4,), device=device)
    tok = _tokens((4,), device=device)
    for bad in (0.0, -1.0, math.inf, math.nan, True, "30"):
        with pytest.raises(ValueError, match="`softcap` must be a finite value > 0"):
            fastloss.linear_token_logprobs(h, W, tok, softcap=bad)


def test_linear_gradient_with_unused_outputs(device):
    """An entropy computed but not differentiated (the backward then gets None for it, not zeros: no entropy term
    is computed) gives the log-probs-only gradient; a loss on the entropy alone gives the entropy's gradient."""
    lead = (9,)
    h, W, b = _linear(lead, device=device, seed=24)
    tok = _tokens(lead, device=device)
    lp, ent = fastloss.linear_token_logprobs(h, W, tok, bias=b, return_entropy=True, chunk_size=4)
    g_with = torch.autograd.grad(lp.sum(), (h, W, b))
    lp_alone = fastloss.linear_token_logprobs(h, W, tok, bias=b, chunk_size=4)
    g_alone = torch.autograd.grad(lp_alone.sum(), (h, W, b))
    for x, y in zip(g_with, g_alone):
        assert rel_err(x, y) <= GTOL64
    lp, ent = fastloss.linear_token_logprobs(h, W, tok, bias=b, return_entropy=True, chunk_size=4)
    (g_ent,) = torch.autograd.grad(ent.sum(), h)
    _, rent = ref_lp(F.linear(h, W, b), tok, return_entropy=True)
    assert rel_err(g_ent, torch.autograd.grad(rent.sum(), h)[0]) <= GTOL64


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("which", ["logprobs", "entropy", "both"])
def test_backward_on_vocabulary_slices(dtype, which, device):
    # token_logprobs_bwd with vocab_start (the vocabulary-parallel backward): a slice of the logits with the whole
    # vocabulary's lse and entropy gives that slice of the full gradient; a token outside the slice adds nothing.
    v = 203  # odd: slices of every alignment, a 1-class slice (an empty slice never reaches the op)
    x = _logits((9,), v=v, dtype=dtype, device=device, seed=31, scale=3.0)
    tok = _tokens((9,), v=v, device=device)
    tok[0], tok[1] = 0, v - 1
    _, ent, lse, _, _ = torch.ops.fastloss.token_logprobs_fwd(x, tok, 0.7, True)
    a = _weights((9,), device, 2) if which != "entropy" else None
    b = _weights((9,), device, 3) if which != "logprobs" else None
    full = torch.ops.fastloss.token_logprobs_bwd(a, b, x, tok, lse, ent, 0.7)
    eps = torch.finfo(dtype).eps
    for cuts in ([0, 100, 203], [0, 1, 67, 203], [0, 202, 203], [0, 0, 203]):
        parts = [torch.ops.fastloss.token_logprobs_bwd(a, b, x[:, s:e].contiguous(), tok, lse, ent, 0.7, s)
                 for s, e in zip(cuts[:-1], cuts[1:]) if e > s]
        got = torch.cat(parts, 1)
        assert got.dtype == dtype and rel_err(got, full) <= 4 * eps, (cuts, rel_err(got, full))
    # the token's + g_lp lands in its slice only: a slice holding no token has only the -p terms
    none = torch.ops.fastloss.token_logprobs_bwd(a, b, x[:, 1:5].contiguous(), torch.full_like(tok, 100), lse, ent,
                                                 0.7, 1)
    p = torch.exp(x[:, 1:5].double() / 0.7 - lse[:, None])
    if which == "logprobs":
        assert rel_err(none, (-a[:, None] * p / 0.7).to(dtype)) <= TOL[dtype]
    # bad input: a negative start or token, named
    with pytest.raises(RuntimeError, match="vocab_start"):
        torch.ops.fastloss.token_logprobs_bwd(a, b, x, tok, lse, ent, 0.7, -1)
    if device == "cpu":  # (on CUDA the range of global tokens is the caller's check: fastloss's does it)
        with pytest.raises(IndexError, match="tokens.*negative"):
            torch.ops.fastloss.token_logprobs_bwd(a, b, x, tok - 1, lse, ent, 0.7, 0)
    empty = torch.ops.fastloss.token_logprobs_bwd(a[:0] if a is not None else None, b[:0] if b is not None else None,
                                                  x[:0], tok[:0], lse[:0], ent[:0], 0.7, 5)
    assert empty.shape == (0, v)


def test_opcheck_vocabulary_slice():
    x = _logits((5,), v=37, dtype=torch.float32, device="cpu", seed=23)
    tok = _tokens((5,), v=80, device="cpu")
    _, ent, lse, _, _ = torch.ops.fastloss.token_logprobs_fwd(x, tok.clamp_max(36), 0.7, True)
    torch.library.opcheck(torch.ops.fastloss.token_logprobs_bwd.default,
                          (torch.ones(5, dtype=torch.float64), torch.ones(5, dtype=torch.float64), x, tok, lse, ent,
                           0.7, 30), test_utils=("test_schema", "test_faketensor"))

"""fastloss.distributed on the CPU with gloo, 2 and 3 processes, uneven vocabulary shards: loss and gradients equal
the single-process fastloss call (and F.cross_entropy where it has the option) on the full vocabulary; the token
log-probabilities (entropy, statistics, softcap for the linear version) likewise."""

import itertools
import sys

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import fastloss
from _gloo import spawn
from fastloss.distributed import (vocab_parallel_cross_entropy, vocab_parallel_linear_cross_entropy,
                                  vocab_parallel_linear_token_logprobs, vocab_parallel_token_logprobs)

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")

SHARDS = {2: [20, 17], 3: [10, 15, 12]}  # V = 37, uneven, not a multiple of any vector width
N, D = 23, 6
OPTIONS = [dict(reduction=r, label_smoothing=ls, z_loss=z, softcap=c)
           for r, ls, z, c in itertools.product(["mean", "sum", "none"], [0.0, 0.1], [0.0, 1e-3], [None, 2.0])]


def _rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def _data(dtype, masked=True):
    g = torch.Generator().manual_seed(0)
    V = 37
    logits = torch.randn(N, V, generator=g, dtype=torch.float64) * 3
    if masked:  # (label smoothing turns a -inf logit into an infinite loss, in torch too: not with smoothing)
        logits[2, 5] = float("-inf")  # a masked vocabulary entry
        logits[4, :20] = float("-inf")  # a row whose whole first shard is masked
    t = torch.randint(0, V, (N,), generator=g)
    t[::4] = -100
    t[4] = 30
    h = torch.randn(N, D, generator=g, dtype=torch.float64)
    W = torch.randn(V, D, generator=g, dtype=torch.float64) * 0.8
    b = torch.randn(V, generator=g, dtype=torch.float64)
    return logits.to(dtype), t, h.to(dtype), W.to(dtype), b.to(dtype)


def _check_ce(rank, sizes, dtype, tol):
    start = sum(sizes[:rank])
    sl = slice(start, start + sizes[rank])
    for opts in OPTIONS:
        logits, t, *_ = _data(dtype, masked=not opts["label_smoothing"])
        full = logits.double().clone().requires_grad_()
        ref = fastloss.cross_entropy(full, t, **opts)
        if not opts["z_loss"] and opts["softcap"] is None:  # torch has these options: it must agree too
            assert _rel(ref, F.cross_entropy(full.detach(), t, reduction=opts["reduction"],
                                             label_smoothing=opts["label_smoothing"])) < 1e-12
        up = torch.linspace(0.5, 1.5, N, dtype=torch.float64) if opts["reduction"] == "none" else torch.ones(())
        (g_ref,) = torch.autograd.grad(ref, full, up)
        local = logits[:, sl].clone().requires_grad_()
        # vocab_sizes given on one option set, worked out by all-gather on the others
        vs = sizes if opts["label_smoothing"] else None
        out = vocab_parallel_cross_entropy(local, t, vocab_sizes=vs, **opts)
        (g,) = torch.autograd.grad(out, local, up.to(out.dtype))
        assert out.dtype == dtype and out.shape == ref.shape
        assert _rel(out.double(), ref.detach()) <= tol, (opts, out, ref)
        assert _rel(g.double(), g_ref[:, sl]) <= tol * 10, opts


def _check_linear(rank, sizes, dtype, tol):
    start = sum(sizes[:rank])
    sl = slice(start, start + sizes[rank])
    _, t, h0, W0, b0 = _data(dtype)
    for opts in OPTIONS:
        h, W, b = (x.double().clone().requires_grad_() for x in (h0, W0, b0))
        ref = fastloss.linear_cross_entropy(h, W, t, linear_bias=b, **opts)
        up = torch.linspace(0.5, 1.5, N, dtype=torch.float64) if opts["reduction"] == "none" else torch.ones(())
        gr = torch.autograd.grad(ref, (h, W, b), up)
        hl = h0.clone().requires_grad_()
        Wl = W0[sl].clone().requires_grad_()
        bl = b0[sl].clone().requires_grad_()
        out = vocab_parallel_linear_cross_entropy(hl, Wl, t, local_bias=bl, chunk_size=5, **opts)
        ga = torch.autograd.grad(out, (hl, Wl, bl), up.to(out.dtype))
        assert _rel(out.double(), ref.detach()) <= tol, (opts, out, ref)
        assert _rel(ga[0].double(), gr[0]) <= tol * 10, opts  # all-reduced: the full input gradient
        assert _rel(ga[1].double(), gr[1][sl]) <= tol * 10, opts
        assert _rel(ga[2].double(), gr[2][sl]) <= tol * 10, opts


def _check_logprobs(rank, sizes, dtype, tol):
    """vocab_parallel_token_logprobs / vocab_parallel_linear_token_logprobs == fastloss.token_logprobs /
    linear_token_logprobs on the full vocabulary: outputs (entropy, statistics, argmax) and gradients."""
    start = sum(sizes[:rank])
    sl = slice(start, start + sizes[rank])
    logits, t, h0, W0, b0 = _data(dtype, masked=False)  # (-inf and NaN rows: tests/test_dtensor.py, same code)
    t = t.clamp_min(0)
    a = torch.linspace(0.5, 1.5, N, dtype=torch.float64)
    c = torch.linspace(-1.0, 1.0, N, dtype=torch.float64)
    for kw in (dict(), dict(temperature=0.7, return_entropy=True), dict(return_entropy=True, return_stats=True)):
        full = logits.clone().requires_grad_()
        ref = fastloss.token_logprobs(full, t, **kw)
        local = logits[:, sl].clone().requires_grad_()
        out = vocab_parallel_token_logprobs(local, t, vocab_sizes=sizes if kw else None, **kw)
        hr, Wr, br = (x.clone().requires_grad_() for x in (h0, W0, b0))
        lref = fastloss.linear_token_logprobs(hr, Wr, t, bias=br, softcap=4.0, **kw)
        hl, Wl, bl = h0.clone().requires_grad_(), W0[sl].clone().requires_grad_(), b0[sl].clone().requires_grad_()
        lout = vocab_parallel_linear_token_logprobs(hl, Wl, t, local_bias=bl, softcap=4.0, chunk_size=5, **kw)
        for (o, r), leaves, refs in (((out, ref), (local,), (full,)), ((lout, lref), (hl, Wl, bl), (hr, Wr, br))):
            o, r = (o if isinstance(o, tuple) else (o,)), (r if isinstance(r, tuple) else (r,))
            for x, y in zip(o, r):
                assert (x is None) == (y is None)
                if y is not None:
                    assert x.dtype == y.dtype and (torch.equal(x, y) if y.dtype == torch.int64 else
                                                   _rel(x.double(), y.detach().double()) <= tol), (kw, x, y)
            lo = (o[0] * a.to(o[0].dtype)).sum() + ((o[1] * c.to(o[1].dtype)).sum() if len(o) > 1 else 0)
            lr = (r[0] * a.to(r[0].dtype)).sum() + ((r[1] * c.to(r[1].dtype)).sum() if len(r) > 1 else 0)
            for x, y, leaf in zip(torch.autograd.grad(lo, leaves), torch.autograd.grad(lr, refs), leaves):
                y = y[:, sl] if leaf is local else (y[sl] if leaf is Wl or leaf is bl else y)
                assert _rel(x.double(), y.double()) <= tol * 10, (kw, _rel(x.double(), y.double()))
    # a rank holding no classes (vocab_sizes with a 0), and an empty batch: the same results, no hang
    sizes0 = [sizes[0] + sizes[-1]] + sizes[1:-1] + [0]
    start0 = sum(sizes0[:rank])
    local0 = logits[:, start0:start0 + sizes0[rank]].clone().requires_grad_()
    out = vocab_parallel_token_logprobs(local0, t, vocab_sizes=sizes0, return_entropy=True, return_stats=True)
    full = logits.clone().requires_grad_()
    ref = fastloss.token_logprobs(full, t, return_entropy=True, return_stats=True)
    for x, y in zip(out, ref):
        assert torch.equal(x, y) if y.dtype == torch.int64 else _rel(x.double(), y.double()) <= tol, (x, y)
    (g,) = torch.autograd.grad((out.logprobs * a.to(out.logprobs.dtype)).sum(), local0)
    (g_ref,) = torch.autograd.grad((ref.logprobs * a.to(ref.logprobs.dtype)).sum(), full)
    assert g.shape == local0.shape and _rel(g.double(), g_ref[:, start0:start0 + sizes0[rank]].double()) <= tol * 10
    empty = vocab_parallel_token_logprobs(logits[:0, sl], t[:0], return_entropy=True)
    assert empty.logprobs.shape == (0,) and empty.entropy.shape == (0,)
    try:
        vocab_parallel_token_logprobs(logits[:, sl], torch.full((N,), 37))
    except IndexError as e:
        assert "token 37" in str(e)
    else:
        raise AssertionError("out-of-range token not caught")


def _check_auto_chunks(rank, sizes):
    """chunk_size="auto" with uneven slices: every rank must run the same token chunks (the collectives are per
    chunk), so the chunks are sized by the largest slice, not this rank's. A budget small enough that sizing by the
    rank's own slice would give different chunks on different ranks (a hang or garbage before the fix)."""
    import fastloss._linear_ce as lce

    start = sum(sizes[:rank])
    sl = slice(start, start + sizes[rank])
    _, t, h0, W0, b0 = _data(torch.float64, masked=False)
    saved = dict(lce.CHUNK_BUDGET_BYTES)
    lce.CHUNK_BUDGET_BYTES["cpu"] = 1920  # float64: 12 rows per chunk by the largest slice of 20, 14 by 17
    try:
        ref = fastloss.linear_cross_entropy(h0, W0, t, linear_bias=b0)
        out = vocab_parallel_linear_cross_entropy(h0, W0[sl], t, local_bias=b0[sl], vocab_sizes=sizes)
        assert _rel(out, ref) <= 1e-12, (out, ref)
        ref = fastloss.linear_token_logprobs(h0, W0, t.clamp_min(0), bias=b0, return_entropy=True)
        out = vocab_parallel_linear_token_logprobs(h0, W0[sl], t.clamp_min(0), local_bias=b0[sl],
                                                   vocab_sizes=sizes, return_entropy=True)
        assert all(_rel(x, y) <= 1e-12 for x, y in zip(out, ref)), (out, ref)
    finally:
        lce.CHUNK_BUDGET_BYTES.clear()
        lce.CHUNK_BUDGET_BYTES.update(saved)


def _check_bytes_per_token(rank, sizes):
    """What crosses the network, per token, float32: (m, d, x_t) -- 12 B, 16 B with label smoothing -- in one
    all-gather on 2 ranks, or an all-reduce MAX of m (4 B) and one packed SUM (8 B / 12 B) on more; nothing in the
    backward; the linear version adds D float32 for d input, once."""
    calls = []
    gather = "all_gather_single" if hasattr(dist, "all_gather_single") else "all_gather_into_tensor"
    real = {n: getattr(dist, n) for n in ("all_reduce", gather)}

    def counting(name):
        def fn(*args, **kwargs):
            t = args[1] if name == gather else args[0]
            calls.append((name, t.numel() * t.element_size()))
            return real[name](*args, **kwargs)
        return fn

    start = sum(sizes[:rank])
    logits, t, h, W, b = _data(torch.float32, masked=False)
    two = len(sizes) == 2

    def stats(k):
        return [(gather, 4 * k * N)] if two else [("all_reduce", 4 * N),
                                                                    ("all_reduce", 4 * (k - 1) * N)]
    for name in real:
        setattr(dist, name, counting(name))
    try:
        x = logits[:, start:start + sizes[rank]].clone().requires_grad_()
        vocab_parallel_cross_entropy(x, t, vocab_sizes=sizes).backward()
        assert calls == stats(3), calls  # backward: nothing
        calls.clear()
        vocab_parallel_cross_entropy(x, t, vocab_sizes=sizes, label_smoothing=0.1).backward()
        assert calls == stats(4), calls
        calls.clear()
        hl = h.clone().requires_grad_()
        Wl = W[start:start + sizes[rank]].clone().requires_grad_()
        vocab_parallel_linear_cross_entropy(hl, Wl, t, vocab_sizes=sizes).backward()
        assert calls == stats(3) + [("all_reduce", 4 * N * D)], calls  # one chunk: stats, then d input once
        calls.clear()
        # bf16 logits: m and x_t travel in bf16 (exact), d in float32: 8 bytes per token (2 + 8 over 3 ranks)
        xb = x.detach().bfloat16().requires_grad_()
        vocab_parallel_cross_entropy(xb, t, vocab_sizes=sizes).backward()
        assert calls == ([(gather, 8 * N)] if two else [("all_reduce", 2 * N), ("all_reduce", 8 * N)]), calls
        # token log-probs: one all-gather of (lse_r as float64, x_t) per token: 12 bytes (16 with the entropy, 36
        # with the statistics too: log sum p^2, the logit sum, the argmax's value and its int64 index); backward:
        # nothing
        for kw, nbytes in ((dict(), 12), (dict(return_entropy=True), 16),
                           (dict(return_entropy=True, return_stats=True), 36)):
            calls.clear()
            out = vocab_parallel_token_logprobs(x, t.clamp_min(0), vocab_sizes=sizes, **kw)
            (out if isinstance(out, torch.Tensor) else out[0]).sum().backward()
            assert calls == [(gather, nbytes * N)], (kw, calls)
    finally:
        for name, fn in real.items():
            setattr(dist, name, fn)


def _worker(rank, world):
    sizes = SHARDS[world]
    _check_ce(rank, sizes, torch.float64, 1e-12)
    _check_linear(rank, sizes, torch.float64, 1e-12)
    _check_ce(rank, sizes, torch.bfloat16, 2 ** -7)
    _check_linear(rank, sizes, torch.bfloat16, 2 ** -6)
    _check_ce(rank, sizes, torch.float32, 1e-5)
    _check_logprobs(rank, sizes, torch.float64, 1e-12)
    _check_logprobs(rank, sizes, torch.bfloat16, 2 ** -6)
    _check_auto_chunks(rank, sizes)
    _check_bytes_per_token(rank, sizes)
    # bad input: every rank raises the same clear error (after the layout all-gather, before any other
    # collective, so no rank hangs)
    logits, t, *_ = _data(torch.float64)
    bad = t.clone()
    bad[3] = 37
    start = sum(sizes[:rank])
    try:
        vocab_parallel_cross_entropy(logits[:, start:start + sizes[rank]], bad)
    except IndexError as e:
        assert "37" in str(e) and "position 3" in str(e)
    else:
        raise AssertionError("out-of-range target not caught")
    try:
        vocab_parallel_cross_entropy(logits[:, :1], t, vocab_sizes=[1] * (world + 1))
    except ValueError as e:
        assert "vocab_sizes" in str(e)
    else:
        raise AssertionError("wrong vocab_sizes not caught")


@pytest.mark.parametrize("world", [2, 3])
def test_vocab_parallel_matches_single_process(world):
    spawn(_worker, world)


if __name__ == "__main__":  # python tests/test_distributed.py 3
    w = int(sys.argv[1]) if len(sys.argv) > 1 else 2
    test_vocab_parallel_matches_single_process(w)
    print("ok")

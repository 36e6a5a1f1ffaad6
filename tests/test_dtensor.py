"""fastloss's ops on DTensor inputs (tensor parallelism) on the CPU with gloo, 2 and 3 processes, uneven shards:
the vocabulary-parallel cross-entropy on Shard(1) logits, the local kernels on Shard(0) / Replicate inputs, clear
errors for placements with no rule; float64 parity with the single-process call in losses and gradients, with
``loss_parallel()`` active and not."""

import contextlib
import itertools
import sys

import pytest
import torch
import torch.distributed as dist

import fastloss
from _gloo import spawn

# several processes: one CI configuration (make test-stacks)
pytestmark = [pytest.mark.stacks,
              pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                 reason="torch.distributed with gloo is not available")]

N, V, D = 13, 37, 6  # V = 37 over 2 ranks: 19 + 18; over 3: 13 + 13 + 11 (torch's chunking): uneven
OPTIONS = [dict(reduction=r, label_smoothing=ls, z_loss=z, softcap=c)
           for r, ls, z, c in itertools.product(["mean", "sum", "none"], [0.0, 0.1], [0.0, 1e-3], [None, 2.0])]
LOSSES = [dict(loss="focal", gamma=2.0), dict(loss="poly1", epsilon=0.5), dict(loss="squentropy")]


def _rel(a, b):
    a, b = a.double(), b.double()
    if b.numel() == 0:
        return 0.0
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def _upstream(ref, reduction):
    """The incoming gradient: uneven per row for reduction="none"."""
    if reduction == "none":
        return torch.linspace(0.5, 1.5, N, dtype=ref.dtype)
    return torch.ones((), dtype=ref.dtype)


def _data(dtype=torch.float64, masked=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(N, V, generator=g, dtype=torch.float64) * 3
    if masked:  # (label smoothing turns a -inf logit into an infinite loss, in torch too: not with smoothing)
        logits[2, 5] = float("-inf")
        logits[4, :19] = float("-inf")  # rank 0's whole shard of this row is masked
    t = torch.randint(0, V, (N,), generator=g)
    t[::4] = -100
    t[4] = 30
    w = torch.rand(V, generator=g, dtype=torch.float64) + 0.5
    return logits.to(dtype), t, w


def _full(x):
    from torch.distributed.tensor import DTensor

    return x.full_tensor() if isinstance(x, DTensor) else x


def _check_ce(mesh, dtype, tol):
    """fastloss.cross_entropy on Shard(1) / Shard(0) / Replicate logits == the single-process call."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    from torch.distributed.tensor.parallel import loss_parallel

    cases = [(o, {}) for o in OPTIONS] + [(dict(reduction="mean"), dict(weight=True)),
                                          (dict(reduction="none", label_smoothing=0.1), dict(weight=True))]
    cases += [(dict(reduction=r, z_loss=1e-3, softcap=3.0), lk) for r in ("mean", "none") for lk in LOSSES]
    for (opts, extra), placement, lp in itertools.product(cases, [Shard(1), Shard(0), Replicate()], [False, True]):
        if lp and placement != Shard(1):
            continue
        extra = dict(extra)
        logits, t, w = _data(dtype, masked=not opts.get("label_smoothing"))
        if extra.pop("weight", False):
            extra["weight"] = w.to(torch.float32 if dtype != torch.float64 else dtype)
        full = logits.clone().requires_grad_()
        ref = fastloss.cross_entropy(full, t, **opts, **extra)
        up = _upstream(ref, opts["reduction"])
        (g_ref,) = torch.autograd.grad(ref, full, up)
        dx = distribute_tensor(logits.clone(), mesh, [placement]).requires_grad_()
        with loss_parallel() if lp else contextlib.nullcontext():
            out = fastloss.cross_entropy(dx, t if placement != Shard(0) else t.chunk(mesh.size())[
                mesh.get_local_rank()], **opts, **extra)
            upd = distribute_tensor(up, mesh, [Replicate()] if placement != Shard(0) or up.dim() == 0 else [Shard(0)])
            (g,) = torch.autograd.grad(out, dx, upd)
        assert g.placements == dx.placements
        assert out.dtype == dtype
        o, gf = _full(out), _full(g)
        assert o.shape == ref.shape
        assert _rel(o, ref.detach()) <= tol, (opts, extra, placement, o, ref)
        assert _rel(gf, g_ref) <= tol * 10, (opts, extra, placement)


def _check_ce_inplace(mesh):
    from torch.distributed.tensor import Shard, distribute_tensor

    logits, t, _ = _data()
    full = logits.clone().requires_grad_()
    ref = fastloss.cross_entropy(full, t, z_loss=1e-3)
    ref.backward()
    dx = distribute_tensor(logits.clone(), mesh, [Shard(1)]).requires_grad_()
    out = fastloss.cross_entropy(dx, t, z_loss=1e-3, inplace_backward=True)
    (out * 2).backward()
    assert _rel(_full(out), ref.detach()) < 1e-12
    assert _rel(_full(dx.grad), 2 * full.grad) < 1e-11


def _check_linear(mesh, dtype, tol):
    """fastloss.linear_cross_entropy with the head sharded along the vocabulary (ColwiseParallel: Shard(0))."""
    from torch.distributed.tensor import Shard, distribute_tensor

    g = torch.Generator().manual_seed(1)
    h0 = torch.randn(N, D, generator=g, dtype=torch.float64).to(dtype)
    W0 = (torch.randn(V, D, generator=g, dtype=torch.float64) * 0.8).to(dtype)
    b0 = torch.randn(V, generator=g, dtype=torch.float64).to(dtype)
    _, t, w = _data()
    for opts in OPTIONS[::3] + [dict(reduction="mean", loss="focal", gamma=1.5)]:
        h, W, b = (x.clone().requires_grad_() for x in (h0, W0, b0))
        ref = fastloss.linear_cross_entropy(h, W, t, linear_bias=b, **opts)
        up = _upstream(ref, opts["reduction"])
        gr = torch.autograd.grad(ref, (h, W, b), up)
        hl = h0.clone().requires_grad_()
        Wd = distribute_tensor(W0.clone(), mesh, [Shard(0)]).requires_grad_()
        bd = distribute_tensor(b0.clone(), mesh, [Shard(0)]).requires_grad_()
        out = fastloss.linear_cross_entropy(hl, Wd, t, linear_bias=bd, chunk_size=5, **opts)
        ga = torch.autograd.grad(out, (hl, Wd, bd), up)
        assert _rel(out, ref.detach()) <= tol, (opts, out, ref)
        assert _rel(ga[0], gr[0]) <= tol * 10, opts
        assert _rel(_full(ga[1]), gr[1]) <= tol * 10, opts
        assert _rel(_full(ga[2]), gr[2]) <= tol * 10, opts


def _check_linear_logprobs(mesh, dtype, tol):
    """fastloss.linear_token_logprobs with the head sharded along the vocabulary (Shard(0), with bias): log-probs,
    entropy, statistics and the gradients of hidden, weight and bias == the single-process call; temperature,
    softcap, uneven upstream gradients on either output, chunks that split the tokens unevenly; the hidden states
    plain, a replicated DTensor (output a DTensor) or sharded over the tokens (gathered)."""
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

    g = torch.Generator().manual_seed(2)
    h0 = torch.randn(N, D, generator=g, dtype=torch.float64).to(dtype)
    W0 = (torch.randn(V, D, generator=g, dtype=torch.float64) * 0.8).to(dtype)
    b0 = torch.randn(V, generator=g, dtype=torch.float64).to(dtype)
    t = torch.randint(0, V, (N,), generator=g)
    a = torch.linspace(0.5, 1.5, N, dtype=torch.float64)
    c = torch.linspace(-1.0, 1.0, N, dtype=torch.float64)
    cases = [dict(), dict(temperature=0.7, return_entropy=True), dict(return_entropy=True, return_stats=True),
             dict(softcap=3.0, return_entropy=True, temperature=1.3)]
    for kw, hp in itertools.product(cases, (None, Replicate(), Shard(0))):
        h, W, b = (x.clone().requires_grad_() for x in (h0, W0, b0))
        ref = fastloss.linear_token_logprobs(h, W, t, bias=b, **kw)
        ref = ref if isinstance(ref, tuple) else (ref,)
        hin = (h0.clone() if hp is None else distribute_tensor(h0.clone(), mesh, [hp])).requires_grad_()
        Wd = distribute_tensor(W0.clone(), mesh, [Shard(0)]).requires_grad_()
        bd = distribute_tensor(b0.clone(), mesh, [Shard(0)]).requires_grad_()
        out = fastloss.linear_token_logprobs(hin, Wd, t, bias=bd, chunk_size=5, **kw)
        out = out if isinstance(out, tuple) else (out,)
        for i, (x, y) in enumerate(zip(out, ref)):
            if y is None:
                assert x is None
                continue
            assert isinstance(x, DTensor) == (hp is not None), (i, type(x))
            x = _full(x)
            assert x.dtype == y.dtype and x.shape == y.shape, i
            assert (torch.equal(x, y) if y.dtype == torch.int64 else _rel(x, y.detach()) <= tol), (kw, hp, i)
        loss_ref = (ref[0] * a.to(ref[0].dtype)).sum()
        loss = (_full(out[0]) * a.to(ref[0].dtype)).sum()
        if kw.get("return_entropy"):
            loss_ref = loss_ref + (ref[1] * c.to(ref[1].dtype)).sum()
            loss = loss + (_full(out[1]) * c.to(ref[1].dtype)).sum()
        gr = torch.autograd.grad(loss_ref, (h, W, b))
        ga = torch.autograd.grad(loss, (hin, Wd, bd))
        for x, y in zip(ga, gr):
            assert _rel(_full(x), y) <= tol * 10, (kw, hp, _rel(_full(x), y))
    with pytest.raises(IndexError, match="token 37"):
        fastloss.linear_token_logprobs(h0, distribute_tensor(W0, mesh, [Shard(0)]), torch.full((N,), V))
    # the linear calls without a tensor-parallel version say so, naming the argument
    Wd = distribute_tensor(W0, mesh, [Shard(0)])
    with pytest.raises(NotImplementedError, match="linear_distillation_loss: `student_weight` is a DTensor"):
        fastloss.linear_distillation_loss(h0, Wd, h0, W0)
    with pytest.raises(NotImplementedError, match="linear_spherical_loss: `linear_weight` is a DTensor"):
        fastloss.linear_spherical_loss(h0, Wd, t)


VOCAB_PARALLEL = ("softmax", "log_softmax", "logsumexp")


def _check_row_ops(mesh):
    """The other ops: rows sharded or replicated run the local kernel; classes sharded: the softmax family's
    vocabulary-parallel rule, else a clear error."""
    from torch.distributed.tensor import Partial, Replicate, Shard, distribute_tensor

    logits, t, _ = _data(masked=False)
    teacher = logits.flip(0) * 0.7
    t0 = t.clamp_min(0)
    calls = {
        "softmax": lambda x, k: fastloss.softmax(x, -1),
        "log_softmax": lambda x, k: fastloss.log_softmax(x, -1),
        "logsumexp": lambda x, k: fastloss.logsumexp(x, -1),
        "token_logprobs": lambda x, k: fastloss.token_logprobs(x, k(t0), temperature=0.7, return_entropy=True),
        "distillation_loss": lambda x, k: fastloss.distillation_loss(x, k(teacher), divergence="jsd", beta=0.3,
                                                                     reduction="none"),
        "spherical_loss": lambda x, k: fastloss.spherical_loss(x, k(t), loss="z", a=0.1, b=10.0,
                                                                  reduction="none"),
        "softmax_topk": lambda x, k: fastloss.softmax_topk(x, 3),
    }
    for name, fn in calls.items():
        full = logits.clone().requires_grad_()
        ref = fn(full, lambda v: v)
        refs = [v for v in (ref if isinstance(ref, tuple) else (ref,)) if v is not None]
        differentiable = refs[0].requires_grad
        wt = torch.linspace(-1, 2, refs[0].numel(), dtype=refs[0].dtype).reshape(refs[0].shape)
        if differentiable:  # (a weighted sum: a softmax row sums to 1, its plain sum has no gradient)
            (g_ref,) = torch.autograd.grad((refs[0] * wt).sum(), full)
        for placement in (Shard(0), Replicate()) + ((Shard(1),) if name in VOCAB_PARALLEL else ()):
            dx = distribute_tensor(logits.clone(), mesh, [placement]).requires_grad_()
            out = fn(dx, lambda v: distribute_tensor(v, mesh, [placement]))
            outs = [v for v in (out if isinstance(out, tuple) else (out,)) if v is not None]
            for a, b in zip(outs, refs):
                assert _rel(_full(a), b.detach()) < 1e-12, (name, placement)
            if differentiable:
                (g,) = torch.autograd.grad((outs[0] * distribute_tensor(wt, mesh, outs[0].placements)).sum(), dx)
                assert _rel(_full(g), g_ref) < 1e-12, (name, placement)
        if name in VOCAB_PARALLEL or name == "token_logprobs":  # (the latter: _check_logprobs)
            continue
        dx = distribute_tensor(logits.clone(), mesh, [Shard(1)])
        with pytest.raises(NotImplementedError, match=r"fastloss\..*Shard\(dim=1\).*vocabulary-parallel"):
            fn(dx, lambda v: distribute_tensor(v, mesh, [Shard(1)]) if v.dim() == 2 else
               distribute_tensor(v, mesh, [Replicate()]))
    # DTensor caches sharding decisions per argument values: entropy on, off, on must give [N], [0], [N]
    dx = distribute_tensor(logits.clone(), mesh, [Shard(0)])
    tk = distribute_tensor(t0, mesh, [Shard(0)])
    for want in (True, False, True):
        out = torch.ops.fastloss.token_logprobs_fwd(dx, tk, 0.7, want)
        assert out[1].shape == ((N,) if want else (0,)), (want, out[1].shape)
        # Partial logits: the cross-entropy names the op and the placement
    from torch.distributed.tensor import DTensor

    part = DTensor.from_local(logits / mesh.size(), mesh, [Partial()])
    with pytest.raises(NotImplementedError, match=r"cross_entropy_fwd.*Partial"):
        fastloss.cross_entropy(part, t)


def _check_logprobs(mesh, dtype, tol):
    """fastloss.token_logprobs on Shard(1) logits (the vocabulary-parallel rule) == the single-process call: the
    log-probs, entropy, TRL's statistics and argmax, and the gradient of both outputs, over temperatures, masked
    entries (a rank's whole slice of a row -inf, a token whose logit is -inf), a NaN row, ties for the argmax across
    the slices; tokens plain (this rank's rows) or a DTensor."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    logits, t, _ = _data(masked=True)
    t = t.clamp_min(0)
    t[2] = 5  # logits[2, 5] = -inf: log p = -inf
    fin = torch.ones(N, dtype=torch.bool)
    fin[[2, 9]] = False  # their gradients hold nan (as single-process): compared apart
    logits[7, 3] = logits[7, 30] = logits[7].max() + 1  # the argmax tied across two slices: the first wins
    logits[9, 11] = float("nan")
    logits[10, 30] = float("nan")  # in the last rank's slice: a NaN there wins the argmax over rank 0's numbers
    logits[11] = float("-inf")  # no distribution at all: NaN log-prob and entropy, as the single-process call
    fin[[10, 11]] = False
    x = logits.to(dtype)
    gl = torch.linspace(0.5, 1.5, N, dtype=torch.float64)
    gh = torch.linspace(-1.0, 1.0, N, dtype=torch.float64)
    for temperature, entropy, stats, dt_tokens in itertools.product((1.0, 0.7), (False, True), (False, True),
                                                                     (False, True)):
        kw = dict(temperature=temperature, return_entropy=entropy, return_stats=stats)
        full = x.clone().requires_grad_()
        ref = fastloss.token_logprobs(full, t, **kw)
        ref = ref if isinstance(ref, tuple) else (ref,)
        dx = distribute_tensor(x.clone(), mesh, [Shard(1)]).requires_grad_()
        out = fastloss.token_logprobs(dx, distribute_tensor(t, mesh, [Replicate()]) if dt_tokens else t, **kw)
        out = out if isinstance(out, tuple) else (out,)
        assert len(out) == len(ref)
        for i, (a, b) in enumerate(zip(out, ref)):
            if b is None:
                assert a is None
                continue
            a = _full(a)
            assert a.dtype == b.dtype and a.shape == b.shape, (i, a.dtype, b.dtype)
            if b.dtype == torch.int64:
                assert torch.equal(a, b), (i, a, b)
                continue
            assert torch.equal(torch.isnan(a), torch.isnan(b)) and torch.equal(torch.isinf(a), torch.isinf(b)), i
            ok = torch.isfinite(b)
            assert _rel(a[ok], b[ok]) <= tol, (i, kw, _rel(a[ok], b[ok]))
        loss_ref = (ref[0][fin] * gl[fin].to(ref[0].dtype)).sum()
        loss = (out[0] * distribute_tensor(gl * fin, mesh, [Replicate()]).to(out[0].dtype)).sum()
        if entropy:
            loss_ref = loss_ref + (ref[1][fin] * gh[fin].to(ref[1].dtype)).sum()
            loss = loss + (out[1] * distribute_tensor(gh * fin, mesh, [Replicate()]).to(out[1].dtype)).sum()
        (g_ref,) = torch.autograd.grad(loss_ref, full)
        (g,) = torch.autograd.grad(loss, dx)
        g = _full(g)
        assert g.dtype == x.dtype and _rel(g[fin], g_ref[fin]) <= tol, (kw, _rel(g[fin], g_ref[fin]))
    # large logits (lse ~ 90 at T = 0.7) and confident rows (log p ~ -1e-13): the combination (lse_r travels in
    # float64) stays as close to the float64 truth as the single-process call (float32 accumulation) -- within
    # twice its error on every row.
    big, _, _ = _data(masked=False, seed=3)
    big = big * 2 + 60
    big[:4, 30] = 100.0
    tb = t.clone()
    tb[:4] = 30
    xb = big.to(dtype)
    truth = fastloss.token_logprobs(xb.double(), tb, temperature=0.7, return_entropy=True)
    ref = fastloss.token_logprobs(xb, tb, temperature=0.7, return_entropy=True)
    out = fastloss.token_logprobs(distribute_tensor(xb, mesh, [Shard(1)]), tb, temperature=0.7, return_entropy=True)
    for a, b, z in zip(out, ref, truth):
        a, b = _full(a).double(), b.double()
        assert (a - z).abs().max() <= 2 * (b - z).abs().max() + 1e-12, (dtype, (a - z).abs().max(), (b - z).abs().max())
    # a token outside the global vocabulary: the same clear error on every rank
    bad = t.clone()
    bad[3] = V
    with pytest.raises(IndexError, match="token 37 at position 3"):
        fastloss.token_logprobs(distribute_tensor(x.clone(), mesh, [Shard(1)]), bad)


def _check_errors(mesh):
    from torch.distributed.tensor import Shard, distribute_tensor

    logits, t, _ = _data()
    bad = t.clone()
    bad[3] = V
    dx = distribute_tensor(logits.clone(), mesh, [Shard(1)])
    with pytest.raises(IndexError, match="position 3"):
        fastloss.cross_entropy(dx, bad)
    with pytest.raises(ValueError, match="label_smoothing"):
        fastloss.cross_entropy(dx, t, loss="focal", label_smoothing=0.1)
    # the lse and z-loss term returned beside the loss (ignored rows: lse 0, as the single-process call)
    full = fastloss.cross_entropy(logits, t, z_loss=1e-3, return_lse=True, return_z_loss=True)
    got = fastloss.cross_entropy(dx, t, z_loss=1e-3, return_lse=True, return_z_loss=True)
    for a, b in zip(got, full):
        assert _rel(_full(a), b) < 1e-12
        # a DTensor target, replicated or sharded over the rows (redistributed to the rows' placements)
    from torch.distributed.tensor import Replicate

    ref = fastloss.cross_entropy(logits, t, z_loss=1e-3)
    for tp in (Replicate(), Shard(0)):
        out = fastloss.cross_entropy(dx, distribute_tensor(t, mesh, [tp]), z_loss=1e-3)
        assert _rel(out.full_tensor(), ref) < 1e-12, tp


def _check_inplace_row_ops(mesh):
    """The ops that write over their logits: rows sharded -> the local kernel, in place; classes sharded: an
    error (a redistribution would write into a temporary)."""
    from torch.distributed.tensor import Shard, distribute_tensor

    logits, t, _ = _data(masked=False)
    t0 = t.clamp_min(0)
    lp, ent, lse, _, _ = torch.ops.fastloss.token_logprobs_fwd(logits, t0, 0.7, True)
    gl = torch.linspace(0.5, 1.5, N, dtype=torch.float64)
    ref = torch.ops.fastloss.token_logprobs_bwd(gl, None, logits, t0, lse, ent, 0.7)
    x = distribute_tensor(logits.clone(), mesh, [Shard(0)])
    d = [distribute_tensor(v, mesh, [Shard(0)]) for v in (gl, t0, lse, ent)]
    torch.ops.fastloss.token_logprobs_bwd_(x, d[0], None, d[1], d[2], d[3], 0.7)
    assert _rel(x.full_tensor(), ref) < 1e-14
    teacher = logits.flip(0)
    scale = torch.full((N,), 0.25, dtype=torch.float64)
    loss_r, stats_r, g_r = torch.ops.fastloss.distill_fwd_grad(logits, teacher, t, scale, "jsd", 0.3, 1.0, -100,
                                                                0.5)
    x = distribute_tensor(logits.clone(), mesh, [Shard(0)])
    loss, stats = torch.ops.fastloss.distill_fwd_inplace_grad(
        x, distribute_tensor(teacher, mesh, [Shard(0)]), distribute_tensor(t, mesh, [Shard(0)]),
        distribute_tensor(scale, mesh, [Shard(0)]), "jsd", 0.3, 1.0, -100, 0.5)
    assert _rel(loss.full_tensor(), loss_r) < 1e-14 and _rel(x.full_tensor(), g_r) < 1e-14
    xv = distribute_tensor(logits.clone(), mesh, [Shard(1)])
    with pytest.raises(NotImplementedError, match="token_logprobs_bwd_.*classes"):
        torch.ops.fastloss.token_logprobs_bwd_(xv, distribute_tensor(gl, mesh, [Shard(0)]), None,
                                               distribute_tensor(t0, mesh, [Shard(0)]), d[2], d[3], 0.7)
    assert torch.ops.fastloss.resolve_algorithm(xv, -1, "auto") in ("online", "two_pass")


def _worker(rank, world):
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    _check_ce(mesh, torch.float64, 1e-12)
    _check_ce(mesh, torch.float32, 1e-5)
    _check_ce(mesh, torch.bfloat16, 2 ** -7)
    _check_ce_inplace(mesh)
    _check_linear(mesh, torch.float64, 1e-12)
    _check_linear(mesh, torch.bfloat16, 2 ** -6)
    _check_row_ops(mesh)
    _check_logprobs(mesh, torch.float64, 1e-12)
    _check_logprobs(mesh, torch.float32, 1e-6)
    _check_logprobs(mesh, torch.bfloat16, 2 ** -7)
    _check_linear_logprobs(mesh, torch.float64, 1e-12)
    _check_linear_logprobs(mesh, torch.bfloat16, 2 ** -6)
    _check_inplace_row_ops(mesh)
    _check_errors(mesh)


def test_every_op_has_a_dtensor_rule():
    import fastloss._dtensor as fd

    names = {s.name.split("::")[1] for s in torch._C._jit_get_all_schemas() if s.name.startswith("fastloss::")}
    assert names and names <= fd.covered_ops(), sorted(names - fd.covered_ops())


@pytest.mark.parametrize("world", [2, 3])
def test_dtensor_ops_match_single_process(world):
    spawn(_worker, world)


if __name__ == "__main__":  # python tests/test_dtensor.py 3
    w = int(sys.argv[1]) if len(sys.argv) > 1 else 2
    test_dtensor_ops_match_single_process(w)
    print("ok")

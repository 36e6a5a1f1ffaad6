"""Vocabulary-parallel cross-entropy ops in one process: torch.ops.fastloss.cross_entropy_shard_fwd /
cross_entropy_shard_loss / cross_entropy_shard_bwd on the shards of full logits [N, V], combined here as the
distributed layer combines them across ranks, against cross_entropy_fwd / cross_entropy_bwd on the full logits and
against the float64 references of fastloss.reference."""

from __future__ import annotations

import math

import pytest
import torch

import fastloss  # noqa: F401 (loads the ops)
from fastloss.reference import (ce_shard_bwd_ref, ce_shard_combine_ref, ce_shard_fwd_ref, ce_shard_loss_ref,
                                cross_entropy_rows_reference)

ops = torch.ops.fastloss
IGNORE = -100
DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
# relative-error norms: shard results against the full-vocabulary ops (same inputs, fp32 accumulation both ways),
# and against float64 on the same (rounded) inputs
TOL_FULL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 1e-2, torch.float16: 2e-3}
TOL_REF = {torch.float64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 1e-2, torch.float16: 2e-3}
LOSS_TOL = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 1e-6, torch.float16: 1e-6}
# shard boundaries [b_0 = 0, b_1, ..., V]: uneven, with an empty shard, and V = 1
SPLITS = {
    "two-uneven": (0, 29, 133),
    "three-empty": (0, 57, 57, 133),
    "three": (0, 1, 70, 131),
    "v1": (0, 0, 1),
}
LOSSES = {
    "ce": dict(loss="ce"),
    "smooth-weights": dict(loss="ce", label_smoothing=0.1, weight=True),
    "focal-weights": dict(loss="focal", loss_param=2.0, weight=True),
    "poly1": dict(loss="poly1", loss_param=1.0),
    "squentropy": dict(loss="squentropy"),
    "squentropy-weights": dict(loss="squentropy", weight=True),
}


def rel(got: torch.Tensor, ref: torch.Tensor, floor: float = 0.0) -> float:
    """||got - ref|| / max(||ref||, floor)."""
    got, ref = got.double(), ref.double()
    assert got.shape == ref.shape
    num = torch.linalg.vector_norm(got - ref).item()
    den = max(torch.linalg.vector_norm(ref).item(), floor)
    return num / den if den > 0 else num


def make(N, V, dtype, seed=0, scale=3.0, ignore=True, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(N, V, generator=g, dtype=torch.float64) * scale).to(dtype)
    t = torch.randint(0, V, (N,), generator=g)
    if ignore and N > 2:
        t[1] = IGNORE
        t[-1] = IGNORE
    w = torch.rand(V, generator=g, dtype=torch.float64) + 0.5
    return x.to(device), t.to(device), w.to(device)


def run_shards(x, t, weight, bounds, *, label_smoothing=0.0, z_loss=0.0, softcap=None, loss="ce", loss_param=0.0,
               algorithm="auto", grad_loss=None, grad_lse=None, ignore_index=IGNORE):
    """shard_fwd per shard, combine, shard_loss, shard_bwd per shard (concatenated)."""
    V = x.shape[1]
    wdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    w = weight.to(wdt) if weight is not None else None
    shards = list(zip(bounds[:-1], bounds[1:]))
    stats = [ops.cross_entropy_shard_fwd(x[:, a:b], t, w[a:b] if w is not None else None, a, ignore_index,
                                         label_smoothing, softcap, algorithm, loss) for a, b in shards]
    rows = ce_shard_combine_ref(stats, t, w, ignore_index, label_smoothing, loss)
    ws = w.double().sum() if w is not None else None
    out = ops.cross_entropy_shard_loss(rows, t, ws, V, ignore_index, label_smoothing, z_loss, loss, loss_param)
    N = x.shape[0]
    if grad_loss is None:
        grad_loss = torch.linspace(0.5, 1.5, N, dtype=torch.float64, device=x.device)
    grads = [ops.cross_entropy_shard_bwd(grad_loss, grad_lse, x[:, a:b], t, w[a:b] if w is not None else None, rows,
                                         ws, a, V, ignore_index, label_smoothing, z_loss, softcap, loss, loss_param)
             for a, b in shards]
    return stats, rows, out, torch.cat(grads, 1), grad_loss


def full_ops(x, t, weight, *, label_smoothing=0.0, z_loss=0.0, softcap=None, loss="ce", loss_param=0.0,
             grad_loss=None, grad_lse=None, ignore_index=IGNORE):
    wdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    w = weight.to(wdt) if weight is not None else None
    lo, lse, sq = ops.cross_entropy_fwd(x, t, w, ignore_index, label_smoothing, z_loss, softcap, "online", loss,
                                        loss_param)
    g = ops.cross_entropy_bwd(grad_loss, grad_lse, x, t, w, lse, ignore_index, label_smoothing, z_loss, softcap,
                              loss, loss_param, sq if sq.numel() else None)
    return lo, lse, g


def reference_loss(x, t, weight, **kw):
    """Per-row float64 loss of the full vocabulary from torch."""
    return cross_entropy_rows_reference(x.double(), t, weight=weight.double() if weight is not None else None,
                                        ignore_index=IGNORE, **kw)


@pytest.mark.parametrize("extra", ["plain", "softcap+z"])
@pytest.mark.parametrize("split", list(SPLITS))
@pytest.mark.parametrize("kind", list(LOSSES))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_shards_match_full_vocabulary(dtype, kind, split, extra, device):
    cfg = dict(LOSSES[kind])
    use_w = cfg.pop("weight", False)
    bounds = SPLITS[split]
    V = bounds[-1]
    x, t, w = make(11, V, dtype, seed=sum(map(ord, kind + split + extra)), device=device)
    weight = w if use_w else None
    if extra == "softcap+z":
        cfg.update(softcap=4.0, z_loss=1e-3)
    alg = "two_pass" if split == "three" else "auto"
    grad_lse = torch.linspace(-0.3, 0.2, x.shape[0], dtype=torch.float64, device=device) if extra == "plain" else None
    stats, rows, out, grad, gl = run_shards(x, t, weight, bounds, algorithm=alg, grad_lse=grad_lse, **cfg)
    lo, lse, gfull = full_ops(x, t, weight, grad_loss=gl, grad_lse=grad_lse, **cfg)

    assert out.dtype == torch.float64 and out.shape == (x.shape[0],)
    assert grad.dtype == dtype and grad.shape == x.shape
    valid = t != IGNORE
    assert (out[~valid] == 0).all() and (grad[~valid] == 0).all()
    assert rel(out, lo) <= LOSS_TOL[dtype]
    assert rel(rows[valid, 0], lse[valid]) <= LOSS_TOL[dtype]
    assert rel(grad, gfull) <= TOL_FULL[dtype]

    # float64 references on the same (rounded) inputs
    ref = reference_loss(x, t, weight, softcap=cfg.get("softcap"), z_loss=cfg.get("z_loss", 0.0),
                         label_smoothing=cfg.get("label_smoothing", 0.0), loss=cfg["loss"],
                         loss_param=cfg.get("loss_param", 0.0))
    assert rel(out, ref) <= LOSS_TOL[dtype] * 10
    kw = dict(label_smoothing=cfg.get("label_smoothing", 0.0), softcap=cfg.get("softcap"), loss=cfg["loss"])
    stats_ref = [ce_shard_fwd_ref(x[:, a:b], t, w[a:b] if use_w else None, a, IGNORE, **kw)
                 for a, b in zip(bounds[:-1], bounds[1:])]
    rows_ref = ce_shard_combine_ref(stats_ref, t, w if use_w else None, IGNORE, kw["label_smoothing"], cfg["loss"])
    assert rel(rows, rows_ref) <= LOSS_TOL[dtype] * 10
    ws = w.sum() if use_w else None
    loss_ref = ce_shard_loss_ref(rows_ref, t, ws, V, IGNORE, kw["label_smoothing"], cfg.get("z_loss", 0.0),
                                 cfg["loss"], cfg.get("loss_param", 0.0))
    assert rel(out, loss_ref) <= LOSS_TOL[dtype] * 10
    gref = torch.cat([ce_shard_bwd_ref(gl, grad_lse, x[:, a:b], t, w[a:b] if use_w else None, rows_ref, ws, a, V,
                                       IGNORE, kw["label_smoothing"], cfg.get("z_loss", 0.0), kw["softcap"],
                                       cfg["loss"], cfg.get("loss_param", 0.0))
                      for a, b in zip(bounds[:-1], bounds[1:])], 1)
    # (V = 1: p = 1 and the gradient is a small difference, a - c_t + 2 z lse: relative to the incoming gradient)
    assert rel(grad, gref, floor=torch.linalg.vector_norm(gl).item()) <= TOL_REF[dtype]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("loss", ["ce", "squentropy"])
def test_stats_layout(dtype, loss, device):
    x, t, w = make(9, 45, dtype, seed=3, device=device)
    t[2] = 40  # another shard's target
    t[3] = -7  # negative, not ignore_index: not owned, never read
    smooth = 0.2 if loss == "ce" else 0.0
    wdt = torch.float64 if dtype == torch.float64 else torch.float32
    st = ops.cross_entropy_shard_fwd(x[:, 10:30], t, w[10:30].to(wdt), 10, IGNORE, smooth, None, "online", loss)
    ref = ce_shard_fwd_ref(x[:, 10:30], t, w[10:30], 10, IGNORE, smooth, None, loss)
    assert st.dtype == torch.float64 and st.shape == (9, 4)
    assert (st[1] == 0).all() and (st[-1] == 0).all()  # ignored rows
    assert st[2, 2] == 0 and st[3, 2] == 0
    valid = t != IGNORE
    own = valid & (t >= 10) & (t < 30)
    assert torch.equal(st[own, 2], x[own, t[own]].double()) and (st[~own, 2] == 0).all()
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    assert rel(st[valid], ref[valid]) <= tol
    assert torch.equal(st[valid, 0], ref[valid, 0])  # the max is exact


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_empty_shard_and_empty_batch(dtype, device):
    x, t, _ = make(5, 8, dtype, device=device)
    st = ops.cross_entropy_shard_fwd(x[:, 3:3], t, None, 3, IGNORE, 0.1, None)
    valid = t != IGNORE
    assert st.shape == (5, 4)
    assert (st[valid, 0] == -math.inf).all() and (st[valid, 1:] == 0).all() and (st[~valid] == 0).all()
    rows = torch.zeros(5, 4, dtype=torch.float64, device=device)
    ones = torch.ones(5, dtype=torch.float64, device=device)
    g = ops.cross_entropy_shard_bwd(ones, None, x[:, 3:3], t, None, rows, None, 3, 8, IGNORE, 0.0, 0.0, None)
    assert g.shape == (5, 0) and g.dtype == dtype
    # N = 0
    e = x[:0]
    st = ops.cross_entropy_shard_fwd(e, t[:0], None, 0, IGNORE, 0.0, None)
    assert st.shape == (0, 4) and st.dtype == torch.float64
    lo = ops.cross_entropy_shard_loss(st, t[:0], None, 8, IGNORE, 0.0, 0.0)
    assert lo.shape == (0,) and lo.dtype == torch.float64
    g = ops.cross_entropy_shard_bwd(lo, None, e, t[:0], None, st, None, 0, 8, IGNORE, 0.0, 0.0, None)
    assert g.shape == (0, 8)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("loss", ["ce", "focal", "squentropy"])
def test_masked_vocabulary_and_all_inf_shard(dtype, loss, device):
    """-inf logits (a masked vocabulary), and rows whose second shard is all -inf."""
    x, t, _ = make(8, 50, dtype, seed=5, device=device)
    x[:, 7] = -math.inf
    x[::2, 20:] = -math.inf
    t[::2] = t[::2] % 20  # targets of the masked rows in the live shard
    t[1] = IGNORE
    param = 2.0 if loss == "focal" else 0.0
    stats, rows, out, grad, gl = run_shards(x, t, None, (0, 20, 50), loss=loss, loss_param=param, softcap=6.0)
    assert (stats[1][::2, 0] == -math.inf).all() and (stats[1][::2, 1:] == 0).all()  # the all -inf shard
    lo, _, gfull = full_ops(x, t, None, loss=loss, loss_param=param, softcap=6.0, grad_loss=gl)
    assert torch.isfinite(out).all() and torch.isfinite(grad).all()
    assert rel(out, lo) <= LOSS_TOL[dtype]
    assert rel(grad, gfull) <= TOL_FULL[dtype]
    assert (grad[:, 7] == 0).all() and (grad[::2, 20:] == 0).all()
    ref = reference_loss(x, t, None, softcap=6.0, z_loss=0.0, label_smoothing=0.0, loss=loss, loss_param=param)
    assert rel(out, ref) <= LOSS_TOL[dtype] * 10


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16], ids=str)
def test_huge_magnitudes(dtype, device):
    x, t, w = make(7, 61, dtype, seed=9, device=device)
    x = (x.double() + 1e4).to(dtype)
    for kw in (dict(label_smoothing=0.1, weight=w), dict(loss="squentropy", weight=None), dict(weight=None)):
        weight = kw.pop("weight")
        _, rows, out, grad, gl = run_shards(x, t, weight, (0, 30, 61), **kw)
        lo, _, gfull = full_ops(x, t, weight, grad_loss=gl, **kw)
        assert rel(out, lo) <= 1e-6
        assert rel(grad, gfull) <= TOL_FULL[dtype]
        ref = reference_loss(x, t, weight, softcap=None, z_loss=0.0, label_smoothing=kw.get("label_smoothing", 0.0),
                             loss=kw.get("loss", "ce"), loss_param=0.0)
        assert rel(out, ref) <= 1e-6


def test_nan_propagates(device):
    x, t, _ = make(6, 40, torch.float32, seed=2, device=device)
    t[:] = torch.tensor([3, 25, 5, 33, 1, 39])
    x[0, 30] = math.nan  # another shard's NaN
    x[2, 35] = math.nan
    for loss in ("ce", "squentropy"):
        _, rows, out, grad, _ = run_shards(x, t, None, (0, 30, 40), loss=loss)
        assert out[[0, 2]].isnan().all() and torch.isfinite(out[[1, 3, 4, 5]]).all()
        assert grad[[0, 2]].isnan().all() and torch.isfinite(grad[[1, 3, 4, 5]]).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_long_rows(dtype, device):
    """Rows long enough for the CUDA kernels' whole-block groups, V not a multiple of any vector width."""
    x, t, w = make(3, 5003, dtype, seed=4, device=device)
    for kw in (dict(label_smoothing=0.1, weight=w, softcap=20.0), dict(loss="squentropy", weight=None, z_loss=1e-4)):
        weight = kw.pop("weight")
        _, _, out, grad, gl = run_shards(x, t, weight, (0, 2501, 5003), algorithm="two_pass", **kw)
        lo, _, gfull = full_ops(x, t, weight, grad_loss=gl, **kw)
        assert rel(out, lo) <= LOSS_TOL[dtype]
        assert rel(grad, gfull) <= TOL_FULL[dtype]


def test_misaligned_views(device):
    """Shards that start off a 16-byte boundary (a column slice of the full logits, made contiguous by the op, and a
    contiguous view at storage offset 1)."""
    x, t, w = make(5, 301, torch.bfloat16, seed=8, device=device)
    buf = torch.empty(5 * 301 + 1, dtype=torch.bfloat16, device=device)
    xm = buf[1:].view(5, 301)
    xm.copy_(x)
    _, _, out, grad, gl = run_shards(xm, t, w, (0, 3, 301), label_smoothing=0.1)
    lo, _, gfull = full_ops(x, t, w, grad_loss=gl, label_smoothing=0.1)
    assert rel(out, lo) <= 1e-6 and rel(grad, gfull) <= 1e-2


def test_bad_arguments():
    x, t, w = make(4, 10, torch.float32)
    rows = torch.zeros(4, 4, dtype=torch.float64)
    g = torch.ones(4, dtype=torch.float64)
    msg = "fastloss.cross_entropy_shard"
    with pytest.raises(RuntimeError, match=msg + ".*floating-point"):
        ops.cross_entropy_shard_fwd(x.long(), t, None, 0, IGNORE, 0.0, None)
    with pytest.raises(RuntimeError, match=msg + ".*shape \\[N, C\\]"):
        ops.cross_entropy_shard_fwd(x[0], t, None, 0, IGNORE, 0.0, None)
    with pytest.raises(RuntimeError, match=msg + ".*`target` must have shape"):
        ops.cross_entropy_shard_fwd(x, t[:3], None, 0, IGNORE, 0.0, None)
    with pytest.raises(RuntimeError, match=msg + ".*int64"):
        ops.cross_entropy_shard_fwd(x, t.int(), None, 0, IGNORE, 0.0, None)
    with pytest.raises(RuntimeError, match=msg + ".*`weight` must have shape \\[C\\]"):
        ops.cross_entropy_shard_fwd(x, t, w[:5].float(), 0, IGNORE, 0.0, None)
    with pytest.raises(RuntimeError, match=msg + ".*`vocab_start` must be >= 0"):
        ops.cross_entropy_shard_fwd(x, t, None, -1, IGNORE, 0.0, None)
    with pytest.raises(RuntimeError, match=msg + ".*does not take label_smoothing"):
        ops.cross_entropy_shard_fwd(x, t, None, 0, IGNORE, 0.1, None, "auto", "focal")
    with pytest.raises(RuntimeError, match=msg + ".*`loss` must be"):
        ops.cross_entropy_shard_fwd(x, t, None, 0, IGNORE, 0.0, None, "auto", "nope")
    with pytest.raises(RuntimeError, match=msg + ".*`algorithm` must be"):
        ops.cross_entropy_shard_fwd(x, t, None, 0, IGNORE, 0.0, None, "fast")
    with pytest.raises(RuntimeError, match=msg + ".*`softcap` must be"):
        ops.cross_entropy_shard_fwd(x, t, None, 0, IGNORE, 0.0, -1.0)
    with pytest.raises(RuntimeError, match=msg + ".*`rows` must be float64"):
        ops.cross_entropy_shard_loss(rows.float(), t, None, 10, IGNORE, 0.0, 0.0)
    with pytest.raises(RuntimeError, match=msg + ".*`rows` must have shape \\[N, 4\\]"):
        ops.cross_entropy_shard_loss(rows[:, :3], t, None, 10, IGNORE, 0.0, 0.0)
    with pytest.raises(RuntimeError, match=msg + ".*`vocab_size`"):
        ops.cross_entropy_shard_loss(rows, t, None, 0, IGNORE, 0.0, 0.0)
    with pytest.raises(RuntimeError, match=msg + ".*`weight_sum` must be"):
        ops.cross_entropy_shard_loss(rows, t, torch.ones(2), 10, IGNORE, 0.0, 0.0)
    with pytest.raises(RuntimeError, match=msg + ".*`z_loss`"):
        ops.cross_entropy_shard_loss(rows, t, None, 10, IGNORE, 0.0, -1.0)
    with pytest.raises(IndexError, match=msg + ".*out of bounds for 10 classes"):
        ops.cross_entropy_shard_loss(rows, torch.tensor([0, 1, 10, 2]), None, 10, IGNORE, 0.0, 0.0)
    with pytest.raises(RuntimeError, match=msg + ".*`vocab_size` \\(12\\)"):
        ops.cross_entropy_shard_bwd(g, None, x, t, None, rows, None, 5, 12, IGNORE, 0.0, 0.0, None)
    with pytest.raises(RuntimeError, match=msg + ".*`grad_loss` must have one value per row"):
        ops.cross_entropy_shard_bwd(g[:2], None, x, t, None, rows, None, 0, 10, IGNORE, 0.0, 0.0, None)
    with pytest.raises(RuntimeError, match=msg + ".*`rows` must have shape"):
        ops.cross_entropy_shard_bwd(g, None, x, t, None, rows[:2], None, 0, 10, IGNORE, 0.0, 0.0, None)
    with pytest.raises(IndexError, match=msg + ".*out of bounds for 20 classes"):
        ops.cross_entropy_shard_bwd(g, None, x, torch.tensor([0, 1, 25, 2]), None, rows, None, 0, 20, IGNORE, 0.0,
                                    0.0, None)


def test_fake_kernels():
    from torch._subclasses.fake_tensor import FakeTensorMode

    x, t, w = make(6, 20, torch.bfloat16)
    w = w.float()
    mode = FakeTensorMode()
    fx, ft, fw = mode.from_tensor(x), mode.from_tensor(t), mode.from_tensor(w)
    with mode:
        st = ops.cross_entropy_shard_fwd(fx, ft, fw, 3, IGNORE, 0.1, 5.0)
        assert st.shape == (6, 4) and st.dtype == torch.float64
        lo = ops.cross_entropy_shard_loss(st, ft, None, 40, IGNORE, 0.1, 0.0)
        assert lo.shape == (6,) and lo.dtype == torch.float64
        g = ops.cross_entropy_shard_bwd(lo, None, fx, ft, fw, st, None, 3, 40, IGNORE, 0.1, 0.0, 5.0)
        assert g.shape == (6, 20) and g.dtype == torch.bfloat16
    rows = torch.zeros(6, 4, dtype=torch.float64)
    rows[:, 0] = 3.0
    args = {
        "cross_entropy_shard_fwd": (x, t, w, 3, IGNORE, 0.1, 5.0),
        "cross_entropy_shard_loss": (rows, t, None, 40, IGNORE, 0.1, 0.0),
        "cross_entropy_shard_bwd": (torch.ones(6, dtype=torch.float64), None, x, t, w, rows, None, 3, 40,
                                    IGNORE, 0.1, 0.0, 5.0),
    }
    for name, a in args.items():
        torch.library.opcheck(getattr(ops, name).default, a, test_utils=("test_schema", "test_faketensor"))

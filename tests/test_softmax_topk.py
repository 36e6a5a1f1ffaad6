"""fastloss.softmax_topk against torch.topk(torch.softmax(x)) in float64, with the documented tie order."""

import pytest
import torch
from conftest import TOL, rel_err

import fastloss

ALGS = ["online", "two_pass"]
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def _expected(x, k, dim):
    """float64 softmax values at the stable descending order of the logits: ties -> smaller index first, NaN
    first (torch.sort's NaN ordering), which is softmax_topk's documented ranking."""
    xd = x.double()
    idx = torch.sort(xd, dim=dim, descending=True, stable=True).indices.narrow(dim, 0, k)
    return torch.softmax(xd, dim).gather(dim, idx), idx


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("alg", ALGS)
@pytest.mark.parametrize("V,k", [(1, 1), (7, 3), (33, 5), (100, 1), (1000, 50), (1000, 1000), (4099, 5)])
def test_matches_softmax_then_topk(dtype, alg, V, k, device):
    g = torch.Generator().manual_seed(V + k)
    x = (torch.randn(6, V, generator=g, dtype=torch.float64) * 3).to(dtype).to(device)
    vals, idx = fastloss.softmax_topk(x, k, algorithm=alg)
    ev, ei = _expected(x, k, -1)
    assert vals.dtype == dtype and idx.dtype == torch.long and vals.shape == (6, k)
    assert torch.equal(idx.cpu(), ei.cpu())  # bf16 / fp16 rows have many ties: the order is still exact
    assert rel_err(vals.double(), ev) <= TOL[dtype]
    # and what torch itself gives (values; its tie order is unspecified)
    tv = torch.topk(torch.softmax(x.double(), -1), k, -1).values
    assert rel_err(vals.double(), tv) <= TOL[dtype]


@pytest.mark.parametrize("alg", ALGS)
def test_long_rows_and_other_dims(alg, device):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 70001, 2, generator=g).to(device)  # reduced dim in the middle, V not a vector multiple
    vals, idx = fastloss.softmax_topk(x, 7, dim=1, algorithm=alg)
    ev, ei = _expected(x, 7, 1)
    assert vals.shape == (3, 7, 2) and torch.equal(idx.cpu(), ei.cpu())
    assert rel_err(vals.double(), ev) <= TOL[torch.float32]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_winners_gathered_in_one_threads_columns(dtype, device):
    # The CUDA kernel's threads each keep their best 8 in registers; a thread that gives more of the k winners
    # rescans its share of the row. Here the largest logits (tied in fives) sit in the columns of one thread of the
    # 256 (every 256th 16-byte vector from the row's first 16-byte boundary): that thread gives 78 of k = 128 in
    # float32. Elsewhere (CPU kernels) just another row.
    V, k = 20011, 128
    g = torch.Generator().manual_seed(5)
    x = (torch.randn(2, V, generator=g, dtype=torch.float64) * 3).to(dtype).to(device)
    vec = 16 // x.element_size()
    for r in range(2):
        mis = (x.data_ptr() + r * V * x.element_size()) % 16
        head = 0 if mis == 0 else (16 - mis) // x.element_size()
        cols = torch.arange(head, V - vec + 1, device=device)
        cols = cols[((cols - head) // vec) % 256 == 0]
        x[r, cols] = (100 + (cols * 7 + r) % 5).to(dtype)
    vals, idx = fastloss.softmax_topk(x, k)
    ev, ei = _expected(x, k, -1)
    assert torch.equal(idx.cpu(), ei.cpu())
    assert rel_err(vals.double(), ev) <= TOL[dtype]


def test_ties_smaller_index_first(device):
    x = torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0], [0.0, 0.0, 0.0, 0.0, 0.0]], device=device)
    vals, idx = fastloss.softmax_topk(x, 4)
    assert idx.tolist() == [[1, 2, 4, 3], [0, 1, 2, 3]]
    assert torch.allclose(vals[1], torch.full((4,), 0.2, device=device))


def test_special_values(device):
    inf, nan = float("inf"), float("nan")
    x = torch.tensor([
        [-inf, 2.0, -inf, 1.0, 0.5],    # masked entries: probability 0, ranked last
        [-inf, -inf, -inf, -inf, -inf],  # no finite softmax: NaN, as torch.softmax
        [0.0, inf, 1.0, 2.0, 3.0],      # a +inf: NaN row, as torch.softmax
        [0.0, nan, 1.0, nan, 3.0],      # NaN ranks first, values NaN
        [1e30, -1e30, 3e38, -3e38, 0.0],  # huge magnitudes
    ], device=device)
    vals, idx = fastloss.softmax_topk(x, 3)
    ref = torch.softmax(x.double(), -1)
    assert idx[0].tolist() == [1, 3, 4] and torch.allclose(vals[0].double(), ref[0, [1, 3, 4]])
    assert vals[1].isnan().all() and vals[2].isnan().all() and vals[3].isnan().all()
    assert idx[3].tolist()[:2] == [1, 3]
    assert idx[4].tolist() == [2, 0, 4] and vals[4].tolist() == [1.0, 0.0, 0.0]
    _, idx_all = fastloss.softmax_topk(x[:1], 5)
    assert idx_all[0].tolist() == [1, 3, 4, 0, 2]  # the two -inf last, smaller index first


def test_edge_shapes(device):
    x = torch.randn(0, 10, device=device)
    v, i = fastloss.softmax_topk(x, 3)
    assert v.shape == (0, 3) and i.shape == (0, 3)
    v, i = fastloss.softmax_topk(torch.randn(4, 10, device=device), 0)
    assert v.shape == (4, 0)
    v, i = fastloss.softmax_topk(torch.tensor(2.5, device=device), 1)
    assert v.shape == () and v.item() == 1.0 and i.item() == 0
    v, i = fastloss.softmax_topk(torch.randn(5, 1, device=device), 1)
    assert torch.equal(v, torch.ones(5, 1, device=device)) and torch.equal(i, torch.zeros(5, 1, dtype=torch.long,
                                                                                            device=device))


def test_bad_input(device):
    x = torch.randn(3, 8, device=device)
    with pytest.raises(RuntimeError, match="`k` must be in \\[0, 8\\]"):
        fastloss.softmax_topk(x, 9)
    with pytest.raises(RuntimeError, match="`k`"):
        torch.ops.fastloss.softmax_topk(x, -1)
    with pytest.raises(TypeError, match="`k`"):
        fastloss.softmax_topk(x, 2.0)
    with pytest.raises(IndexError):
        fastloss.softmax_topk(x, 2, dim=2)
    with pytest.raises(RuntimeError, match="floating-point"):
        fastloss.softmax_topk(torch.ones(3, 8, dtype=torch.long, device=device), 2)


def test_gradient(device):
    x = torch.randn(4, 9, dtype=torch.float64, device=device, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: fastloss.softmax_topk(t, 3).values, (x,))
    xt = torch.randn(3, 11, 2, dtype=torch.float64, device=device, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: fastloss.softmax_topk(t, 4, dim=1).values, (xt,))
    # same gradient as torch's composite
    g = torch.randn(4, 3, dtype=torch.float64, device=device)
    (ga,) = torch.autograd.grad(fastloss.softmax_topk(x, 3).values, x, g)
    ref_v = torch.softmax(x, -1).gather(-1, fastloss.softmax_topk(x, 3).indices)
    (gr,) = torch.autograd.grad(ref_v, x, g)
    assert torch.allclose(ga, gr, rtol=1e-12, atol=1e-14)


def test_opcheck_and_compile(device):
    x = torch.randn(5, 37, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.fastloss.softmax_topk.default, (x, 4, -1, "auto"))
    eager = fastloss.softmax_topk(x.detach(), 4)
    compiled = torch.compile(lambda t: torch.ops.fastloss.softmax_topk(t, 4), fullgraph=True)(x.detach())
    assert torch.equal(eager.indices, compiled[1]) and torch.equal(eager.values, compiled[0])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fused_limit", ["0", "3"])
def test_composite_path_ranks_on_the_logits(dtype, fused_limit, device, monkeypatch):
    """k above the device's fused limit (128 on CUDA; FASTLOSS_TOPK_FUSED_LIMIT lowers it so every device runs the
    composite path): same order rule as the fused kernels, although bf16 / fp16 round distinct logits to equal
    probabilities."""
    monkeypatch.setenv("FASTLOSS_TOPK_FUSED_LIMIT", fused_limit)
    g = torch.Generator().manual_seed(7)
    V, k = 300, 40
    x = torch.randn(5, V, generator=g, dtype=torch.float64)
    # Row 0: logits in [0.01, 0.02] in random order, distinct in bf16 / fp16 (spacing ~6e-5 / ~8e-6 there) but
    # closer than those formats' probability resolution (2^-8 / 2^-11 relative): their probabilities tie.
    x[0] = 0.01 + 0.01 * torch.rand(V, generator=g, dtype=torch.float64)
    x[1, 17] = float("nan")  # NaN ranks first; the row's softmax is NaN
    x[2, ::3] = 1.0  # exact ties: smaller index first
    x = x.to(dtype)
    assert len(torch.unique(x[0])) > k  # distinct in the input dtype
    vals, idx = fastloss.softmax_topk(x.to(device), k)
    ev, ei = _expected(x, k, -1)
    assert torch.equal(idx.cpu(), ei)
    finite = torch.tensor([0, 2, 3, 4])
    assert rel_err(vals.cpu().double()[finite], ev[finite]) <= TOL[dtype]
    assert torch.isnan(vals[1]).all()


@pytest.mark.parametrize("alg", ALGS)
def test_large_logits_keep_float32_accuracy(alg, device):
    """Logits around 1e4: the row's lse must be formed in double (m + log d), as the CPU and cross-entropy
    kernels do; in float it would be off by ~1e-3 relative after exp(x - lse)."""
    g = torch.Generator().manual_seed(3)
    x = 1e4 + torch.randn(4, 5000, generator=g) * 2
    vals, idx = fastloss.softmax_topk(x.to(device), 8, algorithm=alg)
    ev, ei = _expected(x, 8, -1)
    assert torch.equal(idx.cpu(), ei)
    assert rel_err(vals.cpu().double(), ev) <= TOL[torch.float32]

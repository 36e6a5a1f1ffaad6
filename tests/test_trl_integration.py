"""fastloss.integrations.trl (issue #21): TRL's fused LM head and chunked divergence on fastloss's kernels.

The two stand-ins are checked against a float64 reference built from the full logits and against TRL's own
functions on the same inputs (values and gradients of every output, temperatures, logit_scale, bias, autocast),
then through TRL's ``add_fused_lm_head`` on a tiny model; the version / signature / output guards refuse what they
cannot map. The six trainers end to end: tests/test_trl_trainers.py. TRL is an extra package: these tests run in
the ``make test-stacks`` configuration (FASTLOSS_STACKS=1)."""

import math
import os
import warnings

import pytest
import torch
from conftest import rel_err

pytestmark = [pytest.mark.stacks,
              pytest.mark.skipif(os.environ.get("FASTLOSS_STACKS") != "1",
                                 reason="training-stack test: set FASTLOSS_STACKS=1 (make test-stacks)")]
trl = pytest.importorskip("trl")

from fastloss.integrations import trl as fl_trl  # noqa: E402
from trl.kernels.chunked_divergence import ChunkedDivergenceFunction as TRLDivergence  # noqa: E402
from trl.kernels.chunked_logprob import ChunkedLogProbFunction as TRLLogProbs  # noqa: E402

ALL = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
N, D, V = 23, 16, 101  # V odd: not a multiple of any vector width


@pytest.fixture(autouse=True)
def _unpatched():
    fl_trl.unpatch_trl()
    yield
    fl_trl.unpatch_trl()


def _inputs(dtype=torch.float64, bias=True, seed=0, n=N, v=V):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, D, generator=g, dtype=torch.float64).to(dtype)
    W = (torch.randn(v, D, generator=g, dtype=torch.float64) * 0.7).to(dtype)
    b = (torch.randn(v, generator=g, dtype=torch.float64) * 0.3).to(dtype) if bias else None
    t = torch.randint(0, v, (n,), generator=g)
    return h, W, b, t


def _reference(h, W, b, t, temperature, logit_scale):
    """Every TRL output in float64 from the full logits."""
    z = (h.double() @ W.double().t() + (b.double() if b is not None else 0)) * logit_scale / temperature
    logp = torch.log_softmax(z, -1)
    p = logp.exp()
    return (logp.gather(-1, t[:, None]).squeeze(-1), -(p * logp).sum(-1), torch.logsumexp(2 * logp, -1),
            z.mean(-1), z.argmax(-1) == t)


def _objective(outs, seed=5):
    """sum a * log_probs + c * entropy with fixed random a, c (the two differentiable outputs)."""
    g = torch.Generator().manual_seed(seed)
    lp, ent = outs[0], outs[1]
    a = torch.randn(lp.shape, generator=g, dtype=torch.float64)
    out = (lp.double() * a).sum()
    if ent is not None:
        out = out + (ent.double() * torch.randn(ent.shape, generator=g, dtype=torch.float64)).sum()
    return out


def _run(fn, h, W, b, t, temperature, logit_scale, outputs, softcap=None):
    leaves = [x.clone().requires_grad_() if x is not None else None for x in (h, W, b)]
    outs = fn.apply(leaves[0], leaves[1], leaves[2], t, temperature, 32768, softcap, logit_scale, outputs)
    grads = torch.autograd.grad(_objective(outs), [x for x in leaves if x is not None])
    return outs, grads


@pytest.mark.parametrize("outputs", [("log_probs",), ("log_probs", "entropy"), ALL])
@pytest.mark.parametrize("temperature,logit_scale", [(1.0, 1.0), (0.7, 1.0), (1.3, 0.0625)])
@pytest.mark.parametrize("bias", [True, False])
def test_logprobs_match_float64_reference_and_trl(outputs, temperature, logit_scale, bias):
    h, W, b, t = _inputs(bias=bias)
    ours, g_ours = _run(fl_trl._FastlossLogProbs, h, W, b, t, temperature, logit_scale, outputs)
    theirs, g_theirs = _run(TRLLogProbs, h, W, b, t, temperature, logit_scale, outputs)
    ref = _reference(h, W, b, t, temperature, logit_scale)
    for name, o, th, r in zip(ALL, ours, theirs, ref):
        if name not in outputs:
            assert o is None and th is None, name
            continue
        assert o.shape == th.shape == (N,) and o.dtype == th.dtype, name  # float32 (is_top1: bool), as TRL's
        if name == "is_top1":
            assert torch.equal(o, th) and torch.equal(o, r), name
            continue
        assert not (o.requires_grad and name not in ("log_probs", "entropy")), name
        # TRL keeps float32 statistics: both are float32-rounded float64 values
        assert rel_err(o.double(), r) <= 1e-6, name
        assert rel_err(o.double(), th.double()) <= 1e-6, name
    # gradients: against the float64 reference's (fastloss computes in float64 here, the outputs are float32 as
    # TRL's, so the incoming gradients are float32-rounded), and against TRL's (float32 statistics)
    leaves = [x.clone().requires_grad_() for x in (h, W, b) if x is not None]
    ref = _reference(*(leaves if bias else leaves + [None]), t, temperature, logit_scale)
    g_ref = torch.autograd.grad(_objective((ref[0], ref[1] if "entropy" in outputs else None)), leaves)
    for go, gt, gr in zip(g_ours, g_theirs, g_ref):
        assert go.dtype == gt.dtype
        assert rel_err(go, gr) <= 1e-6 and rel_err(go, gt) <= 1e-5


def test_logprobs_gradient_only_for_the_outputs_used():
    """TRL sets set_materialize_grads(False): an unused entropy adds no gradient, and a loss on the entropy alone
    gives the entropy's gradient only."""
    h, W, b, t = _inputs()
    for use in ("log_probs", "entropy"):
        per_fn = []
        for fn in (fl_trl._FastlossLogProbs, TRLLogProbs):
            hh = h.clone().requires_grad_()
            lp, ent, *_ = fn.apply(hh, W, b, t, 1.0, 32768, None, 1.0, ("log_probs", "entropy"))
            (lp if use == "log_probs" else ent).sum().backward()
            per_fn.append(hh.grad)
        assert rel_err(per_fn[0], per_fn[1]) <= 1e-6, use


def test_logprobs_under_bf16_autocast_within_bf16_bounds():
    """Under autocast TRL projects in bfloat16; so does fastloss (the weight cast to the autocast dtype). The two
    round differently (TRL rounds each tile's logits to bf16; fastloss's CPU chunks run in float32), so the bound is
    bf16's, against the float64 reference of the bf16-rounded operands."""
    h, W, b, t = _inputs(dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = fl_trl._FastlossLogProbs.apply(h, W, b, t, 1.0, 32768, None, 1.0, ALL)
        theirs = TRLLogProbs.apply(h, W, b, t, 1.0, 32768, None, 1.0, ALL)
    ref = _reference(h.bfloat16(), W.bfloat16(), b.bfloat16(), t, 1.0, 1.0)
    for name, o, th, r in zip(ALL[:4], ours, theirs, ref):
        assert o.dtype == torch.float32
        assert rel_err(o.double(), r) <= 2e-2 and rel_err(th.double(), r) <= 2e-2, name


@pytest.mark.parametrize("outputs", [("log_probs",), ALL])
@pytest.mark.parametrize("logit_scale", [1.0, 0.5])
def test_softcapped_head_on_fastloss(outputs, logit_scale):
    """Gemma's final_logit_softcapping: c * tanh(scale * logits / c) / T, values and gradients of every output
    against the float64 reference and TRL's own."""
    h, W, b, t = _inputs()
    h = h * 3  # logits of several softcaps: the cap bends them
    c = 2.5
    ours, g_ours = _run(fl_trl._FastlossLogProbs, h, W, b, t, 0.8, logit_scale, outputs, softcap=c)
    theirs, g_theirs = _run(TRLLogProbs, h, W, b, t, 0.8, logit_scale, outputs, softcap=c)
    leaves = [x.clone().requires_grad_() for x in (h, W, b)]
    logits = leaves[0].double() @ leaves[1].double().t() + leaves[2].double()
    capped = c * torch.tanh(logits * logit_scale / c)
    ref = _reference(capped, torch.eye(V, dtype=torch.float64), None, t, 0.8, 1.0)
    for name, o, th, r in zip(ALL, ours, theirs, ref):
        if name not in outputs:
            assert o is None and th is None
        elif name == "is_top1":
            assert torch.equal(o, th) and torch.equal(o, r)
        else:
            assert rel_err(o.double(), r) <= 1e-6 and rel_err(o.double(), th.double()) <= 1e-6, name
    g_ref = torch.autograd.grad(_objective((ref[0], ref[1] if "entropy" in outputs else None)), leaves)
    for go, gt, gr in zip(g_ours, g_theirs, g_ref):
        assert rel_err(go, gr) <= 1e-6 and rel_err(go, gt) <= 1e-5


@pytest.mark.parametrize("beta", [0.0, 0.4, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 0.8])
@pytest.mark.parametrize("caps", [(None, None), (2.0, None), (None, 3.0), (1.5, 2.5)])
def test_divergence_matches_trl(beta, temperature, caps):
    """Per-token divergence (gradients to the student) and the student's entropy, with TRL's logit scales and
    softcaps of either head (c tanh(scale * logits / c), then / T)."""
    hs, Ws, bs, _ = _inputs(seed=1)
    ht, Wt, bt, _ = _inputs(seed=2)
    hs, Wt = hs * 2, Wt * 1.5
    scales = (0.8, 1.0) if caps[0] else (1.0, 1.0)
    res = []
    for fn in (fl_trl._FastlossDivergence, TRLDivergence):
        leaves = [x.clone().requires_grad_() for x in (hs, Ws, bs)]
        div, ent = fn.apply(*leaves, ht, Wt, bt, beta, temperature, scales[0], caps[0], scales[1], caps[1])
        assert div.dtype == ent.dtype == torch.float32 and div.shape == ent.shape == (N,)
        assert not ent.requires_grad
        w = torch.linspace(0.5, 1.5, N, dtype=torch.float64)
        grads = torch.autograd.grad((div.double() * w).sum(), leaves)
        res.append((div, ent, grads))
    (d0, e0, g0), (d1, e1, g1) = res
    # the entropy against float64 (TRL's is float32 arithmetic: 2e-6 here), and TRL's within float32 bounds
    z = (hs.double() @ Ws.double().t() + bs.double()) * scales[0]
    if caps[0] is not None:
        z = caps[0] * torch.tanh(z / caps[0])
    logp = torch.log_softmax(z / temperature, -1)
    ref_ent = -(logp.exp() * logp).sum(-1)
    assert rel_err(e0.double(), ref_ent) <= 1e-6
    assert rel_err(d0.double(), d1.double()) <= 1e-5 and rel_err(e0.double(), e1.double()) <= 1e-5
    for a, c in zip(g0, g1):
        assert rel_err(a, c) <= 1e-5


def test_guards_refuse_what_they_cannot_map(monkeypatch):
    with monkeypatch.context() as m:
        m.setattr(trl, "__version__", "1.14.0")
        with pytest.raises(RuntimeError, match="TRL 1.14.0 is not supported"):
            fl_trl.patch_trl()
    assert not fl_trl.is_patched()
    import trl.trainer.utils as tu

    class Changed(torch.autograd.Function):
        @staticmethod
        def forward(ctx, hidden, weight, bias, targets, temperature, chunk_size, softcap, logit_scale, outputs,
                    new_option):
            raise AssertionError("not called")

    with monkeypatch.context() as m:
        m.setattr(tu, "_ChunkedLogProbFunction", Changed)
        with pytest.raises(RuntimeError, match="new_option"):
            fl_trl.patch_trl()
        assert tu._ChunkedLogProbFunction is Changed
    h, W, b, t = _inputs()
    with pytest.raises(RuntimeError, match="top5"):
        fl_trl._FastlossLogProbs.apply(h, W, b, t, 1.0, 32768, None, 1.0, ("log_probs", "top5"))


def test_patch_is_idempotent_and_reversible():
    import trl.trainer.distillation_trainer as td
    import trl.trainer.utils as tu

    own = (tu._ChunkedLogProbFunction, td.ChunkedDivergenceFunction)
    fl_trl.patch_trl()
    fl_trl.patch_trl()
    assert tu._ChunkedLogProbFunction is fl_trl._FastlossLogProbs
    assert td.ChunkedDivergenceFunction is fl_trl._FastlossDivergence
    fl_trl.unpatch_trl()
    assert (tu._ChunkedLogProbFunction, td.ChunkedDivergenceFunction) == own
    with fl_trl.use_fastloss():
        assert fl_trl.is_patched()
    assert not fl_trl.is_patched()


def _fastloss_events(fn):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out = fn()
    return out, sum(1 for e in prof.events() if e.name.startswith("fastloss::"))


def _tiny_model(family):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    common = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64)
    if family == "gemma2":  # final-logit softcapping (small, so that it bends these logits)
        cfg = transformers.Gemma2Config(**common, head_dim=8, final_logit_softcapping=0.75)
        return transformers.Gemma2ForCausalLM(cfg)
    if family == "cohere":  # logit_scale
        return transformers.CohereForCausalLM(transformers.CohereConfig(**common, logit_scale=0.25))
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))


@pytest.mark.parametrize("family", ["llama", "gemma2", "cohere"])
def test_fused_lm_head_of_a_tiny_model_runs_on_fastloss(family):
    from trl.trainer.utils import add_fused_lm_head

    model = _tiny_model(family)
    add_fused_lm_head(model, temperature=0.9, outputs=ALL)
    ids = torch.randint(0, 97, (3, 11))
    labels = ids.clone()
    labels[0, :4] = -100
    labels[2, 6:] = -100

    def step():
        model.zero_grad()
        out = model(input_ids=ids, labels=labels, fused_lm_head=True)
        (out.loss + out.entropy.sum() * 0.01).backward()
        return out, [p.grad.clone() for p in model.parameters()]

    (theirs, g_theirs), n_trl = _fastloss_events(step)
    with fl_trl.use_fastloss():
        (ours, g_ours), n_fl = _fastloss_events(step)
    assert n_trl == 0 and n_fl > 0
    assert torch.equal(ours.label_mask, theirs.label_mask)
    for name in ("loss",) + ALL:
        o, th = getattr(ours, name), getattr(theirs, name)
        if name == "is_top1":
            assert torch.equal(o, th)
        else:
            assert rel_err(o.double(), th.double()) <= 1e-5, name
    assert math.isfinite(theirs.loss.item())
    for a, c in zip(g_ours, g_theirs):
        assert rel_err(a, c) <= 1e-4


def test_no_warning_on_the_supported_path():
    h, W, b, t = _inputs()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fl_trl._FastlossLogProbs.apply(h, W, b, t, 1.0, 32768, None, 1.0, ("log_probs", "entropy"))


@pytest.mark.parametrize("order", ["patch_first", "fused_head_first"])
def test_with_the_transformers_patch_in_either_order(order):
    """A model given both fastloss's transformers patch and TRL's fused head: fused calls run on fastloss's token
    log-prob kernels, plain labelled calls on fastloss's cross-entropy, each with the unpatched model's values."""
    transformers = pytest.importorskip("transformers")
    from fastloss.integrations.transformers import patch
    from trl.trainer.utils import add_fused_lm_head

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    plain = transformers.LlamaForCausalLM(cfg)
    both = transformers.LlamaForCausalLM(cfg)
    both.load_state_dict(plain.state_dict())
    add_fused_lm_head(plain, outputs=("log_probs", "entropy"))
    if order == "patch_first":
        patch(both)
        add_fused_lm_head(both, outputs=("log_probs", "entropy"))
    else:
        add_fused_lm_head(both, outputs=("log_probs", "entropy"))
        patch(both)
    ids = torch.randint(0, 97, (2, 9))
    with fl_trl.use_fastloss():
        for fused in (True, False):
            ref, n_ref = _fastloss_events(lambda: plain(input_ids=ids, labels=ids, fused_lm_head=fused))
            got, n_got = _fastloss_events(lambda: both(input_ids=ids, labels=ids, fused_lm_head=fused))
            # fused: both on fastloss's token log-probs; plain labels: only the patched model on fastloss
            assert n_got > 0 and (n_ref > 0) == fused, (fused, n_ref, n_got)
            assert rel_err(got.loss, ref.loss) <= 1e-6, fused
            if fused:
                assert rel_err(got.entropy, ref.entropy) <= 1e-6


def test_log_probs_do_not_depend_on_the_outputs_asked_for():
    """A policy asking for the entropy and its reference model asking for log-probs only must give bitwise equal
    log-probs at equal weights (GRPO's ratio 1, RLOO's KL 0 at the first step), as TRL's kernels do."""
    h, W, b, t = _inputs(dtype=torch.float32, n=64, v=1001)
    runs = [fl_trl._FastlossLogProbs.apply(h, W, b, t, 0.9, 32768, None, 1.0, outs)[0]
            for outs in (("log_probs",), ("log_probs", "entropy"), ALL, ("log_probs", "is_top1"))]
    for lp in runs[1:]:
        assert torch.equal(lp, runs[0])

"""The transformers patch inside the stacks people train with: PEFT adapters (LoRA on attention and on the output
head, modules_to_save, disabled / merged / several adapters, DoRA), gradient checkpointing, autocast and
torch.compile. Each case against the same model unpatched: loss and every trainable parameter's gradient (float64
where the model allows it), plus a check that fastloss's ops ran -- or that the documented fallback warning was
raised and the model's own head ran.

Needs peft (``make test-stacks`` installs it; the FSDP2 / DDP cases are in test_training_stacks_distributed.py)."""

import copy
import warnings

import pytest
import torch
from conftest import causal_lm_loss_float64, rel_err

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from fastloss.integrations.transformers import DeferredLogitsFallbackWarning, patch, unpatch  # noqa: E402

pytestmark = pytest.mark.stacks

V, B, T = 311, 2, 12


def _llama(dtype=torch.float64):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(cfg).to(dtype)
    if dtype == torch.float64:
        model.loss_function = causal_lm_loss_float64
    return model


def _batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, V, (B, T), generator=g)
    labels = ids.clone()
    labels[0, :3] = -100
    labels[1, -4:] = -100
    return dict(input_ids=ids, labels=labels)


def _step(model, batch, seed=5):
    """Loss and trainable gradients of one training step; the seed makes dropout draw the same numbers in both."""
    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = model(**batch)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _fastloss_ran(model, batch) -> bool:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        model(**batch).loss.backward()
    model.zero_grad(set_to_none=True)
    return any(e.key.startswith("fastloss::cross_entropy") for e in prof.key_averages())


def _compare(ref, fl, batch, tol, *, fallback=None):
    """Same loss and gradients; fastloss ran (no fallback warning), or it warned matching ``fallback`` and ran
    nothing of its own."""
    loss_r, grads_r = _step(ref, batch)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", DeferredLogitsFallbackWarning)
        loss_f, grads_f = _step(fl, batch)
    said = [str(w.message) for w in caught if issubclass(w.category, DeferredLogitsFallbackWarning)]
    if fallback is None:
        assert not said, said
    else:
        assert said and all(fallback in s for s in said), said
    assert rel_err(loss_f.reshape(1), loss_r.reshape(1)) <= tol, (loss_f, loss_r)
    assert grads_r.keys() == grads_f.keys() and grads_r
    for n in grads_r:
        assert rel_err(grads_f[n], grads_r[n]) <= 10 * tol, n
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeferredLogitsFallbackWarning)
        assert _fastloss_ran(fl, batch) == (fallback is None)
    return loss_r, grads_r


# ---------------------------------------------------------------- PEFT


def _lora(targets, dropout=0.0, **extra):
    # init_lora_weights=False: B is random too, so an adapter that did not take part would change the loss.
    return peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=dropout,
                           init_lora_weights=False, **extra)


ATTN = ["q_proj", "v_proj"]
HEAD = ["q_proj", "v_proj", "lm_head"]


def _two_adapters(model):
    model.add_adapter("second", _lora(HEAD, dropout=0.2))
    model.set_adapter("second")  # a non-default active adapter


def _both_adapters(model):
    model.add_adapter("second", _lora(HEAD, dropout=0.2))
    model.base_model.set_adapter(["default", "second"])  # two active at once: two low-rank terms on the head


# name -> (LoraConfig, what to do to the PeftModel afterwards, fallback warning text or None)
PEFT_CASES = {
    "lora_attention": (_lora(ATTN), None, None),
    "lora_head_dropout0": (_lora(HEAD), None, None),
    "lora_head_dropout": (_lora(HEAD, dropout=0.3), None, None),
    "lora_head_bias": (_lora(HEAD, lora_bias=True), None, None),
    "lora_head_rslora": (_lora(HEAD, use_rslora=True), None, None),
    "modules_to_save_head": (_lora(ATTN, modules_to_save=["lm_head"]), None, None),
    "second_adapter_active": (_lora(HEAD), _two_adapters, None),
    "two_adapters_active": (_lora(HEAD), _both_adapters, None),
    "merged": (_lora(HEAD), lambda m: m.merge_adapter(), None),
    "dora_head": (_lora(HEAD, use_dora=True), None, "peft.tuners.lora.layer.Linear) runs the LoRA variant"),
    # another tuner on the head: its class is named, the model's own head runs
    "ia3_head": (peft.IA3Config(target_modules=["v_proj", "lm_head"], feedforward_modules=["lm_head"],
                                init_ia3_weights=False), None, "peft.tuners.ia3.layer.Linear, not an nn.Linear"),
}


def _peft_pair(case, order):
    config, then, _ = PEFT_CASES[case]
    base = _llama()
    models = []
    for patched in (False, True):
        m = copy.deepcopy(base)
        if patched and order == "before":
            patch(m)
        torch.manual_seed(1)  # the same adapter initialisation in both
        m = peft.get_peft_model(m, copy.deepcopy(config))
        if then is not None:
            then(m)
        # The input embeddings train too, so every case has gradients flowing through the head into the hidden
        # states (merged or disabled adapters leave no other trainable parameter).
        m.get_input_embeddings().weight.requires_grad_(True)
        if patched and order == "after":
            patch(m)
        models.append(m)
    return models


@pytest.mark.parametrize("order", ["before", "after"])
@pytest.mark.parametrize("case", list(PEFT_CASES))
def test_peft(case, order):
    """Every adapter case, with ``patch`` before or after ``get_peft_model``: the unpatched model's loss and
    gradients (LoRA's A and B on the head included), through fastloss or the warned fallback."""
    ref, fl = _peft_pair(case, order)
    _compare(ref, fl, _batch(), 1e-12, fallback=PEFT_CASES[case][2])


@pytest.mark.parametrize("order", ["before", "after"])
def test_peft_disabled_adapter(order):
    ref, fl = _peft_pair("lora_head_dropout", order)
    batch = _batch()
    with ref.disable_adapter(), fl.disable_adapter():
        loss_off, _ = _compare(ref, fl, batch, 1e-12)
    loss_on, _ = _compare(ref, fl, batch, 1e-12)
    assert not torch.allclose(loss_on, loss_off)  # the adapter does change the loss: the cases above are meaningful


def test_lora_head_adapter_trains():
    """The bug this guards: the head's LoRA factors got no gradient and the loss ignored them."""
    ref, fl = _peft_pair("lora_head_dropout0", "before")
    _, grads = _step(fl, _batch())
    for name in ("lm_head.lora_A.default.weight", "lm_head.lora_B.default.weight"):
        key = next(k for k in grads if k.endswith(name))
        assert grads[key].abs().max() > 0, key


def test_lora_head_dropout_draws_the_models_random_numbers():
    """Dropout on the head adapter: fastloss runs it where the model would, so a different seed changes both
    losses the same way, and the same seed gives the same loss."""
    ref, fl = _peft_pair("lora_head_dropout", "after")
    batch = _batch()
    for seed in (5, 6):
        loss_r, _ = _step(ref, batch, seed)
        loss_f, _ = _step(fl, batch, seed)
        assert rel_err(loss_f.reshape(1), loss_r.reshape(1)) <= 1e-12
    assert _step(fl, batch, 5)[0] != _step(fl, batch, 6)[0]


def test_unpatch_after_peft():
    ref, fl = _peft_pair("lora_head_dropout0", "before")
    batch = _batch()
    unpatch(fl)
    assert not _fastloss_ran(fl, batch)
    assert torch.equal(_step(fl, batch)[0], _step(ref, batch)[0])


def test_peft_forward_replaced_on_the_class_is_a_fallback(monkeypatch):
    """fastloss copies what PEFT's own LoRA forward computes: a forward replaced on the class (another library's
    patch) is not trusted by the class name alone."""
    from peft.tuners.lora import layer

    original = layer.Linear.forward

    def halved(self, x, *args, **kwargs):
        return original(self, x, *args, **kwargs) * 0.5

    monkeypatch.setattr(layer.Linear, "forward", halved)
    ref, fl = _peft_pair("lora_head_dropout0", "before")
    _compare(ref, fl, _batch(), 1e-12, fallback="whose forward is not PEFT's own")


def test_float32_adapters_on_a_bf16_model():
    """PEFT keeps the adapters float32 on a bf16 base (autocast_adapter_dtype): their gradients stay float32 and
    agree with the model's own to float32 rounding of the same bf16 upstream gradients."""
    base = _llama(torch.float32).to(torch.bfloat16)
    models = []
    for patched in (False, True):
        m = patch(copy.deepcopy(base)) if patched else copy.deepcopy(base)
        torch.manual_seed(1)
        models.append(peft.get_peft_model(m, _lora(HEAD)))
    ref, fl = models
    assert ref.base_model.model.lm_head.lora_B["default"].weight.dtype == torch.float32
    batch = _batch()
    loss_r, grads_r = _step(ref, batch)
    loss_f, grads_f = _step(fl, batch)
    assert rel_err(loss_f.reshape(1), loss_r.reshape(1)) <= 2 ** -8
    for n in grads_r:
        assert grads_f[n].dtype == grads_r[n].dtype, n
        assert rel_err(grads_f[n].float(), grads_r[n].float()) <= 2 ** -4, n


def test_patch_of_a_model_and_of_its_wrapper():
    """patch on the PeftModel and on the transformers model inside it: the outer patched forward defers the head,
    the inner one runs the model's forward."""
    ref, fl = _peft_pair("lora_head_dropout", "after")
    patch(fl.base_model.model)
    _compare(ref, fl, _batch(), 1e-12)


# ---------------------------------------------------------------- heads fastloss does not know


class _ScaledHead(torch.nn.Linear):
    def forward(self, x):  # a subclass that changes the forward: fastloss cannot know what it computes
        return super().forward(x) * 0.5


def _forward_hook(module, args, output):
    return output * 2.0


def _replace_forward(model):
    head = model.lm_head
    inner = head.forward
    head.forward = lambda x: inner(x) + 1.0


def _swap_head(model):
    old = model.lm_head
    model.lm_head = _ScaledHead(old.in_features, old.out_features, bias=False, dtype=old.weight.dtype)
    model.lm_head.weight = old.weight


UNKNOWN_HEADS = {
    "forward_hook": (lambda m: m.lm_head.register_forward_hook(_forward_hook),
                     "forward hook test_training_stacks._forward_hook"),
    "forward_pre_hook": (lambda m: m.lm_head.register_forward_pre_hook(lambda mod, args: None),
                         "forward pre-hook test_training_stacks.<lambda>"),
    "backward_hook": (lambda m: m.lm_head.register_full_backward_hook(lambda mod, gi, go: None),
                      "backward hook"),
    "replaced_forward": (_replace_forward, "has its forward replaced on the instance"),
    "subclass": (_swap_head, "test_training_stacks._ScaledHead, not an nn.Linear with nn.Linear's forward"),
}


@pytest.mark.parametrize("order", ["before", "after"])
@pytest.mark.parametrize("case", list(UNKNOWN_HEADS))
def test_unknown_head_runs_the_models_own_head(case, order):
    """A head fastloss cannot prove it reproduces: the model's own head and loss run, with a warning naming the
    class or hook; the loss is the model's own."""
    change, said = UNKNOWN_HEADS[case]
    ref, fl = _llama(), _llama()
    if order == "before":
        patch(fl)
    change(ref)
    change(fl)
    if order == "after":
        patch(fl)
    _compare(ref, fl, _batch(), 1e-12, fallback=said)


def test_global_forward_hook_is_a_fallback():
    ref, fl = _llama(), patch(_llama())
    handle = torch.nn.modules.module.register_module_forward_hook(lambda mod, args, out: None)
    try:
        _compare(ref, fl, _batch(), 1e-12, fallback="global forward hook")
    finally:
        handle.remove()


def test_parametrized_head_is_exact():
    """torch.nn.utils.parametrize on the head: reading its weight runs the parametrization, as its forward does."""

    class Double(torch.nn.Module):
        def forward(self, w):
            return 2 * w

    ref, fl = _llama(), patch(_llama())
    for m in (ref, fl):
        torch.nn.utils.parametrize.register_parametrization(m.lm_head, "weight", Double())
    _compare(ref, fl, _batch(), 1e-12)


def test_unpatch_of_a_copy_leaves_the_original_patched():
    fl = patch(_llama())
    twin = copy.deepcopy(fl)
    unpatch(twin)
    batch = _batch()
    assert "forward" not in vars(twin.lm_head) and not _fastloss_ran(twin, batch)
    assert _fastloss_ran(fl, batch)


def test_deep_copy_of_a_patched_model_uses_its_own_head():
    """The head's router is bound to its module: a copy made after ``patch`` (a reference model, an EMA copy)
    computes with its own weights."""
    fl = patch(_llama())
    twin = copy.deepcopy(fl)
    with torch.no_grad():
        twin.lm_head.weight.mul_(3.0)
    ref = _llama()
    with torch.no_grad():
        ref.lm_head.weight.mul_(3.0)
    batch = _batch()
    assert rel_err(twin(**batch).loss.reshape(1), ref(**batch).loss.reshape(1)) <= 1e-12
    assert rel_err(fl(**batch).loss.reshape(1), _llama()(**batch).loss.reshape(1)) <= 1e-12


# ---------------------------------------------------------------- gradient checkpointing, autocast


def _checkpointing(model, reentrant):
    enable = getattr(model, "activation_checkpointing_enable", None)
    kwargs = {"use_reentrant": reentrant}
    if enable is not None:
        enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


@pytest.mark.parametrize("reentrant", [True, False])
@pytest.mark.parametrize("head_lora", [False, True])
def test_gradient_checkpointing(reentrant, head_lora):
    if head_lora:
        ref, fl = _peft_pair("lora_head_dropout", "before")
    else:
        ref, fl = _llama(), patch(_llama())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers 5: gradient_checkpointing_* renamed
        for m in (ref, fl):
            _checkpointing(m, reentrant)
    _compare(ref, fl, _batch(), 1e-12)


def test_cpu_autocast_bf16():
    """Under autocast the model's head returns bf16 logits, fastloss computes in float32 from the same inputs: the
    two agree to bf16 accuracy (fastloss is the more accurate)."""
    ref, fl = _llama(torch.float32), patch(_llama(torch.float32))
    batch = _batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss_r, grads_r = _step(ref, batch)
        loss_f, grads_f = _step(fl, batch)
    assert loss_f.dtype == loss_r.dtype == torch.float32
    assert rel_err(loss_f.reshape(1), loss_r.reshape(1)) <= 2 ** -8
    for n in grads_r:
        assert rel_err(grads_f[n], grads_r[n]) <= 2 ** -4, n


def test_accelerate_prepare_bf16():
    """accelerate's Accelerator.prepare with bf16 mixed precision (autocast around the patched forward)."""
    accelerate = pytest.importorskip("accelerate")
    accelerator = accelerate.Accelerator(cpu=True, mixed_precision="bf16")
    ref, fl = _llama(torch.float32), patch(_llama(torch.float32))
    ref, fl = accelerator.prepare(ref), accelerator.prepare(fl)
    batch = _batch()
    loss_r, grads_r = _step(ref, batch)
    loss_f, grads_f = _step(fl, batch)
    assert rel_err(loss_f.reshape(1), loss_r.reshape(1)) <= 2 ** -8
    for n in grads_r:
        assert rel_err(grads_f[n], grads_r[n]) <= 2 ** -4, n
    assert _fastloss_ran(fl, batch)
    # unpatch keeps accelerate's wrapper (its autocast) around the forward: only fastloss leaves
    unpatch(fl)
    assert not _fastloss_ran(fl, batch)
    seen = []
    hook = fl.model.layers[0].self_attn.q_proj.register_forward_hook(lambda m, a, out: seen.append(out.dtype))
    fl(**batch)
    hook.remove()
    assert seen == [torch.bfloat16]


# ---------------------------------------------------------------- torch.compile


def _graph_breaks(model, batch) -> int:
    torch._dynamo.reset()
    explained = torch._dynamo.explain(lambda: model(**batch).loss)()
    return explained.graph_break_count


@pytest.mark.parametrize("case", ["dense", "lora_head"])
def test_compile_has_no_fastloss_graph_break(case):
    """A compiled training step of a patched model: no graph break (the unpatched model has none either), and
    loss and gradients equal eager."""
    if case == "dense":
        ref, fl = _llama(torch.float32), patch(_llama(torch.float32))
    else:
        ref, fl = _peft_pair("lora_head_dropout0", "before")
        ref, fl = ref.float(), fl.float()
    batch = _batch()
    try:
        assert _graph_breaks(ref, batch) == 0
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"torch.compile cannot trace this model here: {type(e).__name__}: {e}"[:300])
    assert _graph_breaks(fl, batch) == 0
    torch._dynamo.reset()
    compiled = torch.compile(fl, backend="aot_eager")  # the graphs dynamo captures; inductor adds only codegen
    loss_e, grads_e = _step(fl, batch)
    loss_c, _ = _step(compiled, batch)
    grads_c = {n: p.grad for n, p in fl.named_parameters() if p.grad is not None}
    assert rel_err(loss_c.reshape(1), loss_e.reshape(1)) <= 1e-6
    for n in grads_e:
        assert rel_err(grads_c[n], grads_e[n]) <= 1e-5, n
    loss_r, _ = _step(ref, batch)
    assert rel_err(loss_c.reshape(1), loss_r.reshape(1)) <= 2e-6

"""fastloss.integrations.transformers.patch on tiny randomly initialised causal LMs: same loss and gradients as the
unpatched model, with the model's own label shifting, -100 padding, num_items_in_batch, softcapping and
logits_to_keep; and the patched forward really runs fastloss's ops."""

import copy
import inspect
import warnings

import pytest
import torch
from conftest import causal_lm_loss_float64, rel_err

transformers = pytest.importorskip("transformers")

from fastloss.integrations.transformers import (  # noqa: E402
    DeferredLogitsFallbackWarning, is_patched, patch, unpatch)

V = 311  # not a multiple of any vector width
B, T = 2, 12


def _dims(**extra):
    base = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64)
    base.update(extra)
    return base


def _build(class_name, config_name, **cfg):
    """A tiny model of a family, or pytest.skip naming why this transformers cannot build it."""
    cls, cfg_cls = getattr(transformers, class_name, None), getattr(transformers, config_name, None)
    if cls is None or cfg_cls is None:
        pytest.skip(f"transformers {transformers.__version__} has no {class_name}")
    return cls(cfg_cls(**cfg))


def _llama():
    return _build("LlamaForCausalLM", "LlamaConfig", **_dims())


def _llama_tied():
    model = _build("LlamaForCausalLM", "LlamaConfig", **_dims(tie_word_embeddings=True))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return model


def _qwen2():
    return _build("Qwen2ForCausalLM", "Qwen2Config", **_dims())


def _mistral():
    return _build("MistralForCausalLM", "MistralConfig", **_dims())


def _gemma2():
    # A softcap small enough to bend random-init logits, so a missing softcap would show.
    return _build("Gemma2ForCausalLM", "Gemma2Config", **_dims(head_dim=8, final_logit_softcapping=0.75,
                                                               attn_implementation="eager"))


def _gpt2():
    return _build("GPT2LMHeadModel", "GPT2Config", vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                  bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0,
                  attn_pdrop=0.0)  # no dropout: both models must see the same network


def _moe(class_name, config_name, aux, **extra):
    # A large coefficient, so a dropped or mis-scaled aux loss shows in the loss and the router's gradients.
    # experts_implementation="eager" (transformers 5.x): torch's grouped_mm has no float64 kernel on the CPU.
    return _build(class_name, config_name, **_dims(output_router_logits=aux, router_aux_loss_coef=0.5,
                                                   experts_implementation="eager", **extra))


def _qwen3_moe(aux=True):
    return _moe("Qwen3MoeForCausalLM", "Qwen3MoeConfig", aux, head_dim=8, num_experts=4, num_experts_per_tok=2,
                moe_intermediate_size=16, decoder_sparse_step=1)


def _mixtral():
    return _moe("MixtralForCausalLM", "MixtralConfig", True, num_local_experts=4, num_experts_per_tok=2)


def _granite():
    return _build("GraniteForCausalLM", "GraniteConfig", **_dims(logits_scaling=0.25, embedding_multiplier=2.0,
                                                                 residual_multiplier=0.5, attention_multiplier=0.5))


def _cohere():
    return _build("CohereForCausalLM", "CohereConfig", **_dims(logit_scale=3.0))


def _llava():
    if not hasattr(transformers, "LlavaForConditionalGeneration"):
        pytest.skip(f"transformers {transformers.__version__} has no LlavaForConditionalGeneration")
    vision = transformers.CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                           num_attention_heads=2, image_size=16, patch_size=8)
    # image_token_index outside the ids the batches draw (< V - 1), so text-only batches carry no image token.
    config = transformers.LlavaConfig(vision_config=vision, text_config=transformers.LlamaConfig(**_dims()),
                                      image_token_index=V - 1)
    return transformers.LlavaForConditionalGeneration(config)


def _gemma3_multimodal():
    if not hasattr(transformers, "Gemma3ForConditionalGeneration"):
        pytest.skip(f"transformers {transformers.__version__} has no Gemma3ForConditionalGeneration")
    text = transformers.Gemma3TextConfig(**_dims(head_dim=8, final_logit_softcapping=0.75))
    vision = transformers.SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                             num_attention_heads=2, image_size=16, patch_size=8)
    config = transformers.Gemma3Config(text_config=text, vision_config=vision, image_token_index=V - 1,
                                       mm_tokens_per_image=4)
    return transformers.Gemma3ForConditionalGeneration(config)


# One tiny model per structurally different family: dense, tied embeddings, final-logit softcap, MoE with and
# without the router's aux loss, scaled logits (divided: Granite; multiplied: Cohere), a multimodal wrapper.
MODELS = {"llama": _llama, "llama_tied": _llama_tied, "qwen2": _qwen2, "mistral": _mistral, "gemma2": _gemma2,
          "gpt2": _gpt2, "qwen3_moe": _qwen3_moe, "qwen3_moe_no_aux": lambda: _qwen3_moe(aux=False),
          "mixtral": _mixtral, "granite": _granite, "cohere": _cohere, "llava": _llava,
          "gemma3_multimodal": _gemma3_multimodal}


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V - 1, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, -4:] = 0  # right padding in the second sequence
    labels = ids.clone()
    labels[1, -4:] = -100
    labels[0, :3] = -100  # a prompt that is not trained on
    return ids, mask, labels


def _pair(name, dtype):
    torch.manual_seed(0)
    ref = MODELS[name]().to(dtype)
    fl = patch(copy.deepcopy(ref))
    if dtype == torch.float64:
        # The model's own loss code runs under the patch too, so both get the float64 loss.
        ref.loss_function = fl.loss_function = causal_lm_loss_float64
    assert is_patched(fl) and not is_patched(ref)
    return ref, fl


def _loss_and_grads(model, **kw):
    model.zero_grad(set_to_none=True)
    out = model(**kw)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _fastloss_ops_ran(model, **kw):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        model(**kw).loss.backward()
    return any(e.key.startswith("fastloss::cross_entropy") for e in prof.key_averages())


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-11), (torch.float32, 2e-5)])
@pytest.mark.parametrize("items", [None, 13])
def test_loss_and_every_gradient_match_unpatched(name, dtype, tol, items):
    ref, fl = _pair(name, dtype)
    ids, mask, labels = _batch()
    kw = dict(input_ids=ids, attention_mask=mask, labels=labels)
    if items is not None:
        kw["num_items_in_batch"] = torch.tensor(items)
    out_r, g_r = _loss_and_grads(ref, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeferredLogitsFallbackWarning)  # the logits must never be built
        out_f, g_f = _loss_and_grads(fl, **kw)
    assert out_f.loss.dtype == out_r.loss.dtype
    assert out_f.logits is None  # never built
    if dtype == torch.float64 and out_r.loss.dtype == torch.float32:
        # The model computes its loss with its own code (Gemma 3's multimodal wrapper in transformers 4.x: .float(),
        # slicing, attention-mask selection, CrossEntropyLoss -- all deferred), rounding the float64 logits to
        # float32 where fastloss does not: agreement to float32 accuracy.
        tol = 2e-5
    assert type(out_f) is type(out_r)
    assert rel_err(out_f.loss.reshape(1), out_r.loss.reshape(1)) <= tol, (out_f.loss, out_r.loss)
    aux = getattr(out_r, "aux_loss", None)
    if aux is not None:  # MoE: the router's load-balancing loss, reported and included in the loss
        assert rel_err(out_f.aux_loss.reshape(1), aux.reshape(1)) <= tol
        assert len(out_f.router_logits) == len(out_r.router_logits)
    assert g_r.keys() == g_f.keys() and len(g_r) > 0
    for n in g_r:
        assert rel_err(g_f[n], g_r[n]) <= 10 * tol, n
    if dtype == torch.float32 and items is None:
        assert _fastloss_ops_ran(fl, **kw) and not _fastloss_ops_ran(ref, **kw)


def test_moe_aux_loss_is_part_of_the_loss():
    """Qwen3-MoE with output_router_logits: the patched loss includes coef * aux_loss (the bug this guards: a
    rewritten forward that dropped it), and output_router_logits given per call works as in the model."""
    ref, fl = _pair("qwen3_moe_no_aux", torch.float64)
    ids, mask, labels = _batch()
    kw = dict(input_ids=ids, attention_mask=mask, labels=labels)
    base_r, base_f = ref(**kw), fl(**kw)
    assert base_r.aux_loss is None and base_f.aux_loss is None
    with_r, with_f = ref(**kw, output_router_logits=True), fl(**kw, output_router_logits=True)
    assert with_f.aux_loss is not None and with_f.aux_loss > 0
    coef = ref.config.router_aux_loss_coef
    assert torch.allclose(with_f.loss, base_f.loss + coef * with_f.aux_loss, rtol=1e-12)
    assert torch.allclose(with_f.loss, with_r.loss, rtol=1e-12)


def test_logit_scaling_is_applied():
    """Granite divides the logits by logits_scaling, Cohere multiplies by logit_scale: supported, not refused,
    and a scale that is wrong by itself changes the loss (so the comparison above is meaningful)."""
    for name in ("granite", "cohere"):
        ref, fl = _pair(name, torch.float64)
        ids, mask, labels = _batch()
        kw = dict(input_ids=ids, attention_mask=mask, labels=labels)
        assert torch.allclose(fl(**kw).loss, ref(**kw).loss, rtol=1e-12)
        unscaled = copy.deepcopy(ref)
        unscaled.config.logits_scaling = 1.0
        if name == "cohere":
            unscaled.logit_scale = 1.0
        assert not torch.allclose(unscaled(**kw).loss, ref(**kw).loss, rtol=1e-3)


def test_patched_forward_runs_fastloss_ops():
    ref, fl = _pair("llama", torch.float32)
    ids, mask, labels = _batch()

    def op_names(model):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        return {e.key for e in prof.key_averages()}

    # Trainer reads the signature to pick dataset columns and to pass num_items_in_batch: it must not change.
    assert inspect.signature(fl.forward) == inspect.signature(ref.forward)
    assert any(k.startswith("fastloss::cross_entropy") for k in op_names(fl))
    assert not any(k.startswith("fastloss::") for k in op_names(ref))
    unpatch(fl)
    assert not is_patched(fl) and not any(k.startswith("fastloss::") for k in op_names(fl))


@pytest.mark.parametrize("name", ["llama", "gemma2", "gpt2"])
def test_without_labels_and_return_logits(name):
    ref, fl = _pair(name, torch.float64)
    ids, mask, labels = _batch()
    # No labels: the model's own forward (generation path), logits identical.
    assert torch.equal(fl(input_ids=ids, attention_mask=mask).logits, ref(input_ids=ids, attention_mask=mask).logits)
    patch(fl, return_logits=True)
    out_f = fl(input_ids=ids, attention_mask=mask, labels=labels)
    out_r = ref(input_ids=ids, attention_mask=mask, labels=labels)
    assert torch.allclose(out_f.logits, out_r.logits, rtol=1e-12, atol=1e-12)  # softcapped for Gemma 2
    assert torch.allclose(out_f.loss, out_r.loss, rtol=1e-12)
    # return_dict=False gives the same tuple layout (loss first).
    tup = fl(input_ids=ids, attention_mask=mask, labels=labels, return_dict=False)
    assert isinstance(tup, tuple) and torch.allclose(tup[0], out_r.loss, rtol=1e-12)


def test_logits_to_keep_and_shift_labels():
    ref, fl = _pair("qwen2", torch.float64)
    ids, mask, labels = _batch()
    keep = 5
    kw = dict(input_ids=ids, attention_mask=mask, labels=labels[:, -keep:], logits_to_keep=keep)
    assert torch.allclose(fl(**kw).loss, ref(**kw).loss, rtol=1e-12)
    shifted = torch.roll(labels, -1, dims=1)
    shifted[:, -1] = -100
    kw = dict(input_ids=ids, attention_mask=mask, labels=labels, shift_labels=shifted)
    assert torch.allclose(fl(**kw).loss, ref(**kw).loss, rtol=1e-12)


def test_refuses_non_linear_heads():
    _, fl = _pair("llama", torch.float32)
    with pytest.raises(TypeError, match="nn.Linear"):
        patch(transformers.LlamaModel(fl.config))


def _vocab_op_loss(logits, labels, vocab_size, **kwargs):
    """A loss that works over the vocabulary itself (log_softmax + nll): nothing fastloss can defer."""
    logp = torch.log_softmax(logits.float()[:, :-1, :], dim=-1)
    return torch.nn.functional.nll_loss(logp.reshape(-1, vocab_size), labels[:, 1:].reshape(-1))


def test_what_cannot_be_deferred_is_computed_in_full_and_said():
    ref, fl = _pair("gemma2", torch.float64)  # softcap recorded first, then replayed exactly
    ids, mask, labels = _batch()
    kw = dict(input_ids=ids, attention_mask=mask, labels=labels)
    ref.loss_function = fl.loss_function = _vocab_op_loss
    with pytest.warns(DeferredLogitsFallbackWarning, match="Gemma2ForCausalLM.*log_softmax"):
        out_f, g_f = _loss_and_grads(fl, **kw)
    out_r, g_r = _loss_and_grads(ref, **kw)
    # Same ops on the same values (the head's GEMM over the sliced rows only, so not always bit-identical).
    assert rel_err(out_f.loss.reshape(1), out_r.loss.reshape(1)) <= 1e-6
    for n in g_r:
        assert rel_err(g_f[n], g_r[n]) <= 1e-5, n
    # A loss that ignores the logits is the model's loss too (no fallback needed: nothing used them).
    ref.loss_function = fl.loss_function = lambda logits, labels, vocab_size, **k: torch.zeros((), dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeferredLogitsFallbackWarning)
        assert fl(**kw).loss.item() == 0.0


def test_trainer_with_gradient_accumulation(tmp_path):
    pytest.importorskip("accelerate")
    ids, mask, labels = _batch()
    rows = [{"input_ids": ids[i % B], "attention_mask": mask[i % B], "labels": labels[i % B]} for i in range(8)]

    def train(model, sub):
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path / sub), per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=2,
            learning_rate=1e-2, report_to=[], save_strategy="no", logging_steps=1, use_cpu=True, seed=0,
            dataloader_num_workers=0, disable_tqdm=True,
            optim="sgd")  # Adam turns ~1e-9 gradient noise on near-zero gradients into visible steps: compare with SGD
        trainer = transformers.Trainer(model=model, args=args, train_dataset=rows)
        assert trainer.model_accepts_loss_kwargs  # so num_items_in_batch reaches the (patched) forward
        trainer.train()
        return [h["loss"] for h in trainer.state.log_history if "loss" in h], model

    ref, fl = _pair("llama", torch.float32)
    losses_r, ref = train(ref, "ref")
    losses_f, fl = train(fl, "fl")
    assert len(losses_f) == len(losses_r) == 2
    assert losses_f == pytest.approx(losses_r, rel=1e-4)
    for (n, p), (_, q) in zip(ref.named_parameters(), fl.named_parameters()):
        assert rel_err(q.detach(), p.detach()) <= 1e-4, n


def test_bf16_model_gets_float32_loss():
    ref, fl = _pair("gemma2", torch.bfloat16)
    ids, mask, labels = _batch()
    out_r, g_r = _loss_and_grads(ref, input_ids=ids, attention_mask=mask, labels=labels)
    out_f, g_f = _loss_and_grads(fl, input_ids=ids, attention_mask=mask, labels=labels)
    # transformers upcasts bf16 logits to float32 for the loss; fastloss returns float32 without float32 logits
    # (and its logits are not rounded to bf16 first, so it is the more accurate of the two).
    assert out_f.loss.dtype == out_r.loss.dtype == torch.float32
    assert rel_err(out_f.loss.reshape(1), out_r.loss.reshape(1)) <= 2 ** -10
    for n in g_r:
        assert g_f[n].dtype == torch.bfloat16 and rel_err(g_f[n].float(), g_r[n].float()) <= 2 ** -5, n

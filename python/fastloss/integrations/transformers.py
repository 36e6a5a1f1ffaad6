"""Hugging Face transformers causal LMs trained with fastloss's chunked linear cross-entropy.

``patch(model)`` replaces the model instance's ``forward``. With ``labels`` (or ``shift_labels``) the new forward
runs the decoder, then computes the loss with :func:`fastloss.linear_cross_entropy` on the final hidden states and
the LM head's weight (and bias), so the (tokens x vocabulary) logits are never built. It keeps what the model's own
forward + ``ForCausalLMLoss`` do:

* labels shifted by one inside the model (padded with -100 at the end), or ``shift_labels`` used as given;
* ``ignore_index`` -100;
* ``num_items_in_batch`` (gradient-accumulation normalisation): a sum divided by it instead of a mean;
* ``logits_to_keep`` (int or index tensor) applied to the hidden states before the head;
* ``config.final_logit_softcapping`` (Gemma 2 / 3): ``cap * tanh(logits / cap)``;
* a float32 loss for bf16 / fp16 / fp32 models, as transformers gets by upcasting the logits (fastloss accumulates
  in float32 / float64 and casts the loss; it never upcasts the logits). A float64 model gets a float64 loss, where
  transformers' ``logits.float()`` would round to float32;
* the model's output class, ``return_dict=False`` tuples, and its caches / hidden states / attentions.

Without labels the original forward runs untouched (generation, evaluation without labels). ``logits`` are
``None`` when fastloss computed the loss, unless ``patch(model, return_logits=True)``.

Works with any causal LM whose forward is "decoder (``model.base_model``) -> ``lm_head`` -> ``loss_function``", the
pattern of transformers 4.46+ and 5.x: tested with Llama, Qwen2, Mistral, Gemma 2 and GPT-2 (transformers versions
in the README). Models whose head does more than a linear layer (+ softcapping) are refused at patch time.
"""

from __future__ import annotations

import functools
import inspect
import types
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from .. import functional as fl_functional

IGNORE_INDEX = -100
_ATTR = "_fastloss_patch"


@dataclass
class PatchConfig:
    return_logits: bool = False
    chunk_size: object = "auto"
    filter_eps: object = None
    algorithm: str = "auto"


# Model types whose lm_head output goes straight to the loss (after an optional final-logit softcap). A model type
# not listed is still accepted when its head is a plain nn.Linear and its config has no other logit transform;
# these are the ones a test covers.
TESTED_MODEL_TYPES = ("llama", "qwen2", "mistral", "gemma2", "gpt2")
# Config attributes that change the logits between lm_head and the loss in ways fastloss does not reproduce.
_UNSUPPORTED_CONFIG = ("logit_scale", "output_multiplier_scale", "logits_scaling", "mup_width_multiplier")


def patch(model: torch.nn.Module, *, return_logits: bool = False, chunk_size="auto", filter_eps=None,
          algorithm: str = "auto") -> torch.nn.Module:
    """Make ``model`` (a transformers ``*ForCausalLM`` instance) compute its training loss with fastloss.

    return_logits: also compute and return the logits when labels are given (costs what fastloss saves).
    chunk_size, filter_eps, algorithm: passed to :func:`fastloss.linear_cross_entropy`.
    Returns the model (patched in place). :func:`unpatch` restores it. Patching twice only updates the options.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, torch.nn.Linear):
        raise TypeError(f"fastloss.integrations.transformers.patch: {type(model).__name__} has no nn.Linear output "
                        f"head (get_output_embeddings() gave {type(head).__name__}); only causal LMs with a linear "
                        "head are supported")
    base = getattr(model, "base_model", None)
    if base is None or base is model:
        raise TypeError(f"fastloss.integrations.transformers.patch: {type(model).__name__} has no separate "
                        "decoder (base_model); pass a *ForCausalLM model")
    loss_fn = getattr(model, "loss_function", None)
    if loss_fn is not None and getattr(loss_fn, "__name__", "") != "ForCausalLMLoss":
        raise TypeError(f"fastloss.integrations.transformers.patch: {type(model).__name__}'s loss_function is "
                        f"{getattr(loss_fn, '__name__', loss_fn)!r}, not transformers' ForCausalLMLoss; fastloss "
                        "reproduces only that one")
    config = getattr(model, "config", None)
    for name in _UNSUPPORTED_CONFIG:
        val = getattr(config, name, None)
        if val not in (None, 1, 1.0):
            raise TypeError(f"fastloss.integrations.transformers.patch: {type(model).__name__} scales its logits "
                            f"(config.{name}={val!r}); fastloss would compute a different loss")
    cfg = PatchConfig(return_logits, chunk_size, filter_eps, algorithm)
    state = getattr(model, _ATTR, None)
    if state is not None:
        state["config"] = cfg
        return model
    original = model.forward  # bound method (possibly already wrapped by accelerate etc.)
    signature = inspect.signature(original)

    @functools.wraps(original)
    def forward(self, *args, **kwargs):
        return _patched_forward(self, original, signature, *args, **kwargs)

    # inspect.signature(model.forward) must stay the original's: Trainer drops dataset columns that are not
    # parameters, and looks for **kwargs to decide whether to pass num_items_in_batch. Bound to the model, the
    # first parameter is dropped, so the function's own signature carries a leading `self`.
    self_param = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)
    forward.__signature__ = signature.replace(parameters=[self_param, *signature.parameters.values()])

    setattr(model, _ATTR, {"config": cfg, "original": original, "had_instance_forward": "forward" in vars(model)})
    model.forward = types.MethodType(forward, model)
    return model


def unpatch(model: torch.nn.Module) -> torch.nn.Module:
    state = getattr(model, _ATTR, None)
    if state is None:
        return model
    if state["had_instance_forward"]:
        model.forward = state["original"]
    else:
        del model.forward
    delattr(model, _ATTR)
    return model


def is_patched(model: torch.nn.Module) -> bool:
    return getattr(model, _ATTR, None) is not None


def _patched_forward(self, original, signature, *args, **kwargs):
    bound = signature.bind(*args, **kwargs)
    arguments = dict(bound.arguments)
    for name, param in signature.parameters.items():  # flatten **kwargs into the named arguments
        if param.kind is inspect.Parameter.VAR_KEYWORD and name in arguments:
            arguments.update(arguments.pop(name))
    labels = arguments.pop("labels", None)
    if labels is None:  # no loss to compute: the model's own forward, logits and all
        return original(*args, **kwargs)
    shift_labels = arguments.pop("shift_labels", None)
    cfg: PatchConfig = getattr(self, _ATTR)["config"]
    logits_to_keep = arguments.pop("logits_to_keep", None)
    if logits_to_keep is None:
        logits_to_keep = arguments.pop("num_logits_to_keep", 0)
    num_items_in_batch = arguments.pop("num_items_in_batch", None)
    return_dict = arguments.pop("return_dict", None)
    if return_dict is None:
        return_dict = getattr(self.config, "return_dict", True)
    ignore_index = arguments.pop("ignore_index", IGNORE_INDEX)

    outputs = self.base_model(**arguments, return_dict=True)
    hidden = outputs.last_hidden_state if hasattr(outputs, "last_hidden_state") else outputs[0]
    hidden = _slice_logits_to_keep(hidden, logits_to_keep)

    if shift_labels is None:
        # ForCausalLMLoss: pad then shift, so the last position predicts nothing.
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    shift_labels = shift_labels.to(hidden.device)
    head = self.get_output_embeddings()
    softcap = getattr(self.config, "final_logit_softcapping", None)
    loss = fl_functional.linear_cross_entropy(
        hidden.reshape(-1, hidden.shape[-1]), head.weight, shift_labels.reshape(-1), linear_bias=head.bias,
        ignore_index=ignore_index, reduction="sum" if num_items_in_batch is not None else "mean",
        softcap=softcap, chunk_size=cfg.chunk_size, filter_eps=cfg.filter_eps, algorithm=cfg.algorithm,
        loss_dtype=torch.promote_types(hidden.dtype, torch.float32),
    )
    if num_items_in_batch is not None:
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        loss = loss / num_items_in_batch

    logits = None
    if cfg.return_logits:
        logits = head(hidden)
        if softcap is not None:
            logits = torch.tanh(logits / softcap) * softcap
    out = _output_class(outputs)(
        loss=loss, logits=logits, past_key_values=getattr(outputs, "past_key_values", None),
        hidden_states=getattr(outputs, "hidden_states", None), attentions=getattr(outputs, "attentions", None),
        **({"cross_attentions": outputs.cross_attentions} if hasattr(outputs, "cross_attentions") else {}),
    )
    return out if return_dict else out.to_tuple()


def _slice_logits_to_keep(hidden: torch.Tensor, logits_to_keep) -> torch.Tensor:
    try:  # transformers 5.x: ints, index tensors and (batch, seq) boolean masks
        from transformers.modeling_utils import slice_logits_to_keep
    except ImportError:  # 4.x: an int or a 1-D index tensor
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        return hidden[:, keep, :]
    return slice_logits_to_keep(hidden, logits_to_keep)


def _output_class(outputs):
    from transformers.modeling_outputs import CausalLMOutputWithCrossAttentions, CausalLMOutputWithPast

    return CausalLMOutputWithCrossAttentions if hasattr(outputs, "cross_attentions") else CausalLMOutputWithPast

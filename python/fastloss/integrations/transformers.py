"""Hugging Face transformers causal LMs trained with fastloss's chunked linear cross-entropy.

``patch(model)`` wraps the model instance's ``forward``. With ``labels`` (or ``shift_labels``) the model's **own**
forward runs, with one change: its output head returns :class:`DeferredLogits` instead of computing the logits.
Whatever the model's code then does with them (softcapping, logit scaling, the dtype cast, label shifting,
``num_items_in_batch``, ``logits_to_keep``, and the final ``F.cross_entropy`` of ``ForCausalLMLoss`` or of its own
loss code) is recorded, and the cross-entropy becomes :func:`fastloss.linear_cross_entropy` on the hidden states and
the head's weight, so the (tokens x vocabulary) logits are never built. Everything else the forward adds to or does
around the loss stays the model's own code: a Mixture-of-Experts router's load-balancing loss
(``router_aux_loss_coef * aux_loss``, ``aux_loss`` and ``router_logits`` in the output), caches, hidden states,
attentions, the output class and ``return_dict=False`` tuples.

Anything the deferred logits cannot reproduce lazily (an op over the vocabulary dimension, a learnable scale) makes
them compute the logits in full, exactly as the model would, with a ``DeferredLogitsFallbackWarning``: the loss is
always the model's own, only the memory saving can be lost, and never silently.

Without labels the original forward runs untouched (generation, evaluation without labels). ``logits`` in the
output are ``None`` when fastloss computed the loss, unless ``patch(model, return_logits=True)``.

Refused at patch time: models whose output head (``get_output_embeddings()``) is not an ``nn.Linear``.
"""

from __future__ import annotations

import functools
import inspect
import types
from dataclasses import dataclass

import torch

from ._deferred_logits import DeferredLogits, DeferredLogitsFallbackWarning

_ATTR = "_fastloss_patch"


@dataclass
class PatchConfig:
    return_logits: bool = False
    chunk_size: object = "auto"
    filter_eps: object = None
    algorithm: str = "auto"


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
    if arguments.get("labels") is None and arguments.get("shift_labels") is None:
        return original(*args, **kwargs)  # no loss to compute: the model's own forward, logits and all
    cfg: PatchConfig = getattr(self, _ATTR)["config"]
    head = self.get_output_embeddings()
    options = {"chunk_size": cfg.chunk_size, "filter_eps": cfg.filter_eps, "algorithm": cfg.algorithm}
    owner = type(self).__name__

    def deferred_head(hidden):
        return DeferredLogits(hidden, head.weight, head.bias, owner=owner, options=options)

    had_forward = "forward" in vars(head)
    previous = vars(head).get("forward")
    head.forward = deferred_head
    try:
        out = original(*args, **kwargs)
    finally:
        if had_forward:
            head.forward = previous
        else:
            del head.forward
    return _replace_deferred(out, cfg.return_logits)


def _replace_deferred(out, return_logits: bool):
    """The model's output with its DeferredLogits made real (return_logits) or removed (``logits=None``, as a
    model output without logits; dropped from a ``return_dict=False`` tuple, whose None fields are left out)."""

    def fix(v):
        return v.materialize() if return_logits else None

    if isinstance(out, tuple):
        items = [fix(v) if isinstance(v, DeferredLogits) else v for v in out]
        return tuple(v for v in items if v is not None)
    keys = list(out.keys()) if hasattr(out, "keys") else []
    if not any(isinstance(out[k], DeferredLogits) for k in keys):
        return out
    fields = {k: (fix(out[k]) if isinstance(out[k], DeferredLogits) else out[k]) for k in keys}
    return type(out)(**{k: v for k, v in fields.items() if v is not None})


__all__ = ["patch", "unpatch", "is_patched", "PatchConfig", "DeferredLogits", "DeferredLogitsFallbackWarning"]

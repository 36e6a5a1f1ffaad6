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
import warnings
from dataclasses import dataclass

import torch

from ._deferred_logits import DeferredLogits, DeferredLogitsFallbackWarning
from ._head import install_router, plan_head, qualified_name, remove_router

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
    if not isinstance(head, torch.nn.Module):
        raise TypeError(f"fastloss.integrations.transformers.patch: {qualified_name(model)} has no output head "
                        f"(get_output_embeddings() gave {qualified_name(head)}); only causal LMs whose head is an "
                        "nn.Linear (or a wrapper of one that fastloss knows) are supported")
    cfg = PatchConfig(return_logits, chunk_size, filter_eps, algorithm)
    state = _state(model, active_only=False)
    if state is not None:  # this model, or the model inside a wrapper of it (a PeftModel), is patched already
        state["config"], state["active"] = cfg, True  # (or was, under a wrapper that kept the patched forward)
        install_router(head)
        return model
    original = model.forward  # bound method (possibly already wrapped by accelerate etc.)
    signature = inspect.signature(original)

    # The original forward is read from the instance's state at each call, not from this closure: a deep copy of
    # the patched model (a reference or EMA model) must run its own forward, not this model's.
    @functools.wraps(original)
    def forward(self, *args, **kwargs):
        return _patched_forward(self, signature, *args, **kwargs)

    # inspect.signature(model.forward) must stay the original's: Trainer drops dataset columns that are not
    # parameters, and looks for **kwargs to decide whether to pass num_items_in_batch. Bound to the model, the
    # first parameter is dropped, so the function's own signature carries a leading `self`.
    self_param = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)
    forward.__signature__ = signature.replace(parameters=[self_param, *signature.parameters.values()])

    patched = types.MethodType(forward, model)
    setattr(model, _ATTR, {"config": cfg, "original": original, "had_instance_forward": "forward" in vars(model),
                           "patched": patched, "active": True})
    install_router(head)  # now rather than in the first (perhaps compiled) call: one recompilation less
    model.forward = patched
    return model


def _patched_module(model: torch.nn.Module):
    """The module ``patch`` was applied to: ``model`` or one inside it (``patch`` then ``get_peft_model``). Read
    from the instance dictionaries: a wrapper's attribute forwarding (PeftModel's) must not answer for it."""
    for m in model.modules():
        if _ATTR in vars(m):
            return m
    return None


def _state(model: torch.nn.Module, active_only: bool = True):
    m = _patched_module(model)
    state = None if m is None else vars(m)[_ATTR]
    return None if state is None or (active_only and not state["active"]) else state


def unpatch(model: torch.nn.Module) -> torch.nn.Module:
    """Undo :func:`patch` on ``model`` (or on the model inside a wrapper of it); returns ``model``.

    The patched forward is removed when it is still the model's forward. When something wrapped it after ``patch``
    (``accelerate.prepare``'s autocast, for one), removing it would remove that wrapper too: it stays in the chain
    and just calls the model's own forward from then on."""
    outer, model = model, _patched_module(model)
    if model is None:
        return outer
    state = vars(model)[_ATTR]
    for m in outer.modules():  # every head routed, copies included (PEFT's modules_to_save, deep copies)
        remove_router(m)
    current = vars(model).get("forward")
    if getattr(current, "__func__", None) is not state["patched"].__func__:
        state["active"] = False  # wrapped after patch: keep the wrapper, pass through
        return outer
    if state["had_instance_forward"]:
        model.forward = state["original"]
    else:
        del model.forward
    delattr(model, _ATTR)
    return outer


def is_patched(model: torch.nn.Module) -> bool:
    return _state(model) is not None


def _patched_forward(self, signature, *args, **kwargs):
    state = vars(self)[_ATTR]
    original = state["original"]
    bound = signature.bind(*args, **kwargs)
    arguments = dict(bound.arguments)
    for name, param in signature.parameters.items():  # flatten **kwargs into the named arguments
        if param.kind is inspect.Parameter.VAR_KEYWORD and name in arguments:
            arguments.update(arguments.pop(name))
    if arguments.get("labels") is None and arguments.get("shift_labels") is None:
        return original(*args, **kwargs)  # no loss to compute: the model's own forward, logits and all
    head = self.get_output_embeddings()
    if not state["active"] or vars(head).get("_fastloss_slot") is not None:
        # unpatched under a wrapper that kept this forward; or a patched forward inside another patched forward of
        # the same head (patch on a model and on a wrapper of it): the outer one defers the head
        return original(*args, **kwargs)
    cfg: PatchConfig = state["config"]
    owner = type(self).__name__
    plan = plan_head(head, f"{owner}'s output head")
    if isinstance(plan, str):  # the guarantee: only a head fastloss reproduces exactly is deferred
        warnings.warn(f"fastloss: {plan}, which fastloss cannot reproduce exactly; the model's own head and loss "
                      "ran (the loss is the model's own, without the memory saving)",
                      DeferredLogitsFallbackWarning, stacklevel=3)
        return original(*args, **kwargs)
    options = {"chunk_size": cfg.chunk_size, "filter_eps": cfg.filter_eps, "algorithm": cfg.algorithm}

    def first_call(x, *more, **kw):
        if more or kw:  # not an nn.Linear call: the head's own forward runs on it (and says what it thinks)
            warnings.warn(f"fastloss: {owner} calls its output head with extra arguments; its own forward ran "
                          "(the loss is the model's own, without the memory saving)",
                          DeferredLogitsFallbackWarning, stacklevel=3)
            return plan.run(lambda *r: type(plan.module).forward(plan.module, *r, **kw), (x, *more),
                            all_hooks=True)
        return DeferredLogits(plan, plan.rows(x), owner=owner, options=options)

    plan.defer(first_call)
    try:
        out = original(*args, **kwargs)
    finally:
        plan.undefer()
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

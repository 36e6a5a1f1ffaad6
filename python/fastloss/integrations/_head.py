"""What a model's output head computes, checked when the model is called: fastloss defers a head only when it can
reproduce that head's output exactly from its parts.

:func:`plan_head` looks at the head module as it is at call time (PEFT, FSDP, accelerate and torch.compile all
wrap a model after ``patch``) and gives either a :class:`HeadPlan` or the reason it cannot, naming the qualified
class or hook. Reproduced exactly:

* ``nn.Linear`` and subclasses that keep its ``forward`` (``torch.nn.utils.parametrize`` included: reading
  ``weight`` runs the parametrization, as the forward would);
* PEFT LoRA on the head (``peft.tuners.lora.layer.Linear``, plain LoRA on any number of active adapters, any
  dropout, ``lora_bias``, merged, disabled): ``x W^T + b + sum_k s_k B_k A_k dropout_k(x)`` is one linear map of the
  widened operands [x, s A dropout(x)] and [W, B], which :func:`fastloss.functional._linear_cross_entropy` takes as
  a low-rank block without building either the logits or [W, B]. Dropout runs when the model calls the head, so it
  draws the same random numbers as the model's own path;
* PEFT ``modules_to_save`` (``peft.utils.other.ModulesToSaveWrapper``): the active copy, or the original module;
* FSDP2 (``fully_shard``) on the head (any of the above), alone or grouped: the head's FSDP hooks are held back
  while the model's code calls the head (nothing to gather yet), and the loss then runs *inside* a second call of
  the head module, so FSDP gathers the parameters, casts the inputs (``MixedPrecisionPolicy``), registers its pre-
  and post-backward hooks on the loss and reshards afterwards, exactly as for a head that returned logits.

Anything else on the head -- another class or a wrapper, forward or backward hooks fastloss does not know
(module or global), a replaced instance ``forward`` (accelerate's hooks), a LoRA variant (DoRA, ...), mixed-adapter
batches -- is a reason: the caller then runs the model's own head and says why.
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as _module

__all__ = ["HeadPlan", "plan_head", "qualified_name", "install_router", "remove_router"]

_LORA_LINEAR = "peft.tuners.lora.layer.Linear"
_MODULES_TO_SAVE = "peft.utils.other.ModulesToSaveWrapper"
_DROPOUTS = (nn.Dropout, nn.Identity)


def qualified_name(obj) -> str:
    """``module.QualName`` of a class, of an object's class, or of a function / bound method / partial."""
    if isinstance(obj, functools.partial):
        return f"functools.partial({qualified_name(obj.func)})"
    target = obj if isinstance(obj, type) or callable(obj) and hasattr(obj, "__qualname__") else type(obj)
    return f"{getattr(target, '__module__', '?')}.{getattr(target, '__qualname__', type(target).__name__)}"


def _own_class(m) -> type:
    """m's class, seen through FSDP2's dynamic subclass (``fully_shard`` turns a ``Linear`` into an ``FSDPLinear``
    whose bases are (FSDPModule, Linear))."""
    cls = type(m)
    bases = cls.__bases__
    if len(bases) == 2 and bases[0] is _fsdp_module_class():
        return bases[1]
    return cls


@functools.lru_cache(maxsize=None)
def _fsdp_module_class() -> Optional[type]:
    try:
        from torch.distributed.fsdp import FSDPModule
    except Exception:  # noqa: BLE001  (a torch without torch.distributed: no FSDP2 either)
        return None
    return FSDPModule


def _describe(m) -> str:
    """A module's qualified class name for messages (``peft.tuners.lora.layer.Linear``, FSDP2's subclass noted)."""
    own = _own_class(m)
    return qualified_name(own) + (" sharded by FSDP2" if own is not type(m) else "")


def _fsdp_state_of(hook) -> Optional[object]:
    """The FSDP2 state a forward hook belongs to (its bound method, possibly behind functools.wraps wrappers such
    as FSDP's group hooks and torch._dynamo.disable), or None."""
    fn, seen = hook, 0
    while fn is not None and seen < 8:
        owner = getattr(fn, "__self__", None)
        if owner is not None and type(owner).__name__ == "FSDPState" \
                and type(owner).__module__.startswith("torch.distributed.fsdp"):
            return owner
        fn, seen = getattr(fn, "__wrapped__", None), seen + 1
    return None


def _global_hooks_problem() -> Optional[str]:
    for kind, hooks in (("global forward pre-hook", _module._global_forward_pre_hooks),
                        ("global forward hook", _module._global_forward_hooks),
                        ("global backward hook", _module._global_backward_hooks),
                        ("global backward pre-hook", _module._global_backward_pre_hooks)):
        for hook in hooks.values():
            return f"a {kind} {qualified_name(hook)}"
    return None


def _hooks_problem(m: nn.Module, fsdp_ok: bool) -> Optional[str]:
    """Why m's hooks stop an exact deferral, or None. Only FSDP2's own forward hooks are known (and only on the
    module the model calls: ``fsdp_ok``)."""
    for kind, hooks in (("forward pre-hook", m._forward_pre_hooks), ("forward hook", m._forward_hooks),
                        ("backward hook", m._backward_hooks), ("backward pre-hook", m._backward_pre_hooks)):
        for hook in hooks.values():
            if fsdp_ok and kind.startswith("forward") and _fsdp_state_of(hook) is not None:
                continue
            return f"a {kind} {qualified_name(hook)}"
    return None


def _module_problem(m, what: str, fsdp_ok: bool = False) -> Optional[str]:
    """Why module m (a part of the head) cannot be taken apart exactly, or None. ``what`` names it in messages."""
    if not isinstance(m, nn.Module):
        return f"{what} is a {qualified_name(m)}, not a module"
    if "forward" in vars(m) and not is_router(vars(m)["forward"]):
        hook = getattr(m, "_hf_hook", None)  # accelerate's add_hook_to_module replaces the instance forward
        by = f" (by {qualified_name(hook)})" if hook is not None else ""
        return f"{what} ({_describe(m)}) has its forward replaced on the instance{by}"
    if type(m).__call__ is not nn.Module.__call__ or type(m)._call_impl is not nn.Module._call_impl:
        return f"{what} is a {_describe(m)}, whose class overrides nn.Module's call"
    hooks = _hooks_problem(m, fsdp_ok)
    if hooks is not None:
        return f"{what} ({_describe(m)}) has {hooks}"
    return None


def _linear_problem(m, what: str, fsdp_ok: bool = False) -> Optional[str]:
    problem = _module_problem(m, what, fsdp_ok)
    if problem is not None:
        return problem
    if not isinstance(m, nn.Linear) or type(m).forward is not nn.Linear.forward:
        return f"{what} is a {_describe(m)}, not an nn.Linear with nn.Linear's forward"
    return None


def _fsdp_states(m: nn.Module) -> list:
    states = []
    for hook in (*m._forward_pre_hooks.values(), *m._forward_hooks.values()):
        state = _fsdp_state_of(hook)
        if state is not None and all(state is not s for s in states):
            states.append(state)
    return states


class _LoraTerm:
    """One active plain-LoRA adapter of a PEFT ``lora.Linear``: logits += scaling * B(A(dropout(x)))."""

    def __init__(self, A, B, dropout, scaling):
        self.A, self.B, self.dropout, self.scaling = A, B, dropout, scaling


class HeadPlan:
    """How to reproduce one call of the head: which module the model calls (``module``), the ``nn.Linear`` whose
    weight and bias give the base logits (``linear``), the LoRA terms added to them, and the FSDP2 hooks on
    ``module`` that must fire around the call that really reads the parameters."""

    def __init__(self, module: nn.Module, linear: nn.Linear, lora: Sequence[_LoraTerm] = (), unmerge: bool = False):
        self.module = module
        self.linear = linear
        self.lora = list(lora)
        self.unmerge = unmerge  # a disabled, merged LoRA head unmerges when called (PEFT's forward does)
        self.fsdp = bool(_fsdp_states(module))
        self._hooks = (module._forward_pre_hooks, module._forward_hooks)

    @property
    def vocab_size(self) -> int:
        return self.linear.out_features

    def output_dtype(self, x: torch.Tensor) -> torch.dtype:
        """The dtype of the logits the head would return for input x: FSDP's param_dtype when its mixed precision
        policy sets one (inputs and parameters are cast to it), the autocast dtype under autocast, else x's and the
        weight's promoted dtype."""
        if torch.is_autocast_enabled(x.device.type):
            return torch.get_autocast_dtype(x.device.type)
        return self._fsdp_param_dtype(inputs=False) or torch.promote_types(x.dtype, self.linear.weight.dtype)

    # ------------------------------------------------------------------ the model's call of the head
    def defer(self, first_call: Callable) -> None:
        """Until :meth:`undefer`, calling the head runs ``first_call(x)`` instead (through the head's router), with
        FSDP's hooks held back: they fire later, around the call that reads the parameters."""
        m = self.module
        install_router(m)
        m._fastloss_slot = first_call
        if self.fsdp:
            m._forward_pre_hooks, m._forward_hooks = OrderedDict(), OrderedDict()

    def undefer(self) -> None:
        m = self.module
        m._fastloss_slot = None
        if self.fsdp:
            m._forward_pre_hooks, m._forward_hooks = self._hooks

    def run(self, forward: Callable, rows: tuple):
        """``forward(*rows)``: as a call of the head module, with its own hooks in place, when FSDP2 hooks it;
        else as a plain function call."""
        if not self.fsdp:
            return forward(*rows)
        m = self.module
        slot, hooks = m._fastloss_slot, (m._forward_pre_hooks, m._forward_hooks)
        m._fastloss_slot = forward
        m._forward_pre_hooks, m._forward_hooks = self._hooks
        try:
            return m(*rows)
        finally:
            m._fastloss_slot = slot
            m._forward_pre_hooks, m._forward_hooks = hooks

    def rows(self, x: torch.Tensor) -> tuple:
        """The per-token operands recorded when the model calls the head with x: x, then each LoRA adapter's
        dropout(x) -- drawn now, in the model's order, so the random numbers are the model's own."""
        if self.unmerge and self.module.merged:
            self.module.unmerge()
        out = [x]
        if self.lora:
            # Under FSDP2 the head's hooks are held back here: cast the input as its pre-forward hook would, and
            # take the adapters' dtype as they will be gathered (param_dtype), not as they are sharded.
            cast = self._fsdp_param_dtype(inputs=True)
            x = x.to(cast) if cast is not None and x.is_floating_point() else x
            gathered = self._fsdp_param_dtype(inputs=False)
            for term in self.lora:
                x = self.module._cast_input_dtype(x, gathered or term.A.weight.dtype)
                out.append(term.dropout(x))
        return tuple(out)

    def _fsdp_param_dtype(self, inputs: bool) -> Optional[torch.dtype]:
        """The FSDP2 mixed-precision param_dtype of the head (``inputs``: only where the policy casts the forward
        inputs to it), or None."""
        for state in _fsdp_states(self.module):
            policy = state._mp_policy
            if policy.param_dtype is not None and (policy.cast_forward_inputs or not inputs):
                return policy.param_dtype
        return None

    # ------------------------------------------------------------------ calls that read the parameters
    def call(self, rows: tuple, fn: Callable):
        """``fn(h, W, b, U, B)`` on the widened operands of ``rows`` (U, B None without LoRA), run as a call of the
        head module: FSDP's hooks (if any) gather the parameters first, cast ``rows``, put their backward hooks
        on the result and reshard after it."""

        def forward(*r):
            return fn(*self._operands(r))

        return self.run(forward, rows)

    def logits(self, rows: tuple) -> torch.Tensor:
        """The head's output exactly as its own forward computes it (same ops, same order, same dropout draws)."""

        def forward(x, *dropped):
            result = F.linear(x, self.linear.weight, self.linear.bias)
            dtype = result.dtype
            for term, dx in zip(self.lora, dropped):
                result = result + term.B(term.A(dx)) * term.scaling
            return result.to(dtype) if self.lora else result

        return self.run(forward, rows)

    def _operands(self, rows: tuple):
        x = rows[0]
        W, b = self.linear.weight, self.linear.bias
        if not self.lora:
            return x, W, b, None, None
        U, B = [], []
        for term, dx in zip(self.lora, rows[1:]):
            U.append(term.A(dx) * term.scaling)
            B.append(term.B.weight)
            if term.B.bias is not None:
                b = term.B.bias * term.scaling if b is None else b + term.B.bias * term.scaling
        # U and B keep the adapters' dtype (PEFT keeps them float32 on a bf16 base: their gradients stay float32);
        # the chunks compute in the base's dtype.
        dtype = torch.promote_types(U[0].dtype, B[0].dtype)
        U = U[0] if len(U) == 1 else torch.cat([u.to(dtype) for u in U], dim=-1)
        B = B[0] if len(B) == 1 else torch.cat([w.to(dtype) for w in B], dim=-1)
        return x, W, b, U, B


def _routed_forward(self, *args, **kwargs):
    """The head's instance forward while fastloss may defer it: the slot's function when one is set (only during a
    patched forward), else the class's own forward. Bound to the module (a partial), so a deep copy of the model
    routes its own copy of the head. Installed once and left in place until ``unpatch``: torch.compile cannot
    replay deleting an instance attribute it saw created, and a slot that is set and reset it follows."""
    slot = self._fastloss_slot
    if slot is not None:
        return slot(*args, **kwargs)
    return type(self).forward(self, *args, **kwargs)


def is_router(fn) -> bool:
    return isinstance(fn, functools.partial) and fn.func is _routed_forward


def install_router(m: nn.Module) -> None:
    """Route m's calls (once). A forward someone else put on the instance (accelerate's hooks) stays: the call-time
    check then runs the model's own head. functools.partial rather than a bound method: torch.compile traces
    creating a partial, not a method object."""
    if "forward" not in vars(m):
        m._fastloss_slot = None
        m.forward = functools.partial(_routed_forward, m)


def remove_router(m: nn.Module) -> None:
    if is_router(vars(m).get("forward")):
        del m.forward
        del m._fastloss_slot


# PEFT versions whose LoRA / modules_to_save forwards fastloss reproduces (the stacks tests run 0.21.2). Another
# version runs the model's own head, warned: its forward may compute something else.
PEFT_TESTED = ((0, 21),)


def _peft_problem(head: nn.Module, what: str, methods: tuple) -> Optional[str]:
    """Why fastloss cannot trust this PEFT layer to compute what PEFT's tested forward computes: another PEFT
    version, or a method replaced on the class (its code not from PEFT's own files)."""
    try:
        import peft
        version = tuple(int(p) for p in peft.__version__.split(".")[:2])
    except Exception:  # noqa: BLE001
        return f"{what} is a {_describe(head)} from a PEFT whose version is unknown"
    if version not in PEFT_TESTED:
        return (f"{what} is a {_describe(head)} from PEFT {peft.__version__}, a version fastloss has not been "
                f"tested with (tested: {', '.join('.'.join(map(str, v)) for v in PEFT_TESTED)})")
    home = "/" + peft.__name__ + "/"  # (an instance forward is checked by _module_problem: routers only)
    for name in methods:
        fn = getattr(type(head), name, None)
        code = getattr(fn, "__code__", None)
        if code is None or home not in code.co_filename.replace("\\", "/"):
            return f"{what} is a {_describe(head)} whose {name} is not PEFT's own ({qualified_name(fn)})"
    return None


def _lora_plan(head: nn.Module, what: str):
    problem = _peft_problem(head, what, ("forward", "_cast_input_dtype"))
    if problem is not None:
        return problem
    problem = _linear_problem(head.base_layer, f"{what}.base_layer")
    if problem is not None:
        return problem
    if head.disable_adapters or head.merged:  # PEFT's forward: the base layer alone (unmerging first if disabled)
        if head.disable_adapters and head.merged and _fsdp_states(head):
            return f"{what} ({_LORA_LINEAR}) is disabled and merged under FSDP2 (PEFT unmerges the gathered weights)"
        return HeadPlan(head, head.base_layer, unmerge=bool(head.disable_adapters))
    terms = []
    for name in head.active_adapters:
        if name not in head.lora_A.keys():
            continue
        if name in head.lora_variant:
            return (f"{what} ({_LORA_LINEAR}) runs the LoRA variant "
                    f"{qualified_name(head.lora_variant[name])} for adapter {name!r}")
        A, B, dropout = head.lora_A[name], head.lora_B[name], head.lora_dropout[name]
        for part, label in ((A, "lora_A"), (B, "lora_B")):
            problem = _linear_problem(part, f"{what}.{label}[{name!r}]")
            if problem is not None:
                return problem
        if type(dropout) not in _DROPOUTS or _module_problem(dropout, "") is not None:
            return f"{what}.lora_dropout[{name!r}] is a {qualified_name(dropout)}"
        terms.append(_LoraTerm(A, B, dropout, head.scaling[name]))
    return HeadPlan(head, head.base_layer, terms)


def _modules_to_save_plan(head: nn.Module, what: str):
    # PEFT's ModulesToSaveWrapper.forward: the original module when adapters are disabled or an active adapter
    # has no copy, else the first active adapter's copy.
    problem = _peft_problem(head, what, ("forward", "_forward_wrapped", "_forward_wrapped_passthrough"))
    if problem is not None:
        return problem
    active = list(head.active_adapters)
    if head.disable_adapters or not active or any(a not in head._adapters for a in active):
        inner, label = head.original_module, "original_module"
    else:
        inner, label = head.modules_to_save[active[0]], f"modules_to_save[{active[0]!r}]"
    problem = _linear_problem(inner, f"{what}.{label}")
    if problem is not None:
        return problem
    return HeadPlan(head, inner)


def plan_head(head, what: str = "the output head"):
    """A :class:`HeadPlan` for the head as it is now, or a string saying why fastloss cannot reproduce it."""
    problem = _global_hooks_problem()
    if problem is not None:
        return f"{what} would run {problem}"
    name = qualified_name(_own_class(head)) if isinstance(head, nn.Module) else None
    if name in (_LORA_LINEAR, _MODULES_TO_SAVE):
        plan = _module_problem(head, what, fsdp_ok=True)
        if plan is None:
            plan = _lora_plan(head, what) if name == _LORA_LINEAR else _modules_to_save_plan(head, what)
    else:
        plan = _linear_problem(head, what, fsdp_ok=True)
        if plan is None:
            plan = HeadPlan(head, head)
    if isinstance(plan, str):
        return plan
    for state in _fsdp_states(head):
        if state._mp_policy.output_dtype is not None:
            return (f"{what} is sharded by FSDP2 with MixedPrecisionPolicy(output_dtype="
                    f"{state._mp_policy.output_dtype}), which would cast the loss computed inside the head's call")
    return plan

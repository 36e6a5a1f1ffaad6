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
  and post-backward hooks on the loss and reshards afterwards, exactly as for a head that returned logits;
* tensor parallelism on an ``nn.Linear`` head (``parallelize_module(..., {"lm_head": ColwiseParallel(...)})``, the
  torchtitan way, alone or under FSDP2), recognised by the functools.partial of ``ColwiseParallel``'s own
  ``_prepare_input_fn`` / ``_prepare_output_fn`` inside ``distribute_module``'s hooks, when the logits it hands out
  are the full vocabulary's: ``output_layouts=Shard(-1)`` with ``use_local_output=False`` (vocabulary-sharded DTensor
  logits, the loss ``loss_parallel`` computes) or ``output_layouts=Replicate()`` (gathered logits). Its hooks are held
  back while the model calls the head; the input transform (a DTensor, replicated) is applied to the recorded input,
  and the loss runs :func:`fastloss.linear_cross_entropy` vocabulary-parallel on the head's DTensor weight and bias.
  ``Shard(-1)`` with ``use_local_output=True`` (a loss over each rank's slice of the vocabulary), other output
  layouts and other styles (``RowwiseParallel``, ``SequenceParallel``, a subclass) are reasons.

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
    """Why m's hooks stop an exact deferral, or None. Only FSDP2's own forward hooks and ``ColwiseParallel``'s
    (checked by :func:`_tensor_parallel`) are known, and only on the module the model calls (``fsdp_ok``)."""
    for kind, hooks in (("forward pre-hook", m._forward_pre_hooks), ("forward hook", m._forward_hooks),
                        ("backward hook", m._backward_hooks), ("backward pre-hook", m._backward_pre_hooks)):
        for hook in hooks.values():
            if fsdp_ok and kind.startswith("forward") and (_fsdp_state_of(hook) is not None
                                                           or _tp_hook(hook) is not None):
                continue
            what = _tp_hook(hook)
            return f"a {kind} {qualified_name(hook) if what is None else _tp_name(what[0])}"
    return None


# ------------------------------------------------------------------ tensor parallelism (DTensor)
def _tp_hook(hook):
    """(fn, mesh) of a hook ``torch.distributed.tensor.distribute_module`` registered (a lambda calling its
    ``input_fn`` / ``output_fn`` with its ``device_mesh``: read from the lambda's closure), or None."""
    code = getattr(hook, "__code__", None)
    if code is None or not code.co_filename.replace("\\", "/").endswith("torch/distributed/tensor/_api.py") \
            or "distribute_module" not in getattr(code, "co_qualname", "distribute_module"):
        return None
    cells = {}
    for name, cell in zip(code.co_freevars, hook.__closure__ or ()):
        try:
            cells[name] = cell.cell_contents
        except ValueError:  # an empty cell
            pass
    fn = cells.get("input_fn", cells.get("output_fn"))
    return (fn, cells.get("device_mesh")) if fn is not None else None


def _tp_name(fn) -> str:
    """A distribute_module hook's function for messages: ``distribute_module(functools.partial(...))``."""
    return f"torch.distributed.tensor.distribute_module hook of {qualified_name(fn)}"


@functools.lru_cache(maxsize=None)
def _colwise() -> Optional[type]:
    try:
        from torch.distributed.tensor.parallel import ColwiseParallel
    except Exception:  # noqa: BLE001  (no torch.distributed)
        return None
    return ColwiseParallel


class _TensorParallel:
    """``ColwiseParallel`` on the head: its input transform (``_prepare_input_fn`` bound to the style's layouts)
    and output transform, the mesh, and whether the model gets local tensors (``use_local_output``)."""

    def __init__(self, mesh, input_fn, output_fn, hooks):
        self.mesh, self.input_fn, self.output_fn = mesh, input_fn, output_fn
        self.output_layouts, self.local_output = output_fn.args
        self.hooks = hooks  # the ids of distribute_module's hooks in the module's hook dicts

    def input(self, module: nn.Module, x: torch.Tensor):
        """x as the head sees it once its pre-hook ran: a DTensor (replicated over the mesh)."""
        return self.input_fn(module, (x,), self.mesh)

    def output(self, module: nn.Module, logits):
        """The head's logits as its forward hook hands them to the model."""
        return self.output_fn(module, logits, self.mesh)


def _tensor_parallel(m: nn.Module, what: str):
    """The ``ColwiseParallel`` hooks on m as a :class:`_TensorParallel`, None when there are none, or why they
    cannot be reproduced."""
    found = [(kind, hid, hook, _tp_hook(hook)) for kind, hooks in (("pre", m._forward_pre_hooks),
                                                                    ("post", m._forward_hooks))
             for hid, hook in hooks.items()]
    found = [f for f in found if f[3] is not None]
    if not found:
        return None
    colwise = _colwise()
    pre = [f for f in found if f[0] == "pre"]
    post = [f for f in found if f[0] == "post"]
    for kind, _, _, (fn, _) in found:
        want = "_prepare_input_fn" if kind == "pre" else "_prepare_output_fn"
        if colwise is None or not isinstance(fn, functools.partial) or fn.func is not getattr(colwise, want) \
                or fn.keywords or len(fn.args) != 2:
            style = qualified_name(fn.func if isinstance(fn, functools.partial) else fn).rsplit(".", 1)[0]
            return (f"{what} ({_describe(m)}) is tensor-parallel with {style} ({_tp_name(fn)}), which fastloss does "
                    "not reproduce (only ColwiseParallel on the output head)")
    if len(pre) != 1 or len(post) != 1 or pre[0][3][1] is not post[0][3][1] or pre[0][3][1] is None:
        return (f"{what} ({_describe(m)}) has {len(pre)} ColwiseParallel input and {len(post)} output hooks "
                "(distribute_module), not one of each on one device mesh")
    from torch.distributed.tensor import Replicate, Shard

    tp = _TensorParallel(pre[0][3][1], pre[0][3][0], post[0][3][0], {pre[0][1], post[0][1]})
    layouts = tuple(tp.output_layouts)
    full = "ColwiseParallel(output_layouts=" + ", ".join(map(repr, layouts)) + f", use_local_output={tp.local_output})"
    if layouts == (Shard(-1),) and tp.local_output:
        return (f"{what} ({_describe(m)}) is tensor-parallel with {full} (distribute_module): the model gets each "
                "rank's local slice of the vocabulary and computes its loss over that slice only, which fastloss "
                "does not reproduce (use_local_output=False with loss_parallel gives the loss over the vocabulary, "
                "which fastloss defers)")
    if layouts not in ((Shard(-1),), (Replicate(),)):
        return (f"{what} ({_describe(m)}) is tensor-parallel with {full} (distribute_module): only "
                "output_layouts=Shard(-1) with use_local_output=False, or Replicate(), are reproduced")
    return tp


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

    def __init__(self, module: nn.Module, linear: nn.Linear, lora: Sequence[_LoraTerm] = (), unmerge: bool = False,
                 tp: Optional[_TensorParallel] = None):
        self.module = module
        self.linear = linear
        self.lora = list(lora)
        self.unmerge = unmerge  # a disabled, merged LoRA head unmerges when called (PEFT's forward does)
        self.fsdp = bool(_fsdp_states(module))
        self.tp = tp  # ColwiseParallel on the head: its transforms are applied by hand (rows, logits, as_output)
        self.hooked = self.fsdp or tp is not None
        self._hooks = (module._forward_pre_hooks, module._forward_hooks)
        keep = (lambda hooks: hooks) if tp is None else \
            (lambda hooks: OrderedDict((k, h) for k, h in hooks.items() if k not in tp.hooks))
        self._own_hooks = tuple(keep(h) for h in self._hooks)  # FSDP's, without distribute_module's

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
        FSDP's and tensor parallelism's hooks held back: FSDP's fire later, around the call that reads the
        parameters; the input transform of ColwiseParallel's is applied to the recorded rows (:meth:`rows`)."""
        m = self.module
        install_router(m)
        m._fastloss_slot = first_call
        if self.hooked:
            m._forward_pre_hooks, m._forward_hooks = OrderedDict(), OrderedDict()

    def undefer(self) -> None:
        m = self.module
        m._fastloss_slot = None
        if self.hooked:
            m._forward_pre_hooks, m._forward_hooks = self._hooks

    def run(self, forward: Callable, rows: tuple, all_hooks: bool = False):
        """``forward(*rows)``: as a call of the head module with its FSDP2 hooks in place (``all_hooks``: every
        hook, tensor parallelism's included, for rows as the model passed them) when it has hooks; else as a plain
        function call."""
        if not self.hooked:
            return forward(*rows)
        m = self.module
        slot, hooks = m._fastloss_slot, (m._forward_pre_hooks, m._forward_hooks)
        m._fastloss_slot = forward
        m._forward_pre_hooks, m._forward_hooks = self._hooks if all_hooks else self._own_hooks
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
        if self.tp is not None:  # (no LoRA here: ColwiseParallel takes an nn.Linear only)
            return (self.tp.input(self.module, x),)
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

    def as_output(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss as the model's own would be: a (replicated) DTensor where the head hands out DTensor logits,
        a plain tensor where it hands out local ones (``output_layouts=Replicate(), use_local_output=True``)."""
        if self.tp is not None and self.tp.local_output and hasattr(loss, "to_local"):
            return loss.to_local()
        return loss

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
            if self.tp is not None:
                return self.tp.output(self.module, result)
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


def _tp_weight_problem(head: nn.Module, what: str, tp) -> Optional[str]:
    """Why the parameters of a ColwiseParallel head are not what the vocabulary-parallel loss takes: the weight
    (and bias) DTensors sharded Shard(0) over the hooks' mesh (FSDP2 on top: sharded further over its own mesh,
    gathered back to that by its hooks), or None."""
    if tp is None:
        return None
    from torch.distributed.tensor import DTensor, Shard

    for name, p in (("weight", head.weight), ("bias", head.bias)):
        if p is None:
            continue
        if not isinstance(p, DTensor):
            return f"{what} ({_describe(head)}) has ColwiseParallel hooks but its {name} is not a DTensor"
        if _fsdp_states(head):
            continue
        if p.device_mesh != tp.mesh or tuple(p.placements) != (Shard(0),):
            return (f"{what} ({_describe(head)}) has ColwiseParallel hooks but its {name} has placements "
                    f"{tuple(p.placements)} on {p.device_mesh}, not (Shard(0),) on the hooks' mesh")
    return None


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
            tp = _tensor_parallel(head, what)
            plan = tp if isinstance(tp, str) else _tp_weight_problem(head, what, tp) or HeadPlan(head, head, tp=tp)
    if isinstance(plan, str):
        return plan
    if plan.tp is None:
        tp = _tensor_parallel(plan.module, what)  # a wrapper the model calls (PEFT's), tensor-parallel: no
        if tp is not None:
            return tp if isinstance(tp, str) else (f"{what} ({_describe(plan.module)}) is tensor-parallel with "
                                                   "ColwiseParallel on a wrapper fastloss takes apart")
    for state in _fsdp_states(head):
        if state._mp_policy.output_dtype is not None:
            return (f"{what} is sharded by FSDP2 with MixedPrecisionPolicy(output_dtype="
                    f"{state._mp_policy.output_dtype}), which would cast the loss computed inside the head's call")
    return plan

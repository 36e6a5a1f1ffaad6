"""Deferred logits: what a causal LM's ``lm_head`` returns while fastloss computes its training loss.

``DeferredLogits`` stands for ``lm_head(hidden)`` (shape ``hidden.shape[:-1] + (V,)``) without computing it. It
records what the model's own code does to the logits between its head and the loss, and turns the final
``F.cross_entropy`` into :func:`fastloss.linear_cross_entropy` on the hidden states, so the N x V logits are never
built:

* scalar multiplications and divisions (Granite's ``logits_scaling``, Cohere's ``logit_scale``) and one ``tanh``
  between scalings (Gemma's ``final_logit_softcapping``): ``post * tanh(pre * z)`` is fastloss's
  ``softcap=post`` on ``(pre * post) * z``, and a scale without tanh is a scale on the hidden states and bias;
* dtype casts (``logits.float()`` in ``ForCausalLMLoss``): the loss is returned in that dtype;
* anything on the leading (token) dimensions only: ``view`` / ``reshape`` keeping the vocabulary last, slicing,
  boolean masks, ``contiguous``;
* ``F.cross_entropy(logits_2d, target, weight=, ignore_index=, reduction=, label_smoothing=)``.

Anything else (an op over the vocabulary, a learnable scale, a second tanh, ...) materialises the logits exactly as
the model would have computed them (every recorded op replayed in order) and runs that op on them: the result is
the model's own, only the memory saving is lost, and a :class:`DeferredLogitsFallbackWarning` says which op did it.
"""

from __future__ import annotations

import numbers
import warnings
from typing import Callable, Optional

import torch
import torch.nn.functional as F

__all__ = ["DeferredLogits", "DeferredLogitsFallbackWarning"]


class DeferredLogitsFallbackWarning(UserWarning):
    """The model used its logits in a way fastloss cannot defer: they were computed in full (same result, no
    memory saving)."""


def _scalar(value) -> Optional[float]:
    """A Python number, or a 0-d tensor that needs no gradient, as a float; None otherwise."""
    if isinstance(value, bool):
        return None
    if isinstance(value, numbers.Real):
        return float(value)
    if torch.is_tensor(value) and value.dim() == 0 and not value.requires_grad and value.is_floating_point():
        return float(value.item())
    return None


class DeferredLogits:
    """``lm_head(hidden)`` not yet computed. See the module docstring.

    ``plan`` (:class:`fastloss.integrations._head.HeadPlan`) knows how the head computes its output; ``rows`` are
    the per-token operands recorded when the model called it (the hidden states, then each LoRA adapter's
    dropout of them), all with the same leading (token) dimensions."""

    def __init__(self, plan, rows: tuple, *, owner: str, options: dict):
        self._plan = plan
        self._rows = tuple(rows)
        self._owner = owner  # the model's class name, for messages
        self._options = options  # chunk_size, filter_eps, algorithm for linear_cross_entropy
        # elementwise ops in order, replayed by materialize(): ("mul"|"div", s), ("tanh",), ("to", dtype)
        self._ops: list = []
        self._dtype = plan.output_dtype(self._rows[0])
        self._materialized: Optional[torch.Tensor] = None

    @property
    def _hidden(self) -> torch.Tensor:
        return self._rows[0]

    # ------------------------------------------------------------------ tensor-like attributes
    @property
    def shape(self) -> torch.Size:
        return torch.Size((*self._hidden.shape[:-1], self._plan.vocab_size))

    def size(self, dim: Optional[int] = None):
        return self.shape if dim is None else self.shape[dim]

    def dim(self) -> int:
        return self._hidden.dim()

    @property
    def ndim(self) -> int:
        return self._hidden.dim()

    def numel(self) -> int:
        return self.shape.numel()

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def device(self) -> torch.device:
        return self._hidden.device

    @property
    def requires_grad(self) -> bool:
        return torch.is_grad_enabled() and (any(r.requires_grad for r in self._rows)
                                            or any(p.requires_grad for p in self._plan.module.parameters()))

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f"DeferredLogits(shape={tuple(self.shape)}, dtype={self._dtype}, ops={self._ops})"

    # ------------------------------------------------------------------ recorded ops
    def _derive(self, rows_op: Optional[Callable] = None) -> "DeferredLogits":
        """A copy with the same recorded ops; ``rows_op`` (an op on the leading dimensions) applied to every row."""
        out = DeferredLogits.__new__(DeferredLogits)
        out.__dict__.update(self.__dict__)
        out._ops = list(self._ops)
        out._materialized = None
        if rows_op is not None:
            out._rows = tuple(rows_op(r) for r in self._rows)
        return out

    def _scaled(self, s: float, op: str) -> "DeferredLogits":
        out = self._derive()
        out._ops.append((op, s))
        return out

    def _has_tanh(self) -> bool:
        return any(op[0] == "tanh" for op in self._ops)

    def _canonical(self):
        """The recorded ops as (pre, softcap): logits = post * tanh(pre * z) with softcap = post, or pre * z with
        softcap None (dtype casts do not change values)."""
        pre, post, tanh = 1.0, 1.0, False
        for op in self._ops:
            if op[0] in ("mul", "div"):
                factor = op[1] if op[0] == "mul" else 1.0 / op[1]
                if tanh:
                    post *= factor
                else:
                    pre *= factor
            elif op[0] == "tanh":
                tanh = True
        return pre, (post if tanh else None)

    def __mul__(self, other):
        s = _scalar(other)
        if s is None:
            return self._fallback("mul", lambda x: x * other)
        return self._scaled(s, "mul")

    __rmul__ = __mul__

    def __truediv__(self, other):
        s = _scalar(other)
        if s is None or s == 0.0:
            return self._fallback("div", lambda x: x / other)
        return self._scaled(s, "div")

    def tanh(self):
        if self._has_tanh():
            return self._fallback("second tanh", torch.tanh)
        out = self._derive()
        out._ops.append(("tanh",))
        return out

    def to(self, *args, **kwargs):
        dtype = kwargs.pop("dtype", None)
        rest = []
        for a in args:
            if isinstance(a, torch.dtype):
                dtype = a
            else:
                rest.append(a)
        device = kwargs.pop("device", rest.pop(0) if rest else None)
        if rest or kwargs or (device is not None and torch.device(device) != self.device):
            return self._fallback("to", lambda x: x.to(*args, **kwargs))
        if dtype is None or dtype == self._dtype:
            return self
        if not dtype.is_floating_point:
            return self._fallback("to", lambda x: x.to(dtype))
        out = self._derive()
        out._ops.append(("to", dtype))
        out._dtype = dtype
        return out

    def float(self):
        return self.to(torch.float32)

    def double(self):
        return self.to(torch.float64)

    def contiguous(self, *args, **kwargs):
        return self

    def reshape(self, *shape):
        if len(shape) == 1 and isinstance(shape[0], (tuple, list, torch.Size)):
            shape = tuple(shape[0])
        if len(shape) >= 1 and shape[-1] == self._plan.vocab_size:
            return self._derive(lambda r: r.reshape(*shape[:-1], r.shape[-1]))
        return self._fallback("reshape", lambda x: x.reshape(*shape))

    view = reshape

    def flatten(self, start_dim: int = 0, end_dim: int = -1):
        nd = self.ndim
        s, e = start_dim % nd, end_dim % nd
        if e < nd - 1:
            return self._derive(lambda r: r.flatten(s, e))
        return self._fallback("flatten", lambda x: x.flatten(start_dim, end_dim))

    def __getitem__(self, index):
        idx = list(index) if isinstance(index, tuple) else [index]
        nd = self.ndim

        def dims(i):
            return i.dim() if torch.is_tensor(i) and i.dtype == torch.bool else 1

        if any(i is None for i in idx) or sum(1 for i in idx if i is Ellipsis) > 1:
            return self._fallback("indexing", lambda x: x[index])
        consumed = sum(dims(i) for i in idx if i is not Ellipsis)
        if consumed > nd:
            return self._fallback("indexing", lambda x: x[index])
        if Ellipsis in idx:
            pos = idx.index(Ellipsis)
            idx = idx[:pos] + [slice(None)] * (nd - consumed) + idx[pos + 1:]
        if sum(dims(i) for i in idx) == nd:
            last = idx[-1]
            if not (isinstance(last, slice) and last == slice(None)):
                return self._fallback("indexing the vocabulary dimension", lambda x: x[index])
            idx = idx[:-1]
        # Only the leading (token) dimensions are indexed: the same index on the hidden states.
        lead = tuple(idx)
        return self._derive(lambda r: r[lead])

    # ------------------------------------------------------------------ torch functions
    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.cross_entropy and isinstance(args[0], DeferredLogits):
            return args[0]._cross_entropy(*args[1:], **kwargs)
        if func in (torch.tanh, torch.Tensor.tanh) and len(args) == 1 and not kwargs:
            return args[0].tanh()
        if func in (torch.mul, torch.Tensor.mul, torch.Tensor.__mul__, torch.Tensor.__rmul__) and not kwargs:
            a, b = args
            return a * b if isinstance(a, DeferredLogits) else b * a
        if func in (torch.div, torch.Tensor.div, torch.Tensor.__truediv__) and not kwargs \
                and isinstance(args[0], DeferredLogits):
            return args[0] / args[1]
        deferred = [a for a in list(args) + list(kwargs.values()) if isinstance(a, DeferredLogits)]
        owner = deferred[0] if deferred else None
        if owner is not None:
            owner._warn(getattr(func, "__name__", str(func)))

        def real(a):
            return a.materialize() if isinstance(a, DeferredLogits) else a

        args = tuple(real(a) for a in args)
        kwargs = {k: real(v) for k, v in kwargs.items()}
        return func(*args, **kwargs)

    def __getattr__(self, name):
        # Any other tensor method: compute the logits and use them.
        if name.startswith("_"):
            raise AttributeError(name)
        self._warn(name)
        return getattr(self.materialize(), name)

    def _fallback(self, what: str, fn):
        self._warn(what)
        return fn(self.materialize())

    def _warn(self, what: str) -> None:
        warnings.warn(
            f"fastloss: {self._owner} applies {what!r} to its logits, which fastloss cannot defer; the logits were "
            "computed in full (the loss is the model's own, without the memory saving)",
            DeferredLogitsFallbackWarning, stacklevel=3)

    # ------------------------------------------------------------------ results
    def materialize(self) -> torch.Tensor:
        """The logits exactly as the model's code computes them: the head, then every recorded op in order."""
        if self._materialized is None:
            x = self._plan.logits(self._rows)  # the head's own forward, through the module's call
            for op in self._ops:
                if op[0] == "mul":
                    x = x * op[1]
                elif op[0] == "div":
                    x = x / op[1]
                elif op[0] == "tanh":
                    x = torch.tanh(x)
                else:
                    x = x.to(op[1])
            self._materialized = x
        return self._materialized

    def _cross_entropy(self, target, weight=None, size_average=None, ignore_index=-100, reduce=None,
                       reduction="mean", label_smoothing=0.0):
        from .. import functional as fl_functional

        legacy = size_average is not None or reduce is not None
        pre, softcap = self._canonical()
        scale = pre if softcap is None else pre * softcap  # c * tanh(pre z) = c * tanh((pre c) z / c)
        if getattr(self._plan, "tp", None) is not None and self._options.get("filter_eps") not in (None, 0, 0.0):
            self._warn("cross_entropy with filter_eps on a tensor-parallel head (no filter in the vocabulary-parallel "
                       "loss)")
            return F.cross_entropy(self.materialize(), target, weight=weight, size_average=size_average,
                                   ignore_index=ignore_index, reduce=reduce, reduction=reduction,
                                   label_smoothing=label_smoothing)
        if self.ndim != 2 or legacy or (softcap is not None and not softcap > 0) \
                or not torch.is_tensor(target) or target.is_floating_point() \
                or self._dtype not in (torch.float32, torch.float64, self._hidden.dtype):
            self._warn("cross_entropy with these arguments")
            return F.cross_entropy(self.materialize(), target, weight=weight, size_average=size_average,
                                   ignore_index=ignore_index, reduce=reduce, reduction=reduction,
                                   label_smoothing=label_smoothing)

        def loss_fn(hidden, W, bias, U, B):
            common = torch.promote_types(hidden.dtype, W.dtype)  # differ only under autocast, which casts both
            hidden, W = hidden.to(common), W.to(common)
            bias = None if bias is None else bias.to(common)  # (U and B keep their dtype: see HeadPlan)
            if scale != 1.0:  # s * (h W^T + b + U B^T) = (s h) W^T + s b + (s U) B^T
                hidden = hidden * scale
                bias = bias * scale if bias is not None else None
                U = U * scale if U is not None else None
            return fl_functional._linear_cross_entropy(
                hidden, W, target.to(hidden.device), (U, B) if U is not None else None, linear_bias=bias,
                weight=weight, ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing,
                z_loss=0.0, softcap=softcap, loss_dtype=self._dtype, return_lse=False, return_z_loss=False, loss="ce",
                gamma=None, epsilon=None, **self._options)

        # Inside a call of the head module: FSDP2 gathers its parameters for it and hooks the loss's backward. A
        # tensor-parallel head (DTensor weight, rows made DTensors by its input transform): fastloss's
        # vocabulary-parallel loss, a replicated DTensor, or plain where the head hands out local logits.
        loss = self._plan.as_output(self._plan.call(self._rows, loss_fn))
        # Callers add to it in place (MoE forwards: `loss += coef * aux_loss`): hand out a tensor of its own, not
        # a view of a custom autograd function's output (a clone, not an _is_view() test: that breaks compiled graphs).
        return loss.clone()

"""fastloss's ops on PyTorch distributed tensors (DTensor): tensor-parallel and FSDP2 + TP training.

Every ``torch.ops.fastloss`` op accepts DTensor arguments:

- rows sharded (``Shard(0)``, the token dimension) or replicated: the local kernel on each rank's rows, outputs
  with the rows' placements -- sharding strategies registered with DTensor's own ``register_sharding``;
- the cross-entropy ops (``cross_entropy_fwd`` / ``_bwd`` / ``_fwd_inplace_grad`` and ``scale_rows_``) and the
  token log-probabilities (``token_logprobs_fwd`` / ``_bwd``) with logits sharded along the classes (``Shard(1)``:
  ``ColwiseParallel`` on the head with ``use_local_output=False``): the vocabulary-parallel algorithms of
  :mod:`fastloss._vocab_parallel` on the DTensor's mesh dimension (one fused pass, one small collective, a
  communication-free backward); softmax / log_softmax / logsumexp (and backwards) along a
  sharded dimension: the local log-sum-exp kernel and one combine. These go through DTensor's custom-op handler
  table (the mechanism ``torch.distributed.tensor.parallel.loss_parallel`` uses), registered once at import, so
  they work with ``loss_parallel()`` active or not;
- anything else (``Partial`` inputs, the classes sharded for an op without a vocabulary-parallel rule, two mesh
  dimensions sharding the classes) raises an error naming the op and the placement, instead of a silent gather.

On a 2-D (data x tensor) mesh the placements combine per mesh dimension: ``[Shard(0), Shard(1)]`` logits are rows
split over the data dimension and classes over the tensor one. ``target`` may be a DTensor (any placements: it is
redistributed to the rows' placements, a few bytes per token) or a plain tensor holding this rank's rows.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor._dtensor_spec import DTensorSpec, TensorMeta
from torch.distributed.tensor._op_schema import RuntimeSchemaInfo
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
from torch.distributed.tensor.experimental import register_sharding

from . import _vocab_parallel as _vp

_lib = torch.ops.fastloss


def _bind(op, args, kwargs) -> dict:
    out = {}
    for i, a in enumerate(op._schema.arguments):
        if i < len(args):
            out[a.name] = args[i]
        elif a.name in kwargs:
            out[a.name] = kwargs[a.name]
        else:
            out[a.name] = a.default_value if a.has_default_value() else None
    return out


def _op_name(op) -> str:
    return f"torch.ops.{op._schema.name.replace('::', '.')}"


def _placement_error(op, name, placements, why):
    return NotImplementedError(f"{_op_name(op)}: `{name}` with placements {tuple(placements)}: {why}")


class _Plan:
    """How a [rows, classes] DTensor maps onto the mesh: the row placements of the per-row outputs and the mesh
    dimension (if any) that shards the classes."""

    def __init__(self, op, name: str, x: DTensor):
        if not isinstance(x, DTensor):
            raise TypeError(f"{_op_name(op)}: `{name}` is a plain tensor beside DTensor arguments; pass it as a "
                            "DTensor too (or every argument as a plain tensor)")
        self.op, self.x, self.mesh = op, x, x.device_mesh
        self.vocab_dim = None
        rows = []
        for i, p in enumerate(x.placements):
            if p.is_partial():
                raise _placement_error(op, name, x.placements, f"Partial on mesh dimension {i} is not supported; "
                                       "redistribute to Shard or Replicate first")
            if p.is_shard(1):
                if self.vocab_dim is not None:
                    raise _placement_error(op, name, x.placements, "the classes are sharded over two mesh "
                                           "dimensions; shard them over one")
                self.vocab_dim = i
                rows.append(Replicate())
            else:
                rows.append(p)  # Shard(0) or Replicate
        self.rows = tuple(rows)

    def shard(self) -> _vp.VocabShard:
        return _vocab_shard(self.x, 1, self.vocab_dim)

    def local_rows(self, t, name):
        """This rank's rows of a per-row tensor: a DTensor of any placements, a plain tensor of all rows (taken as
        replicated), or a plain tensor of this rank's rows."""
        if t is None or not isinstance(t, torch.Tensor):
            return t
        if isinstance(t, DTensor):
            if t.device_mesh != self.mesh:
                raise ValueError(f"{_op_name(self.op)}: `{name}` is on another device mesh than the logits")
            if any(p.is_partial() for p in t.placements):
                raise _placement_error(self.op, name, t.placements, "Partial is not supported")
            if tuple(t.placements) != self.rows:
                t = t.redistribute(self.mesh, self.rows)
            return t.to_local()
        if t.dim() >= 1 and t.shape[0] == self.x.shape[0] and any(p.is_shard(0) for p in self.rows):
            # a plain tensor of the global rows (autograd's zeros for an unused output): replicated
            return self.local_rows(DTensor.from_local(t, self.mesh, [Replicate()] * self.mesh.ndim,
                                                      run_check=False), name)
        return t

    def wrap(self, local: torch.Tensor, global_shape, placements=None) -> DTensor:
        return _wrap(self.mesh, local, global_shape, self.rows if placements is None else placements)

    def wrap_rows(self, local: torch.Tensor, rows: bool = True) -> DTensor:
        """A per-row output; rows=False: an unused [0] placeholder output (replicated)."""
        if not rows:
            return self.wrap(local, tuple(local.shape), [Replicate()] * self.mesh.ndim)
        return self.wrap(local, (self.x.shape[0],) + tuple(local.shape[1:]))


def _vocab_shard(x: DTensor, dim: int, mesh_dim: int) -> _vp.VocabShard:
    """This rank's slice of x's classes (dimension ``dim``, sharded on mesh dimension ``mesh_dim``); the largest
    slice is torch.chunk's first piece, the same on every rank."""
    shape, offset = compute_local_shape_and_global_offset(x.shape, x.device_mesh, x.placements)
    V, n = int(x.shape[dim]), x.device_mesh.size(mesh_dim)
    return _vp.VocabShard(int(offset[dim]), int(shape[dim]), V, x.device_mesh.get_group(mesh_dim), -(-V // n))


def _full(t):
    """A replicated argument (class weights) as a plain tensor."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def _options(a) -> _vp.CeOptions:
    return _vp.CeOptions(int(a["ignore_index"]), float(a["label_smoothing"]), float(a["z_loss"]),
                         None if a["softcap"] is None else float(a["softcap"]), a.get("loss") or "ce",
                         float(a.get("loss_param") or 0.0), a.get("algorithm") or "auto")


def _local_args(op, a, plan, rows_args):
    """The op's arguments on this rank: per-row tensors as local rows, the logits local, weights full."""
    out = []
    for arg in op._schema.arguments:
        v = a[arg.name]
        if arg.name in rows_args:
            v = plan.local_rows(v, arg.name)
        elif isinstance(v, DTensor):
            v = v.to_local() if v is plan.x else _full(v)
        out.append(v)
    return out


def _vocab_setup(op, a, plan):
    shard = plan.shard()
    x = plan.x.to_local().contiguous()
    t = plan.local_rows(a["target"], "target").contiguous()
    opts = _options(a)
    w = _full(a["weight"])
    if w is not None and tuple(w.shape) != (shard.V,):
        raise ValueError(f"{_op_name(op)}: `weight` must have shape ({shard.V},), got {tuple(w.shape)}")
    _vp.check_targets(_op_name(op), t, shard.V, opts.ignore_index)
    return shard, x, t, opts, _vp.ClassWeights(w, shard, x.dtype)


def _ce_fwd(op, args, kwargs):
    a = _bind(op, args, kwargs)
    plan = _Plan(op, "logits", a["logits"])
    sq = a["loss"] == "squentropy"
    if plan.vocab_dim is None:
        loss, lse, sum_sq = op(*_local_args(op, a, plan, ("target",)))
        return plan.wrap_rows(loss), plan.wrap_rows(lse), plan.wrap_rows(sum_sq, sq)
    shard, x, t, opts, weights = _vocab_setup(op, a, plan)
    loss, rows = _vp.shard_forward(x, t, weights, shard, opts)
    sum_sq = rows[:, 3].clone() if sq else rows.new_empty((0,))
    return plan.wrap_rows(loss), plan.wrap_rows(rows[:, 0].clone()), plan.wrap_rows(sum_sq, sq)


def _ce_bwd(op, args, kwargs):
    a = _bind(op, args, kwargs)
    plan = _Plan(op, "logits", a["logits"])
    rows_args = ("grad_loss", "grad_lse", "target", "lse") + (("sum_sq",) if a["loss"] == "squentropy" else ())
    if plan.vocab_dim is None:
        return plan.wrap(op(*_local_args(op, a, plan, rows_args)), plan.x.shape, plan.x.placements)
    shard, x, t, opts, weights = _vocab_setup(op, a, plan)
    rows = torch.zeros((t.shape[0], 4), dtype=torch.float64, device=x.device)
    rows[:, 0] = plan.local_rows(a["lse"], "lse")
    rows[:, 2] = weights.at(t, opts.ignore_index)
    if opts.loss != "ce":  # the comp-sum coefficients need the target logit: one all-reduce of N numbers
        rows[:, 1] = _vp.target_logit(x, t, shard, opts)
    if opts.loss == "squentropy":
        rows[:, 3] = plan.local_rows(a["sum_sq"], "sum_sq")
    gl = plan.local_rows(a["grad_loss"], "grad_loss").to(torch.float64).contiguous()
    gz = plan.local_rows(a["grad_lse"], "grad_lse")
    gz = None if gz is None else gz.to(torch.float64).contiguous()
    g = _vp.shard_backward(gl, gz, x, t, weights, rows, shard, opts)
    return plan.wrap(g, plan.x.shape, plan.x.placements)


def _ce_fwd_inplace(op, args, kwargs):
    a = _bind(op, args, kwargs)
    plan = _Plan(op, "logits", a["logits"])
    scale = a["grad_scale"]
    per_row = scale.dim() == 1 and scale.shape[0] == plan.x.shape[0] and plan.x.shape[0] != 1
    rows_args = ("target", "grad_scale") if per_row else ("target",)
    if plan.vocab_dim is None:
        outs = op(*_local_args(op, a, plan, rows_args))
        return tuple(plan.wrap_rows(o) for o in outs)
    shard, x, t, opts, weights = _vocab_setup(op, a, plan)
    loss, rows = _vp.shard_forward(x, t, weights, shard, opts)
    s = plan.local_rows(scale, "grad_scale") if per_row else _full(scale)
    s = s.to(torch.float64).expand(t.shape[0]).contiguous()
    plan.x.to_local().copy_(_vp.shard_backward(s, None, x, t, weights, rows, shard, opts))
    return plan.wrap_rows(loss), plan.wrap_rows(rows[:, 0].clone())


def _logprobs_fwd(op, args, kwargs):
    a = _bind(op, args, kwargs)
    plan = _Plan(op, "logits", a["logits"])
    ent, st = bool(a["entropy"]), bool(a["stats"])
    if plan.vocab_dim is None:
        outs = op(*_local_args(op, a, plan, ("tokens",)))
    else:
        shard = plan.shard()
        t = plan.local_rows(a["tokens"], "tokens").contiguous()
        _vp.check_targets(_op_name(op), t, shard.V, None)
        outs = _vp.logprobs_forward(plan.x.to_local().contiguous(), t, shard, float(a["temperature"]), ent, st)
    lp, h, lse, stats, amax = outs
    return (plan.wrap_rows(lp), plan.wrap_rows(h, ent), plan.wrap_rows(lse), plan.wrap_rows(stats, st),
            plan.wrap_rows(amax, st))


def _logprobs_bwd(op, args, kwargs):
    a = _bind(op, args, kwargs)
    plan = _Plan(op, "logits", a["logits"])
    rows_args = ("grad_logprobs", "grad_entropy", "tokens", "lse", "entropy")
    if a["grad_entropy"] is None and isinstance(a["entropy"], DTensor):
        a["entropy"] = a["entropy"].to_local()  # not read without its gradient: no redistribution for it
    if plan.vocab_dim is None:
        return plan.wrap(op(*_local_args(op, a, plan, rows_args)), plan.x.shape, plan.x.placements)
    if a["vocab_start"] is not None:
        raise ValueError(f"{_op_name(op)}: `vocab_start` is for local slices; a DTensor sharded along the classes "
                         "carries its own")
    local = dict(zip([arg.name for arg in op._schema.arguments], _local_args(op, a, plan, rows_args)))
    shard = plan.shard()
    g = _vp.logprobs_backward(local["grad_logprobs"], local["grad_entropy"], local["logits"].contiguous(),
                              local["tokens"].contiguous(), local["lse"], local["entropy"], shard,
                              float(a["temperature"]))
    return plan.wrap(g, plan.x.shape, plan.x.placements)


def _scale_rows(op, args, kwargs):
    a = _bind(op, args, kwargs)
    x, scale = a["self"], a["scale"]
    if not isinstance(x, DTensor):
        raise TypeError(f"{_op_name(op)}: `self` is a plain tensor and `scale` a DTensor")
    plan = _Plan(op, "self", x)
    per_row = scale.dim() == 1 and scale.shape[0] == x.shape[0] and x.shape[0] != 1
    op(x.to_local(), plan.local_rows(scale, "scale") if per_row else _full(scale))
    return None


# ---------------------------------------------------------------- the softmax family along a sharded dimension


def _lse_across(lse: torch.Tensor, group) -> torch.Tensor:
    """log sum_r exp(lse_r) over the ranks of ``group`` (float32 / float64): all-reduce MAX, then SUM."""
    m = lse.clone()
    torch.distributed.all_reduce(m, op=torch.distributed.ReduceOp.MAX, group=group)
    ms = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    s = torch.exp(lse - ms)
    torch.distributed.all_reduce(s, op=torch.distributed.ReduceOp.SUM, group=group)
    return torch.where(torch.isfinite(m), torch.log(s) + ms, m)


def _dim_handler(op, args, kwargs):
    """softmax / log_softmax / logsumexp and their backwards. Along a sharded dimension: the local log-sum-exp on
    fastloss's kernel, one combine (2 small all-reduces), then one elementwise pass; the backwards need one
    all-reduce of a per-row sum (softmax / log_softmax) or none (logsumexp). Elsewhere: the local kernel."""
    a = _bind(op, args, kwargs)
    name = op._schema.name.split("::")[1]
    tensors = [n for n in ("grad_output", "output", "self", "result") if isinstance(a.get(n), torch.Tensor)]
    main = a["self"] if "self" in a else a["output"]
    if not isinstance(main, DTensor):
        raise TypeError(f"{_op_name(op)}: mixed DTensor and plain tensor arguments")
    mesh, placements, ndim = main.device_mesh, tuple(main.placements), main.ndim
    dim = a["dim"] % ndim
    keep = bool(a.get("keepdim", True))
    reduced = name == "logsumexp"  # its output drops (or keeps as 1) `dim`; the backward's grad / result too
    local = {}
    for n in tensors:
        v = a[n]
        want = placements
        if (name == "logsumexp_backward" and n in ("grad_output", "result")):
            want = _reduced_placements(placements, dim, keep)
        if not isinstance(v, DTensor):
            raise TypeError(f"{_op_name(op)}: mixed DTensor and plain tensor arguments")
        if any(p.is_partial() for p in v.placements):
            raise _placement_error(op, n, v.placements, "Partial is not supported")
        local[n] = (v if tuple(v.placements) == tuple(want) else v.redistribute(mesh, want)).to_local()
    vocab = [i for i, p in enumerate(placements) if p.is_shard(dim)]
    out_p = _reduced_placements(placements, dim, keep) if reduced else placements
    out_shape = list(main.shape)
    if reduced:
        if keep:
            out_shape[dim] = 1
        else:
            del out_shape[dim]

    def call_local():
        return op(*[local.get(arg.name, a[arg.name]) for arg in op._schema.arguments])

    if len(vocab) > 1:
        raise _placement_error(op, tensors[0], placements, f"dimension {dim} is sharded over two mesh dimensions")
    if not vocab:
        return _wrap(mesh, call_local(), out_shape, out_p)
    group = mesh.get_group(vocab[0])
    if name == "logsumexp_backward":  # grad * exp(x - result) with the global result: local
        return _wrap(mesh, call_local(), main.shape, placements)
    acc = torch.float64 if main.dtype == torch.float64 else torch.float32
    if name in ("softmax_backward", "log_softmax_backward"):
        g, y = local["grad_output"].to(acc), local["output"].to(acc)
        s = (g * y if name == "softmax_backward" else g).sum(dim, keepdim=True)
        torch.distributed.all_reduce(s, op=torch.distributed.ReduceOp.SUM, group=group)
        out = y * (g - s) if name == "softmax_backward" else g - torch.exp(y) * s
        return _wrap(mesh, out.to(local["output"].dtype), main.shape, placements)
    x = local["self"]
    lse = _lse_across(_lib.logsumexp(x, dim, True, a["algorithm"]).to(acc), group)
    if name == "logsumexp":
        out = (lse if keep else lse.squeeze(dim)).to(x.dtype)
        return _wrap(mesh, out, out_shape, out_p)
    y = x.to(acc) - lse
    out = torch.exp(y) if name == "softmax" else y
    return _wrap(mesh, out.to(x.dtype), main.shape, placements)


def _reduced_placements(placements, dim, keep):
    out = []
    for p in placements:
        if p.is_shard(dim):
            out.append(Replicate())
        elif p.is_shard() and p.dim > dim and not keep:
            out.append(Shard(p.dim - 1))
        else:
            out.append(p)
    return tuple(out)


def _wrap(mesh, local, global_shape, placements) -> DTensor:
    shape = torch.Size(global_shape)
    stride = torch.empty(shape, device="meta").stride()
    spec = DTensorSpec(mesh, tuple(placements), tensor_meta=TensorMeta(shape, stride, local.dtype))
    return DTensor(local, spec, requires_grad=False)


def _row_inplace(op, args, kwargs):
    """Ops that write over their first argument (rows x classes): the local kernel on each rank's rows, written
    in place; rows sharded or replicated only (a redistribution would write into a temporary)."""
    a = _bind(op, args, kwargs)
    first = op._schema.arguments[0].name
    plan = _Plan(op, first, a[first])
    if plan.vocab_dim is not None:
        raise _placement_error(op, first, plan.x.placements, f"sharded along the classes on mesh dimension "
                               f"{plan.vocab_dim}, which this op has no vocabulary-parallel rule for")
    if tuple(plan.x.placements) != plan.rows:
        raise _placement_error(op, first, plan.x.placements, "expected Shard(0) or Replicate")
    rows_args = _INPLACE_ROW_OPS[op._schema.name.split("::")[1]]
    outs = op(*_local_args(op, a, plan, rows_args))
    if outs is None:
        return None
    return tuple(plan.wrap_rows(o) for o in outs)


def _resolve_algorithm(op, args, kwargs):
    a = _bind(op, args, kwargs)
    x = a["self"]
    return op(x.to_local() if isinstance(x, DTensor) else x, a["dim"], a["algorithm"])


# The in-place row ops and their per-row arguments (besides the one written over).
_INPLACE_ROW_OPS = {
    "token_logprobs_bwd_": ("grad_logprobs", "grad_entropy", "tokens", "lse", "entropy"),
    "distill_fwd_inplace_grad": ("teacher", "target", "grad_scale"),
}

_HANDLERS = {
    "resolve_algorithm": _resolve_algorithm,
    "token_logprobs_fwd": _logprobs_fwd,
    "token_logprobs_bwd": _logprobs_bwd,
    "token_logprobs_bwd_": _row_inplace,
    "distill_fwd_inplace_grad": _row_inplace,
    "softmax": _dim_handler,
    "log_softmax": _dim_handler,
    "logsumexp": _dim_handler,
    "softmax_backward": _dim_handler,
    "log_softmax_backward": _dim_handler,
    "logsumexp_backward": _dim_handler,
    "cross_entropy_fwd": _ce_fwd,
    "cross_entropy_bwd": _ce_bwd,
    "cross_entropy_fwd_inplace_grad": _ce_fwd_inplace,
    "scale_rows_": _scale_rows,
}


# ---------------------------------------------------------------- row ops: Shard(0) or Replicate

# Per op: which tensor arguments hold rows (dimension 0 = tokens); the others (class weights, V-sized tables) are
# replicated. Every output holds rows.
_ROW_OPS = {
    "cross_entropy_prob_fwd": ("logits", "target"),
    "cross_entropy_prob_bwd": ("grad_loss", "grad_lse", "logits", "target", "lse", "sum_wy"),
    "cross_entropy_shard_fwd": ("logits", "target"),
    "cross_entropy_shard_loss": ("rows", "target"),
    "cross_entropy_shard_bwd": ("grad_loss", "grad_lse", "logits", "target", "rows"),
    "distill_fwd": ("student", "teacher", "target"),
    "distill_bwd": ("grad_loss", "student", "teacher", "target", "stats"),
    "distill_fwd_grad": ("student", "teacher", "target", "grad_scale"),
    "spherical_loss_fwd": ("input", "target"),
    "spherical_loss_bwd": ("grad_loss", "input", "target", "stats"),
    "spherical_loss_terms": ("stats", "target"),
}

def _spec_placements(spec):
    return tuple(spec.placements) if spec is not None and hasattr(spec, "placements") else ()


def _refuse(op, names_specs, bad):
    for name, spec in names_specs:
        for i, p in enumerate(_spec_placements(spec)):
            if p.is_partial():
                raise _placement_error(op, name, spec.placements, f"Partial on mesh dimension {i} is not supported")
            if bad(p):
                raise _placement_error(op, name, spec.placements, f"sharded along the classes on mesh dimension "
                                       f"{i}, which this op has no vocabulary-parallel rule for; redistribute to "
                                       "Replicate (or shard the rows, Shard(0)) first")


def _register_rule(op, rule) -> None:
    register_sharding(op)(rule)
    # register_sharding hashes only the int arguments into DTensor's sharding cache; fastloss's bool / str / float
    # arguments change output shapes (token_logprobs_fwd's entropy, ...), so every argument goes into the key.
    names = [a.name for a in op._schema.arguments]
    DTensor._op_dispatcher.sharding_propagator.op_to_schema_info[op] = RuntimeSchemaInfo(
        static_argnum=0, static_kwargkey=names, needs_pytree=True)


def _row_rule(op, row_args):
    names = [a.name for a in op._schema.arguments]
    n_out = len(op._schema.returns)

    def rule(*args, **kwargs):
        vals = dict(zip(names, args))
        vals.update(kwargs)
        _refuse(op, [(n, vals.get(n)) for n in row_args], lambda p: p.is_shard() and p.dim != 0)
        specs = [vals.get(n) for n in names]
        is_t = [hasattr(s, "placements") for s in specs]
        out = []
        for rows_p in (Replicate(), Shard(0)):
            ins = [None if not t else (rows_p if n in row_args else Replicate()) for n, t in zip(names, is_t)]
            out.append(([rows_p] * n_out, ins))
        return out

    return rule


def _softmax_topk_rule(x, k, dim=-1, algorithm="auto"):
    op = _lib.softmax_topk.default
    dim = dim % x.ndim
    _refuse(op, [("self", x)], lambda p: p.is_shard(dim))
    out = [([Replicate(), Replicate()], [Replicate(), None, None, None])]
    out += [([Shard(d), Shard(d)], [Shard(d), None, None, None]) for d in range(x.ndim) if d != dim]
    return out


_registered = False


def register() -> None:
    """Registers the rules above with DTensor (idempotent; called when fastloss is imported)."""
    global _registered
    if _registered:
        return
    _registered = True
    handlers = DTensor._op_dispatcher._custom_op_handlers
    for name, fn in _HANDLERS.items():
        handlers[getattr(_lib, name).default] = fn
    for name, rows in _ROW_OPS.items():
        op = getattr(_lib, name).default
        _register_rule(op, _row_rule(op, rows))
    _register_rule(_lib.softmax_topk.default, _softmax_topk_rule)


def covered_ops() -> set:
    """The fastloss ops with a DTensor rule (a handler or a sharding strategy)."""
    return set(_HANDLERS) | set(_ROW_OPS) | {"softmax_topk"}


def rows_like(input: DTensor, target: torch.Tensor, class_dim: int) -> torch.Tensor:
    """A plain class-index target (this rank's rows) as a DTensor matching ``input``'s placements with the class
    dimension removed (Shard(class_dim) -> Replicate, Shard(d > class_dim) -> Shard(d - 1)), as loss_parallel."""
    if isinstance(target, DTensor):
        return target
    placements = []
    for p in input.placements:
        if p.is_shard(class_dim) or not p.is_shard():
            placements.append(Replicate())
        else:
            placements.append(Shard(p.dim - 1 if p.dim > class_dim else p.dim))
    shape = torch.Size(tuple(input.shape[:class_dim]) + tuple(input.shape[class_dim + 1:]))
    if target.is_floating_point():  # probability targets: the input's own shape and placements
        shape, placements = input.shape, list(input.placements)
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(target, input.device_mesh, placements, run_check=False, shape=shape, stride=stride)


def replicate_like(input: DTensor, t: Optional[torch.Tensor]):
    if t is None or isinstance(t, DTensor):
        return t
    return DTensor.from_local(t, input.device_mesh, [Replicate()] * input.device_mesh.ndim, run_check=False)


# ---------------------------------------------------------------- linear cross-entropy with a DTensor head


class LinearOperands:
    """The local operands of a linear cross-entropy whose head weight is a DTensor: rows (V, D) sharded along the
    vocabulary on one mesh dimension (``ColwiseParallel`` on the head: ``Shard(0)``) and replicated on the others;
    the hidden states replicated over that mesh (a DTensor, or a plain tensor holding them). ``names``: the
    caller's names of (input, weight, bias, target) for messages; ignore_index None: targets are tokens."""

    def __init__(self, fn: str, input, W: DTensor, bias, target, weight, ignore_index: Optional[int],
                 names=("input", "linear_weight", "linear_bias", "target")):
        n_in, n_w, n_b, n_t = names
        if not isinstance(W, DTensor):
            raise TypeError(f"fastloss.{fn}: `{n_in}` is a DTensor but `{n_w}` is not; pass the head weight as "
                            "a DTensor (tensor parallelism) or both as plain tensors")
        self.mesh = W.device_mesh
        vocab = [i for i, p in enumerate(W.placements) if p.is_shard(0)]
        if any(not (p.is_replicate() or p.is_shard(0)) for p in W.placements) or len(vocab) > 1:
            raise NotImplementedError(f"fastloss.{fn}: `{n_w}` with placements {tuple(W.placements)}: only "
                                      "Shard(0) (the vocabulary, ColwiseParallel) on at most one mesh dimension and "
                                      "Replicate elsewhere are supported")
        self.shard = _vocab_shard(W, 0, vocab[0]) if vocab else None
        rep = [Replicate()] * self.mesh.ndim
        self.wrap_out = isinstance(input, DTensor)
        self.h = self._replicated(fn, n_in, n_w, input, rep)
        self.t = self._replicated(fn, n_t, n_w, target, rep)
        self.W = W.to_local()
        if bias is not None:
            if not isinstance(bias, DTensor) or tuple(bias.placements) != tuple(W.placements):
                raise NotImplementedError(f"fastloss.{fn}: `{n_b}` must be a DTensor with `{n_w}`'s placements "
                                          f"{tuple(W.placements)}")
            bias = bias.to_local()
        self.b = bias
        if self.shard is not None:
            self.weights = _vp.ClassWeights(_full(weight), self.shard, self.h.dtype)
            _vp.check_targets(f"fastloss.{fn}", self.t.reshape(-1), self.shard.V, ignore_index)
        else:
            self.weights = None
            self.weight = _full(weight)

    def _replicated(self, fn, name, n_w, x, rep):
        if not isinstance(x, DTensor):
            return x
        if x.device_mesh != self.mesh:
            raise ValueError(f"fastloss.{fn}: `{name}` is on another device mesh than `{n_w}`")
        if tuple(x.placements) != tuple(rep):
            x = x.redistribute(self.mesh, rep)
        return x.to_local()

    def wrap(self, out):
        """The result as a replicated DTensor when the input was one (differentiable), else as is."""
        if not self.wrap_out:
            return out
        rep = [Replicate()] * self.mesh.ndim

        def conv(v):
            return v if v is None else DTensor.from_local(v, self.mesh, rep, run_check=False)

        if isinstance(out, tuple):
            return type(out)(*(conv(v) for v in out))
        return conv(out)

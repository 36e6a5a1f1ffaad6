"""Relative error norms against float64 references, computed in row chunks.

Every result carries ``rel_err = ||got - ref|| / ||ref||`` (Frobenius norms over the finite entries of ``ref``),
where ``ref`` is the operation evaluated in float64 on the *same* input, so a fast but wrong kernel is visible next
to its speed. In ``fwdbwd`` mode the figure is the largest of the output's and every input gradient's error.

The reference is computed in row chunks of at most :data:`CHUNK_ELEMENTS` elements, so the float64 copies never
need the whole problem in memory at once (a [8192, 256000] float64 tensor alone is 16 GiB). Chunk results are kept
in the per-problem ``cache`` while they fit in :data:`CACHE_BYTES`, so the reference is computed once per problem
instead of once per implementation.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch

from .problems import Problem
from .registry import ErrorFn, Inputs

CHUNK_ELEMENTS = 2**25
CACHE_BYTES = 4 * 2**30


class _NormAcc:
    """Accumulates ||got - ref||^2 and ||ref||^2 over chunks (entries where ref is not finite are left out)."""

    def __init__(self) -> None:
        self.num = 0.0
        self.den = 0.0

    def add(self, got: torch.Tensor, ref: torch.Tensor, ref_stats: Optional[tuple[float, bool]] = None) -> None:
        """``ref_stats`` = (||ref||^2 over finite entries, all entries finite), when already known."""
        if tuple(got.shape) != tuple(ref.shape):  # broadcasting would hide a wrong result (and could be huge)
            raise ValueError(f"result shape {tuple(got.shape)} != reference shape {tuple(ref.shape)}")
        den, finite = ref_stats if ref_stats is not None else _ref_stats(ref)
        got = got.detach().to(ref.device)
        if finite:
            self.num += float(torch.linalg.vector_norm(ref - got)) ** 2  # promotes to float64, no explicit copy
        else:
            mask = torch.isfinite(ref)
            self.num += float(torch.linalg.vector_norm(ref[mask] - got[mask].to(torch.float64))) ** 2
        self.den += den

    def value(self) -> float:
        return (self.num / self.den) ** 0.5 if self.den > 0 else self.num**0.5


def _ref_stats(ref: torch.Tensor) -> tuple[float, bool]:
    finite = bool(torch.isfinite(ref).all())
    norm = torch.linalg.vector_norm(ref if finite else ref[torch.isfinite(ref)])
    return float(norm) ** 2, finite


def _row_chunks(n: int, row_elems: int) -> list[tuple[int, int]]:
    step = max(1, CHUNK_ELEMENTS // max(1, row_elems))
    return [(a, min(n, a + step)) for a in range(0, n, step)]


def _to64(t: Any, requires_grad: bool) -> Any:
    if isinstance(t, torch.Tensor) and t.is_floating_point():
        return t.detach().to(torch.float64).requires_grad_(requires_grad)
    return t


def _cache_put(cache: dict, key: Any, value: list[tuple[torch.Tensor, Any]]) -> None:
    size = sum(t.numel() * t.element_size() for t, _ in value)
    used = cache.get("_bytes", 0)
    if used + size <= CACHE_BYTES:
        cache[key] = value
        cache["_bytes"] = used + size


def rowwise_error(reference: Callable[..., torch.Tensor], grad_inputs: tuple[int, ...] = (0,)) -> ErrorFn:
    """Error function for row-independent operations (softmax, log_softmax, logsumexp over the last dim).

    ``reference(*inputs64)`` evaluates the operation in float64; every tensor input and the output are split along
    dim 0, which is exact because rows do not interact.
    """

    def rel_error(problem: Problem, inputs: Inputs, grad_out: Optional[torch.Tensor], got: Any,
                  got_grads: Sequence[torch.Tensor], cache: dict) -> float:
        need_grad = grad_out is not None
        row_elems = max(t.numel() // max(1, problem.n) for t in inputs if isinstance(t, torch.Tensor))
        out_acc = _NormAcc()
        grad_accs = [_NormAcc() for _ in got_grads]
        for a, b in _row_chunks(problem.n, row_elems):
            key = ("rowwise", a, b, need_grad)
            if key in cache:
                refs = cache[key]
            else:
                chunk = [_to64(t[a:b], need_grad and i in grad_inputs) for i, t in enumerate(inputs)]
                with torch.enable_grad():
                    ref = reference(*chunk)
                    grads: tuple[torch.Tensor, ...] = ()
                    if need_grad:
                        diff = [chunk[i] for i in grad_inputs]
                        grads = torch.autograd.grad(ref, diff, grad_out[a:b].to(torch.float64))
                refs = [(r, _ref_stats(r)) for r in (ref.detach(), *grads)]
                _cache_put(cache, key, refs)
            (ref, stats), grad_refs = refs[0], refs[1:]
            out_acc.add(got[a:b], ref, stats)
            for acc, g, (r, st) in zip(grad_accs, got_grads, grad_refs):
                acc.add(g[a:b], r, st)
        return max([out_acc.value()] + [acc.value() for acc in grad_accs])

    return rel_error


def mean_loss_error(
    row_loss_sum: Callable[..., torch.Tensor],
    row_args: tuple[int, ...],
    grad_inputs: tuple[int, ...],
    count: Callable[[Inputs], int],
    row_elements: Callable[[Problem], int] = lambda p: p.v,
) -> ErrorFn:
    """Error function for a mean-reduced loss over rows (cross-entropy and its fused-linear variant).

    ``row_loss_sum(problem, *chunk_inputs64)`` returns the float64 *sum* of per-row losses for a chunk; inputs listed in
    ``row_args`` are split by rows, the rest (a classifier weight) are passed whole. The loss is
    ``sum over chunks / count(inputs)``; gradients of row-split inputs are compared chunk by chunk and gradients of
    shared inputs are accumulated over chunks in float64 and compared at the end. ``row_elements(problem)`` sizes
    the chunks: the float64 elements one row needs (V logits per row, also for the fused linear variant, whose
    inputs are only D wide but whose reference materialises the logits).
    """

    def rel_error(problem: Problem, inputs: Inputs, grad_out: Optional[torch.Tensor], got: Any,
                  got_grads: Sequence[torch.Tensor], cache: dict) -> float:
        need_grad = grad_out is not None
        denom = max(1, int(count(inputs)))
        scale = (float(grad_out) if need_grad else 1.0) / denom
        row_elems = row_elements(problem)
        shared64 = {i: _to64(t, need_grad and i in grad_inputs) for i, t in enumerate(inputs) if i not in row_args}
        total = 0.0
        grad_accs = {i: _NormAcc() for i in grad_inputs if i in row_args}
        shared_grads: dict[int, torch.Tensor] = {}
        for a, b in _row_chunks(problem.n, row_elems):
            chunk = [
                _to64(t[a:b], need_grad and i in grad_inputs) if i in row_args else shared64[i]
                for i, t in enumerate(inputs)
            ]
            with torch.enable_grad():
                s = row_loss_sum(problem, *chunk)
                total += float(s.detach())
                if need_grad:
                    grads = torch.autograd.grad(s, [chunk[i] for i in grad_inputs])
            if need_grad:
                for k, i in enumerate(grad_inputs):
                    g = grads[k] * scale
                    if i in row_args:
                        grad_accs[i].add(got_grads[k][a:b], g)
                    else:
                        shared_grads[i] = shared_grads[i] + g if i in shared_grads else g
        ref = total / denom
        got_val = float(got.detach().double())
        errs = [abs(got_val - ref) / abs(ref) if ref != 0 else abs(got_val)]
        errs += [acc.value() for acc in grad_accs.values()]
        for k, i in enumerate(grad_inputs):
            if i in shared_grads:
                acc = _NormAcc()
                acc.add(got_grads[k], shared_grads[i])
                errs.append(acc.value())
        return max(errs)

    return rel_error

"""Chunked linear cross-entropy: the loss of ``input @ W.T (+ b)`` without ever materialising the N x V logits.

Tokens are walked in chunks sized from a memory budget. For each chunk the logits are computed with the library
GEMM (cuBLAS / ATen CPU), the fused cross-entropy kernel turns them, in place, into d loss / d logits, and two more
GEMMs turn those into the chunk's rows of d input and its contribution to d W (accumulated in float32). So when
gradients are needed the whole backward happens inside the forward (as in Liger Kernel and torch's chunked path),
and the backward only scales the stored gradients by the incoming gradient -- three GEMMs in all, the same as the
unchunked computation, and one chunk of logits alive at a time. ``reduction="none"`` cannot know its per-token
incoming gradient in advance, so it recomputes the chunks in the backward (four GEMMs).

No host synchronisation: chunk boundaries come from shapes, reduction denominators stay on the device.
"""

from __future__ import annotations

from typing import Optional

import torch

from ._common import reduce_rows

# Default logits bytes per chunk. CPU: 256 MiB, measured (N=4096 D=1024 V=65536 fp32, 2 threads): 64 MiB chunks
# (256 rows) ran 36-40 s, 256 MiB (1024 rows) 30 s, 512 MiB 27-29 s against the unchunked 27-35 s -- the d W GEMM's
# inner dimension is the chunk's row count, and ATen's CPU GEMM wants it large; 256 MiB keeps the extra peak
# within the 0.4 GB the CPU benchmark allows. CUDA: large enough that each GEMM fills the GPU.
CHUNK_BUDGET_BYTES = {"cpu": 256 << 20, "cuda": 256 << 20}


def resolve_chunk_rows(chunk_size, n_rows: int, vocab: int, dtype: torch.dtype, device: torch.device, *,
                       fn: str = "linear_cross_entropy", buffers: int = 1) -> int:
    """Tokens per chunk: ``chunk_size``, or for "auto" as many as fit the device's budget with ``buffers`` logits
    rows of ``vocab`` entries each per token (distillation holds the student's and the teacher's)."""
    if chunk_size == "auto":
        budget = CHUNK_BUDGET_BYTES.get(device.type, 64 << 20)
        itemsize = torch.empty((), dtype=_compute_dtype(dtype, device)).element_size()
        rows = budget // max(1, buffers * vocab * itemsize)
    else:
        try:
            rows = int(chunk_size)
        except (TypeError, ValueError):
            rows = 0
        if rows <= 0:
            raise ValueError(f"fastloss.{fn}: `chunk_size` must be a positive int or 'auto', got {chunk_size!r}")
    return max(1, min(rows, max(n_rows, 1)))


def _compute_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    # ATen's CPU GEMM is slow and inexact-ish in bf16 / fp16: CPU chunks run in float32 (more accurate than the
    # reference). CUDA keeps the input dtype (tensor cores), accumulating d W in float32.
    if device.type == "cpu" and dtype in (torch.bfloat16, torch.float16):
        return torch.float32
    return dtype


def no_autocast(device: torch.device):
    """The chunks' GEMMs run in the inputs' dtype: under torch.autocast F.linear would hand bf16 / fp16 logits to
    kernels whose gradient buffers are float32 (and a torch.mm(out=) of another dtype fails)."""
    return torch.autocast(device_type=device.type, enabled=False)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# (device type, matrix dtype, accumulator dtype) -> whether torch.addmm(..., out_dtype=acc) works there.
_ADDMM_OUT_DTYPE: dict = {}


def _addmm_out_dtype_supported(acc: torch.Tensor, a: torch.Tensor) -> bool:
    """Probe once per (device type, dtypes) whether ``addmm`` accepts a float32 ``self`` / ``out`` with bf16 / fp16
    matrices (``out_dtype=``): older torch releases reject it. Never under torch.compile, where ``addmm.dtype_out``
    has broken graphs."""
    if torch.compiler.is_compiling():
        return False
    key = (acc.device.type, a.dtype, acc.dtype)
    ok = _ADDMM_OUT_DTYPE.get(key)
    if ok is None:
        try:
            m = torch.full((2, 2), 0.5, dtype=a.dtype, device=a.device)
            r = torch.ones((2, 2), dtype=acc.dtype, device=acc.device)
            torch.addmm(r, m, m, out_dtype=acc.dtype, out=r)
            ok = bool(torch.equal(r.cpu(), torch.full((2, 2), 1.5, dtype=acc.dtype)))
        except (RuntimeError, TypeError, NotImplementedError, ValueError):
            ok = False
        _ADDMM_OUT_DTYPE[key] = ok
    return ok


def _addmm_acc(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b with float32 accumulation and no rounding of the partial product to a's dtype."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
    elif _addmm_out_dtype_supported(acc, a):  # CUDA bf16 / fp16: cuBLAS with a float32 output
        torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
    else:  # a float32 product then an add: one float32 copy of a and b (this chunk's size) more
        acc.add_(torch.mm(a.to(acc.dtype), b.to(acc.dtype)))


def _kept_columns(g: torch.Tensor, scale: torch.Tensor, filter_eps: float) -> Optional[torch.Tensor]:
    """Gradient filtering (Cut Cross-Entropy): the vocabulary columns of this chunk's d loss / d logits worth the
    backward GEMMs, or None when too many survive for the gather to pay.

    A column is dropped when every entry is below ``filter_eps`` times the largest incoming-gradient factor in
    magnitude -- without class weights or softcap that is CCE's rule, softmax value < eps. Dropped entries are
    each smaller than that bound, which is the whole error. NaN columns are kept (``~(x < t)``), so a NaN never
    turns into a silent zero. Selecting the columns needs their count on the host: on CUDA this is one
    synchronisation per chunk, the price of an option that is off by default."""
    thresh = scale.abs().amax().to(torch.float32) * filter_eps
    col = g.abs().amax(0).to(torch.float32)
    keep = (~(col < thresh)).nonzero().squeeze(1)
    if keep.numel() > g.shape[1] // 2:
        return None
    return keep


def _chunk_backward(g, hc, Wc, gh_rows, gW, gb, acc, keep):
    """d h rows = g @ W, d W += g.T @ h, d b += column sums of g; over all columns or only ``keep``."""
    if keep is None:
        if gh_rows is not None:
            torch.mm(g, Wc, out=gh_rows)
        if gW is not None:
            _addmm_acc(gW, g.t(), hc)
        if gb is not None:
            gb += g.sum(0, dtype=acc)
        return
    gk = g.index_select(1, keep)
    if gh_rows is not None:
        torch.mm(gk, Wc.index_select(0, keep), out=gh_rows)
    if gW is not None:
        part = torch.zeros((keep.numel(), gW.shape[1]), dtype=gW.dtype, device=gW.device)
        _addmm_acc(part, gk.t(), hc)
        gW.index_add_(0, keep, part)
    if gb is not None:
        gb.index_add_(0, keep, gk.sum(0, dtype=acc))


def run_chunks(h, *args, **kwargs):
    """One pass over token chunks. With ``scale`` (per-row or single incoming-gradient factors) also returns the
    gradients of h, W and b (None where not wanted). ``filter_eps`` > 0 skips the backward GEMM work of vocabulary
    columns whose gradient entries are all below it (see :func:`_kept_columns`). Autocast is off inside."""
    with no_autocast(h.device):
        return _run_chunks(h, *args, **kwargs)


def _run_chunks(h, W, b, t, weight, ignore_index, label_smoothing, z_loss, softcap, algorithm, chunk_rows,
                scale: Optional[torch.Tensor], want_h: bool, want_w: bool, want_b: bool, filter_eps: float = 0.0,
                loss_kind: tuple = ("ce", 0.0), lowrank: Optional[tuple] = None, want_lowrank=(False, False)):
    """``lowrank`` = (U, B), U (N, R) and B (V, R): the logits are ``h W^T + b + U B^T``, the linear map of the
    widened operands [h, U] and [W, B] (a LoRA adapter on the head) without building [W, B]; ``want_lowrank`` says
    whether d U and d B are wanted. Returns (loss rows, lse rows, d h, d W, d b, d U, d B)."""
    ops = torch.ops.fastloss
    N = h.shape[0]
    V = W.shape[0]
    dev = h.device
    cdt = _compute_dtype(h.dtype, dev)
    acc = _acc_dtype(h.dtype)
    Wc = W.to(cdt)
    bc = b.to(cdt) if b is not None else None
    soft = t.is_floating_point()
    loss_rows = torch.empty(N, dtype=torch.float64, device=dev)
    lse_rows = torch.empty(N, dtype=torch.float64, device=dev)
    grad = scale is not None
    gh = torch.empty(h.shape, dtype=cdt, device=dev) if grad and want_h else None
    gW = torch.zeros((V, W.shape[1]), dtype=acc, device=dev) if grad and want_w else None
    gb = torch.zeros(V, dtype=acc, device=dev) if grad and want_b and b is not None else None
    per_row = grad and scale.numel() == N and N != 1
    U = Bc_low = gU = gB_low = None
    if lowrank is not None:
        U, Bc_low = lowrank[0], lowrank[1].to(cdt)
        gU = torch.empty(U.shape, dtype=cdt, device=dev) if grad and want_lowrank[0] else None
        gB_low = torch.zeros(Bc_low.shape, dtype=acc, device=dev) if grad and want_lowrank[1] else None
    for s in range(0, N, chunk_rows):
        e = min(N, s + chunk_rows)
        hc = h[s:e].to(cdt)
        logits = torch.nn.functional.linear(hc, Wc, bc)
        Uc = U[s:e].to(cdt) if U is not None else None
        if Uc is not None:
            logits.addmm_(Uc, Bc_low.t())
        tc = t[s:e]
        sc = (scale[s:e] if per_row else scale) if grad else None
        if soft:
            rows, lse, sum_wy = ops.cross_entropy_prob_fwd(logits, tc, weight, label_smoothing, z_loss, softcap,
                                                           algorithm)
            g = None
            if grad:
                g = ops.cross_entropy_prob_bwd(sc.expand(e - s) if not per_row else sc, None, logits, tc, weight, lse,
                                               sum_wy, label_smoothing, z_loss, softcap)
        elif grad:
            rows, lse = ops.cross_entropy_fwd_inplace_grad(logits, tc, weight, sc, ignore_index, label_smoothing,
                                                           z_loss, softcap, algorithm, *loss_kind)
            g = logits  # now d loss / d logits, scaled
        else:
            rows, lse, _ = ops.cross_entropy_fwd(logits, tc, weight, ignore_index, label_smoothing, z_loss, softcap,
                                                 algorithm, *loss_kind)
            g = None
        loss_rows[s:e] = rows
        lse_rows[s:e] = lse
        if g is not None:
            keep = _kept_columns(g, sc, filter_eps) if filter_eps > 0 else None
            _chunk_backward(g, hc, Wc, gh[s:e] if gh is not None else None, gW, gb, acc, keep)
            if Uc is not None:  # the low-rank block of the widened operands: d U rows = g B, d B += g^T U
                _chunk_backward(g, Uc, Bc_low, gU[s:e] if gU is not None else None, gB_low, None, acc, keep)
        # Drop this chunk's logits before the next chunk's are allocated: two alive at once would double the peak.
        del g, logits
    out = lambda x, like: None if x is None else x.to(like.dtype)  # noqa: E731
    low = (out(gU, U), out(gB_low, lowrank[1])) if lowrank is not None else (None, None)
    return loss_rows, lse_rows, out(gh, h), out(gW, W), (out(gb, b) if b is not None else None), *low


class LinearCrossEntropyFunction(torch.autograd.Function):
    """Inputs h, W, b and the optional low-rank block U, B (see :func:`_run_chunks`); ``want`` says which of the
    five need a gradient."""

    @staticmethod
    def forward(ctx, h, W, b, U, B, t, weight, ignore_index, label_smoothing, z_loss, softcap, algorithm, reduction,
                chunk_rows, denom, out_shape, want, filter_eps, loss_kind):
        args = (weight, ignore_index, label_smoothing, z_loss, softcap, algorithm, chunk_rows)
        ctx.loss_kind = loss_kind
        lowrank = (U, B) if U is not None else None
        precompute = reduction != "none" and any(want)
        scale = None
        if precompute:
            acc = _acc_dtype(h.dtype)
            scale = (1.0 / denom).to(acc).reshape(1) if reduction == "mean" else torch.ones(1, dtype=acc,
                                                                                              device=h.device)
        rows, lse, *grads = run_chunks(h, W, b, t, *args, scale=scale, want_h=want[0], want_w=want[1],
                                       want_b=want[2], filter_eps=filter_eps, loss_kind=loss_kind, lowrank=lowrank,
                                       want_lowrank=want[3:])
        ctx.filter_eps = filter_eps
        ctx.reduction = reduction
        ctx.args = args
        ctx.want = want
        ctx.precompute = precompute
        if precompute:
            ctx.save_for_backward(*grads)
        elif any(want):
            ctx.save_for_backward(h, W, b, U, B, t)
        ctx.mark_non_differentiable(lse)
        return reduce_rows(rows, reduction, out_shape, denom), lse

    @staticmethod
    def backward(ctx, grad_loss, _grad_lse):
        if ctx.precompute:
            g = grad_loss.reshape(())
            grads = [None if x is None else x.mul_(g.to(x.dtype)) for x in ctx.saved_tensors]
        else:
            h, W, b, U, B, t = ctx.saved_tensors
            want = ctx.want
            scale = grad_loss.reshape(-1).to(_acc_dtype(h.dtype))
            _, _, *grads = run_chunks(h, W, b, t, *ctx.args, scale=scale, want_h=want[0], want_w=want[1],
                                      want_b=want[2], filter_eps=ctx.filter_eps, loss_kind=ctx.loss_kind,
                                      lowrank=(U, B) if U is not None else None, want_lowrank=want[3:])
        return (*grads, *([None] * 14))


# ---------------------------------------------------------------- one head in chunks (log-prob / distillation versions)


class Head:
    """One LM head in its chunk compute dtype: logits of rows [s, e)."""

    def __init__(self, h, W, b):
        self.cdt = _compute_dtype(h.dtype, h.device)
        self.h, self.W = h, W.to(self.cdt)
        self.b = b.to(self.cdt) if b is not None else None

    def rows(self, s, e):
        return self.h[s:e].to(self.cdt)

    def logits(self, hc):
        return torch.nn.functional.linear(hc, self.W, self.b)


class HeadGrads:
    """d h (rows), d W and d b (float32 / float64 accumulators) of one head, as wanted."""

    def __init__(self, head: Head, W, want):
        dev, acc = head.h.device, _acc_dtype(head.h.dtype)
        self.acc = acc
        self.gh = torch.empty(head.h.shape, dtype=head.cdt, device=dev) if want[0] else None
        self.gW = torch.zeros(W.shape, dtype=acc, device=dev) if want[1] else None
        self.gb = torch.zeros(W.shape[0], dtype=acc, device=dev) if want[2] else None

    def add_chunk(self, g, hc, head: Head, s, e):
        _chunk_backward(g, hc, head.W, self.gh[s:e] if self.gh is not None else None, self.gW, self.gb, self.acc,
                        None)

    def result(self, h, W, b, keep_acc: bool = False):
        """d h, d W, d b in the dtypes of h, W, b (keep_acc: as accumulated, float32 / the compute dtype)."""
        out = lambda x, like: (None if x is None or like is None  # noqa: E731
                               else x if keep_acc else x.to(like.dtype))
        return out(self.gh, h), out(self.gW, W), out(self.gb, b)

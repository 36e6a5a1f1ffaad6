#!/usr/bin/env python3
"""A short workload that launches every fastloss kernel, for compute-sanitizer.

bench/gpu_check.sh runs it under compute-sanitizer's memcheck, racecheck and synccheck with the check restricted to
fastloss's own kernels (`--kernel-name kns=fastloss`: every kernel lives in namespace fastloss::cuda, so its name,
mangled or not, contains "fastloss"). It also runs on the CPU (`--device cpu`), where it calls the same Python
entry points on the CPU kernels, so the script itself is tested without a GPU (tests/test_gpu_check.py).

What it calls (forward and backward unless said otherwise), each on small tensors:

* softmax, log_softmax, logsumexp and their backward ops, algorithm "online" and "two_pass", in float32,
  bfloat16, float16 and float64, on row lengths that pick every launch shape of csrc/cuda/softmax_cuda.cu:

  ===============  =========================================================================================
  shape [rows, V]  CUDA kernel it selects
  ===============  =========================================================================================
  (5, 2) (6, 3)    warp path, a thread per row (one 16-byte vector or less: V <= 2 double, 4 float, 8 half)
  (5, 7) (6, 13)   warp path, groups of 2 to 16 lanes with one vector each (several rows per warp), by dtype
  (5, 31) (4, 50)  (rows that are not a whole number of vectors: a scalar head and tail per row)
  (3, 100)
  (3, 200)         warp path, 32 lanes x one vector (kVec items) for every dtype but float64 (4 vectors)
  (4, 300)         warp path, 32 lanes x 16 items (also for float64, whose warp path ends at V = 512)
  (3, 1000)        warp path, 32 lanes x 32 items; float64: block path
  (3, 20011)       block path, 512 threads (16-byte vectors, a scalar tail)
  (2, 262147)      split path (V >= 256K with fewer rows than 2 x SMs): state, merge and softmax kernels
  (3, 4099) +1     block path on a row that starts 1 element past a 16-byte boundary (a contiguous view at
                   storage offset 1): the scalar head, and logsumexp's backward without 16-byte vectors
  special          rows of -inf, +inf and NaN (the two-pass algorithm's online fallback); not value-checked
  transposed       softmax over dim 0 of a non-contiguous tensor (the layout path)
  ===============  =========================================================================================

* softmax_topk with k = 1, 5 (<= 8: within one thread's register list), 20, 100, 128 (<= 128: the fused kernel,
  threads rescanning their share when they give more than 8 winners) and 129,
  200 (above the CUDA fused limit of 128: the composite path), both algorithms, every dtype, on rows of 300, 4099
  and 262147; backward through the values.
* cross_entropy on row lengths that pick every group size of csrc/cuda/cross_entropy_cuda.cu ((6, 13): 8 threads
  per row; (5, 300): 16 to 64 by dtype; (4, 5000): 256, the whole block; a misaligned (3, 4099) view), in every
  dtype and with both algorithms, in every mode: class-index targets with ignore_index (forward with and without
  gradient, backward), class weights, label smoothing, z-loss, softcap, the lse output with its gradient,
  reduction "none" / "sum", inplace_backward (the fused forward-with-gradient kernel and scale_rows), probability
  targets (with smoothing and weights), loss="focal" / "poly1" / "squentropy" (default and in place); long rows
  (2, 262147) in the modes of CE_LONG_MODES; a 3-d input and an all-ignored batch.
* the vocabulary-shard ops (cross_entropy_shard_fwd / _loss / _bwd: the forward kernel's ShardForward and the
  backward's ShardBackward modes, the per-row loss kernel) on two uneven shards of the cross_entropy shapes (the
  misaligned one as misaligned shards), every dtype and both algorithms: plain, label smoothing + weights +
  softcap, squentropy + z-loss, focal + weights + softcap with an lse gradient; combined here as the distributed
  layer combines them, checked against the full-vocabulary float64 loss and its gradient.
* linear_cross_entropy (chunked, several chunks) in every dtype: plain with a bias, weights + smoothing, softcap
  + z-loss + lse, focal, squentropy, reduction "none" (the backward recomputes), gradient filtering
  (filter_eps="auto") and probability targets.
* spherical_loss ("z", "taylor_softmax", "mse"; block per row) in every dtype on short, long and very long rows
  and a misaligned view, with ignored rows and a random upstream gradient per row; linear_spherical_loss with a
  bias (the per-row terms kernel; the rest is cuBLAS).

Results are compared with float64 references computed on the CPU (relative error norm, a loose per-dtype bound:
the point is to catch garbage, the test suite checks precision); a CUDA error stops the run at once (the context
is lost). Prints one line per category and every failure.

Usage:  python bench/gpu_workload.py [--device cuda|cpu] [--size small|tiny] [--parts LIST] [--no-check]
Exit:   0 every call ran (and matched its reference), 1 a call failed or mismatched, 2 bad arguments.
"""

from __future__ import annotations

import argparse
import collections
import sys
import time
import traceback
from typing import Callable, Optional

import torch
import torch.nn.functional as F

import fastloss
from fastloss.reference import (ce_shard_combine_ref, comp_sum_loss_reference, cross_entropy_rows_reference,
                                distillation_loss_reference, spherical_loss_reference, token_logprobs_reference)

DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
ALGS = ("online", "two_pass")
TOL = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 1e-1}
"""Bound on the relative error norm against float64 per input dtype: loose on purpose (garbage, not precision; a
bf16 logsumexp of a 262147-long row is ~17, rounded to 1/16, and its backward exponentiates that rounding)."""
IGNORE = -100

# (label, rows, V) per size. "small" is what the sanitizer runs; "tiny" keeps every call but shrinks the long rows
# (on CUDA the split path then goes untested: it is for a quick run of the script on the CPU).
ROW_SHAPES = {
    "small": [("thread2", 5, 2), ("thread4", 6, 3), ("warp8", 5, 7), ("warp16", 6, 13), ("warp32", 5, 31),
              ("warp64", 4, 50), ("warp128", 3, 100), ("warp32x8", 3, 200), ("warp32x16", 4, 300),
              ("warp32x32", 3, 1000), ("block512", 3, 20011), ("split", 2, 262147)],
    "tiny": [("warp8", 5, 7), ("warp16", 6, 13), ("warp32x1", 5, 31), ("warp32x16", 4, 300),
             ("warp32x32", 3, 1000), ("block", 3, 2053)],
}
MISALIGNED = {"small": (3, 4099), "tiny": (3, 1031)}
CE_SHAPES = {
    "small": [("g8", 6, 13), ("g16-64", 5, 300), ("block", 4, 5000)],
    "tiny": [("g8", 6, 13), ("g16-64", 5, 300), ("block", 4, 2053)],
}
CE_LONG = {"small": (2, 262147), "tiny": (2, 4099)}
CE_SHARD_MODES = (("plain", {}),
                  ("smoothing+weights+softcap", {"label_smoothing": 0.1, "weight": True, "softcap": 5.0}),
                  ("squentropy+z", {"loss": "squentropy", "z_loss": 1e-3}),
                  ("focal+weights+softcap+lse", {"loss": "focal", "loss_param": 2.0, "weight": True, "softcap": 5.0,
                                                 "grad_lse": True}))
"""Modes of the vocabulary-shard calls (each on the CE_SHAPES and the misaligned shape, both algorithms)."""
"""Long rows (the whole-block kernels over many iterations) get the modes of :data:`CE_LONG_MODES` only."""
CE_LONG_MODES = ("index", "smoothing", "softcap+z+smoothing", "inplace", "no-grad", "prob+smoothing+weights",
                 "squentropy", "squentropy-inplace")
TOPK = {
    "small": [(4, 300, (1, 5, 20, 100, 128, 129, 200)), (3, 4099, (5, 128, 129)), (2, 262147, (5, 128))],
    "tiny": [(4, 300, (1, 5, 20, 100, 128, 129, 200)), (3, 1031, (5, 129))],
}
LCE = {"small": (37, 64, 1000, 8), "tiny": (13, 16, 100, 4)}
DISTILL = {"small": [(5, 13), (4, 5000), (2, 70001)], "tiny": [(5, 13), (3, 2053)]}
"""(rows, V) of the distillation and token log-probability calls (block-per-row kernels: short, long, very long)."""
"""(tokens, hidden, vocabulary, chunk_size) of the linear cross-entropy calls."""


SPHERICAL = {"small": [(5, 13), (4, 5000), (2, 70001)], "tiny": [(5, 13), (3, 2053)]}
"""(rows, V) of the spherical-loss calls (block-per-row kernels: short, long, very long)."""
SPHERICAL_LOSSES = (("z", {"a": 0.7, "b": 2.5}), ("taylor_softmax", {}), ("mse", {}))

PARTS = ("row_ops", "topk", "cross_entropy", "linear_cross_entropy", "distillation", "spherical")


class CudaFailure(Exception):
    """A CUDA error: the context is unusable, so the workload stops."""


def _is_cuda_error(e: BaseException) -> bool:
    text = f"{type(e).__name__}: {e}"
    return "CUDA error" in text or "AcceleratorError" in text or "CUDA kernel errors" in text


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """||got - ref|| / ||ref|| over the finite entries of ref (float64, on the CPU); inf when got is not finite
    where ref is."""
    got = got.detach().double().cpu()
    ref = ref.detach().double().cpu()
    if got.shape != ref.shape:
        raise ValueError(f"shape {tuple(got.shape)} != reference shape {tuple(ref.shape)}")
    mask = torch.isfinite(ref)
    if not bool(torch.isfinite(got[mask]).all()):
        return float("inf")
    num = float(torch.linalg.vector_norm(got[mask] - ref[mask]))
    den = float(torch.linalg.vector_norm(ref[mask]))
    return num / den if den > 0 else num


class Workload:
    def __init__(self, device: str, size: str, check: bool, verbose: bool) -> None:
        self.device = device
        self.size = size
        self.check = check
        self.verbose = verbose
        self.gen = torch.Generator().manual_seed(0)
        self.calls: collections.Counter = collections.Counter()
        self.checked: collections.Counter = collections.Counter()
        self.failures: list[str] = []

    # ------------------------------------------------------------ helpers

    def rand(self, shape: tuple, dtype: torch.dtype, scale: float = 3.0) -> torch.Tensor:
        """N(0, scale^2) drawn on the CPU in float64, rounded to dtype, moved to the device (never zeros)."""
        x = torch.randn(shape, generator=self.gen, dtype=torch.float64) * scale
        return x.to(dtype).to(self.device)

    def misaligned(self, rows: int, v: int, dtype: torch.dtype) -> torch.Tensor:
        """A contiguous [rows, v] view one element past the start of its storage: not 16-byte aligned."""
        buf = self.rand((rows * v + 1,), dtype)
        return buf[1:].view(rows, v)

    def targets(self, n: int, c: int, ignore: bool = True) -> torch.Tensor:
        t = torch.randint(0, c, (n,), generator=self.gen)
        if ignore and n > 1:
            t[1] = IGNORE
        return t.to(self.device)

    def sync(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()

    def run(self, category: str, label: str, fn: Callable[[], Optional[list[tuple[str, torch.Tensor, torch.Tensor,
                                                                                      torch.dtype]]]]) -> None:
        """Call fn (which makes the fastloss calls and returns (what, got, ref, dtype) checks), synchronise, and
        compare. Exceptions are recorded; a CUDA error stops everything."""
        self.calls[category] += 1
        try:
            checks = fn() or []
            self.sync()
        except Exception as e:  # noqa: BLE001 (every failing call is reported)
            if _is_cuda_error(e):
                self.failures.append(f"{category} {label}: {type(e).__name__}: {e}")
                raise CudaFailure(str(e)) from e
            lines = traceback.format_exception_only(type(e), e)
            self.failures.append(f"{category} {label}: {''.join(lines).strip()}")
            return
        if not self.check:
            return
        for what, got, ref, dtype in checks:
            try:
                err = rel_err(got, ref)
            except Exception as e:  # noqa: BLE001 (a wrong shape is a failure like a wrong value)
                self.failures.append(f"{category} {label}: {what}: {type(e).__name__}: {e}")
                continue
            self.checked[category] += 1
            if not err <= TOL[dtype]:
                self.failures.append(f"{category} {label}: {what}: relative error {err:.3g} > {TOL[dtype]:g}")
            elif self.verbose:
                print(f"  ok {category} {label} {what}: {err:.2e}")

    # ------------------------------------------------------------ softmax / log_softmax / logsumexp

    def row_ops(self) -> None:
        shapes = [(lab, (r, v), None) for lab, r, v in ROW_SHAPES[self.size]]
        shapes.append(("misaligned", MISALIGNED[self.size], "misaligned"))
        for dtype in DTYPES:
            for lab, shape, kind in shapes:
                for alg in ALGS:
                    for op in ("softmax", "log_softmax", "logsumexp"):
                        self.run(op, f"{lab} {tuple(shape)} {dtype} {alg}",
                                 lambda: self._row_op(op, alg, dtype, shape, kind == "misaligned"))
            for alg in ALGS:
                for op in ("softmax", "log_softmax", "logsumexp"):
                    self.run(op, f"special {dtype} {alg}", lambda: self._special(op, alg, dtype))
            self.run("softmax", f"transposed {dtype}", lambda: self._transposed(dtype))

    def _row_op(self, op: str, alg: str, dtype: torch.dtype, shape: tuple, misaligned: bool) -> list:
        x = self.misaligned(*shape, dtype) if misaligned else self.rand(shape, dtype)
        xl = x.detach().requires_grad_()
        fl = getattr(fastloss, op)
        y = fl(xl, -1, algorithm=alg)
        g = self.rand(tuple(y.shape), dtype, scale=1.0)
        (gx,) = torch.autograd.grad(y, xl, g)
        if not self.check:
            return []
        x64 = x.detach().double().cpu().requires_grad_()
        ref = {"softmax": torch.softmax, "log_softmax": torch.log_softmax, "logsumexp": torch.logsumexp}[op](x64, -1)
        (gref,) = torch.autograd.grad(ref, x64, g.double().cpu())
        return [("forward", y, ref, dtype), ("backward", gx, gref, dtype)]

    def _special(self, op: str, alg: str, dtype: torch.dtype) -> None:
        inf, nan = float("inf"), float("nan")
        rows = [[-inf] * 40, [inf] + [0.0] * 39, [nan] + [1.0] * 39, [1e30 if dtype == torch.float64 else 6e4] * 40]
        x = torch.tensor(rows, dtype=torch.float64).to(dtype).to(self.device).requires_grad_()
        y = getattr(fastloss, op)(x, -1, algorithm=alg)
        y.backward(torch.ones_like(y))

    def _transposed(self, dtype: torch.dtype) -> list:
        x = self.rand((300, 7), dtype).t()  # [7, 300], non-contiguous; softmax over dim 0 -> rows of 7
        xl = x.detach().requires_grad_()
        y = fastloss.softmax(xl, 0)
        g = self.rand(tuple(y.shape), dtype, scale=1.0)
        (gx,) = torch.autograd.grad(y, xl, g)
        x64 = x.detach().double().cpu().requires_grad_()
        ref = torch.softmax(x64, 0)
        (gref,) = torch.autograd.grad(ref, x64, g.double().cpu())
        return [("forward", y, ref, dtype), ("backward", gx, gref, dtype)]

    # ------------------------------------------------------------ softmax_topk

    def topk(self) -> None:
        for dtype in DTYPES:
            for rows, v, ks in TOPK[self.size]:
                for k in ks:
                    for alg in ALGS:
                        self.run("softmax_topk", f"({rows}, {v}) k={k} {dtype} {alg}",
                                 lambda: self._topk(rows, v, k, alg, dtype))

    def _topk(self, rows: int, v: int, k: int, alg: str, dtype: torch.dtype) -> list:
        x = self.rand((rows, v), dtype).requires_grad_()
        values, indices = fastloss.softmax_topk(x, k, algorithm=alg)
        values.backward(self.rand(tuple(values.shape), dtype, scale=1.0))
        if not self.check:
            return []
        ref = torch.topk(torch.softmax(x.detach().double().cpu(), -1), k, -1).values
        picked = torch.softmax(x.detach().double().cpu(), -1).gather(-1, indices.cpu())
        out = [("values", values, ref, dtype), ("values at the returned indices", values, picked, dtype)]
        grad = x.grad
        out.append(("gradient is finite", torch.isfinite(grad).all().double().reshape(1),
                    torch.ones(1, dtype=torch.float64), torch.float64))
        return out

    # ------------------------------------------------------------ cross_entropy

    def cross_entropy(self) -> None:
        shapes = [(lab, (n, c), False) for lab, n, c in CE_SHAPES[self.size]]
        shapes.append(("misaligned", MISALIGNED[self.size], True))
        shapes.append(("long", CE_LONG[self.size], False))
        modes: list[tuple[str, dict]] = [
            ("index", {}),
            ("weights", {"weight": True}),
            ("smoothing", {"label_smoothing": 0.1, "weight": True}),
            ("z_loss+lse", {"z_loss": 1e-3, "return_lse": True, "return_z_loss": True}),
            ("softcap", {"softcap": 5.0}),
            ("softcap+z+smoothing", {"softcap": 5.0, "z_loss": 1e-3, "label_smoothing": 0.1}),
            ("sum", {"reduction": "sum"}),
            ("none", {"reduction": "none"}),
            ("inplace", {"inplace_backward": True}),
            ("inplace+softcap+z", {"inplace_backward": True, "softcap": 5.0, "z_loss": 1e-3, "weight": True}),
            ("inplace-sum", {"inplace_backward": True, "reduction": "sum"}),
            ("no-grad", {"no_grad": True}),
            ("prob", {"prob": True}),
            ("prob+smoothing+weights", {"prob": True, "label_smoothing": 0.1, "weight": True}),
            ("prob+softcap+z", {"prob": True, "softcap": 5.0, "z_loss": 1e-3, "return_lse": True}),
            ("focal", {"loss": "focal", "gamma": 2.0, "weight": True}),
            ("poly1", {"loss": "poly1", "epsilon": 1.0}),
            ("squentropy", {"loss": "squentropy"}),
            ("focal-inplace", {"loss": "focal", "gamma": 2.0, "inplace_backward": True}),
            ("poly1-inplace", {"loss": "poly1", "epsilon": 1.0, "inplace_backward": True, "reduction": "sum"}),
            ("squentropy-inplace", {"loss": "squentropy", "inplace_backward": True, "weight": True}),
            ("squentropy+softcap+z", {"loss": "squentropy", "softcap": 5.0, "z_loss": 1e-3}),
        ]
        for dtype in DTYPES:
            for lab, (n, c), mis in shapes:
                for mode, kw in modes:
                    if lab == "long" and mode not in CE_LONG_MODES:
                        continue
                    for alg in ALGS:
                        self.run("cross_entropy", f"{mode} {lab} ({n}, {c}) {dtype} {alg}",
                                 lambda: self._ce(n, c, dtype, alg, mis, dict(kw)))
            self.run("cross_entropy", f"3-d input {dtype}", lambda: self._ce_3d(dtype))
            self.run("cross_entropy", f"all ignored {dtype}", lambda: self._ce_all_ignored(dtype))
            for lab, (n, c), mis in shapes:
                if lab == "long":
                    continue
                for mode, kw in CE_SHARD_MODES:
                    for alg in ALGS:
                        self.run("cross_entropy_shard", f"{mode} {lab} ({n}, {c}) {dtype} {alg}",
                                 lambda: self._ce_shard(n, c, dtype, alg, mis, dict(kw)))

    def _weight(self, c: int, dtype: torch.dtype) -> torch.Tensor:
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        return (torch.rand(c, generator=self.gen, dtype=torch.float64) + 0.5).to(acc).to(self.device)

    def _ce(self, n: int, c: int, dtype: torch.dtype, alg: str, misaligned: bool, kw: dict) -> list:
        prob = kw.pop("prob", False)
        no_grad = kw.pop("no_grad", False)
        weight = self._weight(c, dtype) if kw.pop("weight", False) else None
        x = self.misaligned(n, c, dtype) if misaligned else self.rand((n, c), dtype)
        if prob:
            t = torch.softmax(torch.randn((n, c), generator=self.gen, dtype=torch.float64) * 2, -1)
            t = t.to(dtype).to(self.device)
            ignore = -100
        else:
            t = self.targets(n, c)
            ignore = IGNORE
        reduction = kw.get("reduction", "mean")
        # A private copy (the in-place variants overwrite it), misaligned like x when x is.
        xl = (self.misaligned(n, c, dtype) if misaligned else torch.empty_like(x)).detach()
        xl.copy_(x)
        xl.requires_grad_(not no_grad)
        if no_grad:
            with torch.no_grad():
                out = fastloss.cross_entropy(xl, t, weight=weight, ignore_index=ignore, algorithm=alg, **kw)
        else:
            out = fastloss.cross_entropy(xl, t, weight=weight, ignore_index=ignore, algorithm=alg, **kw)
        loss = out.loss if isinstance(out, tuple) else out
        g = self.rand((n,), torch.float32, scale=1.0).to(loss.dtype) if reduction == "none" else None
        # A factor != 1 on the loss makes the in-place backward's scale_rows kernel do work.
        total = (loss * g).sum() if g is not None else loss * 1.5
        lse_grad = None
        if isinstance(out, tuple) and out.lse is not None and not kw.get("inplace_backward"):
            lse_grad = self.rand((n,), torch.float64, scale=0.1).to(out.lse.dtype)
            total = total + (out.lse * lse_grad).sum()
        gx = None
        if not no_grad:
            total.backward()
            gx = xl.grad
        if not self.check:
            return []

        # float64 reference on the CPU
        x64 = x.detach().double().cpu().requires_grad_()
        t64 = t.double().cpu() if prob else t.cpu()
        w64 = weight.double().cpu() if weight is not None else None
        cap = kw.get("softcap")
        xc = cap * torch.tanh(x64 / cap) if cap else x64
        kind = kw.get("loss", "ce")
        if kind == "ce":
            ref = F.cross_entropy(xc, t64, weight=w64, ignore_index=ignore, reduction=reduction,
                                  label_smoothing=kw.get("label_smoothing", 0.0))
        else:
            extra = {k: kw[k] for k in ("gamma", "epsilon") if k in kw}
            ref = comp_sum_loss_reference(xc, t64, kind, weight=w64, reduction=reduction, ignore_index=ignore,
                                          **extra)
        lse = torch.logsumexp(xc, -1)
        valid = torch.ones(n, dtype=torch.bool) if prob else t64 != ignore
        z = kw.get("z_loss", 0.0)
        if z:
            zr = z * lse * lse * valid
            if reduction == "none":
                ref = ref + zr
            elif reduction == "sum":
                ref = ref + zr.sum()
            elif prob:
                ref = ref + zr.sum() / n
            else:
                den = (w64[t64.masked_fill(~valid, 0)] * valid).sum() if w64 is not None else valid.sum()
                ref = ref + zr.sum() / den
        checks = [("loss", loss, ref, dtype)]
        if isinstance(out, tuple) and out.lse is not None:
            checks.append(("lse", out.lse, torch.where(valid, lse, torch.zeros_like(lse)).detach(), dtype))
        if gx is not None:
            gref = g.double().cpu() if g is not None else torch.tensor(1.5, dtype=torch.float64)
            rtotal = (ref * gref).sum()
            if lse_grad is not None:
                rtotal = rtotal + (torch.where(valid, lse, torch.zeros_like(lse)) * lse_grad.double().cpu()).sum()
            (gx_ref,) = torch.autograd.grad(rtotal, x64)
            checks.append(("gradient", gx, gx_ref, dtype))
        return checks

    def _ce_shard(self, n: int, c: int, dtype: torch.dtype, alg: str, misaligned: bool, kw: dict) -> list:
        """Two uneven shards of [n, c] logits through the three shard ops, combined as the distributed layer does."""
        ops = torch.ops.fastloss
        weight = self._weight(c, dtype) if kw.pop("weight", False) else None
        grad_lse = self.rand((n,), torch.float64, scale=0.1) if kw.pop("grad_lse", False) else None
        loss, param = kw.get("loss", "ce"), kw.get("loss_param", 0.0)
        ls, z, cap = kw.get("label_smoothing", 0.0), kw.get("z_loss", 0.0), kw.get("softcap")
        x = self.rand((n, c), dtype)
        t = self.targets(n, c)
        shards = []
        for a, b in ((0, c // 3), (c // 3, c)):
            xs = (self.misaligned(n, b - a, dtype) if misaligned
                  else torch.empty((n, b - a), dtype=dtype, device=self.device))
            xs.copy_(x[:, a:b])
            shards.append((a, xs, weight[a:b] if weight is not None else None))
        stats = [ops.cross_entropy_shard_fwd(xs, t, ws, a, IGNORE, ls, cap, alg, loss) for a, xs, ws in shards]
        rows = ce_shard_combine_ref(stats, t, weight, IGNORE, ls, loss)
        wsum = weight.double().sum() if weight is not None else None
        out = ops.cross_entropy_shard_loss(rows, t, wsum, c, IGNORE, ls, z, loss, param)
        g = self.rand((n,), torch.float64, scale=1.0)
        grad = torch.cat([ops.cross_entropy_shard_bwd(g, grad_lse, xs, t, ws, rows, wsum, a, c, IGNORE, ls, z, cap,
                                                      loss, param) for a, xs, ws in shards], 1)
        if not self.check:
            return []
        x64 = x.detach().double().cpu().requires_grad_()
        t64 = t.cpu()
        ref = cross_entropy_rows_reference(x64, t64, weight=weight.double().cpu() if weight is not None else None,
                                           ignore_index=IGNORE, label_smoothing=ls, z_loss=z, softcap=cap, loss=loss,
                                           loss_param=param)
        total = (ref * g.cpu()).sum()
        if grad_lse is not None:
            xc = cap * torch.tanh(x64 / cap) if cap else x64
            total = total + (torch.logsumexp(xc, -1) * (t64 != IGNORE) * grad_lse.cpu()).sum()
        (gref,) = torch.autograd.grad(total, x64)
        return [("loss", out, ref, dtype), ("gradient", grad, gref, dtype)]

    def _ce_3d(self, dtype: torch.dtype) -> list:
        x = self.rand((2, 37, 3), dtype).requires_grad_()
        t = torch.randint(0, 37, (2, 3), generator=self.gen)
        t[0, 1] = IGNORE
        t = t.to(self.device)
        loss = fastloss.cross_entropy(x, t)
        loss.backward()
        x64 = x.detach().double().cpu().requires_grad_()
        ref = F.cross_entropy(x64, t.cpu())
        ref.backward()
        return [("loss", loss, ref, dtype), ("gradient", x.grad, x64.grad, dtype)]

    def _ce_all_ignored(self, dtype: torch.dtype) -> None:
        x = self.rand((4, 37), dtype).requires_grad_()
        t = torch.full((4,), IGNORE, device=self.device)
        fastloss.cross_entropy(x, t, reduction="mean")  # nan, as torch
        fastloss.cross_entropy(x, t, reduction="sum").backward()

    # ------------------------------------------------------------ linear_cross_entropy

    def linear_cross_entropy(self) -> None:
        n, d, v, chunk = LCE[self.size]
        modes: list[tuple[str, dict]] = [
            ("bias", {"bias": True}),
            ("weights+smoothing", {"weight": True, "label_smoothing": 0.1}),
            ("softcap+z+lse", {"softcap": 5.0, "z_loss": 1e-3, "return_lse": True, "return_z_loss": True}),
            ("focal", {"loss": "focal", "gamma": 2.0}),
            ("squentropy", {"loss": "squentropy"}),
            ("none", {"reduction": "none"}),
            ("filter_eps", {"filter_eps": "auto"}),
            ("prob", {"prob": True}),
        ]
        for dtype in DTYPES:
            for mode, kw in modes:
                self.run("linear_cross_entropy", f"{mode} N={n} D={d} V={v} chunk={chunk} {dtype}",
                         lambda: self._lce(n, d, v, chunk, dtype, dict(kw)))

    def _lce(self, n: int, d: int, v: int, chunk: int, dtype: torch.dtype, kw: dict) -> list:
        h = self.rand((n, d), dtype, scale=1.0).requires_grad_()
        w = self.rand((v, d), dtype, scale=3.0 / d**0.5).requires_grad_()
        b = self.rand((v,), dtype, scale=0.5).requires_grad_() if kw.pop("bias", False) else None
        weight = self._weight(v, dtype) if kw.pop("weight", False) else None
        prob = kw.pop("prob", False)
        if prob:
            t = torch.softmax(torch.randn((n, v), generator=self.gen, dtype=torch.float64), -1).to(dtype)
            t = t.to(self.device)
        else:
            t = self.targets(n, v)
        out = fastloss.linear_cross_entropy(h, w, t, linear_bias=b, weight=weight, chunk_size=chunk, **kw)
        loss = out.loss if isinstance(out, tuple) else out
        if kw.get("reduction") == "none":
            loss = (loss * self.rand((n,), torch.float32, scale=1.0).to(loss.dtype)).sum()
        loss.backward()
        grads = [h.grad, w.grad] + ([b.grad] if b is not None else [])
        finite = all(bool(torch.isfinite(g).all()) for g in grads)
        checks = [("gradients are finite", torch.tensor([float(finite)]), torch.ones(1, dtype=torch.float64),
                   torch.float64)]
        if not self.check or prob or kw:
            return checks if self.check else []
        # plain (with bias): float64 reference of the unchunked computation
        h64, w64 = h.detach().double().cpu().requires_grad_(), w.detach().double().cpu().requires_grad_()
        b64 = b.detach().double().cpu().requires_grad_() if b is not None else None
        logits = h64 @ w64.t() + (b64 if b64 is not None else 0)
        ref = F.cross_entropy(logits, t.cpu(), ignore_index=IGNORE)
        ref.backward()
        checks += [("loss", loss, ref, dtype), ("d input", h.grad, h64.grad, dtype),
                   ("d weight", w.grad, w64.grad, dtype)]
        if b is not None:
            checks.append(("d bias", b.grad, b64.grad, dtype))
        return checks


    # ------------------------------------------------------------ distillation / token log-probabilities

    def distillation(self) -> None:
        modes = [("forward_kl", {}), ("reverse_kl", {}), ("jsd", {"beta": 0.3}),
                 ("forward_kl T=2 hard", {"temperature": 2.0, "hard_weight": 0.5}),
                 ("jsd T=0.5 hard", {"beta": 0.7, "temperature": 0.5, "hard_weight": 0.3}),
                 ("forward_kl none", {"reduction": "none"}), ("reverse_kl none", {"reduction": "none"}),
                 ("jsd none", {"beta": 0.3, "reduction": "none"})]
        # (a reduced loss computes its gradient in the forward; "none" runs the separate forward and backward)
        for dtype in DTYPES:
            for rows, v in DISTILL[self.size]:
                for mode, kw in modes:
                    self.run("distillation", f"{mode} ({rows}, {v}) {dtype}",
                             lambda: self._distill(rows, v, dtype, mode.split()[0], dict(kw)))
                for ent in (False, True):
                    self.run("token_logprobs", f"entropy={ent} ({rows}, {v}) {dtype}",
                             lambda: self._logprobs(rows, v, dtype, ent))
                self.run("token_logprobs", f"stats ({rows}, {v}) {dtype}", lambda: self._logprob_stats(rows, v, dtype))
                self.run("token_logprobs", f"backward on vocabulary slices ({rows}, {v}) {dtype}",
                         lambda: self._logprob_slices(rows, v, dtype))
                self.run("distillation", f"student entropy ({rows}, {v}) {dtype}",
                         lambda: self._distill_entropy(rows, v, dtype))
            self.run("linear_distillation", f"jsd {dtype}", lambda: self._linear_distill(dtype))
            self.run("linear_token_logprobs", f"{dtype}", lambda: self._linear_logprobs(dtype))

    def _distill(self, rows: int, v: int, dtype: torch.dtype, divergence: str, kw: dict) -> list:
        s = self.rand((rows, v), dtype).requires_grad_()
        t = self.rand((rows, v), dtype)
        target = self.targets(rows, v)
        loss = fastloss.distillation_loss(s, t, divergence=divergence, target=target, **kw)
        w = self.rand(loss.shape, torch.float64, scale=1.0).to(loss.dtype)
        (g,) = torch.autograd.grad((loss * w).sum(), s)
        s64 = s.detach().double().cpu().requires_grad_()
        ref = distillation_loss_reference(s64, t.double().cpu(), divergence=divergence, target=target.cpu(), **kw)
        (g64,) = torch.autograd.grad((ref * w.double().cpu()).sum(), s64)
        # The in-place variant (what the linear version runs on a GPU): d loss_r / d student * scale_r over a copy.
        kw.pop("reduction", None)
        scale = self.rand((rows,), torch.float64, scale=1.0)
        buf = s.detach().clone()
        torch.ops.fastloss.distill_fwd_inplace_grad(buf, t, target, scale.to(self.device), divergence,
                                                    kw.get("beta", 0.5), kw.get("temperature", 1.0), IGNORE,
                                                    kw.get("hard_weight", 0.0))
        s64 = s.detach().double().cpu().requires_grad_()
        rows64 = distillation_loss_reference(s64, t.double().cpu(), divergence=divergence, target=target.cpu(),
                                             reduction="none", **kw)
        (gi64,) = torch.autograd.grad((rows64 * scale.cpu()).sum(), s64)
        return [("loss", loss, ref, dtype), ("d student", g, g64, dtype), ("in-place d student", buf, gi64, dtype)]

    def _logprobs(self, rows: int, v: int, dtype: torch.dtype, entropy: bool) -> list:
        x = self.rand((rows, v), dtype).requires_grad_()
        tok = torch.randint(0, v, (rows,), generator=self.gen).to(self.device)
        out = fastloss.token_logprobs(x, tok, temperature=0.8, return_entropy=entropy)
        ref = token_logprobs_reference(x.detach().double().cpu().requires_grad_(), tok.cpu(), temperature=0.8,
                                       return_entropy=entropy)
        outs, refs = (list(out), list(ref)) if entropy else ([out], [ref])
        checks = [(f"output {i}", o, r, dtype) for i, (o, r) in enumerate(zip(outs, refs))]
        if dtype != torch.float64:  # the gradient through a float32 output of reduced-precision logits
            (g,) = torch.autograd.grad(sum(o.sum() for o in outs), x)
            checks.append(("gradient is finite", torch.tensor([float(bool(torch.isfinite(g).all()))]),
                           torch.ones(1, dtype=torch.float64), torch.float64))
        return checks

    def _logprob_stats(self, rows: int, v: int, dtype: torch.dtype) -> list:
        """return_stats=True (logprob_stats_forward_kernel): the statistics and the argmax from the same pass. Its
        own generator: the other problems' inputs stay those drawn before these checks existed."""
        g = torch.Generator().manual_seed(21 + rows + v)
        x = (torch.randn((rows, v), generator=g, dtype=torch.float64) * 3.0).to(dtype).to(self.device)
        tok = torch.randint(0, v, (rows,), generator=g).to(self.device)
        out = fastloss.token_logprobs(x, tok, temperature=0.8, return_entropy=True, return_stats=True)
        ref = token_logprobs_reference(x.double().cpu(), tok.cpu(), temperature=0.8, return_entropy=True,
                                       return_stats=True)
        same = float(bool(torch.equal(out.argmax.cpu(), ref[4])))
        return [("logprobs", out.logprobs, ref[0], dtype), ("entropy", out.entropy, ref[1], dtype),
                ("log_sum_sq_probs", out.log_sum_sq_probs, ref[2], dtype),
                ("mean_logits", out.mean_logits, ref[3], dtype),
                ("argmax is torch.argmax", torch.tensor([same]), torch.ones(1, dtype=torch.float64), torch.float64)]

    def _logprob_slices(self, rows: int, v: int, dtype: torch.dtype) -> list:
        """token_logprobs_bwd with vocab_start (the vocabulary-parallel backward, logprob_slice_row): the gradient of
        the log-probs and the entropy assembled from two uneven slices of the logits, each given the whole
        vocabulary's lse and entropy; a token outside a slice adds nothing there. Its own generator."""
        g = torch.Generator().manual_seed(31 + rows + v)
        x = (torch.randn((rows, v), generator=g, dtype=torch.float64) * 3.0).to(dtype).to(self.device)
        tok = torch.randint(0, v, (rows,), generator=g).to(self.device)
        a = torch.randn(rows, generator=g, dtype=torch.float64)
        b = torch.randn(rows, generator=g, dtype=torch.float64)
        _, ent, lse, _, _ = torch.ops.fastloss.token_logprobs_fwd(x, tok, 0.8, True)
        cut = v // 3 + 1
        parts = [torch.ops.fastloss.token_logprobs_bwd(a.to(self.device), b.to(self.device), x[:, s:e].contiguous(),
                                                       tok, lse, ent, 0.8, s)
                 for s, e in ((0, min(cut, v)), (min(cut, v), v)) if e > s]
        x64 = x.double().cpu().requires_grad_()
        lp, h = token_logprobs_reference(x64, tok.cpu(), temperature=0.8, return_entropy=True)
        (g64,) = torch.autograd.grad((lp * a).sum() + (h * b).sum(), x64)
        return [("d logits from slices", torch.cat(parts, 1), g64, dtype)]

    def _distill_entropy(self, rows: int, v: int, dtype: torch.dtype) -> list:
        """student_entropy=True (distill_entropy_kernel, every divergence, the forward and the forward with the
        gradient): the student's entropy from the same pass, the loss and gradient as without it. Its own generator:
        the other problems' inputs stay those drawn before these checks existed."""
        g = torch.Generator().manual_seed(23 + rows + v)
        s = (torch.randn((rows, v), generator=g, dtype=torch.float64) * 3.0).to(dtype).to(self.device)
        t = (torch.randn((rows, v), generator=g, dtype=torch.float64) * 3.0).to(dtype).to(self.device)
        target = torch.randint(0, v, (rows,), generator=g)
        target[1::3] = IGNORE
        target = target.to(self.device)
        one = torch.ones(1, dtype=torch.float64, device=self.device)
        checks = []
        bound = 4 * torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps
        for divergence, beta in (("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.3)):
            opts = (divergence, beta, 1.5, IGNORE, 0.2)
            ref = distillation_loss_reference(s.double().cpu(), t.double().cpu(), divergence=divergence, beta=beta,
                                              temperature=1.5, target=target.cpu(), hard_weight=0.2,
                                              reduction="none", return_student_entropy=True)
            loss, st = torch.ops.fastloss.distill_fwd(s, t, target, *opts, True)
            loss0, st0 = torch.ops.fastloss.distill_fwd(s, t, target, *opts)
            gl, gst, grad = torch.ops.fastloss.distill_fwd_grad(s, t, target, one, *opts, True)
            _, _, grad0 = torch.ops.fastloss.distill_fwd_grad(s, t, target, one, *opts)
            # the loss, the backward's statistics and the gradient as without the entropy (relative difference)
            same = max(float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300))
                       for a, b in ((loss, loss0), (st[:, :4], st0[:, :4]), (gl, loss0), (grad, grad0)))
            checks += [(f"{divergence} entropy", st[:, 4], ref[1], dtype),
                       (f"{divergence} entropy (with gradient)", gst[:, 4], ref[1], dtype),
                       (f"{divergence} loss", loss, ref[0], dtype),
                       (f"{divergence} unchanged by the entropy (4 ulp)", torch.tensor([float(same <= bound)]),
                        torch.ones(1, dtype=torch.float64), torch.float64)]
        return checks

    def _linear_distill(self, dtype: torch.dtype) -> list:
        n, d, v, chunk = LCE[self.size]
        hs = self.rand((n, d), dtype, scale=1.0).requires_grad_()
        ws = self.rand((v, d), dtype, scale=3.0 / d**0.5).requires_grad_()
        ht, wt = self.rand((n, d), dtype, scale=1.0), self.rand((v, d), dtype, scale=3.0 / d**0.5)
        target = self.targets(n, v)
        loss = fastloss.linear_distillation_loss(hs, ws, ht, wt, divergence="jsd", beta=0.3, target=target,
                                                 hard_weight=0.2, chunk_size=chunk)
        loss.backward()
        hs64, ws64 = hs.detach().double().cpu().requires_grad_(), ws.detach().double().cpu().requires_grad_()
        ref = distillation_loss_reference(hs64 @ ws64.t(), ht.double().cpu() @ wt.double().cpu().t(), divergence="jsd",
                                          beta=0.3, target=target.cpu(), hard_weight=0.2)
        ref.backward()
        return [("loss", loss, ref, dtype), ("d hidden", hs.grad, hs64.grad, dtype),
                ("d weight", ws.grad, ws64.grad, dtype)]

    def _linear_logprobs(self, dtype: torch.dtype) -> list:
        n, d, v, chunk = LCE[self.size]
        h = self.rand((n, d), dtype, scale=1.0).requires_grad_()
        w = self.rand((v, d), dtype, scale=3.0 / d**0.5).requires_grad_()
        tok = torch.randint(0, v, (n,), generator=self.gen).to(self.device)
        lp, ent = fastloss.linear_token_logprobs(h, w, tok, return_entropy=True, chunk_size=chunk)
        (lp.sum() + 0.5 * ent.sum()).backward()
        h64, w64 = h.detach().double().cpu().requires_grad_(), w.detach().double().cpu().requires_grad_()
        rlp, rent = token_logprobs_reference(h64 @ w64.t(), tok.cpu(), return_entropy=True)
        (rlp.sum() + 0.5 * rent.sum()).backward()
        return [("logprobs", lp, rlp, dtype), ("entropy", ent, rent, dtype), ("d hidden", h.grad, h64.grad, dtype),
                ("d weight", w.grad, w64.grad, dtype)]

    # ------------------------------------------------------------ spherical losses

    def spherical(self) -> None:
        for dtype in DTYPES:
            for loss, kw in SPHERICAL_LOSSES:
                for rows, v in SPHERICAL[self.size]:
                    if loss == "mse" and dtype == torch.float16 and v > 5000:
                        continue  # a row's squared error (~10 V here) overflows float16, the loss's dtype
                    self.run("spherical", f"{loss} ({rows}, {v}) {dtype}",
                             lambda: self._spherical(rows, v, dtype, loss, kw, misaligned=False))
                rows, v = MISALIGNED[self.size]
                self.run("spherical", f"{loss} misaligned ({rows}, {v}) {dtype}",
                         lambda: self._spherical(rows, v, dtype, loss, kw, misaligned=True))
                self.run("linear_spherical", f"{loss} {dtype}", lambda: self._linear_spherical(dtype, loss, kw))

    def _spherical(self, rows: int, v: int, dtype: torch.dtype, loss: str, kw: dict, misaligned: bool) -> list:
        x = (self.misaligned(rows, v, dtype) if misaligned else self.rand((rows, v), dtype)).requires_grad_()
        target = self.targets(rows, v)
        out = fastloss.spherical_loss(x, target, loss=loss, ignore_index=IGNORE, reduction="none", **kw)
        w = self.rand((rows,), torch.float64, scale=1.0)
        (g,) = torch.autograd.grad((out.double() * w).sum(), x)
        x64 = x.detach().double().cpu().requires_grad_()
        ref = spherical_loss_reference(x64, target.cpu(), loss, ignore_index=IGNORE, **kw)
        (g64,) = torch.autograd.grad((ref * w.cpu()).sum(), x64)
        return [("loss", out, ref, dtype), ("d input", g, g64, dtype)]

    def _linear_spherical(self, dtype: torch.dtype, loss: str, kw: dict) -> list:
        n, d, v, _ = LCE[self.size]
        h = self.rand((n, d), dtype, scale=1.0).requires_grad_()
        w = self.rand((v, d), dtype, scale=3.0 / d**0.5).requires_grad_()
        b = self.rand((v,), dtype, scale=1.0).requires_grad_()
        target = self.targets(n, v)
        out = fastloss.linear_spherical_loss(h, w, target, b, loss=loss, ignore_index=IGNORE, **kw)
        out.backward()
        h64, w64, b64 = (t.detach().double().cpu().requires_grad_() for t in (h, w, b))
        rows = spherical_loss_reference(h64 @ w64.t() + b64, target.cpu(), loss, ignore_index=IGNORE, **kw)
        ref = rows.sum() / (target != IGNORE).sum()
        ref.backward()
        return [("loss", out, ref, dtype), ("d hidden", h.grad, h64.grad, dtype), ("d weight", w.grad, w64.grad, dtype),
                ("d bias", b.grad, b64.grad, dtype)]


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="The list of calls, and the CUDA kernel shape each one selects, is at the "
                                       "top of bench/gpu_workload.py.")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--size", choices=["small", "tiny"], default="small",
                   help="small (default): every kernel shape, the sanitizer's workload; tiny: the same calls on "
                        "shorter long rows (no CUDA split path), for a quick run")
    p.add_argument("--parts", default=",".join(PARTS),
                   help=f"comma list of the parts to run (default: all of {','.join(PARTS)})")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: 1 with --device cpu, where the tensors are tiny and thread "
                        "start-up costs more than it gains; torch's default otherwise)")
    p.add_argument("--no-check", action="store_true", help="do not compare with float64 references")
    p.add_argument("--verbose", action="store_true", help="one line per value check")
    args = p.parse_args(argv)
    parts = [x.strip() for x in args.parts.split(",") if x.strip()]
    if not parts or any(x not in PARTS for x in parts):
        p.error(f"--parts: expected a comma list of {list(PARTS)}, got {args.parts!r}")
    threads = args.threads if args.threads is not None else (1 if args.device == "cpu" else None)
    if threads is not None:
        torch.set_num_threads(max(1, threads))
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: CUDA is not available here (use --device cpu)")
    if args.device == "cuda" and not fastloss.cuda_built:
        print(f"gpu_workload: fastloss at {fastloss.__file__} was built without CUDA kernels", file=sys.stderr)
        return 1

    w = Workload(args.device, args.size, not args.no_check, args.verbose)
    t0 = time.monotonic()
    print(f"gpu_workload: device {args.device}"
          + (f" ({torch.cuda.get_device_name()})" if args.device == "cuda" else "")
          + f", size {args.size}, torch {torch.__version__}, fastloss {fastloss.__version__} from {fastloss.__file__}",
          flush=True)
    stopped = ""
    try:
        for part in (getattr(w, name) for name in parts):
            s = time.monotonic()
            before = sum(w.calls.values())
            part()
            print(f"  {part.__name__:22s} {sum(w.calls.values()) - before:5d} calls  {time.monotonic() - s:6.1f} s",
                  flush=True)
    except CudaFailure:
        stopped = " (stopped at the first CUDA error)"
    for cat in w.calls:
        print(f"  {cat:22s} {w.calls[cat]:5d} calls, {w.checked[cat]:5d} values checked against float64")
    n_calls = sum(w.calls.values())
    print(f"gpu_workload: {n_calls} calls in {time.monotonic() - t0:.1f} s, {len(w.failures)} failure(s){stopped}")
    for f in w.failures[:200]:
        print("  FAIL", f)
    if len(w.failures) > 200:
        print(f"  ... and {len(w.failures) - 200} more")
    missing = _emu_report() if fastloss.cuda_emulated and args.device == "cpu" else []
    return 1 if w.failures or (missing and args.size == "small" and parts == list(PARTS)) else 0


def _emu_report() -> list[str]:
    """In an emulated CUDA build (make test-emu): the launch report, and every compiled kernel instantiation this
    run never launched (the whole small workload must launch them all)."""
    from fastloss import _cuda_emu

    line, never = _cuda_emu.report(instantiations=True)
    for k in never:
        print(f"  cuda-emu: never launched: {k}")
    print(line)
    return never


if __name__ == "__main__":
    sys.exit(main())

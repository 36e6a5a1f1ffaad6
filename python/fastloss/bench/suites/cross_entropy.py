"""cross_entropy and linear_cross_entropy: fastloss against torch baselines and peer libraries.

Both suites are opt-in (``--suite cross_entropy,linear_cross_entropy`` or ``--suite all``). Peers (Liger Kernel,
Cut Cross-Entropy, torch's ``F.linear_cross_entropy``) are detected and reported as skipped when missing. The
``fastloss`` entries are skipped when the installed fastloss lacks the op or its cross-entropy kernel for the
device (a CPU-only build, or before the CUDA kernel lands).

Losses are mean-reduced over the rows (the training default) with ``ignore_index=-100``; when the problem carries
``softcap`` (the gemma2 preset: 30), logits are capped as ``softcap * tanh(logits / softcap)`` first.

Bytes-moved model (an ideal kernel; elements of the input dtype; targets are 8 bytes each):

* cross_entropy: fwd reads the logits once (NV); bwd reads them again and writes their gradient (2 NV).
* linear_cross_entropy: fwd reads h [N, D] and W [V, D]; bwd reads both again and writes dh and dW. The op is
  compute bound, so its GB/s column mostly says how far from the memory roofline it is, not how good it is.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

import fastloss

from ..accuracy import mean_loss_error
from ..inputs import INPUT_SCALE
from ..problems import Problem
from ..registry import Impl, Inputs, Suite, fastloss_kernel_check, register_suite

IGNORE_INDEX = -100
LIGER = "liger_kernel.transformers"
CCE = "cut_cross_entropy"


def _softcap(problem: Problem) -> Optional[float]:
    cap = problem.extra.get("softcap")
    return float(cap) if cap else None


def _capped(logits: torch.Tensor, cap: Optional[float]) -> torch.Tensor:
    return cap * torch.tanh(logits / cap) if cap else logits


def _targets(problem: Problem, gen: torch.Generator) -> torch.Tensor:
    return torch.randint(0, problem.v, (problem.n,), generator=gen, device=problem.device, dtype=torch.int64)


def _count_valid(inputs: Inputs) -> int:
    return int((inputs[-1] != IGNORE_INDEX).sum())


def _first(out: Any) -> torch.Tensor:
    """Peers return a loss or a (loss, extras...) tuple depending on their version."""
    return out[0] if isinstance(out, (tuple, list)) else out


def _fastloss_check(attr: str) -> Callable[[Problem], Optional[str]]:
    """fastloss has the op, and the cross-entropy kernels it is built on exist for the problem's device."""
    kernels = fastloss_kernel_check("cross_entropy_fwd")

    def check(problem: Problem) -> Optional[str]:
        if not hasattr(fastloss, attr):
            return f"fastloss.{attr} not implemented yet"
        return kernels(problem)

    return check


# ---------------------------------------------------------------- cross_entropy (logits given)


def _ce_inputs(problem: Problem, gen: torch.Generator) -> Inputs:
    x = torch.randn((problem.n, problem.v), generator=gen, dtype=torch.float32, device=problem.device)
    return (x.mul_(INPUT_SCALE).to(problem.dtype), _targets(problem, gen))


def _ce_bytes(problem: Problem, mode: str) -> int:
    nv = problem.numel * problem.elem_size
    return {"fwd": nv, "fwdbwd": 3 * nv}[mode] + 8 * problem.n


def _ce_ref_sum(logits: torch.Tensor, targets: torch.Tensor, cap: Optional[float] = None) -> torch.Tensor:
    return F.cross_entropy(_capped(logits, cap), targets, reduction="sum", ignore_index=IGNORE_INDEX)


def _torch_ce(problem: Problem) -> Callable[..., torch.Tensor]:
    cap = _softcap(problem)

    def run(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(_capped(logits, cap), targets, ignore_index=IGNORE_INDEX)

    return run


def _liger_ce(problem: Problem) -> Callable[..., torch.Tensor]:
    from liger_kernel.transformers import LigerCrossEntropyLoss

    cap = _softcap(problem)
    loss = LigerCrossEntropyLoss(ignore_index=IGNORE_INDEX, **({"softcap": cap} if cap else {}))
    return lambda logits, targets: _first(loss(logits, targets))


def _fastloss_ce_factory(inplace: bool) -> Callable[[Problem], Callable[..., torch.Tensor]]:
    def make(problem: Problem) -> Callable[..., torch.Tensor]:
        kw: dict[str, Any] = {"softcap": _softcap(problem)} if _softcap(problem) else {}
        if inplace:
            kw["inplace_backward"] = True
        return lambda logits, targets: fastloss.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, **kw)

    return make


def _ce_row_sum(problem: Problem, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return _ce_ref_sum(logits, targets, _softcap(problem))


CROSS_ENTROPY = register_suite(Suite(
    name="cross_entropy",
    description="mean cross-entropy of [N, V] logits against [N] targets",
    make_inputs=_ce_inputs,
    bytes_moved=_ce_bytes,
    output_shape=lambda p: (),
    rel_error=mean_loss_error(_ce_row_sum, row_args=(0, 1), grad_inputs=(0,), count=_count_valid),
    grad_inputs=(0,),
    default=False,
    inputs_may_be_mutated=True,
))
_FL_CE_CHECK = _fastloss_check("cross_entropy")
CROSS_ENTROPY.add(Impl("fastloss", _fastloss_ce_factory(False), "fastloss.cross_entropy", check=_FL_CE_CHECK))
CROSS_ENTROPY.add(Impl("fastloss-inplace", _fastloss_ce_factory(True),
                       "fastloss.cross_entropy(inplace_backward=True): the gradient overwrites the logits",
                       check=_FL_CE_CHECK))
CROSS_ENTROPY.add(Impl("torch-eager", _torch_ce, "F.cross_entropy, eager", baseline=True))
CROSS_ENTROPY.add(Impl("torch-compile", _torch_ce, "torch.compile(F.cross_entropy)", compiled=True))
CROSS_ENTROPY.add(Impl("liger", _liger_ce, "liger_kernel.transformers.LigerCrossEntropyLoss", requires=(LIGER,),
                       devices=("cuda",)))


# ---------------------------------------------------------------- linear_cross_entropy (h @ W.T fused with CE)


def _hidden(problem: Problem) -> int:
    return int(problem.extra.get("hidden", 1024))


def _lce_inputs(problem: Problem, gen: torch.Generator) -> Inputs:
    d = _hidden(problem)
    h = torch.randn((problem.n, d), generator=gen, dtype=torch.float32, device=problem.device)
    w = torch.randn((problem.v, d), generator=gen, dtype=torch.float32, device=problem.device)
    # logits = h @ W.T then have standard deviation INPUT_SCALE, like the other suites' inputs.
    w.mul_(INPUT_SCALE / math.sqrt(d))
    return (h.to(problem.dtype), w.to(problem.dtype), _targets(problem, gen))


def _lce_bytes(problem: Problem, mode: str) -> int:
    hw = (problem.n + problem.v) * _hidden(problem) * problem.elem_size
    return {"fwd": hw, "fwdbwd": 3 * hw}[mode] + 8 * problem.n


def _naive_lce(problem: Problem) -> Callable[..., torch.Tensor]:
    cap = _softcap(problem)

    def run(h: torch.Tensor, w: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        # What a Hugging Face model does: materialise the logits, upcast, cross-entropy.
        logits = (h @ w.t()).float()
        return F.cross_entropy(_capped(logits, cap), targets, ignore_index=IGNORE_INDEX)

    return run


def _torch_lce_check(problem: Problem) -> Optional[str]:
    if not hasattr(F, "linear_cross_entropy"):
        return f"torch.nn.functional.linear_cross_entropy not in torch {torch.__version__}"
    if _softcap(problem):
        return "F.linear_cross_entropy has no softcap"
    return None


def _torch_lce(problem: Problem) -> Callable[..., torch.Tensor]:
    # options=LinearCrossEntropyOptions() opts into torch's chunked path; options=None is its unchunked reference.
    opts = torch.nn.LinearCrossEntropyOptions()
    return lambda h, w, targets: F.linear_cross_entropy(h, w, targets, ignore_index=IGNORE_INDEX, options=opts)


def _cce(problem: Problem) -> Callable[..., torch.Tensor]:
    from cut_cross_entropy import linear_cross_entropy

    cap = _softcap(problem)
    kw = {"softcap": cap} if cap else {}
    return lambda h, w, targets: linear_cross_entropy(h, w, targets, ignore_index=IGNORE_INDEX, **kw)


def _liger_flce(problem: Problem) -> Callable[..., torch.Tensor]:
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    cap = _softcap(problem)
    loss = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX, **({"softcap": cap} if cap else {}))
    return lambda h, w, targets: _first(loss(w, h, targets))


def _fastloss_lce(problem: Problem) -> Callable[..., torch.Tensor]:
    cap = _softcap(problem)
    kw = {"softcap": cap} if cap else {}
    return lambda h, w, targets: fastloss.linear_cross_entropy(h, w, targets, ignore_index=IGNORE_INDEX, **kw)


def _lce_row_sum(problem: Problem, h: torch.Tensor, w: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return _ce_ref_sum(h @ w.t(), targets, _softcap(problem))


LINEAR_CROSS_ENTROPY = register_suite(Suite(
    name="linear_cross_entropy",
    description="mean cross-entropy of h [N, D] @ W[V, D].T against [N] targets, gradients for h and W",
    make_inputs=_lce_inputs,
    bytes_moved=_lce_bytes,
    output_shape=lambda p: (),
    rel_error=mean_loss_error(_lce_row_sum, row_args=(0, 2), grad_inputs=(0, 1), count=_count_valid),
    grad_inputs=(0, 1),
    default=False,
    inputs_may_be_mutated=True,
))
LINEAR_CROSS_ENTROPY.add(Impl("fastloss", _fastloss_lce, "fastloss.linear_cross_entropy",
                              check=_fastloss_check("linear_cross_entropy")))
LINEAR_CROSS_ENTROPY.add(Impl("torch-eager", _naive_lce, "h @ W.T, .float(), F.cross_entropy (eager)",
                              baseline=True))
LINEAR_CROSS_ENTROPY.add(Impl("torch-compile", _naive_lce, "torch.compile of the naive matmul + CE",
                              compiled=True))
LINEAR_CROSS_ENTROPY.add(Impl("torch-linear-ce", _torch_lce,
                              "torch.nn.functional.linear_cross_entropy(options=LinearCrossEntropyOptions()), chunked",
                              check=_torch_lce_check))
LINEAR_CROSS_ENTROPY.add(Impl("cce", _cce, "cut_cross_entropy.linear_cross_entropy", requires=(CCE,),
                              devices=("cuda",)))
LINEAR_CROSS_ENTROPY.add(Impl("liger-fused", _liger_flce, "liger_kernel LigerFusedLinearCrossEntropyLoss",
                              requires=(LIGER,), devices=("cuda",)))


# ---------------------------------------------------------------- comp-sum losses (loss="focal" / "poly1")
# One suite per loss, the same problems and inputs as cross_entropy, so `--suite cross_entropy,focal,poly1,squentropy` shows
# what each variant costs over plain cross-entropy in one run.

COMP_SUM_PARAMS: dict[str, dict[str, float]] = {"focal": {"gamma": 2.0}, "poly1": {"epsilon": 1.0}, "squentropy": {}}


def _comp_sum_suite(kind: str) -> Suite:
    from fastloss.reference import comp_sum_loss_reference

    kw = COMP_SUM_PARAMS[kind]

    def ref_sum(problem: Problem, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return comp_sum_loss_reference(_capped(logits, _softcap(problem)), targets, kind, reduction="sum",
                                       ignore_index=IGNORE_INDEX, **kw)

    def torch_impl(problem: Problem) -> Callable[..., torch.Tensor]:
        cap = _softcap(problem)

        def run(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            # the composite a user writes: log_softmax, gather, the loss formula, a masked mean
            return comp_sum_loss_reference(_capped(logits, cap).float(), targets, kind,
                                           ignore_index=IGNORE_INDEX, **kw)

        return run

    def fl_impl(inplace: bool) -> Callable[[Problem], Callable[..., torch.Tensor]]:
        def make(problem: Problem) -> Callable[..., torch.Tensor]:
            extra: dict[str, Any] = {"softcap": _softcap(problem)} if _softcap(problem) else {}
            return lambda logits, targets: fastloss.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX,
                                                                  loss=kind, inplace_backward=inplace, **extra, **kw)

        return make

    suite = register_suite(Suite(
        name=kind,
        description=f"mean {kind} loss {kw or ''} of [N, V] logits against [N] targets",
        make_inputs=_ce_inputs,
        bytes_moved=_ce_bytes,
        output_shape=lambda p: (),
        rel_error=mean_loss_error(ref_sum, row_args=(0, 1), grad_inputs=(0,), count=_count_valid),
        grad_inputs=(0,),
        default=False,
        inputs_may_be_mutated=True,
    ))
    suite.add(Impl("fastloss", fl_impl(False), f"fastloss.cross_entropy(loss={kind!r})", check=_FL_CE_CHECK))
    suite.add(Impl("fastloss-inplace", fl_impl(True), f"fastloss.cross_entropy(loss={kind!r}, inplace_backward=True)",
                   check=_FL_CE_CHECK))
    suite.add(Impl("torch-eager", torch_impl, f"{kind} from log_softmax + gather in torch, eager", baseline=True))
    suite.add(Impl("torch-compile", torch_impl, f"torch.compile of the same {kind} composite", compiled=True))
    return suite


FOCAL = _comp_sum_suite("focal")
POLY1 = _comp_sum_suite("poly1")
SQUENTROPY = _comp_sum_suite("squentropy")

"""TRL's trainers on fastloss's kernels: the fused LM head and the chunked divergence.

Since TRL 1.15 the SFT, DPO, GRPO, KTO and RLOO trainers add a fused LM head to the model
(``trl.trainer.utils.add_fused_lm_head``): ``model(..., labels=..., fused_lm_head=True)`` runs the backbone and
computes per-token values -- log-probabilities and, on request, the entropy, ``log(sum_v p_v^2)``, the mean logit and
whether the label is the argmax -- with ``trl.kernels.chunked_logprob.ChunkedLogProbFunction``, never the
(tokens x vocabulary) logits; each trainer then runs its own loss code on them. The ``DistillationTrainer`` (GKD's
generalized JSD, on-policy) does the same with ``trl.kernels.chunked_divergence.ChunkedDivergenceFunction``.

:func:`patch_trl` puts fastloss's kernels under those two calls and leaves everything else TRL's own: the loss
formulas, masking (``-100`` labels), ``num_items_in_batch``, the DTensor / DeepSpeed gathering of the head, PEFT. The
per-token values come from :func:`fastloss.linear_token_logprobs` (the extra statistics from the same pass over each
chunk's logits) and the divergence from :func:`fastloss.linear_distillation_loss` (``reduction="none"``), with TRL's
arguments mapped one to one:

* ``temperature`` -> the same; ``logit_scale`` (Cohere, Granite, ...) -> the hidden states and bias scaled by it,
  which is the same linear map (the argmax, mean logit and statistics follow the scaled logits, as in TRL);
  ``final_logit_softcapping`` (Gemma 2 / 3) -> ``linear_token_logprobs(softcap=)``, after the scale, before the
  temperature, as TRL applies them;
* the projection's compute dtype is TRL's: the autocast dtype when autocast is on, else the hidden states' dtype
  (``cast_lm_head_to_fp32`` reaches here as float32 hidden states outside autocast); the weight is cast to it;
* gradients: ``log_probs`` and ``entropy`` are differentiable in the hidden states, weight and bias; the other
  statistics are not (TRL marks them non-differentiable); an output whose gradient is not needed costs nothing in
  the backward (TRL's ``set_materialize_grads(False)``);
* outputs are float32 (``is_top1`` bool), as TRL's.

The student's and the teacher's ``final_logit_softcapping`` in the divergence -> ``linear_distillation_loss``'s
``student_softcap`` / ``teacher_softcap``. The vocabulary chunk size TRL passes is not used: fastloss chunks tokens
(:func:`fastloss.linear_token_logprobs`'s ``chunk_size="auto"``).

Supported TRL versions: ``SUPPORTED_TRL`` (checked at :func:`patch_trl`; a version outside it, or a TRL whose
functions take other arguments or ask for outputs fastloss does not know, is refused with an error naming the
version and what differs -- never a wrong number).
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Optional

import torch

__all__ = ["patch_trl", "unpatch_trl", "use_fastloss", "is_patched", "SUPPORTED_TRL"]

SUPPORTED_TRL = (">=1.15.0", "<1.17")
"""The TRL versions whose fused LM head and chunked divergence fastloss reproduces (tested with 1.16.0)."""

# What fastloss computes, and the arguments of TRL's two functions it maps (after ctx), in order.
_OUTPUTS = ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
_LOGPROB_ARGS = ("hidden", "weight", "bias", "targets", "temperature", "chunk_size", "final_logit_softcapping",
                 "logit_scale", "outputs")
_DIVERGENCE_ARGS = ("student_hidden", "student_weight", "student_bias", "teacher_hidden", "teacher_weight",
                    "teacher_bias", "beta", "temperature", "student_logit_scale", "student_final_logit_softcapping",
                    "teacher_logit_scale", "teacher_final_logit_softcapping")

_SITES = (  # (module, attribute) holding the functions TRL's code calls at run time
    ("trl.trainer.utils", "_ChunkedLogProbFunction"),
    ("trl.trainer.distillation_trainer", "ChunkedDivergenceFunction"),
)
_originals: dict = {}


def _trl():
    try:
        import trl
    except ImportError as e:  # pragma: no cover - exercised only without trl
        raise ImportError("fastloss.integrations.trl needs TRL (pip install 'trl>=1.15,<1.17')") from e
    return trl


def _check_version(version: str) -> None:
    from packaging.version import Version

    v = Version(version)
    lo, hi = (Version(s.lstrip("<>=")) for s in SUPPORTED_TRL)
    if not lo <= v < hi:
        raise RuntimeError(f"fastloss.integrations.trl: TRL {version} is not supported (fastloss reproduces TRL "
                           f"{SUPPORTED_TRL[0]},{SUPPORTED_TRL[1]}: before 1.15 the trainers have no fused LM head "
                           "with per-token statistics; later versions may pass other arguments or ask for other "
                           "outputs). TRL's own kernels keep running; pin trl to a supported version to use fastloss.")


def _check_signature(fn, expected: tuple, where: str, version: str) -> None:
    params = list(inspect.signature(fn.forward).parameters)[1:]  # after ctx
    if tuple(params) != expected:
        raise RuntimeError(f"fastloss.integrations.trl: TRL {version}'s {where}.forward takes {tuple(params)}, "
                           f"fastloss maps {expected}; not patched (TRL's own kernels keep running)")


def patch_trl() -> None:
    """Make TRL's fused LM head and chunked divergence run on fastloss's kernels, in every trainer that uses them
    (SFT, DPO, GRPO, KTO, RLOO, Distillation), from now on. Call it before or after building the trainer: TRL looks
    the functions up at each call. Idempotent; :func:`unpatch_trl` restores TRL's own."""
    import importlib

    trl = _trl()
    _check_version(trl.__version__)
    from trl.kernels import chunked_logprob

    unknown = set(chunked_logprob.OPTIONAL_OUTPUTS) - set(_OUTPUTS)
    if unknown:
        raise RuntimeError(f"fastloss.integrations.trl: TRL {trl.__version__}'s fused LM head can ask for "
                           f"{sorted(unknown)}, which fastloss does not compute; not patched")
    modules = [importlib.import_module(m) for m, _ in _SITES]
    for (mod_name, attr), mod, (shim, expected) in zip(_SITES, modules, ((_FastlossLogProbs, _LOGPROB_ARGS),
                                                                          (_FastlossDivergence, _DIVERGENCE_ARGS))):
        current = getattr(mod, attr)
        original = _originals.get((mod_name, attr), current if current is not shim else None)
        _check_signature(original, expected, f"{mod_name}.{attr}", trl.__version__)
    for (mod_name, attr), mod, shim in zip(_SITES, modules, (_FastlossLogProbs, _FastlossDivergence)):
        current = getattr(mod, attr)
        if current is not shim:
            _originals[(mod_name, attr)] = current
            setattr(mod, attr, shim)


def unpatch_trl() -> None:
    """Restore TRL's own fused LM head and chunked divergence (no-op when not patched)."""
    import importlib

    for (mod_name, attr), original in list(_originals.items()):
        setattr(importlib.import_module(mod_name), attr, original)
        del _originals[(mod_name, attr)]


def is_patched() -> bool:
    return bool(_originals)


@contextlib.contextmanager
def use_fastloss():
    """``with use_fastloss(): trainer.train()``: :func:`patch_trl` for the block, then TRL's own again (unless it was
    patched before the block)."""
    was = is_patched()
    patch_trl()
    try:
        yield
    finally:
        if not was:
            unpatch_trl()


def _compute_dtype(hidden: torch.Tensor) -> torch.dtype:
    """TRL's: the autocast dtype when autocast is on for the device, else the hidden states' dtype."""
    dev = hidden.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else hidden.dtype


def _head(hidden, weight, bias, logit_scale):
    """The head's operands in TRL's compute dtype, with logit_scale folded into the hidden states and the bias
    (logit_scale * (h W^T + b) = (logit_scale h) W^T + logit_scale b)."""
    dt = _compute_dtype(hidden)
    h, W = hidden.to(dt), weight.to(dt)
    b = bias.to(dt) if bias is not None else None
    if logit_scale != 1.0:
        h = h * logit_scale
        b = b * logit_scale if b is not None else None
    return h, W, b


class _FastlossLogProbs:
    """Stands in for ``trl.kernels.chunked_logprob.ChunkedLogProbFunction`` (only ``apply`` is called)."""

    @staticmethod
    def apply(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], targets: torch.Tensor,
              temperature: float, chunk_size: int, final_logit_softcapping: Optional[float] = None,
              logit_scale: float = 1.0, outputs: tuple = ("log_probs",) + _OUTPUTS):
        import fastloss

        unknown = set(outputs) - set(_OUTPUTS) - {"log_probs"}
        if unknown:
            raise RuntimeError(f"fastloss.integrations.trl: TRL asked the fused LM head for {sorted(unknown)}, "
                               f"which fastloss does not compute (TRL {_trl().__version__}; supported "
                               f"{','.join(SUPPORTED_TRL)})")
        h, W, b = _head(hidden, weight, bias, logit_scale)
        # Every call computes every output (one pass; the GEMMs dominate): the log-probs then come from the same
        # arithmetic whatever TRL asks for, so a policy asking for the entropy and its reference model not asking
        # give exactly equal log-probs at equal weights (KL 0, ratio 1), as with TRL's own kernels. An unused
        # output costs nothing in the backward (its gradient is None: no entropy term).
        out = fastloss.linear_token_logprobs(h, W, targets, bias=b, temperature=temperature, return_entropy=True,
                                             return_stats=True, softcap=final_logit_softcapping)
        pick = lambda name, x: x if name in outputs else None  # noqa: E731
        return (out.logprobs.float(), pick("entropy", out.entropy.float()),
                pick("log_sum_sq_probs", out.log_sum_sq_probs.float()), pick("mean_logits", out.mean_logits.float()),
                pick("is_top1", out.argmax == targets))


class _FastlossDivergence:
    """Stands in for ``trl.kernels.chunked_divergence.ChunkedDivergenceFunction``: per-token generalized JSD of
    the tempered student and teacher (beta 0: KL(teacher || student), 1: KL(student || teacher), as TRL), with
    gradients to the student, and the student's entropy (no gradient)."""

    @staticmethod
    def apply(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias, beta,
              temperature=1.0, student_logit_scale=1.0, student_final_logit_softcapping=None, teacher_logit_scale=1.0,
              teacher_final_logit_softcapping=None):
        import fastloss

        hs, Ws, bs = _head(student_hidden, student_weight, student_bias, student_logit_scale)
        with torch.no_grad():
            ht, Wt, bt = _head(teacher_hidden, teacher_weight, teacher_bias, teacher_logit_scale)
        if ht.dtype != hs.dtype:  # fastloss's chunks run both heads in one dtype; TRL rounds each in its own
            ht, Wt, bt = ht.to(hs.dtype), Wt.to(hs.dtype), bt.to(hs.dtype) if bt is not None else None
        # the student's entropy (TRL logs it, no gradient) from the same chunks and kernels as the divergence
        div, entropy = fastloss.linear_distillation_loss(hs, Ws, ht, Wt, student_bias=bs, teacher_bias=bt,
                                                         divergence="jsd", beta=float(beta), temperature=temperature,
                                                         reduction="none", return_student_entropy=True,
                                                         student_softcap=student_final_logit_softcapping,
                                                         teacher_softcap=teacher_final_logit_softcapping)
        return div.float(), entropy.float()

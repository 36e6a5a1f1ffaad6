"""Distillation and RL-policy losses (issue #14): fastloss against the plain PyTorch composites.

Six opt-in suites (``--suite distillation,token_logprobs,...`` or ``--suite all``; the presets ``distill-tiny``,
``distill-cpu-goal`` and ``distill-gpu-quick`` select them):

================================  ==========================================================================
suite                             what every implementation computes
================================  ==========================================================================
distillation                      forward KL(teacher || student) of [N, V] logits, summed over V, mean over N
distillation_jsd                  the same with TRL's generalized JSD (beta 0.5)
token_logprobs                    [N, 2]: log p(token) and the entropy of softmax(logits / T), both differentiated
linear_distillation               distillation of h_s @ W_s.T against h_t @ W_t.T (gradients for h_s and W_s)
linear_distillation_jsd           the same with the JSD
linear_token_logprobs             token_logprobs of h @ W.T (gradients for h and W)
================================  ==========================================================================

Implementations: ``fastloss`` (``fastloss.distillation_loss`` / ``linear_distillation_loss`` / ``token_logprobs`` /
``linear_token_logprobs``; skipped while the installed fastloss lacks the function), ``torch-eager`` (the composite a
user writes, the speed-up baseline), ``torch-compile`` (``torch.compile`` of that composite) and, on the linear
suites, ``trl`` (TRL's ``ChunkedLogProbFunction`` / ``ChunkedDivergenceFunction``, what its trainers run without
fastloss; skipped when TRL is not installed; issue #21) and ``fastloss-trl`` (what they run after
``fastloss.integrations.trl.patch_trl()``: the shims, which compute every per-token output TRL can ask for). The linear
composites materialise the logits (``h @ W.T``) and then run the logits composite; with ``--memory`` (CPU) or on
CUDA the peak-memory column shows what that costs next to fastloss's chunks.

The composites:

* distillation: ``F.kl_div(F.log_softmax(s / T, -1), F.log_softmax(t / T, -1), log_target=True,
  reduction="batchmean")`` (per-token sum over V, mean over the N tokens), in the logits' dtype as TRL's GKD
  trainer runs it; JSD: TRL's ``generalized_jsd_loss`` (mixture by ``logsumexp`` of the shifted log-probs);
* token log-probs: ``lp = F.log_softmax(x.float() / T, -1)``, ``lp.gather(-1, tokens)``, ``-(lp.exp() * lp).sum(-1)``
  (float32 results, as fastloss returns; upcasting is what verl / TRL do with bf16 logits).

The division by ``T`` is only written when ``T != 1`` (the problem extra ``temperature``, default 1: no preset sets
it, so the composites are timed without that extra pass). Teacher logits are random and correlated with the
student's (correlation 0.8, both with standard deviation 3); tokens are uniform over the vocabulary. No tokens are
masked (no ``target``).

Errors are against float64 references on the same inputs (``rel_err``): the logits suites use
:mod:`fastloss.bench.accuracy`; the linear suites compute their reference once per problem and mode (in row chunks,
the LM-head gradient accumulated over them) and share it between implementations, since a float64 ``h @ W.T`` of a
real head costs seconds to minutes on a CPU.

Bytes-moved model (an ideal kernel; elements of the input dtype unless said):

* distillation: fwd reads s and t (2 NV); bwd reads both again and writes ds (3 NV): fwdbwd 5 NV.
* token_logprobs: fwd reads x (NV) and N int64 tokens, writes 2 N float32; bwd reads x again, 2 N float32
  upstream gradients, writes dx (2 NV).
* linear_distillation: fwd reads h_s, W_s, h_t, W_t ((N + V)(Ds + Dt)); bwd reads them again and writes dh_s and
  dW_s ((N + V)(Ds + Dt) + (N + V) Ds). Compute bound like linear cross-entropy.
* linear_token_logprobs: fwd reads h and W ((N + V) D) and the tokens, writes 2 N float32; bwd reads h, W again
  and writes dh, dW (2 (N + V) D).

Problem extras: ``hidden`` (student D, default 1024), ``teacher_hidden`` (teacher D, default ``hidden``),
``temperature`` (default 1), ``chunk_size`` (tokens per chunk of fastloss's linear versions, default "auto").
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F

import fastloss

from ..accuracy import mean_loss_error, rowwise_error
from ..inputs import INPUT_SCALE
from ..problems import Problem
from ..registry import ErrorFn, Impl, Inputs, Suite, fastloss_kernel_check, register_suite

JSD_BETA = 0.5
TEACHER_CORRELATION = 0.8
REF_CHUNK_ELEMENTS = 2**24
"""Rows per chunk of the linear suites' float64 reference: this many elements of one [rows, V] tensor."""


def _temperature(problem: Problem) -> float:
    return float(problem.extra.get("temperature", 1.0))


def _hidden(problem: Problem) -> int:
    return int(problem.extra.get("hidden", 1024))


def _teacher_hidden(problem: Problem) -> int:
    return int(problem.extra.get("teacher_hidden", _hidden(problem)))


def _chunk_size(problem: Problem) -> Any:
    """fastloss's chunk_size for the linear versions: the problem extra ``chunk_size`` (tokens), else "auto"."""
    return problem.extra.get("chunk_size", "auto")


def _fastloss_check(attr: str, op: str) -> Callable[[Problem], Optional[str]]:
    """fastloss has the function (it lands with issue #14) and, on CUDA, its row kernel ``torch.ops.fastloss.<op>``
    has a CUDA kernel in this build (a CPU-only build, or one from before the CUDA kernel, is a skip)."""
    kernels = fastloss_kernel_check(op)

    def check(problem: Problem) -> Optional[str]:
        if not hasattr(fastloss, attr):
            return f"fastloss.{attr} not implemented yet"
        return kernels(problem) if problem.device == "cuda" else None

    return check


# ---------------------------------------------------------------- inputs


def _randn(shape: tuple[int, ...], problem: Problem, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(shape, generator=gen, dtype=torch.float32, device=problem.device)


def _tokens(problem: Problem, gen: torch.Generator) -> torch.Tensor:
    return torch.randint(0, problem.v, (problem.n,), generator=gen, device=problem.device, dtype=torch.int64)


def _pair_inputs(problem: Problem, gen: torch.Generator) -> Inputs:
    """Student and teacher logits ~ N(0, 3^2), correlated 0.8 (a teacher the student roughly agrees with)."""
    s = _randn((problem.n, problem.v), problem, gen).mul_(INPUT_SCALE)
    t = _randn((problem.n, problem.v), problem, gen).mul_(INPUT_SCALE * math.sqrt(1 - TEACHER_CORRELATION**2))
    t.add_(s, alpha=TEACHER_CORRELATION)
    return (s.to(problem.dtype), t.to(problem.dtype))


def _logits_tokens_inputs(problem: Problem, gen: torch.Generator) -> Inputs:
    x = _randn((problem.n, problem.v), problem, gen).mul_(INPUT_SCALE)
    return (x.to(problem.dtype), _tokens(problem, gen))


def _head(problem: Problem, gen: torch.Generator, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """h [N, d] ~ N(0, 1) and W [V, d] scaled so that h @ W.T has standard deviation INPUT_SCALE."""
    h = _randn((problem.n, d), problem, gen)
    w = _randn((problem.v, d), problem, gen).mul_(INPUT_SCALE / math.sqrt(d))
    return h, w


def _linear_pair_inputs(problem: Problem, gen: torch.Generator) -> Inputs:
    hs, ws = _head(problem, gen, _hidden(problem))
    ht, wt = _head(problem, gen, _teacher_hidden(problem))
    return tuple(x.to(problem.dtype) for x in (hs, ws, ht, wt))


def _linear_tokens_inputs(problem: Problem, gen: torch.Generator) -> Inputs:
    h, w = _head(problem, gen, _hidden(problem))
    return (h.to(problem.dtype), w.to(problem.dtype), _tokens(problem, gen))


# ---------------------------------------------------------------- bytes moved


def _pair_bytes(problem: Problem, mode: str) -> int:
    nv = problem.numel * problem.elem_size
    return {"fwd": 2 * nv, "fwdbwd": 5 * nv}[mode]


def _tokens_bytes(problem: Problem, mode: str) -> int:
    nv = problem.numel * problem.elem_size
    small = 8 * problem.n + 2 * 4 * problem.n  # tokens in, two float32 outputs
    return {"fwd": nv + small, "fwdbwd": 3 * nv + small + 2 * 4 * problem.n}[mode]


def _linear_pair_bytes(problem: Problem, mode: str) -> int:
    ds, dt = _hidden(problem), _teacher_hidden(problem)
    rows = problem.n + problem.v
    fwd = rows * (ds + dt) * problem.elem_size
    return {"fwd": fwd, "fwdbwd": 2 * fwd + rows * ds * problem.elem_size}[mode]


def _linear_tokens_bytes(problem: Problem, mode: str) -> int:
    hw = (problem.n + problem.v) * _hidden(problem) * problem.elem_size
    small = 8 * problem.n + 2 * 4 * problem.n
    return {"fwd": hw + small, "fwdbwd": 3 * hw + small + 2 * 4 * problem.n}[mode]


# ---------------------------------------------------------------- the composites (what users write)


def torch_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, divergence: str = "forward_kl",
                     beta: float = JSD_BETA, temperature: float = 1.0) -> torch.Tensor:
    """Per-token divergence [N] of two [N, V] logits, written as TRL's GKD trainer does (``generalized_jsd_loss``,
    ``reduction="none"`` summed over V), in the logits' dtype."""
    s, t = student_logits, teacher_logits
    if temperature != 1.0:
        s, t = s / temperature, t / temperature
    ls = F.log_softmax(s, dim=-1)
    lt = F.log_softmax(t, dim=-1)
    if divergence == "jsd" and beta == 0.0:
        divergence = "forward_kl"
    elif divergence == "jsd" and beta == 1.0:
        divergence = "reverse_kl"
    if divergence == "forward_kl":
        return F.kl_div(ls, lt, reduction="none", log_target=True).sum(-1)
    if divergence == "reverse_kl":
        return F.kl_div(lt, ls, reduction="none", log_target=True).sum(-1)
    if divergence != "jsd":
        raise ValueError(f"unknown divergence {divergence!r}")
    mixture = torch.logsumexp(torch.stack([ls + math.log(1 - beta), lt + math.log(beta)]), dim=0)
    kl_teacher = F.kl_div(mixture, lt, reduction="none", log_target=True)
    kl_student = F.kl_div(mixture, ls, reduction="none", log_target=True)
    return (beta * kl_teacher + (1 - beta) * kl_student).sum(-1)


def torch_distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                            divergence: str = "forward_kl", beta: float = JSD_BETA,
                            temperature: float = 1.0) -> torch.Tensor:
    """Mean over the N tokens of the per-token divergence. For forward KL this is exactly
    ``F.kl_div(F.log_softmax(s / T, -1), F.log_softmax(t / T, -1), log_target=True, reduction="batchmean")``."""
    if divergence == "forward_kl":
        s, t = student_logits, teacher_logits
        if temperature != 1.0:
            s, t = s / temperature, t / temperature
        return F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="batchmean")
    return torch_divergence(student_logits, teacher_logits, divergence, beta, temperature).sum() / \
        student_logits.shape[0]


def torch_token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """[N, 2] float32: log p(token) and the entropy of softmax(logits / T), from one log_softmax."""
    x = logits.float()
    if temperature != 1.0:
        x = x / temperature
    lp = F.log_softmax(x, dim=-1)
    logp = lp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    entropy = -(lp.exp() * lp).sum(-1)
    return torch.stack((logp, entropy), dim=-1)


def _stack(out: Any) -> torch.Tensor:
    """fastloss.(linear_)token_logprobs(return_entropy=True) -> the [N, 2] tensor the suite compares."""
    logp, entropy = out
    return torch.stack((logp, entropy), dim=-1)


# ---------------------------------------------------------------- float64 references


def _divergence_rows64(s: torch.Tensor, t: torch.Tensor, divergence: str, beta: float,
                       temperature: float) -> torch.Tensor:
    ls = torch.log_softmax(s.double() / temperature, -1)
    lt = torch.log_softmax(t.detach().double() / temperature, -1)
    if divergence == "forward_kl":
        return (lt.exp() * (lt - ls)).sum(-1)
    if divergence == "reverse_kl":
        return (ls.exp() * (ls - lt)).sum(-1)
    lm = torch.logaddexp(ls + math.log(1 - beta), lt + math.log(beta))
    return beta * (lt.exp() * (lt - lm)).sum(-1) + (1 - beta) * (ls.exp() * (ls - lm)).sum(-1)


def _token_rows64(x: torch.Tensor, tokens: torch.Tensor, temperature: float) -> torch.Tensor:
    lp = torch.log_softmax(x.double() / temperature, -1)
    return torch.stack((lp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1), -(lp.exp() * lp).sum(-1)), -1)


def _rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    if tuple(got.shape) != tuple(ref.shape):
        raise ValueError(f"result shape {tuple(got.shape)} != reference shape {tuple(ref.shape)}")
    den = float(torch.linalg.vector_norm(ref))
    num = float(torch.linalg.vector_norm(got.detach().to(ref.device, torch.float64) - ref))
    return num / den if den > 0 else num


def linear_reference_error(rows_fn: Callable[..., torch.Tensor], row_args: tuple[int, ...],
                           grad_inputs: tuple[int, ...], mean: bool) -> ErrorFn:
    """Error function of a fused linear op whose shared inputs (the LM heads) make float64 references expensive.

    ``rows_fn(problem, *chunk64)`` returns the float64 per-row results of a chunk of rows (``row_args`` are split
    by rows, the other tensors are passed whole). ``mean``: the implementations return the mean of the per-row
    results (a scalar loss); otherwise the per-row results themselves. The reference (output and the gradients of
    ``grad_inputs`` for the mode's upstream gradient, which every implementation shares) is computed once per
    problem and mode and kept in ``cache``; its size is that of the inputs' gradients, in float64."""

    def compute(problem: Problem, inputs: Inputs, grad_out: Optional[torch.Tensor]) -> tuple[Any, list]:
        need_grad = grad_out is not None
        whole = {i: (t.detach().double().requires_grad_(need_grad and i in grad_inputs) if t.is_floating_point()
                     else t)
                 for i, t in enumerate(inputs) if i not in row_args and isinstance(t, torch.Tensor)}
        step = max(1, REF_CHUNK_ELEMENTS // max(1, problem.v))
        outs: list[torch.Tensor] = []
        row_grads: dict[int, list[torch.Tensor]] = {i: [] for i in grad_inputs if i in row_args}
        shared_grads: dict[int, torch.Tensor] = {}
        scale = float(grad_out) / problem.n if (need_grad and mean) else 1.0
        for a in range(0, problem.n, step):
            b = min(problem.n, a + step)
            chunk = []
            for i, t in enumerate(inputs):
                if i in row_args:
                    t = t[a:b]
                    if t.is_floating_point():
                        t = t.detach().double().requires_grad_(need_grad and i in grad_inputs)
                    chunk.append(t)
                else:
                    chunk.append(whole.get(i, t))
            with torch.enable_grad():
                rows = rows_fn(problem, *chunk)
                if need_grad:
                    up = torch.full_like(rows, scale) if mean else grad_out[a:b].to(rows.device, torch.float64)
                    grads = torch.autograd.grad(rows, [chunk[i] for i in grad_inputs], up)
            outs.append(rows.detach())
            if need_grad:
                for i, g in zip(grad_inputs, grads):
                    if i in row_args:
                        row_grads[i].append(g)
                    else:
                        shared_grads[i] = shared_grads[i] + g if i in shared_grads else g
        out = torch.cat(outs)
        out_ref: Any = float(out.sum()) / problem.n if mean else out
        grad_refs = [torch.cat(row_grads[i]) if i in row_args else shared_grads[i] for i in grad_inputs] \
            if need_grad else []
        return out_ref, grad_refs

    def rel_error(problem: Problem, inputs: Inputs, grad_out: Optional[torch.Tensor], got: Any,
                  got_grads: Sequence[torch.Tensor], cache: dict) -> float:
        key = ("linear_reference", grad_out is not None)
        if key not in cache:
            cache[key] = compute(problem, inputs, grad_out)
        out_ref, grad_refs = cache[key]
        if mean:
            got_val = float(got.detach().double())
            errs = [abs(got_val - out_ref) / abs(out_ref) if out_ref != 0 else abs(got_val)]
        else:
            errs = [_rel(got, out_ref)]
        errs += [_rel(g, r) for g, r in zip(got_grads, grad_refs)]
        return max(errs)

    return rel_error


# ---------------------------------------------------------------- distillation on logits


def _distillation_suite(name: str, divergence: str, beta: float) -> Suite:
    what = "forward KL(teacher || student)" if divergence == "forward_kl" else f"{divergence} (beta {beta})"

    def torch_impl(problem: Problem) -> Callable[..., torch.Tensor]:
        temp = _temperature(problem)
        return lambda s, t: torch_distillation_loss(s, t, divergence, beta, temp)

    def fastloss_impl(problem: Problem) -> Callable[..., torch.Tensor]:
        temp = _temperature(problem)
        return lambda s, t: fastloss.distillation_loss(s, t, divergence=divergence, beta=beta, temperature=temp)

    def ref_sum(problem: Problem, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return _divergence_rows64(s, t, divergence, beta, _temperature(problem)).sum()

    suite = register_suite(Suite(
        name=name,
        description=f"{what} of [N, V] student logits against [N, V] teacher logits, summed over V, mean over N",
        make_inputs=_pair_inputs,
        bytes_moved=_pair_bytes,
        output_shape=lambda p: (),
        rel_error=mean_loss_error(ref_sum, row_args=(0, 1), grad_inputs=(0,), count=lambda inputs: inputs[0].shape[0]),
        grad_inputs=(0,),
        default=False,
    ))
    kw = f"divergence={divergence!r}" + (f", beta={beta}" if divergence == "jsd" else "")
    composite = ("F.kl_div(F.log_softmax(s), F.log_softmax(t), log_target=True, reduction='batchmean')"
                 if divergence == "forward_kl"
                 else "TRL's generalized_jsd_loss (log_softmax, logsumexp mixture, kl_div)")
    suite.add(Impl("fastloss", fastloss_impl, f"fastloss.distillation_loss({kw})",
                   check=_fastloss_check("distillation_loss", "distill_fwd")))
    suite.add(Impl("torch-eager", torch_impl, f"{composite}, eager", baseline=True))
    suite.add(Impl("torch-compile", torch_impl, "torch.compile of the same composite", compiled=True))
    return suite


DISTILLATION = _distillation_suite("distillation", "forward_kl", JSD_BETA)
DISTILLATION_JSD = _distillation_suite("distillation_jsd", "jsd", JSD_BETA)


# ---------------------------------------------------------------- token log-probs (+ entropy) on logits


def _torch_token_logprobs(problem: Problem) -> Callable[..., torch.Tensor]:
    temp = _temperature(problem)
    return lambda x, tokens: torch_token_logprobs(x, tokens, temp)


def _fastloss_token_logprobs(problem: Problem) -> Callable[..., torch.Tensor]:
    temp = _temperature(problem)
    return lambda x, tokens: _stack(fastloss.token_logprobs(x, tokens, temperature=temp, return_entropy=True))


def _token_logprobs_error() -> ErrorFn:
    """rowwise_error with the problem's temperature (its reference function only sees the inputs)."""
    by_temperature: dict[float, ErrorFn] = {}

    def rel_error(problem: Problem, inputs: Inputs, grad_out: Optional[torch.Tensor], got: Any,
                  got_grads: Sequence[torch.Tensor], cache: dict) -> float:
        temp = _temperature(problem)
        if temp not in by_temperature:
            by_temperature[temp] = rowwise_error(lambda x, tokens: _token_rows64(x, tokens, temp), grad_inputs=(0,))
        return by_temperature[temp](problem, inputs, grad_out, got, got_grads, cache)

    return rel_error


TOKEN_LOGPROBS = register_suite(Suite(
    name="token_logprobs",
    description="[N, 2]: log softmax(x / T)[token] and the entropy of softmax(x / T) of [N, V] logits "
                "(upstream gradients on both)",
    make_inputs=_logits_tokens_inputs,
    bytes_moved=_tokens_bytes,
    output_shape=lambda p: (p.n, 2),
    rel_error=_token_logprobs_error(),
    grad_inputs=(0,),
    default=False,
))
TOKEN_LOGPROBS.add(Impl("fastloss", _fastloss_token_logprobs, "fastloss.token_logprobs(return_entropy=True)",
                        check=_fastloss_check("token_logprobs", "token_logprobs_fwd")))
TOKEN_LOGPROBS.add(Impl("torch-eager", _torch_token_logprobs,
                        "log_softmax(x.float()), gather, -(exp(lp) * lp).sum(-1), eager", baseline=True))
TOKEN_LOGPROBS.add(Impl("torch-compile", _torch_token_logprobs, "torch.compile of the same composite",
                        compiled=True))



# ---------------------------------------------------------------- linear distillation (two LM heads)


def _linear_distillation_suite(name: str, divergence: str, beta: float) -> Suite:
    what = "forward KL(teacher || student)" if divergence == "forward_kl" else f"{divergence} (beta {beta})"

    def torch_impl(problem: Problem) -> Callable[..., torch.Tensor]:
        temp = _temperature(problem)

        def run(hs: torch.Tensor, ws: torch.Tensor, ht: torch.Tensor, wt: torch.Tensor) -> torch.Tensor:
            # Both heads' logits in full (the teacher's without a graph: its inputs do not require grad).
            return torch_distillation_loss(hs @ ws.t(), ht @ wt.t(), divergence, beta, temp)

        return run

    def fastloss_impl(problem: Problem) -> Callable[..., torch.Tensor]:
        temp = _temperature(problem)
        chunk = _chunk_size(problem)
        return lambda hs, ws, ht, wt: fastloss.linear_distillation_loss(hs, ws, ht, wt, divergence=divergence,
                                                                        beta=beta, temperature=temp,
                                                                        chunk_size=chunk)

    def rows(problem: Problem, hs: torch.Tensor, ws: torch.Tensor, ht: torch.Tensor, wt: torch.Tensor):
        return _divergence_rows64(hs @ ws.t(), ht @ wt.t(), divergence, beta, _temperature(problem))

    suite = register_suite(Suite(
        name=name,
        description=f"{what} of h_s [N, Ds] @ W_s[V, Ds].T against h_t [N, Dt] @ W_t[V, Dt].T, mean over N, "
                    "gradients for h_s and W_s",
        make_inputs=_linear_pair_inputs,
        bytes_moved=_linear_pair_bytes,
        output_shape=lambda p: (),
        rel_error=linear_reference_error(rows, row_args=(0, 2), grad_inputs=(0, 1), mean=True),
        grad_inputs=(0, 1),
        default=False,
    ))
    kw = f"divergence={divergence!r}" + (f", beta={beta}" if divergence == "jsd" else "")
    suite.add(Impl("fastloss", fastloss_impl, f"fastloss.linear_distillation_loss({kw}), chunked",
                   check=_fastloss_check("linear_distillation_loss", "distill_fwd")))
    suite.add(Impl("torch-eager", torch_impl, "h_s @ W_s.T, h_t @ W_t.T, then the distillation composite (eager)",
                   baseline=True))
    suite.add(Impl("torch-compile", torch_impl, "torch.compile of the matmuls + composite", compiled=True))
    trl_beta = {"forward_kl": 0.0, "reverse_kl": 1.0}.get(divergence, beta)  # TRL's beta 0 / 1 are the two KLs

    def trl_impl(problem: Problem) -> Callable[..., torch.Tensor]:
        from trl.kernels.chunked_divergence import ChunkedDivergenceFunction

        temp = _temperature(problem)
        return lambda hs, ws, ht, wt: ChunkedDivergenceFunction.apply(hs, ws, None, ht, wt, None, trl_beta, temp, 1.0,
                                                                      None, 1.0, None)[0].mean()

    suite.add(Impl("trl", trl_impl, f"TRL's ChunkedDivergenceFunction (beta={trl_beta}; Triton on CUDA, torch tiles "
                   "elsewhere), mean over N", requires=("trl",)))

    def shim_impl(problem: Problem) -> Callable[..., torch.Tensor]:
        from fastloss.integrations.trl import _FastlossDivergence

        temp = _temperature(problem)
        return lambda hs, ws, ht, wt: _FastlossDivergence.apply(hs, ws, None, ht, wt, None, trl_beta, temp, 1.0, None,
                                                                1.0, None)[0].mean()

    suite.add(Impl("fastloss-trl", shim_impl, "what TRL's trainers run after fastloss.integrations.trl.patch_trl(): "
                   "the divergence and the student's entropy, mean over N"))
    return suite


LINEAR_DISTILLATION = _linear_distillation_suite("linear_distillation", "forward_kl", JSD_BETA)
LINEAR_DISTILLATION_JSD = _linear_distillation_suite("linear_distillation_jsd", "jsd", JSD_BETA)


# ---------------------------------------------------------------- linear token log-probs (+ entropy)


def _torch_linear_token_logprobs(problem: Problem) -> Callable[..., torch.Tensor]:
    temp = _temperature(problem)
    return lambda h, w, tokens: torch_token_logprobs(h @ w.t(), tokens, temp)


def _fastloss_linear_token_logprobs(problem: Problem) -> Callable[..., torch.Tensor]:
    temp, chunk = _temperature(problem), _chunk_size(problem)
    return lambda h, w, tokens: _stack(fastloss.linear_token_logprobs(h, w, tokens, temperature=temp,
                                                                      return_entropy=True, chunk_size=chunk))


def _linear_token_rows(problem: Problem, h: torch.Tensor, w: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    return _token_rows64(h @ w.t(), tokens, _temperature(problem))


LINEAR_TOKEN_LOGPROBS = register_suite(Suite(
    name="linear_token_logprobs",
    description="[N, 2]: log-prob of the token and entropy of softmax(h [N, D] @ W[V, D].T / T), gradients for h "
                "and W",
    make_inputs=_linear_tokens_inputs,
    bytes_moved=_linear_tokens_bytes,
    output_shape=lambda p: (p.n, 2),
    rel_error=linear_reference_error(_linear_token_rows, row_args=(0, 2), grad_inputs=(0, 1), mean=False),
    grad_inputs=(0, 1),
    default=False,
))
LINEAR_TOKEN_LOGPROBS.add(Impl("fastloss", _fastloss_linear_token_logprobs,
                               "fastloss.linear_token_logprobs(return_entropy=True), chunked",
                               check=_fastloss_check("linear_token_logprobs", "token_logprobs_fwd")))
LINEAR_TOKEN_LOGPROBS.add(Impl("torch-eager", _torch_linear_token_logprobs,
                               "h @ W.T, then the token log-prob + entropy composite (eager)", baseline=True))
LINEAR_TOKEN_LOGPROBS.add(Impl("torch-compile", _torch_linear_token_logprobs,
                               "torch.compile of the matmul + composite", compiled=True))


def _trl_linear_token_logprobs(problem: Problem) -> Callable[..., torch.Tensor]:
    from trl.kernels.chunked_logprob import ChunkedLogProbFunction

    temp = _temperature(problem)
    # TRL's fused LM head asks for ("log_probs", "entropy") to get both, with its default vocabulary tile (32768)
    return lambda h, w, tokens: torch.stack(ChunkedLogProbFunction.apply(
        h, w, None, tokens, temp, 32768, None, 1.0, ("log_probs", "entropy"))[:2], dim=-1)


def _shim_linear_token_logprobs(problem: Problem) -> Callable[..., torch.Tensor]:
    from fastloss.integrations.trl import _FastlossLogProbs

    temp = _temperature(problem)
    return lambda h, w, tokens: torch.stack(_FastlossLogProbs.apply(
        h, w, None, tokens, temp, 32768, None, 1.0, ("log_probs", "entropy"))[:2], dim=-1)


LINEAR_TOKEN_LOGPROBS.add(Impl("fastloss-trl", _shim_linear_token_logprobs,
                               "what TRL's fused LM head runs after fastloss.integrations.trl.patch_trl() (every "
                               "output computed, log_probs + entropy returned)"))
LINEAR_TOKEN_LOGPROBS.add(Impl("trl", _trl_linear_token_logprobs,
                               "TRL's ChunkedLogProbFunction (the trainers' fused LM head; Triton on CUDA, torch tiles "
                               "elsewhere), log_probs + entropy", requires=("trl",)))

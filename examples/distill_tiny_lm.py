"""Distil a tiny Llama student from a tiny Llama teacher on the CPU -- with plain PyTorch and with fastloss.

What it shows
-------------
``fastloss.linear_distillation_loss`` computes a distillation loss (Hinton's temperature KD, or GKD's reverse KL /
generalized JSD) from the student's and the teacher's final hidden states and LM heads, a chunk of tokens at a
time: neither model's (tokens x vocabulary) logits ever exist in full. This script

1. trains a small teacher ``LlamaForCausalLM`` (``--teacher-*``) on the offline corpus of ``train_tiny_lm.py``
   with transformers' own loss, in a child process, and saves it;
2. distils a smaller student (``--hidden``, ``--layers``, ...) from it twice, from the same initial weights and
   seed and on the same batches:

   * ``torch``:    the student's and the teacher's logits through their LM heads, then the composite users write
                   (``F.log_softmax(logits / T)`` of both, ``F.kl_div(..., log_target=True)`` summed over the
                   vocabulary; TRL's ``generalized_jsd_loss`` for ``--divergence jsd``), masked to the tokens that
                   have a next token, plus ``--hard-weight`` times ``F.cross_entropy`` of the untempered student
                   logits against the next tokens;
   * ``fastloss``: ``fastloss.linear_distillation_loss`` on the hidden states and the two heads' weights, same
                   options (``--fastloss-op logits`` uses ``fastloss.distillation_loss`` on the logits instead).

Each run is its own child process (this script re-run with a hidden ``--worker`` flag), so its peak memory
(``VmHWM`` in ``/proc/self/status``, Linux) is its own. The parent prints both loss curves side by side, final
losses, wall time and peak memory of each run, the largest difference between the curves and PASS / FAIL against
``--tolerance`` (exit status 1 on FAIL). As in ``train_tiny_lm.py`` the curves agree up to float32 rounding (a
different summation order), not bit for bit.

The loss is not multiplied by T^2 (Hinton's scaling): both runs compute ``KL_T + hard_weight * CE`` averaged over the
unmasked tokens, which is what ``fastloss.distillation_loss`` returns.

Data, offline
-------------
As ``train_tiny_lm.py`` (whose corpus, tokenizer, model and schedule code this script imports): a byte-level BPE
(32768 entries by default) trained on text shipped with Python and cached in ``--cache-dir``; the language models
train on the prose of ``pydoc_data.topics``. Nothing is downloaded.

Run it
------
::

    python examples/distill_tiny_lm.py                      # defaults: well under a minute on 2 CPU cores
    python examples/distill_tiny_lm.py --divergence jsd --beta 0.3 --temperature 1 --hard-weight 0
    python examples/distill_tiny_lm.py --steps 100 --teacher-steps 200 --plot curves.png
    python examples/distill_tiny_lm.py --help

Needs torch, fastloss (with ``linear_distillation_loss``), transformers and tokenizers; ``--plot`` also needs
matplotlib (optional).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_tiny_lm as base  # noqa: E402  (the corpus, tokenizer, model and schedule of the other example)

RUNS = ("torch", "fastloss")
WORKERS = ("teacher",) + RUNS
IGNORE_INDEX = -100
DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")
# Max |loss_torch - loss_fastloss| over the curve for PASS (float32 rounding only; see train_tiny_lm.py's docstring).
DEFAULT_TOLERANCE = 1e-3


# ----------------------------------------------------------------------------------------------------------------
# The plain PyTorch distillation loss (what the torch run computes)
# ----------------------------------------------------------------------------------------------------------------

def torch_distillation_loss(student_logits, teacher_logits, target, *, divergence: str = "forward_kl",
                            beta: float = 0.5, temperature: float = 1.0, hard_weight: float = 0.0):
    """Mean over the tokens whose ``target`` is not ``IGNORE_INDEX`` of the per-token divergence between the
    tempered softmaxes (summed over the vocabulary), plus ``hard_weight`` times the cross-entropy of the untempered
    student logits against ``target``. Logits [N, V], target [N]; the teacher's logits are treated as constants."""
    import torch
    import torch.nn.functional as F

    teacher_logits = teacher_logits.detach()
    ls = F.log_softmax(student_logits / temperature, dim=-1)
    lt = F.log_softmax(teacher_logits / temperature, dim=-1)
    if divergence == "jsd" and beta == 0.0:  # TRL's special cases
        divergence = "forward_kl"
    elif divergence == "jsd" and beta == 1.0:
        divergence = "reverse_kl"
    if divergence == "forward_kl":  # KL(teacher || student)
        per_token = F.kl_div(ls, lt, reduction="none", log_target=True).sum(-1)
    elif divergence == "reverse_kl":  # KL(student || teacher)
        per_token = F.kl_div(lt, ls, reduction="none", log_target=True).sum(-1)
    else:  # TRL's generalized_jsd_loss: M = (1 - beta) p_s + beta p_t
        mixture = torch.logsumexp(torch.stack([ls + math.log(1 - beta), lt + math.log(beta)]), dim=0)
        per_token = (beta * F.kl_div(mixture, lt, reduction="none", log_target=True)
                     + (1 - beta) * F.kl_div(mixture, ls, reduction="none", log_target=True)).sum(-1)
    valid = target != IGNORE_INDEX
    loss = (per_token * valid).sum() / valid.sum()
    if hard_weight:
        loss = loss + hard_weight * F.cross_entropy(student_logits, target, ignore_index=IGNORE_INDEX)
    return loss


def next_token_targets(batch):
    """Position i predicts token i + 1; the last position of each window has none (IGNORE_INDEX)."""
    import torch

    target = torch.full_like(batch, IGNORE_INDEX)
    target[:, :-1] = batch[:, 1:]
    return target


# ----------------------------------------------------------------------------------------------------------------
# Workers (child processes)
# ----------------------------------------------------------------------------------------------------------------

def teacher_config(args: argparse.Namespace) -> argparse.Namespace:
    """The teacher's model and schedule settings, in the names train_tiny_lm's build_model / lr_at read."""
    return argparse.Namespace(hidden=args.teacher_hidden, layers=args.teacher_layers, heads=args.teacher_heads,
                              intermediate=args.teacher_intermediate, seq_len=args.seq_len,
                              steps=args.teacher_steps, lr=args.teacher_lr)


def load_windows(args: argparse.Namespace):
    import torch

    data = torch.load(args.tokens)
    ids = data["ids"]
    return ids[: len(ids) // args.seq_len * args.seq_len].view(-1, args.seq_len), data["vocab_size"]


def batches(windows, args: argparse.Namespace, steps: int, seed: int):
    """``steps`` batches of ``--batch-size`` windows, reshuffled each epoch, from a seeded generator."""
    import torch

    order = torch.Generator().manual_seed(seed)
    perm, cursor = torch.randperm(len(windows), generator=order), 0
    for _ in range(steps):
        if cursor + args.batch_size > len(perm):
            perm, cursor = torch.randperm(len(windows), generator=order), 0
        yield windows[perm[cursor: cursor + args.batch_size]]
        cursor += args.batch_size


def make_optimizer(model, lr: float):
    import torch

    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    for p in model.parameters():  # gradients allocated up front (and kept: zero_grad(set_to_none=False))
        p.grad = torch.zeros_like(p)
    return optimizer


def train_step(model, optimizer, loss, lr: float) -> float:
    import torch

    for group in optimizer.param_groups:
        group["lr"] = lr
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=False)
    return loss.item()


def run_teacher(args: argparse.Namespace) -> dict:
    """Train the teacher with transformers' own loss; save its weights to --teacher-path."""
    import torch

    windows, vocab_size = load_windows(args)
    cfg = teacher_config(args)
    torch.manual_seed(args.seed + 1)  # the teacher's own initial weights
    teacher = base.build_model(cfg, vocab_size)
    teacher.train()
    optimizer = make_optimizer(teacher, cfg.lr)
    losses = []
    t0 = time.perf_counter()
    for step, batch in enumerate(batches(windows, args, cfg.steps, args.seed + 1)):
        loss = teacher(input_ids=batch, labels=batch).loss
        losses.append(train_step(teacher, optimizer, loss, base.lr_at(step, cfg)))
    wall = time.perf_counter() - t0
    torch.save(teacher.state_dict(), args.teacher_path)
    return {"run": "teacher", "losses": losses, "wall_s": wall,
            "n_params": sum(p.numel() for p in teacher.parameters())}


def run_student(args: argparse.Namespace) -> dict:
    """Distil the student from the saved teacher with the torch composite or with fastloss."""
    import torch

    windows, vocab_size = load_windows(args)
    teacher = base.build_model(teacher_config(args), vocab_size)
    teacher.load_state_dict(torch.load(args.teacher_path))
    teacher.eval().requires_grad_(False)

    torch.manual_seed(args.seed)  # same initial student weights in both runs
    student = base.build_model(args, vocab_size)
    student.train()
    optimizer = make_optimizer(student, args.lr)
    base_mib = base.peak_rss_mib()  # both models + gradients + optimizer; AdamW's moments appear at the first step

    opts = dict(divergence=args.divergence, beta=args.beta, temperature=args.temperature,
                hard_weight=args.hard_weight)
    if args.worker == "fastloss":
        import fastloss

    losses: list[float] = []
    t0 = time.perf_counter()
    for step, batch in enumerate(batches(windows, args, args.steps, args.seed)):
        target = next_token_targets(batch)
        with torch.no_grad():
            teacher_hidden = teacher.model(input_ids=batch).last_hidden_state
        hidden = student.model(input_ids=batch).last_hidden_state
        if args.worker == "torch":
            # What a plain training loop does: both heads' logits in full, then the composite.
            logits = student.lm_head(hidden)
            with torch.no_grad():
                teacher_logits = teacher.lm_head(teacher_hidden)
            loss = torch_distillation_loss(logits.flatten(0, 1), teacher_logits.flatten(0, 1), target.flatten(),
                                           **opts)
        elif args.fastloss_op == "linear":
            # (batch, seq, D) hidden states and (batch, seq) targets: any leading shape is accepted.
            loss = fastloss.linear_distillation_loss(hidden, student.lm_head.weight, teacher_hidden,
                                                     teacher.lm_head.weight, target=target,
                                                     ignore_index=IGNORE_INDEX, chunk_size=args.chunk_size, **opts)
        else:
            with torch.no_grad():
                teacher_logits = teacher.lm_head(teacher_hidden)
            loss = fastloss.distillation_loss(student.lm_head(hidden), teacher_logits, target=target,
                                              ignore_index=IGNORE_INDEX, **opts)
        losses.append(train_step(student, optimizer, loss, base.lr_at(step, args)))
    wall = time.perf_counter() - t0

    n_params = sum(p.numel() for p in student.parameters())
    peak = base.peak_rss_mib()
    return {"run": args.worker, "losses": losses, "wall_s": wall, "peak_mib": peak,
            "extra_mib": None if peak is None or base_mib is None else peak - base_mib,
            "adamw_moments_mib": 2 * n_params * 4 / 2**20, "n_params": n_params,
            "teacher_params": sum(p.numel() for p in teacher.parameters()), "vocab_size": vocab_size}


def run_worker(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    result = run_teacher(args) if args.worker == "teacher" else run_student(args)
    pathlib.Path(args.result).write_text(json.dumps(result))


# ----------------------------------------------------------------------------------------------------------------
# Parent: prepare data, run the workers, report
# ----------------------------------------------------------------------------------------------------------------

def spawn_worker(run: str, argv: list[str], tokens: pathlib.Path, workdir: pathlib.Path) -> dict:
    result = workdir / f"{run}.json"
    cmd = [sys.executable, os.path.abspath(__file__), *argv, "--worker", run, "--tokens", str(tokens),
           "--result", str(result), "--teacher-path", str(workdir / "teacher.pt")]
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(cmd, check=False, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0 or not result.exists():
        sys.stdout.write(proc.stdout)
        raise SystemExit(f"error: the {run} run failed (exit status {proc.returncode})")
    return json.loads(result.read_text())


def loss_description(args: argparse.Namespace) -> str:
    div = {"forward_kl": "forward KL(teacher || student)", "reverse_kl": "reverse KL(student || teacher)",
           "jsd": f"generalized JSD (beta {args.beta})"}[args.divergence]
    hard = f" + {args.hard_weight} x CE(next token)" if args.hard_weight else ""
    return f"{div} at T={args.temperature}{hard}, mean over the tokens that have a next token"


def check_fastloss(args: argparse.Namespace) -> None:
    import fastloss

    name = "linear_distillation_loss" if args.fastloss_op == "linear" else "distillation_loss"
    if not hasattr(fastloss, name):
        raise SystemExit(f"error: the installed fastloss ({getattr(fastloss, '__version__', '?')}) has no "
                         f"fastloss.{name}; this example needs a fastloss with issue #14's distillation losses")


def run_parent(args: argparse.Namespace, argv: list[str]) -> int:
    check_fastloss(args)
    cache_dir = pathlib.Path(args.cache_dir).expanduser()
    tokenizer, source = base.load_or_train_tokenizer(args.vocab_size, cache_dir)
    ids = base.tokenize_prose(tokenizer)
    vocab = tokenizer.get_vocab_size()
    if len(ids) // args.seq_len < args.batch_size:
        raise SystemExit(f"error: the corpus has {len(ids)} tokens, fewer than one batch of {args.batch_size} x "
                         f"{args.seq_len}; lower --batch-size or --seq-len")
    t = teacher_config(args)
    n_tok = args.batch_size * args.seq_len
    print(f"tokenizer : byte-level BPE, {vocab} entries ({source})")
    print(f"corpus    : pydoc_data.topics, {len(ids)} tokens = {len(ids) // args.seq_len} windows of {args.seq_len}")
    print(f"teacher   : LlamaForCausalLM hidden={t.hidden} layers={t.layers} heads={t.heads} vocab={vocab}, "
          f"{t.steps} steps of transformers' loss, AdamW lr={t.lr}")
    print(f"student   : LlamaForCausalLM hidden={args.hidden} layers={args.layers} heads={args.heads} vocab={vocab}, "
          f"{args.steps} steps, AdamW lr={args.lr} (warm-up + cosine), seed {args.seed}, {args.threads} threads")
    print(f"loss      : {loss_description(args)}")
    op = ("fastloss.linear_distillation_loss on the hidden states and both heads' weights (chunk_size="
          f"{args.chunk_size}): no logits" if args.fastloss_op == "linear"
          else "fastloss.distillation_loss on the logits")
    print(f"logits    : torch builds two {n_tok} x {vocab} float32 logits per step "
          f"({2 * n_tok * vocab * 4 / 2**20:.0f} MiB) and the composite's N x V intermediates; {op}")

    results = base.run_workers(WORKERS, ids, vocab, "fastloss-distill-", lambda run, tokens, workdir: spawn_worker(
        run, argv, tokens, workdir))
    tl = results["teacher"]["losses"]
    print(f"\nteacher: {len(tl)} steps, loss {tl[0]:.4f} -> {tl[-1]:.4f} ({results['teacher']['wall_s']:.1f} s, "
          f"{results['teacher']['n_params'] / 1e6:.2f} M parameters; student "
          f"{results['torch']['n_params'] / 1e6:.2f} M)")
    return base.compare_runs(results, args, f"tiny Llama distillation, V={vocab}: torch vs fastloss loss",
                             loop="the distillation loop", setup="teacher + student + gradients + optimizer creation")


def unit_float(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be positive and finite, got {text}")
    return value


def parse_args(argv: list[str]) -> argparse.Namespace:
    pos = base.positive_int
    p = argparse.ArgumentParser(description="Train a tiny Llama teacher on the CPU, then distil a smaller student "
                                "from it with plain PyTorch and with fastloss from the same seed; compare loss "
                                "curves, time and peak memory.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--steps", type=pos, default=20, help="student optimizer steps per run")
    p.add_argument("--batch-size", type=pos, default=4, help="sequences per step")
    p.add_argument("--seq-len", type=pos, default=64, help="tokens per sequence")
    p.add_argument("--vocab-size", type=pos, default=32768, help=f"BPE vocabulary size (at least {base.MIN_VOCAB})")
    p.add_argument("--hidden", type=pos, default=64, help="student width")
    p.add_argument("--layers", type=pos, default=1, help="student decoder layers")
    p.add_argument("--heads", type=pos, default=2, help="student attention heads")
    p.add_argument("--intermediate", type=pos, default=None, help="student MLP width (default: 2 x hidden)")
    p.add_argument("--lr", type=float, default=2e-3, help="student peak AdamW learning rate")
    p.add_argument("--teacher-hidden", type=pos, default=128, help="teacher width")
    p.add_argument("--teacher-layers", type=pos, default=2, help="teacher decoder layers")
    p.add_argument("--teacher-heads", type=pos, default=4, help="teacher attention heads")
    p.add_argument("--teacher-intermediate", type=pos, default=None, help="teacher MLP width (default: 2 x width)")
    p.add_argument("--teacher-steps", type=pos, default=30, help="teacher training steps (transformers' loss)")
    p.add_argument("--teacher-lr", type=float, default=2e-3, help="teacher peak AdamW learning rate")
    p.add_argument("--divergence", choices=DIVERGENCES, default="forward_kl",
                   help="forward_kl = KL(teacher || student), reverse_kl = KL(student || teacher), jsd = GKD's")
    p.add_argument("--beta", type=unit_float, default=0.5, help="JSD mixture weight of the teacher (GKD's beta)")
    p.add_argument("--temperature", type=positive_float, default=2.0, help="softmax temperature of both models")
    p.add_argument("--hard-weight", type=float, default=0.5,
                   help="weight of the cross-entropy of the (untempered) student against the next token")
    p.add_argument("--fastloss-op", choices=("linear", "logits"), default="linear",
                   help="fastloss run: linear_distillation_loss on hidden states (no logits) or distillation_loss "
                        "on the logits")
    p.add_argument("--chunk-size", type=base.chunk_size_arg, default="auto",
                   help="fastloss linear run: tokens per chunk, or 'auto'")
    base.add_run_arguments(p, WORKERS, DEFAULT_TOLERANCE)
    p.add_argument("--teacher-path", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.vocab_size < base.MIN_VOCAB:
        p.error(f"--vocab-size must be at least {base.MIN_VOCAB} (the point is a realistic LM-head size)")
    for prefix, hidden, heads in (("", args.hidden, args.heads), ("teacher-", args.teacher_hidden, args.teacher_heads)):
        if hidden % heads:
            p.error(f"--{prefix}hidden ({hidden}) must be a multiple of --{prefix}heads ({heads})")
    return args


def main(argv: list[str] | None = None) -> int:
    return base.run_main(argv, parse_args, run_worker, run_parent)


if __name__ == "__main__":
    sys.exit(main())

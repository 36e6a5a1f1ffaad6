"""Train a tiny Llama twice on the CPU -- once with transformers' own loss, once with fastloss -- and compare.

What it shows
-------------
``fastloss.integrations.transformers.patch(model)`` makes a Hugging Face causal LM compute its training loss with
``fastloss.linear_cross_entropy`` on the final hidden states: the (tokens x vocabulary) logits are computed a chunk
of tokens at a time, each chunk turned in place into its gradient, and none is kept for the backward. This script
trains the same small ``LlamaForCausalLM`` (32K-token vocabulary, where the LM head and its logits are most of the
memory) twice from the same seed, with the same initial weights and the same batches:

* ``torch``:    the unmodified model; ``model(input_ids=..., labels=...)`` builds the full logits and runs
                ``F.cross_entropy`` on them (transformers' ``ForCausalLMLoss``);
* ``fastloss``: the same model after ``patch(model)``.

Each run happens in its own child process (this script re-run with a hidden ``--worker`` flag), so its peak memory
(``VmHWM`` in ``/proc/self/status``, Linux) is its own. The parent prints both loss curves side by side, the final
losses, the wall time and peak memory of each run, the largest difference between the curves, and PASS / FAIL
against ``--tolerance`` (exit status 1 on FAIL).

Why the curves are close but not bit-identical
----------------------------------------------
Both runs compute the same mathematical loss and gradients, but in a different float32 summation order: fastloss
reduces each vocabulary row in its own kernels (online log-sum-exp) and computes the LM head's gradients chunk by
chunk inside the forward, while torch reduces the full logits with its own kernels and GEMM blocking. So the losses
differ by float32 rounding, and every optimizer step feeds slightly different rounding into the weights, which
could make the difference grow with training. The default tolerance, max |diff| <= 1e-3 over the whole curve, was
chosen from measurement: on this project's 2-core CPU the observed max difference was 1.9e-6 (two float32 ulps
of a loss near 8) over 8- to 40-step runs of the default model, so 1e-3 leaves over two orders of magnitude for
longer runs, other seeds and other thread counts, while real discrepancies exceed it: with the labels left
unshifted (an off-by-one) the first loss of a hidden-64 version of this model already moved by 1e-2, and a sum in
place of a mean multiplies it by the token count.

Data, offline
-------------
Nothing is downloaded. The tokenizer is a byte-level BPE (``tokenizers``; ``--vocab-size`` 32768 by default, at
least 30000 entries enforced) trained on text shipped with Python: the help topics of ``pydoc_data.topics`` plus
the sources of the standard library's ``.py`` files (without its tests). It is cached as JSON in ``--cache-dir``
(default ``~/.cache/fastloss/``), keyed by vocabulary size and a hash of the corpus, so a second run skips the
training (a few seconds). The language model is trained on the English prose of ``pydoc_data.topics`` only.

Cross-entropy against the spherical Z-loss (``--z-loss A,B``)
------------------------------------------------------------
With ``--z-loss A,B`` the two runs are a different comparison: ``fastloss`` (the cross-entropy, through
``patch(model)`` as above) against ``zloss``, the same model trained from the same seed on the same batches with
``fastloss.linear_spherical_loss(hidden, lm_head.weight, next_tokens, loss="z", a=A, b=B)`` -- de Brebisson &
Vincent's spherical Z-loss, computed from the final hidden states and the head without any logits. A tenth of the
windows (at least one batch) is held out; after training both models are evaluated on it with full logits: mean
cross-entropy of the next token (the perplexity's logarithm) and top-1 / top-5 accuracy. The report gives those,
the time per step and the peak memory; it checks no tolerance (the objectives differ) and exits 0.

Run it
------
::

    python examples/train_tiny_lm.py                        # defaults: under a minute per run on 2 CPU cores
    python examples/train_tiny_lm.py --steps 200 --plot curves.png
    python examples/train_tiny_lm.py --z-loss 1,6 --steps 200   # cross-entropy vs the spherical Z-loss
    python examples/train_tiny_lm.py --help

Needs torch, fastloss, transformers and tokenizers; ``--plot`` also needs matplotlib (optional).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import pathlib
import subprocess
import sys
import sysconfig
import tempfile
import time

MIN_VOCAB = 30000
EOS_TOKEN = "<|endoftext|>"
RUNS = ("torch", "fastloss")
Z_RUNS = ("fastloss", "zloss")  # --z-loss: the cross-entropy (through the patch) against the spherical Z-loss
HELD_OUT_FRACTION = 0.1
# Max |loss_torch - loss_fastloss| over the curve for PASS; see the module docstring for why it is not zero.
DEFAULT_TOLERANCE = 1e-3


# ----------------------------------------------------------------------------------------------------------------
# Corpus and tokenizer (parent process)
# ----------------------------------------------------------------------------------------------------------------

def prose_corpus() -> list[str]:
    """The LM's training text: the help topics shipped with Python (``help('topics')``), in a fixed order."""
    from pydoc_data.topics import topics

    return [topics[key] for key in sorted(topics)]


def stdlib_sources() -> list[str]:
    """Extra tokenizer-training text: the standard library's own ``.py`` sources (tests and IDLE left out)."""
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "test", "tests", "idlelib"}
    texts = []
    for path in sorted(root.rglob("*.py")):
        if skip.intersection(path.relative_to(root).parts):
            continue
        try:
            texts.append(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError):
            continue
    return texts


def corpus_hash(texts: list[str]) -> str:
    h = hashlib.sha256()
    for text in texts:
        h.update(text.encode("utf-8", "surrogatepass"))
        h.update(b"\0")
    return h.hexdigest()[:16]


def load_or_train_tokenizer(vocab_size: int, cache_dir: pathlib.Path):
    """A byte-level BPE with ``vocab_size`` entries, trained once on stdlib text and cached as JSON."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    texts = prose_corpus() + stdlib_sources()
    path = cache_dir / f"bpe-v{vocab_size}-{corpus_hash(texts)}.json"
    if path.exists():
        tokenizer = Tokenizer.from_file(str(path))
        source = f"cached {path}"
    else:
        t0 = time.perf_counter()
        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      special_tokens=[EOS_TOKEN])
        tokenizer.train_from_iterator(texts, trainer)
        source = (f"trained in {time.perf_counter() - t0:.1f} s on {sum(map(len, texts)) / 1e6:.1f} M characters, "
                  f"saved to {path}")
        if tokenizer.get_vocab_size() >= MIN_VOCAB:  # never cache a tokenizer we are about to reject
            cache_dir.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            tokenizer.save(str(tmp))
            os.replace(tmp, path)  # atomic: a concurrent run never reads a half-written file
    got = tokenizer.get_vocab_size()
    if got < MIN_VOCAB:
        raise SystemExit(f"error: the trained BPE has only {got} entries (asked for {vocab_size}); this example "
                         f"needs a real tokenizer with at least {MIN_VOCAB}. The stdlib corpus here is too small "
                         "for that vocabulary.")
    if got < vocab_size:
        print(f"warning: the corpus only supports {got} BPE entries (asked for {vocab_size}); using {got}")
    return tokenizer, source


def tokenize_prose(tokenizer) -> list[int]:
    eos = tokenizer.token_to_id(EOS_TOKEN)
    ids: list[int] = []
    for enc in tokenizer.encode_batch(prose_corpus()):
        ids.extend(enc.ids)
        ids.append(eos)
    return ids


# ----------------------------------------------------------------------------------------------------------------
# Worker (child process): one training run
# ----------------------------------------------------------------------------------------------------------------

def peak_rss_mib() -> float | None:
    """This process's peak resident memory (VmHWM), or None where /proc/self/status does not exist."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def build_model(args: argparse.Namespace, vocab_size: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=args.hidden, intermediate_size=args.intermediate or 2 * args.hidden,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads,
        max_position_embeddings=args.seq_len, tie_word_embeddings=False, use_cache=False,
        attn_implementation="sdpa",
    )
    return LlamaForCausalLM(config)


def lr_at(step: int, args: argparse.Namespace) -> float:
    """Linear warm-up over the first 10% of the steps, then cosine decay to 10% of ``--lr``."""
    warmup = max(1, args.steps // 10)
    if step < warmup:
        return args.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, args.steps - warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def split_windows(windows, args: argparse.Namespace):
    """(training windows, held-out windows): with --z-loss a fixed tenth (at least one batch) is held out for the
    evaluation, chosen by a generator of its own so both runs hold out the same windows; otherwise all train."""
    import torch

    if args.z_loss is None:
        return windows, windows[:0]
    n_out = max(args.batch_size, int(len(windows) * HELD_OUT_FRACTION))
    if len(windows) - n_out < args.batch_size:
        raise SystemExit(f"error: {len(windows)} windows are too few to hold out {n_out} and train on batches of "
                         f"{args.batch_size}; lower --batch-size or --seq-len")
    perm = torch.randperm(len(windows), generator=torch.Generator().manual_seed(12345))
    return windows[perm[n_out:]], windows[perm[:n_out]]


def evaluate(model, windows, batch_size: int) -> dict:
    """Next-token mean cross-entropy and top-1 / top-5 accuracy of the model on ``windows``, with full logits."""
    import torch
    import torch.nn.functional as F

    ce = top1 = top5 = count = 0.0
    model.eval()
    with torch.no_grad():
        for i in range(0, len(windows), batch_size):
            w = windows[i: i + batch_size]
            logits = model(input_ids=w).logits[:, :-1].float()
            labels = w[:, 1:]
            ce += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="sum"))
            best = logits.topk(5, dim=-1).indices
            top1 += float((best[..., 0] == labels).sum())
            top5 += float((best == labels.unsqueeze(-1)).any(-1).sum())
            count += labels.numel()
    model.train()
    return {"eval_ce": ce / count, "eval_top1": top1 / count, "eval_top5": top5 / count, "eval_tokens": int(count)}


def run_worker(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    data = torch.load(args.tokens)
    ids: torch.Tensor = data["ids"]
    vocab_size: int = data["vocab_size"]
    windows, held_out = split_windows(ids[: len(ids) // args.seq_len * args.seq_len].view(-1, args.seq_len), args)

    torch.manual_seed(args.seed)  # same initial weights in both runs
    model = build_model(args, vocab_size)
    if args.worker == "fastloss":
        from fastloss.integrations.transformers import patch

        patch(model, chunk_size=args.chunk_size)
    if args.worker == "zloss":
        import fastloss

        a, b = args.z_loss

        def step_loss(batch):
            # The spherical Z-loss of the next token from the final hidden states and the head: no logits.
            hidden = model.model(input_ids=batch).last_hidden_state[:, :-1]
            return fastloss.linear_spherical_loss(hidden, model.lm_head.weight, batch[:, 1:], loss="z", a=a, b=b)
    else:
        def step_loss(batch):
            return model(input_ids=batch, labels=batch).loss
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    for p in model.parameters():  # gradients allocated up front (and kept: zero_grad(set_to_none=False))
        p.grad = torch.zeros_like(p)
    base_mib = peak_rss_mib()  # model + gradients + optimizer; AdamW's two moments appear at the first step

    order = torch.Generator().manual_seed(args.seed)  # same batches in the same order in both runs
    perm = torch.randperm(len(windows), generator=order)
    cursor = 0
    losses: list[float] = []
    t0 = time.perf_counter()
    for step in range(args.steps):
        if cursor + args.batch_size > len(perm):
            perm, cursor = torch.randperm(len(windows), generator=order), 0
        batch = windows[perm[cursor: cursor + args.batch_size]]
        cursor += args.batch_size
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args)
        loss = step_loss(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)
        losses.append(loss.item())
    wall = time.perf_counter() - t0

    n_params = sum(p.numel() for p in model.parameters())
    peak = peak_rss_mib()
    result = {
        "run": args.worker, "losses": losses, "wall_s": wall, "peak_mib": peak,
        "extra_mib": None if peak is None or base_mib is None else peak - base_mib,
        "adamw_moments_mib": 2 * n_params * 4 / 2**20, "n_params": n_params, "n_windows": len(windows),
        "n_tokens": int(ids.numel()), "vocab_size": vocab_size, "step_s": wall / args.steps,
    }
    if len(held_out):
        result.update(evaluate(model, held_out, args.batch_size))
    pathlib.Path(args.result).write_text(json.dumps(result))


# ----------------------------------------------------------------------------------------------------------------
# Parent: prepare data, run both workers, report
# ----------------------------------------------------------------------------------------------------------------

def spawn_worker(run: str, argv: list[str], tokens: pathlib.Path, workdir: pathlib.Path) -> dict:
    result = workdir / f"{run}.json"
    cmd = [sys.executable, os.path.abspath(__file__), *argv, "--worker", run, "--tokens", str(tokens),
           "--result", str(result)]
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(cmd, check=False, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0 or not result.exists():
        sys.stdout.write(proc.stdout)
        raise SystemExit(f"error: the {run} run failed (exit status {proc.returncode})")
    return json.loads(result.read_text())


def fmt_mib(x: float | None) -> str:
    return "n/a" if x is None else f"{x:8.1f} MiB"


def save_plot(path: str, results: dict[str, dict], title: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"--plot: matplotlib is needed to save a plot (pip install matplotlib); {path} not written")
        return
    fig, (ax, ax_diff) = plt.subplots(2, 1, figsize=(8, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    for run, style in zip(RUNS, ("-", "--")):
        ax.plot(results[run]["losses"], style, label=run)
    ax.set_ylabel("training loss")
    ax.set_title(title)
    ax.legend()
    floor = 1e-9  # a log axis cannot show 0: bit-identical steps are drawn at this floor
    diff = [abs(a - b) for a, b in zip(results["torch"]["losses"], results["fastloss"]["losses"])]
    ax_diff.semilogy([max(d, floor) for d in diff], ".-")
    ax_diff.set_ylabel(f"|diff| (0 at {floor:.0e})")
    ax_diff.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot saved to {path}")


def describe_chunks(chunk_size, n_tokens: int, vocab: int) -> str:
    """How fastloss will chunk the LM head; uses fastloss's own chunk-size rule where it can find it."""
    import torch

    try:
        from fastloss._linear_ce import resolve_chunk_rows  # private: only for this summary line

        rows = resolve_chunk_rows(chunk_size, n_tokens, vocab, torch.float32, torch.device("cpu"))
    except (ImportError, AttributeError, TypeError):
        return f"walks them in chunks (chunk_size={chunk_size}) and keeps none for the backward"
    n_chunks = -(-n_tokens // rows)
    return (f"computes them {rows} rows at a time ({n_chunks} chunk{'s' * (n_chunks > 1)} of "
            f"{rows * vocab * 4 / 2**20:.0f} MiB, chunk_size={chunk_size}), turning each into its gradient in place")


def run_parent(args: argparse.Namespace, argv: list[str]) -> int:
    cache_dir = pathlib.Path(args.cache_dir).expanduser()
    tokenizer, source = load_or_train_tokenizer(args.vocab_size, cache_dir)
    ids = tokenize_prose(tokenizer)
    vocab = tokenizer.get_vocab_size()
    if len(ids) // args.seq_len < args.batch_size:
        raise SystemExit(f"error: the corpus has {len(ids)} tokens, fewer than one batch of {args.batch_size} x "
                         f"{args.seq_len}; lower --batch-size or --seq-len")
    intermediate = args.intermediate or 2 * args.hidden
    print(f"tokenizer : byte-level BPE, {vocab} entries ({source})")
    print(f"corpus    : pydoc_data.topics, {len(ids)} tokens = {len(ids) // args.seq_len} windows of {args.seq_len}")
    print(f"model     : LlamaForCausalLM hidden={args.hidden} layers={args.layers} heads={args.heads} "
          f"intermediate={intermediate} vocab={vocab} (untied LM head), float32")
    print(f"training  : {args.steps} steps, batch {args.batch_size} x {args.seq_len} tokens, AdamW lr={args.lr} "
          f"(warm-up + cosine), seed {args.seed}, {args.threads} threads")
    n_tok = args.batch_size * args.seq_len
    print(f"logits    : torch builds {n_tok} x {vocab} float32 logits per step ({n_tok * vocab * 4 / 2**20:.0f} MiB) "
          f"and keeps their log-softmax for the backward; fastloss {describe_chunks(args.chunk_size, n_tok, vocab)}")

    runs = RUNS if args.z_loss is None else Z_RUNS
    results = run_workers(runs, ids, vocab, "fastloss-tiny-lm-", lambda run, tokens, workdir: spawn_worker(
        run, argv, tokens, workdir))
    if args.z_loss is not None:
        return compare_objectives(results, args)
    return compare_runs(results, args, f"tiny Llama, V={vocab}: torch vs fastloss loss", loop="the training loop",
                        setup="model + gradients + optimizer creation")


def compare_runs(results: dict, args, title: str, loop: str, setup: str) -> int:
    """Print the torch and fastloss loss curves side by side, time and peak memory of every run in RUNS order
    (the results of other runs are ignored), the largest gap; PASS (0) when it is within args.tolerance."""
    a, b = results["torch"]["losses"], results["fastloss"]["losses"]
    diffs = [abs(x - y) for x, y in zip(a, b)]
    print(f"\n{'step':>6} {'torch':>10} {'fastloss':>10} {'|diff|':>10}")
    log_every = args.log_every or max(1, args.steps // 20)
    for i in range(len(a)):
        if i % log_every == 0 or i == len(a) - 1:
            print(f"{i:>6} {a[i]:>10.5f} {b[i]:>10.5f} {diffs[i]:>10.2e}")

    print(f"\n{'run':<9} {'final loss':>10} {'wall':>9} {'peak RSS':>12} {'extra':>12}")
    for run in RUNS:
        r = results[run]
        print(f"{run:<9} {r['losses'][-1]:>10.5f} {r['wall_s']:>8.1f}s {fmt_mib(r['peak_mib']):>12} "
              f"{fmt_mib(r['extra_mib']):>12}")
    moments = results["torch"]["adamw_moments_mib"]
    print(f"(wall: {loop}, without imports and model creation; peak RSS: VmHWM of the run's process; "
          f"extra: peak minus the memory after {setup}, which includes AdamW's "
          f"moments, {moments:.1f} MiB, allocated at the first step in both runs)")
    worst = max(range(len(diffs)), key=diffs.__getitem__)
    print(f"\nfirst-step |diff| = {diffs[0]:.2e}; max |diff| over {len(diffs)} steps = {diffs[worst]:.2e} "
          f"(step {worst}); tolerance {args.tolerance:.0e}")
    if args.plot:
        save_plot(args.plot, results, title)
    ok = all(math.isfinite(x) and math.isfinite(y) for x, y in zip(a, b)) and diffs[worst] <= args.tolerance
    print("PASS" if ok else "FAIL: the curves differ by more than the tolerance")
    return 0 if ok else 1


def compare_objectives(results: dict, args) -> int:
    """--z-loss: both training curves (each in its own objective), then time per step, peak memory and the held-out
    cross-entropy and top-1 / top-5 accuracy of the cross-entropy run and of the Z-loss run."""
    a, b = args.z_loss
    ce, z = results["fastloss"], results["zloss"]
    print(f"\n{'step':>6} {'CE (train)':>11} {'Z-loss (train)':>15}")
    log_every = args.log_every or max(1, args.steps // 20)
    for i in range(len(ce["losses"])):
        if i % log_every == 0 or i == len(ce["losses"]) - 1:
            print(f"{i:>6} {ce['losses'][i]:>11.5f} {z['losses'][i]:>15.5f}")
    print(f"\nheld out: {ce['eval_tokens']} next tokens; both models evaluated with full logits")
    print(f"{'run':<28} {'s/step':>8} {'peak RSS':>12} {'held-out CE':>12} {'top-1':>7} {'top-5':>7}")
    for name, r in (("cross-entropy (fastloss)", ce), (f"Z-loss a={a:g} b={b:g}", z)):
        print(f"{name:<28} {r['step_s']:>8.3f} {fmt_mib(r['peak_mib']):>12} {r['eval_ce']:>12.4f} "
              f"{r['eval_top1']:>7.2%} {r['eval_top5']:>7.2%}")
    ok = all(math.isfinite(x) for r in (ce, z) for x in r["losses"])
    print("done" if ok else "FAIL: a non-finite training loss")
    return 0 if ok else 1


def z_loss_arg(text: str) -> tuple[float, float]:
    try:
        a, b = (float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected A,B (two numbers), got {text!r}") from None
    if not (math.isfinite(a) and a > 0 and math.isfinite(b)):
        raise argparse.ArgumentTypeError(f"the Z-loss needs a finite A > 0 and a finite B, got {text!r}")
    return a, b


def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def chunk_size_arg(text: str):
    return text if text == "auto" else positive_int(text)


def add_run_arguments(p: argparse.ArgumentParser, workers, tolerance: float) -> None:
    """The arguments both examples share (this one and distill_tiny_lm.py): seed, threads, caches, output, the
    pass tolerance, and the internal ones of the child processes."""
    p.add_argument("--seed", type=int, default=0, help="seed for the initial weights and the batch order")
    p.add_argument("--threads", type=positive_int, default=os.cpu_count() or 1, help="torch threads per run")
    p.add_argument("--cache-dir", default=os.path.join("~", ".cache", "fastloss"), help="tokenizer cache")
    p.add_argument("--plot", metavar="PATH", default=None, help="save a PNG of both curves (needs matplotlib)")
    p.add_argument("--log-every", type=positive_int, default=None, help="print every K steps (default: steps/20)")
    p.add_argument("--tolerance", type=float, default=tolerance,
                   help="PASS when max |loss_torch - loss_fastloss| over the curve is at most this")
    # Internal: the child processes.
    p.add_argument("--worker", choices=workers, default=None, help=argparse.SUPPRESS)
    p.add_argument("--tokens", default=None, help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)


def run_workers(runs, ids, vocab: int, prefix: str, spawn) -> dict:
    """Both examples' parent side: the token ids saved once in a scratch folder, then ``spawn(run, tokens_path,
    workdir)`` for each run, one after the other so each has all the threads; their results by run."""
    import torch

    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        workdir = pathlib.Path(tmp)
        tokens = workdir / "tokens.pt"
        torch.save({"ids": torch.tensor(ids, dtype=torch.long), "vocab_size": vocab}, tokens)
        results = {}
        for run in runs:
            print(f"running {run} ...", flush=True)
            results[run] = spawn(run, tokens, workdir)
    return results


def run_main(argv, parse_args, run_worker, run_parent) -> int:
    """Both examples' main: a child process runs one worker, the parent runs the comparison."""
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.worker is not None:
        run_worker(args)
        return 0
    return run_parent(args, argv)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Train a tiny Llama on the CPU with transformers' loss and with "
                                "fastloss from the same seed; compare loss curves, time and peak memory.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--steps", type=positive_int, default=30, help="optimizer steps per run")
    p.add_argument("--batch-size", type=positive_int, default=8, help="sequences per step")
    p.add_argument("--seq-len", type=positive_int, default=128, help="tokens per sequence")
    p.add_argument("--vocab-size", type=positive_int, default=32768,
                   help=f"BPE vocabulary size (at least {MIN_VOCAB})")
    p.add_argument("--hidden", type=positive_int, default=256, help="model width")
    p.add_argument("--layers", type=positive_int, default=2, help="decoder layers")
    p.add_argument("--heads", type=positive_int, default=4, help="attention heads")
    p.add_argument("--intermediate", type=positive_int, default=None, help="MLP width (default: 2 x hidden)")
    p.add_argument("--lr", type=float, default=1e-3, help="peak AdamW learning rate")
    p.add_argument("--chunk-size", type=chunk_size_arg, default="auto",
                   help="fastloss run: tokens per chunk of logits, or 'auto' (from fastloss's memory budget)")
    p.add_argument("--z-loss", type=z_loss_arg, default=None, metavar="A,B",
                   help="compare the cross-entropy with the spherical Z-loss softplus(A (B - z)) / A instead of "
                        "torch with fastloss (see the module docstring)")
    add_run_arguments(p, tuple(dict.fromkeys(RUNS + Z_RUNS)), DEFAULT_TOLERANCE)
    args = p.parse_args(argv)
    if args.vocab_size < MIN_VOCAB:
        p.error(f"--vocab-size must be at least {MIN_VOCAB} (the point is a realistic LM-head size)")
    if args.hidden % args.heads:
        p.error(f"--hidden ({args.hidden}) must be a multiple of --heads ({args.heads})")
    return args


def main(argv: list[str] | None = None) -> int:
    return run_main(argv, parse_args, run_worker, run_parent)


if __name__ == "__main__":
    sys.exit(main())

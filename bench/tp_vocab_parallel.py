"""Vocabulary-parallel losses on DTensor logits: fastloss vs PyTorch's own tensor-parallel path.

Logits (N, V) sharded along the vocabulary (``Shard(1)``, what ColwiseParallel on the head gives) over gloo
processes on this machine's CPU; median of the repeats (after one warm-up), every rank timing its own calls
between barriers; bytes per token: what each rank hands to collectives (the payloads of all-reduce / all-gather
calls, torch.distributed's and the functional collectives DTensor uses, forward and backward), divided by N.

--op ce: forward + backward of the mean cross-entropy; fastloss.cross_entropy vs ``loss_parallel()`` +
``F.cross_entropy``.
--op logprobs: an RL policy's terms -- log p(token) and the entropy of softmax(logits / T), T = 0.7 -- forward
and backward of sum(a * logp) + sum(b * entropy); fastloss.token_logprobs vs the same with DTensor ops under
``loss_parallel()``: logp = -F.cross_entropy(z, tokens, reduction="none"), entropy = -(exp(l) * l).sum(-1) with
l = F.log_softmax(z, -1) (both vocabulary-parallel there), z = logits / T.

    python bench/tp_vocab_parallel.py --tokens 4096 --vocab 32768 --world 2 [--dtype float32] [--op ce] [--out F]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

class _CollectiveBytes:
    """Sums the input payload (bytes) of every collective called while active -- torch.distributed's and the
    functional collectives DTensor and loss_parallel use -- and counts the calls."""

    DIST = {"all_reduce": 0, "all_gather_single": 1, "all_gather_into_tensor": 1, "reduce_scatter_tensor": 1}
    FUNCOL = {"all_reduce": 0, "all_gather_tensor": 0, "reduce_scatter_tensor": 0, "all_to_all_single": 0}

    def __init__(self):
        self.bytes = 0
        self.calls = 0

    def _wrap(self, fn, pos):
        def counting(*args, **kwargs):
            t = args[pos]
            self.bytes += t.numel() * t.element_size()
            self.calls += 1
            return fn(*args, **kwargs)
        return counting

    def __enter__(self):
        import torch.distributed._functional_collectives as funcol

        self.saved = []
        for mod, table in ((dist, self.DIST), (funcol, self.FUNCOL)):
            for name, pos in table.items():
                if hasattr(mod, name):
                    fn = getattr(mod, name)
                    self.saved.append((mod, name, fn))
                    setattr(mod, name, self._wrap(fn, pos))
        return self

    def __exit__(self, *exc):
        for mod, name, fn in self.saved:
            setattr(mod, name, fn)


TEMPERATURE = 0.7


def _run(op, impl, dx, t, a=None, b=None):
    import fastloss
    from torch.distributed.tensor.parallel import loss_parallel

    if op == "ce":
        if impl == "fastloss":
            loss = fastloss.cross_entropy(dx, t)
            loss.backward()
        else:
            with loss_parallel():
                loss = F.cross_entropy(dx, t)
                loss.backward()
        return loss
    if impl == "fastloss":
        lp, ent = fastloss.token_logprobs(dx, t, temperature=TEMPERATURE, return_entropy=True)
        loss = (lp * a).sum() + (ent * b).sum()
        loss.backward()
        return loss
    with loss_parallel():
        z = dx / TEMPERATURE
        lp = -F.cross_entropy(z, t, reduction="none").float()
        logp = F.log_softmax(z, -1)
        ent = -(logp.exp() * logp).sum(-1).float()
        loss = (lp * a).sum() + (ent * b).sum()
        loss.backward()
    return loss


def _truth(op, logits, t, a, b, rows=256):
    """The objective in float64 on the full logits (row chunks): what both implementations approximate."""
    total = 0.0
    n = 0
    for s in range(0, logits.shape[0], rows):
        x = logits[s:s + rows].double()
        tc = t[s:s + rows]
        if op == "ce":
            keep = tc != -100
            total += F.cross_entropy(x[keep], tc[keep], reduction="sum").item()
            n += int(keep.sum())
        else:
            logp = torch.log_softmax(x / TEMPERATURE, -1)
            lp = logp.gather(1, tc[:, None]).squeeze(1)
            ent = -(logp.exp() * logp).sum(-1)
            total += ((lp * a[s:s + rows].double()).sum() + (ent * b[s:s + rows].double()).sum()).item()
    return total / n if op == "ce" else total


def _worker(rank, world, init_file, args, q):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        import fastloss  # noqa: F401
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Shard, distribute_tensor

        torch.set_num_threads(args.threads)
        mesh = init_device_mesh("cpu", (world,))
        dtype = getattr(torch, args.dtype)
        g = torch.Generator().manual_seed(0)
        logits = torch.randn(args.tokens, args.vocab, generator=g).mul_(3).to(dtype)
        t = torch.randint(0, args.vocab, (args.tokens,), generator=g)
        if args.op == "ce":
            t[::7] = -100
        from torch.distributed.tensor import Replicate

        a = distribute_tensor(torch.rand(args.tokens, generator=g), mesh, [Replicate()])
        b = distribute_tensor(torch.rand(args.tokens, generator=g) - 0.5, mesh, [Replicate()])
        res = {}
        losses = {}
        for impl in args.impls:
            dx = distribute_tensor(logits, mesh, [Shard(1)]).requires_grad_()
            mode = _CollectiveBytes()
            with mode:
                loss = _run(args.op, impl, dx, t, a, b)
            losses[impl] = loss.full_tensor().double().item()
            times = []
            for _ in range(args.repeats):
                dx.grad = None
                dist.barrier()
                t0 = time.perf_counter()
                _run(args.op, impl, dx, t, a, b)
                times.append(time.perf_counter() - t0)
            res[impl] = dict(ms=1e3 * statistics.median(times), bytes_per_token=mode.bytes / args.tokens,
                             collectives=mode.calls)
            del dx
        if rank == 0:
            losses["float64"] = _truth(args.op, logits, t, a.to_local(), b.to_local())
            q.put((res, losses))
    finally:
        dist.destroy_process_group()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--impls", default="fastloss,loss_parallel")
    p.add_argument("--op", choices=["ce", "logprobs"], default="ce")
    p.add_argument("--out", default=None, help="also write the markdown table here")
    args = p.parse_args(argv)
    args.impls = args.impls.split(",")
    ctx = mp.get_context("spawn")
    q = ctx.SimpleQueue()
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_worker, args=(args.world, os.path.join(d, "init"), args, q), nprocs=args.world, join=True)
    res, losses = q.get()
    what = "the mean loss" if args.op == "ce" else f"sum(a logp) + sum(b entropy), T = {TEMPERATURE}"
    lines = [f"{args.op}: N={args.tokens} V={args.vocab} {args.dtype}, logits Shard(1) over {args.world} gloo "
             f"processes ({args.threads} thread each), forward + backward of {what}, median of {args.repeats}",
             "", "| implementation | ms | bytes / token sent to collectives | collectives | loss |",
             "|---|---:|---:|---:|---:|"]
    for impl in args.impls:
        r = res[impl]
        lines.append(f"| {impl} | {r['ms']:.1f} | {r['bytes_per_token']:.1f} | {r['collectives']} | "
                     f"{losses[impl]:.10f} |")
    if "fastloss" in res and "loss_parallel" in res:
        lines += ["", f"speed-up: {res['loss_parallel']['ms'] / res['fastloss']['ms']:.2f}x; loss difference "
                  f"{abs(losses['fastloss'] - losses['loss_parallel']):.2e}"]
    truth = losses["float64"]
    lines += ["", f"float64 objective on the full logits: {truth:.10f}; relative error "
              + ", ".join(f"{impl} {abs(losses[impl] - truth) / abs(truth):.2e}" for impl in args.impls)]
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

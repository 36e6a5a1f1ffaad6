"""Running a test's worker on gloo processes (mp.spawn), for every multi-process test: one place for the process
group's set-up and teardown.

``spawn(fn, world, *args)`` runs ``fn(rank, world, *args)`` on ``world`` processes, each in a gloo process group
(file rendezvous in a temporary directory) with one torch thread. After fn returns, every rank meets at a barrier
(all done with every collective) before any tears its group down, and then leaves with os._exit(0): the
interpreter's teardown with gloo's threads still around has aborted a process that had passed every check
("terminate called without an active exception", SIGABRT; seen in about 1 of 10 runs of tests/test_dtensor.py
under pytest, 2026-12-02). A process killed by that signal is retried once; a failed check (a Python exception in
any rank) is never retried.
"""

import os
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _run(rank, fn, world, init_file, args):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        fn(rank, world, *args)  # raises on a failed check: mp.spawn reports it
        dist.barrier()
    finally:
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def spawn(fn, world, *args):
    """fn(rank, world, *args) on `world` gloo processes."""
    for attempt in (1, 2):
        with tempfile.TemporaryDirectory() as d:
            try:
                mp.spawn(_run, args=(fn, world, os.path.join(d, "init"), args), nprocs=world, join=True)
                return
            except mp.ProcessExitedException as e:
                if attempt == 2 or e.signal_name != "SIGABRT":
                    raise
                print(f"gloo workers: process {e.error_index} aborted ({e.signal_name}); retrying once",
                      file=sys.stderr)

"""The CPU goals of the linear losses, side by side in one run: by default the linear cross-entropy issue's, N=4096,
D=1024, V=65536, fp32, forward+backward, 2 threads. Each implementation runs in its own process (so peak memory is
its own), rounds alternate implementations (so drift on a shared machine hits all of them), and every process times
--calls calls.

    python bench/linear_ce_cpu_goal.py [--rounds 2] [--calls 2] [--n 4096 --d 1024 --v 65536] [--modes a,b]

The spherical Z-loss issue's goal (#25: the linear Z-loss >= 10x faster than fastloss.linear_cross_entropy, extra
peak memory no more than the gradient of W):

    python bench/linear_ce_cpu_goal.py --modes fastloss-z,fastloss --n 16384 --d 1024 --v 131072 --rounds 1 --calls 1

Prints one line per process: times (s), loss, and extra peak memory beyond inputs and gradients (VmHWM).
Implementations: naive (h @ W.T then F.cross_entropy), torch-chunked (F.linear_cross_entropy with
LinearCrossEntropyOptions()), fastloss (fastloss.linear_cross_entropy, default chunking), fastloss-z
(fastloss.linear_spherical_loss, the spherical Z-loss with a=1, b=6: no logits).
"""

import argparse
import subprocess
import sys
import time

import torch
import torch.nn.functional as F


def _hwm_mib() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def child(mode: str, n: int, d: int, v: int, calls: int) -> None:
    import fastloss

    torch.set_num_threads(2)
    g = torch.Generator().manual_seed(0)
    h = torch.randn(n, d, generator=g).requires_grad_()
    w = torch.randn(v, d, generator=g).mul_(2 / d**0.5).requires_grad_()  # logits with std 2
    t = torch.randint(0, v, (n,), generator=g)

    def run():
        if mode == "naive":
            loss = F.cross_entropy(h @ w.t(), t)
        elif mode == "torch-chunked":
            loss = F.linear_cross_entropy(h, w, t, options=torch.nn.LinearCrossEntropyOptions())
        elif mode == "fastloss-z":
            loss = fastloss.linear_spherical_loss(h, w, t, loss="z", a=1.0, b=6.0)
        else:
            loss = fastloss.linear_cross_entropy(h, w, t)
        loss.backward()
        return loss

    base = _hwm_mib()
    times = []
    for _ in range(calls):
        h.grad = w.grad = None
        t0 = time.perf_counter()
        loss = run()
        times.append(time.perf_counter() - t0)
    grads_mib = (n * d + v * d) * 4 / 2**20
    print(f"{mode:14s} times {[round(x, 2) for x in times]} s  loss {loss.item():.6f}  "
          f"extra peak {_hwm_mib() - base - grads_mib:.0f} MiB", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--calls", type=int, default=2)
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--d", type=int, default=1024)
    ap.add_argument("--v", type=int, default=65536)
    ap.add_argument("--modes", default="naive,fastloss,torch-chunked",
                    help="comma list of naive, fastloss, torch-chunked, fastloss-z")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        child(a.child, a.n, a.d, a.v, a.calls)
        return
    print(f"torch {torch.__version__}, N={a.n} D={a.d} V={a.v} fp32, forward+backward, 2 threads")
    for _ in range(a.rounds):
        for mode in a.modes.split(","):
            subprocess.run([sys.executable, __file__, "--child", mode, "--n", str(a.n), "--d", str(a.d),
                            "--v", str(a.v), "--calls", str(a.calls)], check=True)


if __name__ == "__main__":
    main()

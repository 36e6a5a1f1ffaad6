"""Turns a :class:`~fastloss.bench.results.RunReport` into a terminal table, Markdown, JSON and a plot.

The text table and the Markdown table show the same columns; skipped and failed implementations stay in the table
with their reason, so a missing peer is visible rather than absent.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from typing import Callable, Optional

from .results import Result, RunReport


def _num(fmt: str, value: Optional[float], suffix: str = "") -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:{fmt}}{suffix}"


def _sig(value: Optional[float], suffix: str = "") -> str:
    """At least three significant digits, without drowning large numbers in decimals (0.00123, 1.23, 123)."""
    if value is None or math.isnan(value):
        return "-"
    a = abs(value)
    if a >= 100 or a == 0:
        return f"{value:.0f}{suffix}"
    if a >= 1:
        return f"{value:.{3 - len(str(int(a)))}f}{suffix}"
    return f"{value:.3g}{suffix}"


def _status(r: Result) -> str:
    if r.status == "ok":
        return "ok" + (f" ({r.note})" if r.note else "")
    return f"{r.status}: {r.reason}"


COLUMNS: list[tuple[str, str, Callable[[Result], str]]] = [
    ("suite", "<", lambda r: r.suite),
    ("mode", "<", lambda r: r.mode),
    ("impl", "<", lambda r: r.impl),
    ("N", ">", lambda r: str(r.n)),
    ("V", ">", lambda r: str(r.v)),
    ("dtype", "<", lambda r: r.dtype),
    ("time ms", ">", lambda r: _sig(r.time_ms)),
    ("GB/s", ">", lambda r: _sig(r.gbps)),
    ("%copy", ">", lambda r: _num(".0f", r.pct_copy, "%")),
    ("vs eager", ">", lambda r: _num(".2f", r.speedup_vs_eager, "x")),
    ("peak MiB", ">", lambda r: _num(".1f", r.peak_mem_mb)),
    ("rel err", ">", lambda r: _num(".1e", r.rel_err)),
    ("status", "<", _status),
]
"""(header, alignment "<" or ">", formatter) of every column, shared by the text and Markdown tables."""


def _rows(report: RunReport) -> list[list[str]]:
    return [[fmt(r) for _, _, fmt in COLUMNS] for r in report.results]


def _header_lines(report: RunReport) -> list[str]:
    m = report.meta
    cuda = m.get("cuda", {})
    lines = [
        f"fastloss-bench {m.get('date', '')}",
        f"device: {m.get('device_name', '?')} ({', '.join(m.get('devices', []))}); "
        f"torch {m.get('torch_version')}, fastloss {m.get('fastloss_version')}"
        f"{' (CUDA kernels built)' if m.get('fastloss_cuda_built') else ''}; "
        f"CPU threads (torch.get_num_threads): {m.get('threads')}"
        + (f"; CUDA {cuda.get('version')}" if cuda.get("available") else ""),
    ]
    if m.get("complete") is False:
        lines.append(f"INCOMPLETE: written during the run, {m.get('wall_s', '?')} s in; later measurements are missing")
    peers = m.get("peers") or {}
    if peers:
        lines.append("peers: " + ", ".join(f"{k} {v or 'not installed'}" for k, v in peers.items()))
    for key, gbps in report.copy_bandwidth_gbps.items():
        lines.append(f"copy bandwidth {key}: {gbps:.1f} GB/s (dst.copy_(src) into an existing dst, read + write)")
    seen = []
    for r in report.results:
        if r.extras and (r.n, r.v, r.dtype, r.extras) not in seen:
            seen.append((r.n, r.v, r.dtype, r.extras))
            extra = ", ".join(f"{k}={v}" for k, v in sorted(r.extras.items()))
            lines.append(f"problem N={r.n} V={r.v} {r.dtype}: {extra}")
    return lines


def format_table(report: RunReport) -> str:
    """Plain aligned text; a blank line between (problem, suite, mode) groups."""
    headers = [h for h, _, _ in COLUMNS]
    rows = _rows(report)
    widths = [max([len(h)] + [len(row[i]) for row in rows]) for i, h in enumerate(headers)]
    # The status column is last and may be long: do not pad it.
    widths[-1] = len(headers[-1])

    def line(cells: list[str]) -> str:
        out = []
        for (_, align, _), w, c in zip(COLUMNS, widths, cells):
            out.append(f"{c:{align}{w}}")
        return "  ".join(out).rstrip()

    text = _header_lines(report) + ["", line(headers), line(["-" * w for w in widths])]
    prev = None
    for r, row in zip(report.results, rows):
        key = (r.n, r.v, r.dtype, r.device, r.suite, r.mode)
        if prev is not None and key != prev:
            text.append("")
        prev = key
        text.append(line(row))
    return "\n".join(text) + "\n"


def _md_escape(s: str) -> str:
    return s.replace("|", "\\|")


def format_markdown(report: RunReport) -> str:
    headers = [h for h, _, _ in COLUMNS]
    out = ["# fastloss-bench", ""]
    out += [f"- {_md_escape(line)}" for line in _header_lines(report)[1:]]
    out += ["", "| " + " | ".join(headers) + " |",
            "|" + "|".join("---:" if a == ">" else "---" for _, a, _ in COLUMNS) + "|"]
    for row in _rows(report):
        out.append("| " + " | ".join(_md_escape(c) for c in row) + " |")
    return "\n".join(out) + "\n"


def to_json(report: RunReport) -> str:
    return json.dumps(report.to_dict(), indent=1, default=str) + "\n"


def write_plot(report: RunReport, path: str) -> None:
    """Time and peak memory against V, one line per implementation (and dtype), one row per (suite, mode).

    Raises RuntimeError with an install hint when matplotlib is missing (it is the optional ``plot`` extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise RuntimeError("--plot needs matplotlib: pip install 'fastloss[plot]' (or pip install matplotlib)") from e

    groups: dict[tuple[str, str], dict[str, list[Result]]] = defaultdict(lambda: defaultdict(list))
    for r in report.results:
        if r.status == "ok":
            groups[(r.suite, r.mode)][f"{r.impl} [{r.dtype}, {r.device}]"].append(r)
    if not groups:
        raise RuntimeError("--plot: no successful results to plot")
    fig, axes = plt.subplots(len(groups), 2, figsize=(13, 3.6 * len(groups)), squeeze=False)
    for row, ((suite, mode), lines) in enumerate(sorted(groups.items())):
        ax_t, ax_m = axes[row]
        for label, rs in sorted(lines.items()):
            rs = sorted(rs, key=lambda r: (r.v, r.n))
            ax_t.plot([r.v for r in rs], [r.time_ms for r in rs], marker="o", label=label)
            mem = [(r.v, r.peak_mem_mb) for r in rs if r.peak_mem_mb is not None]
            if mem:
                ax_m.plot([m[0] for m in mem], [m[1] for m in mem], marker="o", label=label)
        # Time spans decades: log scale. Memory is often exactly 0 for a lean kernel: linear scale keeps it visible.
        ax_t.set_yscale("log")
        for ax, what in ((ax_t, "time (ms, median)"), (ax_m, "peak memory above inputs (MiB)")):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("V")
            ax.set_ylabel(what)
            ax.set_title(f"{suite} {mode}")
            ax.grid(True, which="both", alpha=0.3)
        ax_t.legend(fontsize=7)
        if ax_m.lines:
            ax_m.legend(fontsize=7)
        else:
            ax_m.text(0.5, 0.5, "no memory data\n(CPU: run with --memory)", ha="center", va="center",
                      transform=ax_m.transAxes)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


"""``fastloss-bench``: command-line arguments and ``main()``.

Examples::

    fastloss-bench                                    # preset "default", softmax/log_softmax/logsumexp, fwd and fwdbwd
    fastloss-bench --preset cpu-goal --suite logsumexp,softmax
    fastloss-bench --suite logsumexp --n 8 --v 64 --repeats 2 --no-compile --json out.json
    fastloss-bench --preset gpu-sweep --json sweep.json --md sweep.md --plot sweep.png
    fastloss-bench --preset gpu-quick --time-budget 120 --json r.json --md r.md   # what bench/gpu_check.sh runs
    fastloss-bench --list                             # suites, implementations and why any would be skipped
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Optional, Sequence

import torch

from . import registry, report
from .problems import PRESET_DEVICE, PRESETS, Problem, make_problem, parse_dtype, preset_options, preset_problems
from .results import RunReport
from .runner import RunConfig, run
from .suites import select_suites


def _int_list(s: str) -> list[int]:
    try:
        out = [int(p) for p in s.split(",") if p.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from e
    if not out or any(x <= 0 for x in out):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {s!r}")
    return out


def _dtype_list(s: str) -> list[torch.dtype]:
    try:
        return [parse_dtype(p) for p in s.split(",") if p.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from e


def _str_list(s: str) -> list[str]:
    return [p.strip() for p in s.split(",") if p.strip()]


def _presets(s: str) -> list[str]:
    names = _str_list(s)
    bad = [n for n in names if n not in PRESETS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown preset {bad or s!r}; expected one of {list(PRESETS)}")
    return names


def _preset_lines() -> str:
    lines = []
    for name, (desc, _) in PRESETS.items():
        lines.append(f"  {name:10s} {desc}")
        opts = preset_options([name])
        if opts:
            lines.append(" " * 13 + "defaults: " + ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in opts.items()))
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    presets = _preset_lines()
    p = argparse.ArgumentParser(
        prog="fastloss-bench",
        description="Microbenchmarks of fastloss against torch eager, torch.compile and peer libraries.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"presets:\n{presets}\n\nWithout --preset, --n or --v the 'default' preset runs. --n/--v/--dtype "
               "given with a preset replace its values; a preset's defaults apply to the options not given.",
    )
    sel = p.add_argument_group("what to run")
    sel.add_argument("--preset", type=_presets, default=None, help="comma list of presets (see below)")
    sel.add_argument("--n", type=_int_list, default=None, help="rows (tokens), comma list")
    sel.add_argument("--v", type=_int_list, default=None, help="row length (vocabulary), comma list")
    sel.add_argument("--dtype", type=_dtype_list, default=None, help="float32, bfloat16, float16, float64; comma list")
    sel.add_argument("--device", choices=["cpu", "cuda"], default=None,
                     help="default: the preset's device, else cuda when available, else cpu")
    sel.add_argument("--hidden", type=int, default=None, help="hidden size D for linear_cross_entropy")
    sel.add_argument("--softcap", type=float, default=None, help="logit softcap for the cross-entropy suites")
    sel.add_argument("--topk", type=int, default=None, help="k for the softmax_topk suite (default 5)")
    sel.add_argument("--suite", default=None,
                     help="comma list of suites, 'default' (softmax,log_softmax,logsumexp) or 'all' (default: the "
                          "preset's suites, else 'default')")
    sel.add_argument("--impl", type=_str_list, default=None,
                     help="only these implementations: comma list of names or shell patterns (fastloss-*)")
    sel.add_argument("--exclude-impl", type=_str_list, default=[], help="skip these (names or patterns)")
    sel.add_argument("--no-compile", action="store_true", help="leave out the torch.compile implementations")
    sel.add_argument("--mode", choices=["fwd", "fwdbwd", "both"], default=None,
                     help="default: the preset's, else both")
    sel.add_argument("--list", action="store_true", help="list suites, implementations and presets, then exit")

    tim = p.add_argument_group("timing")
    tim.add_argument("--repeats", type=int, default=None,
                     help="timed calls per measurement (default: enough for --min-time, at least 3)")
    tim.add_argument("--min-time", type=float, default=None,
                     help="seconds of timed calls per measurement when --repeats is not given "
                          "(default 0.3 on CPU, 0.25 on CUDA)")
    tim.add_argument("--max-repeats", type=int, default=None, help="default: the preset's, else 100")
    tim.add_argument("--warmup", type=int, default=1,
                     help="untimed calls first (torch.compile implementations get one more: the compiling call)")
    tim.add_argument("--threads", type=int, default=None, help="torch.set_num_threads for the CPU")
    tim.add_argument("--no-flush", action="store_true", help="CUDA: do not flush L2 between timed calls")
    tim.add_argument("--memory", action="store_true",
                     help="CPU: measure peak RSS of each implementation in a fresh subprocess (slow); "
                          "on CUDA peak memory is always measured")
    tim.add_argument("--seed", type=int, default=0)
    tim.add_argument("--time-budget", type=float, default=None,
                     help="seconds; measurements not started by then are reported as skipped")

    out = p.add_argument_group("output")
    out.add_argument("--json", metavar="FILE",
                     help="write results as JSON (schema: see fastloss.bench); rewritten after every group of "
                          "measurements, so a run cut short leaves what it measured (meta.complete false)")
    out.add_argument("--md", metavar="FILE", help="write a Markdown table (rewritten like --json)")
    out.add_argument("--plot", metavar="FILE.png", help="plot time and memory against V (needs matplotlib)")
    out.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    out.add_argument("--fail-on-error", action="store_true",
                     help="exit 1 if any implementation ended in status 'error'")
    return p


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_problems(args: argparse.Namespace) -> list[Problem]:
    """Presets and explicit sizes -> the list of problems, in order, without duplicates."""
    extras: dict[str, Any] = {}
    if args.hidden is not None:
        extras["hidden"] = args.hidden
    if args.softcap is not None:
        extras["softcap"] = args.softcap
    if args.topk is not None:
        extras["topk"] = args.topk
    base: list[Problem] = []
    if args.preset or (args.n is None and args.v is None):
        for name in args.preset or ["default"]:
            device = args.device or PRESET_DEVICE.get(name) or _default_device()
            base += preset_problems(name, device)
    else:
        device = args.device or _default_device()
        base = [make_problem(8192 if device == "cuda" else 1024, 32768, torch.float32, device)]
    out: list[Problem] = []
    for p in base:
        for dt in args.dtype or [p.dtype]:
            for v in args.v or [p.v]:
                for n in args.n or [p.n]:
                    q = make_problem(n, v, dt, p.device, suites=p.suites, **{**p.extra, **extras})
                    if q not in out:
                        out.append(q)
    return out


def _list(problems: list[Problem]) -> str:
    lines = []
    probe = problems[0] if problems else make_problem(8, 64, torch.float32, "cpu")
    for suite in select_suites("all"):
        tag = "" if suite.default else "  (not in the default selection)"
        lines.append(f"{suite.name}: {suite.description}{tag}")
        for impl in suite.impls:
            why = registry.skip_reason(impl, probe)
            state = f"skipped on {probe.device}: {why}" if why else "available"
            lines.append(f"  {impl.name:18s} {state}   [{impl.description}]")
    lines.append("presets:")
    lines.append(_preset_lines())
    return "\n".join(lines) + "\n"


def apply_preset_options(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the options left unset (None) from the presets' defaults (``PRESET_OPTIONS``), then the built-in ones."""
    opts = preset_options(args.preset or [])
    if args.suite is None:
        args.suite = opts.get("suite", "default")
    if args.mode is None:
        args.mode = opts.get("mode", "both")
    if args.min_time is None:
        args.min_time = opts.get("min_time")
    if args.max_repeats is None:
        args.max_repeats = opts.get("max_repeats", 100)
    return args


def _write_atomic(path: str, text: str) -> None:
    """Write through a temporary file in the same folder, so a reader (or a kill) never sees half a file."""
    folder, name = os.path.split(os.path.abspath(path))
    tmp = os.path.join(folder, f".{name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _write_reports(result: RunReport, args: argparse.Namespace) -> None:
    if args.json:
        _write_atomic(args.json, report.to_json(result))
    if args.md:
        _write_atomic(args.md, report.format_markdown(result))


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``fastloss-bench`` and ``python -m fastloss.bench``. Returns the exit status."""
    parser = build_parser()
    args = apply_preset_options(parser.parse_args(list(argv) if argv is not None else None))
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        suites = select_suites(args.suite)
        problems = resolve_problems(args)
    except ValueError as e:
        parser.error(str(e))
    if args.list:
        sys.stdout.write(_list(problems))
        return 0
    if any(p.device == "cuda" for p in problems) and not torch.cuda.is_available():
        parser.error("the selected problems run on CUDA, which is not available here "
                     "(pass --device cpu to run them on the CPU)")
    if not any(registry.select_impls(s, args.impl, args.exclude_impl, args.no_compile) for s in suites):
        parser.error(f"no implementation of {[s.name for s in suites]} matches --impl/--exclude-impl/--no-compile")
    if args.repeats is not None and args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if args.max_repeats < 1:
        parser.error("--max-repeats must be at least 1")
    if not any(p.runs(s.name) for p in problems for s in suites):
        parser.error(f"none of the selected problems is meant for the suites {[s.name for s in suites]} "
                     f"(the preset's problems name theirs: {sorted({n for p in problems for n in p.suites})})")

    cfg = RunConfig(
        problems=problems,
        suites=suites,
        modes=("fwd", "fwdbwd") if args.mode == "both" else (args.mode,),
        include=args.impl,
        exclude=args.exclude_impl,
        no_compile=args.no_compile,
        repeats=args.repeats,
        warmup=args.warmup,
        min_time_s=args.min_time,
        max_repeats=args.max_repeats,
        flush_l2=not args.no_flush,
        cpu_memory=args.memory,
        seed=args.seed,
        time_budget_s=args.time_budget,
        argv=["fastloss-bench", *(argv if argv is not None else sys.argv[1:])],
        on_group=(lambda partial: _write_reports(partial, args)) if (args.json or args.md) else None,
    )
    if not args.quiet:
        print(f"fastloss-bench: {len(problems)} problem(s), suites {[s.name for s in suites]}, "
              f"torch threads {torch.get_num_threads()}", file=sys.stderr, flush=True)
    result = run(cfg, progress=(lambda line: None) if args.quiet else None)

    sys.stdout.write(report.format_table(result))
    status = 0
    _write_reports(result, args)
    if args.plot:
        try:
            report.write_plot(result, args.plot)
        except RuntimeError as e:
            print(f"fastloss-bench: error: {e}", file=sys.stderr)
            status = 1
    if args.fail_on_error and any(r.status == "error" for r in result.results):
        status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())

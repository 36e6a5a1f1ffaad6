#!/usr/bin/env python3
"""Static audit of fastloss's compiled CUDA kernels: what their sm_90 machine code says about speed, before any GPU.

    python bench/audit_cuda.py [LIBRARY.so | OBJECT.o ...] [--out DIR] [--check]

Reads the sm_90 code of the built library (default: libfastloss_ops*.so of the installed ``fastloss`` package next to
this Python) with ``cuobjdump`` and ``nvdisasm`` (from CUDA_HOME/bin, PATH, or the ``nvidia-cuda-cuobjdump`` /
``nvidia-cuda-nvdisasm`` wheels), and writes one row per kernel instantiation:

* registers, stack frame, local memory (spills: LDL / STL in the code), static shared memory;
* occupancy at the block size of the kernel's ``__launch_bounds__`` (every launcher uses that size or, for the
  softmax block kernels on short rows, fewer threads);
* its hot loops -- the innermost loop around each 16-byte global access -- with the width of every global access,
  SASS instructions, MUFU (special-function unit) instructions and bytes of global traffic per iteration, and the
  most load bytes a thread has issued and not yet used (bytes in flight per thread);
* three ceilings of the kernel as a fraction of an H200's copy bandwidth (4.3 TB/s counting bytes read and written,
  measured on the lent H200; 132 SMs at 1.98 GHz):
  - issue: an SM issues 128 thread-instructions per clock; a loop with i instructions per b bytes needs
    (copy bandwidth per SM per clock) * i / b of them;
  - MUFU: 16 special-function results per SM per clock (exp2, rcp, lg2, tanh);
  - latency: Little's law, bytes in flight per SM (per-thread bytes x resident threads) against copy bandwidth per SM
    x 700 ns (an assumed HBM load latency under load: 22.8 KB per SM);
  the kernel's ceiling is the smallest of them over its hot loops. These are static predictions
  from a simple model, not measurements: `bench/gpu_check.sh` records them next to the measured numbers.

An access is cold when its own source line -- the innermost fastloss line it came from; a marker at a call site does
not reach into the callee -- carries, on that line or the four above, a comment saying why it is off the hot path:

    // fl-audit: cold -- <why: once per row, a row's head / tail, a remainder loop, a fallback for misaligned views>

A call whose callee's accesses are all as cold as the call (a row helper's remainder loop calling the kernel's
callback, which may load class weights) says so at the call, and the marker then reaches the accesses of everything
inlined there:

    // fl-audit: cold-call -- <why>

A hot load whose bytes come from L2 rather than HBM (a [C] vector of class weights that every row re-reads) counts
as an access and as instructions, but not as HBM traffic nor as bytes in flight against HBM latency:

    // fl-audit: l2 -- <why>

Cold accesses are left out of the hot loops and of the checks. A narrow access that is on the hot path and not fixed
yet says so the same way, and is counted in the table as accepted:

    // fl-audit: accepted -- <why it stays for now>

A branch of a hot loop that runs rarely (an insertion into a per-thread list that only a new best element reaches)
would swell the loop's static instruction count; its instructions -- everything whose source chain, inlined-at
call sites included, passes a line marked so (or within the four lines below the marker) -- are left out of the
counts and reported apart:

    // fl-audit: rare -- <why the branch seldom runs>

With ``--check`` it exits 1 when a float / half / bfloat16 kernel uses local memory (spills or a stack array) and
the comment block above its declaration carries no ``accepted`` comment, or when any kernel has a global access
narrower than 16 bytes that is neither cold nor accepted.
"""

from __future__ import annotations

import argparse
import datetime
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from collections import Counter
from dataclasses import dataclass, field

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCE_ROOT = REPO  # where the built sources' csrc/ is read from when the build's own paths are gone (--source-root)

# ---------------------------------------------------------------- the machine model (H200 SXM, sm_90)
SMS = 132
CLOCK_HZ = 1.98e9  # SM clock read on the lent H200 under load (device/KINDS.md)
COPY_BW = 4.3e12  # bytes read + written per second, device-to-device copy measured there
ISSUE_PER_CLK = 128  # 4 schedulers x 1 warp-instruction x 32 threads
MUFU_PER_CLK = 16  # special-function unit results per SM per clock
LATENCY_S = 700e-9  # assumed loaded HBM latency
REGS_PER_SM = 65536
MAX_THREADS_PER_SM = 2048
MAX_BLOCKS_PER_SM = 32
SHARED_PER_SM = 228 * 1024
BYTES_PER_CLK = COPY_BW / SMS / CLOCK_HZ  # 16.45 bytes per SM per clock at copy bandwidth
NEEDED_IN_FLIGHT = COPY_BW / SMS * LATENCY_S  # bytes per SM

ELEMENT_BYTES = {"double": 8, "float": 4, "c10::Half": 2, "c10::BFloat16": 2}
ACCEPTED = "fl-audit: accepted"
RARE = "fl-audit: rare"
COLD_CALL = "fl-audit: cold-call"
L2 = "fl-audit: l2"
COLD = "fl-audit: cold"


# ---------------------------------------------------------------- tools
def find_tool(name: str) -> str:
    env = os.environ.get(name.upper())
    if env:
        return env
    cands = []
    if os.environ.get("CUDA_HOME"):
        cands.append(os.path.join(os.environ["CUDA_HOME"], "bin", name))
    which = shutil.which(name)
    if which:
        cands.append(which)
    purelib = sysconfig.get_paths()["purelib"]
    cands += sorted(glob.glob(os.path.join(purelib, "nvidia", "cu*", "bin", name)), reverse=True)
    cands += sorted(glob.glob(os.path.join(purelib, "nvidia", "cuda_*", "bin", name)), reverse=True)
    for c in cands:
        if os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    raise SystemExit(
        f"audit_cuda: {name} not found (CUDA_HOME/bin, PATH, or "
        "`pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm`)"
    )


def run(cmd: list[str], cwd: str | None = None) -> str:
    return subprocess.run(cmd, cwd=cwd, check=True, capture_output=True, text=True).stdout


def demangle(names: list[str]) -> dict[str, str]:
    if not names:
        return {}
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True).stdout
    return dict(zip(names, out.splitlines()))


def default_library() -> str:
    purelib = sysconfig.get_paths()["purelib"]
    libs = sorted(glob.glob(os.path.join(purelib, "fastloss", "libfastloss_ops*.so")))
    if not libs:
        raise SystemExit(f"audit_cuda: no fastloss library in {purelib}/fastloss (build it: make install)")
    return libs[0]


# ---------------------------------------------------------------- parsing
@dataclass
class Instr:
    addr: int
    text: str  # without the predicate guard and the trailing ';'
    op: str
    src: tuple  # source locations (file, line), innermost first


@dataclass
class Loop:
    start: int
    end: int
    instrs: int = 0
    mufu: int = 0
    rare: int = 0  # instructions of branches marked rare, left out of instrs and mufu
    accesses: Counter = field(default_factory=Counter)  # "LDG 16" -> count
    load_bytes: int = 0
    store_bytes: int = 0
    l2_bytes: int = 0  # loads marked l2: not HBM traffic
    in_flight: int = 0  # most load bytes issued and not yet used, per thread

    @property
    def vector(self) -> bool:
        return any(k.endswith(" 16") for k in self.accesses)

    @property
    def bytes(self) -> int:
        return self.load_bytes + self.store_bytes


@dataclass
class Kernel:
    mangled: str
    name: str = ""
    cubin: str = ""
    regs: int = 0
    stack: int = 0
    local: int = 0
    shared: int = 0
    block: int = 0
    spill_ops: int = 0
    src: tuple[str, int] | None = None
    loops: list = field(default_factory=list)
    narrow: list = field(default_factory=list)  # (op, width, source chain): accesses under 16 bytes, not cold
    accepted: list = field(default_factory=list)  # the same, on the hot path, with the reason in the source
    dtype: str = ""


INSTR_RE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
LABEL_RE = re.compile(r"^(\.L_x_\d+):")
LOC_RE = re.compile(r'"([^"]+)", line (\d+)')
FUNC_RE = re.compile(r"^\s*\.text\.(\S+):\s*$")


def access_width(op: str) -> int:
    if ".128" in op:
        return 16
    if ".64" in op:
        return 8
    if ".U16" in op or ".S16" in op:
        return 2
    if ".U8" in op or ".S8" in op:
        return 1
    return 4


def parse_sass(text: str) -> dict[str, list[Instr]]:
    """Instructions per function (``nvdisasm -gi``): each with the chain of source locations it came from, innermost
    first (its inlined-at locations after it)."""
    funcs: dict[str, list[Instr]] = {}
    labels: dict[str, dict[str, int]] = {}
    cur = None
    chain: tuple = ()
    fresh = True  # the next location line starts a new chain
    pending_labels: list[str] = []
    for line in text.splitlines():
        m = FUNC_RE.match(line)
        if m:
            cur = m.group(1)
            funcs[cur] = []
            labels[cur] = {}
            chain, fresh = (), True
            continue
        if cur is None:
            continue
        if "//## File" in line:
            locs = tuple((f, int(n)) for f, n in LOC_RE.findall(line))
            chain = locs if fresh else chain + locs[1:]
            fresh = False
            continue
        m = LABEL_RE.match(line.strip())
        if m:
            pending_labels.append(m.group(1))
            continue
        m = INSTR_RE.search(line)
        if m:
            fresh = True
            addr = int(m.group(1), 16)
            for lab in pending_labels:
                labels[cur][lab] = addr
            pending_labels = []
            body = re.sub(r"^@!?U?P[T\d]+\s+", "", m.group(2).strip())
            funcs[cur].append(Instr(addr, body, body.split()[0] if body else "", chain))
    # resolve branch targets to addresses
    for name, ins in funcs.items():
        for i in ins:
            if i.op.startswith("BRA"):
                t = re.search(r"`\((\.L_x_\d+)\)", i.text)
                i.target = labels[name].get(t.group(1)) if t else None  # type: ignore[attr-defined]
    return funcs


def regs_of(operand_text: str) -> set[int]:
    return {int(r) for r in re.findall(r"\bR(\d+)\b", operand_text)}


def in_flight_bytes(body: list[Instr], l2: frozenset = frozenset()) -> int:
    """Most global-load bytes one thread has issued and not yet used, over two passes of the loop body (so loads
    issued at the bottom for the next iteration count); loads at the addresses in `l2` (served by L2) left out."""
    pending: list[tuple[set[int], int]] = []
    best = 0
    for it in range(2):
        for ins in body:
            parts = ins.text.split(None, 1)
            operands = parts[1] if len(parts) > 1 else ""
            ops = [o.strip() for o in operands.split(",")]
            is_store = ins.op.startswith(("STG", "ST.", "STS", "STL", "RED", "ATOM"))
            sources = operands if is_store else ",".join(ops[1:])
            used = regs_of(sources)
            pending = [(regs, w) for regs, w in pending if not (regs & used)]
            dest = regs_of(ops[0]) if ops and not is_store else set()
            w = access_width(ins.op)
            if ins.op.startswith("LDG") and dest:
                dest = {min(dest) + k for k in range(max(1, w // 4))}
            if dest:  # a load whose registers are overwritten before use is dead, no longer in flight
                pending = [(regs, b) for regs, b in pending if not (regs & dest)]
            if ins.op.startswith("LDG") and ins.addr not in l2:
                pending.append((dest or {-1}, w))
            if it == 1:
                best = max(best, sum(w for _, w in pending))
    return best


def repo_file(path: str) -> str:
    m = re.search(r"(csrc/.*)$", path)
    if m and (SOURCE_ROOT != REPO or not os.path.isfile(path)):  # built elsewhere: map .../csrc/... onto the checkout
        return os.path.join(SOURCE_ROOT, m.group(1))
    return path


def source_accepts(chain, marker: str) -> bool:
    """Whether the access's own line -- the innermost location of the chain in fastloss's csrc/ (code inlined from
    torch's headers is attributed to the fastloss line that used it) -- or one of the four lines above it carries
    `marker`. A marker near a call site does not reach the accesses of the function it calls."""
    own = next(((p, n) for p, n in chain or () if "/csrc/" in p), None)
    if own is None:
        return False
    path, line = own
    try:
        with open(repo_file(path), encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError:
        return False
    return any(marker in lines[k] for k in range(max(0, line - 5), min(len(lines), line)))


def chain_marked(chain, marker: str) -> bool:
    """Whether any fastloss location of the chain (the instruction's own line or a call site it was inlined at)
    carries `marker` on that line or one of the four above: a marked call reaches everything inlined into it."""
    for path, line in chain or ():
        if "/csrc/" not in path:
            continue
        try:
            with open(repo_file(path), encoding="utf-8") as f:
                lines = f.read().splitlines()
        except OSError:
            continue
        if any(marker in lines[k] for k in range(max(0, line - 5), min(len(lines), line))):
            return True
    return False


def declaration_accepts(chain, marker: str) -> bool:
    """Whether the comment block right above a kernel's declaration (the lines up from its first source line to the
    previous blank line, at most 12) carries `marker`."""
    own = next(((p, n) for p, n in chain or () if "/csrc/" in p), None)
    if own is None:
        return False
    try:
        with open(repo_file(own[0]), encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError:
        return False
    for k in range(min(own[1], len(lines)) - 1, max(-1, own[1] - 13), -1):
        if not lines[k].strip():
            break
        if marker in lines[k]:
            return True
    return False


def where(chain) -> str:
    """The innermost location in fastloss's own sources."""
    for path, line in chain or ():
        if "/csrc/" in path:
            return f"{re.search(r'(csrc/.*)$', path).group(1)}:{line}"
    return f"{chain[0][0]}:{chain[0][1]}" if chain else "?"


def analyse(k: Kernel, ins: list[Instr]) -> None:
    """Spills, the narrow accesses not marked cold, and the hot loops: the innermost loop around each 16-byte access
    whose source is not marked cold."""
    k.spill_ops = sum(1 for i in ins if i.op.startswith(("LDL", "STL")))
    k.src = next((i.src[-1:] for i in ins if i.src), ())
    loops = [(i.target, i.addr) for i in ins if i.op.startswith("BRA") and getattr(i, "target", None) is not None
             and i.target <= i.addr]  # type: ignore[attr-defined]
    hot: set[tuple[int, int]] = set()
    for i in ins:
        if not i.op.startswith(("LDG", "STG")) or source_accepts(i.src, COLD) or chain_marked(i.src, COLD_CALL):
            continue
        w = access_width(i.op)
        if w < 16:
            (k.accepted if source_accepts(i.src, ACCEPTED) else k.narrow).append((i.op, w, i.src))
            continue
        around = [lp for lp in loops if lp[0] <= i.addr <= lp[1]]
        if around and not chain_marked(i.src, RARE):  # a loop that only rare code runs is not a hot loop
            hot.add(min(around, key=lambda lp: lp[1] - lp[0]))
    for (s, e) in sorted(hot):
        body = [i for i in ins if s <= i.addr <= e and i.op != "NOP"]
        counted = [i for i in body if not chain_marked(i.src, RARE)]
        lp = Loop(s, e, instrs=len(counted), mufu=sum(1 for i in counted if i.op.startswith("MUFU")),
                  rare=len(body) - len(counted))
        l2 = set()
        for i in body:
            if i.op.startswith(("LDG", "STG")):
                w = access_width(i.op)
                kind = i.op[:3]
                lp.accesses[f"{kind} {w}"] += 1
                if kind == "LDG" and source_accepts(i.src, L2):
                    lp.l2_bytes += w
                    l2.add(i.addr)
                elif kind == "LDG":
                    lp.load_bytes += w
                else:
                    lp.store_bytes += w
        lp.in_flight = in_flight_bytes(body, frozenset(l2))
        k.loops.append(lp)


def occupancy(k: Kernel) -> tuple[int, int]:
    """(resident blocks, resident threads) per SM at the launch-bounds block size."""
    block = k.block or 256
    warps = -(-block // 32)
    regs_per_warp = -(-max(k.regs, 1) * 32 // 256) * 256
    by_regs = (REGS_PER_SM // regs_per_warp) // warps
    by_threads = MAX_THREADS_PER_SM // block
    by_shared = SHARED_PER_SM // k.shared if k.shared else MAX_BLOCKS_PER_SM
    blocks = max(0, min(by_regs, by_threads, by_shared, MAX_BLOCKS_PER_SM))
    return blocks, blocks * block


def ceilings(k: Kernel) -> dict:
    _, threads = occupancy(k)
    vec = [lp for lp in k.loops if lp.vector and lp.bytes]
    if not vec:
        return {"issue": None, "mufu": None, "latency": None, "ceiling": None, "bound": "no vector loop"}
    issue = min(min(1.0, ISSUE_PER_CLK / (BYTES_PER_CLK * max(lp.instrs, 1) / lp.bytes)) for lp in vec)
    mufu = min(min(1.0, MUFU_PER_CLK / (BYTES_PER_CLK * lp.mufu / lp.bytes)) if lp.mufu else 1.0 for lp in vec)
    in_flight = min(lp.in_flight for lp in vec if lp.load_bytes) if any(lp.load_bytes for lp in vec) else None
    latency = min(1.0, in_flight * threads / NEEDED_IN_FLIGHT) if in_flight is not None else 1.0
    parts = {"issue": issue, "mufu": mufu, "latency": latency}
    bound = min(parts, key=parts.get)
    return {**parts, "ceiling": parts[bound], "bound": bound, "in_flight_per_sm": (in_flight or 0) * threads}


def short(name: str) -> str:
    name = re.sub(r"fastloss::cuda::\(anonymous namespace\)::", "", name)
    name = name.replace("fastloss::cuda::", "").replace("fastloss::math::generic::", "")
    name = name.replace("c10::BFloat16", "bf16").replace("c10::Half", "half")
    if name.endswith(")"):  # drop the parameter list: the parenthesis matching the last one
        depth = 0
        for i in range(len(name) - 1, -1, -1):
            depth += {")": 1, "(": -1}.get(name[i], 0)
            if depth == 0:
                name = name[:i]
                break
    return name


def dtype_of(name: str) -> str:
    m = re.search(r"<\s*(double|float|c10::Half|c10::BFloat16)\b", name)
    if m:
        return m.group(1)
    m = re.search(r"\((double|float|c10::Half|c10::BFloat16) const\*", name)
    return m.group(1) if m else ""


# ---------------------------------------------------------------- driver
def collect(paths: list[str]) -> list[Kernel]:
    cuobjdump, nvdisasm = find_tool("cuobjdump"), find_tool("nvdisasm")
    kernels: list[Kernel] = []
    with tempfile.TemporaryDirectory() as tmp:
        for n, path in enumerate(paths):
            d = os.path.join(tmp, str(n))
            os.makedirs(d)
            run([cuobjdump, "-xelf", "all", os.path.abspath(path)], cwd=d)
            for cubin in sorted(glob.glob(os.path.join(d, "*sm_90*.cubin"))):
                res = run([cuobjdump, "-res-usage", cubin])
                found: dict[str, Kernel] = {}
                cur = None
                for line in res.splitlines():
                    m = re.match(r"\s*Function (\S+):", line)
                    if m:
                        cur = found.setdefault(m.group(1), Kernel(m.group(1), cubin=os.path.basename(cubin)))
                        continue
                    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", line)
                    if m and cur is not None:
                        cur.regs, cur.stack, cur.shared, cur.local = map(int, m.groups())
                elf = run([cuobjdump, "-elf", cubin])
                for sec in re.split(r"\n(?=\.nv\.info\.)", elf):
                    m = re.match(r"\.nv\.info\.(\S+)", sec)
                    if m and m.group(1) in found:
                        t = re.search(r"EIATTR_MAX_THREADS\s*\n\s*Format:.*\n\s*Value:\s*(0x[0-9a-f]+)", sec)
                        if t:
                            found[m.group(1)].block = int(t.group(1), 16)
                sass = parse_sass(run([nvdisasm, "-gi", "-c", cubin]))
                for name, k in found.items():
                    if name in sass and name.startswith("_Z"):
                        analyse(k, sass[name])
                        kernels.append(k)
    names = demangle([k.mangled for k in kernels])
    for k in kernels:
        k.name = names.get(k.mangled, k.mangled)
        k.dtype = dtype_of(k.name)
    kernels.sort(key=lambda k: (k.cubin, short(k.name)))
    return kernels


def problems(k: Kernel) -> list[str]:
    out = []
    if k.dtype != "double" and (k.local or k.spill_ops) and not declaration_accepts(k.src, ACCEPTED):
        out.append(f"local memory ({k.local} B, {k.spill_ops} LDL/STL)")
    for op, w, src in k.narrow:
        out.append(f"{w}-byte {op[:3]} at {where(src)}")
    return sorted(set(out))


PASSES_RE = re.compile(r"fl-passes: (\S+) = (\d+)R \+ (\d+)W \(floor (\d+)R \+ (\d+)W\)(?: -- (.*))?")


def declared_passes() -> list[dict]:
    """The `// fl-passes:` declarations next to the launchers (checked against the CPU execution layer's byte counts
    by tests/test_emu_traffic.py): passes over the row data, read (R) and written (W), and the op's floor."""
    out = []
    for path in sorted(glob.glob(os.path.join(SOURCE_ROOT, "csrc", "cuda", "*.cu"))):
        with open(path, encoding="utf-8") as f:
            for m in PASSES_RE.finditer(f.read()):
                r, w, fr, fw = (int(g) for g in m.groups()[1:5])
                out.append({"op": m.group(1), "reads": r, "writes": w, "floor_reads": fr, "floor_writes": fw,
                            "pass_bound": (fr + fw) / (r + w), "note": m.group(6) or "",
                            "file": os.path.relpath(path, SOURCE_ROOT)})
    return out


def pct(x) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def report(kernels: list[Kernel], commit: str) -> tuple[str, dict]:
    today = datetime.date.today().isoformat()
    rows, js = [], []
    for k in kernels:
        c = ceilings(k)
        blocks, threads = occupancy(k)
        vec = [lp for lp in k.loops if lp.vector and lp.bytes]
        ipb = max((lp.instrs / lp.bytes for lp in vec), default=None)
        eb = ELEMENT_BYTES.get(k.dtype)
        widths = Counter()
        for lp in k.loops:
            widths.update(lp.accesses)
        probs = problems(k)
        js.append({
            "kernel": k.name, "cubin": k.cubin, "dtype": k.dtype, "registers": k.regs, "stack": k.stack,
            "local": k.local, "spill_instructions": k.spill_ops, "shared": k.shared, "block": k.block,
            "blocks_per_sm": blocks, "threads_per_sm": threads,
            "loops": [{"instructions": lp.instrs, "rare_instructions": lp.rare, "mufu": lp.mufu,
                       "accesses": dict(lp.accesses), "load_bytes": lp.load_bytes, "store_bytes": lp.store_bytes,
                       "l2_load_bytes": lp.l2_bytes, "in_flight": lp.in_flight,
                       "vector": lp.vector} for lp in k.loops],
            "instructions_per_byte": ipb, "instructions_per_element": ipb * eb if ipb and eb else None,
            **c, "problems": probs, "accepted": [f"{w}-byte {op[:3]} at {where(src)}" for op, w, src in k.accepted],
        })
        kb = "-" if c.get("in_flight_per_sm") is None else f"{c['in_flight_per_sm'] / 1024:.1f}"
        acc = " ".join(f"{key.replace(' ', '.')}x{v}" for key, v in sorted(widths.items()))
        rows.append(
            f"| `{short(k.name)}` | {k.regs} | {k.stack}/{k.local}/{k.spill_ops} | {k.block} | "
            f"{threads} | {acc} | {'-' if ipb is None else f'{ipb:.2f}'} | "
            f"{'-' if not (ipb and eb) else f'{ipb * eb:.1f}'} | "
            f"{kb} | "
            f"{pct(c['issue'])} | {pct(c['mufu'])} | {pct(c['latency'])} | **{pct(c['ceiling'])}** {c['bound']} | "
            f"{'; '.join(probs) if probs else 'ok'}{f' ({len(k.accepted)} accepted)' if k.accepted else ''} |"
        )
    n_bad = sum(1 for j in js if j["problems"])
    passes = declared_passes()
    prow = [f"| `{p['op']}` | {p['reads']}R + {p['writes']}W | {p['floor_reads']}R + {p['floor_writes']}W | "
            f"{pct(p['pass_bound'])} | {p['note']} |" for p in passes]
    md = [
        f"# Static audit of the sm_90 kernels ({today}, commit {commit})",
        "",
        "Made by `make audit-cuda` (`bench/audit_cuda.py`, whose docstring has the model) from the built library's",
        "sm_90 code. **Static predictions, not measurements**: ceilings as a fraction of an H200's copy bandwidth",
        f"({COPY_BW / 1e12:.1f} TB/s read + written, {SMS} SMs at {CLOCK_HZ / 1e9:.2f} GHz, "
        f"{NEEDED_IN_FLIGHT / 1024:.1f} KiB in flight per SM needed at an assumed 700 ns latency). Columns: registers;",
        "stack / local bytes / LDL+STL instructions; launch-bounds block; resident threads per SM; global accesses in",
        "hot loops (op.width-in-bytes x count, summed over loops); SASS instructions per byte of global traffic and",
        "per element of the input type in the worst hot loop (branches marked `fl-audit: rare` left out: the JSON",
        "lists their instructions); KiB in flight per SM; the issue, MUFU and latency ceilings; the smallest of",
        "them, and which one it is.",
        "",
        f"{len(js)} kernel instantiations, {n_bad} with problems.",
        "",
        "| kernel | regs | stack/local/spill | block | threads/SM | hot-loop accesses | instr/B | instr/elem "
        "| KB in flight/SM | issue | MUFU | latency | ceiling | audit |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        "## Passes over the row data, per op",
        "",
        "Declared next to the launchers (`// fl-passes:`), checked against the bytes the CPU execution layer counts",
        "(tests/test_emu_traffic.py). Pass-bound ceiling: the floor's bytes over the declared bytes (rows longer than",
        "the L2 can hold between passes; a re-read right after the statistics pass may come from L2 for short rows).",
        "",
        "| op | passes | floor | pass-bound ceiling | note |",
        "|---|---|---|---|---|",
        *prow,
        "",
    ]
    return "\n".join(md), {"date": today, "commit": commit, "model": {
        "sms": SMS, "clock_hz": CLOCK_HZ, "copy_bw": COPY_BW, "latency_s": LATENCY_S,
        "needed_in_flight_per_sm": NEEDED_IN_FLIGHT}, "kernels": js, "passes": passes}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("inputs", nargs="*", help="library or object files (default: the installed fastloss library)")
    ap.add_argument("--out", help="folder for <date>-audit-cuda-sm90.md / .json (default: print the table)")
    ap.add_argument("--check", action="store_true", help="exit 1 on a problem (see the docstring)")
    ap.add_argument("--md-only", action="store_true", help="with --out: the Markdown table only, no JSON")
    ap.add_argument("--filter", default="", help="only kernels whose short name (as in the table) contains this")
    ap.add_argument("--loops", action="store_true", help="also list every hot loop of every kernel")
    ap.add_argument("--source-root", help="checkout whose csrc/ the library was built from (default: this one)")
    a = ap.parse_args(argv)
    global SOURCE_ROOT
    SOURCE_ROOT = os.path.abspath(a.source_root) if a.source_root else REPO
    paths = a.inputs or [default_library()]
    kernels = [k for k in collect(paths) if a.filter in short(k.name)]
    if not kernels:
        print("audit_cuda: no sm_90 kernels found in " + ", ".join(paths), file=sys.stderr)
        return 1
    try:
        commit = run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"]).strip()
    except (subprocess.CalledProcessError, OSError):
        commit = "unknown"
    md, js = report(kernels, commit)
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        stem = os.path.join(a.out, f"{js['date']}-audit-cuda-sm90")
        with open(stem + ".md", "w", encoding="utf-8") as f:
            f.write(md)
        if not a.md_only:
            with open(stem + ".json", "w", encoding="utf-8") as f:
                json.dump(js, f, indent=1)
        print(f"audit_cuda: {len(kernels)} kernels -> {stem}.md" + ("" if a.md_only else " / .json"))
    else:
        print(md)
    if a.loops:
        for k in kernels:
            print(short(k.name))
            for lp in k.loops:
                print(f"  loop {lp.start:#x}-{lp.end:#x}: {lp.instrs} instr (+{lp.rare} rare), {lp.mufu} MUFU, "
                      f"{dict(lp.accesses)}, {lp.in_flight} B in flight/thread")
    bad = [(k["kernel"], p) for k in js["kernels"] for p in k["problems"]]
    for name, p in bad:
        print(f"audit_cuda: {short(name)}: {p}", file=sys.stderr)
    return 1 if (a.check and bad) else 0


if __name__ == "__main__":
    sys.exit(main())

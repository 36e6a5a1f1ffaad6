"""bench/audit_cuda.py's reading of SASS, on a hand-written listing: loops, access widths, bytes in flight, the
source markers, occupancy and the ceilings. (`make audit-cuda` runs it on the real library in the CUDA CI step.)"""

import importlib.util
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("audit_cuda", ROOT / "bench" / "audit_cuda.py")
audit = importlib.util.module_from_spec(spec)
sys.modules.setdefault("audit_cuda", audit)  # dataclasses look their module up there
spec.loader.exec_module(audit)

SASS = """
//--------------------- .text._Z1kPf --------------------------
.text._Z1kPf:
\t//## File "/elsewhere/csrc/cuda/k.cu", line 3
        /*0000*/                   LDC R1, c[0x0][0x28] ;
.L_x_0:
\t//## File "/elsewhere/csrc/cuda/row.cuh", line 8 inlined at "/elsewhere/csrc/cuda/k.cu", line 4
\t//## File "/elsewhere/csrc/cuda/k.cu", line 4
        /*0010*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
        /*0020*/                   LDG.E.128 R8, desc[UR4][R2.64+0x1000] ;
        /*0030*/                   FADD R12, R4, R5 ;
        /*0040*/                   MUFU.EX2 R13, R12 ;
\t//## File "/elsewhere/csrc/cuda/row.cuh", line 12 inlined at "/elsewhere/csrc/cuda/k.cu", line 4
        /*0050*/                   LDG.E.U16 R14, desc[UR4][R2.64] ;
        /*0060*/                   STG.E desc[UR4][R2.64], R14 ;
        /*0070*/               @P0 BRA `(.L_x_0) ;
\t//## File "/elsewhere/csrc/cuda/k.cu", line 9
        /*0080*/                   STG.E.64 desc[UR4][R6.64], R10 ;
        /*0090*/                   EXIT ;
"""


@pytest.fixture
def sources(tmp_path, monkeypatch):
    cuda = tmp_path / "csrc" / "cuda"
    cuda.mkdir(parents=True)
    (cuda / "k.cu").write_text("\n" * 6 + "// fl-audit: cold -- once per row\n\nstore_loss();\n")
    row = ["x"] * 12
    (cuda / "row.cuh").write_text("\n".join(row) + "\n")
    monkeypatch.setattr(audit, "SOURCE_ROOT", str(tmp_path))
    return cuda


def kernel(**kw):
    k = audit.Kernel("_Z1kPf", regs=kw.get("regs", 64), block=256)
    audit.analyse(k, audit.parse_sass(SASS)["_Z1kPf"])
    k.dtype = "float"
    return k


def test_loops_widths_and_bytes_in_flight(sources):
    k = kernel()
    assert len(k.loops) == 1
    lp = k.loops[0]
    assert (lp.start, lp.end, lp.instrs, lp.mufu) == (0x10, 0x70, 7, 1)
    assert dict(lp.accesses) == {"LDG 16": 2, "LDG 2": 1, "STG 4": 1}
    assert (lp.load_bytes, lp.store_bytes) == (34, 4)
    # R4..R7 and R8..R11 both in flight until the FADD reads R4: 32 bytes (R8's load outlives the iteration).
    assert lp.in_flight == 32
    # The 2-byte load and the 4-byte store come from row.cuh:12 (unmarked); the 8-byte store from k.cu:9, marked
    # cold two lines above.
    assert sorted((op, w, audit.where(src)) for op, w, src in k.narrow) == [
        ("LDG.E.U16", 2, "csrc/cuda/row.cuh:12"), ("STG.E", 4, "csrc/cuda/row.cuh:12")]
    assert audit.problems(k) == ["2-byte LDG at csrc/cuda/row.cuh:12", "4-byte STG at csrc/cuda/row.cuh:12"]


def test_markers(sources):
    lines = (sources / "row.cuh").read_text().splitlines()
    lines[8] = "// fl-audit: accepted -- a known gap"  # line 9: within four lines above line 12
    (sources / "row.cuh").write_text("\n".join(lines) + "\n")
    k = kernel()
    assert k.narrow == [] and len(k.accepted) == 2 and audit.problems(k) == []
    lines[8] = "// fl-audit: cold -- a tail"
    (sources / "row.cuh").write_text("\n".join(lines) + "\n")
    k = kernel()
    assert k.narrow == [] and k.accepted == []
    # A marker at the call site (k.cu:4's neighbourhood) does not reach into the callee.
    (sources / "k.cu").write_text("// fl-audit: cold -- call site\n" * 5 + "\n// fl-audit: cold -- once per row\n")
    lines[8] = "x"
    (sources / "row.cuh").write_text("\n".join(lines) + "\n")
    assert len(kernel().narrow) == 2


def test_occupancy_and_ceilings(sources):
    k = kernel(regs=64)
    assert audit.occupancy(k) == (4, 1024)  # 64 registers x 256 threads: 4 blocks of 65536 registers
    assert audit.occupancy(kernel(regs=32)) == (8, 2048)
    assert audit.occupancy(kernel(regs=65)) == (3, 768)  # 72 per thread after the allocation granularity
    c = audit.ceilings(k)
    per_clk = audit.BYTES_PER_CLK
    assert c["issue"] == pytest.approx(min(1.0, 128 / (per_clk * 7 / 38)))
    assert c["mufu"] == pytest.approx(min(1.0, 16 / (per_clk * 1 / 38)))
    assert c["latency"] == pytest.approx(min(1.0, 32 * 1024 / audit.NEEDED_IN_FLIGHT))
    assert c["ceiling"] == min(c["issue"], c["mufu"], c["latency"])


def test_local_memory_needs_a_reason(sources):
    k = kernel()
    k.local, k.dtype = 8, "c10::BFloat16"
    assert any("local memory" in p for p in audit.problems(k))
    k.dtype = "double"  # float64 kernels may spill (reported, not a failure)
    assert not any("local memory" in p for p in audit.problems(k))
    # The kernel's first source line is k.cu:3; a reason in the comment block right above it is accepted.
    (sources / "k.cu").write_text("\n// fl-audit: accepted -- why\nkernel(\n\n\n\n// fl-audit: cold -- row\n\nx\n")
    k.dtype = "c10::BFloat16"
    assert not any("local memory" in p for p in audit.problems(k))


def test_rare_branches_leave_the_counts(sources):
    # row.cuh:12 (the 2-byte load, the 4-byte store and the loop's branch) marked rare: out of the counts; the
    # row.cuh:8 instructions still count. A marker at a call site reaches everything inlined there.
    lines = (sources / "row.cuh").read_text().splitlines()
    lines[9] = "// fl-audit: rare -- seldom"  # line 10: within four lines above line 12
    (sources / "row.cuh").write_text("\n".join(lines) + "\n")
    lp = kernel().loops[0]
    assert (lp.instrs, lp.rare) == (4, 3)
    assert dict(lp.accesses) == {"LDG 16": 2, "LDG 2": 1, "STG 4": 1}  # accesses are still the loop's
    lines[9] = "x"
    (sources / "row.cuh").write_text("\n".join(lines) + "\n")
    (sources / "k.cu").write_text("\n// fl-audit: rare -- the whole call\n")  # above k.cu:4: every loop instruction
    assert kernel().loops == []  # a loop only rare code runs is no hot loop


def test_l2_loads_are_not_hbm_traffic(sources):
    # The two 16-byte loads (row.cuh:8) marked as L2 reads: still accesses, no longer HBM bytes nor in flight.
    lines = (sources / "row.cuh").read_text().splitlines()
    lines[4] = "// fl-audit: l2 -- a [C] vector every row re-reads"  # line 5: within four lines above line 8
    (sources / "row.cuh").write_text("\n".join(lines) + "\n")
    lp = kernel().loops[0]
    assert dict(lp.accesses) == {"LDG 16": 2, "LDG 2": 1, "STG 4": 1}
    assert (lp.load_bytes, lp.l2_bytes, lp.store_bytes) == (2, 32, 4)
    assert lp.in_flight == 2  # only the 2-byte load, until the store reads it

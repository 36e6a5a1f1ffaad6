"""The CUDA execution layer of an emulated build (``FASTLOSS_CUDA_EMU=ON``, ``make test-emu``): launch counts per
kernel and the thread schedule, read through the library's C entry points (csrc/cuda_emu/register_emu.cpp).

In such a build the CUDA kernels run on the CPU, registered for CPU tensors in place of the CPU kernels; in any
other build :data:`available` is False and the functions here raise.
"""

from __future__ import annotations

import ctypes
import re

from ._library import library_path

_lib = ctypes.CDLL(library_path)
available: bool = hasattr(_lib, "fastloss_cuda_emu_report")

if available:
    _lib.fastloss_cuda_emu_report.restype = ctypes.c_size_t
    _lib.fastloss_cuda_emu_report.argtypes = [ctypes.c_char_p, ctypes.c_size_t]
    _lib.fastloss_cuda_emu_set_schedule.argtypes = [ctypes.c_uint64]
    _lib.fastloss_cuda_emu_schedule.restype = ctypes.c_uint64
    _lib.fastloss_cuda_emu_set_max_grid.argtypes = [ctypes.c_int64]
    _lib.fastloss_cuda_emu_max_grid.restype = ctypes.c_int64
    _lib.fastloss_cuda_emu_traffic.argtypes = [ctypes.POINTER(ctypes.c_uint64), ctypes.POINTER(ctypes.c_uint64)]

def _need() -> None:
    if not available:
        raise RuntimeError("fastloss was not built with FASTLOSS_CUDA_EMU=ON (make test-emu builds it)")


def launch_counts() -> dict[str, int]:
    """Launches per kernel instantiation compiled into the library (0 for those never launched)."""
    _need()
    n = _lib.fastloss_cuda_emu_report(None, 0)
    buf = ctypes.create_string_buffer(n + 1)
    _lib.fastloss_cuda_emu_report(buf, n + 1)
    out: dict[str, int] = {}
    for line in buf.value.decode().splitlines():
        count, name = line.split("\t", 1)
        out[name] = int(count)
    return out


def traffic() -> tuple[int, int]:
    """(bytes read, bytes written) of row data by the kernels since :func:`reset_traffic` (counted by the row
    helpers, once per row segment; per-row scalars such as targets and losses are not counted)."""
    _need()
    r, w = ctypes.c_uint64(0), ctypes.c_uint64(0)
    _lib.fastloss_cuda_emu_traffic(ctypes.byref(r), ctypes.byref(w))
    return r.value, w.value


def reset_traffic() -> None:
    _need()
    _lib.fastloss_cuda_emu_reset_traffic()


def kernel_of(instantiation: str) -> str:
    """``warp_forward_kernel<float, 2, 4>`` -> ``warp_forward_kernel``."""
    return re.split(r"<", instantiation, maxsplit=1)[0]


def report(instantiations: bool = False) -> tuple[str, list[str]]:
    """The summary line (``cuda-emu: N of M kernels launched ...``) and what never launched: the kernels, or with
    ``instantiations`` every compiled instantiation (``warp_forward_kernel<float, 2, 4>``)."""
    counts = launch_counts()
    kernels: dict[str, int] = {}
    for inst, n in counts.items():
        kernels[kernel_of(inst)] = kernels.get(kernel_of(inst), 0) + n
    never_kernels = sorted(k for k, n in kernels.items() if n == 0)
    never_inst = sorted(k for k, n in counts.items() if n == 0)
    line = (
        f"cuda-emu: {len(kernels) - len(never_kernels)} of {len(kernels)} kernels launched "
        f"({len(counts) - len(never_inst)} of {len(counts)} compiled instantiations, {sum(counts.values())} launches)"
    )
    return line, never_inst if instantiations else never_kernels


def set_schedule(seed: int) -> None:
    """0 lane order, 1 reverse, odd >= 3 random rounds, even >= 2 warp-greedy (FASTLOSS_EMU_SCHEDULE=mix sets a
    value that picks one per launch; :func:`schedule` returns it, to restore)."""
    _need()
    _lib.fastloss_cuda_emu_set_schedule(seed)


def schedule() -> int:
    _need()
    return int(_lib.fastloss_cuda_emu_schedule())


def set_max_grid(n: int) -> None:
    """Cap every launch at n blocks (grid.x), so the kernels run their grid-stride loops (a block handles several
    rows one after another); n >= 2^31 - 1 or <= 0 restores CUDA's limit. FASTLOSS_EMU_MAX_GRID sets it at start."""
    _need()
    _lib.fastloss_cuda_emu_set_max_grid(n)


def max_grid() -> int:
    _need()
    return int(_lib.fastloss_cuda_emu_max_grid())

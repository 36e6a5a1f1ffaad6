"""softmax, log_softmax and logsumexp over the last dimension of an [N, V] tensor.

Implementations: fastloss with each algorithm (``online``, ``two_pass``, ``auto``), torch eager (the speed-up
baseline) and ``torch.compile`` of the same torch call.

Bytes-moved model (elements of the input dtype; an ideal kernel touches each once):

==============  ================  =====================================================  =========
suite           fwd               bwd                                                    fwdbwd
==============  ================  =====================================================  =========
softmax         read NV, write NV read grad NV + output NV, write grad_input NV          5 NV
log_softmax     read NV, write NV read grad NV + output NV, write grad_input NV          5 NV
logsumexp       read NV, write N  read x NV + lse N + grad N, write grad_input NV        3 NV + 3 N
==============  ================  =====================================================  =========
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch

import fastloss

from ..accuracy import rowwise_error
from ..inputs import random_rows
from ..problems import Problem
from ..registry import Impl, Inputs, Suite, fastloss_kernel_check, register_suite

ALGORITHMS = ("online", "two_pass", "auto")
def _auto_note(problem: Problem, inputs: Inputs) -> Optional[str]:
    try:
        return "auto=" + fastloss.functional.resolve_algorithm(inputs[0], -1, "auto")
    except Exception:  # noqa: BLE001 (a note is best effort; the run itself reports real errors)
        return None


def _bytes_softmax(problem: Problem, mode: str) -> int:
    nv = problem.numel * problem.elem_size
    return {"fwd": 2 * nv, "fwdbwd": 5 * nv}[mode]


def _bytes_logsumexp(problem: Problem, mode: str) -> int:
    nv = problem.numel * problem.elem_size
    n = problem.n * problem.elem_size
    return {"fwd": nv + n, "fwdbwd": 3 * nv + 3 * n}[mode]


def _make_suite(name: str, fl_op: Callable[..., torch.Tensor], torch_op: Callable[[torch.Tensor], torch.Tensor],
                bytes_moved: Callable[[Problem, str], int], description: str, reduces: bool = False) -> Suite:
    suite = Suite(
        name=name,
        description=description,
        make_inputs=random_rows,
        bytes_moved=bytes_moved,
        output_shape=(lambda p: (p.n,)) if reduces else (lambda p: (p.n, p.v)),
        rel_error=rowwise_error(torch_op),
        grad_inputs=(0,),
    )
    for alg in ALGORITHMS:
        suite.add(Impl(
            name=f"fastloss-{alg}",
            make=_fastloss_factory(fl_op, alg),
            description=f"fastloss.{name}(x, -1, algorithm={alg!r})",
            check=fastloss_kernel_check(name, f"{name}_backward"),
            note=_auto_note if alg == "auto" else None,
        ))
    suite.add(Impl(name="torch-eager", make=lambda p: torch_op, description=f"torch {name}, eager", baseline=True))
    suite.add(Impl(name="torch-compile", make=lambda p: torch_op, description=f"torch.compile(torch {name})",
                   compiled=True))
    return suite


def _fastloss_factory(fl_op: Callable[..., torch.Tensor], alg: str) -> Callable[[Problem], Callable[..., Any]]:
    def make(problem: Problem) -> Callable[[torch.Tensor], torch.Tensor]:
        def run(x: torch.Tensor) -> torch.Tensor:
            return fl_op(x, -1, algorithm=alg)

        return run

    return make


def _torch_softmax(x: torch.Tensor) -> torch.Tensor:
    return torch.softmax(x, -1)


def _torch_log_softmax(x: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(x, -1)


def _torch_logsumexp(x: torch.Tensor) -> torch.Tensor:
    return torch.logsumexp(x, -1)


SOFTMAX = register_suite(_make_suite("softmax", fastloss.softmax, _torch_softmax, _bytes_softmax,
                                     "softmax over the last dim of [N, V]"))
LOG_SOFTMAX = register_suite(_make_suite("log_softmax", fastloss.log_softmax, _torch_log_softmax, _bytes_softmax,
                                         "log_softmax over the last dim of [N, V]"))
LOGSUMEXP = register_suite(_make_suite("logsumexp", fastloss.logsumexp, _torch_logsumexp, _bytes_logsumexp,
                                       "logsumexp over the last dim of [N, V] -> [N]", reduces=True))

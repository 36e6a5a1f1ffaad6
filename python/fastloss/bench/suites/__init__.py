"""Built-in suites. Importing this package registers them, in the order reports list them.

To benchmark a new operation, add a module here that builds a :class:`~fastloss.bench.registry.Suite` and calls
:func:`~fastloss.bench.registry.register_suite`, and import it below. To add an implementation to an existing
suite, append an :class:`~fastloss.bench.registry.Impl` with ``SUITES[name].add(...)``.
"""

# Import order is report order.
from . import softmax  # noqa: F401, I001  (softmax, log_softmax, logsumexp)
from . import cross_entropy  # noqa: F401  (cross_entropy, linear_cross_entropy: peers and placeholders)
from . import topk  # noqa: F401  (softmax_topk)
from . import distillation  # noqa: F401  (distillation, token_logprobs and their linear versions: issue #14)
from . import spherical  # noqa: F401  (the spherical Z-loss and its linear version: issue #25)

from ..registry import SUITES, Suite  # noqa: E402


def select_suites(spec: str) -> list[Suite]:
    """``"all"``, ``"default"`` or a comma list of suite names, in registry order for the keywords."""
    spec = spec.strip()
    if spec in ("", "default"):
        return [s for s in SUITES.values() if s.default]
    if spec == "all":
        return list(SUITES.values())
    out = []
    for name in (p.strip() for p in spec.split(",") if p.strip()):
        if name not in SUITES:
            raise ValueError(f"unknown suite {name!r}; expected one of {list(SUITES)} (or 'all')")
        out.append(SUITES[name])
    return out

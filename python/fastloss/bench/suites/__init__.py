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

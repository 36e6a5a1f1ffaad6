"""``python -m fastloss.bench`` is ``fastloss-bench``."""

import sys

from .cli import main

sys.exit(main())

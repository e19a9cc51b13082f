"""``python -m cpvm.probe``: the same as the ``cpvm-probe`` console script."""

import sys

from cpvm.probe.cli import main

sys.exit(main())

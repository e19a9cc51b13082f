"""``python -m cpvm.probe``: the same as the ``cpvm-probe`` console script."""

import sys

from cpvm.probe.cli import main

# Guarded: importing the package's modules (as the packaging test does) must not run it.
if __name__ == "__main__":
    sys.exit(main())

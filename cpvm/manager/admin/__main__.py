"""``python -m cpvm.manager.admin``: the same as ``cpvm-manager-admin``."""

import sys

from cpvm.manager.admin import main

# Guarded: importing the package's modules (as the packaging test does) must not run it.
if __name__ == "__main__":
    sys.exit(main())

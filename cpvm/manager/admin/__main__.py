"""``python -m cpvm.manager.admin``: the same as ``cpvm-manager-admin``."""

import sys

from cpvm.manager.admin import main

sys.exit(main())

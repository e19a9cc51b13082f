"""cpvm's benchmark: cpvm, websockify, socat and direct TCP side by side in one run.

Run ``python3 -m bench --quick`` (under 2 minutes) or ``python3 -m bench --full`` (under 15);
see docs/performance.md for what each figure means.
"""

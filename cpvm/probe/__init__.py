"""``cpvm-probe``: one console opened end to end, as a browser would, for monitoring.

A client of both daemons and a part of neither: it signs ``createConsoleEndpoint`` like any
API client, opens the console's WebSocket, does noVNC's side of RFB up to the first screen
update and reports how long each leg took. It imports only :mod:`cpvm.common` and
:mod:`cpvm.rfb` (tests/unit/test_layout.py).
"""

"""The cpvm daemon (``twistd cpvm``): noVNC, the browser's WebSocket, the relay to VNC.

Start reading at ``tap.py`` (the one place services are built), then ``websocket.py`` (the
browser's shell), ``registry.py`` and ``session.py`` (a console's lifecycle), ``upstream.py``
(the VNC client shell) and ``cpvm.rfb`` (the sans-IO RFB core). Imports ``cpvm.common`` and
``cpvm.rfb``, never ``cpvm.manager``.
"""

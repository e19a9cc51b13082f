"""The two transports of a relaying session, coupled and tuned (the Twisted side of it).

When ServerInit has gone to the browser, the browser's transport and the VNC server's
become each other's producers: a slow browser pauses reads from the VNC server, and a slow
VNC server pauses reads from the browser, so each transport's buffer is the other's brake.
Both then get the relay's socket settings.
"""

from __future__ import annotations

# Bigger reads and a bigger write threshold than Twisted's 64 KiB mean fewer reads, frames
# and pause/resume cycles per megabyte; memory per session stays bounded by them.
RELAY_BUFFER = 256 * 1024


def couple(browser, upstream) -> None:
    """Make two transports (either may be ``None``: gone already) brake each other."""
    if browser is None or upstream is None:
        return
    # twisted.web's HTTPChannel registered itself on the browser's transport before
    # the WebSocket took it over; a transport has one producer, and now it is ours.
    for transport in (browser, upstream):
        if _has_producer(transport):
            transport.unregisterProducer()
    browser.registerProducer(upstream, True)
    upstream.registerProducer(browser, True)
    for transport in (browser, upstream):
        tune(transport)


def _has_producer(transport) -> bool:
    # TCP transports call it "producer"; the TLS protocol wrapper "_producer".
    return (
        getattr(transport, "producer", None) is not None
        or getattr(transport, "_producer", None) is not None
    )


def tune(transport) -> None:
    """Latency and throughput settings for a relaying TCP transport (TLS: its carrier)."""
    tcp = getattr(transport, "transport", None) or transport
    for t in {id(transport): transport, id(tcp): tcp}.values():
        if hasattr(t, "bufferSize"):
            t.bufferSize = RELAY_BUFFER
    set_nodelay = getattr(tcp, "setTcpNoDelay", None)
    if set_nodelay is not None:
        try:
            set_nodelay(True)  # keystrokes and small updates go out at once
        except OSError:
            pass

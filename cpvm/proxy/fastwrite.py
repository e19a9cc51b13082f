"""Write to a TCP socket at once when nothing is queued ahead (the relay's hot path).

Twisted's ``transport.write`` always queues and writes on the next reactor iteration,
registering and unregistering the socket for writability each time: per message that is
two ``epoll_ctl`` calls and a loop iteration of latency. When the transport's buffer is
empty, sending directly is equivalent and cheaper; whatever the kernel does not take goes
through ``transport.write`` as usual, so ordering, buffering and producer pausing are kept.
Anything but a plain TCP transport (TLS, test transports) takes the ordinary path.
"""

from __future__ import annotations

from twisted.internet import tcp

_TCP_TYPES = (tcp.Server, tcp.Client)


def _idle(transport) -> bool:
    # Twisted's FileDescriptor keeps queued bytes in dataBuffer[offset:] + _tempDataBuffer.
    # After startTLS (VeNCrypt) the same tcp object encrypts in write(): never bypass it.
    return (
        not transport.TLS
        and transport.connected
        and not transport.disconnecting
        and not transport._tempDataBuffer
        and len(transport.dataBuffer) == transport.offset
    )


def write_frame(transport, header: bytes, payload: bytes) -> None:
    """Write ``header + payload`` without joining them (``sendmsg`` gathers both)."""
    if type(transport) in _TCP_TYPES and _idle(transport):
        try:
            sent = transport.socket.sendmsg((header, payload))
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            # Let Twisted see the error on its own path and close the connection.
            transport.writeSequence((header, payload))
            return
        total = len(header) + len(payload)
        if sent == total:
            return
        if sent < len(header):
            transport.writeSequence((header[sent:], payload))
        else:
            transport.write(payload[sent - len(header) :])
        return
    transport.writeSequence((header, payload))


def write(transport, data: bytes) -> None:
    """Write ``data`` at once when the transport is idle, else queue it."""
    if type(transport) in _TCP_TYPES and _idle(transport):
        try:
            sent = transport.socket.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            transport.write(data)
            return
        if sent < len(data):
            transport.write(data[sent:])
        return
    transport.write(data)

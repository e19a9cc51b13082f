"""Request and answer bodies of the manager client: a body written at once, and an answer
read with a size cap."""

from __future__ import annotations

from typing import Any

import treq
from twisted.internet.defer import Deferred, succeed
from twisted.web.iweb import IBodyProducer
from zope.interface import implementer


@implementer(IBodyProducer)
class BytesBody:
    """A request body already in memory, written at once.

    treq's default wraps bytes in a ``FileBodyProducer``, which writes them from a
    ``Cooperator`` task on a later reactor turn: a turn and a timer per call for a
    body of a few hundred bytes.
    """

    def __init__(self, data: bytes):
        self._data = data
        self.length = len(data)

    def startProducing(self, consumer: Any) -> Deferred:  # noqa: N802
        consumer.write(self._data)
        return succeed(None)

    def pauseProducing(self) -> None:  # noqa: N802
        pass

    def resumeProducing(self) -> None:  # noqa: N802
        pass

    def stopProducing(self) -> None:  # noqa: N802
        pass


class TooBig(Exception):
    """The answer passed its size limit."""


def read_limited(response: Any, limit: int) -> Deferred:
    """Collect a response body, failing as soon as it exceeds ``limit`` bytes."""
    chunks: list[bytes] = []
    size = [0]

    def collect(data: bytes) -> None:
        size[0] += len(data)
        if size[0] > limit:
            raise TooBig()
        chunks.append(data)

    d = treq.collect(response, collect)
    d.addCallback(lambda _: b"".join(chunks))
    return d

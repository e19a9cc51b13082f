"""Requests to a Twisted resource tree in memory (``treq.testing.StubTreq``), answered
at once: for resource tests that run without a reactor or a socket."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from treq.testing import StubTreq
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure
from twisted.web.resource import IResource


@dataclass(frozen=True)
class Answer:
    """One HTTP answer: status, headers (lower-case name -> first value) and body."""

    code: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class MemoryHttp:
    """Sends requests to ``resource`` and returns their ``Answer`` synchronously.

    Fails the test when an answer does not arrive once the in-memory connections are
    flushed (a resource that waits on something that never happens).
    """

    def __init__(self, resource: IResource):
        self.treq = StubTreq(resource)

    def request(self, method: str, url: str, **kwargs: Any) -> Answer:
        response = self.wait(self.treq.request(method, url, **kwargs))
        body = self.wait(self.treq.content(response))
        headers = {
            name.decode().lower(): values[0].decode()
            for name, values in response.headers.getAllRawHeaders()
        }
        return Answer(response.code, headers, body)

    def get(self, url: str, **kwargs: Any) -> Answer:
        return self.request("GET", url, **kwargs)

    def post(self, url: str, **kwargs: Any) -> Answer:
        return self.request("POST", url, **kwargs)

    def wait(self, d: Deferred) -> Any:
        """The result of ``d`` once the memory connections are flushed."""
        results: list[Any] = []
        d.addBoth(results.append)
        self.treq.flush()
        assert results, "no answer: the resource is still waiting for something"
        if isinstance(results[0], Failure):
            results[0].raiseException()
        return results[0]

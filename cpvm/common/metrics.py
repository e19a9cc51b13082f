"""``/metrics``: the Prometheus page both daemons serve, for configured networks only."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry
from prometheus_client.twisted import MetricsResource
from twisted.web import resource

from cpvm.common.addresses import Network, address_in


class MetricsPage(resource.Resource):
    """``/metrics`` for the addresses in ``allow`` (the TCP peer's: a forwarded-for header
    proves nothing); anyone else gets the 404 of a page that does not exist. ``before`` runs
    first, in the reactor thread; prometheus_client then formats the page in a pool thread.
    """

    isLeaf = True

    def __init__(
        self,
        registry: CollectorRegistry,
        allow: Iterable[Network],
        before: Callable[[], None] = lambda: None,
    ):
        super().__init__()
        self._page = MetricsResource(registry=registry)
        self._allow = tuple(allow)
        self._before = before

    def render(self, request):
        peer = getattr(request.getClientAddress(), "host", "")
        if not address_in(peer, self._allow):
            request.setResponseCode(404)
            request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
            return b"not found\n"
        self._before()
        return self._page.render(request)

# Only ServiceMaker objects naming modules by string: importing the reactor (or our code)
# here would break every twistd plugin whenever dropin.cache must be rebuilt.
from twisted.application.reactors import Reactor
from twisted.application.service import ServiceMaker

cpvm = ServiceMaker(
    "cpvm",
    "cpvm.proxy.tap",
    "Console proxy: noVNC and WebSocket to VNC relay on one-time tokens",
    "cpvm",
)

cpvmManager = ServiceMaker(
    "cpvm-manager",
    "cpvm.manager.tap",
    "Management endpoint: createConsoleEndpoint, one-time tokens, console sessions",
    "cpvm-manager",
)

# ``twistd --reactor=cpvm``: epoll without a log context per I/O event (cpvm/proxy/reactor.py).
cpvmReactor = Reactor(
    "cpvm",
    "cpvm.proxy.reactor",
    "epoll without a log context per I/O event (cpvm's relay path)",
)

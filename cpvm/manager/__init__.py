"""The management endpoint (``twistd cpvm-manager``): the CloudStack-compatible API,
one-time tokens, console sessions, the proxy API. Imports ``cpvm.common``, never
``cpvm.proxy``."""

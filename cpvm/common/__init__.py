"""What both daemons share: the wire contract, configuration reading, addresses, logs,
the metrics page and TLS helpers. Imports neither ``cpvm.proxy`` nor ``cpvm.manager``."""

"""cpvm: an API-driven console proxy that puts a VM's VNC console in a browser."""

__version__ = "0.2.0"

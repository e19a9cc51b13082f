"""The public API's error answer, shared by its resource, its authentication and its
command handlers."""

from __future__ import annotations

BAD_CREDENTIALS = "unable to verify user credentials and/or request signature"


class ApiError(Exception):
    """A CloudStack error envelope to send: errorcode is also the HTTP status;
    ``retry_after`` (seconds) becomes a ``Retry-After`` header."""

    def __init__(self, code: int, text: str, retry_after: float | None = None):
        super().__init__(text)
        self.code = code
        self.text = text
        self.retry_after = retry_after

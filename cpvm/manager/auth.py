"""Who is calling the public API: the API key's account and the request's CloudStack
signature (HMAC-SHA1 with the key's secret), with the signature's expiry rules."""

from __future__ import annotations

from typing import Any

from twisted.logger import Logger

from cpvm.manager import signing, store
from cpvm.manager.api_errors import BAD_CREDENTIALS, ApiError
from cpvm.manager.db import Database
from cpvm.manager.secrets_box import SecretBox, SecretKeyError


class ApiAuthenticator:
    """Checks a request's ``apiKey`` and ``signature`` against the database."""

    _log = Logger()

    def __init__(
        self,
        db: Database,
        box: SecretBox,
        clock: Any,
        expiry: signing.ExpiryPolicy = signing.ExpiryPolicy(),
    ):
        self._db = db
        self._box = box
        self._clock = clock
        self._expiry = expiry

    async def authenticate(self, params: dict[str, str], lower: dict[str, str]) -> store.Account:
        """The calling account of a request with ``params`` (``lower``: the same, names
        lower-cased); raises :class:`ApiError` 401 (530 if the key's secret cannot be
        decrypted)."""
        api_key = lower.get("apikey")
        signature = lower.get("signature")
        if not api_key or not signature:
            raise ApiError(401, BAD_CREDENTIALS)
        try:
            signing.check_expiry(lower, self._clock.seconds(), self._expiry)
        except signing.SignatureTimeError as e:
            raise ApiError(401, e.text) from None
        # A read: authentication never waits behind writers.
        caller = await self._db.read(store.lookup_caller, api_key)
        if caller is None:
            raise ApiError(401, BAD_CREDENTIALS)
        try:
            secret = self._box.decrypt(caller.secret_enc)
        except SecretKeyError:
            self._log.error(
                "API secret of account {account} cannot be decrypted", account=caller.account.name
            )
            raise ApiError(530, "internal error, see the manager's log") from None
        if not signing.verify(params, secret, signature):
            raise ApiError(401, BAD_CREDENTIALS)
        return caller.account

"""Secrets at rest: encryption of API secrets and VNC passwords, hashing of tokens.

HMAC verification of CloudStack signatures needs the plaintext API secret, and cpvm needs
the VNC password, so these are encrypted (Fernet: AES-128-CBC + HMAC-SHA256) with a
key-encryption key kept in a file outside the database. Tokens and proxy-key secrets are
only ever compared, so only their SHA-256 is stored; the caller's ``extra`` token may be
low-entropy, so it is stored as an HMAC keyed by a key derived from the same file.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken


class SecretKeyError(Exception):
    """The key-encryption key file is unusable."""


def sha256_hex(value: str) -> str:
    """The SHA-256 of a high-entropy secret (tokens, proxy-key secrets)."""
    return hashlib.sha256(value.encode("utf-8")).hexdigest()


class SecretBox:
    """Encrypts and decrypts small secrets with the key-encryption key."""

    def __init__(self, key: bytes):
        self._fernet = Fernet(key)
        # A separate key for keyed hashes, so the encryption key is never used twice.
        self._hash_key = hmac.new(key, b"cpvm-manager extra-token hash", hashlib.sha256).digest()

    @classmethod
    def from_file(cls, path: Path, create: bool = True) -> "SecretBox":
        """Load the key from ``path``; create it (mode 0600) when absent and ``create``."""
        try:
            data = path.read_bytes().strip()
        except FileNotFoundError:
            if not create:
                raise SecretKeyError(f"secret key file {str(path)!r} does not exist") from None
            data = cls._create(path)
        except OSError as e:
            raise SecretKeyError(
                f"cannot read secret key file {str(path)!r}: {e.strerror}"
            ) from None
        try:
            return cls(data)
        except (ValueError, TypeError):
            raise SecretKeyError(
                f"secret key file {str(path)!r} does not hold a Fernet key"
            ) from None

    @staticmethod
    def _create(path: Path) -> bytes:
        key = Fernet.generate_key()
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            # Another manager process created it first: use theirs.
            return path.read_bytes().strip()
        except OSError as e:
            raise SecretKeyError(
                f"cannot create secret key file {str(path)!r}: {e.strerror}"
            ) from None
        with os.fdopen(fd, "wb") as f:
            f.write(key + b"\n")
        return key

    def encrypt(self, plaintext: str) -> str:
        return self._fernet.encrypt(plaintext.encode("utf-8")).decode("ascii")

    def decrypt(self, ciphertext: str) -> str:
        try:
            return self._fernet.decrypt(ciphertext.encode("ascii")).decode("utf-8")
        except InvalidToken:
            raise SecretKeyError("stored secret cannot be decrypted with this key file") from None

    def keyed_hash(self, value: str) -> str:
        """HMAC-SHA256 of a possibly low-entropy secret (the caller's extra token)."""
        digest = hmac.new(self._hash_key, value.encode("utf-8"), hashlib.sha256).digest()
        return base64.b64encode(digest).decode("ascii")

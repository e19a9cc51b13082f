"""VNC Authentication (RFB security type 2): the DES challenge response.

The server sends a 16-byte random challenge; the client answers with the challenge encrypted
by DES-ECB under a key made from the password (RFC 6143, section 7.2.2). The key is the
password truncated or zero-padded to 8 bytes with the bits of every byte reversed: the
original VNC code used a DES implementation that numbered key bits from the other end.
"""

from __future__ import annotations

from cryptography.hazmat.primitives.ciphers import Cipher, modes

try:
    # cryptography >= 43 keeps the legacy ciphers here; the old location is removed in 48.
    from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
except ImportError:  # pragma: no cover - cryptography < 43 (Debian 12 ships 38)
    from cryptography.hazmat.primitives.ciphers.algorithms import (  # type: ignore[no-redef,unused-ignore]
        TripleDES,
    )

__all__ = ["CHALLENGE_LENGTH", "vnc_auth_response"]

#: Length in bytes of the challenge and of the response.
CHALLENGE_LENGTH = 16

# Byte -> the same byte with its 8 bits in reverse order.
_BIT_REVERSED = bytes(int(f"{value:08b}"[::-1], 2) for value in range(256))


def vnc_auth_response(password: bytes, challenge: bytes) -> bytes:
    """Return the 16-byte answer to a VNC Authentication ``challenge`` for ``password``.

    Only the first 8 bytes of the password count (a protocol limit every VNC server shares);
    a shorter password is padded with zero bytes.
    """
    if len(challenge) != CHALLENGE_LENGTH:
        raise ValueError(
            f"VNC authentication challenge must be {CHALLENGE_LENGTH} bytes, got {len(challenge)}"
        )
    key = bytes(password[:8]).ljust(8, b"\0").translate(_BIT_REVERSED)
    # Single DES is not offered by cryptography; 3DES-EDE with K|K|K is exactly single DES
    # (encrypt, decrypt and encrypt again under the same key), and is in OpenSSL's default
    # provider where plain DES needs the legacy one.
    encryptor = Cipher(TripleDES(key * 3), modes.ECB()).encryptor()
    return bytes(encryptor.update(bytes(challenge)) + encryptor.finalize())

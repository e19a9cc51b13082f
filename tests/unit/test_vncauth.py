"""VNC Authentication (DES challenge response) against published vectors."""

import pytest

from cpvm.rfb.vncauth import vnc_auth_response

# The fixed key every VNC implementation uses to scramble stored passwords (the vncpasswd
# file, TightVNC's registry value). Scrambling is the same operation as answering a
# challenge, with that key as the "password" and the padded password as the "challenge",
# so the widely published scrambled forms are test vectors for the VNC key quirks.
VNCPASSWD_FIXED_KEY = bytes([23, 82, 107, 6, 35, 78, 88, 7])


@pytest.mark.parametrize(
    "stored_password, scrambled_hex",
    [
        # RealVNC/TightVNC/UltraVNC configuration files for "password".
        (b"password", "dbd83cfd727a1458"),
        (b"passwor", "d1cc5f0a77989279"),
        # vncpasswd.py's README example.
        (b"bar", "9ca3f3686574f277"),
    ],
)
def test_matches_the_published_vncpasswd_scrambles(stored_password, scrambled_hex):
    block = stored_password.ljust(8, b"\0")
    response = vnc_auth_response(VNCPASSWD_FIXED_KEY, block + block)
    assert response.hex() == scrambled_hex * 2


def test_key_bytes_are_bit_reversed():
    # FIPS 81 example: DES key 0123456789ABCDEF on "Now is t" gives 3FA40E8A984D4815.
    # The password whose bytes, bit-reversed, form that key:
    password = bytes.fromhex("80c4a2e691d5b3f7")
    challenge = b"Now is t" * 2
    assert vnc_auth_response(password, challenge).hex() == "3fa40e8a984d4815" * 2


def test_empty_password_is_the_all_zero_key():
    # DES with an all-zero key on an all-zero block gives 8CA64DE9C1B123A7 (NIST vector).
    assert vnc_auth_response(b"", bytes(16)).hex() == "8ca64de9c1b123a7" * 2
    assert vnc_auth_response(b"\0" * 8, bytes(16)) == vnc_auth_response(b"", bytes(16))


def test_each_half_of_the_challenge_is_encrypted_independently():
    # ECB: the two 8-byte blocks do not affect each other.
    first = vnc_auth_response(b"secret", b"A" * 8 + b"B" * 8)
    second = vnc_auth_response(b"secret", b"A" * 8 + b"C" * 8)
    assert first[:8] == second[:8]
    assert first[8:] != second[8:]


def test_password_is_truncated_to_8_bytes():
    challenge = bytes(range(16))
    assert vnc_auth_response(b"12345678-and-more", challenge) == vnc_auth_response(
        b"12345678", challenge
    )
    assert vnc_auth_response(b"1234567", challenge) != vnc_auth_response(b"12345678", challenge)


def test_short_password_is_zero_padded():
    challenge = bytes(range(16))
    assert vnc_auth_response(b"abc", challenge) == vnc_auth_response(b"abc\0\0\0\0\0", challenge)


def test_response_is_16_bytes():
    assert len(vnc_auth_response(b"secret", bytes(range(16)))) == 16


@pytest.mark.parametrize("length", [0, 8, 15, 17, 32])
def test_challenge_must_be_16_bytes(length):
    with pytest.raises(ValueError, match="16 bytes"):
        vnc_auth_response(b"secret", bytes(length))

from __future__ import annotations

import base64

from app.crypto import TokenCipher, new_key


def _key() -> bytes:
    raw = new_key()
    return base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4))


def test_round_trip_hides_the_token() -> None:
    cipher = TokenCipher([_key()])
    blob = cipher.encrypt("secret-token-under-test", context="@a:b\nDEV")
    assert b"secret-token-under-test" not in blob
    assert cipher.decrypt(blob, context="@a:b\nDEV") == "secret-token-under-test"


def test_same_token_encrypts_differently_each_time() -> None:
    cipher = TokenCipher([_key()])
    assert cipher.encrypt("t", context="c") != cipher.encrypt("t", context="c")


def test_context_binds_the_row() -> None:
    cipher = TokenCipher([_key()])
    blob = cipher.encrypt("token", context="@a:b\nDEV")
    assert cipher.decrypt(blob, context="@mallory:b\nDEV") is None


def test_tampering_is_detected() -> None:
    cipher = TokenCipher([_key()])
    blob = bytearray(cipher.encrypt("token", context="c"))
    blob[-1] ^= 1
    assert cipher.decrypt(bytes(blob), context="c") is None


def test_rotation_old_key_still_decrypts_new_key_encrypts() -> None:
    old, new = _key(), _key()
    blob_under_old = TokenCipher([old]).encrypt("token", context="c")
    rotated = TokenCipher([new, old])
    assert rotated.decrypt(blob_under_old, context="c") == "token"
    fresh = rotated.encrypt("token", context="c")
    assert TokenCipher([new]).decrypt(fresh, context="c") == "token"
    assert TokenCipher([old]).decrypt(fresh, context="c") is None


def test_removed_key_cannot_decrypt() -> None:
    blob = TokenCipher([_key()]).encrypt("token", context="c")
    assert TokenCipher([_key()]).decrypt(blob, context="c") is None


def test_digest_tells_tokens_apart_without_revealing_them() -> None:
    cipher = TokenCipher([_key()])
    assert cipher.digest("a") == cipher.digest("a")
    assert cipher.digest("a") != cipher.digest("b")
    assert b"a" != cipher.digest("a")

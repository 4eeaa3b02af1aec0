"""Access tokens at rest: AES-256-GCM under the configured keys.

The first key encrypts; every key decrypts, so a new key can be put first while the old one stays
until the rows it encrypted are gone or re-encrypted (every authenticated request re-encrypts a
device's token under the first key).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

_NONCE = 12
_KEY_ID = 4


def new_key() -> str:
    """A fresh key in the form `SIDECAR_TOKEN_KEYS` takes."""
    return base64.urlsafe_b64encode(os.urandom(32)).decode().rstrip("=")


class TokenCipher:
    def __init__(self, keys: list[bytes]) -> None:
        if not keys:
            raise ValueError("at least one key is needed")
        self._keys = {self._key_id(k): AESGCM(k) for k in keys}
        self._current = self._key_id(keys[0])
        self._mac_key = hashlib.sha256(b"token-digest" + keys[0]).digest()

    @staticmethod
    def _key_id(key: bytes) -> bytes:
        return hashlib.sha256(b"key-id" + key).digest()[:_KEY_ID]

    def encrypt(self, token: str, *, context: str) -> bytes:
        """Encrypt `token`, bound to `context` (the user and device) so rows can't be swapped."""
        nonce = os.urandom(_NONCE)
        sealed = self._keys[self._current].encrypt(nonce, token.encode(), context.encode())
        return self._current + nonce + sealed

    def decrypt(self, blob: bytes, *, context: str) -> str | None:
        """The token, or None when no configured key opens it (removed key, tampered row)."""
        key = self._keys.get(bytes(blob[:_KEY_ID]))
        if key is None:
            return None
        nonce = bytes(blob[_KEY_ID : _KEY_ID + _NONCE])
        try:
            return key.decrypt(nonce, bytes(blob[_KEY_ID + _NONCE :]), context.encode()).decode()
        except InvalidTag:
            return None

    def digest(self, token: str) -> bytes:
        """A keyed digest that tells whether a stored token is the same, without decrypting it."""
        return hmac.new(self._mac_key, token.encode(), hashlib.sha256).digest()

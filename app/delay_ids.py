"""delay_ids. Holding one is what lets a call without a token act on an event, so each is 144
random bits, and carries a tag keyed by the configured token keys: an id the sidecar never
issued is refused at once, without a database call, however many are tried.

Ids issued before tags existed (24 characters, no tag) stay valid; calls without a token on them
share one budget (`app.ratelimit`), so guessing at them costs the database little.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
from enum import Enum

_RANDOM = 18  # bytes: 144 bits
_TAG = 9  # bytes; with the random part, 27 bytes make 36 base64 characters, no padding
TAGGED_LENGTH = 36
_URL_SAFE = re.compile(r"[A-Za-z0-9_-]+")
_UNTAGGED = re.compile(r"[A-Za-z0-9_-]{24}")  # what the sidecar issued before: 18 random bytes


class Kind(Enum):
    TAGGED = "tagged"  # issued by the sidecar under one of the configured keys
    UNTAGGED = "untagged"  # of the form issued before tags
    FORGED = "forged"  # neither: no event can have it


class DelayIds:
    """Issues and recognises delay_ids. The first key tags new ids; every key is accepted, so an
    id stays valid while the key that tagged it is still configured."""

    def __init__(self, keys: list[bytes]) -> None:
        if not keys:
            raise ValueError("at least one key is needed")
        self._keys = [
            hmac.new(key, b"msc4140 delay_id tag", hashlib.sha256).digest() for key in keys
        ]

    def new(self) -> str:
        """A fresh delay_id: url-safe, 144 random bits and the tag."""
        random = secrets.token_bytes(_RANDOM)
        raw = random + self._tag(self._keys[0], random)
        return base64.urlsafe_b64encode(raw).decode()

    def kind(self, delay_id: str) -> Kind:
        """Whether `delay_id` could be one of ours, comparing tags in constant time."""
        if len(delay_id) == TAGGED_LENGTH and _URL_SAFE.fullmatch(delay_id):
            raw = base64.urlsafe_b64decode(delay_id)
            random, tag = raw[:_RANDOM], raw[_RANDOM:]
            valid = False
            for key in self._keys:  # every key, whichever matches: no early answer
                valid |= hmac.compare_digest(tag, self._tag(key, random))
            return Kind.TAGGED if valid else Kind.FORGED
        if _UNTAGGED.fullmatch(delay_id):
            return Kind.UNTAGGED
        return Kind.FORGED

    @staticmethod
    def _tag(key: bytes, random: bytes) -> bytes:
        return hmac.new(key, random, hashlib.sha256).digest()[:_TAG]

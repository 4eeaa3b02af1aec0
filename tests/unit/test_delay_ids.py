"""delay_ids carry a keyed tag: ids the sidecar never issued are told apart without the
database, ids issued before tags are recognised by their form, and rotating keys keeps ids valid
while their key is configured."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
import secrets

import pytest

from app.delay_ids import DelayIds, Kind

URL_SAFE = re.compile(r"[A-Za-z0-9_-]+")


def key() -> bytes:
    return os.urandom(32)


def test_new_ids_are_url_safe_with_144_random_bits_and_recognised() -> None:
    ids = DelayIds([key()])
    issued = [ids.new() for _ in range(1000)]
    assert len(set(issued)) == 1000
    for delay_id in issued:
        assert URL_SAFE.fullmatch(delay_id)
        assert len(delay_id) == 36
        assert ids.kind(delay_id) is Kind.TAGGED
    # The first 24 characters are the 144 random bits; they vary everywhere.
    for position in range(24):
        assert len({d[position] for d in issued}) > 50, position


def test_any_change_makes_an_id_forged() -> None:
    ids = DelayIds([key()])
    delay_id = ids.new()
    for position in range(len(delay_id)):
        other = "A" if delay_id[position] != "A" else "B"
        changed = delay_id[:position] + other + delay_id[position + 1 :]
        assert ids.kind(changed) is Kind.FORGED, position


@pytest.mark.parametrize(
    "candidate",
    ["", "x", "nope", "a" * 23, "a" * 25, "a" * 35, "a" * 37, "a" * 24 + "=", "é" * 24, "a b" * 12],
)
def test_other_forms_are_forged(candidate: str) -> None:
    assert DelayIds([key()]).kind(candidate) is Kind.FORGED


def test_ids_of_the_untagged_form_are_recognised() -> None:
    ids = DelayIds([key()])
    for _ in range(100):
        assert ids.kind(secrets.token_urlsafe(18)) is Kind.UNTAGGED
    assert ids.kind("a" * 36) is Kind.FORGED  # the tagged length without the tag


def test_ids_tagged_by_another_key_are_forged_and_rotation_keeps_old_ids() -> None:
    old, new = key(), key()
    issued_before = DelayIds([old]).new()
    assert DelayIds([key()]).kind(issued_before) is Kind.FORGED
    rotated = DelayIds([new, old])
    assert rotated.kind(issued_before) is Kind.TAGGED
    issued_after = rotated.new()
    assert DelayIds([new]).kind(issued_after) is Kind.TAGGED  # the first key tags
    assert DelayIds([old]).kind(issued_after) is Kind.FORGED
    assert DelayIds([new]).kind(issued_before) is Kind.FORGED  # once the old key is removed


def test_the_tag_is_not_the_token_key() -> None:
    """The key tagging ids is derived from a token key, never the key itself."""
    secret = key()
    delay_id = DelayIds([secret]).new()
    raw = base64.urlsafe_b64decode(delay_id)
    assert raw[18:] != hmac.new(secret, raw[:18], hashlib.sha256).digest()[:9]

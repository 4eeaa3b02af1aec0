"""A device's sealed token is made once and reused while the device presents the same token."""

from __future__ import annotations

import os

from app.crypto import TokenCipher
from app.replay import RecentSeals, token_context


def cipher() -> TokenCipher:
    return TokenCipher([os.urandom(32)])


def test_the_same_token_of_a_device_is_sealed_once() -> None:
    c = cipher()
    seals = RecentSeals(c)
    first = seals.seal("@alice:test", "DEV", "token-1")
    assert seals.seal("@alice:test", "DEV", "token-1") is first
    assert first.digest == c.digest("token-1")
    assert c.decrypt(first.token, context=token_context("@alice:test", "DEV")) == "token-1"


def test_a_new_token_or_another_device_is_sealed_anew() -> None:
    c = cipher()
    seals = RecentSeals(c)
    first = seals.seal("@alice:test", "DEV", "token-1")
    newer = seals.seal("@alice:test", "DEV", "token-2")
    assert newer.digest == c.digest("token-2")
    assert c.decrypt(newer.token, context=token_context("@alice:test", "DEV")) == "token-2"
    # Sealed for its own device: another device's row could not be swapped in.
    other = seals.seal("@alice:test", None, "token-2")
    assert c.decrypt(other.token, context=token_context("@alice:test", None)) == "token-2"
    assert c.decrypt(other.token, context=token_context("@alice:test", "DEV")) is None
    assert seals.seal("@alice:test", "DEV", "token-1") is not first


def test_only_the_most_recently_used_devices_are_kept() -> None:
    seals = RecentSeals(cipher(), size=2)
    a = seals.seal("@a:test", "A", "ta")
    b = seals.seal("@b:test", "B", "tb")
    assert seals.seal("@a:test", "A", "ta") is a  # now the most recent
    seals.seal("@c:test", "C", "tc")  # pushes out b
    assert seals.seal("@a:test", "A", "ta") is a
    assert seals.seal("@b:test", "B", "tb") is not b

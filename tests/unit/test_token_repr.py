"""An access token never shows in the repr of what holds it: a repr ends up in logs (a logged
object, a traceback's locals, an assertion's message) far from where the token was used."""

from __future__ import annotations

import os

from app.auth import Requester
from app.crypto import TokenCipher
from app.homeserver import Credential
from app.replay import SealedToken

TOKEN = "not-a-real-token-for-the-repr-test"


def test_a_requester_hides_its_token() -> None:
    requester = Requester("@alice:test", "DEV", TOKEN)
    assert TOKEN not in repr(requester)
    assert "@alice:test" in repr(requester)


def test_a_credential_hides_its_token() -> None:
    for credential in (Credential(TOKEN), Credential(TOKEN, "@alice:test", "DEV")):
        assert TOKEN not in repr(credential)
        assert TOKEN not in repr(credential.without_device())


def test_a_sealed_token_hides_its_ciphertext_and_digest() -> None:
    cipher = TokenCipher([os.urandom(32)])
    blob = cipher.encrypt(TOKEN, context="@alice:test\nDEV")
    digest = cipher.digest(TOKEN)
    sealed = SealedToken("@alice:test", "DEV", blob, digest)
    shown = repr(sealed)
    assert TOKEN not in shown
    assert repr(blob) not in shown
    assert repr(digest) not in shown

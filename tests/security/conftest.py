"""Security tests: tokens at rest, secrets kept out of logs and answers, tenancy, untrusted input
from clients and from the homeserver. They run against the real PostgreSQL of the integration
tests and the fake homeserver."""

from __future__ import annotations

import httpx
import pytest

from tests.support.fakes import FakeClock, FakeHomeserver


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "security: tokens, tenancy, secrets in logs, hostile input (tests/security)"
    )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "/tests/security/" in str(item.path):
            item.add_marker(pytest.mark.security)


class TolerantHomeserver(FakeHomeserver):
    """The fake homeserver, answering a body it cannot read as a homeserver does (400 M_NOT_JSON)
    instead of raising, so that requests passed through with any body get an answer."""

    def handle(self, request: httpx.Request) -> httpx.Response:
        try:
            return super().handle(request)
        except (ValueError, UnicodeDecodeError):
            return httpx.Response(400, json={"errcode": "M_NOT_JSON", "error": "Content not JSON"})


@pytest.fixture
def homeserver(clock: FakeClock) -> FakeHomeserver:
    hs = TolerantHomeserver(clock)
    hs.add_user("alice_token", "@alice:test", "ALICEDEV")
    hs.add_user("alice_token_2", "@alice:test", "ALICEDEV")
    hs.add_user("alice_phone", "@alice:test", "PHONE")
    hs.add_user("bob_token", "@bob:test", "BOBDEV")
    return hs

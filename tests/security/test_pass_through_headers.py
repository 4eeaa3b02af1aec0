"""A request passed through to the homeserver keeps header values that are not ASCII (a device
name in a User-Agent) byte for byte, as nginx would have passed them on."""

from __future__ import annotations

import httpx
import pytest

from tests.integration.common import ALICE, V3, state_path
from tests.support.fakes import FakeHomeserver

NON_ASCII_AGENT = "Element/1.0 (Pixel; Android; Jürgen's phone)".encode()


@pytest.mark.parametrize(
    ("method", "path", "headers"),
    [
        ("GET", "/_matrix/client/versions", {}),
        ("GET", f"{V3}/capabilities", ALICE),
        # A state change without a delay, routed here: passed through unchanged.
        ("PUT", state_path("k"), ALICE),
    ],
)
async def test_header_values_that_are_not_ascii_are_passed_through(
    client: httpx.AsyncClient,
    homeserver: FakeHomeserver,
    method: str,
    path: str,
    headers: dict[str, str],
) -> None:
    raw_headers = [(k.encode(), v.encode()) for k, v in headers.items()]
    raw_headers.append((b"user-agent", NON_ASCII_AGENT))
    r = await client.request(method, path, headers=raw_headers, content=b"{}")
    assert r.status_code == 200, r.text
    [forwarded] = [q for q in homeserver.requests if q.url.raw_path == path.encode()]
    agents = [v for k, v in forwarded.headers.raw if k.lower() == b"user-agent"]
    assert agents == [NON_ASCII_AGENT]

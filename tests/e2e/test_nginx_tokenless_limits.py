"""The limits of deploy/nginx/sidecar-limits.conf on calls without an access token, through a real
nginx running the rendered local-stack configuration, with recording stand-ins for the backends.

Each test gets a fresh nginx (fresh zones). Budgets are spent by sending faster than they refill
(50 a second per address, 500 a second in all): calls go out back to back on kept-alive
connections, many times faster than that, and each test sends until the first refusal, with a cap.
Client addresses other than 127.0.0.1 are other loopback addresses (127.0.0.0/8), bound as the
source of the connection.
"""

from __future__ import annotations

import http.client
import json
import secrets
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from http.server import ThreadingHTTPServer
from typing import Any

import pytest
from devstack import nginx, procs

from tests.e2e.support import UNSTABLE
from tests.e2e.test_nginx_routing import Proxy, Recorder

pytestmark = pytest.mark.e2e

PER_ADDRESS_BURST = 100  # sidecar-locations.conf
ALL_BURST = 500


class FastRecorder(Recorder):
    """The routing tests' recorder, answering without Nagle's delay (each answer that went
    through would otherwise wait out a delayed acknowledgement, ~40 ms: slower than the budgets
    refill), and answering preflights too."""

    def serve(self, name: str) -> ThreadingHTTPServer:
        server = super().serve(name)
        handler: Any = server.RequestHandlerClass
        handler.disable_nagle_algorithm = True
        handler.do_OPTIONS = handler.do_GET  # a CORS preflight, recorded like the rest
        return server


@pytest.fixture
def proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    recorder = FastRecorder()
    sidecar = recorder.serve("sidecar")
    homeserver = recorder.serve("homeserver")
    config = nginx.render(
        tmp_path_factory.mktemp("nginx"),
        procs.free_port(),
        homeserver.server_address[1],
        sidecar.server_address[1],
    )
    process = nginx.start(config)
    try:
        assert procs.wait_until(lambda: procs.http_ok(config.url + "/_matrix/client/versions"), 15)
        recorder.take()
        yield Proxy(config.url, recorder, config)
    finally:
        procs.stop(process.pid, nginx.MARKER)
        process.wait()
        sidecar.shutdown()
        homeserver.shutdown()


@dataclass(frozen=True)
class Answer:
    status: int
    body: bytes
    headers: dict[str, str]


class Client:
    """One kept-alive connection to nginx from a given loopback address."""

    def __init__(self, proxy: Proxy, source: str = "127.0.0.1") -> None:
        self.connection = http.client.HTTPConnection(
            "127.0.0.1", proxy.config.listen_port, timeout=30, source_address=(source, 0)
        )

    def send(
        self, method: str, target: str, headers: dict[str, str] | None = None, body: bytes = b"{}"
    ) -> Answer:
        self.connection.request(
            method,
            target,
            body=body,
            headers={"Content-Type": "application/json", **(headers or {})},
        )
        answer = self.connection.getresponse()
        return Answer(answer.status, answer.read(), {k.lower(): v for k, v in answer.getheaders()})

    def close(self) -> None:
        self.connection.close()


def restart(delay_id: str | None = None) -> str:
    return f"{UNSTABLE}/delayed_events/{delay_id or secrets.token_urlsafe(27)}/restart"


def until_refused(client: Client, cap: int, **kwargs: object) -> tuple[int, Answer | None]:
    """Tokenless restarts of random ids until the first refusal: how many went through, and it."""
    for sent in range(cap):
        answer = client.send("POST", restart(), **kwargs)  # type: ignore[arg-type]
        if answer.status == 429:
            return sent, answer
        assert answer.status == 200, answer
    return cap, None


def test_tokenless_calls_from_one_address_are_refused_beyond_its_budget(proxy: Proxy) -> None:
    client = Client(proxy)
    try:
        passed, refused = until_refused(client, 5_000)
    finally:
        client.close()
    assert refused is not None, "no call was refused"
    assert passed >= PER_ADDRESS_BURST
    # Refused by nginx: only the calls that went through reached the sidecar.
    assert len(proxy.recorder.take()) == passed


def test_the_refusal_is_a_matrix_error_with_retry_after(proxy: Proxy) -> None:
    client = Client(proxy)
    try:
        _, refused = until_refused(client, 5_000)
    finally:
        client.close()
    assert refused is not None
    assert refused.headers["content-type"].startswith("application/json")
    body = json.loads(refused.body)
    assert body["errcode"] == "M_LIMIT_EXCEEDED"
    assert isinstance(body["error"], str)
    assert body["retry_after_ms"] == 1000
    assert refused.headers["retry-after"] == "1"
    assert refused.headers["access-control-allow-origin"] == "*"


@pytest.mark.parametrize(
    ("method", "headers", "query"),
    [
        ("POST", {"Authorization": "Bearer token"}, ""),
        ("POST", {}, "?access_token=token"),
        ("POST", {}, "?ACCESS_TOKEN=token"),
        ("POST", {}, "?access%5Ftoken=token"),
        ("OPTIONS", {"Origin": "https://app.example", "Access-Control-Request-Method": "POST"}, ""),
    ],
    ids=["authorization-header", "query-token", "query-token-upper", "query-token-encoded", "cors"],
)
def test_calls_with_a_token_and_preflights_are_not_counted(
    proxy: Proxy, method: str, headers: dict[str, str], query: str
) -> None:
    client = Client(proxy)
    try:
        _, refused = until_refused(client, 5_000)
        assert refused is not None
        answers = [client.send(method, restart() + query, headers) for _ in range(3)]
    finally:
        client.close()
    assert [a.status for a in answers] == [200, 200, 200]
    last = proxy.recorder.take()[-3:]
    assert [(upstream, verb) for upstream, verb, _ in last] == [("sidecar", method)] * 3
    assert all(path.endswith("/restart" + query) for _, _, path in last)


def test_other_addresses_keep_their_own_budget(proxy: Proxy) -> None:
    first = Client(proxy, "127.0.0.1")
    second = Client(proxy, "127.0.0.2")
    try:
        _, refused = until_refused(first, 5_000)
        assert refused is not None
        answer = second.send("POST", restart())
    finally:
        first.close()
        second.close()
    assert answer.status == 200


def test_all_addresses_together_share_one_budget(proxy: Proxy) -> None:
    # Forty addresses, each sending fewer calls than its own burst: the refusals that come can
    # only be the shared budget's.
    per_address = PER_ADDRESS_BURST - 10
    sources = [f"127.0.1.{n}" for n in range(1, 41)]

    def spend(source: str) -> tuple[int, Answer | None]:
        client = Client(proxy, source)
        try:
            return until_refused(client, per_address)
        finally:
            client.close()

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(spend, sources))
    refused = [answer for _, answer in results if answer is not None]
    assert refused, "no call was refused"
    assert sum(passed for passed, _ in results) >= ALL_BURST
    assert all(a.status == 429 for a in refused)


def test_calls_to_the_homeserver_are_not_limited(proxy: Proxy) -> None:
    client = Client(proxy)
    try:
        _, refused = until_refused(client, 5_000)
        assert refused is not None
        answer = client.send("GET", "/_matrix/client/v3/profile/%40alice%3Alocalhost", body=b"")
    finally:
        client.close()
    assert answer.status == 200
    assert proxy.recorder.take()[-1][0] == "homeserver"


def test_refusals_are_left_out_of_the_access_log(proxy: Proxy) -> None:
    # A flood would otherwise write a line per refused call; the calls that went through stay.
    client = Client(proxy)
    try:
        passed, refused = until_refused(client, 5_000)
        assert refused is not None
        # The budget refills as time passes: a later call may go through too, and is logged.
        later = [client.send("POST", restart()) for _ in range(20)]
        passed += sum(answer.status == 200 for answer in later)
    finally:
        client.close()
    log = (proxy.config.prefix / "access.log").read_text().splitlines()
    restarts = [line for line in log if "/restart HTTP/1.1" in line]
    assert [line for line in restarts if '" 429 ' in line] == []
    assert len([line for line in restarts if '" 200 ' in line]) == passed

"""The limits of deploy/nginx/sidecar-limits.conf on calls without an access token, through a real
nginx running the rendered local-stack configuration, with recording stand-ins for the backends.

Each test gets a fresh nginx (fresh zones). Budgets are spent by sending faster than they refill
(50 a second per address, 500 a second in all): calls go out back to back on kept-alive
connections, many times faster than that, and each test sends until the first refusal, with a cap.
Client addresses other than 127.0.0.1 are other loopback addresses (127.0.0.0/8), bound as the
source of the connection; IPv6 clients are given by an `X-Real-IP` header that the IPv6 tests'
nginx trusts from loopback (ngx_http_realip_module, as behind a load balancer).
"""

from __future__ import annotations

import http.client
import ipaddress
import json
import random
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


# Server-level additions of the IPv6 tests: the client address from `X-Real-IP` when the
# connection comes from loopback, and a location answering the per-address zone's key for it.
REAL_IP = """
        set_real_ip_from 127.0.0.1;
        real_ip_header X-Real-IP;
        location = /_test/client-key {
            default_type text/plain;
            return 200 "$delayed_events_tokenless_client";
        }
"""


def start_proxy(tmp_path_factory: pytest.TempPathFactory, extra: str = "") -> Iterator[Proxy]:
    recorder = FastRecorder()
    sidecar = recorder.serve("sidecar")
    homeserver = recorder.serve("homeserver")
    config = nginx.render(
        tmp_path_factory.mktemp("nginx"),
        procs.free_port(),
        homeserver.server_address[1],
        sidecar.server_address[1],
    )
    if extra:
        text = config.conf.read_text()
        anchor = "server_name localhost;"
        assert anchor in text
        config.conf.write_text(text.replace(anchor, anchor + extra, 1))
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


@pytest.fixture
def proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    yield from start_proxy(tmp_path_factory)


@pytest.fixture
def real_ip_proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    yield from start_proxy(tmp_path_factory, REAL_IP)


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


def until_refused(
    client: Client, cap: int, query: str = "", **kwargs: object
) -> tuple[int, Answer | None]:
    """Tokenless restarts of random ids until the first refusal: how many went through, and it."""
    for sent in range(cap):
        answer = client.send("POST", restart() + query, **kwargs)  # type: ignore[arg-type]
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
        ("POST", {"Authorization": "bearer token"}, ""),
        ("POST", {}, "?access_token=token"),
        ("POST", {}, "?x=1&access_token=token"),
        ("POST", {}, "?x=1;access_token=token"),
        ("OPTIONS", {"Origin": "https://app.example", "Access-Control-Request-Method": "POST"}, ""),
    ],
    ids=[
        "authorization-header",
        "authorization-header-lowercase-scheme",
        "query-token",
        "query-token-after-another-parameter",
        "query-token-after-a-semicolon",
        "cors",
    ],
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


@pytest.mark.parametrize(
    ("headers", "query"),
    [
        ({}, "?%41=1"),
        ({}, "?x%=1"),
        ({}, "?x%="),
        ({}, "?x=1"),
        ({}, "?access_token="),
        ({}, "?access_token"),
        ({}, "?access_token=&x=1"),
        ({}, "?ACCESS_TOKEN=token"),
        ({}, "?access%5Ftoken=token"),
        ({}, "?%61ccess_token=token"),
        ({}, "?x_access_token=token"),
        ({"Authorization": "x"}, ""),
        ({"Authorization": "Bearer"}, ""),
        ({"Authorization": "Bearer "}, ""),
        ({"Authorization": "Basic dXNlcjpwYXNz"}, ""),
        ({"Authorization": "Bearertoken"}, ""),
    ],
    ids=[
        "encoded-junk-name",
        "bad-escape-in-a-name",
        "bad-escape-in-a-name-no-value",
        "another-parameter",
        "empty-query-token",
        "query-token-without-a-value",
        "empty-query-token-then-another",
        "query-token-name-in-capitals",
        "query-token-name-encoded",
        "query-token-name-first-letter-encoded",
        "query-token-name-as-a-suffix",
        "authorization-not-a-scheme",
        "authorization-bearer-without-a-token",
        "authorization-bearer-and-a-space",
        "authorization-basic",
        "authorization-bearer-run-together",
    ],
)
def test_calls_not_carrying_a_token_as_the_sidecar_reads_it_are_counted(
    proxy: Proxy, headers: dict[str, str], query: str
) -> None:
    # The sidecar reads none of these as a token: it would act on them without one (or refuse
    # them itself), so nginx counts them like any call without a token. Calls not counted would
    # never be refused.
    client = Client(proxy)
    try:
        passed, refused = until_refused(client, 5_000, query, headers=headers)
    finally:
        client.close()
    assert refused is not None
    assert passed >= PER_ADDRESS_BURST


def test_calls_with_any_other_method_are_counted(proxy: Proxy) -> None:
    # nginx takes `-` and `_` in a method's name.
    client = Client(proxy)
    try:
        statuses = []
        while len(statuses) < 5_000 and 429 not in statuses:
            statuses.append(client.send("M-SEARCH", restart()).status)
    finally:
        client.close()
    assert statuses[-1] == 429
    assert len(statuses) > PER_ADDRESS_BURST


def test_calls_from_one_ipv6_64_share_its_budget(real_ip_proxy: Proxy) -> None:
    # Each call from another address of the /64: fewer calls than the budget of all addresses
    # together, so only the /64's own budget can refuse them.
    client = Client(real_ip_proxy)
    try:
        for n in range(1, ALL_BURST - 100):
            address = f"2001:db8:1:2:{n:x}::{n:x}"
            answer = client.send("POST", restart(), {"X-Real-IP": address})
            if answer.status == 429:
                break
            assert answer.status == 200
        other = [
            client.send("POST", restart(), {"X-Real-IP": address}).status
            for address in ("2001:db8:1:3::1", "2001:db8::1", "127.0.0.2")
        ]
    finally:
        client.close()
    assert answer.status == 429
    assert n > PER_ADDRESS_BURST
    assert other == [200, 200, 200]


def ipv6(groups: list[int]) -> ipaddress.IPv6Address:
    return ipaddress.IPv6Address(b"".join(g.to_bytes(2, "big") for g in groups))


# Interface identifiers (the last 64 bits) that move `::` around: before, after and inside them.
SUFFIXES = [[0, 0, 0, 0], [0, 0, 0, 1], [1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [1, 0, 0, 1]]
SUFFIXES += [[0, 1, 2, 3], [0xFFFF] * 4, [5, 0, 0, 7]]


def ipv6_networks(count: int) -> list[list[int]]:
    """The first four groups of IPv6 /64s, with zero groups in every position."""
    rng = random.Random(64)
    prefixes = [[0, 0, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1], [0, 1, 0, 0], [0x2001, 0xDB8, 0, 0]]
    while len(prefixes) < count:
        prefix = [rng.choice((0, 0, 1, 0xFFFF, rng.randrange(1 << 16))) for _ in range(4)]
        if prefix not in prefixes:
            prefixes.append(prefix)
    return prefixes


def test_the_per_address_key_of_an_ipv6_client_is_its_64(real_ip_proxy: Proxy) -> None:
    client = Client(real_ip_proxy)
    keys: dict[bytes, set[str]] = {}

    def key(address: ipaddress.IPv6Address) -> bytes:
        answer = client.send("GET", "/_test/client-key", {"X-Real-IP": str(address)}, b"")
        assert answer.status == 200
        assert answer.body
        return answer.body

    try:
        for prefix in ipv6_networks(60):
            found = set()
            for suffix in SUFFIXES:
                address = ipv6(prefix + suffix)
                if int(address) >> 32 in (0, 0xFFFF):  # IPv4-compatible or mapped: below
                    continue
                found.add(key(address))
            # Every address of a /64 has its key ...
            assert len(found) == 1, (prefix, found)
            keys.setdefault(found.pop(), set()).add(":".join(f"{g:x}" for g in prefix))
        # ... and no two /64s share one.
        assert all(len(prefixes) == 1 for prefixes in keys.values()), keys
        # An IPv4 client that reaches nginx over IPv6 keeps a key of its own.
        mapped = {key(ipaddress.IPv6Address(f"::ffff:192.0.2.{n}")) for n in (1, 2)}
    finally:
        client.close()
    assert len(mapped) == 2
    assert not mapped & keys.keys()


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
        # (The budget refills meanwhile: some of these may go through, and are logged.)
        statuses = [client.send("POST", restart()).status for _ in range(20)]
    finally:
        client.close()
    log = (proxy.config.prefix / "access.log").read_text().splitlines()
    restarts = [line for line in log if "/restart HTTP/1.1" in line]
    assert [line for line in restarts if '" 429 ' in line] == []
    assert len([line for line in restarts if '" 200 ' in line]) == passed + statuses.count(200)

"""The nginx routing of deploy/nginx/, with recording stand-ins for the sidecar and the homeserver.

A real nginx runs the rendered local-stack configuration (which includes the deployed map and
locations files unchanged); two tiny HTTP servers record which of them received each request and
the exact request line. This pins down the routing decisions one by one, independent of the sidecar:
where each form of request goes, and that the URI arrives byte for byte.
"""

from __future__ import annotations

import json
import re
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from devstack import nginx, procs

from tests.e2e.support import call, raw_call

pytestmark = pytest.mark.e2e

ROOM = "%21room%3Alocalhost"
MEMBER_KEY = "_%40alice%3Alocalhost_DEVICE_m.call"


@dataclass
class Recorder:
    """Requests seen by the stand-in upstreams, as (upstream, method, raw request target)."""

    seen: list[tuple[str, str, str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def serve(self, name: str) -> ThreadingHTTPServer:
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                self.rfile.read(length)
                with recorder.lock:
                    recorder.seen.append((name, self.command, self.path))
                body = json.dumps({"upstream": name}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_PUT = do_POST = _answer

            def log_message(self, format: str, *args: object) -> None:
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return server

    def take(self) -> list[tuple[str, str, str]]:
        with self.lock:
            seen, self.seen = self.seen, []
        return seen


@dataclass
class Proxy:
    url: str
    recorder: Recorder
    config: nginx.NginxConfig


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    recorder = Recorder()
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
        yield Proxy(config.url, recorder, config)
    finally:
        procs.stop(process.pid, nginx.MARKER)
        process.wait()
        sidecar.shutdown()
        homeserver.shutdown()


def route(proxy: Proxy, method: str, target: str) -> tuple[int, list[tuple[str, str, str]]]:
    proxy.recorder.take()
    answer = call(proxy.url, method, target, body={} if method != "GET" else None)
    return answer.status, proxy.recorder.take()


def test_rendered_config_passes_nginx_t(proxy: Proxy) -> None:
    result = nginx.check(proxy.config)
    assert result.returncode == 0, result.stderr
    assert "syntax is ok" in result.stderr
    assert "test is successful" in result.stderr


def test_nginx_listens_on_loopback_only(proxy: Proxy) -> None:
    listens = re.findall(r"^\s*listen\s+([^;]+);", proxy.config.conf.read_text(), re.M)
    assert listens, "no listen directive"
    assert all(value.startswith("127.0.0.1:") for value in listens), listens


def delayed(query: str) -> str:
    return "?" + query


# Requests that schedule a delayed event (or might): they must reach the sidecar, never the
# homeserver, with the request target unchanged.
TO_SIDECAR = {
    "v3 send with txn": ("PUT", f"/_matrix/client/v3/rooms/{ROOM}/send/m.room.message/t1"
                                "?org.matrix.msc4140.delay=1500"),
    "r0 send with txn": ("PUT", f"/_matrix/client/r0/rooms/{ROOM}/send/m.room.message/t1"
                                "?org.matrix.msc4140.delay=1500"),
    "unstable send": ("PUT", f"/_matrix/client/unstable/rooms/{ROOM}/send/m.room.message/t1"
                             "?org.matrix.msc4140.delay=1500"),
    "api/v1 send": ("PUT", f"/_matrix/client/api/v1/rooms/{ROOM}/send/m.room.message/t1"
                           "?org.matrix.msc4140.delay=1500"),
    "send without txn": ("POST", f"/_matrix/client/v3/rooms/{ROOM}/send/m.room.message"
                                 "?org.matrix.msc4140.delay=1500"),
    "state with key": ("PUT", f"/_matrix/client/v3/rooms/{ROOM}/state/m.call/{MEMBER_KEY}"
                              "?org.matrix.msc4140.delay=1500"),
    "r0 state with key": ("PUT", f"/_matrix/client/r0/rooms/{ROOM}/state/m.call/{MEMBER_KEY}"
                                 "?org.matrix.msc4140.delay=1500"),
    "state without key": ("PUT", f"/_matrix/client/v3/rooms/{ROOM}/state/m.call"
                                 "?org.matrix.msc4140.delay=1500"),
    "state with trailing slash": ("PUT", f"/_matrix/client/v3/rooms/{ROOM}/state/m.call/"
                                         "?org.matrix.msc4140.delay=1500"),
    "param first": ("PUT", f"/_matrix/client/v3/rooms/{ROOM}/send/m.room.message/t1"
                           "?org.matrix.msc4140.delay=1500&org.matrix.msc4354.sticky_duration_ms=9"),
    "param last": ("PUT", f"/_matrix/client/v3/rooms/{ROOM}/send/m.room.message/t1"
                          "?org.matrix.msc4354.sticky_duration_ms=9&org.matrix.msc4140.delay=1500"),
    "param among others": ("PUT", f"/_matrix/client/v3/rooms/{ROOM}/send/m.room.message/t1"
                                  "?a=1&org.matrix.msc4140.delay=1500&b=2"),
    "dots %2E": ("PUT", f"/_matrix/client/v3/rooms/{ROOM}/send/m.room.message/t1"
                        "?org%2Ematrix%2Emsc4140%2Edelay=1500"),
    "dots %2e": ("PUT", f"/_matrix/client/v3/rooms/{ROOM}/send/m.room.message/t1"
                        "?org%2ematrix%2emsc4140%2edelay=1500"),
    "dots mixed": ("PUT", f"/_matrix/client/v3/rooms/{ROOM}/state/m.call/{MEMBER_KEY}"
                          "?x=1&org%2Ematrix.msc4140%2edelay=1500"),
    "parent_delay_id": ("PUT", f"/_matrix/client/v3/rooms/{ROOM}/send/m.room.message/t1"
                               "?org.matrix.msc4140.parent_delay_id=abc"),
    "semicolon separator": ("PUT", f"/_matrix/client/v3/rooms/{ROOM}/send/m.room.message/t1"
                                   "?a=1;org.matrix.msc4140.delay=1500"),
    "delay without value": ("PUT", f"/_matrix/client/v3/rooms/{ROOM}/send/m.room.message/t1"
                                   "?org.matrix.msc4140.delay"),
    "other encoded letter": ("PUT", f"/_matrix/client/v3/rooms/{ROOM}/send/m.room.message/t1"
                                    "?%6Frg.matrix.msc4140.delay=1500"),
    "encoded slash in room id": ("PUT", "/_matrix/client/v3/rooms/%21a%2Fb%3Alocalhost/send/"
                                        "m.room.message/t1?org.matrix.msc4140.delay=1500"),
    "gen B schedule v3": ("PUT", f"/_matrix/client/v3/rooms/{ROOM}/delayed_event/m.call/t1"),
    "gen B schedule unstable": ("PUT", "/_matrix/client/unstable/org.matrix.msc4140/rooms/"
                                       f"{ROOM}/delayed_event/m.call/t1"),
    "unstable restart": ("POST", "/_matrix/client/unstable/org.matrix.msc4140/delayed_events/"
                                 "abcDEF123/restart"),
    "v1 body action": ("POST", "/_matrix/client/v1/delayed_events/abcDEF123"),
    "unstable list": ("GET", "/_matrix/client/unstable/org.matrix.msc4140/delayed_events"
                             "?status=finalised"),
    "v1 list": ("GET", "/_matrix/client/v1/delayed_events"),
    "msc4486 list": ("GET", "/_matrix/client/unstable/org.matrix.msc4486/delayed_events"),
    "msc4486 list, filtered": ("GET", "/_matrix/client/unstable/org.matrix.msc4486/delayed_events"
                                      f"?dir=b&status=failed&room_id={ROOM}&from_ts=1&to_ts=9"),
    "v1 get one": ("GET", "/_matrix/client/v1/delayed_events/abcDEF123"),
    "gen B, type state": ("PUT", f"/_matrix/client/v3/rooms/{ROOM}/delayed_event/state/t"),
    "delayed state key as delayed_events": ("PUT", f"/_matrix/client/v3/rooms/{ROOM}/state/m.call/"
                                                   "delayed_events?org.matrix.msc4140.delay=1"),
    "delay +600000": ("PUT", f"/_matrix/client/v3/rooms/{ROOM}/send/m.room.message/t1"
                             "?org.matrix.msc4140.delay=+600000"),
    "delay 600000%20": ("PUT", f"/_matrix/client/v3/rooms/{ROOM}/send/m.room.message/t1"
                               "?org.matrix.msc4140.delay=600000%20"),
    "delay -0": ("PUT", f"/_matrix/client/v3/rooms/{ROOM}/state/m.call/{MEMBER_KEY}"
                        "?org.matrix.msc4140.delay=-0"),
    "delay empty": ("PUT", f"/_matrix/client/v3/rooms/{ROOM}/send/m.room.message/t1"
                           "?org.matrix.msc4140.delay="),
    "versions": ("GET", "/_matrix/client/versions"),
    "capabilities": ("GET", "/_matrix/client/v3/capabilities"),
}  # fmt: skip


@pytest.mark.parametrize(("method", "target"), TO_SIDECAR.values(), ids=TO_SIDECAR.keys())
def test_reaches_the_sidecar_unchanged(proxy: Proxy, method: str, target: str) -> None:
    status, seen = route(proxy, method, target)
    assert status == 200
    assert seen == [("sidecar", method, target)]


TO_HOMESERVER = {
    "plain send": ("PUT", f"/_matrix/client/v3/rooms/{ROOM}/send/m.room.message/t1"),
    "plain state": ("PUT", f"/_matrix/client/v3/rooms/{ROOM}/state/m.call/{MEMBER_KEY}"),
    "state read": ("GET", f"/_matrix/client/v3/rooms/{ROOM}/state/m.call/{MEMBER_KEY}"),
    "other params only": ("PUT", f"/_matrix/client/v3/rooms/{ROOM}/send/m.room.message/t1"
                                 "?org.matrix.msc4354.sticky_duration_ms=9"),
    "a longer name": ("PUT", f"/_matrix/client/v3/rooms/{ROOM}/send/m.room.message/t1"
                             "?xorg.matrix.msc4140.delay=1500"),
    "a different name": ("PUT", f"/_matrix/client/v3/rooms/{ROOM}/send/m.room.message/t1"
                                "?org.matrix.msc4140.delayx=1500"),
    "delay text in a value": ("PUT", f"/_matrix/client/v3/rooms/{ROOM}/send/m.room.message/t1"
                                     "?a=org.matrix.msc4140.delay=1500"),
    "sync": ("GET", "/_matrix/client/v3/sync?since=s1&timeout=0"),
    "messages": ("GET", f"/_matrix/client/v3/rooms/{ROOM}/messages?dir=b"),
    "r0 capabilities": ("GET", "/_matrix/client/r0/capabilities"),
    "state key delayed_events": ("PUT", f"/_matrix/client/v3/rooms/{ROOM}/state/m.call/"
                                        "delayed_events"),
    "state read delayed_event": ("GET", f"/_matrix/client/v3/rooms/{ROOM}/state/m.call/"
                                        "delayed_event"),
    "event type delayed_event": ("PUT", f"/_matrix/client/v3/rooms/{ROOM}/state/delayed_event/k"),
    "synapse client": ("GET", "/_synapse/client/pick_username/account_details"),
    "another msc's delayed_events": ("GET", "/_matrix/client/unstable/org.example.msc9999/"
                                            "delayed_events"),
}  # fmt: skip


@pytest.mark.parametrize(("method", "target"), TO_HOMESERVER.values(), ids=TO_HOMESERVER.keys())
def test_reaches_the_homeserver_unchanged(proxy: Proxy, method: str, target: str) -> None:
    status, seen = route(proxy, method, target)
    assert status == 200
    assert seen == [("homeserver", method, target)]


# Paths that nginx would resolve differently from the homeserver: refused when they carry a delay.
REFUSED = {
    "dot-dot event type": f"/_matrix/client/v3/rooms/{ROOM}/send/../t1"
                          "?org.matrix.msc4140.delay=1500",
    "encoded dot-dot event type": f"/_matrix/client/v3/rooms/{ROOM}/state/%2E%2e/k"
                                  "?a=1&org%2ematrix%2emsc4140%2edelay=1500",
    "dot state key": f"/_matrix/client/v3/rooms/{ROOM}/state/m.call/."
                     "?org.matrix.msc4140.delay=1500",
}  # fmt: skip


@pytest.mark.parametrize("target", REFUSED.values(), ids=REFUSED.keys())
def test_ambiguous_delayed_paths_are_refused(proxy: Proxy, target: str) -> None:
    status, seen = route(proxy, "PUT", target)
    assert status == 400
    assert seen == []


@pytest.mark.parametrize(
    "target", [REFUSED["dot state key"], "/health"], ids=["refused", "not exposed"]
)
def test_nginx_errors_are_matrix_json(proxy: Proxy, target: str) -> None:
    answer = call(proxy.url, "PUT", target, body={})
    assert answer.content_type.startswith("application/json")
    assert answer.json()["errcode"] == "M_UNRECOGNIZED"


NOT_EXPOSED = ["/health", "/metrics", "/ready", "/_synapse/admin/v1/register"]


@pytest.mark.parametrize("target", NOT_EXPOSED)
def test_internal_endpoints_are_not_exposed(proxy: Proxy, target: str) -> None:
    status, seen = route(proxy, "GET", target)
    assert status == 404
    assert seen == []


def test_deployed_snippets_are_what_the_stack_includes(proxy: Proxy) -> None:
    text = proxy.config.conf.read_text()
    for name in ("sidecar-map.conf", "sidecar-locations.conf"):
        assert f"include {nginx.DEPLOY_DIR / name};" in text
        assert Path(nginx.DEPLOY_DIR / name).is_file()


def raw_route(
    proxy: Proxy, method: str, target: str, headers: dict[str, str] | None = None, body: bytes = b""
) -> tuple[int, object, list[tuple[str, str, str]]]:
    """A raw request line through nginx: the status, the JSON answer, what the upstreams saw."""
    proxy.recorder.take()
    answer = raw_call(proxy.url, method, target, headers=headers, body=body)
    try:
        body_json = answer.json()
    except ValueError:
        body_json = answer.body
    return answer.status, body_json, proxy.recorder.take()


SEND = f"/_matrix/client/v3/rooms/{ROOM}/send/m.room.message"
STATE = f"/_matrix/client/v3/rooms/{ROOM}/state/m.call"
LONG = "org.matrix.msc4140.delay=600000"

# A raw `#` in the request target: nginx's $args and $uri stop at it, while the homeserver
# (Twisted) splits the target at the first `?` only and keeps the `#` in the path or the query.
# nginx cannot tell what the homeserver would read, so it refuses all of them.
FRAGMENT = {
    "bait before #": f"{SEND}/t1?x%41=1#&{LONG}",
    "? then #": f"{SEND}/t1?#&{LONG}",
    "# then ?": f"{SEND}/t1#?{LONG}",
    "# in state key": f"{STATE}/k#?{LONG}",
    "# in a plain send": f"{SEND}/t1#",
    "# anywhere": "/_matrix/client/v3/sync#/../rooms",
}

# Encoded slashes next to dot segments: nginx decodes `%2F` and resolves the dot segments, so the
# path it routes on leaves the send/state location, while the homeserver reads one segment.
ENCODED_DOTS = {
    "key %2F..": f"{STATE}/k%2F..%2F..%2F..?{LONG}",
    "key ..%2F": f"{STATE}/..%2Fk?{LONG}",
    "key %2F%2E%2E": f"{STATE}/k%2F%2E%2E%2F%2E%2E?{LONG}",
    "key mixed case": f"{STATE}/k%2f%2e.%2F.%2E?{LONG}",
    "txn %2F..": f"{SEND}/t1%2F..%2F..?{LONG}",
    "txn %2F.": f"{SEND}/t1%2F.?{LONG}",
    "room ..%2F": f"/_matrix/client/v3/rooms/..%2F..%2F/send/m.room.message/t1?{LONG}",
}


@pytest.mark.parametrize("target", FRAGMENT.values(), ids=FRAGMENT.keys())
@pytest.mark.parametrize("method", ["PUT", "GET"])
def test_a_raw_hash_is_refused(proxy: Proxy, method: str, target: str) -> None:
    status, body, seen = raw_route(proxy, method, target)
    assert (status, seen) == (400, []), body
    assert isinstance(body, dict)
    assert body["errcode"] == "M_UNRECOGNIZED"


@pytest.mark.parametrize("target", ENCODED_DOTS.values(), ids=ENCODED_DOTS.keys())
def test_encoded_dot_segments_with_a_delay_are_refused(proxy: Proxy, target: str) -> None:
    status, body, seen = raw_route(proxy, "PUT", target)
    assert (status, seen) == (400, []), body
    assert isinstance(body, dict)
    assert body["errcode"] == "M_UNRECOGNIZED"


# Empty segments: nginx merges `//` (and `%2F/`, decoded first) before it matches locations, so the
# path it routes on is no longer a send/state path, while the homeserver reads the raw one.
EMPTY_SEGMENTS = {
    "empty room": f"/_matrix/client/v3/rooms//send/m.room.message/t1?{LONG}",
    "empty type": f"/_matrix/client/v3/rooms/{ROOM}/send//t1?{LONG}",
    "state //key": f"{STATE}//k?{LONG}",
    "encoded slash room": f"/_matrix/client/v3/rooms/%2F/send/m.room.message/t1?{LONG}",
    "slash, encoded slash": f"/_matrix/client/v3/rooms/{ROOM}/%2F/send/m.room.message/t1?{LONG}",
}


@pytest.mark.parametrize("target", EMPTY_SEGMENTS.values(), ids=EMPTY_SEGMENTS.keys())
def test_empty_segments_with_a_delay_are_refused(proxy: Proxy, target: str) -> None:
    status, body, seen = raw_route(proxy, "PUT", target)
    assert (status, seen) == (400, []), body
    assert isinstance(body, dict)
    assert body["errcode"] == "M_UNRECOGNIZED"


FORM = "application/x-www-form-urlencoded"
FORM_TYPES = {
    "urlencoded": FORM,
    "upper case, charset": "Application/X-WWW-Form-URLEncoded; charset=utf-8",
    "multipart": "multipart/form-data; boundary=xyz",
}
FORM_BODY = b'{"body":"x&org.matrix.msc4140.delay=600000&"}'


@pytest.mark.parametrize("content_type", FORM_TYPES.values(), ids=FORM_TYPES.keys())
@pytest.mark.parametrize(
    ("method", "target"),
    [("POST", SEND), ("PUT", f"{SEND}/t1"), ("PUT", f"{STATE}/k"), ("POST", f"{STATE}/k")],
    ids=["post send", "put send", "put state", "post state"],
)
def test_form_bodies_go_to_the_sidecar(
    proxy: Proxy, method: str, target: str, content_type: str
) -> None:
    """The homeserver merges form-encoded POST bodies into the query arguments, so a delay may
    hide in the body: the sidecar judges (and refuses) those."""
    status, body, seen = raw_route(proxy, method, target, {"Content-Type": content_type}, FORM_BODY)
    assert status == 200, body
    assert seen == [("sidecar", method, target)]


def test_form_bodies_with_encoded_dot_segments_are_refused(proxy: Proxy) -> None:
    status, body, seen = raw_route(
        proxy, "POST", f"{SEND}%2F..%2F..", {"Content-Type": FORM}, FORM_BODY
    )
    assert (status, seen) == (400, []), body


def test_json_bodies_still_go_to_the_homeserver(proxy: Proxy) -> None:
    status, body, seen = raw_route(
        proxy, "POST", SEND, {"Content-Type": "application/json"}, FORM_BODY
    )
    assert status == 200, body
    assert seen == [("homeserver", "POST", SEND)]


def test_encoded_slash_without_dots_is_routed_as_before(proxy: Proxy) -> None:
    target = f"{STATE}/a%2F.b%2F..c?{LONG}"
    status, body, seen = raw_route(proxy, "PUT", target)
    assert status == 200, body
    assert seen == [("sidecar", "PUT", target)]


def test_the_access_log_holds_no_access_token(proxy: Proxy) -> None:
    """Tokens in every form a client can send them: none reaches any file nginx writes, while the
    access log still shows each request's path and status."""
    tokens: list[str] = []

    def token() -> str:
        tokens.append(f"syt_{uuid.uuid4().hex}")
        return tokens[-1]

    sync = "/_matrix/client/v3/sync"
    send = f"/_matrix/client/v3/rooms/{ROOM}/send/m.room.message/t1"
    targets = [
        f"{sync}?access_token={token()}",
        f"{sync}?timeout=0&access_token={token()}",
        f"{sync}?access_token={token()}&timeout=0&since=s1&access_token={token()}",
        f"{sync}?a=1;access_token={token()};b=2",
        f"{sync}?ACCESS_TOKEN={token()}&Access_Token={token()}",
        f"{sync}?access%5Ftoken={token()}&access%5ftoken={token()}",
        f"{sync}?%41ccess_%74oken={token()}&%61CCESS%5FTOKEN={token()}",
        f"{sync}?access_token={token()}?access_token={token()}",
        f"{sync}?" + "&".join(f"access_token={token()}" for _ in range(5)),
        f"{sync}?x=1#&access_token={token()}",
        f"{send}?org.matrix.msc4140.delay=10&access_token={token()}",
        f"{send}?access_token={token()}&org.matrix.msc4140.delay=10",
    ]
    statuses = []
    for target in targets:
        answer = raw_call(
            proxy.url,
            "PUT" if "send" in target else "GET",
            target,
            headers={
                "Authorization": f"Bearer {token()}",
                "Referer": f"https://client.example/?access_token={token()}",
            },
        )
        statuses.append(answer.status)
    assert statuses == [200] * 9 + [400, 200, 200]

    written = {
        path: path.read_text(errors="replace")
        for path in proxy.config.prefix.rglob("*")
        if path.is_file()
    }
    for path, text in written.items():
        leaked = [t for t in tokens if t in text or t[4:] in text]
        assert leaked == [], f"{path} holds {len(leaked)} token(s)"
    log = written[proxy.config.prefix / "access.log"]
    assert f'"GET {sync}?access_token=REDACTED HTTP/1.1" 200 ' in log
    assert f'"GET {sync}?a=1;access_token=REDACTED;b=2 HTTP/1.1" 200 ' in log
    assert f'"GET {sync}?(query left out: it holds access tokens) HTTP/1.1" 200 ' in log
    assert f'"GET {sync}?x=1#&access_token=REDACTED HTTP/1.1" 400 ' in log
    assert f'"PUT {send}?org.matrix.msc4140.delay=10&access_token=REDACTED HTTP/1.1" 200 ' in log


# Request targets nginx itself cannot parse (bad or NUL percent-escapes), on paths the shipped
# configuration serves: nginx answers 400 before any location is chosen. The answer is a Matrix
# error, and nothing reaches either upstream.
MALFORMED = {
    "bad escape in room": f"/_matrix/client/v3/rooms/%zz/send/m.room.message/t1?{LONG}",
    "NUL in room": "/_matrix/client/v3/rooms/%00/send/m.room.message/t1",
    "NUL in state key": f"{STATE}/k%00?{LONG}",
    "cut escape": f"{SEND}/t1%2",
    "bad escape, management": "/_matrix/client/v1/delayed_events/%zz/restart",
    "NUL, lookup": "/_matrix/client/unstable/org.matrix.msc4140/delayed_events/%00",
    "bad escape, discovery": "/_matrix/client/versions%G0",
    "bad escape, homeserver": "/_matrix/client/v3/sync%zz",
}


@pytest.mark.parametrize("target", MALFORMED.values(), ids=MALFORMED.keys())
@pytest.mark.parametrize("method", ["PUT", "GET", "POST"])
def test_malformed_targets_get_matrix_errors(proxy: Proxy, method: str, target: str) -> None:
    proxy.recorder.take()
    answer = raw_call(proxy.url, method, target)
    assert (answer.status, proxy.recorder.take()) == (400, []), answer
    assert answer.content_type == "application/json"
    assert answer.json() == {"errcode": "M_INVALID_PARAM", "error": "Malformed request"}


@pytest.mark.parametrize(
    ("method", "target", "headers"),
    [
        ("BAD\x01", "/_matrix/client/versions", {}),
        ("GET", "/_matrix/client/versions\x00", {}),
        ("GET", "/_matrix/client/versions", {"Host": "other.example"}),  # a second Host
    ],
    ids=["control in method", "NUL after target", "two Host headers"],
)
def test_unparsable_requests_get_matrix_errors(
    proxy: Proxy, method: str, target: str, headers: dict[str, str]
) -> None:
    proxy.recorder.take()
    answer = raw_call(proxy.url, method, target, headers=headers)
    assert (answer.status, proxy.recorder.take()) == (400, []), answer
    assert answer.content_type == "application/json"
    assert answer.json()["errcode"] == "M_INVALID_PARAM"


def test_an_overlong_uri_gets_a_matrix_error(proxy: Proxy) -> None:
    answer = raw_call(proxy.url, "GET", "/_matrix/client/v3/sync?since=" + "a" * 20_000)
    assert answer.status == 414
    assert answer.content_type == "application/json"
    assert answer.json()["errcode"] == "M_TOO_LARGE"


@pytest.mark.parametrize(
    ("target", "upstream"),
    [
        (f"/_matrix/client/v3/rooms/{ROOM}//send/m.room.message/t1", "homeserver"),
        ("/_matrix/client/v3/rooms//send/m.room.message/t1", "homeserver"),
        ("/_matrix/client/v1/delayed_events//restart", "sidecar"),
    ],
)
def test_empty_segments_still_pass_unchanged(proxy: Proxy, target: str, upstream: str) -> None:
    """Requests nginx can parse are not touched by the error pages: they reach their upstream
    byte for byte, which answers them itself."""
    status, body, seen = raw_route(proxy, "PUT", target)
    assert status == 200, body
    assert seen == [(upstream, "PUT", target)]


def test_internal_error_locations_are_not_reachable(proxy: Proxy) -> None:
    status, seen = route(proxy, "GET", "/_delayed_events_sidecar/error-400")
    assert status == 404
    assert seen == []

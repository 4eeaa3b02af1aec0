"""A homeserver for fault tests: a real HTTP server on loopback that takes events like a room
would, counts every event it creates, and can be told to fail.

It deduplicates messages by transaction (user, device, room, type, txn id) and identical state by
the same sender, as Synapse does, so a repeated replay returns the first event's id. Every event
created is recorded with its arrival time; tests put a sequence number `seq` in the content and
count the events created for each.

Faults, switched at any moment from the test:
- `refuse()`: stop listening (connections are refused) until `recover()`;
- `fail_with(502 | 503)`: answer every request with that status;
- `hang(seconds)`: hold each request that long, then take it (the client has long given up);
- `rate_limit(retry_after_ms)`: answer 429 `M_LIMIT_EXCEEDED` with `retry_after_ms`;
- `forbid(room_id)`: refuse events in that room with 403 `M_FORBIDDEN`;
- `latency`: take each event, then wait that long before answering;
- `hold(origin)`: take the next event a process sends, then hold its answer until the gate is
  opened: a replay forced to be in flight (taken, not yet answered) at a moment the test chooses.

Each event notes the fault in force when its request began (`under_fault`), so a test can tell
an event the homeserver took during an outage from one whose request came before it.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from devstack.procs import wait_until


@dataclass(frozen=True)
class Event:
    event_id: str
    room_id: str
    event_type: str
    state_key: str | None
    sender: str
    content: dict[str, Any]
    origin_server_ts: int
    arrived: float  # time.time() when the event was created
    under_fault: str | None = None  # the fault in force when its request began, if any

    @property
    def seq(self) -> Any:
        return self.content.get("seq")

    def as_client_event(self) -> dict[str, Any]:
        event: dict[str, Any] = {
            "event_id": self.event_id,
            "room_id": self.room_id,
            "type": self.event_type,
            "sender": self.sender,
            "content": self.content,
            "origin_server_ts": self.origin_server_ts,
        }
        if self.state_key is not None:
            event["state_key"] = self.state_key
        return event


@dataclass
class _Fault:
    status: int | None = None
    hang_seconds: float = 0.0
    retry_after_ms: int | None = None
    refusing: bool = False

    @property
    def name(self) -> str | None:
        if self.refusing:
            return "refused"
        if self.hang_seconds:
            return "hang"
        return None if self.status is None else str(self.status)


# However long a test waits, a held request is answered in the end, so no thread lingers.
GATE_LIMIT = 600.0


class Gate:
    """Holds the answer to the next event PUT of one process (any, without an origin) once the
    homeserver has taken the event, until `open()`."""

    def __init__(self, origin: str | None) -> None:
        self.origin = origin
        self.seq: Any = None  # the `seq` of the held event
        self._held = threading.Event()
        self._open = threading.Event()
        self._lock = threading.Lock()

    def _claim(self, origin: str, seq: Any) -> bool:
        with self._lock:
            if self._held.is_set() or self._open.is_set():
                return False
            if self.origin is not None and origin != self.origin:
                return False
            self.seq = seq
            self._held.set()
            return True

    def _wait(self) -> None:
        self._open.wait(GATE_LIMIT)

    def wait_held(self, timeout: float) -> bool:
        """Whether a request is held, waiting up to `timeout` seconds for one."""
        return self._held.wait(timeout)

    @property
    def held(self) -> bool:
        return self._held.is_set()

    def open(self) -> None:
        self._open.set()


@dataclass
class _Room:
    state: dict[tuple[str, str], Event] = field(default_factory=dict)


class FaultyHomeserver:
    def __init__(self, users: dict[str, tuple[str, str]], port: int) -> None:
        self.users = users  # token -> (user_id, device_id)
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.latency = 0.0
        self.forbidden: set[str] = set()
        self.requests: Counter[str] = Counter()
        self.repeats = 0  # event PUTs answered with an earlier event (a replay repeated)
        # Event PUTs taken but not yet answered, by the first path segment when it names the
        # sender (a sidecar given `url_for(name)` as its homeserver URL).
        self.in_flight: Counter[str] = Counter()
        self._fault = _Fault()
        self._gates: list[Gate] = []
        self._busy = 0  # requests being handled
        self._lock = threading.Lock()
        self._events: list[Event] = []
        self._txns: dict[tuple[str, str, str, str, str], str] = {}
        self._rooms: dict[str, _Room] = {}
        self._next = 0
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # Lifecycle ---------------------------------------------------------------------------------

    def start(self) -> None:
        server = _Server(("127.0.0.1", self.port), _Handler)
        server.homeserver = self
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        for gate in self._gates:
            gate.open()
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def url_for(self, name: str) -> str:
        """A URL of this homeserver that tells which process a request came from."""
        return f"{self.url}/via-{name}"

    @property
    def listening(self) -> bool:
        return self._server is not None

    # Faults ------------------------------------------------------------------------------------

    def refuse(self) -> None:
        """Stop listening: every connection attempt is refused."""
        self._fault = _Fault(refusing=True)
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def fail_with(self, status: int) -> None:
        self._fault = _Fault(status=status)

    def hang(self, seconds: float) -> None:
        self._fault = _Fault(hang_seconds=seconds)

    def rate_limit(self, retry_after_ms: int) -> None:
        self._fault = _Fault(status=429, retry_after_ms=retry_after_ms)

    def forbid(self, room_id: str) -> None:
        self.forbidden.add(room_id)

    def hold(self, origin: str | None = None) -> Gate:
        """A gate for the next event PUT from `origin` (the name given to `url_for`)."""
        gate = Gate(origin)
        self._gates.append(gate)
        return gate

    def wait_quiet(self, timeout: float) -> bool:
        """Wait until no request is being handled (a hung one has been taken or refused)."""
        return wait_until(lambda: self._busy == 0, timeout, interval=0.05)

    def recover(self) -> None:
        """Answer normally again (and listen again if refusing)."""
        self._fault = _Fault()
        if not self.listening:
            # The port was just released; binding it again can take a moment on a busy machine.
            assert wait_until(self._try_start, timeout=10.0, interval=0.1), "could not rebind"

    def _try_start(self) -> bool:
        try:
            self.start()
        except OSError:
            return False
        return True

    # What arrived ------------------------------------------------------------------------------

    def events(self) -> list[Event]:
        with self._lock:
            return list(self._events)

    def arrivals(self) -> dict[Any, list[Event]]:
        """Every event created, by the `seq` in its content."""
        found: dict[Any, list[Event]] = {}
        for event in self.events():
            found.setdefault(event.seq, []).append(event)
        return found

    def set_state(
        self, room_id: str, event_type: str, state_key: str, sender: str, content: dict[str, Any]
    ) -> Event:
        """State set on the homeserver directly, as another client would."""
        with self._lock:
            return self._create(room_id, event_type, state_key, sender, content)

    def current_state(self, room_id: str, event_type: str, state_key: str) -> Event | None:
        with self._lock:
            return self._room(room_id).state.get((event_type, state_key))

    # Handling ----------------------------------------------------------------------------------

    def _room(self, room_id: str) -> _Room:
        return self._rooms.setdefault(room_id, _Room())

    def _create(
        self,
        room_id: str,
        event_type: str,
        state_key: str | None,
        sender: str,
        content: dict[str, Any],
        under_fault: str | None = None,
    ) -> Event:
        self._next += 1
        now = time.time()
        event = Event(
            event_id=f"$e{self._next}",
            room_id=room_id,
            event_type=event_type,
            state_key=state_key,
            sender=sender,
            content=content,
            origin_server_ts=int(now * 1000),
            arrived=now,
            under_fault=under_fault,
        )
        self._events.append(event)
        if state_key is not None:
            self._room(room_id).state[(event_type, state_key)] = event
        return event

    def handle(
        self, method: str, target: str, token: str | None, body: bytes
    ) -> tuple[int, dict[str, Any] | str]:
        with self._lock:
            self._busy += 1
        try:
            return self._handle(method, target, token, body)
        finally:
            with self._lock:
                self._busy -= 1

    def _handle(
        self, method: str, target: str, token: str | None, body: bytes
    ) -> tuple[int, dict[str, Any] | str]:
        fault = self._fault
        if fault.hang_seconds:
            time.sleep(fault.hang_seconds)
        elif fault.status == 429:
            return 429, {
                "errcode": "M_LIMIT_EXCEEDED",
                "error": "Too many requests",
                "retry_after_ms": fault.retry_after_ms,
            }
        elif fault.status == 502:
            return 502, "<html><body><h1>502 Bad Gateway</h1></body></html>"
        elif fault.status is not None:
            return fault.status, {"errcode": "M_UNKNOWN", "error": "Service unavailable"}
        url = urlsplit(target)
        parts = [unquote(p) for p in url.path.split("/")]
        origin = ""
        if len(parts) > 1 and parts[1].startswith("via-"):
            origin = parts.pop(1).removeprefix("via-")
        self.requests[f"{method} {'/'.join(parts[3:5])}"] += 1
        user = self.users.get(token or "")
        if user is None:
            return 401, {"errcode": "M_UNKNOWN_TOKEN", "error": "Unknown access token"}
        user_id, device_id = user
        if parts[:4] == ["", "_matrix", "client", "v3"] and parts[4:] == ["account", "whoami"]:
            return 200, {"user_id": user_id, "device_id": device_id}
        if len(parts) < 8 or parts[:5] != ["", "_matrix", "client", "v3", "rooms"]:
            return 404, {"errcode": "M_UNRECOGNIZED", "error": "Unrecognized request"}
        room_id, kind, event_type = parts[5], parts[6], parts[7]
        rest = parts[8:]
        if method == "GET" and kind == "state":
            return self._get_state(room_id, event_type, rest[0] if rest else "", url.query)
        if method != "PUT" or kind not in ("send", "state"):
            return 404, {"errcode": "M_UNRECOGNIZED", "error": "Unrecognized request"}
        if room_id in self.forbidden:
            return 403, {"errcode": "M_FORBIDDEN", "error": "You may not send to this room"}
        try:
            content = json.loads(body)
        except ValueError:
            return 400, {"errcode": "M_NOT_JSON", "error": "Content not JSON"}
        with self._lock:
            if kind == "send":
                key = (user_id, device_id, room_id, event_type, rest[0] if rest else "")
                event_id = self._txns.get(key)
                if event_id is None:
                    created = self._create(room_id, event_type, None, user_id, content, fault.name)
                    event_id = created.event_id
                    self._txns[key] = event_id
                else:
                    self.repeats += 1
            else:
                state_key = rest[0] if rest else ""
                current = self._room(room_id).state.get((event_type, state_key))
                if current is not None and (current.sender, current.content) == (user_id, content):
                    event_id = current.event_id  # identical state: the homeserver keeps the old
                    self.repeats += 1
                else:
                    created = self._create(
                        room_id, event_type, state_key, user_id, content, fault.name
                    )
                    event_id = created.event_id
        seq = content.get("seq") if isinstance(content, dict) else None
        for gate in list(self._gates):
            if gate._claim(origin, seq):
                gate._wait()
                break
        if self.latency:
            self.in_flight[origin] += 1
            time.sleep(self.latency)
            self.in_flight[origin] -= 1
        return 200, {"event_id": event_id}

    def _get_state(
        self, room_id: str, event_type: str, state_key: str, query: str
    ) -> tuple[int, dict[str, Any]]:
        current = self.current_state(room_id, event_type, state_key)
        if current is None:
            return 404, {"errcode": "M_NOT_FOUND", "error": "Event not found"}
        if parse_qs(query).get("format") == ["event"]:
            return 200, current.as_client_event()
        return 200, current.content


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    homeserver: FaultyHomeserver

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that gave up on a slow answer closes its end; that is expected here.
        pass


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _serve(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        auth = self.headers.get("Authorization", "")
        token = auth.removeprefix("Bearer ") if auth.startswith("Bearer ") else None
        status, answer = self.server.homeserver.handle(self.command, self.path, token, body)
        if isinstance(answer, str):
            payload, content_type = answer.encode(), "text/html"
        else:
            payload, content_type = json.dumps(answer).encode(), "application/json"
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(payload)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(payload)
        self.close_connection = True

    do_GET = _serve
    do_PUT = _serve
    do_POST = _serve

"""Fail closed: a request that carries the delay parameter never reaches the homeserver, whatever
form it takes. Checked from Synapse's side, through nginx and the real sidecar.

For each form the event type is unique, so Synapse's access log (which records every request's raw
URI) must never mention it, and neither its timeline nor its room state may hold it. Synapse runs
with MSC4140 off: had a request leaked, Synapse would have answered it itself (it refuses delayed
events when the feature is off) and logged it.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.e2e.support import UNSTABLE, Room, SynapseLog, call, enc, raw_call, unique

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("no_delay_reaches_synapse")]

MESSAGE = "/_matrix/client/{version}/{room}/send/{type}/{txn}"
MESSAGE_NO_TXN = "/_matrix/client/{version}/{room}/send/{type}"
STATE = "/_matrix/client/{version}/{room}/state/{type}/{key}"
STATE_NO_KEY = "/_matrix/client/{version}/{room}/state/{type}"
STATE_SLASH = "/_matrix/client/{version}/{room}/state/{type}/"
KEY = "_%40alice%3Alocalhost_DEVICE_m.call"
LONG = "org.matrix.msc4140.delay=600000"

# (method, path template, API version, query). WIRE.md's scheduling forms: the sidecar must
# schedule each of them.
SCHEDULED = {
    "v3 send with txn": ("PUT", MESSAGE, "v3", LONG),
    "r0 send with txn": ("PUT", MESSAGE, "r0", LONG),
    "v3 send without txn": ("POST", MESSAGE_NO_TXN, "v3", LONG),
    "r0 send without txn": ("POST", MESSAGE_NO_TXN, "r0", LONG),
    "v3 state with key": ("PUT", STATE, "v3", LONG),
    "r0 state with key": ("PUT", STATE, "r0", LONG),
    "state without key": ("PUT", STATE_NO_KEY, "v3", LONG),
    "state with trailing slash": ("PUT", STATE_SLASH, "v3", LONG),
    "param first": ("PUT", MESSAGE, "v3", f"{LONG}&org.example.other=1"),
    "param last": ("PUT", MESSAGE, "v3", f"org.example.other=1&{LONG}"),
    "param among others": ("PUT", STATE, "v3", f"a=1&{LONG}&b=2"),
    "dots %2E": ("PUT", MESSAGE, "v3", "org%2Ematrix%2Emsc4140%2Edelay=600000"),
    "dots %2e": ("PUT", STATE, "v3", "org%2ematrix%2emsc4140%2edelay=600000"),
    "dots mixed case": ("POST", MESSAGE_NO_TXN, "v3", "x=1&org%2Ematrix.msc4140%2edelay=600000"),
    "with parent_delay_id": ("PUT", MESSAGE, "v3", f"{LONG}&org.matrix.msc4140.parent_delay_id=p1"),
    "parent_delay_id first": ("PUT", STATE, "r0", f"org.matrix.msc4140.parent_delay_id=p1&{LONG}"),
    "with sticky": ("PUT", MESSAGE, "v3", f"{LONG}&org.matrix.msc4354.sticky_duration_ms=1"),
    # Synapse still serves send and state under the legacy prefix (client_patterns(..., v1=True)).
    "api/v1 send with txn": ("PUT", MESSAGE, "api/v1", LONG),
    "api/v1 send without txn": ("POST", MESSAGE_NO_TXN, "api/v1", LONG),
    "api/v1 state with key": ("PUT", STATE, "api/v1", LONG),
    "api/v1 state without key": ("PUT", STATE_NO_KEY, "api/v1", LONG),
}  # fmt: skip

# Forms outside WIRE.md's table that Synapse would still read as carrying a delay (other API
# prefixes it serves, `;` as a separator, other percent-encodings, a parent without a delay). The
# sidecar may schedule or refuse them; it must not pass them on.
UNUSUAL = {
    "unstable prefix": ("PUT", MESSAGE, "unstable", LONG),
    "semicolon separator": ("PUT", MESSAGE, "v3", f"a=1;{LONG}"),
    "encoded letter in name": ("PUT", MESSAGE, "v3", "%6Frg.matrix.msc4140.delay=600000"),
    "parent_delay_id alone": ("PUT", STATE, "v3", "org.matrix.msc4140.parent_delay_id=p1"),
    "delay without value": ("PUT", MESSAGE, "v3", "org.matrix.msc4140.delay"),
    "delay +600000": ("PUT", MESSAGE, "v3", "org.matrix.msc4140.delay=+600000"),
    "delay 600000%20": ("PUT", STATE, "v3", "org.matrix.msc4140.delay=600000%20"),
    "delay -0": ("PUT", MESSAGE, "v3", "org.matrix.msc4140.delay=-0"),
}  # fmt: skip


def attempt(room: Room, method: str, template: str, version: str, query: str) -> tuple[str, Any]:
    event_type = unique("org.example.leak.")
    target = template.format(
        version=version, room=room.path, type=enc(event_type), txn=unique("txn"), key=KEY
    )
    answer = call(room.client_url, method, f"{target}?{query}", {"leak": "no"}, token=room.token)
    try:
        body = answer.json()
    except ValueError:
        body = answer.body.decode(errors="replace")
    assert not (isinstance(body, dict) and "event_id" in body), f"sent at once: {answer}"
    return event_type, (answer.status, body)


def assert_never_reached_synapse(room: Room, synapse_log: SynapseLog, event_type: str) -> None:
    assert synapse_log.mentioning(event_type) == []
    assert room.find_event(event_type) is None
    assert not [e for e in room.all_state() if e["type"] == event_type]


def cancel(room: Room, delay_id: str) -> None:
    answer = call(
        room.client_url,
        "POST",
        f"{UNSTABLE}/delayed_events/{enc(delay_id)}/cancel",
        {},
        token=room.token,
    )
    assert answer.status == 200, answer


@pytest.mark.parametrize(
    ("method", "template", "version", "query"), SCHEDULED.values(), ids=SCHEDULED.keys()
)
def test_scheduling_forms_are_scheduled_not_sent(
    room: Room, synapse_log: SynapseLog, method: str, template: str, version: str, query: str
) -> None:
    event_type, (status, body) = attempt(room, method, template, version, query)
    assert status == 200, body
    assert set(body) == {"delay_id"}
    assert_never_reached_synapse(room, synapse_log, event_type)
    cancel(room, body["delay_id"])


@pytest.mark.parametrize(
    ("method", "template", "version", "query"), UNUSUAL.values(), ids=UNUSUAL.keys()
)
def test_unusual_forms_never_reach_synapse(
    room: Room, synapse_log: SynapseLog, method: str, template: str, version: str, query: str
) -> None:
    event_type, (status, body) = attempt(room, method, template, version, query)
    assert status == 200 or 400 <= status < 500, (status, body)
    assert_never_reached_synapse(room, synapse_log, event_type)
    if status == 200:
        assert set(body) == {"delay_id"}
        cancel(room, body["delay_id"])


FORM = "application/x-www-form-urlencoded"
JSON = "application/json"

# Raw request lines Synapse would read as delayed but nginx's own parser reads otherwise: a raw `#`
# (Twisted splits at the first `?` only), encoded slashes next to dot segments (nginx resolves
# them, the path leaves the send/state location), and form-encoded POST bodies (Twisted merges them
# into the query parameters). (method, path after the room, rest of the target, content type,
# body). nginx refuses them or hands them to the sidecar, which refuses them.
CRAFTED: dict[str, tuple[str, str, str, str, bytes]] = {
    "bait before #": ("PUT", "send/{type}/{txn}", f"?x%41=1#&{LONG}", JSON, b"{}"),
    "? then #": ("PUT", "send/{type}/{txn}", f"?#&{LONG}", JSON, b"{}"),
    "# then ?": ("PUT", "send/{type}/{txn}", f"#?{LONG}", JSON, b"{}"),
    "# after state key": ("PUT", "state/{type}/k", f"#?{LONG}", JSON, b"{}"),
    "state key %2F..": ("PUT", "state/{type}/k%2F..%2F..%2F..", f"?{LONG}", JSON, b"{}"),
    "state key ..%2F": ("PUT", "state/{type}/..%2F..%2Fk", f"?{LONG}", JSON, b"{}"),
    "state key %2F%2E%2E": ("PUT", "state/{type}/k%2F%2E%2E%2F%2e%2E", f"?{LONG}", JSON, b"{}"),
    "txn %2F..": ("PUT", "send/{type}/{txn}%2F..%2F..", f"?{LONG}", JSON, b"{}"),
    "form body in JSON": ("POST", "send/{type}", "", FORM, f'{{"a":"&{LONG}&"}}'.encode()),
    "form body": ("POST", "send/{type}", "", f"{FORM}; charset=UTF-8", f"&{LONG}&".encode()),
    "multipart body": (
        "POST", "send/{type}", "", "multipart/form-data; boundary=b",
        b'--b\r\nContent-Disposition: form-data; name="org.matrix.msc4140.delay"\r\n\r\n'
        b"600000\r\n--b--\r\n",
    ),
}  # fmt: skip


@pytest.mark.parametrize(
    ("method", "path", "rest", "content_type", "body"), CRAFTED.values(), ids=CRAFTED.keys()
)
def test_crafted_request_lines_are_refused(
    room: Room,
    synapse_log: SynapseLog,
    method: str,
    path: str,
    rest: str,
    content_type: str,
    body: bytes,
) -> None:
    event_type = unique("org.example.leak.")
    target = f"/_matrix/client/v3/{room.path}/"
    target += path.format(type=enc(event_type), txn=unique("txn")) + rest
    answer = raw_call(
        room.client_url,
        method,
        target,
        headers={"Authorization": f"Bearer {room.token}", "Content-Type": content_type},
        body=body,
    )
    assert answer.status == 400, answer
    assert answer.json()["errcode"] == "M_UNRECOGNIZED"
    assert_never_reached_synapse(room, synapse_log, event_type)

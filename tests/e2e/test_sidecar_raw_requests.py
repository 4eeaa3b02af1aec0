"""The sidecar's own guard, reached directly on its port (behind a proxy that forwards raw `#`,
dot segments or form bodies, or with nginx misconfigured): what it cannot read exactly as the
homeserver would, it refuses with a Matrix error, and nothing reaches the homeserver.

Real uvicorn, real Synapse: each form uses its own event type, which Synapse's access log, its
timeline and its room state must never show.
"""

from __future__ import annotations

from typing import Any

import pytest
from devstack.stack import Stack

from tests.e2e.support import UNSTABLE, Room, SynapseLog, call, enc, raw_call, unique

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("no_delay_reaches_synapse")]

LONG = "org.matrix.msc4140.delay=600000"
FORM = "application/x-www-form-urlencoded"
JSON = "application/json"

# (method, path after the room with {type} for the event type, query and fragment, content type,
# body). Each one is a request Synapse would read as delayed.
REFUSED: dict[str, tuple[str, str, str, str, bytes]] = {
    "bait before #": ("PUT", "send/{type}/t1", f"?x%41=1#&{LONG}", JSON, b"{}"),
    "? then #": ("PUT", "send/{type}/t1", f"?#&{LONG}", JSON, b"{}"),
    "# then ?": ("PUT", "send/{type}/t1", f"#?{LONG}", JSON, b"{}"),
    "# in state key": ("PUT", "state/{type}/k", f"#?{LONG}", JSON, b"{}"),
    "state key %2F..": ("PUT", "state/{type}/k%2F..%2F..%2F..", f"?{LONG}", JSON, b"{}"),
    "state key ..%2F": ("PUT", "state/{type}/..%2Fk", f"?{LONG}", JSON, b"{}"),
    "state key %2F%2E%2E": ("PUT", "state/{type}/k%2F%2E%2E", f"?{LONG}", JSON, b"{}"),
    "txn mixed case": ("PUT", "send/{type}/t1%2f%2e.", f"?{LONG}", JSON, b"{}"),
    "form body": ("POST", "send/{type}", "", FORM, f'{{"a":"&{LONG}&"}}'.encode()),
    "form body, upper case": (
        "POST", "send/{type}", "", "Application/X-WWW-Form-Urlencoded; charset=UTF-8",
        f"&{LONG}&".encode(),
    ),
    "multipart body": (
        "POST", "send/{type}", "", "multipart/form-data; boundary=b",
        b'--b\r\nContent-Disposition: form-data; name="org.matrix.msc4140.delay"\r\n\r\n'
        b"600000\r\n--b--\r\n",
    ),
}  # fmt: skip


def send_raw(
    base_url: str, room: Room, method: str, path: str, rest: str, content_type: str, body: bytes
) -> tuple[str, int, Any]:
    event_type = unique("org.example.leak.")
    target = f"/_matrix/client/v3/{room.path}/{path.format(type=enc(event_type))}{rest}"
    answer = raw_call(
        base_url,
        method,
        target,
        headers={"Authorization": f"Bearer {room.token}", "Content-Type": content_type},
        body=body,
    )
    try:
        return event_type, answer.status, answer.json()
    except ValueError:
        return event_type, answer.status, answer.body


def assert_never_reached_synapse(room: Room, synapse_log: SynapseLog, event_type: str) -> None:
    assert synapse_log.mentioning(event_type) == []
    assert room.find_event(event_type) is None
    assert not [e for e in room.all_state() if e["type"] == event_type]


@pytest.mark.parametrize(
    ("method", "path", "rest", "content_type", "body"), REFUSED.values(), ids=REFUSED.keys()
)
def test_the_sidecar_refuses_what_it_cannot_judge(
    stack: Stack,
    room: Room,
    synapse_log: SynapseLog,
    method: str,
    path: str,
    rest: str,
    content_type: str,
    body: bytes,
) -> None:
    event_type, status, answer = send_raw(
        stack.sidecar_url, room, method, path, rest, content_type, body
    )
    assert status == 400, answer
    assert answer["errcode"] == "M_UNRECOGNIZED"
    assert_never_reached_synapse(room, synapse_log, event_type)


def test_a_put_with_a_form_content_type_is_judged_by_its_query(stack: Stack, room: Room) -> None:
    """Synapse merges form bodies of POSTs only: a PUT (what `curl -d` sends) is scheduled as
    usual when its query carries the delay, through nginx as directly."""
    for base_url in (stack.client_url, stack.sidecar_url):
        _, status, answer = send_raw(
            base_url, room, "PUT", f"send/{{type}}/{unique('t')}", f"?{LONG}", FORM, b"{}"
        )
        assert status == 200, answer
        cancelled = call(
            base_url,
            "POST",
            f"{UNSTABLE}/delayed_events/{enc(answer['delay_id'])}/cancel",
            {},
            token=room.token,
        )
        assert cancelled.status == 200, cancelled

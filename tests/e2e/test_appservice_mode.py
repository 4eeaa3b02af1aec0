"""Application-service mode against the real Synapse: the homeserver loads the sidecar's
registration, and delayed events fire as their user even after that user logged out, when the
user's own access token (and device) no longer exist."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from devstack.stack import Ports, Stack

from tests.e2e.support import Room, call, enc, poll, unique

PASSWORD = "correct horse battery staple"


@pytest.fixture(scope="module")
def as_stack() -> Iterator[Stack]:
    directory = Path(tempfile.mkdtemp(prefix="sidecar-e2e-as-"))
    stack = Stack.up(directory, Ports.free(), appservice=True)
    try:
        yield stack
    finally:
        stack.down()
        shutil.rmtree(directory, ignore_errors=True)


def _public_room(stack: Stack, owner_token: str, guest_token: str) -> str:
    created = call(
        stack.client_url,
        "POST",
        "/_matrix/client/v3/createRoom",
        {"preset": "public_chat"},
        token=owner_token,
    )
    assert created.status == 200, created
    room_id: str = created.json()["room_id"]
    joined = call(
        stack.client_url, "POST", f"/_matrix/client/v3/join/{enc(room_id)}", {}, token=guest_token
    )
    assert joined.status == 200, joined
    return room_id


def test_delayed_events_fire_after_the_user_logged_out(as_stack: Stack) -> None:
    alice = as_stack.register(unique("alice"), PASSWORD)
    bob = as_stack.register(unique("bob"), PASSWORD)
    room_id = _public_room(as_stack, alice.access_token, bob.access_token)
    room = f"rooms/{enc(room_id)}"
    state_key = f"_{alice.user_id}_{alice.device_id}_m.call"
    message = call(
        as_stack.client_url,
        "PUT",
        f"/_matrix/client/v3/{room}/send/m.room.message/as1?org.matrix.msc4140.delay=2500",
        {"msgtype": "m.text", "body": "after logout"},
        token=alice.access_token,
    )
    assert message.status == 200, message
    leave = call(
        as_stack.client_url,
        "PUT",
        f"/_matrix/client/v3/{room}/state/org.matrix.msc3401.call.member/{enc(state_key)}"
        "?org.matrix.msc4140.delay=2500",
        {},
        token=alice.access_token,
    )
    assert leave.status == 200, leave
    logout = call(
        as_stack.client_url, "POST", "/_matrix/client/v3/logout", {}, token=alice.access_token
    )
    assert logout.status == 200, logout
    whoami = call(
        as_stack.homeserver_url,
        "GET",
        "/_matrix/client/v3/account/whoami",
        token=alice.access_token,
    )
    assert whoami.status == 401, "the user's own token must be gone"

    observer = Room(as_stack.client_url, as_stack.homeserver_url, bob.access_token, room_id)

    def landed_message() -> dict[str, Any] | None:
        return observer.find_event("m.room.message")

    event = poll(landed_message, timeout=60, what="the delayed message")
    assert event["sender"] == alice.user_id
    assert event["content"]["body"] == "after logout"
    state = poll(
        lambda: observer.state("org.matrix.msc3401.call.member", state_key),
        timeout=60,
        what="the delayed leave",
    )
    assert state["sender"] == alice.user_id
    assert state["content"] == {}


@pytest.mark.parametrize(
    "forged",
    ["user_id={creator}&ts=1000", "user%5Fid={creator}&%74s=1000", "ts=1000"],
    ids=["plain", "encoded names", "timestamp only"],
)
def test_a_user_cannot_replay_as_another_or_forge_the_time(as_stack: Stack, forged: str) -> None:
    """A user without power asks for a power-levels change sent as the room's creator, with a
    forged timestamp: refused, and nothing lands as the creator or with that timestamp."""
    alice = as_stack.register(unique("alice"), PASSWORD)
    bob = as_stack.register(unique("bob"), PASSWORD)
    room_id = _public_room(as_stack, alice.access_token, bob.access_token)
    room = f"rooms/{enc(room_id)}"
    observer = Room(as_stack.client_url, as_stack.homeserver_url, alice.access_token, room_id)
    before = observer.state("m.room.power_levels", "")
    assert before is not None
    takeover = {**before["content"], "users": {alice.user_id: 100, bob.user_id: 100}}
    query = forged.format(creator=enc(alice.user_id))
    gen_a = call(
        as_stack.client_url,
        "PUT",
        f"/_matrix/client/v3/{room}/state/m.room.power_levels/?org.matrix.msc4140.delay=0&{query}",
        takeover,
        token=bob.access_token,
    )
    gen_b = call(
        as_stack.client_url,
        "PUT",
        f"/_matrix/client/v3/{room}/delayed_event/m.room.power_levels/{unique('t')}?{query}",
        {"delay_ms": 0, "state_key": "", "content": takeover},
        token=bob.access_token,
    )
    for answer in (gen_a, gen_b):
        assert answer.status == 400, answer
        assert answer.json()["errcode"] == "M_INVALID_PARAM"
    # A delayed message of bob's, scheduled after them, lands after anything scheduled before it
    # in the room would have: once it is there, the refused ones had their chance.
    marker = unique("after")
    control = call(
        as_stack.client_url,
        "PUT",
        f"/_matrix/client/v3/{room}/send/m.room.message/{marker}?org.matrix.msc4140.delay=0",
        {"msgtype": "m.text", "body": marker},
        token=bob.access_token,
    )
    assert control.status == 200, control

    def landed() -> dict[str, Any] | None:
        return next((e for e in observer.timeline() if e["content"].get("body") == marker), None)

    sent = poll(landed, timeout=60, what="the control message")
    assert sent["sender"] == bob.user_id
    after = observer.state("m.room.power_levels", "")
    assert after is not None
    assert after["event_id"] == before["event_id"]
    assert after["content"]["users"].get(bob.user_id) is None
    events = [*observer.timeline(), *observer.all_state()]
    assert [e for e in events if e.get("origin_server_ts") == 1000] == []
    power_levels = {e["event_id"] for e in events if e["type"] == "m.room.power_levels"}
    assert power_levels == {before["event_id"]}

"""Rules that only the real homeserver can judge, at the moment a delayed event is sent: power
levels (a refusal is recorded on the event, never dropped), and newer state set by someone else
(which cancels a pending delayed state event, even when it never passed through the sidecar)."""

from __future__ import annotations

from typing import Any

import pytest
from devstack.matrix import Account
from devstack.stack import Stack

from tests.e2e.conftest import PASSWORD
from tests.e2e.support import DELAY, V1, Room, call, enc, poll, unique

pytestmark = [pytest.mark.e2e]


def _shared_room(stack: Stack, owner: Account, member: Account, **create: Any) -> str:
    created = call(
        stack.client_url,
        "POST",
        "/_matrix/client/v3/createRoom",
        {"preset": "public_chat", **create},
        token=owner.access_token,
    )
    assert created.status == 200, created
    room_id: str = created.json()["room_id"]
    joined = call(
        stack.client_url,
        "POST",
        f"/_matrix/client/v3/join/{enc(room_id)}",
        {},
        token=member.access_token,
    )
    assert joined.status == 200, joined
    return room_id


def _schedule_state(
    stack: Stack, who: Account, room_id: str, kind: str, key: str, delay: int
) -> str:
    answer = call(
        stack.client_url,
        "PUT",
        f"/_matrix/client/v3/rooms/{enc(room_id)}/state/{enc(kind)}/{enc(key)}?{DELAY}={delay}",
        {"from": who.user_id},
        token=who.access_token,
    )
    assert answer.status == 200, answer
    delay_id: str = answer.json()["delay_id"]
    return delay_id


def _finalised(stack: Stack, who: Account, delay_id: str) -> dict[str, Any]:
    def probe() -> dict[str, Any] | None:
        answer = call(
            stack.client_url, "GET", f"{V1}/delayed_events/{enc(delay_id)}", token=who.access_token
        )
        assert answer.status == 200, answer
        item: dict[str, Any] = answer.json()
        return item if "finalised_ts" in item else None

    return poll(probe, 60, f"{delay_id} finalised")


def test_power_levels_refusal_is_recorded_on_the_event(stack: Stack, alice: Account) -> None:
    bob = stack.register(unique("bob"), PASSWORD)
    room_id = _shared_room(stack, alice, bob)
    # Bob may not set room state (state_default 50, his level 0): Synapse refuses at send time.
    kind = unique("org.example.guarded.")
    delay_id = _schedule_state(stack, bob, room_id, kind, "", 1000)
    item = _finalised(stack, bob, delay_id)
    assert item["outcome"] == "cancel"
    assert item["reason"] == "error"
    assert item["error"]["errcode"] == "M_FORBIDDEN", item["error"]
    room = Room(stack.client_url, stack.homeserver_url, alice.access_token, room_id)
    assert room.state(kind, "") is None


def test_newer_state_from_another_user_cancels_but_own_does_not(
    stack: Stack, alice: Account
) -> None:
    bob = stack.register(unique("bob"), PASSWORD)
    room_id = _shared_room(stack, alice, bob, power_level_content_override={"state_default": 0})
    kind = unique("org.example.slot.")
    theirs = _schedule_state(stack, alice, room_id, kind, "taken", 3000)
    mine = _schedule_state(stack, alice, room_id, kind, "own", 3000)
    # Newer state set straight on the homeserver, not through the sidecar.
    for who, key in ((bob, "taken"), (alice, "own")):
        answer = call(
            stack.homeserver_url,
            "PUT",
            f"/_matrix/client/v3/rooms/{enc(room_id)}/state/{enc(kind)}/{key}",
            {"direct": who.user_id},
            token=who.access_token,
        )
        assert answer.status == 200, answer

    cancelled = _finalised(stack, alice, theirs)
    assert cancelled["outcome"] == "cancel"
    assert cancelled["error"]["errcode"] == "M_CANCELLED_BY_STATE_UPDATE"
    sent = _finalised(stack, alice, mine)
    assert sent["outcome"] == "send"

    room = Room(stack.client_url, stack.homeserver_url, alice.access_token, room_id)
    taken = room.state(kind, "taken")
    assert taken is not None
    assert taken["content"] == {"direct": bob.user_id}
    own = room.state(kind, "own")
    assert own is not None
    assert own["content"] == {"from": alice.user_id}

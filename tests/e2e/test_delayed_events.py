"""Delayed events end to end: a client talks to nginx, the sidecar schedules, a real Synapse (with
MSC4140 switched off) receives the events when they are due.

Nothing here sleeps to assert timing: each test polls the homeserver until a deadline, and timing
claims are checked against the landed event's `origin_server_ts`. Sleeps only pace restarts.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
from devstack import nginx
from devstack.matrix import Account
from devstack.stack import Stack

from tests.e2e.conftest import PASSWORD
from tests.e2e.support import DELAY, UNSTABLE, Room, call, enc, now_ms, poll, unique

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("no_delay_reaches_synapse")]

DELAY_MS = 1500
# How long past its send time an event may take to land: bounded by the sidecar's safety sweep.
LANDING_SLACK_S = 20.0
# origin_server_ts is in whole milliseconds, taken by another process on the same clock.
CLOCK_SLACK_MS = 5
MEMBER_TYPE = "org.matrix.msc3401.call.member"


def schedule_message(room: Room, event_type: str, delay_ms: int, content: dict[str, Any]) -> str:
    target = (
        f"/_matrix/client/v3/{room.path}/send/{enc(event_type)}/{unique('txn')}?{DELAY}={delay_ms}"
    )
    answer = call(room.client_url, "PUT", target, content, token=room.token)
    assert answer.status == 200, answer
    assert "event_id" not in answer.json()
    delay_id: str = answer.json()["delay_id"]
    return delay_id


def schedule_state(
    room: Room, event_type: str, state_key: str, delay_ms: int, content: dict[str, Any]
) -> str:
    target = (
        f"/_matrix/client/v3/{room.path}/state/{enc(event_type)}/{enc(state_key)}"
        f"?{DELAY}={delay_ms}"
    )
    answer = call(room.client_url, "PUT", target, content, token=room.token)
    assert answer.status == 200, answer
    assert "event_id" not in answer.json()
    delay_id: str = answer.json()["delay_id"]
    return delay_id


def act(room: Room, delay_id: str, action: str, token: str | None = "room") -> Any:
    """An action on the unstable split path; `token=None` sends no Authorization header."""
    answer = call(
        room.client_url,
        "POST",
        f"{UNSTABLE}/delayed_events/{enc(delay_id)}/{action}",
        {},
        token=room.token if token == "room" else token,
    )
    assert answer.status == 200, f"{action}: {answer}"
    assert answer.json() == {}
    return answer.json()


def wait_for_message(room: Room, event_type: str, timeout: float) -> dict[str, Any]:
    return poll(lambda: room.find_event(event_type), timeout, f"{event_type} in the timeline")


def wait_for_state(room: Room, event_type: str, key: str, timeout: float) -> dict[str, Any]:
    return poll(lambda: room.state(event_type, key), timeout, f"state {event_type}/{key!r}")


# -- discovery -------------------------------------------------------------------------------


def test_versions_advertise_msc4140_although_synapse_has_it_off(stack: Stack) -> None:
    through_nginx = call(stack.client_url, "GET", "/_matrix/client/versions")
    direct = call(stack.homeserver_url, "GET", "/_matrix/client/versions")
    assert through_nginx.status == direct.status == 200
    assert through_nginx.json()["unstable_features"]["org.matrix.msc4140"] is True
    assert direct.json()["unstable_features"].get("org.matrix.msc4140") is not True
    assert through_nginx.json()["versions"] == direct.json()["versions"]


def test_capabilities_add_delayed_events_to_synapse_s(stack: Stack, alice: Account) -> None:
    target = "/_matrix/client/v3/capabilities"
    through_nginx = call(stack.client_url, "GET", target, token=alice.access_token)
    direct = call(stack.homeserver_url, "GET", target, token=alice.access_token)
    assert through_nginx.status == direct.status == 200
    capabilities = through_nginx.json()["capabilities"]
    added = {"m.delayed_events", "org.matrix.msc4140.delayed_events"}
    for name in added:
        assert capabilities[name]["max_delay_ms"] > 0
        assert capabilities[name]["max_scheduled"] > 0
    assert "m.delayed_events" not in direct.json()["capabilities"]
    for name, value in direct.json()["capabilities"].items():
        if name not in added:
            assert capabilities[name] == value


# -- scheduling and firing -------------------------------------------------------------------


def test_delayed_message_lands_after_its_delay_as_its_sender(room: Room, alice: Account) -> None:
    event_type = unique("org.example.later.")
    content = {"body": "later", "n": 1}
    before = now_ms()
    schedule_message(room, event_type, DELAY_MS, content)
    assert room.find_event(event_type) is None, "sent at scheduling time"

    event = wait_for_message(room, event_type, DELAY_MS / 1000 + LANDING_SLACK_S)
    assert event["sender"] == alice.user_id
    assert event["content"] == content
    assert event["origin_server_ts"] >= before + DELAY_MS - CLOCK_SLACK_MS


def test_delayed_state_lands_after_its_delay_as_its_sender(room: Room, alice: Account) -> None:
    event_type = unique("org.example.state.")
    content = {"status": "away"}
    before = now_ms()
    schedule_state(room, event_type, "some key", DELAY_MS, content)
    assert room.state(event_type, "some key") is None, "set at scheduling time"

    event = wait_for_state(room, event_type, "some key", DELAY_MS / 1000 + LANDING_SLACK_S)
    assert event["sender"] == alice.user_id
    assert event["content"] == content
    assert event["origin_server_ts"] >= before + DELAY_MS - CLOCK_SLACK_MS


def test_matrixrtc_state_key_round_trips(room: Room, alice: Account) -> None:
    key = f"_{alice.user_id}_DEVICE_m.call"  # _@alice…:localhost_DEVICE_m.call
    schedule_state(room, MEMBER_TYPE, key, 1000, {"application": "m.call"})

    event = wait_for_state(room, MEMBER_TYPE, key, 1 + LANDING_SLACK_S)
    assert event["state_key"] == key
    members = [e for e in room.all_state() if e["type"] == MEMBER_TYPE]
    assert [e["state_key"] for e in members] == [key]
    direct = call(
        room.homeserver_url,
        "GET",
        f"/_matrix/client/v3/{room.path}/state/{MEMBER_TYPE}/{enc(key)}",
        token=room.token,
    )
    assert direct.status == 200, direct
    assert direct.json() == {"application": "m.call"}


# -- managing --------------------------------------------------------------------------------


def restart_past_send_time(room: Room, delay_id: str, event_type: str, token: str | None) -> int:
    """Restart every third of the delay until twice the delay has passed; the event must stay
    unsent throughout. Returns the wall-clock time of the last restart."""
    started = now_ms()
    last = started
    restarts = 0
    while now_ms() < started + 2 * DELAY_MS:
        time.sleep(DELAY_MS / 3000)
        last = now_ms()
        act(room, delay_id, "restart", token=token)
        restarts += 1
        assert room.find_event(event_type) is None, f"sent despite {restarts} restart(s)"
    assert restarts >= 4
    return last


def test_restart_moves_the_send_time(room: Room, alice: Account) -> None:
    event_type = unique("org.example.restarted.")
    scheduled = now_ms()
    delay_id = schedule_message(room, event_type, DELAY_MS, {"body": "restarted"})

    last_restart = restart_past_send_time(room, delay_id, event_type, token="room")
    assert now_ms() > scheduled + DELAY_MS, "the original send time has not passed yet"

    event = wait_for_message(room, event_type, DELAY_MS / 1000 + LANDING_SLACK_S)
    assert event["sender"] == alice.user_id
    assert event["origin_server_ts"] >= last_restart + DELAY_MS - CLOCK_SLACK_MS


def test_tokenless_restart_as_lk_jwt_service_sends_it(room: Room, alice: Account) -> None:
    event_type = unique("org.example.sfu.")
    scheduled = now_ms()
    delay_id = schedule_message(room, event_type, DELAY_MS, {"body": "sfu keeps me"})

    last_restart = restart_past_send_time(room, delay_id, event_type, token=None)
    assert now_ms() > scheduled + DELAY_MS

    event = wait_for_message(room, event_type, DELAY_MS / 1000 + LANDING_SLACK_S)
    assert event["sender"] == alice.user_id
    assert event["origin_server_ts"] >= last_restart + DELAY_MS - CLOCK_SLACK_MS


def test_tokenless_v1_action_is_refused(room: Room) -> None:
    delay_id = schedule_message(room, unique("org.example.v1."), 60_000, {})
    answer = call(
        room.client_url, "POST", f"/_matrix/client/v1/delayed_events/{delay_id}/restart", {}
    )
    assert answer.status == 401, answer
    assert answer.json()["errcode"] == "M_MISSING_TOKEN"
    act(room, delay_id, "cancel")


def test_cancel_stops_it(room: Room) -> None:
    cancelled = unique("org.example.cancelled.")
    barrier = unique("org.example.barrier.")
    delay_id = schedule_message(room, cancelled, 1000, {"body": "never"})
    # Due a second after the cancelled one: once it has landed, the other one would have too.
    schedule_message(room, barrier, 2000, {"body": "after"})
    act(room, delay_id, "cancel")

    wait_for_message(room, barrier, 2 + LANDING_SLACK_S)
    assert room.find_event(cancelled) is None
    again = call(
        room.client_url,
        "POST",
        f"{UNSTABLE}/delayed_events/{delay_id}/cancel",
        {},
        token=room.token,
    )
    assert again.status == 404, again
    assert again.json()["errcode"] == "M_NOT_FOUND"


def test_send_fires_it_at_once(room: Room, alice: Account) -> None:
    event_type = unique("org.example.now.")
    before = now_ms()
    delay_id = schedule_message(room, event_type, 600_000, {"body": "now"})
    act(room, delay_id, "send")

    event = wait_for_message(room, event_type, LANDING_SLACK_S)
    assert event["sender"] == alice.user_id
    assert event["origin_server_ts"] < before + 600_000


def test_gen_b_schedule_and_v1_body_action(room: Room, alice: Account) -> None:
    event_type = unique("org.example.genb.")
    delay_ids = []
    for prefix in ("/_matrix/client/v3", UNSTABLE):
        target = f"{prefix}/{room.path}/delayed_event/{enc(event_type)}/{unique('txn')}"
        body = {"delay_ms": 600_000, "state_key": "k", "content": {"via": prefix}}
        answer = call(room.client_url, "PUT", target, body, token=room.token)
        assert answer.status == 200, answer
        delay_ids.append(answer.json()["delay_id"])
    act(room, delay_ids[0], "cancel")
    delay_id = delay_ids[1]
    answer = call(
        room.client_url,
        "POST",
        f"/_matrix/client/v1/delayed_events/{delay_id}",
        {"action": "send"},
        token=room.token,
    )
    assert answer.status == 200, answer

    event = wait_for_state(room, event_type, "k", LANDING_SLACK_S)
    assert event["content"] == {"via": UNSTABLE}
    assert event["sender"] == alice.user_id


def test_a_repeated_txn_id_schedules_once(room: Room) -> None:
    target = f"/_matrix/client/r0/{room.path}/send/m.room.message/{unique('txn')}?{DELAY}=600000"
    first = call(room.client_url, "PUT", target, {"body": "once"}, token=room.token)
    second = call(room.client_url, "PUT", target, {"body": "once"}, token=room.token)
    assert first.status == second.status == 200, (first, second)
    assert first.json()["delay_id"] == second.json()["delay_id"]
    act(room, first.json()["delay_id"], "cancel")


# -- looking up ------------------------------------------------------------------------------


def test_list_and_get_show_them(stack: Stack, room: Room, alice: Account) -> None:
    message_type = unique("org.example.listed.")
    state_type = unique("org.example.listed_state.")
    message_id = schedule_message(room, message_type, 600_000, {"body": "listed"})
    state_id = schedule_state(room, state_type, "k", 300_000, {"v": 1})

    listed = call(stack.client_url, "GET", f"{UNSTABLE}/delayed_events", token=alice.access_token)
    assert listed.status == 200, listed
    items = {item["delay_id"]: item for item in listed.json()["delayed_events"]}
    assert items[message_id]["room_id"] == room.room_id
    assert items[message_id]["type"] == message_type
    assert items[message_id]["content"] == {"body": "listed"}
    assert items[message_id]["delay"] == 600_000
    assert "state_key" not in items[message_id]
    assert items[state_id]["state_key"] == "k"
    assert items[state_id]["delay"] == 300_000
    order = [item["delay_id"] for item in listed.json()["delayed_events"]]
    assert order.index(state_id) < order.index(message_id), "not ordered by send time"

    one = call(
        stack.client_url, "GET", f"{UNSTABLE}/delayed_events/{message_id}", token=alice.access_token
    )
    assert one.status == 200, one
    assert one.json()["delay_id"] == message_id
    assert one.json()["type"] == message_type

    bob = stack.register(unique("bob"), PASSWORD)
    theirs = call(stack.client_url, "GET", f"{UNSTABLE}/delayed_events", token=bob.access_token)
    assert theirs.status == 200, theirs
    assert theirs.json()["delayed_events"] == []

    act(room, message_id, "cancel")
    act(room, state_id, "cancel")
    finalised = call(
        stack.client_url,
        "GET",
        f"{UNSTABLE}/delayed_events?status=finalised&delay_id={message_id}",
        token=alice.access_token,
    )
    assert finalised.status == 200, finalised
    [item] = finalised.json()["finalised"]
    assert item["delay_id"] == message_id
    assert item["outcome"] == "cancel"


# -- pass-through ----------------------------------------------------------------------------


def test_plain_send_passes_straight_through(room: Room, alice: Account) -> None:
    event_type = unique("org.example.plain.")
    target = f"/_matrix/client/v3/{room.path}/send/{event_type}/{unique('txn')}"
    answer = call(room.client_url, "PUT", target, {"body": "now"}, token=room.token)
    assert answer.status == 200, answer
    assert "delay_id" not in answer.json()
    event = room.find_event(event_type)
    assert event is not None, "not in the timeline right after the send"
    assert event["event_id"] == answer.json()["event_id"]
    assert event["sender"] == alice.user_id


def test_plain_state_passes_straight_through(room: Room, alice: Account) -> None:
    key = f"_{alice.user_id}_PLAIN_m.call"
    target = f"/_matrix/client/v3/{room.path}/state/{MEMBER_TYPE}/{enc(key)}"
    answer = call(room.client_url, "PUT", target, {"application": "m.call"}, token=room.token)
    assert answer.status == 200, answer
    assert "delay_id" not in answer.json()
    event = room.state(MEMBER_TYPE, key)
    assert event is not None, "not in the room state right after the put"
    assert event["event_id"] == answer.json()["event_id"]
    assert event["state_key"] == key


def test_the_stack_nginx_config_passes_nginx_t(stack: Stack) -> None:
    result = nginx.check(stack.nginx_config)
    assert result.returncode == 0, result.stderr
    assert "syntax is ok" in result.stderr

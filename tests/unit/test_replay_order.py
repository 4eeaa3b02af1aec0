"""Which of a room's due events may go out together: runs of state events that authorise nothing,
one per key; everything else alone, in send-time order."""

from __future__ import annotations

from collections import deque

from app.models import DelayedEvent
from app.replay import next_group

MEMBER = "org.matrix.msc3401.call.member"


def event(name: str, kind: str, key: str | None) -> DelayedEvent:
    return DelayedEvent(
        delay_id=name,
        user_id="@u:test",
        device_id="D",
        generation="A",
        room_id="!r:test",
        event_type=kind,
        state_key=key,
        content="{}",
        query="",
        delay_ms=1,
        created_ts=0,
        send_ts=0,
        due_ts=0,
        claim_id="c",
        attempts=0,
        first_failure_ts=None,
        status="scheduled",
        reason=None,
        event_id=None,
        error=None,
        finalised_ts=None,
    )


def in_order(events: list[DelayedEvent]) -> list[list[DelayedEvent]]:
    """A room's events as the groups the replay sends one after the other."""
    queue = deque(events)
    groups = []
    while queue:
        groups.append(next_group(queue))
    return groups


def names(groups: list[list[DelayedEvent]]) -> list[list[str]]:
    return [[e.delay_id for e in group] for group in groups]


def test_call_memberships_go_together() -> None:
    events = [event(f"m{n}", MEMBER, f"_@u:test_D{n}_m.call") for n in range(4)]
    assert names(in_order(events)) == [["m0", "m1", "m2", "m3"]]


def test_messages_go_alone() -> None:
    events = [event("x", "m.room.message", None), event("y", "m.room.message", None)]
    assert names(in_order(events)) == [["x"], ["y"]]


def test_authorising_state_splits_the_runs() -> None:
    events = [
        event("a", MEMBER, "k1"),
        event("b", "m.room.topic", ""),
        event("pl", "m.room.power_levels", ""),
        event("c", MEMBER, "k2"),
        event("join", "m.room.member", "@u:test"),
        event("msg", "m.room.message", None),
        event("d", MEMBER, "k3"),
    ]
    assert names(in_order(events)) == [["a", "b"], ["pl"], ["c"], ["join"], ["msg"], ["d"]]


def test_one_key_never_twice_in_a_group() -> None:
    events = [event("a", MEMBER, "k"), event("b", MEMBER, "other"), event("c", MEMBER, "k")]
    assert names(in_order(events)) == [["a", "b"], ["c"]]


def test_same_key_of_another_type_is_another_key() -> None:
    events = [event("a", MEMBER, "k"), event("b", "m.room.topic", "k")]
    assert names(in_order(events)) == [["a", "b"]]

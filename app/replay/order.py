"""What of a room's queue may go out side by side."""

from __future__ import annotations

from collections import deque

from app.models import DelayedEvent

# State whose order against the room's other state matters beyond its own key: the events that
# authorise later ones (a power-level change before the state it permits, a membership before
# the member's own state).
AUTH_STATE_TYPES = frozenset(
    {
        "m.room.create",
        "m.room.power_levels",
        "m.room.member",
        "m.room.join_rules",
        "m.room.third_party_invite",
    }
)


def side_by_side(event: DelayedEvent) -> bool:
    """Whether `event` may be sent together with the room's neighbouring events like it: a state
    event that authorises nothing. Its own key keeps its order anyway (a claim holds at most one
    event per key, the next one is claimable only once this one is finalised)."""
    return event.state_key is not None and event.event_type not in AUTH_STATE_TYPES


def next_group(queue: deque[DelayedEvent]) -> list[DelayedEvent]:
    """Take from the head of a room's queue (in send-time order) what goes out next: a message
    or an authorising state event alone, or a run of `side_by_side` state events, each key at
    most once, together."""
    group = [queue.popleft()]
    keys = {(group[0].event_type, group[0].state_key)}
    while queue and side_by_side(group[0]) and side_by_side(queue[0]):
        key = (queue[0].event_type, queue[0].state_key)
        if key in keys:
            break
        keys.add(key)
        group.append(queue.popleft())
    return group

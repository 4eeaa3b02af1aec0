"""Delayed events as lookups show them, rendered to JSON text once and sent as it is: the stored
content (compact JSON) and error are spliced in, never parsed, so a page of large contents is not
walked a second time by a serialiser."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from starlette.responses import Response

from app.cursors import encode_cursor
from app.domain import Status
from app.lookups import PAGE_BYTES, Lists, Page
from app.models import SCHEDULED, SENT, DelayedEvent


def json_response(text: str) -> Response:
    """A JSON document rendered here, sent as it is."""
    return Response(text, media_type="application/json")


def render(event: DelayedEvent) -> str:
    """An event as lookups show it, as JSON text: the union of the field names both generations
    use. The stored content (compact JSON) and error are spliced in as they are, never parsed,
    and a finalised event's scheduled fields are rendered once for the flat and nested copies."""
    fields: dict[str, Any] = {
        "delay_id": event.delay_id,
        "room_id": event.room_id,
        "type": event.event_type,
        "delay": event.delay_ms,
        "delay_ms": event.delay_ms,
        "running_since": event.running_since,
        "scheduled_at": event.running_since,
        "delayed_since_ts": event.running_since,
    }
    if event.state_key is not None:
        fields["state_key"] = event.state_key
    scheduled = _splice(fields, {"content": event.content})
    if event.status == SCHEDULED:
        return scheduled
    outcome: dict[str, Any] = {"finalised_ts": event.finalised_ts}
    if event.event_id is not None:
        outcome["event_id"] = event.event_id
    error = {"error": event.error} if event.error is not None else {}
    return _splice(
        {**fields, **outcome, "outcome": "send" if event.status == SENT else "cancel"},
        {
            "reason": json.dumps(event.reason),
            "content": event.content,
            **error,
            "finalised": _splice(outcome, error),
            "delayed_event": scheduled,
        },
    )


def _splice(fields: dict[str, Any], rendered: dict[str, str]) -> str:
    """A JSON object of `fields` and of members already rendered as JSON text."""
    members = [json.dumps(fields)[1:-1]] if fields else []
    members += [f"{json.dumps(name)}:{text}" for name, text in rendered.items()]
    return "{" + ",".join(members) + "}"


def pages(lists: dict[str, list[str]], next_batch: str | None) -> str:
    """A page as JSON, each item's text (rendered once) spliced in under every list name."""
    parts = [f"{json.dumps(name)}:[{','.join(items)}]" for name, items in lists.items()]
    if next_batch is not None:
        parts.append('"next_batch":' + json.dumps(next_batch))
    return "{" + ",".join(parts) + "}"


def msc4140_lists(lists: Lists, status: Status | None, cursor: dict[str, Any]) -> str:
    """The msc4140 list's answer: its pages rendered while they fit in `PAGE_BYTES` (at least one
    item), and `next_batch` (a cursor past `cursor`) when either list goes on."""
    budget = _Budget(PAGE_BYTES)
    next_cursor: dict[str, Any] = {}
    scheduled_items = budget.take(lists.scheduled, "s", cursor, next_cursor, lambda e: e.send_ts)
    finalised_items = budget.take(
        lists.finalised, "f", cursor, next_cursor, lambda e: e.finalised_ts or 0, copies=1
    )
    items = "[" + ",".join(scheduled_items) + "]"
    parts = ['"delayed_events":' + items]
    if status in (None, Status.SCHEDULED):
        parts.append('"scheduled":' + items)  # the same items, rendered once
    if status in (None, Status.FINALISED):
        parts.append('"finalised":[' + ",".join(finalised_items) + "]")
    if budget.more:
        parts.append('"next_batch":' + json.dumps(encode_cursor(next_cursor)))
    return "{" + ",".join(parts) + "}"


class _Budget:
    """What is left of a page's size; its first item is always taken."""

    def __init__(self, size: int) -> None:
        self._left = size
        self._taken = 0
        self.more = False  # some list goes on after this page

    def take(
        self,
        page: Page,
        key: str,
        cursor: dict[str, Any],
        next_cursor: dict[str, Any],
        position: Callable[[DelayedEvent], int],
        copies: int = 2,
    ) -> list[str]:
        """Render the events of `page` while the budget lasts (each shown `copies` times in the
        answer); set `next_cursor[key]` to where the list goes on (`done` when it is over)."""
        items: list[str] = []
        for event in page.events:
            if self._taken and self._left <= 0:
                break
            item = render(event)
            items.append(item)
            self._left -= copies * len(item)
            self._taken += 1
        more = page.more or len(items) < len(page.events)
        self.more = self.more or more
        if items:
            last = page.events[len(items) - 1]
            next_cursor[key] = [position(last), last.delay_id] if more else "done"
        elif not more:
            next_cursor[key] = "done"
        elif key in cursor:  # nothing of this list fitted: it goes on where it was
            next_cursor[key] = cursor[key]
        return items

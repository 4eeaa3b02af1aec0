"""The newer-state checks of a room's delayed state events, started ahead of their sends."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable, Callable, Iterable

from app.homeserver import Credential
from app.models import DelayedEvent
from app.replay.claims import ClaimKeeper
from app.replay.engine import NewerState, ReplayEngine
from app.tasks import retrieve_exception


class StateChecks:
    """The newer-state checks of a room's delayed state events, started a few events ahead of
    their sends, so that a room of state events waits for one homeserver answer per event (the
    send's), not two. A claim holds at most one event per (room, type, state_key), and the next
    one for a key is claimable only once the earlier one is finalised, so no send still ahead of
    a check changes what it reads."""

    AHEAD = 4

    def __init__(
        self,
        engine: ReplayEngine,
        credential: Callable[[DelayedEvent], Credential | None],
        keeper: ClaimKeeper,
    ) -> None:
        self._engine = engine
        self._credential = credential
        self._keeper = keeper
        self._tasks: dict[str, asyncio.Task[NewerState | None]] = {}

    def take(
        self, event: DelayedEvent, upcoming: Iterable[DelayedEvent]
    ) -> Awaitable[NewerState | None] | None:
        """The check for `event` (started now if it wasn't), with the checks of the next few
        state events of `upcoming` (the room's queue behind it) started."""
        if not self._engine.checks_newer_state(event):
            return None
        ahead = (e for e in upcoming if self._engine.checks_newer_state(e))
        for state in itertools.chain([event], itertools.islice(ahead, self.AHEAD)):
            if state.delay_id not in self._tasks:
                self._start(state)
        return self._tasks.pop(event.delay_id, None)

    def _start(self, event: DelayedEvent) -> None:
        credential = self._credential(event)
        if credential is None:
            return  # finalised as failed without a send; nothing to check
        task = asyncio.create_task(self._engine.newer_state(event, credential, self._keeper))
        task.add_done_callback(retrieve_exception)
        self._tasks[event.delay_id] = task

    def forget(self, event: DelayedEvent) -> None:
        """`event` is handled: a check started for it and not taken (it was not sent) stops."""
        task = self._tasks.pop(event.delay_id, None)
        if task is not None:
            task.cancel()

    def close(self) -> None:
        """Stop the checks of events that were not sent (taken over by another replica)."""
        for task in self._tasks.values():
            task.cancel()
        self._tasks.clear()

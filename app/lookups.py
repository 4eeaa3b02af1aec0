"""Looking up a user's delayed events: one by `delay_id`, the msc4140 lists (scheduled by send
time, finalised newest first) and the bulk lookup of MSC4486 (both together, by intended send
time, filtered). Every lookup is an authenticated request, so each refreshes the token its
device's events replay with. How pages and their cursors look on the wire is the API's
(`app.api.render`, `app.cursors`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Protocol

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from app import repository as repo
from app import repository_history as history_repo
from app import repository_lookup as lookup_repo
from app.auth import Requester
from app.domain import EventNotFound
from app.models import SCHEDULED, DelayedEvent

# Re-exported: the API names these without reaching into the repository.
from app.repository_history import STATUSES as STATUSES
from app.repository_history import HistoryFilter
from app.repository_lookup import Page as Page
from app.settings import Settings

# A page of a lookup stops once its items pass this size: a page of 1,000 events of 64 KiB
# content would otherwise be read and rendered (about 100 MB) in one go, holding up every other
# request of the process meanwhile. 256 KiB keeps each page's hold on the event loop to a few
# milliseconds (docs/benchmarks.md, "Contention").
PAGE_BYTES = 1 << 18

# Where a list goes on after a page: the last item's (send or finalised time, delay_id).
Position = tuple[int, str]


class RefreshesTokens(Protocol):
    async def refresh_token(self, conn: AsyncConnection, requester: Requester) -> None: ...


class SettlesSends(Protocol):
    async def settle(self, delay_id: str, timeout: float) -> None: ...


@dataclass(frozen=True, slots=True)
class ListQuery:
    """A page of the msc4140 lists: which of them to read, and from where (None: the start)."""

    delay_ids: list[str]
    limit: int
    scheduled: bool
    finalised: bool
    scheduled_after: Position | None = None
    finalised_after: Position | None = None


@dataclass(frozen=True, slots=True)
class Lists:
    scheduled: Page
    finalised: Page


@dataclass(frozen=True, slots=True)
class HistoryQuery:
    """What a bulk lookup asks for, checked. `status` is one of `repository_history.STATUSES`."""

    status: str | None = None
    room_id: str | None = None
    event_type: str | None = None
    from_ts: int | None = None
    to_ts: int | None = None
    backwards: bool = False


class Lookups:
    def __init__(
        self,
        engine: AsyncEngine,
        settings: Settings,
        tokens: RefreshesTokens,
        sends: SettlesSends,
    ) -> None:
        self.engine = engine
        self.settings = settings
        self._tokens = tokens
        self._sends = sends

    async def get(self, requester: Requester, delay_id: str) -> DelayedEvent:
        """One of the requester's events, scheduled or finalised. An event this replica is
        sending is shown once the send is over (bounded by the homeserver's timeout): an event
        the homeserver has accepted is never shown as still scheduled.

        Raises:
            EventNotFound: the requester has no event of this id.
        """
        async with self.engine.begin() as conn:
            await self._tokens.refresh_token(conn, requester)
            event = await repo.get(conn, delay_id)
        if event is None or event.user_id != requester.user_id:
            raise EventNotFound()
        if event.status == SCHEDULED and event.claim_id is not None:
            await self._sends.settle(delay_id, self.settings.homeserver_timeout_seconds)
            async with self.engine.connect() as conn:
                event = await repo.get(conn, delay_id) or event
        return event

    async def lists(self, requester: Requester, query: ListQuery) -> Lists:
        """A page of each list asked for: at most `limit` events, and no more once its stored
        content passes half of `PAGE_BYTES` (at least one)."""
        scheduled = finalised = Page([], more=False)
        async with self.engine.begin() as conn:
            await self._tokens.refresh_token(conn, requester)
            if query.scheduled:
                scheduled = await lookup_repo.list_scheduled(
                    conn,
                    requester.user_id,
                    delay_ids=query.delay_ids,
                    after=query.scheduled_after,
                    limit=query.limit,
                    max_bytes=PAGE_BYTES // 2,  # its items are shown twice (two list names)
                )
            if query.finalised:
                finalised = await lookup_repo.list_finalised(
                    conn,
                    requester.user_id,
                    delay_ids=query.delay_ids,
                    after=query.finalised_after,
                    limit=query.limit,
                    max_bytes=PAGE_BYTES // 2,  # its items show their content twice
                )
        return Lists(scheduled, finalised)

    async def history(
        self, requester: Requester, query: HistoryQuery, *, after: Position | None, limit: int
    ) -> Page:
        """One page of the requester's events matching `query`, after `after`."""
        where = HistoryFilter(user_id=requester.user_id, **asdict(query))
        async with self.engine.begin() as conn:
            await self._tokens.refresh_token(conn, requester)
            return await history_repo.list_history(
                # A finalised item shows its content twice, and the v1 answer shows every item
                # under two list names.
                conn,
                where,
                after=after,
                limit=limit,
                max_bytes=PAGE_BYTES // 4,
            )

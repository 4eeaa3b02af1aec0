"""The bulk lookup reads through an index, never a sequential scan of `delayed_event`: each filter,
both directions, first and later pages, over many users' full histories (100 scheduled and 1,000
finalised events each), with the planner's statistics up to date and sequential scans allowed.
Without a selective filter, the history index gives the order in either direction (nothing is
sorted); a selective one may be answered by reading its few rows through an index and sorting
them."""

from __future__ import annotations

import json
from typing import Any

import pytest
from fastapi import FastAPI
from sqlalchemy import text
from sqlalchemy.dialects import postgresql

from app.repository_history import HistoryFilter, history_statement

PER_USER_INDEXES = {
    "ix_delayed_event_user_send",
    "ix_delayed_event_user_scheduled",
    "ix_delayed_event_user_finalised",
}
USERS = 60
SCHEDULED_PER_USER = 100
FINALISED_PER_USER = 1000
ROOMS_PER_USER = 8
START = 1_800_000_000_000

# Every user: 100 scheduled and 1,000 finalised events in 8 rooms, of 3 types, finalised in each
# of the ways (sent, cancelled, refused, cancelled by newer state), send times spread over a week.
_FILL = text(
    """
    INSERT INTO delayed_event (delay_id, user_id, device_id, generation, room_id, event_type,
        state_key, content, delay_ms, created_ts, send_ts, due_ts, status, reason, error,
        finalised_ts)
    SELECT 'id' || u || '_' || n, '@user' || u || :server, 'DEV', 'A',
        '!room' || (n % :rooms) || '_' || u || :server,
        (ARRAY['m.room.message', 'm.call.member', 'org.example.poll'])[1 + n % 3],
        CASE WHEN n % 3 = 1 THEN 'key' || n END, '{}', 10000, CAST(:start AS bigint) + n * 500,
        CAST(:start AS bigint) + n * 500 + 10000,
        CASE WHEN n <= :scheduled THEN CAST(:start AS bigint) + n * 500 + 10000 END,
        CASE WHEN n <= :scheduled THEN 'scheduled'
             WHEN n % 10 < 7 THEN 'sent' WHEN n % 10 < 8 THEN 'failed' ELSE 'cancelled' END,
        CASE WHEN n <= :scheduled THEN NULL WHEN n % 10 < 7 THEN 'delay'
             WHEN n % 10 < 9 THEN 'error' ELSE 'action' END,
        CASE WHEN n > :scheduled AND n % 10 IN (7, 8) THEN '{"errcode":"M_FORBIDDEN"}' END,
        CASE WHEN n > :scheduled THEN CAST(:start AS bigint) + n * 500 + 10000 END
    FROM generate_series(1, :users) AS u, generate_series(1, :per_user) AS n
    """
)


def _filters() -> list[dict[str, Any]]:
    window = {"from_ts": START + 100_000, "to_ts": START + 400_000}
    return [
        {},
        *({"status": s} for s in ("scheduled", "sent", "cancelled", "failed")),
        {"room_id": "!room3_7:test"},
        {"event_type": "m.call.member"},
        window,
        {"from_ts": START + 300_000},
        {"status": "failed", "room_id": "!room2_7:test", "event_type": "m.room.message"},
        {"status": "scheduled", **window},
        {"status": "sent", "room_id": "!room5_7:test", **window},
    ]


def _nodes(plan: dict[str, Any]) -> list[dict[str, Any]]:
    found = [plan]
    for child in plan.get("Plans", []):
        found += _nodes(child)
    return found


@pytest.fixture
async def full_histories(app: FastAPI) -> FastAPI:
    async with app.state.container.engine.begin() as conn:
        await conn.execute(
            _FILL,
            {
                "server": ":test",
                "rooms": ROOMS_PER_USER,
                "start": START,
                "scheduled": SCHEDULED_PER_USER,
                "users": USERS,
                "per_user": SCHEDULED_PER_USER + FINALISED_PER_USER,
            },
        )
    async with app.state.container.engine.connect() as conn:
        await conn.execution_options(isolation_level="AUTOCOMMIT")
        await conn.execute(text("ANALYZE delayed_event"))
    return app


@pytest.mark.parametrize("backwards", [False, True], ids=["forward", "backward"])
@pytest.mark.parametrize("later_page", [False, True], ids=["first", "later"])
async def test_every_filter_reads_through_an_index(
    full_histories: FastAPI, backwards: bool, later_page: bool
) -> None:
    after = (START + 250_000, "id7_490") if later_page else None
    async with full_histories.state.container.engine.connect() as conn:
        count = (await conn.execute(text("SELECT count(*) FROM delayed_event"))).scalar_one()
        assert count == USERS * (SCHEDULED_PER_USER + FINALISED_PER_USER)
        assert (await conn.execute(text("SHOW enable_seqscan"))).scalar_one() == "on"
        for filters in _filters():
            where = HistoryFilter(user_id="@user7:test", backwards=backwards, **filters)
            statement = history_statement(where, after=after, limit=101)
            sql = statement.compile(
                dialect=postgresql.dialect(), compile_kwargs={"literal_binds": True}
            )
            result = await conn.execute(text(f"EXPLAIN (FORMAT JSON) {sql}"))
            raw = result.scalar_one()
            plan = (json.loads(raw) if isinstance(raw, str) else raw)[0]["Plan"]
            nodes = _nodes(plan)
            types = [n["Node Type"] for n in nodes]
            assert "Seq Scan" not in types, (filters, plan)
            assert [n for n in nodes if n.get("Relation Name") == "delayed_event"], (filters, plan)
            # Every read of the table goes through one of the per-user indexes: the history
            # index, or (when a status filter leaves few rows) the scheduled or finalised one.
            used = {n["Index Name"] for n in nodes if "Index Name" in n}
            assert used, (filters, plan)
            assert used <= PER_USER_INDEXES, (filters, plan)
            if set(filters) <= {"from_ts", "to_ts"}:
                # Unfiltered or by window: the history index alone, in its order either way.
                assert types == ["Limit", "Index Scan"], (filters, plan)
                assert used == {"ix_delayed_event_user_send"}
                assert nodes[1]["Scan Direction"] == ("Backward" if backwards else "Forward")

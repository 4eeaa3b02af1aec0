"""The checks a claim makes for the order of a room's events read through indexes, on a table of
100,000 scheduled events, with the planner's statistics up to date and sequential scans allowed:
when a few are due among many rooms, and in a catch-up where all are due in 150 rooms (a claim
then checks, for each row it takes, that the room's earlier due rows are in the same claim,
through the index of the scheduled rows by room in send order)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from fastapi import FastAPI
from sqlalchemy import event, text

from app import repository_due as due_repo

NOW = 1_800_000_000_000
ROWS = 100_000

# (rooms, how many rows are due): the rest fall due over the next hours.
SHAPES = {"few due": (1000, 2000), "catch-up": (150, ROWS)}

_FILL = text(
    """
    INSERT INTO delayed_event (delay_id, user_id, device_id, generation, room_id, event_type,
        state_key, content, delay_ms, created_ts, send_ts, due_ts, status)
    SELECT 'id' || n, '@user' || (n % 500) || :server, 'DEV', 'A',
        '!room' || (n % :rooms) || :server,
        CASE WHEN n % 10 = 0 THEN 'm.call.member' ELSE 'm.room.message' END,
        CASE WHEN n % 10 = 0 THEN 'key' || n END, '{}', 1000, 0,
        CASE WHEN n <= :due THEN CAST(:now AS bigint) - 200000 + n
             ELSE CAST(:now AS bigint) + n * 100 END,
        CASE WHEN n <= :due THEN CAST(:now AS bigint) - 200000 + n
             ELSE CAST(:now AS bigint) + n * 100 END,
        'scheduled'
    FROM generate_series(1, :rows) AS n
    """
)


def _nodes(plan: dict[str, Any]) -> list[dict[str, Any]]:
    found = [plan]
    for child in plan.get("Plans", []):
        found += _nodes(child)
    return found


@pytest.mark.parametrize("shape", list(SHAPES))
async def test_the_claim_reads_through_indexes(app: FastAPI, shape: str) -> None:
    rooms, due = SHAPES[shape]
    engine = app.state.container.engine
    async with engine.begin() as conn:
        await conn.execute(
            _FILL,
            {"server": ":test", "rooms": rooms, "due": due, "now": NOW, "rows": ROWS},
        )
    async with engine.connect() as conn:
        await conn.execution_options(isolation_level="AUTOCOMMIT")
        await conn.execute(text("ANALYZE delayed_event"))

    statements: list[tuple[str, Any]] = []

    def record(_conn: Any, _cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        if statement.lstrip().startswith("WITH due"):
            statements.append((statement, parameters))

    event.listen(engine.sync_engine, "before_cursor_execute", record)
    try:
        async with engine.connect() as conn:
            claimed = await due_repo.claim_due(conn, NOW, 30_000, 200)
            assert len(claimed) == 200
            await conn.rollback()
    finally:
        event.remove(engine.sync_engine, "before_cursor_execute", record)
    ((statement, parameters),) = statements
    async with engine.connect() as conn:
        assert (await conn.execute(text("SHOW enable_seqscan"))).scalar_one() == "on"
        result = await conn.exec_driver_sql(f"EXPLAIN (FORMAT JSON) {statement}", parameters)
        raw = result.scalar_one()
        await conn.rollback()
    plan = (json.loads(raw) if isinstance(raw, str) else raw)[0]["Plan"]
    nodes = _nodes(plan)
    # The rooms held by other replicas are read from the claimed rows, and each row claimed is
    # checked against the earlier rows of its room, through indexes. (The due rows themselves
    # may be read in one sweep when nearly all of the table is due.)
    for alias in ("held", "ahead"):
        reads = [n for n in nodes if n.get("Alias") == alias]
        assert reads, (alias, plan)
        assert {n["Node Type"] for n in reads} <= {"Index Scan", "Bitmap Heap Scan"}, plan
    if shape == "catch-up":
        (ahead,) = [n for n in nodes if n.get("Alias") == "ahead"]
        assert ahead["Index Name"] == "ix_delayed_event_room_scheduled", plan

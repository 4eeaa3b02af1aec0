"""What observability costs: the `/metrics` scrape's database figures at a million scheduled
events (a throwaway PostgreSQL, rows made with generate_series), against the full count it
replaces; and the request-duration middleware's cost per request on the heartbeat's fast path.

    .venv/bin/python bench/observability.py [--rows 1000000] [--requests 200000]

Prints one line per figure (medians of repeated runs); docs/benchmarks.md records them.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]

from devstack.postgres import start_throwaway  # noqa: E402
from sqlalchemy import func, select, text  # noqa: E402
from sqlalchemy.ext.asyncio import create_async_engine  # noqa: E402
from starlette.types import Receive, Scope, Send  # noqa: E402

from app.__main__ import migrate  # noqa: E402
from app.health import database_figures  # noqa: E402
from app.metrics import (  # noqa: E402
    OLDEST_OVERDUE_SECONDS,
    SCHEDULED_NOW,
    RequestMetricsMiddleware,
)
from app.models import SCHEDULED, delayed_event  # noqa: E402

NOW = 1_800_000_000_000
DAY_MS = 86_400_000


async def scrape_figures(url: str, rows: int, repeats: int) -> None:
    engine = create_async_engine(url.replace("postgresql://", "postgresql+asyncpg://"))
    async with engine.begin() as conn:
        # Scheduled events spread over the next day, a few overdue ones, and as many finalised.
        await conn.execute(
            text(
                "INSERT INTO delayed_event (delay_id, user_id, device_id, generation, room_id, "
                "event_type, content, delay_ms, created_ts, send_ts, due_ts, status) "
                "SELECT 'd' || i, '@u' || (i % 5000) || '_bench', 'DEV', 'A', '!r:bench', "
                "'m.call.member', '{}', 1000, :now, :now + (i::bigint * :spread / :rows), "
                ":now + (i::bigint * :spread / :rows), 'scheduled' FROM generate_series(1, :rows) i"
            ).bindparams(now=NOW, spread=DAY_MS, rows=rows)
        )
        await conn.execute(
            text(
                "INSERT INTO delayed_event (delay_id, user_id, generation, room_id, event_type, "
                "content, delay_ms, created_ts, send_ts, due_ts, status, first_failure_ts, "
                "attempts) SELECT 'late' || i, '@late:bench', 'A', '!r:bench', 'm.x', '{}', 1, "
                ":now, :now - 300000 + i, :now + 30000, 'scheduled', :now - 300000, 5 "
                "FROM generate_series(1, 10) i"
            ).bindparams(now=NOW)
        )
        await conn.execute(
            text(
                "INSERT INTO delayed_event (delay_id, user_id, generation, room_id, event_type, "
                "content, delay_ms, created_ts, send_ts, status, finalised_ts) "
                "SELECT 'f' || i, '@u' || (i % 5000) || '_bench', 'A', '!r:bench', 'm.x', '{}', "
                "1, :now, :now - i, 'sent', :now - i FROM generate_series(1, :rows) i"
            ).bindparams(now=NOW, rows=rows)
        )
    async with engine.connect() as conn:
        await conn.execution_options(isolation_level="AUTOCOMMIT")
        await conn.execute(text("VACUUM ANALYZE delayed_event"))

    async def timed(run: object) -> float:
        started = time.perf_counter()
        async with engine.connect() as conn:
            await run(conn)  # type: ignore[operator]
        return time.perf_counter() - started

    async def figures(conn: object) -> None:
        await database_figures(conn, NOW, 210_000)  # type: ignore[arg-type]

    async def full_count(conn: object) -> None:
        T = delayed_event.c
        await conn.execute(select(func.count()).where(T.status == SCHEDULED))  # type: ignore[attr-defined]

    for name, run in (("scrape figures", figures), ("count(*) of scheduled", full_count)):
        await timed(run)  # warm the cache
        times = [await timed(run) for _ in range(repeats)]
        print(f"{name}: median {statistics.median(times) * 1000:.2f} ms over {repeats} runs")
    print(
        f"gauges: scheduled {SCHEDULED_NOW._value.get():.0f} (true {rows + 10}), "
        f"oldest overdue {OLDEST_OVERDUE_SECONDS._value.get():.1f} s (true 300.0)"
    )
    await engine.dispose()


async def _answer(scope: Scope, receive: Receive, send: Send) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"{}"})


async def middleware_cost(requests: int) -> None:
    """One ASGI call of a trivial answer, bare and wrapped, as the heartbeat's is."""
    wrapped = RequestMetricsMiddleware(_answer)

    async def receive() -> dict[str, object]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: object) -> None:
        return None

    def scope() -> Scope:
        return {
            "type": "http",
            "method": "POST",
            "path": "/_matrix/client/v1/delayed_events/x/restart",
            "delayed_events.route_template": "/_matrix/client/v1/delayed_events/{delay_id}/restart",
        }

    results: dict[str, list[float]] = {"bare": [], "wrapped": []}
    for _ in range(5):
        for name, app in (("bare", _answer), ("wrapped", wrapped)):
            started = time.perf_counter()
            for _ in range(requests):
                await app(scope(), receive, send)
            results[name].append((time.perf_counter() - started) / requests)
    bare = statistics.median(results["bare"])
    extra = statistics.median(results["wrapped"]) - bare
    print(f"request metrics: +{extra * 1e6:.2f} µs per request (bare call {bare * 1e6:.2f} µs)")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--requests", type=int, default=200_000)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    asyncio.run(middleware_cost(args.requests))
    with tempfile.TemporaryDirectory(prefix="sidecar-bench-pg-") as tmp:
        os.chmod(tmp, 0o755)
        server = start_throwaway(Path(tmp) / "data")
        try:
            server.create_database("bench")
            url = server.database_url("bench")
            migrate(url)
            asyncio.run(scrape_figures(url, args.rows, args.repeats))
        finally:
            server.stop()


if __name__ == "__main__":
    main()

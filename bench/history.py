"""The bulk lookup (MSC4486) over full histories: page through one user's whole history (100
scheduled and 1,000 finalised events) with each filter, in both directions, and report the time per
page (p50, p99, max). Rows of other users fill the table around it.

    .venv/bin/python bench/history.py [--users 200] [--repeats 3] [--limit 100]

Starts a throwaway PostgreSQL (scripts/devstack), applies the migrations, fills the table with
one statement and ANALYZEs it, then calls the application in-process (routing, authentication
from a warm cache, the database, rendering; no HTTP socket and no nginx) with a stand-in
homeserver that only answers whoami. Takes well under a minute.
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

import httpx
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "scripts")]

from devstack.postgres import start_throwaway  # noqa: E402

from app.__main__ import migrate  # noqa: E402
from app.crypto import new_key  # noqa: E402
from app.main import create_app  # noqa: E402
from app.settings import Settings  # noqa: E402

SCHEDULED, FINALISED = 100, 1000
START = 1_800_000_000_000
PATH = "/_matrix/client/unstable/org.matrix.msc4486/delayed_events"
USER = 7

FILL = text(
    """
    INSERT INTO delayed_event (delay_id, user_id, device_id, generation, room_id, event_type,
        state_key, content, delay_ms, created_ts, send_ts, due_ts, status, reason, error,
        finalised_ts)
    SELECT 'id' || u || '_' || n, '@user' || u || :server, 'DEV', 'A',
        '!room' || (n % 8) || '_' || u || :server,
        (ARRAY['m.room.message', 'm.call.member', 'org.example.poll'])[1 + n % 3],
        CASE WHEN n % 3 = 1 THEN 'key' || n END, '{"body":"hello"}', 10000,
        CAST(:start AS bigint) + n * 500, CAST(:start AS bigint) + n * 500 + 10000,
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

FILTERS = {
    "none": "",
    "status=scheduled": "status=scheduled",
    "status=sent": "status=sent",
    "status=cancelled": "status=cancelled",
    "status=failed": "status=failed",
    "room_id": f"room_id=%21room3_{USER}%3Atest",
    "type": "type=m.call.member",
    "window": f"from_ts={START + 100_000}&to_ts={START + 400_000}",
    "status+room+window": f"status=sent&room_id=%21room5_{USER}%3Atest"
    f"&from_ts={START + 100_000}&to_ts={START + 400_000}",
}


def whoami(request: httpx.Request) -> httpx.Response:
    if request.url.path == "/_matrix/client/v3/account/whoami":
        return httpx.Response(200, json={"user_id": f"@user{USER}:test", "device_id": "DEV"})
    return httpx.Response(404, json={"errcode": "M_UNRECOGNIZED", "error": "not here"})


async def fill(url: str, users: int) -> None:
    engine = create_async_engine(url.replace("postgresql://", "postgresql+asyncpg://", 1))
    async with engine.begin() as conn:
        await conn.execute(
            FILL,
            {
                "server": ":test",
                "start": START,
                "scheduled": SCHEDULED,
                "users": users,
                "per_user": SCHEDULED + FINALISED,
            },
        )
    async with engine.connect() as conn:
        await conn.execution_options(isolation_level="AUTOCOMMIT")
        await conn.execute(text("ANALYZE delayed_event"))
    await engine.dispose()


async def measure(url: str, repeats: int, limit: int) -> dict[str, list[float]]:
    settings = Settings(
        database_url=url,
        homeserver_url="http://homeserver.bench",
        token_keys=new_key(),  # type: ignore[arg-type]
        ratelimit_manage_per_second=0,
    )
    app = create_app(settings, transport=httpx.MockTransport(whoami), start_scheduler=False)
    headers = {"Authorization": "Bearer bench"}
    timings: dict[str, list[float]] = {}
    try:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://sidecar") as client:
            await client.get(PATH, headers=headers)  # warm the whoami cache and the pool
            for name, query in FILTERS.items():
                pages = timings.setdefault(name, [])
                for _ in range(repeats):
                    for direction in "fb":
                        base = f"{PATH}?limit={limit}&dir={direction}&{query}"
                        target = base
                        while True:
                            began = time.perf_counter()
                            r = await client.get(target, headers=headers)
                            pages.append((time.perf_counter() - began) * 1000)
                            assert r.status_code == 200, r.text
                            token = r.json().get("next_batch")
                            if token is None:
                                break
                            target = f"{base}&from={token}"
    finally:
        await app.state.container.homeserver.client.aclose()
        await app.state.container.engine.dispose()
    return timings


def _p99(values: list[float]) -> float:
    if len(values) < 2:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[98]


def report(timings: dict[str, list[float]]) -> None:
    print(f"{'filter':<20} {'pages':>6} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}")
    every: list[float] = []
    for name, pages in timings.items():
        every += pages
        p99 = _p99(pages)
        print(
            f"{name:<20} {len(pages):>6} {statistics.median(pages):>8.1f} {p99:>8.1f} "
            f"{max(pages):>8.1f}"
        )
    p99 = _p99(every)
    print(f"{'all':<20} {len(every):>6} {statistics.median(every):>8.1f} {p99:>8.1f} "
          f"{max(every):>8.1f}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=200, help="users with a full history")
    parser.add_argument("--repeats", type=int, default=3, help="passes over each filter")
    parser.add_argument("--limit", type=int, default=100, help="page size")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-history-pg-") as tmp:
        os.chmod(tmp, 0o755)  # initdb runs as the postgres account when started as root
        server = start_throwaway(Path(tmp) / "data")
        try:
            server.create_database("history")
            url = server.database_url("history")
            migrate(url)
            began = time.perf_counter()
            asyncio.run(fill(url, args.users))
            rows = args.users * (SCHEDULED + FINALISED)
            print(f"{rows:,} rows filled and analysed in {time.perf_counter() - began:.1f} s")
            report(asyncio.run(measure(url, args.repeats, args.limit)))
        finally:
            server.stop()


if __name__ == "__main__":
    main()

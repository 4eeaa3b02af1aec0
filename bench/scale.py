"""Scale: the sidecar over a table holding 1,000,000 scheduled events against the same sidecar over
an empty one. Both databases live in the stack's PostgreSQL and carry the same heartbeat events;
the full one also holds the bulk rows, inserted straight into PostgreSQL with generate_series.

The bulk rows are MatrixRTC-shaped delayed leaves of 10,000 users (100 each, the default cap),
one device each, due 24 h from now, and each device has its `device_token` row (random bytes in
place of an encrypted token: they are never due during the run, so never decrypted), because a
deployment holding a million scheduled events holds their tokens too.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import asyncpg
from devstack import procs
from devstack.postgres import PostgresServer, find_bindir
from heartbeat import Target, run_loadgen, schedule_calls
from services import PYTHON, REPO, Services, stop

BULK_SQL = """
INSERT INTO device_token (user_id, device_id, token, digest, updated_ts)
SELECT '@bulk' || u || ':localhost', 'BULKDEVICE',
       decode(md5(u::text) || md5((u + 1)::text) || md5((u + 2)::text), 'hex'),
       decode(md5('d' || u::text) || md5('e' || u::text), 'hex'), {now}
FROM generate_series(0, {users} - 1) AS u;

INSERT INTO delayed_event (delay_id, user_id, device_id, generation, room_id, event_type,
                           state_key, content, query, delay_ms, created_ts, send_ts, due_ts,
                           attempts, status)
SELECT 'bulk' || lpad(i::text, 8, '0') || substr(md5(i::text), 1, 16),
       '@bulk' || (i % ({users})) || ':localhost', 'BULKDEVICE', 'A',
       '!bulk' || (i % 100000) || ':localhost', 'org.matrix.msc3401.call.member',
       '_@bulk' || (i % ({users})) || ':localhost_BULKDEVICE' || (i / ({users})) || '_m.call',
       '{{}}', '', 86400000, {now}, {send_ts} + i % 60000, {send_ts} + i % 60000, 0, 'scheduled'
FROM generate_series(0, {rows} - 1) AS i;
"""


def _database_url(services: Services, name: str) -> str:
    return f"postgresql://postgres@127.0.0.1:{services.stack.ports.postgres}/{name}"


async def _bulk_insert(url: str, rows: int) -> float:
    started = time.monotonic()
    conn = await asyncpg.connect(url)
    try:
        now = int(time.time() * 1000)
        async with conn.transaction():
            await conn.execute(
                BULK_SQL.format(now=now, send_ts=now + 86_400_000, rows=rows, users=rows // 100)
            )
        await conn.execute("VACUUM ANALYZE delayed_event")
        await conn.execute("VACUUM ANALYZE device_token")
    finally:
        await conn.close()
    return time.monotonic() - started


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Scale:
    def __init__(self, services: Services, rows: int) -> None:
        self.services = services
        self.rows = rows
        self.root = services.out / "scale"
        self.root.mkdir(parents=True, exist_ok=True)
        self.env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        self.env["SIDECAR_HOMESERVER_URL"] = services.stack.homeserver_url
        self.env["SIDECAR_TOKEN_KEYS"] = subprocess.run(
            [str(PYTHON), "-m", "app", "gen-key"],
            capture_output=True,
            text=True,
            check=True,
            cwd=REPO,
        ).stdout.strip()
        self.targets: dict[str, Path] = {}
        self.bulk_seconds = float("nan")

    def _env(self, database: str, port: int) -> dict[str, str]:
        return dict(
            self.env,
            SIDECAR_DATABASE_URL=_database_url(self.services, database),
            SIDECAR_LISTEN_PORT=str(port),
        )

    def prepare(self) -> None:
        stack = self.services.stack
        server = PostgresServer(
            datadir=stack.dir / "postgres", port=stack.ports.postgres, bindir=find_bindir()
        )
        for database in ("scale_empty", "scale_full"):
            server.create_database(database)
            subprocess.run(
                [str(PYTHON), "-m", "app", "migrate"],
                env=self._env(database, 8009),
                cwd=REPO,
                check=True,
                capture_output=True,
            )
            # The same heartbeat events in both, scheduled through a sidecar on that database.
            with self.sidecar(database) as (port, _, _):
                ids = asyncio.run(
                    schedule_calls(
                        lambda name, d=database: stack.register(f"{d}{name}", "bench-password"),
                        stack.homeserver_url,
                        f"http://127.0.0.1:{port}",
                    )
                )
            path = self.root / f"{database}.tsv"
            path.write_text("".join(f"{p}\t{t}\n" for p, t in ids))
            self.targets[database] = path
        self.bulk_seconds = asyncio.run(
            _bulk_insert(_database_url(self.services, "scale_full"), self.rows)
        )

    def sidecar(self, database: str) -> _Sidecar:
        return _Sidecar(self, database)

    def measure(self, database: str, rate: float, duration: float) -> dict[str, Any]:
        """Start a sidecar, time it to /ready, read its RSS, then its restart latency."""
        with self.sidecar(database) as (port, pid, startup):
            rss_ready = _rss_mb(pid)
            target = Target(database, port, self.targets[database])
            load = run_loadgen(target, rate, duration, connections=16)
            return {
                "startup_s": startup,
                "rss_ready_mb": rss_ready,
                "rss_after_mb": _rss_mb(pid),
                "restart": load,
            }


class _Sidecar:
    """A sidecar process on a database of its own, stopped on leaving the block."""

    def __init__(self, scale: Scale, database: str) -> None:
        self.scale = scale
        self.database = database

    def __enter__(self) -> tuple[int, int, float]:
        port = procs.free_port()
        log = self.scale.root / f"{self.database}.log"
        started = time.monotonic()
        self.process = procs.spawn(
            [str(PYTHON), "-m", "app", "serve"],
            log,
            env=self.scale._env(self.database, port),
            cwd=REPO,
        )
        url = f"http://127.0.0.1:{port}/ready"
        while not procs.http_ok(url, timeout=1.0):
            if self.process.poll() is not None or time.monotonic() - started > 60:
                stop(self.process, "-m app serve")
                raise RuntimeError(f"sidecar on {self.database} did not start:\n{procs.tail(log)}")
            time.sleep(0.01)
        return port, self.process.pid, time.monotonic() - started

    def __exit__(self, *exc: object) -> None:
        stop(self.process, "-m app serve")

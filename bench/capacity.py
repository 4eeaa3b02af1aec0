"""Capacity: what one restart, one schedule and one replayed event cost the sidecar and
PostgreSQL, and what a second replica on the same database adds, measured in one run.

Per operation, from counters read before and after a fixed number of operations at a steady
rate, less what the same replicas cost idle for as long (their liveness checks and sweeps):
- CPU µs of the sidecar process(es) and of PostgreSQL (every process of its server), from /proc;
- statements PostgreSQL ran (pg_stat_statements, BEGIN/COMMIT included), write transactions
  (transaction ids assigned) and WAL bytes (pg_current_wal_lsn()).
One replica against two replicas on the same database, interleaved per repeat: restart
throughput (closed loop, bench/loadgen.py spread over the replicas' ports), and a replay of
messages falling due together in a few rooms, its rate and whether each room's messages reached
the homeserver in send order (send time, then delay_id: the order the sidecar promises).

Needs no Synapse or nginx: a throwaway PostgreSQL with pg_stat_statements loaded, a stub
homeserver (this file, `--homeserver PORT`) that answers whoami, takes every send and records the
order in which each room's messages arrive, and `python -m app serve` from this checkout.

    bench/run --only capacity
    PYTHONPATH=bench:scripts .venv/bin/python bench/capacity.py [--quick] [--out DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
PYTHON = REPO / ".venv" / "bin" / "python"
for _path in (REPO / "bench", REPO / "scripts"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

UNSTABLE = "/_matrix/client/unstable/org.matrix.msc4140"
RTC_TYPE = "org.matrix.msc3401.call.member"
DELAY_PARAM = "org.matrix.msc4140.delay"
# Heartbeat and scheduled leaves stay far from due during the run.
LONG_DELAY_MS = 30 * 60 * 1000
# Raised out of the way (they stay in the request path, so their cost is measured).
UNLIMITED = "100000"
# Background work of the sidecar is per replica and per second; it is measured idle and taken
# off every phase's figures.
IDLE = "idle"


@dataclass(frozen=True)
class Plan:
    reps: int
    duration: float  # seconds per steady phase
    restart_rate: float  # restarts/s offered in the cost phase
    schedule_rate: float  # schedules/s offered in the cost phase
    users: int  # heartbeat users, one call-member leave each
    messages: int  # replayed messages per replay phase
    rooms: int  # rooms they are spread over
    senders: int  # users sending them (a room's order holds across senders)


FULL = Plan(
    reps=3,
    duration=10,
    restart_rate=1000,
    schedule_rate=200,
    users=500,
    messages=2000,
    rooms=10,
    senders=20,
)
QUICK = Plan(
    reps=1,
    duration=4,
    restart_rate=500,
    schedule_rate=100,
    users=200,
    messages=400,
    rooms=5,
    senders=10,
)


# -- ordering (pure) ---------------------------------------------------------------------------


@dataclass
class OrderReport:
    expected: int = 0  # events that should have arrived
    arrived: int = 0  # distinct events that did
    duplicates: int = 0  # arrivals of an event that had arrived already
    out_of_order: int = 0  # arrivals after a later-sent event of the same room
    rooms_out_of_order: int = 0
    rooms: int = 0
    per_room: dict[str, int] = field(default_factory=dict)


def out_of_order(ranks: Iterable[int]) -> int:
    """How many of a room's arrivals (ranks in send order, in arrival order) come after an event
    sent later had already arrived."""
    count, highest = 0, -1
    for rank in ranks:
        if rank < highest:
            count += 1
        else:
            highest = rank
    return count


def order_report(
    send_order: dict[str, Sequence[str]], arrivals: Iterable[tuple[str, str]]
) -> OrderReport:
    """Compare what a homeserver received, `(room, event)` in arrival order, with each room's send
    order. An event's repeat counts as a duplicate, not again as out of order; an event arriving
    in a room it was not sent to counts as out of order there."""
    rank = {
        room: {event: i for i, event in enumerate(events)} for room, events in send_order.items()
    }
    seen: set[tuple[str, str]] = set()
    by_room: dict[str, list[int]] = {room: [] for room in send_order}
    report = OrderReport(expected=sum(len(events) for events in send_order.values()))
    report.rooms = len(send_order)
    for room, event in arrivals:
        if (room, event) in seen:
            report.duplicates += 1
            continue
        seen.add((room, event))
        position = rank.get(room, {}).get(event)
        if position is None:
            report.out_of_order += 1
            continue
        report.arrived += 1
        by_room[room].append(position)
    for room, ranks in by_room.items():
        wrong = out_of_order(ranks)
        report.per_room[room] = wrong
        report.out_of_order += wrong
        report.rooms_out_of_order += wrong > 0
    return report


# -- the stub homeserver -----------------------------------------------------------------------


def homeserver(port: int) -> None:
    """whoami for tokens `u<n>`; every send and state PUT taken (a fresh event id), message
    arrivals recorded in order; no current state (the newer-state check finds none)."""
    import itertools

    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    counter = itertools.count()
    arrivals: list[tuple[float, str, str]] = []

    async def whoami(request: Request) -> JSONResponse:
        token = request.headers.get("authorization", "").removeprefix("Bearer ")
        if token.startswith("u") and token[1:].isdigit():
            return JSONResponse({"user_id": f"@{token}:bench", "device_id": f"DEV{token}"})
        return JSONResponse({"errcode": "M_UNKNOWN_TOKEN", "error": "unknown"}, status_code=401)

    async def send(request: Request) -> JSONResponse:
        await request.body()
        arrivals.append((time.time(), request.path_params["room"], request.path_params["txn"]))
        return JSONResponse({"event_id": f"$e{next(counter)}"})

    async def put_state(request: Request) -> JSONResponse:
        await request.body()
        return JSONResponse({"event_id": f"$s{next(counter)}"})

    async def get_state(request: Request) -> JSONResponse:
        return JSONResponse({"errcode": "M_NOT_FOUND", "error": "no state"}, status_code=404)

    async def taken(request: Request) -> JSONResponse:
        """The message arrivals since the last call: [[time, room, txn], ...]."""
        answer = list(arrivals)
        del arrivals[: len(answer)]
        return JSONResponse(answer)

    rooms = "/_matrix/client/v3/rooms/{room}"
    app = Starlette(
        routes=[
            Route("/_matrix/client/v3/account/whoami", whoami),
            Route(rooms + "/send/{kind}/{txn}", send, methods=["PUT"]),
            Route(rooms + "/state/{kind}/{key}", put_state, methods=["PUT"]),
            Route(rooms + "/state/{kind}/{key}", get_state, methods=["GET"]),
            Route("/_bench/arrivals", taken),
        ]
    )
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


# -- counters ----------------------------------------------------------------------------------

TICKS = os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> list[str]:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()


def cpu_seconds(pid: int, *, children: bool = False) -> float:
    """User + system CPU time of one process (with `children`: plus its ended children's)."""
    fields = _stat(pid)
    ticks = int(fields[11]) + int(fields[12])
    if children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / TICKS


def server_cpu_seconds(postmaster: int) -> float:
    """CPU time of one PostgreSQL server: its postmaster, its live processes and the ended ones
    (other servers on the machine are not counted)."""
    total = cpu_seconds(postmaster, children=True)
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = _stat(int(entry.name))
            if int(fields[1]) == postmaster:
                total += (int(fields[11]) + int(fields[12])) / TICKS
        except (OSError, IndexError, ValueError):
            continue
    return total


@dataclass
class Usage:
    at: float
    sidecar_cpu: float
    postgres_cpu: float
    wal_bytes: int
    statements: int
    write_xacts: int
    queries: dict[str, int]

    def minus(self, before: Usage) -> dict[str, Any]:
        queries = {
            q: n - before.queries.get(q, 0)
            for q, n in self.queries.items()
            if n - before.queries.get(q, 0) > 0
        }
        return {
            "wall_s": self.at - before.at,
            "sidecar_cpu_s": self.sidecar_cpu - before.sidecar_cpu,
            "postgres_cpu_s": self.postgres_cpu - before.postgres_cpu,
            "wal_bytes": self.wal_bytes - before.wal_bytes,
            "statements": self.statements - before.statements,
            "write_xacts": self.write_xacts - before.write_xacts,
            "queries": dict(sorted(queries.items(), key=lambda kv: -kv[1])[:12]),
        }


# Marks the benchmark's own statements on the benchmark's database, which are not counted.
BENCH_MARK = "/* capacity bench */"
PHASES = ("restart", "restart_tokenless", "restart_max", "schedule", "replay")
METRICS = ("sidecar_cpu_s", "postgres_cpu_s", "wal_bytes", "statements", "write_xacts")


class Meter:
    """Reads the counters through a connection to the `postgres` database (its own statements
    are not counted: pg_stat_statements is read for the benchmark's database only)."""

    def __init__(self, conn: Any, dbid: int, postmaster: int) -> None:
        self.conn = conn
        self.dbid = dbid
        self.postmaster = postmaster
        self.sidecars: list[int] = []

    async def read(self) -> Usage:
        sidecar = sum(cpu_seconds(pid) for pid in self.sidecars)
        row = await self.conn.fetchrow(
            "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::bigint AS wal,"
            " pg_snapshot_xmax(pg_current_snapshot())::text::bigint AS xid"
        )
        rows = await self.conn.fetch(
            "SELECT left(regexp_replace(query, '\\s+', ' ', 'g'), 90) AS q, sum(calls) AS n"
            " FROM pg_stat_statements WHERE dbid = $1 AND query NOT LIKE $2 GROUP BY 1",
            self.dbid,
            f"%{BENCH_MARK}%",
        )
        queries = {r["q"]: int(r["n"]) for r in rows}
        return Usage(
            at=time.monotonic(),
            sidecar_cpu=sidecar,
            postgres_cpu=server_cpu_seconds(self.postmaster),
            wal_bytes=int(row["wal"]),
            statements=sum(queries.values()),
            write_xacts=int(row["xid"]),
            queries=queries,
        )


def per_op(used: dict[str, Any], idle: dict[str, float] | None, ops: int) -> dict[str, float]:
    """Each counter's growth per operation, less the idle background over the same time."""
    out: dict[str, float] = {"ops": ops}
    for metric in METRICS:
        background = idle[metric] * used["wall_s"] if idle else 0.0
        value = (used[metric] - background) / ops if ops else float("nan")
        out[metric] = value
    out["sidecar_us"] = out.pop("sidecar_cpu_s") * 1e6
    out["postgres_us"] = out.pop("postgres_cpu_s") * 1e6
    return out


# -- the run -----------------------------------------------------------------------------------


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] capacity: {message}", file=sys.stderr, flush=True)


def free_port() -> int:
    from devstack import procs

    return int(procs.free_port())


async def wait_http(url: str, timeout: float = 60) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient() as client:
        while True:
            try:
                if (await client.get(url)).status_code < 500:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{url} did not answer")
            await asyncio.sleep(0.1)


def loadgen(
    ports: list[int],
    targets: Path,
    rate: float,
    duration: float,
    method: str = "POST",
    connections: int = 64,
) -> dict[str, Any]:
    cmd = [str(PYTHON), str(REPO / "bench" / "loadgen.py")]
    for port in ports:
        cmd += ["--port", str(port)]
    cmd += [
        "--targets",
        str(targets),
        "--method",
        method,
        "--rate",
        f"{rate:g}",
        "--duration",
        f"{duration:g}",
        "--connections",
        str(connections),
        "--timeout",
        "10",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 90)
    if result.returncode != 0:
        raise RuntimeError(f"loadgen failed: {result.stderr[-2000:]}")
    answer: dict[str, Any] = json.loads(result.stdout)
    answer["command"] = shlex.join(["bench/loadgen.py", *cmd[2:]]).replace(
        str(targets), targets.name
    )
    return answer


class Capacity:
    def __init__(self, plan: Plan, root: Path, out: Path) -> None:
        self.plan = plan
        self.root = root
        self.out = out
        self.replicas: list[tuple[subprocess.Popen[bytes], int]] = []
        self.runs = 0

    # set-up

    async def start(self) -> None:
        import asyncpg
        from devstack.postgres import start_throwaway

        self.server = start_throwaway(self.root / "pg")
        self.server_started = True
        admin = await asyncpg.connect(self._url("postgres"))
        try:
            await admin.execute("ALTER SYSTEM SET shared_preload_libraries = 'pg_stat_statements'")
        finally:
            await admin.close()
        self.server.stop()
        self.server.start()
        self.server.create_database("bench")
        self.hs_port = free_port()
        self.homeserver = subprocess.Popen(
            [str(PYTHON), __file__, "--homeserver", str(self.hs_port)],
            stdout=subprocess.DEVNULL,
        )
        self.env = {
            **{k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
            "SIDECAR_DATABASE_URL": self.server.database_url("bench"),
            "SIDECAR_HOMESERVER_URL": f"http://127.0.0.1:{self.hs_port}",
            "SIDECAR_TOKEN_KEYS": base64.urlsafe_b64encode(os.urandom(32)).decode(),
            "SIDECAR_LOG_LEVEL": "WARNING",
            "SIDECAR_MAX_SCHEDULED_PER_USER": UNLIMITED,
        }
        for limit in ("SCHEDULE", "MANAGE", "TOKENLESS"):
            self.env[f"SIDECAR_RATELIMIT_{limit}_PER_SECOND"] = UNLIMITED
            self.env[f"SIDECAR_RATELIMIT_{limit}_BURST"] = UNLIMITED
        subprocess.run(
            [str(PYTHON), "-m", "app", "migrate"],
            cwd=REPO,
            env=self.env,
            check=True,
            capture_output=True,
        )
        await wait_http(f"http://127.0.0.1:{self.hs_port}/_bench/arrivals")
        self.meter_conn = await asyncpg.connect(self._url("postgres"))
        await self.meter_conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        dbid = await self.meter_conn.fetchval("SELECT oid FROM pg_database WHERE datname = 'bench'")
        postmaster = int((self.root / "pg" / "postmaster.pid").read_text().split()[0])
        self.meter = Meter(self.meter_conn, int(dbid), postmaster)
        self.bench_conn = await asyncpg.connect(self._url("bench"))
        self.bench_pid = self.bench_conn.get_server_pid()
        await self.set_replicas(1)

    def _url(self, database: str) -> str:
        return self.server.database_url(database).replace("+asyncpg", "")

    async def stop(self) -> None:
        for log_file in self.root.glob("replica*.log"):
            (self.out / f"capacity-{log_file.name}").write_bytes(log_file.read_bytes())
        for process, _ in self.replicas:
            process.terminate()
        for process, _ in self.replicas:
            process.wait(timeout=30)
        self.replicas = []
        if getattr(self, "homeserver", None) is not None:
            self.homeserver.terminate()
            self.homeserver.wait(timeout=30)
        for conn in (getattr(self, "meter_conn", None), getattr(self, "bench_conn", None)):
            if conn is not None:
                await conn.close()
        if getattr(self, "server_started", False):
            self.server.stop()

    async def set_replicas(self, count: int) -> None:
        while len(self.replicas) > count:
            process, _ = self.replicas.pop()
            process.terminate()
            process.wait(timeout=30)
        while len(self.replicas) < count:
            port = free_port()
            log_file = self.root / f"replica{len(self.replicas)}.log"
            process = subprocess.Popen(
                [str(PYTHON), "-m", "app", "serve"],
                cwd=REPO,
                env={**self.env, "SIDECAR_LISTEN_PORT": str(port)},
                stdout=log_file.open("ab"),
                stderr=subprocess.STDOUT,
            )
            self.replicas.append((process, port))
            await wait_http(f"http://127.0.0.1:{port}/ready")
        self.meter.sidecars = [process.pid for process, _ in self.replicas]

    @property
    def ports(self) -> list[int]:
        return [port for _, port in self.replicas]

    async def seed_heartbeat(self) -> Path:
        """One call-member leave per heartbeat user, 40 participants a call room."""
        import httpx
        from client import bounded, q

        lines: list[str] = []
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{self.ports[0]}", timeout=30
        ) as client:

            async def one(u: int) -> str:
                room = q(f"!call{u // 40}:bench")
                key = q(f"_@u{u}:bench_DEVu{u}_m.call")
                r = await client.put(
                    f"/_matrix/client/v3/rooms/{room}/state/{RTC_TYPE}/{key}"
                    f"?{DELAY_PARAM}={LONG_DELAY_MS}",
                    json={},
                    headers={"Authorization": f"Bearer u{u}"},
                )
                r.raise_for_status()
                return f"{UNSTABLE}/delayed_events/{r.json()['delay_id']}/restart\tu{u}\n"

            jobs = [lambda u=u: one(u) for u in range(self.plan.users)]
            lines = await bounded(16, jobs)
        path = self.root / "restart.tsv"
        path.write_text("".join(lines))
        # The SFU's restarts: the same events by delay_id alone, without a token.
        (self.root / "restart-tokenless.tsv").write_text(
            "".join(line.split("\t")[0] + "\t\n" for line in lines)
        )
        return path

    async def table_sizes(self) -> dict[str, Any]:
        """Rows and bytes (heap, indexes and TOAST) of each table as the run left them, and again
        after VACUUM FULL (without the dead row versions the restarts leave behind)."""
        counts = await self.bench_conn.fetch(
            f"{BENCH_MARK} SELECT status, count(*) AS n FROM delayed_event GROUP BY 1"
        )
        tokens = await self.bench_conn.fetchval(f"{BENCH_MARK} SELECT count(*) FROM device_token")
        sizes: dict[str, Any] = {
            "delayed_event_rows": {row["status"]: int(row["n"]) for row in counts},
            "device_token_rows": int(tokens),
        }
        query = (
            f"{BENCH_MARK} SELECT pg_total_relation_size('delayed_event') AS events,"
            " pg_total_relation_size('device_token') AS tokens,"
            " pg_indexes_size('delayed_event') AS event_indexes"
        )
        sizes["as_run"] = dict(await self.bench_conn.fetchrow(query))
        await self.bench_conn.execute("VACUUM FULL delayed_event")
        await self.bench_conn.execute("VACUUM FULL device_token")
        sizes["compacted"] = dict(await self.bench_conn.fetchrow(query))
        return sizes

    def schedule_targets(self, count: int) -> Path:
        """`count` distinct call-member leaves (a new device each), as state PUTs with a delay."""
        self.runs += 1
        lines = []
        for i in range(count):
            u = i % self.plan.users
            room = urllib.parse.quote(f"!call{u // 40}:bench", safe="")
            key = urllib.parse.quote(f"_@u{u}:bench_R{self.runs}D{i}_m.call", safe="")
            lines.append(
                f"/_matrix/client/v3/rooms/{room}/state/{RTC_TYPE}/{key}"
                f"?{DELAY_PARAM}={LONG_DELAY_MS}\tu{u}\n"
            )
        path = self.root / f"schedule-{self.runs}.tsv"
        path.write_text("".join(lines))
        return path

    # phases

    async def measured(self, work: Any) -> tuple[Any, dict[str, Any]]:
        before = await self.meter.read()
        peaks = {"connections": 0, "active": 0}
        done = asyncio.Event()

        async def sample() -> None:
            # Connections the replicas hold on the benchmark's database, and how many are busy.
            while not done.is_set():
                row = await self.meter.conn.fetchrow(
                    "SELECT count(*) AS n, count(*) FILTER (WHERE state <> 'idle') AS active"
                    " FROM pg_stat_activity WHERE datname = 'bench' AND pid <> $1",
                    self.bench_pid,
                )
                peaks["connections"] = max(peaks["connections"], int(row["n"]))
                peaks["active"] = max(peaks["active"], int(row["active"]))
                await asyncio.sleep(0.2)

        sampler = asyncio.create_task(sample())
        try:
            result = await work()
            # The last outcome writes and batch commits land within a moment of the last answer.
            await asyncio.sleep(0.5)
        finally:
            done.set()
            await sampler
        after = await self.meter.read()
        used = after.minus(before)
        used["peak_connections"] = peaks["connections"]
        used["peak_active"] = peaks["active"]
        return result, used

    async def idle(self) -> dict[str, Any]:
        _, used = await self.measured(lambda: asyncio.sleep(self.plan.duration))
        return used

    async def restarts(self, targets: Path, rate: float) -> tuple[dict[str, Any], dict[str, Any]]:
        async def go() -> dict[str, Any]:
            return await asyncio.to_thread(loadgen, self.ports, targets, rate, self.plan.duration)

        result, used = await self.measured(go)
        return result, used

    async def schedules(self) -> tuple[dict[str, Any], dict[str, Any]]:
        count = int(self.plan.schedule_rate * self.plan.duration * 1.2) + 10
        targets = self.schedule_targets(count)

        async def go() -> dict[str, Any]:
            return await asyncio.to_thread(
                loadgen,
                self.ports,
                targets,
                self.plan.schedule_rate,
                self.plan.duration,
                "PUT",
            )

        result, used = await self.measured(go)
        return result, used

    async def replay(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """`messages` messages over `rooms` rooms from `senders` users, scheduled so that all fall
        due at one moment T0, then replayed by the running replicas."""
        import httpx
        from client import bounded, q

        plan = self.plan
        self.runs += 1
        await self._arrivals()  # clears anything left over from earlier phases
        lead = 3.0 + plan.messages / 60
        t0 = time.time() + lead
        sidecars = [
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30)
            for port in self.ports
        ]
        delay_ids: dict[str, str] = {}
        late = 0
        try:

            async def one(i: int) -> None:
                room = f"!talk{self.runs}x{i % plan.rooms}:bench"
                sender = i % plan.senders
                nonlocal late
                delay = round((t0 - time.time()) * 1000)
                if delay < 0:
                    late, delay = late + 1, 0
                r = await sidecars[i % len(sidecars)].put(
                    f"/_matrix/client/v3/rooms/{q(room)}/send/m.room.message/r{self.runs}m{i}"
                    f"?{DELAY_PARAM}={delay}",
                    json={"msgtype": "m.text", "body": f"message {i}"},
                    headers={"Authorization": f"Bearer u{sender}"},
                )
                r.raise_for_status()
                delay_ids[r.json()["delay_id"]] = room

            await bounded(32, [lambda i=i: one(i) for i in range(plan.messages)])
        finally:
            for client in sidecars:
                await client.aclose()
        await asyncio.sleep(max(0.0, t0 - time.time() - 0.3))

        arrivals: list[tuple[float, str, str]] = []

        async def drain() -> None:
            deadline = time.time() + 30 + plan.messages / 20
            mine = {f"msc4140.{d}" for d in delay_ids}
            got: set[str] = set()
            while time.time() < deadline:
                for when, room, txn in await self._arrivals():
                    if txn in mine:
                        arrivals.append((when, room, txn))
                        got.add(txn)
                pending = await self.bench_conn.fetchval(
                    f"{BENCH_MARK} SELECT count(*) FROM delayed_event"
                    " WHERE delay_id = ANY($1::text[]) AND status = 'scheduled'",
                    list(delay_ids),
                )
                if len(got) >= len(mine) and pending == 0:
                    return
                await asyncio.sleep(0.25)

        _, used = await self.measured(drain)
        rows = await self.bench_conn.fetch(
            f"{BENCH_MARK} SELECT delay_id, room_id FROM delayed_event"
            " WHERE delay_id = ANY($1::text[]) ORDER BY send_ts, delay_id",
            list(delay_ids),
        )
        send_order: dict[str, list[str]] = {}
        for row in rows:
            send_order.setdefault(row["room_id"], []).append(f"msc4140.{row['delay_id']}")
        report = order_report(send_order, [(room, txn) for _, room, txn in arrivals])
        outcomes = await self.bench_conn.fetch(
            f"{BENCH_MARK} SELECT status, coalesce(reason, '') AS reason,"
            " left(coalesce(error, ''), 120) AS error, count(*) AS n"
            " FROM delayed_event WHERE delay_id = ANY($1::text[]) GROUP BY 1, 2, 3",
            list(delay_ids),
        )
        last = max((when for when, _, _ in arrivals), default=float("nan"))
        drain_s = last - t0
        result = {
            "messages": plan.messages,
            "rooms": plan.rooms,
            "scheduled_late": late,
            "drain_s": drain_s,
            "rate": report.arrived / drain_s if drain_s > 0 else float("nan"),
            "order": asdict(report),
            "outcomes": [dict(row) for row in outcomes],
        }
        return result, used

    async def _arrivals(self) -> list[tuple[float, str, str]]:
        import httpx

        async with httpx.AsyncClient() as client:
            r = await client.get(f"http://127.0.0.1:{self.hs_port}/_bench/arrivals")
            return [(float(w), str(room), str(txn)) for w, room, txn in r.json()]


def rotated(items: list[Any], by: int) -> list[Any]:
    by %= len(items)
    return items[by:] + items[:by]


def median(values: Iterable[float]) -> float:
    clean = [v for v in values if v == v]
    return statistics.median(clean) if clean else float("nan")


async def measure(plan: Plan, root: Path, out: Path) -> dict[str, Any]:
    c = Capacity(plan, root, out)
    runs: dict[str, list[dict[str, Any]]] = {}
    sizes: dict[str, Any] = {}
    try:
        await c.start()
        log(f"seeding {plan.users} heartbeat leaves")
        restart_targets = await c.seed_heartbeat()
        tokenless = restart_targets.with_name("restart-tokenless.tsv")
        for rep in range(plan.reps):
            for replicas in rotated([1, 2], rep):
                await c.set_replicas(replicas)
                await asyncio.sleep(1.0)
                tag = f"rep {rep + 1}/{plan.reps}, {replicas} replica(s)"
                run: dict[str, Any] = {"replicas": replicas}
                log(f"{tag}: idle {plan.duration:g} s")
                idle = await c.idle()
                idle_rate = {m: idle[m] / idle["wall_s"] for m in METRICS}
                run["idle_per_s"] = idle_rate
                run["idle_queries"] = idle["queries"]
                log(f"{tag}: restarts at {plan.restart_rate:g}/s")
                load, used = await c.restarts(restart_targets, plan.restart_rate)
                run["restart"] = {
                    "load": _trim(load),
                    "used": used,
                    "per_op": per_op(used, idle_rate, load["ok"]),
                }
                log(f"{tag}: tokenless restarts at {plan.restart_rate:g}/s")
                load, used = await c.restarts(tokenless, plan.restart_rate)
                run["restart_tokenless"] = {
                    "load": _trim(load),
                    "used": used,
                    "per_op": per_op(used, idle_rate, load["ok"]),
                }
                log(f"{tag}: restarts, closed loop")
                load, used = await c.restarts(restart_targets, 0)
                run["restart_max"] = {
                    "load": _trim(load),
                    "used": used,
                    "per_op": per_op(used, idle_rate, load["ok"]),
                }
                log(f"{tag}: schedules at {plan.schedule_rate:g}/s")
                load, used = await c.schedules()
                run["schedule"] = {
                    "load": _trim(load),
                    "used": used,
                    "per_op": per_op(used, idle_rate, load["ok"]),
                }
                log(f"{tag}: replay of {plan.messages} messages in {plan.rooms} rooms")
                result, used = await c.replay()
                run["replay"] = {
                    "result": result,
                    "used": used,
                    "per_op": per_op(used, idle_rate, result["order"]["arrived"]),
                }
                order = result["order"]
                log(f"{tag}: replay outcomes {result['outcomes']}")
                log(
                    f"{tag}: replay {result['rate']:.0f}/s, {order['out_of_order']} out of order,"
                    f" {order['duplicates']} duplicated, {order['expected'] - order['arrived']}"
                    " missing"
                )
                runs.setdefault(str(replicas), []).append(run)
        try:
            sizes = await c.table_sizes()
        except Exception as exc:  # the figures above stand without it
            sizes = {"error": repr(exc)}
    finally:
        await c.stop()
    return {"plan": asdict(plan), "runs": runs, "summary": summarise(runs), "sizes": sizes}


def _trim(load: dict[str, Any]) -> dict[str, Any]:
    keep = ("offered_rate", "ok", "errors", "statuses", "rate", "latency_ms", "command")
    return {k: load[k] for k in keep if k in load}


def summarise(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Medians over repeats, per replica count; two-over-one ratios per repeat."""
    summary: dict[str, Any] = {}
    for replicas, results in runs.items():
        row: dict[str, Any] = {"repeats": len(results)}
        for op in PHASES:
            row[op] = {
                key: median(r[op]["per_op"][key] for r in results)
                for key in results[0][op]["per_op"]
            }
        row["idle_per_s"] = {m: median(r["idle_per_s"][m] for r in results) for m in METRICS}
        row["restart_rate_max"] = median(r["restart_max"]["load"]["rate"] for r in results)
        row["restart_p99_ms"] = median(r["restart"]["load"]["latency_ms"]["99"] for r in results)
        row["restart_errors"] = sum(
            r[op]["load"]["errors"]
            for r in results
            for op in ("restart", "restart_tokenless", "restart_max")
        )
        row["schedule_errors"] = sum(r["schedule"]["load"]["errors"] for r in results)
        row["replay_rate"] = median(r["replay"]["result"]["rate"] for r in results)
        row["out_of_order"] = [r["replay"]["result"]["order"]["out_of_order"] for r in results]
        row["rooms_out_of_order"] = [
            r["replay"]["result"]["order"]["rooms_out_of_order"] for r in results
        ]
        row["scheduled_late"] = sum(r["replay"]["result"]["scheduled_late"] for r in results)
        row["peak_connections"] = max(
            r[op]["used"]["peak_connections"] for r in results for op in PHASES
        )
        row["peak_active"] = {
            op: max(r[op]["used"]["peak_active"] for r in results) for op in PHASES
        }
        row["duplicates"] = sum(r["replay"]["result"]["order"]["duplicates"] for r in results)
        row["missing"] = sum(
            r["replay"]["result"]["order"]["expected"] - r["replay"]["result"]["order"]["arrived"]
            for r in results
        )
        row["commands"] = {
            op: results[0][op]["load"]["command"]
            for op in ("restart", "restart_tokenless", "restart_max", "schedule")
        }
        row["queries"] = {
            op: results[0][op]["used"]["queries"]
            for op in ("restart", "restart_tokenless", "schedule", "replay")
        }
        summary[replicas] = row
    if "1" in runs and "2" in runs:
        pairs = list(zip(runs["1"], runs["2"], strict=False))
        summary["two_over_one"] = {
            "restart_rate_max": median(
                b["restart_max"]["load"]["rate"] / a["restart_max"]["load"]["rate"]
                for a, b in pairs
            ),
            "replay_rate": median(
                b["replay"]["result"]["rate"] / a["replay"]["result"]["rate"] for a, b in pairs
            ),
        }
    return summary


def run(quick: bool, out: Path) -> dict[str, Any]:
    """The section as bench/suite.py runs it."""
    plan = QUICK if quick else FULL
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bench-capacity-") as tmp:
        os.chmod(tmp, 0o755)
        return asyncio.run(measure(plan, Path(tmp), out))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one short repeat, a smoke run")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out")
    args = parser.parse_args(argv)
    results = run(args.quick, args.out.resolve())
    (args.out / "capacity.json").write_text(json.dumps(results, indent=1) + "\n")
    from report import capacity_tables

    print(capacity_tables(results))
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--homeserver"]:
        homeserver(int(sys.argv[2]))
        sys.exit(0)
    sys.exit(main())

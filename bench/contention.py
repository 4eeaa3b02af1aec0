"""The heartbeat beside other users' load, on one sidecar: open-loop restarts with their owners'
tokens (bench/loadgen.py) at a fixed rate, measured alone and then beside
- `lookup`: another user paging through 1,000 finalised events of 64 KiB content
  (`status=finalised&limit=1000`, following next_batch, over and over),
- `history`: the same user paging through the same events with MSC4486's lookup, and/or
- `flood`: tokenless restarts of random delay_ids at a high rate (half of the tagged length, half
  of the untagged form ids had before they carried a tag).

Needs no homeserver: a throwaway PostgreSQL, a stub homeserver that answers whoami, and
`python -m app serve` from this checkout (or `--sidecar-dir`, another checkout using this venv).
With `--via-nginx`, every phase runs again through nginx in front of the same sidecar (the local
stack's configuration, which includes deploy/nginx/ unchanged): the operator's path.
Prints one JSON object: each phase's heartbeat percentiles (ms) and its p99 over the alone run's
(through nginx: under `via_nginx`, over the alone run through nginx). With `--repeats N` the
phases run N rounds, interleaved, and each figure is the round with the median p99.

    PYTHONPATH=bench:scripts .venv/bin/python bench/contention.py lookup flood --duration 15
    PYTHONPATH=bench:scripts .venv/bin/python bench/contention.py lookup flood --via-nginx -r 3
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import re
import secrets
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
PYTHON = REPO / ".venv" / "bin" / "python"
sys.path.insert(0, str(REPO / "scripts"))

from devstack import nginx, procs  # noqa: E402
from devstack.postgres import start_throwaway  # noqa: E402

UNSTABLE = "/_matrix/client/unstable/org.matrix.msc4140"
# One MatrixRTC participant each (a leave, restarted every 5 s): at 300/s that is 1,500
# participants' heartbeat; each user's restarts stay under the default per-user rate limit.
USERS = 200
EVENTS_PER_USER = 1
PAGER = "@pager:bench"
FINALISED = 1000
CONTENT_BYTES = 64 * 1024 - 64


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def homeserver(port: int) -> None:
    """A stub homeserver: whoami for the tokens `hb<n>` and `pager`."""
    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def whoami(request: Request) -> JSONResponse:
        token = request.headers.get("authorization", "").removeprefix("Bearer ")
        if token == "pager":
            return JSONResponse({"user_id": PAGER, "device_id": "PAGER"})
        if token.startswith("hb"):
            return JSONResponse({"user_id": f"@{token}:bench", "device_id": "DEVICE"})
        return JSONResponse({"errcode": "M_UNKNOWN_TOKEN", "error": "unknown"}, status_code=401)

    app = Starlette(routes=[Route("/_matrix/client/v3/account/whoami", whoami)])
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


async def wait_http(url: str, timeout: float = 60) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient() as client:
        while True:
            try:
                await client.get(url)
                return
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.2)


async def seed(sidecar: str, database_url: str, out: Path) -> Path:
    """The heartbeat's events, scheduled through the sidecar (USERS users, EVENTS_PER_USER each),
    and the pager's finalised history, written straight into the table."""
    import asyncpg
    import httpx

    lines = []
    async with httpx.AsyncClient(base_url=sidecar, timeout=30) as client:
        for u in range(USERS):
            for d in range(EVENTS_PER_USER):
                r = await client.put(
                    f"/_matrix/client/v3/rooms/%21hb{u}%3Abench/state/m.call.member/"
                    f"_hb{u}_DEVICE{d}?org.matrix.msc4140.delay=1800000",
                    json={},
                    headers={"Authorization": f"Bearer hb{u}"},
                )
                r.raise_for_status()
                lines.append(f"{UNSTABLE}/delayed_events/{r.json()['delay_id']}/restart\thb{u}\n")
    targets = out / "heartbeat.tsv"
    targets.write_text("".join(lines))
    now = int(time.time() * 1000)
    rows = []
    for n in range(FINALISED):
        # Random text: stored as it would be for real contents, not compressed away.
        body = base64.b64encode(os.urandom(CONTENT_BYTES * 3 // 4)).decode()[:CONTENT_BYTES]
        rows.append(
            (
                f"pager{n:06d}{secrets.token_urlsafe(12)}",
                PAGER,
                "PAGER",
                "A",
                "!pager:bench",
                "m.room.message",
                json.dumps({"body": body}),
                60_000,
                now - 60_000,
                now,
                "cancelled",
                "action",
                now + n,
            )
        )
    conn = await asyncpg.connect(database_url.replace("+asyncpg", ""))
    try:
        await conn.executemany(
            "INSERT INTO delayed_event (delay_id, user_id, device_id, generation, room_id,"
            " event_type, content, delay_ms, created_ts, send_ts, status, reason, finalised_ts)"
            " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)",
            rows,
        )
        await conn.execute("VACUUM ANALYZE delayed_event")
    finally:
        await conn.close()
    return targets


def flood_targets(out: Path) -> Path:
    lines = []
    for n in range(20_000):
        delay_id = secrets.token_urlsafe(27 if n % 2 else 18)  # 36 or 24 characters
        lines.append(f"{UNSTABLE}/delayed_events/{delay_id}/restart\t\n")
    path = out / "flood.tsv"
    path.write_text("".join(lines))
    return path


def loadgen(port: int, targets: Path, rate: float, duration: float) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            str(PYTHON),
            str(REPO / "bench" / "loadgen.py"),
            "--port",
            str(port),
            "--targets",
            str(targets),
            "--rate",
            str(rate),
            "--duration",
            str(duration),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )


# What the pager pages through: the msc4140 list of finalised events, or MSC4486's lookup.
PAGER_LISTS = {
    "lookup": f"{UNSTABLE}/delayed_events?status=finalised&limit=1000",
    "history": "/_matrix/client/unstable/org.matrix.msc4486/delayed_events?limit=1000",
}


async def page_forever(
    sidecar: str, listing: str, stop: asyncio.Event, seen: dict[str, float]
) -> None:
    import httpx

    headers = {"Authorization": "Bearer pager"}
    async with httpx.AsyncClient(base_url=sidecar, timeout=120) as client:
        while not stop.is_set():
            token = None
            while not stop.is_set():
                suffix = f"&from={token}" if token else ""
                started = time.perf_counter()
                r = await client.get(f"{listing}{suffix}", headers=headers)
                seen["pages"] += 1
                seen["bytes"] += len(r.content)
                seen["slowest_page_s"] = max(seen["slowest_page_s"], time.perf_counter() - started)
                token = r.json().get("next_batch")
                if token is None:
                    break


# Processes whose CPU time each phase reports (with their children: nginx's workers).
WATCHED: dict[str, int] = {}


def cpu_seconds(pid: int) -> float:
    """User and system CPU time of `pid` and its direct children, from /proc."""
    total = 0.0
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        children = []
    for each in [pid, *map(int, children)]:
        try:
            fields = Path(f"/proc/{each}/stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


async def settle(limit_s: float = 60.0) -> float:
    """Wait until the sidecar is idle (under 5 % of a core over half a second), so that no phase
    starts while it still works off the one before (a direct flood leaves requests behind it);
    how long that took."""
    started = time.monotonic()
    pid = WATCHED["sidecar"]
    while time.monotonic() - started < limit_s:
        before = cpu_seconds(pid)
        await asyncio.sleep(0.5)
        if cpu_seconds(pid) - before < 0.025:
            break
    return time.monotonic() - started


async def phase(
    name: str, port: int, args: argparse.Namespace, targets: Path, flood: Path | None
) -> dict[str, Any]:
    stop = asyncio.Event()
    seen = {"pages": 0.0, "bytes": 0.0, "slowest_page_s": 0.0}
    pager = None
    if name in PAGER_LISTS:
        sidecar = f"http://127.0.0.1:{port}"
        pager = asyncio.create_task(page_forever(sidecar, PAGER_LISTS[name], stop, seen))
        await asyncio.sleep(1)  # the pager is under way before the heartbeat starts
    flooder = loadgen(port, flood, args.flood_rate, args.duration + 1) if flood else None
    heartbeat = loadgen(port, targets, args.rate, args.duration)
    cpu_before, started = {n: cpu_seconds(pid) for n, pid in WATCHED.items()}, time.monotonic()
    out, _ = await asyncio.to_thread(heartbeat.communicate)
    wall = time.monotonic() - started
    result: dict[str, Any] = {"heartbeat": json.loads(out)}
    # The share of one core each process of ours used while the heartbeat ran, and the machine's
    # load: how much of the phase's time went to the flood's handling, and how busy the box was.
    result["cpu_share"] = {
        n: (cpu_seconds(pid) - cpu_before[n]) / wall for n, pid in WATCHED.items()
    }
    result["loadavg_1m"] = os.getloadavg()[0]
    if flooder is not None:
        flood_out, _ = await asyncio.to_thread(flooder.communicate)
        flooded = json.loads(flood_out)
        result["flood"] = {
            "offered_rate": flooded["offered_rate"],
            "answered_rate": flooded["completed"] / flooded["wall_s"],
            "statuses": flooded["statuses"],
        }
    if pager is not None:
        stop.set()
        await pager
        result["lookup"] = seen
    return result


async def main(args: argparse.Namespace) -> dict[str, Any]:
    sidecar_dir = args.sidecar_dir.resolve()
    with tempfile.TemporaryDirectory(prefix="bench-contention-") as tmp:
        out = Path(tmp)
        os.chmod(tmp, 0o755)
        server = start_throwaway(out / "pg")
        processes: list[subprocess.Popen[bytes]] = []
        try:
            server.create_database("bench")
            database_url = server.database_url("bench")
            hs_port, port = free_port(), free_port()
            env = {
                **{k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
                "SIDECAR_DATABASE_URL": database_url,
                "SIDECAR_HOMESERVER_URL": f"http://127.0.0.1:{hs_port}",
                "SIDECAR_TOKEN_KEYS": base64.urlsafe_b64encode(os.urandom(32)).decode(),
                "SIDECAR_LISTEN_PORT": str(port),
                "SIDECAR_LOG_LEVEL": "WARNING",
            }
            subprocess.run(
                [str(PYTHON), "-m", "app", "migrate"], cwd=sidecar_dir, env=env, check=True
            )
            processes.append(
                subprocess.Popen([str(PYTHON), __file__, "--homeserver", str(hs_port)])
            )
            processes.append(
                subprocess.Popen([str(PYTHON), "-m", "app", "serve"], cwd=sidecar_dir, env=env)
            )
            WATCHED["sidecar"] = processes[-1].pid
            await wait_http(f"http://127.0.0.1:{port}/health")
            targets = await seed(f"http://127.0.0.1:{port}", database_url, out)
            flood = flood_targets(out)
            results: dict[str, Any] = {
                "command": " ".join(sys.argv),
                "rate": args.rate,
                "duration_s": args.duration,
            }
            proxy = None
            ports = {"direct": port}
            if args.via_nginx:
                config = nginx.render(out / "nginx", free_port(), hs_port, port)
                proxy = nginx.start(config)
                WATCHED["nginx"] = proxy.pid
                await wait_http(config.url + "/_matrix/client/versions")
                ports["via_nginx"] = config.listen_port
            try:
                measured = await phases(ports, args, targets, flood)
            finally:
                if proxy is not None:
                    procs.stop(proxy.pid, nginx.MARKER)
                    proxy.wait(timeout=30)
            results.update(measured.pop("direct"))
            results.update(measured)
            if args.via_nginx:
                # What nginx had to say (e.g. answers spilled to temporary files), by kind.
                said: dict[str, int] = {}
                for line in config.error_log.read_text(errors="replace").splitlines():
                    kind = re.sub(r"^\d+#\d+: (\*\d+ )?", "", line.partition("] ")[2])
                    kind = kind.split(",")[0][:80]
                    said[kind] = said.get(kind, 0) + 1
                results["via_nginx"]["error_log"] = said
            return results
        finally:
            for proc in processes:
                proc.terminate()
            for proc in processes:
                proc.wait(timeout=30)
            server.stop()


async def phases(
    ports: dict[str, int], args: argparse.Namespace, targets: Path, flood: Path
) -> dict[str, Any]:
    """The heartbeat alone, then beside each load asked for, on each path (`ports`: direct, and
    through nginx), `--repeats` times interleaved (alone, beside…, alone, beside…, path by path
    within each round) so that a noisy neighbour slows every phase alike. Each phase's result is
    its repeat with the median heartbeat p99, with every repeat's p99 beside it. Each phase
    starts once the sidecar is idle again."""
    names = ["alone"] + [p for p in ("lookup", "history", "flood") if p in args.beside]
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {path: {} for path in ports}
    for _ in range(args.repeats):
        for path, port in ports.items():
            for name in names:
                settled_s = await settle()
                result = await phase(name, port, args, targets, flood if name == "flood" else None)
                result["settled_s"] = settled_s
                runs[path].setdefault(name, []).append(result)
    measured: dict[str, Any] = {}
    for path in ports:
        results: dict[str, Any] = {}
        for name in names:
            repeats = sorted(runs[path][name], key=lambda r: r["heartbeat"]["latency_ms"]["99"])
            results[name] = repeats[len(repeats) // 2]
            results[name]["p99_repeats"] = [r["heartbeat"]["latency_ms"]["99"] for r in repeats]
        alone = results["alone"]["heartbeat"]["latency_ms"]["99"]
        for name in names[1:]:
            p99 = results[name]["heartbeat"]["latency_ms"]["99"]
            results[name]["p99_over_alone"] = p99 / alone if alone else None
        measured[path] = results
    return measured


if __name__ == "__main__":
    if sys.argv[1:2] == ["--homeserver"]:
        homeserver(int(sys.argv[2]))
        sys.exit(0)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("beside", nargs="+", choices=["lookup", "history", "flood"])
    parser.add_argument("--rate", type=float, default=300.0, help="heartbeat restarts/s")
    parser.add_argument("--flood-rate", type=float, default=5000.0)
    parser.add_argument("--duration", type=float, default=15.0, help="seconds per phase")
    parser.add_argument("--sidecar-dir", type=Path, default=REPO)
    parser.add_argument(
        "-r", "--repeats", type=int, default=1, help="rounds of every phase, interleaved; medians"
    )
    parser.add_argument(
        "--via-nginx",
        action="store_true",
        help="then every phase again through nginx (deploy/nginx/, as the local stack runs it)",
    )
    print(json.dumps(asyncio.run(main(parser.parse_args())), indent=1))

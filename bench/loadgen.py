"""An HTTP/1.1 load generator for the heartbeat benchmark, open or closed loop.

Open loop (`--rate R`): request i is *intended* to go out at start + i/R, whatever happened to the
ones before it. Requests wait for a free keep-alive connection when all are busy, and every
latency is measured from the intended send time, so a slow server cannot hide its queue by slowing
the generator down (the "coordinated omission" that closed-loop tools suffer from; wrk2 measures
the same way). Closed loop (`--rate 0`): each connection sends its next request as soon as the
answer to the previous one arrives; this is how the generator's own ceiling is measured.

Targets come from a file of lines `PATH<TAB>TOKEN` (TOKEN may be empty); they are used in turn,
each sent as `--method` (POST unless told) with the body `{}`. With `--port` given more than once,
the connections are opened to the ports in turn (one generator in front of several replicas).
The answer is one JSON object on stdout: counts, status codes, latency percentiles in
milliseconds, the achieved rate, the generator's own CPU time and how late its own event loop
woke up (a stall on the generator's side shows there). `--dump FILE` also writes every answer's
timing (due, sent, answered, connection), to line latency up against time and against what the
server was doing then.

    python bench/loadgen.py --port 8009 --targets ids.tsv --rate 1000 --duration 10
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import math
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

PERCENTILES = (50, 90, 99, 99.9)


def percentile(sorted_values: list[float], p: float) -> float:
    """Nearest-rank percentile of an already sorted list."""
    if not sorted_values:
        return float("nan")
    rank = max(1, min(len(sorted_values), int(-(-p * len(sorted_values) // 100))))
    return sorted_values[rank - 1]


def build_requests(
    host: str, port: int, targets: list[tuple[str, str]], method: str = "POST"
) -> list[bytes]:
    built = []
    for path, token in targets:
        head = [
            f"{method} {path} HTTP/1.1",
            f"Host: {host}:{port}",
            "Content-Type: application/json",
            "Content-Length: 2",
        ]
        if token:
            head.append(f"Authorization: Bearer {token}")
        built.append(("\r\n".join(head) + "\r\n\r\n{}").encode())
    return built


class Connection(asyncio.Protocol):
    """One keep-alive connection; parses just enough HTTP/1.1 to find where an answer ends."""

    def __init__(self, generator: Generator) -> None:
        self.gen = generator
        self.transport: Any = None
        self.buffer = bytearray()
        self.intended = 0.0
        self.sent = 0.0
        self.index = generator.opened  # in the order connections were opened
        generator.opened += 1
        self.busy = False
        self.connected = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.connected.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self.busy:
            self.busy = False
            self.gen.finished(self, None)
        self.gen.lost(self)

    def send(self, payload: bytes, intended: float) -> None:
        assert self.transport is not None
        self.busy = True
        self.intended = intended
        self.sent = time.perf_counter()
        self.buffer.clear()
        self.transport.write(payload)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            return
        head = bytes(self.buffer[:end]).lower()
        body_start = end + 4
        marker = head.find(b"content-length:")
        if marker >= 0:
            line_end = head.find(b"\r\n", marker)
            length = int(head[marker + 15 : line_end if line_end >= 0 else None])
            if len(self.buffer) < body_start + length:
                return
        elif b"transfer-encoding: chunked" in head:
            if not self.buffer.endswith(b"0\r\n\r\n"):
                return
        status = int(head[9:12])
        self.busy = False
        self.gen.finished(self, status)


class Generator:
    def __init__(self, args: argparse.Namespace, requests: list[bytes]) -> None:
        self.args = args
        self.requests = requests
        self.next_request = 0
        self.idle: collections.deque[Connection] = collections.deque()
        self.waiting: collections.deque[float] = collections.deque()
        self.connections: list[Connection] = []
        self.opened = 0
        self.latencies: list[float] = []
        # --dump: one (intended, sent, answered, connection, status) per answer
        self.records: list[tuple[float, float, float, int, int]] | None = [] if args.dump else None
        # The generator's own event-loop lag: (when, how late) of every late wake-up.
        self.lags: list[tuple[float, float]] = []
        self.statuses: collections.Counter[str] = collections.Counter()
        self.in_flight = 0
        self.stopping = False
        self.loop = asyncio.get_running_loop()
        self.drained = asyncio.Event()

    def payload(self) -> bytes:
        request = self.requests[self.next_request % len(self.requests)]
        self.next_request += 1
        return request

    async def connect(self) -> Connection:
        port = self.args.port[self.opened % len(self.args.port)]
        _, protocol = await self.loop.create_connection(
            lambda: Connection(self), self.args.host, port
        )
        await protocol.connected
        self.connections.append(protocol)
        return protocol

    def lost(self, conn: Connection) -> None:
        if conn in self.connections:
            self.connections.remove(conn)
        if conn in self.idle:
            self.idle.remove(conn)
        if not self.stopping:
            self.loop.create_task(self._replace())

    async def _replace(self) -> None:
        try:
            self.give_work(await self.connect())
        except OSError:
            self.statuses["connect_error"] += 1

    def finished(self, conn: Connection, status: int | None) -> None:
        now = time.perf_counter()
        self.in_flight -= 1
        self.statuses[str(status) if status is not None else "closed"] += 1
        if status is not None and 200 <= status < 300:
            self.latencies.append(now - conn.intended)
        if self.records is not None:
            self.records.append((conn.intended, conn.sent, now, conn.index, status or 0))
        if conn.transport is not None:
            self.give_work(conn)
        if self.stopping and self.in_flight == 0 and not self.waiting:
            self.drained.set()

    def give_work(self, conn: Connection) -> None:
        if self.args.rate <= 0:
            if not self.stopping:
                self.dispatch(conn, time.perf_counter())
                return
        elif self.waiting:
            self.dispatch(conn, self.waiting.popleft())
            return
        self.idle.append(conn)

    def dispatch(self, conn: Connection, intended: float) -> None:
        self.in_flight += 1
        conn.send(self.payload(), intended)

    def offer(self, intended: float) -> None:
        """Open loop: request due at `intended` goes out now, or waits for a free connection."""
        if self.idle:
            self.dispatch(self.idle.popleft(), intended)
        else:
            self.waiting.append(intended)

    async def run(self) -> dict[str, Any]:
        args = self.args
        for _ in range(args.connections):
            self.idle.append(await self.connect())
        cpu0 = _cpu_seconds()
        start = time.perf_counter() + 0.05
        end = start + args.duration
        if args.rate > 0:
            interval = 1.0 / args.rate
            i = 0
            while True:
                now = time.perf_counter()
                while start + i * interval <= min(now, end - 1e-9):
                    self.offer(start + i * interval)
                    i += 1
                if start + i * interval >= end:
                    break
                # uvloop's timers tick in milliseconds: shorter sleeps would only spin.
                wake = max(0.001, start + i * interval - time.perf_counter())
                before = time.perf_counter()
                await asyncio.sleep(wake)
                late = time.perf_counter() - before - wake
                if late > 0.005:
                    self.lags.append((before + wake - start, late))
            offered = i
        else:
            await asyncio.sleep(max(0.0, start - time.perf_counter()))
            while self.idle:
                self.dispatch(self.idle.popleft(), time.perf_counter())
            await asyncio.sleep(max(0.0, end - time.perf_counter()))
            offered = 0
        self.stopping = True
        sent_window = time.perf_counter() - start
        if self.in_flight or self.waiting:
            try:
                await asyncio.wait_for(self.drained.wait(), args.timeout)
            except TimeoutError:
                pass
        unsent = len(self.waiting)
        cpu = _cpu_seconds() - cpu0
        wall = time.perf_counter() - start
        for conn in self.connections:
            if conn.transport is not None:
                conn.transport.close()
        ok = len(self.latencies)
        if self.records is not None:
            _dump(args.dump, start, self.records)
        # What never got an answer counts as infinitely late: a saturated target shows as such.
        lat = sorted(self.latencies) + [math.inf] * (self.in_flight + unsent)
        done = sum(self.statuses.values())
        errors = done - ok + unsent + self.in_flight
        return {
            "mode": "open" if args.rate > 0 else "closed",
            "offered_rate": args.rate,
            "offered": offered,
            "completed": done,
            "ok": ok,
            "errors": errors,
            "unanswered": self.in_flight + unsent,
            "statuses": dict(self.statuses),
            "rate": ok / sent_window if args.rate <= 0 else ok / max(wall, args.duration),
            "latency_ms": {str(p): percentile(lat, p) * 1000 for p in PERCENTILES},
            "latency_ms_max": lat[-1] * 1000 if lat else float("nan"),
            "generator_cpu_s": cpu,
            "generator_lag_ms_max": max((late for _, late in self.lags), default=0.0) * 1000,
            "generator_lags_over_5ms": len(self.lags),
            "generator_cpu_share": cpu / wall if wall > 0 else float("nan"),
            "wall_s": wall,
            # The start on perf_counter's clock (CLOCK_MONOTONIC on Linux, as time.monotonic()):
            # lines --dump up with timestamps taken by other processes.
            "start_monotonic": start,
        }


def _dump(path: Path, start: float, records: list[tuple[float, float, float, int, int]]) -> None:
    """Per answer, in seconds from the start: when it was due, when it went out, when its answer
    was read; its latency in ms, the connection's index and the status (0: connection lost)."""
    with path.open("w") as out:
        out.write("intended_s\tsent_s\tanswered_s\tlatency_ms\tconnection\tstatus\n")
        for intended, sent, answered, index, status in records:
            out.write(
                f"{intended - start:.6f}\t{sent - start:.6f}\t{answered - start:.6f}\t"
                f"{(answered - intended) * 1000:.3f}\t{index}\t{status}\n"
            )


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def load_targets(path: Path) -> list[tuple[str, str]]:
    targets = []
    for line in path.read_text().splitlines():
        if line.strip():
            target, _, token = line.partition("\t")
            targets.append((target, token))
    return targets


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument(
        "--port", type=int, action="append", required=True, help="repeat: connections in turn"
    )
    parser.add_argument("--targets", type=Path, required=True)
    parser.add_argument("--rate", type=float, default=0.0, help="requests/s; 0 = closed loop")
    parser.add_argument("--method", default="POST", choices=["POST", "PUT"])
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--timeout", type=float, default=15.0, help="drain time after the end")
    parser.add_argument(
        "--dump", type=Path, help="write every answer's timing here (tab-separated, see _dump)"
    )
    args = parser.parse_args(argv)
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    requests = build_requests(args.host, args.port[0], load_targets(args.targets), args.method)

    async def go() -> dict[str, Any]:
        return await Generator(args, requests).run()

    result = asyncio.run(go())
    result["pid"] = os.getpid()
    json.dump(result, sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())

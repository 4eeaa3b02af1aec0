"""Bursts: N delayed events falling due together, watched from a client's /sync long-poll, against
the homeserver's own rate for ordinary sends of the same events at the sidecar's replay
concurrency, measured in the same run, two ways: in no particular order (any event of any room,
REPLAY_CONCURRENCY at a time), and in order as the sidecar replays them (one at a time per room,
in send order, up to REPLAY_CONCURRENCY rooms side by side)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from client import RTC_TYPE, MatrixClient, SyncWatcher, bounded, q
from services import Services

# SIDECAR_REPLAY_CONCURRENCY's default, which the stack runs with.
REPLAY_CONCURRENCY = 16
ROOMS = 100


@dataclass(frozen=True)
class Case:
    n: int
    rooms: int
    spread_s: float  # due times spread evenly over this window
    kind: str  # "message" or "leave" (MatrixRTC call-member state event)

    @property
    def name(self) -> str:
        what = "messages" if self.kind == "message" else "call-member leaves"
        where = "1 room" if self.rooms == 1 else f"{self.rooms} rooms"
        due = f"due within {self.spread_s:g} s" if self.spread_s else "due at once"
        return f"{self.n} {what}, {where}, {due}"


def _key(event: dict[str, Any]) -> str | None:
    if event.get("type") == RTC_TYPE:
        key = event.get("state_key")
        return key if isinstance(key, str) and "_bench" in key else None
    content = event.get("content")
    if isinstance(content, dict):
        key = content.get("bench_key")
        return key if isinstance(key, str) else None
    return None


class Bursts:
    def __init__(self, services: Services) -> None:
        self.stack = services.stack
        self.runs = 0

    async def __aenter__(self) -> Bursts:
        account = self.stack.register("burst", "bench-password")
        self.user_id = account.user_id
        self.hs = MatrixClient(self.stack.homeserver_url, account.access_token, connections=64)
        self.sidecar = MatrixClient(self.stack.sidecar_url, account.access_token, connections=64)
        self.rooms = await bounded(8, [self.hs.create_room for _ in range(ROOMS)])
        self.watcher = SyncWatcher(self.stack.homeserver_url, account.access_token, _key)
        await self.watcher.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.watcher.stop()
        await self.hs.close()
        await self.sidecar.close()

    def _plan(self, case: Case) -> tuple[str, list[tuple[str, str]]]:
        self.runs += 1
        run = f"r{self.runs}"
        plan = []
        for i in range(case.n):
            room = self.rooms[i % case.rooms]
            if case.kind == "leave":
                key = f"_{self.user_id}_bench{run}D{i}_m.call"
            else:
                key = f"{run}:{i}"
            plan.append((room, key))
        return run, plan

    async def _collect(self, keys: list[str], deadline: float) -> tuple[dict[str, float], int, int]:
        await self.watcher.wait_for(set(keys), deadline)
        first: dict[str, float] = {}
        duplicates = 0
        for key in keys:
            seen = self.watcher.arrivals.get(key, [])
            if seen:
                first[key] = min(a.wall for a in seen)
                duplicates += len({a.event_id for a in seen}) - 1
        return first, len(keys) - len(first), duplicates

    async def sidecar_run(self, case: Case) -> dict[str, Any]:
        """Schedule the events through the sidecar so that they fall due from T0 on, and watch."""
        run, plan = self._plan(case)
        lead = 3.0 + case.n / 200
        t0 = time.time() + lead
        due = {key: t0 + case.spread_s * i / case.n for i, (_, key) in enumerate(plan)}
        scheduled_late = 0

        async def schedule(room: str, key: str) -> None:
            nonlocal scheduled_late
            delay = round((due[key] - time.time()) * 1000)
            if delay < 0:
                scheduled_late += 1
                delay = 0
            if case.kind == "leave":
                await self.sidecar.delayed_state(room, RTC_TYPE, key, {}, delay)
            else:
                content = {"msgtype": "m.text", "body": f"burst {key}", "bench_key": key}
                await self.sidecar.delayed_message(room, key, content, delay)

        started = time.time()
        await bounded(32, [lambda r=r, k=k: schedule(r, k) for r, k in plan])
        scheduling_s = time.time() - started
        keys = [key for _, key in plan]
        arrived, lost, duplicates = await self._collect(
            keys, t0 + case.spread_s + max(30.0, case.n / 20)
        )
        lateness = sorted(arrived[k] - due[k] for k in arrived)
        last = max(arrived.values(), default=float("nan"))
        drain = last - t0
        return {
            "n": case.n,
            "spread_s": case.spread_s,
            "lost": lost,
            "duplicated": duplicates,
            "scheduled_late": scheduled_late,
            "scheduling_rate": case.n / scheduling_s,
            "drain_s": drain,
            "rate": len(arrived) / drain if drain > 0 else float("nan"),
            "lateness_s": lateness,
        }

    async def _send(self, case: Case, room: str, key: str) -> None:
        if case.kind == "leave":
            await self.hs.call(
                "PUT",
                f"/_matrix/client/v3/rooms/{q(room)}/state/{RTC_TYPE}/{q(key)}",
                {},
            )
        else:
            content = {"msgtype": "m.text", "body": f"plain {key}", "bench_key": key}
            await self.hs.send_message(room, key, content)

    async def plain_run(self, case: Case) -> dict[str, Any]:
        """The same events as ordinary sends straight to the homeserver, REPLAY_CONCURRENCY at a
        time in no particular order: the rate the homeserver itself sustains, seen through the
        same /sync."""
        run, plan = self._plan(case)
        started = time.time()
        await bounded(
            REPLAY_CONCURRENCY, [lambda r=r, k=k: self._send(case, r, k) for r, k in plan]
        )
        return await self._plain_outcome(case, plan, started)

    async def ordered_run(self, case: Case) -> dict[str, Any]:
        """The same events as ordinary sends straight to the homeserver in the order the sidecar
        keeps: within a room one at a time, each sent once the previous one is answered, in send
        order; rooms side by side, at most REPLAY_CONCURRENCY of them at once."""
        run, plan = self._plan(case)
        by_room: dict[str, list[str]] = {}
        for room, key in plan:
            by_room.setdefault(room, []).append(key)

        async def room_in_order(room: str, keys: list[str]) -> None:
            for key in keys:
                await self._send(case, room, key)

        started = time.time()
        await bounded(
            REPLAY_CONCURRENCY,
            [lambda r=r, ks=ks: room_in_order(r, ks) for r, ks in by_room.items()],
        )
        return await self._plain_outcome(case, plan, started)

    async def _plain_outcome(
        self, case: Case, plan: list[tuple[str, str]], started: float
    ) -> dict[str, Any]:
        keys = [key for _, key in plan]
        arrived, lost, duplicates = await self._collect(keys, started + max(30.0, case.n / 20))
        drain = max(arrived.values(), default=float("nan")) - started
        return {
            "n": case.n,
            "lost": lost,
            "duplicated": duplicates,
            "drain_s": drain,
            "rate": len(arrived) / drain if drain > 0 else float("nan"),
            # For events due at once: the homeserver's own floor under the sidecar's lateness.
            "latency_s": sorted(t - started for t in arrived.values()),
        }

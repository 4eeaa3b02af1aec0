"""A small Matrix client for setting benchmarks up and watching them: rooms, delayed events,
plain sends, and a /sync long-poll that records when each event reaches a client."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

RTC_TYPE = "org.matrix.msc3401.call.member"
DELAY_PARAM = "org.matrix.msc4140.delay"
SYNC_FILTER = json.dumps(
    {
        "room": {
            "timeline": {"limit": 10000},
            "state": {"lazy_load_members": True, "types": []},
            "ephemeral": {"not_types": ["*"]},
            "account_data": {"not_types": ["*"]},
        },
        "presence": {"not_types": ["*"]},
        "account_data": {"not_types": ["*"]},
    },
    separators=(",", ":"),
)


def q(value: str) -> str:
    return urllib.parse.quote(value, safe="")


class MatrixClient:
    def __init__(self, base_url: str, token: str, connections: int = 32) -> None:
        self.base = base_url.rstrip("/")
        self.http = httpx.AsyncClient(
            base_url=self.base,
            headers={"Authorization": f"Bearer {token}"},
            timeout=60,
            limits=httpx.Limits(max_connections=connections, max_keepalive_connections=connections),
        )

    async def close(self) -> None:
        await self.http.aclose()

    async def call(self, method: str, path: str, body: Any = None) -> dict[str, Any]:
        response = await self.http.request(method, path, json=body)
        if response.status_code != 200:
            raise RuntimeError(f"{method} {path}: {response.status_code} {response.text[:300]}")
        answer: dict[str, Any] = response.json()
        return answer

    async def create_room(self) -> str:
        answer = await self.call(
            "POST", "/_matrix/client/v3/createRoom", {"preset": "private_chat"}
        )
        return str(answer["room_id"])

    async def delayed_state(
        self, room_id: str, event_type: str, state_key: str, content: dict[str, Any], delay_ms: int
    ) -> str:
        path = (
            f"/_matrix/client/v3/rooms/{q(room_id)}/state/{q(event_type)}/{q(state_key)}"
            f"?{DELAY_PARAM}={delay_ms}"
        )
        return str((await self.call("PUT", path, content))["delay_id"])

    async def delayed_message(
        self, room_id: str, txn: str, content: dict[str, Any], delay_ms: int
    ) -> str:
        path = (
            f"/_matrix/client/v3/rooms/{q(room_id)}/send/m.room.message/{q(txn)}"
            f"?{DELAY_PARAM}={delay_ms}"
        )
        return str((await self.call("PUT", path, content))["delay_id"])

    async def send_message(self, room_id: str, txn: str, content: dict[str, Any]) -> str:
        path = f"/_matrix/client/v3/rooms/{q(room_id)}/send/m.room.message/{q(txn)}"
        return str((await self.call("PUT", path, content))["event_id"])


async def bounded(concurrency: int, jobs: list[Callable[[], Any]]) -> list[Any]:
    """Run coroutine factories with at most `concurrency` at a time, results in order."""
    slots = asyncio.Semaphore(concurrency)

    async def one(job: Callable[[], Any]) -> Any:
        async with slots:
            return await job()

    return list(await asyncio.gather(*(one(job) for job in jobs)))


@dataclass
class Arrival:
    wall: float  # time.time() when the /sync answer carrying the event was read
    event_id: str
    origin_ts: int


@dataclass
class SyncWatcher:
    """Long-polls /sync and records, per key, every arrival of an event whose key `keyer` finds."""

    base_url: str
    token: str
    keyer: Callable[[dict[str, Any]], str | None]
    arrivals: dict[str, list[Arrival]] = field(default_factory=dict)
    since: str | None = None
    _task: asyncio.Task[None] | None = None
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    async def start(self) -> None:
        self.http = httpx.AsyncClient(
            base_url=self.base_url,
            headers={"Authorization": f"Bearer {self.token}"},
            timeout=90,
        )
        answer = await self._sync(0)
        self.since = answer["next_batch"]
        self._task = asyncio.create_task(self._loop())

    async def _sync(self, timeout_ms: int) -> dict[str, Any]:
        params = {"filter": SYNC_FILTER, "timeout": str(timeout_ms)}
        if self.since is not None:
            params["since"] = self.since
        response = await self.http.get("/_matrix/client/v3/sync", params=params)
        response.raise_for_status()
        answer: dict[str, Any] = response.json()
        return answer

    async def _loop(self) -> None:
        while True:
            try:
                answer = await self._sync(30000)
            except httpx.HTTPError:
                await asyncio.sleep(0.1)
                continue
            now = time.time()
            for room in answer.get("rooms", {}).get("join", {}).values():
                for event in room.get("timeline", {}).get("events", []):
                    key = self.keyer(event)
                    if key is not None:
                        self.arrivals.setdefault(key, []).append(
                            Arrival(now, event["event_id"], int(event["origin_server_ts"]))
                        )
            self.since = answer["next_batch"]
            self._changed.set()

    async def wait_for(self, keys: set[str], deadline: float) -> None:
        """Until every key has arrived or time.time() passes `deadline`."""
        while not keys.issubset(self.arrivals) and time.time() < deadline:
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), max(0.01, deadline - time.time()))
            except TimeoutError:
                return

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        await self.http.aclose()

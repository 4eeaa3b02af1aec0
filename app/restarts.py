"""Restarts in batches. The heartbeat of every call participant is a restart every few seconds;
restarts that arrive while the previous batch is being written share the next one: a single
statement restarts them all and refreshes their devices' tokens, committed on its own. Each caller
is answered only after that commit, with the outcome for its own event, so a restart answered 200
is in the database exactly as if it had had a transaction of its own.

One batch is written at a time, so batches never contend with each other for rows.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from sqlalchemy.ext.asyncio import AsyncEngine

from app import repository as repo
from app.clock import Clock
from app.replay.tokens import SealedToken

# Bounds a statement's size; more waiting restarts simply make the next batch.
MAX_BATCH = 500


@dataclass(slots=True)
class _Restart:
    delay_id: str
    owner: str | None
    token: SealedToken | None
    answer: asyncio.Future[bool]


class RestartBatcher:
    def __init__(self, engine: AsyncEngine, clock: Clock) -> None:
        self._engine = engine
        self._clock = clock
        self._waiting: list[_Restart] = []
        self._writer: asyncio.Task[None] | None = None

    async def restart(self, delay_id: str, owner: str | None, token: SealedToken | None) -> bool:
        """Restart the delay of `delay_id` (only if `owner` owns it, when given) from the time its
        batch is written, and refresh the caller's stored token; whether it was restarted.
        Database errors are raised to every caller of the batch."""
        answer: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._waiting.append(_Restart(delay_id, owner, token, answer))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write_all())
        return await answer

    async def _write_all(self) -> None:
        while self._waiting:
            batch = self._waiting[:MAX_BATCH]
            del self._waiting[:MAX_BATCH]
            try:
                restarted = await self._write(batch)
            except BaseException as exc:
                for item in batch:
                    if not item.answer.done():
                        item.answer.set_exception(exc)
                if not isinstance(exc, Exception):
                    raise
                continue
            ids = {delay_id for delay_id, _ in restarted}
            for item in batch:
                if not item.answer.done():
                    if item.owner is not None:
                        item.answer.set_result((item.delay_id, item.owner) in restarted)
                    else:
                        item.answer.set_result(item.delay_id in ids)

    async def _write(self, batch: list[_Restart]) -> set[tuple[str, str]]:
        tokens: dict[tuple[str, str | None], tuple[bytes, bytes]] = {}
        for item in batch:  # the newest token of each device wins
            if item.token is not None:
                key = (item.token.user_id, item.token.device_id)
                tokens[key] = (item.token.token, item.token.digest)
        now = self._clock.now_ms()
        # One statement, committed on its own: no BEGIN and COMMIT round trips.
        async with self._engine.connect() as conn:
            autocommit = await conn.execution_options(isolation_level="AUTOCOMMIT")
            return await repo.restart_many(
                autocommit, [(item.delay_id, item.owner) for item in batch], tokens, now
            )

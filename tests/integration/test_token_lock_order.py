"""A restart batch (which refreshes device tokens) and a finalise (which forgets the tokens no
event needs) lock the same device_token rows in the same order, whatever the database's collation:
otherwise, under a collation such as en_US where upper and lower case and "_" sort otherwise than
their code points, the two could each hold a row the other waits for (a deadlock, which PostgreSQL
ends by aborting one of them: a whole batch of heartbeats).

The test database sorts by code point, which would hide that; so the key columns are given an
en-US collation for these tests, and the order each statement locks in is read from PostgreSQL
itself: a row is held in another transaction, the statement waits for it, and the rows it locked
before waiting are the ones it orders first."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from app import repository as repo
from app import repository_tokens as tokens_repo

# Mixed case and "_": code point order and en-US order disagree on these.
DEVICES: list[tokens_repo.Device] = [
    ("@A:x", "d"),
    ("@Ab:x", "d"),
    ("@_z:x", "d"),
    ("@aB:x", "d"),
    ("@a_b:x", "d"),
    ("@ab:x", "d"),
    ("@ac:x", "d"),
    ("@b:x", "D_1"),
    ("@b:x", "d1"),
    ("@b:x", "D1"),
]
COLLATIONS = ("en-US-x-icu", "en_US.utf8", "en_US")


@pytest.fixture
async def engine(database_url: str, clean_db: None) -> AsyncIterator[AsyncEngine]:
    """The test database, its device_token keys compared under an en-US collation meanwhile."""
    engine = create_async_engine(database_url)
    async with engine.begin() as conn:
        found = (
            await conn.execute(
                text("SELECT collname FROM pg_collation WHERE collname = ANY(:names)"),
                {"names": list(COLLATIONS)},
            )
        ).scalars()
        available = set(found)
        collation = next((name for name in COLLATIONS if name in available), None)
        if collation is None:
            pytest.skip("the PostgreSQL server has no en-US collation")
        await conn.execute(text(alter_keys(collation)))
        await conn.execute(
            text(
                "INSERT INTO device_token (user_id, device_id, token, digest, updated_ts) "
                "SELECT u, d, '\\x00', '\\x00', 0 "
                "FROM unnest(CAST(:users AS text[]), CAST(:devices AS text[])) AS t (u, d)"
            ),
            {"users": [u for u, _ in DEVICES], "devices": [d for _, d in DEVICES]},
        )
    try:
        yield engine
    finally:
        async with engine.begin() as conn:
            await conn.execute(text("TRUNCATE device_token"))
            await conn.execute(text(alter_keys("default")))
        await engine.dispose()


def alter_keys(collation: str) -> str:
    return (
        f'ALTER TABLE device_token ALTER COLUMN user_id TYPE text COLLATE "{collation}", '
        f'ALTER COLUMN device_id TYPE text COLLATE "{collation}"'
    )


async def pid(conn: AsyncConnection) -> int:
    return int((await conn.execute(text("SELECT pg_backend_pid()"))).scalar_one())


async def wait_until_blocked(engine: AsyncEngine, backend: int) -> None:
    """Wait until the backend waits for a lock (read from PostgreSQL itself)."""
    async with engine.connect() as conn:
        while True:
            result = await conn.execute(
                text("SELECT 1 FROM pg_locks WHERE NOT granted AND pid = :pid"), {"pid": backend}
            )
            if result.first() is not None:
                return
            await asyncio.sleep(0.005)


async def locked_before(
    engine: AsyncEngine,
    held: tokens_repo.Device,
    statement: Callable[[AsyncConnection], Awaitable[object]],
) -> set[tokens_repo.Device]:
    """The rows `statement` has locked when it waits for `held`, held by another transaction."""
    async with engine.connect() as holder, engine.connect() as worker:
        await holder.begin()
        await holder.execute(
            text("SELECT 1 FROM device_token WHERE user_id = :u AND device_id = :d FOR UPDATE"),
            {"u": held[0], "d": held[1]},
        )
        await worker.begin()
        running = asyncio.create_task(statement(worker))
        try:
            await wait_until_blocked(engine, await pid(worker))
            async with engine.connect() as observer:
                free = await observer.execute(
                    text("SELECT user_id, device_id FROM device_token FOR SHARE SKIP LOCKED")
                )
                unlocked = {(row.user_id, row.device_id) for row in free}
                await observer.rollback()
        finally:
            await holder.rollback()
            await running
            await worker.rollback()
    return set(DEVICES) - unlocked - {held}


async def refresh(conn: AsyncConnection) -> None:
    new: dict[tokens_repo.Device, tuple[bytes, bytes]] = dict.fromkeys(
        DEVICES, (b"sealed", b"new digest")
    )
    await repo.restart_many(conn, [], new, now=1)


async def forget(conn: AsyncConnection) -> None:
    await tokens_repo.forget_unused_tokens(conn, DEVICES)


async def test_a_restart_batch_and_a_finalise_lock_device_tokens_in_the_same_order(
    engine: AsyncEngine,
) -> None:
    code_points = sorted(DEVICES)
    async with engine.connect() as conn:
        result = await conn.execute(
            text("SELECT user_id, device_id FROM device_token ORDER BY user_id, device_id")
        )
        collated = [(row.user_id, row.device_id) for row in result]
    assert collated != code_points  # the collation does sort them otherwise
    # Rows the two orders put on different sides of another row: where a deadlock could start.
    telling = [
        device
        for device in DEVICES
        if set(code_points[: code_points.index(device)]) != set(collated[: collated.index(device)])
    ]
    assert telling
    for held in telling:
        by_batch = await locked_before(engine, held, refresh)
        by_finalise = await locked_before(engine, held, forget)
        assert by_batch == by_finalise
        assert by_batch == set(code_points[: code_points.index(held)])

"""`python -m app admin list | cancel | purge | stats`: the admin API's actions (app/admin.py) run
directly against the database, with `SIDECAR_DATABASE_URL` alone (or its `_FILE`). Prints the
answer as JSON on stdout; exits 1 with a Matrix-shaped error on stderr when an action is refused,
2 when the settings are wrong.

A cancel here is counted in this process's metrics, not the server's; the event is finalised and
its tokens forgotten just the same, and a running sidecar never sends it."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from typing import Any

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import create_async_engine

from app.admin import (
    DEFAULT_OVERDUE_MS,
    AdminService,
    check_room_id,
    check_status,
    check_user_id,
)
from app.clock import SystemClock
from app.errors import InvalidParam, MatrixError
from app.repository_admin import ADMIN_STATUSES, AdminFilter
from app.settings import SettingsError, load_database_settings

logger = logging.getLogger(__name__)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m app admin", description=__doc__)
    commands = parser.add_subparsers(dest="action", required=True)
    listing = commands.add_parser("list", help="delayed events by user, room and status")
    listing.add_argument("--user", help="only this user's (@name:server)")
    listing.add_argument("--room", help="only this room's (!id:server)")
    listing.add_argument("--status", choices=ADMIN_STATUSES)
    listing.add_argument("--limit", type=int, default=100, help="page size, 1 to 1000")
    listing.add_argument("--from", dest="from_token", help="next_batch of the previous page")
    cancel = commands.add_parser("cancel", help="cancel one event, a user's or a room's")
    which = cancel.add_mutually_exclusive_group(required=True)
    which.add_argument("--delay-id")
    which.add_argument("--user")
    which.add_argument("--room")
    purge = commands.add_parser("purge", help="delete a user's finalised history (erasure)")
    purge.add_argument("--user", required=True)
    stats = commands.add_parser("stats", help="the backlog and the last hour's failures")
    stats.add_argument(
        "--overdue-ms",
        type=int,
        default=DEFAULT_OVERDUE_MS,
        help="how long past its send time an event counts as overdue",
    )
    return parser


async def _act(admin: AdminService, args: argparse.Namespace) -> dict[str, Any]:
    if args.action == "list":
        if not 1 <= args.limit <= 1000:
            raise InvalidParam("--limit must be from 1 to 1000")
        where = AdminFilter(
            user_id=check_user_id(args.user) if args.user is not None else None,
            room_id=check_room_id(args.room) if args.room is not None else None,
            status=check_status(args.status) if args.status is not None else None,
        )
        return await admin.list(where, from_token=args.from_token, limit=args.limit)
    if args.action == "cancel":
        if args.delay_id is not None:
            return await admin.cancel_one(args.delay_id)
        if args.user is not None:
            return await admin.cancel_user(check_user_id(args.user))
        return await admin.cancel_room(check_room_id(args.room))
    if args.action == "purge":
        return await admin.purge_user(check_user_id(args.user))
    if args.overdue_ms < 0:
        raise InvalidParam("--overdue-ms must not be negative")
    return await admin.stats(overdue_ms=args.overdue_ms)


async def _run(database_url: str, args: argparse.Namespace) -> dict[str, Any]:
    engine = create_async_engine(database_url, pool_size=1, hide_parameters=True)
    try:
        return await _act(AdminService(engine, SystemClock()), args)
    finally:
        await engine.dispose()


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    try:
        database_url = load_database_settings().database_url
    except SettingsError as exc:
        print(exc, file=sys.stderr)  # noqa: T201
        return 2
    # The actions' own INFO lines (what was done) go to stderr; stdout holds the answer alone.
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        answer = asyncio.run(_run(database_url, args))
    except MatrixError as exc:
        print(json.dumps(exc.body()), file=sys.stderr)  # noqa: T201
        return 1
    except (SQLAlchemyError, OSError) as exc:
        # The type alone: a database error's text may quote the URL's parts.
        print(f"database unavailable: {type(exc).__name__}", file=sys.stderr)  # noqa: T201
        return 1
    print(json.dumps(answer, indent=2))  # noqa: T201
    return 0

"""Helpers of the security tests: an application started with chosen settings, what is stored,
and recognisable secrets."""

from __future__ import annotations

import base64
import hashlib
import secrets
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from typing import Any

import httpx
from fastapi import FastAPI
from sqlalchemy import text

from tests.support.apps import app_and_client
from tests.support.fakes import FakeClock, FakeHomeserver


def secret_token(owner: str) -> str:
    """A token shaped like Synapse's (`syt_…`), unique to one test run."""
    return f"syt_{owner}_{secrets.token_urlsafe(15)}"


def marker(name: str) -> str:
    """A string that appears nowhere unless it was copied from where a test put it."""
    return f"MARK{name}{secrets.token_hex(6)}"


def encodings(token: str) -> list[str]:
    """The forms a token could take in a dump, a log line or a header: itself, hex (how a dump
    shows bytea), base64 (standard and url-safe, padded or not) and its SHA-256 in hex."""
    raw = token.encode()
    forms = {
        token,
        raw.hex(),
        hashlib.sha256(raw).hexdigest(),
    }
    for encoded in (base64.b64encode(raw).decode(), base64.urlsafe_b64encode(raw).decode()):
        forms.add(encoded)
        forms.add(encoded.rstrip("="))
    return sorted(forms)


def found_in(haystack: str, needles: Iterable[str]) -> list[str]:
    return [n for n in needles if n in haystack]


@asynccontextmanager
async def running(
    database_url: str, clock: FakeClock, homeserver: FakeHomeserver, **overrides: Any
) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    """An application (scheduler stopped) on the test database, and a client for it; leaving the
    block is the process ending."""
    async with app_and_client(database_url, clock, homeserver.transport(), **overrides) as pair:
        yield pair


async def token_devices(app: FastAPI) -> set[tuple[str, str]]:
    """The (user, device) pairs that have a stored token."""
    async with app.state.container.engine.connect() as conn:
        result = await conn.execute(text("SELECT user_id, device_id FROM device_token"))
        return {(row.user_id, row.device_id) for row in result}


async def status_of(app: FastAPI, delay_id: str) -> tuple[str, str | None]:
    async with app.state.container.engine.connect() as conn:
        result = await conn.execute(
            text("SELECT status, error FROM delayed_event WHERE delay_id = :d"), {"d": delay_id}
        )
        row = result.one()
        return row.status, row.error

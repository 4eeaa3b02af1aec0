"""Small helpers for background asyncio tasks."""

from __future__ import annotations

import asyncio
from typing import Any


def retrieve_exception(task: asyncio.Task[Any]) -> None:
    """A done-callback that retrieves the task's exception, so that a failure nobody waits for
    any more is not reported as never retrieved (whoever awaits the task still sees it)."""
    if not task.cancelled():
        task.exception()

"""The whole stack for the end-to-end tests: PostgreSQL, Synapse, the sidecar and nginx, started
once per session in a temporary folder on free loopback ports (the same code as `scripts/stack up`).

Set E2E_KEEP_STACK=1 to keep the folder (logs of every process) after the run.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from devstack.matrix import Account
from devstack.stack import Ports, Stack

from tests.e2e.support import Room, SynapseLog, call, unique

PASSWORD = "correct horse battery staple"


@pytest.fixture(scope="session")
def stack() -> Iterator[Stack]:
    directory = Path(tempfile.mkdtemp(prefix="sidecar-e2e-"))
    # The sidecar logs at DEBUG here, so that the log checks (test_secrets_not_logged) cover
    # every level it has.
    level = os.environ.get("SIDECAR_LOG_LEVEL")
    os.environ["SIDECAR_LOG_LEVEL"] = "DEBUG"
    try:
        stack = Stack.up(directory, Ports.free())
    finally:
        if level is None:
            del os.environ["SIDECAR_LOG_LEVEL"]
        else:
            os.environ["SIDECAR_LOG_LEVEL"] = level
    try:
        yield stack
    finally:
        stack.down()
        if os.environ.get("E2E_KEEP_STACK"):
            sys.stderr.write(f"\nend-to-end stack kept in {directory}\n")
        else:
            shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="session")
def alice(stack: Stack) -> Account:
    return stack.register(unique("alice"), PASSWORD)


@pytest.fixture(scope="session")
def synapse_log(stack: Stack) -> SynapseLog:
    return SynapseLog(stack.synapse_log, stack.homeserver_url)


@pytest.fixture
def room(stack: Stack, alice: Account) -> Room:
    """A fresh room of alice's, created through nginx."""
    answer = call(
        stack.client_url, "POST", "/_matrix/client/v3/createRoom", {}, token=alice.access_token
    )
    assert answer.status == 200, answer
    return Room(
        stack.client_url, stack.homeserver_url, alice.access_token, answer.json()["room_id"]
    )


@pytest.fixture
def no_delay_reaches_synapse(synapse_log: SynapseLog) -> Iterator[None]:
    """After the test: the homeserver never received a request carrying the delay parameter."""
    start = synapse_log.mark()
    yield
    assert synapse_log.carrying_delay(since=start) == []

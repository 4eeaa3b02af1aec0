"""Fault tests: real sidecar processes on a real, throwaway PostgreSQL, replaying to a homeserver
that can be made to fail. Each test gets its own database, homeserver and processes, and kills
whatever it started.

FAULTS_SEED fixes the random choices (tests print their seed, shown when they fail);
FAULTS_FIGURES names a file to append the run's figures to (JSON lines).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from devstack.postgres import PostgresServer, start_throwaway
from devstack.procs import free_port

from app.__main__ import migrate
from tests.faults.homeserver import FaultyHomeserver
from tests.faults.sidecar import PYTHON, ROOT, Sidecar
from tests.faults.support import FIGURES, Figures

ALICE = "alice_token"
BOB = "bob_token"
CAROL = "carol_token"
USERS = {
    ALICE: ("@alice:test", "ALICEDEV"),
    BOB: ("@bob:test", "BOBDEV"),
    CAROL: ("@carol:test", "CAROLDEV"),
}
DEFAULT_SEED = 4140

# Short timers so that faults play out in seconds. The lease outlasts a homeserver request with
# room to spare, as it must in production too.
BASE_SETTINGS = {
    "SIDECAR_SWEEP_INTERVAL_SECONDS": "1",
    "SIDECAR_CLAIM_LEASE_SECONDS": "4",
    "SIDECAR_HOMESERVER_TIMEOUT_SECONDS": "1",
    "SIDECAR_RETRY_WINDOW_SECONDS": "60",
    "SIDECAR_RETRY_MAX_BACKOFF_SECONDS": "1",
    "SIDECAR_MAX_SCHEDULED_PER_USER": "1000",
    "SIDECAR_DATABASE_POOL_SIZE": "5",
    "SIDECAR_LOG_LEVEL": "INFO",
    # The load here is far above one client's; the per-user rate limits would only get in the way.
    "SIDECAR_RATELIMIT_SCHEDULE_PER_SECOND": "0",
    "SIDECAR_RATELIMIT_MANAGE_PER_SECOND": "0",
    "SIDECAR_RATELIMIT_TOKENLESS_PER_SECOND": "0",
}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "faults: real processes under crashes and outages")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "/tests/faults/" in str(item.path):
            item.add_marker(pytest.mark.faults)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if FIGURES.rows:
        terminalreporter.write_sep("=", "fault tests: figures")
        terminalreporter.write_line(FIGURES.table())


@pytest.fixture(scope="session")
def seed() -> int:
    return int(os.environ.get("FAULTS_SEED", DEFAULT_SEED))


@pytest.fixture(scope="session")
def figures() -> Iterator[Figures]:
    yield FIGURES
    target = os.environ.get("FAULTS_FIGURES")
    if target and FIGURES.rows:
        with open(target, "a") as out:
            for row in FIGURES.rows:
                out.write(json.dumps(row) + "\n")


@pytest.fixture(scope="session")
def token_keys() -> str:
    """A key for tokens at rest, made the way an operator makes one."""
    python = str(PYTHON) if PYTHON.exists() else "python"
    made = subprocess.run(
        [python, "-m", "app", "gen-key"], cwd=ROOT, capture_output=True, text=True, check=True
    )
    return made.stdout.strip()


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PostgresServer]:
    """A PostgreSQL server of the fault tests' own, so that none of them disturbs other tests."""
    directory = Path(tempfile.mkdtemp(prefix="sidecar-faults-pg-"))
    os.chmod(directory, 0o755)
    server = start_throwaway(directory / "data")
    try:
        yield server
    finally:
        server.stop("immediate")
        shutil.rmtree(directory, ignore_errors=True)


def new_database(server: PostgresServer) -> str:
    name = "faults_" + uuid.uuid4().hex[:12]
    server.create_database(name)
    url = server.database_url(name)
    migrate(url)
    return url


@pytest.fixture
def database_url(pg_server: PostgresServer) -> str:
    return new_database(pg_server)


@pytest.fixture
def homeserver() -> Iterator[FaultyHomeserver]:
    hs = FaultyHomeserver(USERS, free_port())
    hs.start()
    try:
        yield hs
    finally:
        hs.stop()


SpawnSidecar = Callable[..., Sidecar]


@pytest.fixture
def spawn(
    database_url: str, homeserver: FaultyHomeserver, token_keys: str, tmp_path: Path
) -> Iterator[SpawnSidecar]:
    """Start sidecar processes: `spawn(name, SETTING=value, ...)` (settings without the prefix,
    e.g. `CLAIM_LEASE_SECONDS="2"`; `database=` another database's URL); all are killed after
    the test."""
    started: list[Sidecar] = []

    def make(
        name: str = "sidecar", *, start: bool = True, database: str | None = None, **settings: str
    ) -> Sidecar:
        env = {
            **BASE_SETTINGS,
            "SIDECAR_DATABASE_URL": database or database_url,
            "SIDECAR_HOMESERVER_URL": homeserver.url,
            "SIDECAR_TOKEN_KEYS": token_keys,
            **{f"SIDECAR_{key}": value for key, value in settings.items()},
        }
        sidecar = Sidecar(name, env, tmp_path)
        started.append(sidecar)
        if start:
            sidecar.start()
        return sidecar

    try:
        yield make
    finally:
        for sidecar in started:
            sidecar.kill()

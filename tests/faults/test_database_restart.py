"""PostgreSQL restarted under load: while it is away the API answers 503 with a Matrix error
(quickly, without crashing or hanging) and `/ready` says 503; once it is back the sidecar carries
on and every due event is delivered once."""

from __future__ import annotations

import os
import random
import shutil
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from devstack.postgres import PostgresServer, start_throwaway
from devstack.procs import wait_until

from app.__main__ import migrate
from tests.faults.conftest import ALICE, SpawnSidecar
from tests.faults.homeserver import FaultyHomeserver
from tests.faults.sidecar import Sidecar
from tests.faults.support import KNOWN, UNKNOWN, Figures, Ledger, say

ROOM = "!db:test"
# The sidecar's database connect timeout is 5 s; an answer may take that, never much more (the
# rest is room for a slow, busy machine; a request that hangs would take the client's 30 s).
SLOWEST_ANSWER = 15.0
# Answers the load must have had before the database goes away, and again after it is back.
ANSWERS_AROUND = 20
# Deadlines for what takes seconds here, generous for a machine several times slower.
SETTLE = 120.0


@pytest.fixture
def own_postgres() -> Iterator[PostgresServer]:
    """A server this test alone stops and starts."""
    directory = Path(tempfile.mkdtemp(prefix="sidecar-faults-pgr-"))
    os.chmod(directory, 0o755)
    server = start_throwaway(directory / "data")
    try:
        yield server
    finally:
        server.stop("immediate")
        shutil.rmtree(directory, ignore_errors=True)


class Load(threading.Thread):
    """Schedules a message every few tens of milliseconds and notes every answer."""

    def __init__(self, sidecar: Sidecar, rng: random.Random) -> None:
        super().__init__(daemon=True)
        self.sidecar = sidecar
        self.rng = rng
        self.ledger = Ledger()
        self.statuses: Counter[int | str] = Counter()
        self.slowest = 0.0
        self.unsure: list[int] = []
        self.done = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while not self.done.wait(self.rng.uniform(0.01, 0.05)):
                self.one()
        except BaseException as exc:
            self.error = exc

    def one(self) -> None:
        entry = self.ledger.new(self.rng.randint(300, 1500))
        started = time.time()
        entry.not_before = started + entry.delay_ms / 1000
        try:
            answer = self.sidecar.schedule_message(
                ALICE, ROOM, {"seq": entry.seq}, entry.delay_ms, txn=f"db{entry.seq}", timeout=30
            )
        except httpx.HTTPError as exc:
            self.statuses[type(exc).__name__] += 1
            entry.scheduled = UNKNOWN
            self.unsure.append(entry.seq)
            return
        self.slowest = max(self.slowest, time.time() - started)
        self.statuses[answer.status_code] += 1
        if answer.status_code == 200:
            entry.delay_id = answer.json()["delay_id"]
            return
        assert answer.status_code == 503, answer.text
        body = answer.json()
        assert body["errcode"] == "M_UNKNOWN", body
        assert body["error"], body
        # The transaction may or may not have committed before the database went away.
        entry.scheduled = UNKNOWN
        self.unsure.append(entry.seq)

    def settle(self) -> None:
        """Repeat the unanswered transactions: the first delay_id, or the event scheduled now."""
        for seq in self.unsure:
            entry = self.ledger.entries[seq]
            answer = self.sidecar.schedule_message(
                ALICE, ROOM, {"seq": seq}, entry.delay_ms, txn=f"db{seq}", timeout=60
            )
            assert answer.status_code == 200, answer.text
            entry.delay_id = answer.json()["delay_id"]
            entry.scheduled = KNOWN


def test_database_restart_under_load(
    spawn: SpawnSidecar,
    homeserver: FaultyHomeserver,
    own_postgres: PostgresServer,
    seed: int,
    figures: Figures,
) -> None:
    say(f"FAULTS_SEED={seed}")
    began = time.monotonic()
    own_postgres.create_database("sidecar")
    url = own_postgres.database_url("sidecar")
    migrate(url)
    sidecar = spawn("db", database=url)
    # An event scheduled before the outage, to look up while the database is away.
    answer = sidecar.schedule_message(ALICE, ROOM, {"seq": "lookup"}, 60_000)
    assert answer.status_code == 200, answer.text
    lookup_id = answer.json()["delay_id"]
    assert sidecar.act(ALICE, lookup_id, "cancel").status_code == 200

    load = Load(sidecar, random.Random(seed))
    load.start()
    try:
        assert wait_until(lambda: load.statuses[200] >= ANSWERS_AROUND, SETTLE), "load stalled"
        own_postgres.stop()
        down_since = time.monotonic()
        answers: list[tuple[str, int, float]] = []
        while time.monotonic() - down_since < 8.0:
            for name, method, path in (
                ("ready", "GET", "/ready"),
                ("lookup", "GET", f"/_matrix/client/v1/delayed_events/{lookup_id}"),
                ("restart", "POST", f"/_matrix/client/v1/delayed_events/{lookup_id}/restart"),
            ):
                started = time.monotonic()
                got = sidecar.request(
                    method, path, token=ALICE, body={} if method == "POST" else None, timeout=30
                )
                answers.append((name, got.status_code, time.monotonic() - started))
                assert got.status_code == 503, (name, got.text)
                body = got.json()
                if name == "ready":
                    assert body["database"] == "unreachable", body
                else:
                    assert body["errcode"] == "M_UNKNOWN", body
                    assert body["error"], body
            assert httpx.get(sidecar.url + "/health", timeout=10).status_code == 200
            time.sleep(0.5)
        # The load itself met the outage (its requests answered 503), however slow it ran.
        assert wait_until(lambda: load.statuses[503] > 0, SETTLE), "the load never met the outage"
        assert sidecar.running, "the sidecar died with its database"
        own_postgres.start()
        assert wait_until(
            lambda: httpx.get(sidecar.url + "/ready", timeout=10).status_code == 200, SETTLE
        ), "not ready again after the database came back"
        # The sidecar carries on: scheduling works again (and those events are judged too).
        answered = load.statuses[200]
        assert wait_until(lambda: load.statuses[200] >= answered + ANSWERS_AROUND, SETTLE), (
            "scheduling did not work again after the database came back"
        )
    finally:
        load.done.set()
        load.join(timeout=60)
    assert load.error is None, load.error
    load.settle()
    assert sidecar.wait_idle(timeout=SETTLE), "events were still scheduled after 120 s"
    verdict = load.ledger.judge(homeserver.arrivals())
    figures.add(
        "PostgreSQL restarted under load",
        began,
        verdict,
        replicas=1,
        outages=1,
    )
    slowest = max(seconds for _, _, seconds in answers)
    say(
        f"answers while scheduling: {dict(load.statuses)}; slowest {load.slowest:.2f} s; "
        f"slowest answer while the database was away {slowest:.2f} s"
    )
    assert verdict.ok, verdict.describe()
    assert set(load.statuses) <= {200, 503}, load.statuses
    assert load.slowest < SLOWEST_ANSWER
    assert slowest < SLOWEST_ANSWER
    assert sidecar.lookup(ALICE, lookup_id)["outcome"] == "cancel"

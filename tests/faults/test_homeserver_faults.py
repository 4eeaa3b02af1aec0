"""The homeserver down, failing, slow or rate limiting across due times: events wait and are
delivered once it answers again; past the retry window, and on a permanent refusal, they are
finalised with the homeserver's error, visible in the lookup and in metrics. Never dropped."""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import Any

import pytest
from devstack.procs import wait_until

from tests.faults.conftest import ALICE, SpawnSidecar
from tests.faults.homeserver import FaultyHomeserver
from tests.faults.sidecar import V1, Sidecar
from tests.faults.support import Figures, Ledger, say

ROOM = "!outage:test"
# The sidecar checks tokens with the homeserver's whoami; a cached answer lets events be scheduled
# while the homeserver is down, so that every event of a batch falls due during the outage.
WHOAMI_CACHE = "3600"
# Deadlines for what takes a few seconds here, generous for a machine several times slower.
SETTLE = 120.0

Fault = Callable[[FaultyHomeserver], None]
FAULTS: dict[str, Fault] = {
    "connections refused": lambda hs: hs.refuse(),
    "502 bad gateway": lambda hs: hs.fail_with(502),
    "503 unavailable": lambda hs: hs.fail_with(503),
    "hangs past the timeout": lambda hs: hs.hang(2.5),
    "429 with retry_after_ms": lambda hs: hs.rate_limit(700),
}


def _schedule_batch(
    sidecar: Sidecar, ledger: Ledger, rng: random.Random, count: int, room: str = ROOM
) -> list[int]:
    """Schedule messages and state events due within 1.5 s of their scheduling."""
    seqs = []
    for i in range(count):
        entry = ledger.new(rng.randint(200, 1500))
        started = time.time()
        if i % 3 == 2:
            answer = sidecar.schedule_state(
                ALICE, room, "m.test.state", f"k{entry.seq}", {"seq": entry.seq}, entry.delay_ms
            )
        else:
            answer = sidecar.schedule_message(ALICE, room, {"seq": entry.seq}, entry.delay_ms)
        assert answer.status_code == 200, answer.text
        entry.delay_id = answer.json()["delay_id"]
        entry.not_before = started + entry.delay_ms / 1000
        entry.send_after = time.time() + entry.delay_ms / 1000
        seqs.append(entry.seq)
    return seqs


def _warm(sidecar: Sidecar) -> None:
    """One request, so that the token's whoami answer is cached before any fault."""
    assert sidecar.request("GET", V1, token=ALICE).status_code == 200


def _retries(sidecar: Sidecar) -> float:
    return sidecar.metrics().get("sidecar_replay_retries_total", 0.0)


def test_events_wait_out_an_outage_and_are_delivered_once(
    spawn: SpawnSidecar, homeserver: FaultyHomeserver, seed: int, figures: Figures
) -> None:
    say(f"FAULTS_SEED={seed}")
    began = time.monotonic()
    rng = random.Random(seed)
    sidecar = spawn(
        "outages",
        HOMESERVER_TIMEOUT_SECONDS="1",
        RETRY_WINDOW_SECONDS="600",
        WHOAMI_CACHE_SECONDS=WHOAMI_CACHE,
    )
    _warm(sidecar)
    ledger = Ledger()
    for name, fault in FAULTS.items():
        retries_before = _retries(sidecar)
        # The fault first, then the batch: every event of it falls due during the outage.
        fault(homeserver)
        outage_began = time.time()
        seqs = _schedule_batch(sidecar, ledger, rng, 6)
        # Hold the outage until every event of the batch is due and the sidecar has met the
        # fault (a failed attempt for each, at least), however slowly this machine runs.
        last_due = max(ledger.entries[s].send_after for s in seqs)
        time.sleep(max(0.0, last_due - time.time()))
        enough = retries_before + len(seqs)
        assert wait_until(
            lambda enough=enough: _retries(sidecar) >= enough, timeout=SETTLE, interval=0.2
        ), f"{name}: the sidecar never retried"
        # Only an event whose request the homeserver took under the fault counts: a hung
        # homeserver takes what it held once it wakes; the others take nothing.
        taken_during = sorted(e.seq for e in homeserver.events() if e.under_fault and e.seq in seqs)
        homeserver.recover()
        delivered = wait_until(
            lambda seqs=seqs: all(homeserver.arrivals().get(s) for s in seqs), timeout=SETTLE
        )
        assert delivered, f"{name}: not delivered after the outage"
        if name != "hangs past the timeout":
            assert taken_during == [], f"{name}: taken during the outage"
        say(f"{name}: {len(seqs)} events waited {time.time() - outage_began:.1f} s, delivered")
    assert sidecar.wait_idle(timeout=SETTLE)
    # A hung request may still be held by the homeserver: let it land (or be absorbed) first.
    assert homeserver.wait_quiet(timeout=SETTLE), "a request was still held"
    verdict = ledger.judge(homeserver.arrivals())
    figures.add(
        "homeserver outages", began, verdict, replicas=1, outages=len(FAULTS), sidecar_kills=0
    )
    assert verdict.ok, verdict.describe()
    for seq in ledger.entries:
        entry = ledger.entries[seq]
        assert entry.delay_id is not None
        assert sidecar.lookup(ALICE, entry.delay_id)["outcome"] == "send"


@pytest.mark.parametrize(
    ("name", "errcode"),
    [
        ("503 unavailable", "M_UNKNOWN"),
        ("connections refused", "M_UNKNOWN"),
        ("429 with retry_after_ms", "M_LIMIT_EXCEEDED"),
    ],
    ids=["503", "refused", "429"],
)
def test_past_the_retry_window_events_are_finalised_with_the_error(
    spawn: SpawnSidecar,
    homeserver: FaultyHomeserver,
    seed: int,
    figures: Figures,
    name: str,
    errcode: str,
) -> None:
    began = time.monotonic()
    rng = random.Random(seed)
    sidecar = spawn(
        "window",
        RETRY_WINDOW_SECONDS="3",
        HOMESERVER_TIMEOUT_SECONDS="1",
        WHOAMI_CACHE_SECONDS=WHOAMI_CACHE,
    )
    _warm(sidecar)
    ledger = Ledger()
    # The fault first: no event of the batch can fall due (and be sent) before it.
    FAULTS[name](homeserver)
    seqs = _schedule_batch(sidecar, ledger, rng, 4)
    ids = [ledger.entries[s].delay_id for s in seqs]

    def finalised() -> list[dict[str, Any]] | None:
        found = [sidecar.lookup(ALICE, delay_id) for delay_id in ids if delay_id]
        return found if all("outcome" in item for item in found) else None

    assert wait_until(lambda: finalised() is not None, timeout=SETTLE), "never finalised"
    homeserver.recover()
    items = finalised()
    assert items is not None
    for item in items:
        assert (item["outcome"], item["reason"]) == ("cancel", "error"), item
        assert item["error"]["errcode"] == errcode, item
        assert item["finalised"]["error"] == item["error"]
    failed = sidecar.metrics().get(
        f'sidecar_delayed_events_failed_total{{generation="A",outcome="{errcode}"}}'
    )
    assert failed == len(seqs)
    assert sidecar.wait_idle(timeout=SETTLE)
    verdict = ledger.judge(homeserver.arrivals())
    assert verdict.delivered == 0, verdict
    figures.add(
        f"retry window ends: {name}",
        began,
        events=len(seqs),
        cancelled=len(seqs),
        replicas=1,
        outages=1,
    )


def test_permanent_refusals_are_finalised_with_the_homeservers_error(
    spawn: SpawnSidecar, homeserver: FaultyHomeserver, seed: int, figures: Figures
) -> None:
    began = time.monotonic()
    rng = random.Random(seed)
    homeserver.forbid("!forbidden:test")
    sidecar = spawn("refusals")
    ledger = Ledger()
    refused = _schedule_batch(sidecar, ledger, rng, 6, room="!forbidden:test")
    allowed = _schedule_batch(sidecar, ledger, rng, 6, room="!allowed:test")
    assert sidecar.wait_idle(timeout=SETTLE)
    arrivals = homeserver.arrivals()
    for seq in allowed:
        assert len(arrivals.get(seq, [])) == 1, seq
    for seq in refused:
        assert seq not in arrivals
        delay_id = ledger.entries[seq].delay_id
        assert delay_id is not None
        item = sidecar.lookup(ALICE, delay_id)
        assert (item["outcome"], item["reason"]) == ("cancel", "error"), item
        assert item["error"]["errcode"] == "M_FORBIDDEN", item
    samples = sidecar.metrics()
    assert samples['sidecar_delayed_events_failed_total{generation="A",outcome="M_FORBIDDEN"}'] == (
        len(refused)
    )
    figures.add(
        "403 refusals",
        began,
        events=len(refused) + len(allowed),
        delivered=len(allowed),
        cancelled=len(refused),
        replicas=1,
    )

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
from tests.faults.sidecar import Sidecar
from tests.faults.support import Figures, Ledger, say

ROOM = "!outage:test"

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
    """Schedule messages and state events due within the next 1.5 s."""
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
        seqs.append(entry.seq)
    return seqs


def _retries(sidecar: Sidecar) -> float:
    return sidecar.metrics().get("sidecar_replay_retries_total", 0.0)


def test_events_wait_out_an_outage_and_are_delivered_once(
    spawn: SpawnSidecar, homeserver: FaultyHomeserver, seed: int, figures: Figures
) -> None:
    say(f"FAULTS_SEED={seed}")
    began = time.monotonic()
    rng = random.Random(seed)
    sidecar = spawn("outages", HOMESERVER_TIMEOUT_SECONDS="1", RETRY_WINDOW_SECONDS="60")
    ledger = Ledger()
    for name, fault in FAULTS.items():
        seqs = _schedule_batch(sidecar, ledger, rng, 6)
        retries_before = _retries(sidecar)
        fault(homeserver)
        outage_began = time.time()
        # Hold the outage until every event of the batch has been due for a while.
        last_due = max(ledger.entries[s].not_before for s in seqs)
        time.sleep(max(0.0, last_due + 2.0 - time.time()))
        arrived_during = [s for s in seqs if homeserver.arrivals().get(s)]
        homeserver.recover()
        delivered = wait_until(
            lambda seqs=seqs: all(homeserver.arrivals().get(s) for s in seqs), timeout=30.0
        )
        assert delivered, f"{name}: not delivered after the outage"
        assert _retries(sidecar) > retries_before, f"{name}: the sidecar never retried"
        if name != "hangs past the timeout":
            # A hung homeserver takes what it holds once it wakes; the others took nothing.
            assert arrived_during == [], f"{name}: arrived during the outage"
        say(f"{name}: {len(seqs)} events waited {time.time() - outage_began:.1f} s, delivered")
    assert sidecar.wait_idle(timeout=30)
    # A hung request may still be held by the homeserver; give it time to land (or not) twice.
    time.sleep(3.0)
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
    sidecar = spawn("window", RETRY_WINDOW_SECONDS="3", HOMESERVER_TIMEOUT_SECONDS="1")
    ledger = Ledger()
    seqs = _schedule_batch(sidecar, ledger, rng, 4)
    FAULTS[name](homeserver)
    ids = [ledger.entries[s].delay_id for s in seqs]

    def finalised() -> list[dict[str, Any]] | None:
        found = [sidecar.lookup(ALICE, delay_id) for delay_id in ids if delay_id]
        return found if all("outcome" in item for item in found) else None

    assert wait_until(lambda: finalised() is not None, timeout=30.0), "never finalised"
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
    assert sidecar.wait_idle(timeout=10)
    time.sleep(1.0)  # nothing is sent late either
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
    assert sidecar.wait_idle(timeout=30)
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

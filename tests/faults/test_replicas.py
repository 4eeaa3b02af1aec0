"""Several replicas on one database: each event fires exactly once, and a replica killed in the
middle of the run loses nothing; its claims run out and the others take over."""

from __future__ import annotations

import random
import time

from devstack.procs import wait_until

from tests.faults.conftest import ALICE, BOB, CAROL, SpawnSidecar
from tests.faults.homeserver import FaultyHomeserver
from tests.faults.support import KNOWN, Figures, Ledger, say

LEASE = 4.0
SWEEP = 1.0
# How late an event may be when the replica that claimed it dies: its lease runs out, then the
# next sweep of another replica takes it. Generous, for a loaded machine.
LATENESS_BOUND = LEASE + 2 * SWEEP + 2.0
TOKENS = [ALICE, BOB, CAROL]
ROOMS = ["!rep-a:test", "!rep-b:test", "!rep-c:test", "!rep-d:test"]


def test_replicas_share_the_work_and_survive_a_kill(
    spawn: SpawnSidecar, homeserver: FaultyHomeserver, seed: int, figures: Figures
) -> None:
    say(f"FAULTS_SEED={seed}")
    began = time.monotonic()
    rng = random.Random(seed)
    homeserver.latency = 0.03
    settings = {
        "CLAIM_LEASE_SECONDS": str(LEASE),
        "SWEEP_INTERVAL_SECONDS": str(SWEEP),
        "HOMESERVER_TIMEOUT_SECONDS": "1.5",
    }
    replicas = [
        spawn(f"replica{i}", HOMESERVER_URL=homeserver.url_for(f"replica{i}"), **settings)
        for i in range(3)
    ]
    ledger = Ledger()
    tokens: dict[int, str] = {}
    killed_at: float | None = None
    in_flight = False
    schedule_until = time.monotonic() + 16.0
    kill_at = time.monotonic() + rng.uniform(5.0, 9.0)
    while time.monotonic() < schedule_until:
        if killed_at is None and time.monotonic() >= kill_at:
            # A slow homeserver for a moment, so the replica dies with a replay in flight: taken
            # by the homeserver, not yet recorded by the replica.
            homeserver.latency = 0.4
            in_flight = wait_until(lambda: homeserver.in_flight["replica0"] > 0, 10.0, 0.01)
            replicas[0].kill()
            killed_at = time.time()
            homeserver.latency = 0.03
        alive = [r for r in replicas if r.running]
        entry = ledger.new(rng.randint(100, 1500))
        token = rng.choice(TOKENS)
        tokens[entry.seq] = token
        started = time.time()
        answer = rng.choice(alive).schedule_message(
            token,
            rng.choice(ROOMS),
            {"seq": entry.seq},
            entry.delay_ms,
            txn=f"rep{entry.seq}",
        )
        assert answer.status_code == 200, answer.text
        entry.delay_id = answer.json()["delay_id"]
        entry.not_before = started + entry.delay_ms / 1000
        if rng.random() < 0.1:
            cancel = rng.choice(alive).act(token, entry.delay_id, "cancel")
            assert cancel.status_code in (200, 409), cancel.text
            if cancel.status_code == 200:
                entry.cancelled = KNOWN
        time.sleep(rng.uniform(0.005, 0.04))
    assert killed_at is not None
    assert in_flight, "replica0 never had a replay in flight"
    survivors = [r for r in replicas if r.running]
    assert len(survivors) == 2
    assert survivors[0].wait_idle(timeout=60), "events were still scheduled after 60 s"

    arrivals = homeserver.arrivals()
    verdict = ledger.judge(arrivals)
    lateness = {
        seq: got[0].arrived - ledger.entries[seq].not_before
        for seq, got in arrivals.items()
        if seq in ledger.entries and got
    }
    worst = max(lateness.values())
    sent_by = [_sent(r.metrics()) for r in survivors]
    figures.add(
        "replicas, one killed",
        began,
        verdict,
        sidecar_kills=1,
        replicas=len(replicas),
        outages=0,
    )
    say(
        f"worst lateness {worst:.2f} s (bound {LATENESS_BOUND} s); "
        f"sent by the survivors {sent_by}; "
        f"repeated replays absorbed by the homeserver={homeserver.repeats}"
    )
    assert verdict.ok, f"FAULTS_SEED={seed}: {verdict.describe()}"
    assert verdict.events >= 150
    assert worst <= LATENESS_BOUND, {s: round(v, 2) for s, v in lateness.items() if v > 2}
    assert all(n > 0 for n in sent_by), "every surviving replica replays its share"
    # The replay the dead replica had in flight was repeated by another, and absorbed.
    assert homeserver.repeats >= 1


def _sent(samples: dict[str, float]) -> float:
    return sum(
        value
        for name, value in samples.items()
        if name.startswith("sidecar_delayed_events_sent_total{")
    )

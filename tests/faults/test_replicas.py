"""Several replicas on one database: each event fires exactly once, and a replica killed in the
middle of the run loses nothing; its claims run out and the others take over."""

from __future__ import annotations

import random
import time

import pytest

from tests.faults.conftest import ALICE, BOB, CAROL, SpawnSidecar
from tests.faults.homeserver import FaultyHomeserver
from tests.faults.support import KNOWN, Figures, Ledger, say

# The homeserver timeout is far above its answer time (30 ms), so that no request times out on a
# slow machine (a timed-out replay is released for a retry, when a cancel may still succeed:
# docs/reliability.md, Limits); the lease outlasts it with room to spare.
LEASE = 10.0
HOMESERVER_TIMEOUT = 4.0
SWEEP = 1.0
# How late an event may be when the replica that claimed it dies: its lease runs out, then the
# next sweep of another replica takes it. Generous, for a loaded machine.
LATENESS_BOUND = LEASE + 2 * SWEEP + 4.0
# The load is a number of events, however long this machine takes to schedule them; the kill
# comes somewhere in the middle.
EVENTS = 120
# How long the killed replica may take to be handed a replay of its own to hold: generous for a
# machine several times slower (events fall due every few tens of milliseconds meanwhile).
HOLD_TIMEOUT = 120.0
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
        "HOMESERVER_TIMEOUT_SECONDS": str(HOMESERVER_TIMEOUT),
    }
    replicas = [
        spawn(f"replica{i}", HOMESERVER_URL=homeserver.url_for(f"replica{i}"), **settings)
        for i in range(3)
    ]
    ledger = Ledger()
    tokens: dict[int, str] = {}
    killed_at: float | None = None
    kill_after = rng.randint(EVENTS // 3, EVENTS // 2)
    gate = None
    hold_deadline = 0.0
    while len(ledger.entries) < EVENTS or killed_at is None:
        if killed_at is None and len(ledger.entries) >= kill_after:
            if gate is None:
                # The next replay replica0 sends is taken by the homeserver and held unanswered.
                gate = homeserver.hold("replica0")
                hold_deadline = time.monotonic() + HOLD_TIMEOUT
            if gate.held:
                replicas[0].kill()
                killed_at = time.time()
                gate.open()
            elif time.monotonic() > hold_deadline:
                pytest.fail(f"replica0 sent no replay within {HOLD_TIMEOUT:.0f} s", False)
        alive = [r for r in replicas if r.running]
        # While waiting for replica0 to send something, give it events of its own.
        via = replicas[0] if gate is not None and killed_at is None else rng.choice(alive)
        entry = ledger.new(rng.randint(100, 1500))
        token = rng.choice(TOKENS)
        tokens[entry.seq] = token
        started = time.time()
        answer = via.schedule_message(
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
    assert gate is not None
    assert gate.seq in ledger.entries, "replica0 held no replay of ours"
    survivors = [r for r in replicas if r.running]
    assert len(survivors) == 2
    assert survivors[0].wait_idle(timeout=120), "events were still scheduled after 120 s"

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
        mid_replay_kills=1,
        replicas=len(replicas),
        outages=0,
    )
    say(
        f"worst lateness {worst:.2f} s (bound {LATENESS_BOUND} s); "
        f"sent by the survivors {sent_by}; "
        f"repeated replays absorbed by the homeserver={homeserver.repeats}"
    )
    assert verdict.ok, f"FAULTS_SEED={seed}: {verdict.describe()}"
    assert worst <= LATENESS_BOUND, {s: round(v, 2) for s, v in lateness.items() if v > 2}
    assert all(n > 0 for n in sent_by), "every surviving replica replays its share"
    # The replay the dead replica had in flight (the homeserver took it; the replica died before
    # the answer) was repeated by another, and absorbed.
    assert len(homeserver.arrivals()[gate.seq]) == 1
    assert homeserver.repeats >= 1


def _sent(samples: dict[str, float]) -> float:
    return sum(
        value
        for name, value in samples.items()
        if name.startswith("sidecar_delayed_events_sent_total{")
    )

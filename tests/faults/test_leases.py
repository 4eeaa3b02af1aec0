"""Claims under pressure: a slow homeserver with hundreds of leaves due at once and two replicas
(every claimed event stays claimed while it waits for a request slot), and a replica SIGKILLed
with replays in flight (its claims are taken over as soon as its database session is gone, not
when their lease runs out)."""

from __future__ import annotations

import time

from devstack.procs import wait_until

from tests.faults.conftest import ALICE, SpawnSidecar
from tests.faults.homeserver import Event, FaultyHomeserver
from tests.faults.sidecar import Sidecar
from tests.faults.support import Figures, say

LEAVE = "org.matrix.msc3401.call.member"
# A lease far longer than the takeover may take: only the replica lock can explain a fast one.
LONG_LEASE = "30"
TAKEOVER_BOUND = 5.0


def _once(arrivals: dict[object, list[Event]], count: int) -> tuple[list[int], list[int]]:
    """The seqs (0..count-1) that never arrived, and those that arrived more than once."""
    lost = [seq for seq in range(count) if not arrivals.get(seq)]
    twice = [seq for seq in range(count) if len(arrivals.get(seq, [])) > 1]
    return lost, twice


def test_leaves_waiting_for_a_slow_homeserver_are_each_put_once(
    spawn: SpawnSidecar, homeserver: FaultyHomeserver, figures: Figures
) -> None:
    """200 MatrixRTC leaves in 10 rooms fall due at once on two replicas; the homeserver takes
    0.4 s per event and each replica sends 4 at a time, so draining lasts several leases. Each
    leave reaches the homeserver in exactly one PUT."""
    began = time.monotonic()
    count = 200
    settings = {
        "CLAIM_LEASE_SECONDS": "3",
        "HOMESERVER_TIMEOUT_SECONDS": "5",
        "REPLAY_CONCURRENCY": "4",
        "REPLAY_MAX_CLAIMED": "50",
    }
    replicas = [
        spawn(f"replica{i}", HOMESERVER_URL=homeserver.url_for(f"replica{i}"), **settings)
        for i in range(2)
    ]
    homeserver.latency = 0.4
    due_at = time.time() + 3.0 + count * 0.05
    for seq in range(count):
        delay_ms = max(0, int((due_at - time.time()) * 1000))
        answer = replicas[seq % 2].schedule_state(
            ALICE,
            f"!leases-{seq % 10}:test",
            LEAVE,
            f"_@alice:test_DEV{seq}",
            {"seq": seq},
            delay_ms,
        )
        assert answer.status_code == 200, answer.text
    assert replicas[0].wait_idle(timeout=180), "leaves were still scheduled after 180 s"
    drained = time.time() - due_at
    arrivals = homeserver.arrivals()
    lost, twice = _once(arrivals, count)
    figures.add(
        "leaves due at once, slow homeserver",
        began,
        events=count,
        delivered=count - len(lost),
        replicas=2,
        lost=len(lost),
        duplicated=len(twice) + homeserver.repeats,
    )
    say(f"drained in {drained:.1f} s (lease 3 s); repeated PUTs {homeserver.repeats}")
    assert drained > 3.0, "the drain was shorter than a lease: the test shows nothing"
    assert not lost, lost
    assert not twice, twice
    assert homeserver.repeats == 0, "a leave was PUT again"


def _hold_claims(homeserver: FaultyHomeserver, replica: Sidecar, count: int) -> float:
    """Schedule `count` messages on `replica`, due in a moment, with the homeserver holding every
    event it takes: the replica claims them all and has some in flight. When they fell due."""
    homeserver.latency = 120.0  # each event is taken at once, its answer held
    due_at = time.time() + 1.0 + count * 0.05
    for seq in range(count):
        delay_ms = max(0, int((due_at - time.time()) * 1000))
        answer = replica.schedule_message(
            ALICE, f"!held-{seq % 4}:test", {"seq": seq}, delay_ms, txn=f"held{seq}"
        )
        assert answer.status_code == 200, answer.text
    assert wait_until(lambda: homeserver.in_flight[replica.name] >= 4, 30.0, 0.02), (
        "the replica never had replays in flight"
    )
    return due_at


def _landed_after(arrivals: dict[object, list[Event]], moment: float) -> list[float]:
    return [got[0].arrived - moment for got in arrivals.values() if got[0].arrived > moment]


def test_a_killed_replicas_events_land_soon_after_the_kill_on_a_peer(
    spawn: SpawnSidecar, homeserver: FaultyHomeserver, figures: Figures
) -> None:
    """A replica holding 40 claimed messages (4 of them in flight at a homeserver that holds its
    answers) is SIGKILLed while a peer runs: the peer sends every one within 5 s of the kill
    (the lease is 30 s), each once."""
    began = time.monotonic()
    count = 40
    settings = {"CLAIM_LEASE_SECONDS": LONG_LEASE, "REPLAY_CONCURRENCY": "4"}
    doomed = spawn(
        "doomed",
        HOMESERVER_URL=homeserver.url_for("doomed"),
        HOMESERVER_TIMEOUT_SECONDS="300",
        **settings,
    )
    _hold_claims(homeserver, doomed, count)
    peer = spawn("peer", HOMESERVER_URL=homeserver.url_for("peer"), **settings)
    homeserver.latency = 0.0
    killed_at = time.time()
    doomed.kill()
    assert wait_until(lambda: len(homeserver.arrivals()) >= count, 60.0, 0.05), "events lost"
    assert peer.wait_idle(timeout=30)
    arrivals = homeserver.arrivals()
    lost, twice = _once(arrivals, count)
    late = _landed_after(arrivals, killed_at)
    figures.add(
        "replica killed, peer takes over",
        began,
        events=count,
        delivered=count - len(lost),
        sidecar_kills=1,
        replicas=2,
        lost=len(lost),
        duplicated=len(twice),
    )
    say(f"{len(late)} events landed after the kill, the last {max(late):.2f} s after it")
    assert not lost, lost
    assert not twice, twice
    assert late, "nothing was left to take over: the test shows nothing"
    assert max(late) <= TAKEOVER_BOUND


def test_a_killed_lone_replicas_events_land_soon_after_its_restart(
    spawn: SpawnSidecar, homeserver: FaultyHomeserver, figures: Figures
) -> None:
    """The only replica, holding 40 claimed messages with 4 in flight, is SIGKILLed and started
    again: every event lands within 5 s of its restart (the lease is 30 s), each once."""
    began = time.monotonic()
    count = 40
    lone = spawn(
        "lone",
        HOMESERVER_URL=homeserver.url_for("lone"),
        HOMESERVER_TIMEOUT_SECONDS="300",
        CLAIM_LEASE_SECONDS=LONG_LEASE,
        REPLAY_CONCURRENCY="4",
    )
    _hold_claims(homeserver, lone, count)
    lone.kill()
    homeserver.latency = 0.0
    restarted_at = time.time()
    lone.start()
    ready_at = time.time()
    assert wait_until(lambda: len(homeserver.arrivals()) >= count, 60.0, 0.05), "events lost"
    assert lone.wait_idle(timeout=30)
    arrivals = homeserver.arrivals()
    lost, twice = _once(arrivals, count)
    late = _landed_after(arrivals, restarted_at)
    figures.add(
        "lone replica killed and restarted",
        began,
        events=count,
        delivered=count - len(lost),
        sidecar_kills=1,
        replicas=1,
        lost=len(lost),
        duplicated=len(twice),
    )
    say(
        f"{len(late)} events landed after the restart, the last {max(late):.2f} s after it was "
        f"started ({ready_at - restarted_at:.2f} s to ready)"
    )
    assert not lost, lost
    assert not twice, twice
    assert late, "nothing was left to take over: the test shows nothing"
    assert max(late) - (ready_at - restarted_at) <= TAKEOVER_BOUND

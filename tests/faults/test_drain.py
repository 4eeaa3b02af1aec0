"""A rolling upgrade: a replica SIGTERMed in the middle of a burst of MatrixRTC leaves drains.
`/ready` answers 503 while it still serves, the sends it has at the homeserver finish and their
outcomes are written, and every other claim it held is given back at once: a peer sends those
within about a sweep interval of the SIGTERM, not a lease later, each leave once."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time

import httpx
import pytest
from devstack.procs import tail, wait_until
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from tests.faults.conftest import ALICE, SpawnSidecar
from tests.faults.homeserver import Event, FaultyHomeserver
from tests.faults.sidecar import Sidecar
from tests.faults.support import Figures, delay_until, lead_time, say

LEAVE = "org.matrix.msc3401.call.member"
COUNT = 200
WINDOW = 2.0  # every leave of a batch falls due within this many seconds
SLOTS = 4  # request slots per replica: the drained replica has all of them held at the homeserver
# How many claimed events a replica holds at most. The replica to be drained gets exactly this
# many leaves, in rooms of their own, before its peer starts: it claims every one of them and is
# then full, so it claims nothing more, and while it lives no other replica sends in its rooms.
MAX_CLAIMED = 50
ITS_ROOMS = [f"!drain-{n}:test" for n in range(5)]
PEER_ROOMS = [f"!drain-{n}:test" for n in range(5, 10)]
SWEEP = 1.0
# Far longer than the hand-over may take: only the drain can explain a fast one.
LEASE = 30.0
# How long the drained replica goes on serving with /ready 503: time enough for the test to
# see it on a loaded machine.
DRAIN_SECONDS = 5.0
# "A sweep interval plus a second" after the drain began, the second allowed four times over for
# a slower machine; a lease later would be 30 s.
HANDOVER_BOUND = SWEEP + 4 * 1.0
# Condition waits only; generous for a machine several times slower.
WAIT = 120.0
LOCK = re.compile(r"holding replica lock (\d+)")
GAVE_BACK = re.compile(r"draining: gave back (\d+) claimed events; (\d+) sends still")


def _ready_status(sidecar: Sidecar) -> int | None:
    try:
        return httpx.get(sidecar.url + "/ready", timeout=2.0).status_code
    except httpx.HTTPError:
        return None


def _not_held_by(database_url: str, key: str) -> int:
    """How many leaves are still scheduled and not claimed under the replica lock `key`."""

    async def count() -> int:
        engine = create_async_engine(database_url)
        try:
            async with engine.connect() as conn:
                found = await conn.execute(
                    text(
                        "SELECT count(*) FROM delayed_event WHERE status = 'scheduled' "
                        "AND room_id LIKE '!drain-%' "
                        "AND (claim_id IS NULL OR claim_id NOT LIKE :mine)"
                    ),
                    {"mine": f"{key}.%"},
                )
                return int(found.scalar_one())
        finally:
            await engine.dispose()

    return asyncio.run(count())


def _once(arrivals: dict[object, list[Event]]) -> tuple[list[int], list[int]]:
    lost = [seq for seq in range(COUNT) if not arrivals.get(seq)]
    twice = [seq for seq in range(COUNT) if len(arrivals.get(seq, [])) > 1]
    return lost, twice


def test_a_sigtermed_replica_hands_its_claims_over_at_once(
    spawn: SpawnSidecar, homeserver: FaultyHomeserver, figures: Figures, database_url: str
) -> None:
    began = time.monotonic()
    settings = {
        "CLAIM_LEASE_SECONDS": str(LEASE),
        "SWEEP_INTERVAL_SECONDS": str(SWEEP),
        "REPLAY_CONCURRENCY": str(SLOTS),
        "REPLAY_MAX_CLAIMED": str(MAX_CLAIMED),
        "DRAIN_SECONDS": str(DRAIN_SECONDS),
        # The held sends are answered when the test opens their gates, never timed out.
        "HOMESERVER_TIMEOUT_SECONDS": "300",
    }
    # Only the replica to be drained runs at first. A room's events go out from one replica at a
    # time, so which replica holds which claims is set here, not left to the race between them.
    leaving = spawn("leaving", HOMESERVER_URL=homeserver.url_for("leaving"), **settings)
    peer = spawn("peer", start=False, HOMESERVER_URL=homeserver.url_for("peer"), **settings)
    found_key = LOCK.search(leaving.log.read_text())
    assert found_key, tail(leaving.log)
    key = found_key.group(1)
    # The first leaves the replica sends are taken by the homeserver and their answers held:
    # every one of its request slots is busy, and what else it claims waits in its queues.
    gates = [homeserver.hold("leaving") for _ in range(SLOTS)]
    pace = leaving.pace(ALICE)

    def schedule(seqs: range, rooms: list[str], via: tuple[Sidecar, ...]) -> None:
        first_due = time.time() + lead_time(pace, len(seqs))
        for n, seq in enumerate(seqs):
            answer = via[seq % len(via)].schedule_state(
                ALICE,
                rooms[seq % len(rooms)],
                LEAVE,
                f"_@alice:test_DEV{seq}",
                {"seq": seq},
                delay_until(first_due + WINDOW * n / len(seqs)),
            )
            assert answer.status_code == 200, answer.text

    its_share = range(MAX_CLAIMED)
    schedule(its_share, ITS_ROOMS, (leaving,))
    assert all(gate.wait_held(WAIT) for gate in gates), "the replica never had its sends held"
    assert wait_until(lambda: _not_held_by(database_url, key) == 0, WAIT, 0.2), (
        "the replica never claimed its whole share"
    )
    # It holds as many claims as it may: it claims nothing more while its sends are held.
    peer.start()
    schedule(range(MAX_CLAIMED, COUNT), PEER_ROOMS, (leaving, peer))
    # Every leave is due, and the peer has sent every one it could: what is left is claimed by
    # the replica about to be stopped, so what lands after the SIGTERM is what it handed over.
    assert wait_until(lambda: _not_held_by(database_url, key) == 0, WAIT, 0.2), (
        "the peer never sent its share"
    )

    assert leaving.proc is not None
    drain_began = time.time()
    os.killpg(leaving.proc.pid, signal.SIGTERM)
    answers: list[int | None] = []
    assert wait_until(
        lambda: answers.append(_ready_status(leaving)) or answers[-1] == 503, 30, 0.02
    )
    saw_503 = time.time() - drain_began
    for gate in gates:
        gate.open()
    # Until it stops accepting connections, it answers 503 and nothing else.
    assert wait_until(lambda: answers.append(_ready_status(leaving)) or answers[-1] is None, WAIT)
    try:
        exit_code = leaving.proc.wait(timeout=WAIT)
    except Exception:
        pytest.fail(f"the drained replica did not exit:\n{tail(leaving.log)}")
    exited = time.time() - drain_began
    assert peer.wait_idle(timeout=WAIT), "leaves were still scheduled"

    arrivals = homeserver.arrivals()
    lost, twice = _once(arrivals)
    held = [gate.seq for gate in gates]
    landed_after = {
        seq: got[0].arrived - drain_began
        for seq, got in arrivals.items()
        if got[0].arrived > drain_began
    }
    after = list(landed_after.values())
    log = leaving.log.read_text()
    found = GAVE_BACK.search(log)
    assert found, f"no drain in the log:\n{tail(leaving.log)}"
    gave_back, in_flight = int(found.group(1)), int(found.group(2))
    figures.add(
        "replica drained on SIGTERM, peer takes over",
        began,
        events=COUNT,
        delivered=COUNT - len(lost),
        replicas=2,
        lost=len(lost),
        duplicated=len(twice) + homeserver.repeats,
    )
    say(
        f"/ready 503 {saw_503:.2f} s after SIGTERM; gave back {gave_back} claims with "
        f"{in_flight} sends held; {len(after)} leaves landed after the SIGTERM, the last "
        f"{max(after, default=0):.2f} s after it (bound {HANDOVER_BOUND} s, lease {LEASE:.0f} s); "
        f"exited after {exited:.2f} s with {exit_code}; repeated PUTs {homeserver.repeats}"
    )
    assert 200 not in answers[answers.index(503) :], answers
    assert not lost, lost
    assert not twice, twice
    # The held sends were answered to the draining replica, which wrote their outcomes: no one
    # sent them again.
    assert all(len(arrivals[seq]) == 1 for seq in held)
    assert homeserver.repeats == 0, "a leave was PUT again"
    assert in_flight == SLOTS
    assert "drained: every send answered and its outcome written" in log
    # It held its whole share: four sends at the homeserver, the rest queued and handed over.
    assert gave_back == MAX_CLAIMED - SLOTS, gave_back
    assert sorted(landed_after) == sorted(set(its_share) - set(held)), sorted(landed_after)
    assert max(after) <= HANDOVER_BOUND, sorted(after)[-5:]

"""Newer state cancels another user's pending delayed state at replay time; overdue events replay
in send-time order after a restart; and for one (room, type, state_key) a later state never lands
before an earlier one, even with two replicas and a homeserver slow enough for leases to lapse."""

from __future__ import annotations

import random
import time

import pytest

from tests.faults.conftest import ALICE, BOB, SpawnSidecar
from tests.faults.homeserver import FaultyHomeserver
from tests.faults.sidecar import Sidecar
from tests.faults.support import Figures, Ledger, delay_until, lead_time, say

STATE = "m.test.state"
# Long enough that the three events are scheduled and the homeserver's state set before any falls
# due, on a machine many times slower than a developer's.
NEWER_STATE_DELAY_MS = 5000


@pytest.mark.parametrize("rule", ["true", "false"], ids=["rule-on", "rule-off"])
def test_newer_state_of_another_user_cancels_at_replay_time(
    spawn: SpawnSidecar, homeserver: FaultyHomeserver, figures: Figures, rule: str
) -> None:
    began = time.monotonic()
    room = "!newer:test"
    sidecar = spawn("newer", CANCEL_ON_NEWER_STATE=rule)
    homeserver.set_state(room, STATE, "older", "@bob:test", {"by": "bob, before"})
    time.sleep(0.01)  # later timestamps (milliseconds) than the state above
    ids = {}
    for key in ("others", "own", "older"):
        answer = sidecar.schedule_state(ALICE, room, STATE, key, {"seq": key}, NEWER_STATE_DELAY_MS)
        assert answer.status_code == 200, answer.text
        ids[key] = answer.json()["delay_id"]
    time.sleep(0.01)
    # Set on the homeserver directly, not through the sidecar: only the replay can notice.
    homeserver.set_state(room, STATE, "others", "@bob:test", {"by": "bob, after"})
    homeserver.set_state(room, STATE, "own", "@alice:test", {"by": "alice, after"})
    if any(sidecar.lookup(ALICE, delay_id).get("outcome") for delay_id in ids.values()):
        pytest.fail("test set-up: an event was replayed before the newer state was set", False)
    assert sidecar.wait_idle(timeout=60)

    arrivals = homeserver.arrivals()
    assert len(arrivals.get("own", [])) == 1
    assert len(arrivals.get("older", [])) == 1
    others = sidecar.lookup(ALICE, ids["others"])
    if rule == "true":
        assert "others" not in arrivals
        assert (others["outcome"], others["reason"]) == ("cancel", "error"), others
        assert others["error"]["errcode"] == "M_CANCELLED_BY_STATE_UPDATE"
        current = homeserver.current_state(room, STATE, "others")
        assert current is not None
        assert current.sender == "@bob:test"
    else:
        assert len(arrivals.get("others", [])) == 1
        assert (others["outcome"], others["reason"]) == ("send", "delay"), others
    figures.add(
        f"newer state, rule {'on' if rule == 'true' else 'off'}",
        began,
        events=3,
        delivered=sum(1 for key in ids if arrivals.get(key)),
        cancelled=sum(1 for key in ids if not arrivals.get(key)),
        replicas=1,
    )


def _send_ts(sidecar: Sidecar, token: str, delay_id: str) -> tuple[int, str]:
    item = sidecar.lookup(token, delay_id)
    return item["running_since"] + item["delay"], delay_id


def test_overdue_events_replay_in_send_time_order_after_a_restart(
    spawn: SpawnSidecar, homeserver: FaultyHomeserver, seed: int, figures: Figures
) -> None:
    say(f"FAULTS_SEED={seed}")
    began = time.monotonic()
    rng = random.Random(seed)
    rooms = ["!order-a:test", "!order-b:test"]
    sidecar = spawn("order")
    ledger = Ledger()
    room_of: dict[int, str] = {}
    count = 60
    # Send times spread over 2 s that begins once all are scheduled and the sidecar stopped, at
    # the pace this machine schedules now (with headroom); the order of scheduling is random.
    base = time.time() + lead_time(sidecar.pace(ALICE), count + 10)
    for _ in range(count):
        target = base + rng.uniform(0, 2.0)
        entry = ledger.new(delay_until(target))
        entry.not_before = target - 0.001
        room = room_of[entry.seq] = rng.choice(rooms)
        answer = sidecar.schedule_message(ALICE, room, {"seq": entry.seq}, entry.delay_ms)
        assert answer.status_code == 200, answer.text
        entry.delay_id = answer.json()["delay_id"]
    sidecar.stop()
    if time.time() >= base:
        pytest.fail("test set-up: scheduling and stopping outlasted the planned lead", False)
    assert homeserver.events() == [], "an event fired before the sidecar stopped"
    # Let every event become overdue while no sidecar runs.
    time.sleep(max(0.0, base + 3.0 - time.time()))
    sidecar.start()
    assert sidecar.wait_idle(timeout=120)
    send_ts = {
        seq: _send_ts(sidecar, ALICE, e.delay_id)
        for seq, e in ledger.entries.items()
        if e.delay_id is not None
    }
    first_arrival = min(e.arrived for e in homeserver.events())
    assert max(ts for ts, _ in send_ts.values()) < first_arrival * 1000, "all were overdue"

    verdict = ledger.judge(homeserver.arrivals())
    figures.add("overdue order after a restart", began, verdict, replicas=1)
    assert verdict.ok, verdict.describe()
    for room in rooms:
        arrived = [e.seq for e in homeserver.events() if e.room_id == room]
        expected = sorted((s for s in send_ts if room_of[s] == room), key=lambda s: send_ts[s])
        assert arrived == expected, f"{room}: arrival order is not send-time order"


def test_state_of_one_key_lands_in_order_across_two_replicas(
    spawn: SpawnSidecar, homeserver: FaultyHomeserver, seed: int, figures: Figures
) -> None:
    say(f"FAULTS_SEED={seed}")
    began = time.monotonic()
    rng = random.Random(seed)
    room = "!state-order:test"
    keys = ["k1", "k2", "k3"]
    # Slow enough that one replica's run through the room outlasts its lease, so the other
    # replica takes over rows the first has not reached yet.
    homeserver.latency = 0.2
    settings = {"CLAIM_LEASE_SECONDS": "2", "HOMESERVER_TIMEOUT_SECONDS": "1"}
    replicas = [spawn(f"state-replica{i}", **settings) for i in range(2)]
    ledger = Ledger()
    key_of: dict[int, str] = {}
    token_of: dict[int, str] = {}
    count = 36
    # Send times within 1 s that begins once all are scheduled, at this machine's pace.
    base = time.time() + lead_time(replicas[0].pace(ALICE), count)
    for i in range(count):
        target = base + rng.uniform(0, 1.0)
        entry = ledger.new(delay_until(target))
        entry.not_before = target - 0.001
        # One user's state: another user's would cancel it (the newer-state rule).
        token = rng.choice([ALICE, BOB]) if i % 3 == 0 else ALICE
        token_of[entry.seq] = token
        replica = replicas[i % 2]
        if i % 3 == 0:
            answer = replica.schedule_message(token, room, {"seq": entry.seq}, entry.delay_ms)
        else:
            key_of[entry.seq] = rng.choice(keys)
            answer = replica.schedule_state(
                token, room, STATE, key_of[entry.seq], {"seq": entry.seq}, entry.delay_ms
            )
        assert answer.status_code == 200, answer.text
        entry.delay_id = answer.json()["delay_id"]
    assert replicas[0].wait_idle(timeout=120)

    verdict = ledger.judge(homeserver.arrivals())
    figures.add("state order, two replicas", began, verdict, replicas=2)
    say(f"repeated replays absorbed by the homeserver={homeserver.repeats}")
    assert verdict.ok, verdict.describe()
    for key in keys:
        arrived = [e.seq for e in homeserver.events() if e.state_key == key]
        expected = sorted(
            (s for s, k in key_of.items() if k == key),
            key=lambda s: _send_ts(replicas[1], token_of[s], str(ledger.entries[s].delay_id)),
        )
        assert arrived == expected, f"{key}: a later state landed before an earlier one"

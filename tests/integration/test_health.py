"""Liveness, readiness and the Prometheus metrics."""

from __future__ import annotations

import httpx
import pytest
from fastapi import FastAPI
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.common import (
    ALICE,
    BOB,
    ROOM,
    ROOM_PATH,
    UNSTABLE,
    V1,
    act,
    run_due,
    schedule_b,
    schedule_message,
    send_path,
)
from tests.support.fakes import FakeClock, FakeHomeserver

Sample = tuple[str, tuple[tuple[str, str], ...]]


async def scrape(client: httpx.AsyncClient) -> dict[Sample, float]:
    r = await client.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    samples: dict[Sample, float] = {}
    for family in text_string_to_metric_families(r.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: dict[Sample, float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def delta(
    before: dict[Sample, float], after: dict[Sample, float], name: str, **labels: str
) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


async def test_health(client: httpx.AsyncClient) -> None:
    r = await client.get("/health")
    assert r.status_code == 200
    assert r.text == "OK"


async def test_ready_needs_the_scheduler(client: httpx.AsyncClient, app: FastAPI) -> None:
    r = await client.get("/ready")
    assert r.status_code == 503
    assert r.json() == {"database": "ok", "scheduler": "stopped"}
    scheduler = app.state.container.scheduler
    scheduler.start()
    try:
        r = await client.get("/ready")
        assert r.status_code == 200
        assert r.json() == {"database": "ok", "scheduler": "ok"}
    finally:
        scheduler.shutdown()


async def test_scheduled_gauge_counts_all_users(
    client: httpx.AsyncClient, app: FastAPI, clock: FakeClock
) -> None:
    assert value(await scrape(client), "sidecar_scheduled_delayed_events") == 0
    a = await schedule_message(client, 1000, txn="a")
    await schedule_message(client, 2000, txn="b")
    await schedule_message(client, 3000, txn="c", headers=BOB)
    assert value(await scrape(client), "sidecar_scheduled_delayed_events") == 3
    assert (await act(client, a, "cancel", headers=ALICE)).status_code == 200
    assert value(await scrape(client), "sidecar_scheduled_delayed_events") == 2
    clock.advance(2000)
    assert await run_due(app) == 1
    assert value(await scrape(client), "sidecar_scheduled_delayed_events") == 1


async def test_counters_move(
    client: httpx.AsyncClient, app: FastAPI, clock: FakeClock, homeserver: FakeHomeserver
) -> None:
    before = await scrape(client)
    restarted = await schedule_message(client, 1000, txn="restarted")
    cancelled = await schedule_message(client, 1000, txn="cancelled")
    sent = await schedule_message(client, 1000, txn="sent")
    assert (await schedule_b(client, {"delay_ms": 500, "content": {}})).status_code == 200
    await schedule_message(client, 1000, txn="sent")  # a repeated transaction
    assert (await act(client, restarted, "restart", headers=ALICE)).status_code == 200
    assert (await act(client, restarted, "restart", prefix=V1, headers=ALICE)).status_code == 200
    assert (await act(client, cancelled, "cancel")).status_code == 200
    assert (await act(client, sent, "send", prefix=V1, headers=ALICE)).status_code == 200
    assert (await act(client, "unknown", "cancel", prefix=UNSTABLE)).status_code == 404
    clock.advance(500)
    homeserver.fail_next.append(httpx.Response(403, json={"errcode": "M_FORBIDDEN", "error": "x"}))
    assert await run_due(app) == 1  # the generation B event, refused
    after = await scrape(client)

    def moved(name: str, **labels: str) -> float:
        return delta(before, after, name, **labels)

    scheduled = "sidecar_delayed_events_scheduled_total"
    assert moved(scheduled, generation="A", outcome="ok") == 3
    assert moved(scheduled, generation="B", outcome="ok") == 1
    assert moved(scheduled, generation="A", outcome="repeat") == 1
    restarts = "sidecar_delayed_events_restarted_total"
    assert moved(restarts, generation="A", outcome="ok") == 1
    assert moved(restarts, generation="B", outcome="ok") == 1
    assert moved("sidecar_delayed_events_cancelled_total", generation="A", outcome="ok") == 1
    assert moved("sidecar_delayed_events_cancelled_total", generation="A", outcome="refused") == 1
    assert moved("sidecar_delayed_events_sent_total", generation="A", outcome="action") == 1
    assert moved("sidecar_delayed_events_failed_total", generation="B", outcome="M_FORBIDDEN") == 1
    assert moved("sidecar_homeserver_errors_total", errcode="M_FORBIDDEN") == 1
    assert moved("sidecar_replay_duration_seconds_count") == 2


async def test_sent_on_time_counts_lateness(
    client: httpx.AsyncClient, app: FastAPI, clock: FakeClock
) -> None:
    before = await scrape(client)
    await schedule_message(client, 1000)
    clock.advance(3500)
    assert await run_due(app) == 1
    after = await scrape(client)
    assert (
        delta(before, after, "sidecar_delayed_events_sent_total", generation="A", outcome="delay")
        == 1
    )
    assert delta(before, after, "sidecar_replay_lateness_seconds_count") == 1
    assert delta(before, after, "sidecar_replay_lateness_seconds_sum") == pytest.approx(2.5)


@pytest.mark.parametrize("settings_overrides", [{"max_scheduled_per_user": 1}])
async def test_limited_and_retried_counted(
    client: httpx.AsyncClient, app: FastAPI, clock: FakeClock, homeserver: FakeHomeserver
) -> None:
    before = await scrape(client)
    await schedule_message(client, 1000, txn="a")
    r = await client.put(send_path("b") + "?org.matrix.msc4140.delay=1", json={}, headers=ALICE)
    assert r.status_code == 429
    clock.advance(1000)
    homeserver.fail_next.append(httpx.Response(503, json={"errcode": "M_UNKNOWN", "error": "x"}))
    assert await run_due(app) == 1
    after = await scrape(client)
    assert (
        delta(
            before,
            after,
            "sidecar_delayed_events_scheduled_total",
            generation="A",
            outcome="limited",
        )
        == 1
    )
    assert delta(before, after, "sidecar_replay_retries_total") == 1


async def test_metrics_carry_no_identifiers(client: httpx.AsyncClient, app: FastAPI) -> None:
    delay_id = await schedule_message(client, 0)
    assert await run_due(app) == 1
    r = await client.get("/metrics")
    # Route templates name their parameters ({room}), never their values.
    for secret in ("alice", ROOM, ROOM_PATH, "!room", delay_id, "alice_token"):
        assert secret not in r.text


async def test_oldest_overdue_age_follows_the_unsent_event(
    client: httpx.AsyncClient, app: FastAPI, clock: FakeClock, homeserver: FakeHomeserver
) -> None:
    overdue = "sidecar_oldest_overdue_event_age_seconds"
    await schedule_message(client, 1000, txn="a")
    await schedule_message(client, 60_000, txn="b")
    assert value(await scrape(client), overdue) == 0
    clock.advance(1000)
    homeserver.fail_next.append(httpx.Response(503, json={"errcode": "M_UNKNOWN", "error": "x"}))
    assert await run_due(app) == 1  # put off: its due time moves on, its send time does not
    clock.advance(4000)
    assert value(await scrape(client), overdue) == pytest.approx(4.0)
    clock.advance(60_000)
    assert await run_due(app) == 2
    assert value(await scrape(client), overdue) == 0


async def test_build_pool_and_request_metrics(client: httpx.AsyncClient, app: FastAPI) -> None:
    delay_id = await schedule_message(client, 60_000)
    heartbeat = f"{UNSTABLE}/delayed_events/{delay_id}/restart"
    assert (await client.post(heartbeat, json={}, headers=ALICE)).status_code == 200
    assert (await client.get("/no/such/route")).status_code == 404
    samples = await scrape(client)
    assert any(name == "sidecar_build_info" and value == 1 for (name, _), value in samples.items())
    assert ("sidecar_database_pool_connections_in_use", ()) in samples
    duration = "sidecar_http_request_duration_seconds_count"
    routes = {dict(labels)["route"] for (name, labels) in samples if name == duration}
    assert routes >= {
        "/_matrix/client/unstable/org.matrix.msc4140/delayed_events/{delay_id}/restart",
        "unmatched",
    }
    assert any(route.endswith("/send/{event_type}/{txn_id}") for route in routes)
    assert not any(delay_id in route for route in routes)  # templates, never the raw path

"""A real Prometheus scraping the stack's sidecar with the shipped rules (as `scripts/stack up
--monitoring` starts it, here with 1 s intervals and the rules' `for:` shortened): the rules pass
`promtool`, the scrape is up, every metric the rules and the dashboard name exists in Prometheus,
and the overdue alert fires while the homeserver is stopped with an event due, and clears once it
runs again and the event lands."""

from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from devstack import procs, prometheus
from devstack.matrix import Account
from devstack.stack import Ports, Stack

from tests.e2e.support import DELAY, UNSTABLE, Room, call, enc, poll, unique
from tests.unit.test_monitoring_files import (
    dashboard_expressions,
    load_dashboard,
    load_rules,
    named,
    rule_expressions,
)

pytestmark = pytest.mark.e2e
OVERDUE = "DelayedEventsOverdue"


class Prometheus:
    def __init__(self, url: str) -> None:
        self.url = url

    def get(self, path: str, **params: str) -> Any:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        with urllib.request.urlopen(f"{self.url}{path}{query}", timeout=10) as answer:
            body = json.load(answer)
        assert body["status"] == "success", body
        return body["data"]

    def alert_states(self, name: str) -> list[str]:
        return [
            a["state"]
            for a in self.get("/api/v1/alerts")["alerts"]
            if a["labels"]["alertname"] == name
        ]

    def names(self) -> set[str]:
        return set(self.get("/api/v1/label/__name__/values"))


@pytest.fixture(scope="module")
def prom(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    root: Path = tmp_path_factory.mktemp("prometheus")
    rules = prometheus.rules_text(for_="1s", overdue_after_seconds=2)
    config = prometheus.configure(
        root, procs.free_port(), stack.ports.sidecar, interval="1s", rules=rules
    )
    process = prometheus.start(config)
    try:
        poll(
            lambda: True if procs.http_ok(f"{config.url}/-/ready") else None,
            60,
            "Prometheus to be ready",
            interval=0.25,
        )
        yield Prometheus(config.url)
    finally:
        procs.stop(process.pid, prometheus.MARKER)
        process.wait(timeout=30)


def test_promtool_accepts_the_shipped_rules(tmp_path: Path) -> None:
    checked = prometheus.check_rules(prometheus.RULES)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS: 5 rules found" in checked.stdout
    shortened = tmp_path / "short.yml"
    shortened.write_text(prometheus.rules_text(for_="1s", overdue_after_seconds=2))
    assert prometheus.check_rules(shortened).returncode == 0
    broken = tmp_path / "broken.yml"
    broken.write_text(prometheus.rules_text().replace("> 60", "> > 60"))
    assert prometheus.check_rules(broken).returncode != 0


def schedule(client_url: str, path: str, delay: int, token: str, body: object) -> str:
    answer = call(client_url, "PUT", f"{path}?{DELAY}={delay}", body, token=token)
    assert answer.status == 200, answer
    delay_id: str = answer.json()["delay_id"]
    return delay_id


def test_every_metric_named_exists_in_prometheus(
    stack: Stack, alice: Account, room: Room, prom: Prometheus
) -> None:
    token = alice.access_token
    base = f"/_matrix/client/v3/{room.path}/send/m.room.message"
    # Traffic that moves every labelled series: sent, cancelled, restarted, and one refused (a
    # room alice is not in).
    sent = {"msgtype": "m.text", "body": unique("sent")}
    schedule(stack.client_url, f"{base}/{unique('t')}", 0, token, sent)
    waiting = schedule(stack.client_url, f"{base}/{unique('t')}", 600_000, token, {"body": "w"})
    for action in ("restart", "cancel"):
        answer = call(
            stack.client_url, "POST", f"{UNSTABLE}/delayed_events/{waiting}/{action}", {}, token
        )
        assert answer.status == 200, answer
    elsewhere = f"/_matrix/client/v3/rooms/{enc('!nowhere:localhost')}/send/m.room.message"
    schedule(stack.client_url, f"{elsewhere}/{unique('t')}", 0, token, {"body": "refused"})

    poll(lambda: True if _landed(room, sent) else None, 30, "the event to land", interval=0.5)
    targets = poll(
        lambda: (
            [t for t in prom.get("/api/v1/targets")["activeTargets"] if t["health"] == "up"] or None
        ),
        30,
        "the sidecar's scrape to be up",
    )
    assert targets[0]["labels"]["job"] == prometheus.JOB
    wanted = named(rule_expressions(load_rules())) | named(dashboard_expressions(load_dashboard()))
    assert "sidecar_delayed_events_failed_total" in wanted

    def all_there() -> set[str] | None:
        return wanted if wanted <= prom.names() else None

    try:
        poll(all_there, 30, "every named metric in Prometheus", interval=0.5)
    except AssertionError:
        raise AssertionError(f"missing in Prometheus: {sorted(wanted - prom.names())}") from None


def test_overdue_alert_fires_while_the_homeserver_is_stopped(
    stack: Stack, alice: Account, room: Room, prom: Prometheus
) -> None:
    poll(lambda: True if prom.alert_states(OVERDUE) == [] else None, 60, "no overdue alert")
    body = {"msgtype": "m.text", "body": unique("overdue")}
    path = f"/_matrix/client/v3/{room.path}/send/m.room.message/{unique('t')}"
    # Due 4 s after scheduling: the homeserver is stopped well before.
    schedule(stack.client_url, path, 4000, alice.access_token, body)
    synapse = stack.processes["synapse"].pid
    os.kill(synapse, signal.SIGSTOP)
    try:
        poll(
            lambda: True if "firing" in prom.alert_states(OVERDUE) else None,
            60,
            "the overdue alert to fire",
            interval=0.5,
        )
    finally:
        os.kill(synapse, signal.SIGCONT)
    poll(
        lambda: True if _landed(room, body) else None,
        60,
        "the overdue event to land",
        interval=0.5,
    )
    poll(
        lambda: True if prom.alert_states(OVERDUE) == [] else None,
        60,
        "the overdue alert to clear",
        interval=0.5,
    )


def _landed(room: Room, body: dict[str, str]) -> bool:
    return any(event.get("content") == body for event in room.timeline())


def test_stack_up_with_monitoring_scrapes_the_sidecar(stack: Stack) -> None:
    """`scripts/stack up --monitoring` (here against the running stack's homeserver, so that no
    second Synapse starts): Prometheus runs with the shipped rules, scrapes the sidecar, is
    named in the printed settings, and `down` stops it."""
    directory = Path(tempfile.mkdtemp(prefix="sidecar-monitoring-"))
    directory.chmod(0o755)  # PostgreSQL runs as its own account
    given = Stack.up(directory, Ports.free(), homeserver_url=stack.homeserver_url, monitoring=True)
    try:
        assert f"PROMETHEUS_URL={given.prometheus_url}" in given.env_lines()
        assert (directory / "prometheus" / "alerts.yml").read_text() == prometheus.RULES.read_text()
        prom = Prometheus(given.prometheus_url)
        poll(
            lambda: (
                True
                if [t for t in prom.get("/api/v1/targets")["activeTargets"] if t["health"] == "up"]
                else None
            ),
            60,
            "the sidecar's scrape to be up",
            interval=0.5,
        )
        groups = prom.get("/api/v1/rules")["groups"]
        assert {rule["name"] for group in groups for rule in group["rules"]} >= {OVERDUE}
        pid = given.processes["prometheus"].pid
    finally:
        given.down()
        shutil.rmtree(directory, ignore_errors=True)
    assert not procs.is_alive(pid, prometheus.MARKER)

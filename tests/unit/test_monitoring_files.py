"""The shipped alerting rules (deploy/prometheus/alerts.yml) and Grafana dashboard
(deploy/grafana/msc4140-sidecar.json) name only metrics the sidecar exports. Each check returns the
problems it finds, so that it can be fed broken copies and seen to complain."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml
from prometheus_client import REGISTRY

import app.main  # noqa: F401  (every metric the application uses is registered on import)

ROOT = Path(__file__).resolve().parents[2]
ALERTS = ROOT / "deploy/prometheus/alerts.yml"
DASHBOARD = ROOT / "deploy/grafana/msc4140-sidecar.json"
METRIC = re.compile(r"\b(sidecar_[a-z0-9_]+)")
# What Prometheus itself adds for every target.
PROMETHEUS_OWN = {"up"}
_SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "info": ("_info",),
    "gauge": ("",),
}


def exported() -> set[str]:
    """Every series name the sidecar's registry can expose."""
    names: set[str] = set()
    for family in REGISTRY.collect():
        for suffix in _SUFFIXES.get(family.type, ("",)):
            names.add(family.name + suffix)
    return names


def rule_expressions(rules: dict[str, Any]) -> list[str]:
    return [rule["expr"] for group in rules["groups"] for rule in group["rules"]]


def dashboard_expressions(dashboard: dict[str, Any]) -> list[str]:
    found = [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable.get("type") == "query":
            found.append(str(variable.get("query", "")))
    return found


def unknown_metrics(expressions: list[str], known: set[str]) -> list[str]:
    problems = []
    for expr in expressions:
        for name in METRIC.findall(expr):
            if name not in known:
                problems.append(f"{name} (in {expr!r}) is not exported")
    return problems


def named(expressions: list[str]) -> set[str]:
    return {name for expr in expressions for name in METRIC.findall(expr)}


def load_rules() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(ALERTS.read_text())
    return loaded


def load_dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def test_rules_name_only_exported_metrics() -> None:
    expressions = rule_expressions(load_rules())
    assert unknown_metrics(expressions, exported()) == []
    assert "sidecar_oldest_overdue_event_age_seconds" in named(expressions)


def test_dashboard_names_only_exported_metrics() -> None:
    dashboard = load_dashboard()
    expressions = dashboard_expressions(dashboard)
    assert unknown_metrics(expressions, exported()) == []
    # Every panel asks something.
    assert all(panel["targets"] for panel in dashboard["panels"])


def test_the_check_finds_a_misspelt_metric() -> None:
    rules = load_rules()
    rules["groups"][0]["rules"][0]["expr"] = "max(sidecar_oldest_overdue_event_age) > 60"
    assert unknown_metrics(rule_expressions(rules), exported()) == [
        "sidecar_oldest_overdue_event_age (in 'max(sidecar_oldest_overdue_event_age) > 60') "
        "is not exported"
    ]
    dashboard = load_dashboard()
    dashboard["panels"][0]["targets"][0]["expr"] = "rate(sidecar_requests_total[5m])"
    assert unknown_metrics(dashboard_expressions(dashboard), exported()) != []


def test_the_alerts_cover_what_matters() -> None:
    alerts = {rule["alert"]: rule for group in load_rules()["groups"] for rule in group["rules"]}
    assert set(alerts) >= {
        "DelayedEventsOverdue",
        "DelayedEventFailuresRising",
        "HomeserverErrors",
        "SidecarDatabaseUnreachable",
        "ReplayLatenessHigh",
    }
    # Shared-database figures are the same on every replica: never summed.
    for expr in rule_expressions(load_rules()) + dashboard_expressions(load_dashboard()):
        for name in ("sidecar_scheduled_delayed_events", "sidecar_oldest_overdue_event_age"):
            assert not re.search(rf"sum[^()]*\(\s*{name}", expr), expr

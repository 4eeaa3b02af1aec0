"""Prometheus for the local stack (`scripts/stack up --monitoring`): scrapes the sidecar and
evaluates the shipped alerting rules, `deploy/prometheus/alerts.yml`. Everything it writes stays
in its folder. Tests start it with short intervals, and may shorten the rules' `for:` and the
overdue threshold through `rules_text`."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from devstack.procs import StackError, spawn

REPO = Path(__file__).resolve().parents[2]
RULES = REPO / "deploy" / "prometheus" / "alerts.yml"
MARKER = "prometheus"
JOB = "msc4140-sidecar"


def find_prometheus() -> str:
    found = shutil.which("prometheus") or (
        "/usr/bin/prometheus" if Path("/usr/bin/prometheus").exists() else ""
    )
    if not found:
        raise StackError("prometheus is not installed (scripts/setup prometheus installs it)")
    return found


def find_promtool() -> str:
    found = shutil.which("promtool") or (
        "/usr/bin/promtool" if Path("/usr/bin/promtool").exists() else ""
    )
    if not found:
        raise StackError("promtool is not installed (scripts/setup prometheus installs it)")
    return found


def rules_text(for_: str | None = None, overdue_after_seconds: int | None = None) -> str:
    """The shipped rules; with `for_`, every rule's `for:` replaced by it, and with
    `overdue_after_seconds`, the overdue alert's threshold (both for tests that cannot wait)."""
    text = RULES.read_text()
    if for_ is None and overdue_after_seconds is None:
        return text
    rules: dict[str, Any] = yaml.safe_load(text)
    for group in rules["groups"]:
        for rule in group["rules"]:
            if for_ is not None and "for" in rule:
                rule["for"] = for_
            if overdue_after_seconds is not None and rule.get("alert") == "DelayedEventsOverdue":
                expr, _, _ = str(rule["expr"]).rpartition(">")
                rule["expr"] = f"{expr.strip()} > {overdue_after_seconds}"
    return yaml.safe_dump(rules, sort_keys=False)


@dataclass(frozen=True)
class PrometheusConfig:
    root: Path
    port: int

    @property
    def conf(self) -> Path:
        return self.root / "prometheus.yml"

    @property
    def rules(self) -> Path:
        return self.root / "alerts.yml"

    @property
    def log(self) -> Path:
        return self.root / "prometheus.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def configure(
    root: Path,
    port: int,
    sidecar_port: int,
    *,
    interval: str = "5s",
    rules: str | None = None,
) -> PrometheusConfig:
    """Write `root/prometheus.yml` (scraping the sidecar's /metrics every `interval`, rules
    evaluated as often) and `root/alerts.yml` (the shipped rules, or `rules`)."""
    root = root.resolve()
    (root / "data").mkdir(parents=True, exist_ok=True)
    config = PrometheusConfig(root=root, port=port)
    config.rules.write_text(rules if rules is not None else rules_text())
    settings = {
        "global": {"scrape_interval": interval, "evaluation_interval": interval},
        "rule_files": [str(config.rules)],
        "scrape_configs": [
            {
                "job_name": JOB,
                "metrics_path": "/metrics",
                "static_configs": [{"targets": [f"127.0.0.1:{sidecar_port}"]}],
            }
        ],
    }
    config.conf.write_text(yaml.safe_dump(settings, sort_keys=False))
    return config


def check_rules(path: Path) -> subprocess.CompletedProcess[str]:
    """`promtool check rules` on a rules file (its verdict in `.stdout`/`.stderr`)."""
    return subprocess.run(
        [find_promtool(), "check", "rules", str(path)], capture_output=True, text=True
    )


def start(config: PrometheusConfig) -> subprocess.Popen[bytes]:
    checked = subprocess.run(
        [find_promtool(), "check", "config", str(config.conf)], capture_output=True, text=True
    )
    if checked.returncode != 0:
        raise StackError(f"promtool rejected {config.conf}:\n{checked.stdout}{checked.stderr}")
    return spawn(
        [
            find_prometheus(),
            f"--config.file={config.conf}",
            f"--storage.tsdb.path={config.root / 'data'}",
            f"--web.listen-address=127.0.0.1:{config.port}",
            "--storage.tsdb.retention.time=1d",
        ],
        config.log,
        cwd=config.root,
    )

"""The parts of `app/` and which may import which: the picture at the top of
docs/architecture.md, checked against the code's imports."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

APP = Path(__file__).resolve().parents[2] / "app"

REPOSITORIES = {
    "app.repository",
    "app.repository_admin",
    "app.repository_claims",
    "app.repository_due",
    "app.repository_health",
    "app.repository_history",
    "app.repository_lookup",
    "app.repository_tokens",
}
# Modules that only hold words, values and plumbing every layer shares.
SHARED = {
    "app.clock",
    "app.crypto",
    "app.delay_ids",
    "app.domain",
    "app.errors",
    "app.logs",
    "app.metrics",
    "app.models",
    "app.settings",
    "app.tasks",
    "app.version",
}


def module_name(path: Path) -> str:
    parts = path.relative_to(APP.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """The app modules `path` imports (`from app import x` counts as `app.x`)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("app."))
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "app":
                found.update(f"app.{alias.name}" for alias in node.names)
            elif node.module.startswith("app."):
                found.add(node.module)
    return found


GRAPH = {module_name(path): imports_of(path) for path in APP.rglob("*.py")}


def in_package(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def test_the_graph_is_read() -> None:
    assert "app.service" in GRAPH
    assert "app.repository" in GRAPH["app.service"]
    assert any(in_package(m, "app.replay") for m in GRAPH)


@pytest.mark.parametrize("module", sorted(m for m in GRAPH if m in REPOSITORIES))
def test_repositories_know_only_the_models(module: str) -> None:
    """SQL knows rows, not rules: a repository imports models and other repositories only."""
    assert GRAPH[module] <= REPOSITORIES | {"app.models"}


@pytest.mark.parametrize("module", sorted(m for m in GRAPH if in_package(m, "app.api")))
def test_the_api_goes_through_the_rules(module: str) -> None:
    """Routes call the service, lookups, admin and health modules; never a repository, never
    the replay's insides."""
    replay = {m for m in GRAPH if in_package(m, "app.replay")}
    if module == "app.api.deps":
        replay = set()  # the container's field types: the wiring, handed over ready-made
    assert not GRAPH[module] & (REPOSITORIES | replay)


@pytest.mark.parametrize(
    "module", sorted(m for m in GRAPH if m not in REPOSITORIES and not in_package(m, "app.api"))
)
def test_nothing_below_the_api_imports_it(module: str) -> None:
    if module in ("app.main", "app.__main__"):
        return  # where every part is wired and started, the API included
    assert not {m for m in GRAPH[module] if in_package(m, "app.api")}


@pytest.mark.parametrize("module", sorted(m for m in GRAPH if in_package(m, "app.replay")))
def test_the_replay_does_not_know_the_rules(module: str) -> None:
    """The replay sends what the rules stored; it does not import the service or the lookups."""
    assert not GRAPH[module] & {"app.service", "app.lookups", "app.admin", "app.restarts"}


def test_the_scheduler_knows_only_the_clock_and_the_wake_up() -> None:
    assert GRAPH["app.scheduler"] <= {"app.clock", "app.replay.wakeup"}


@pytest.mark.parametrize("module", sorted(SHARED))
def test_shared_modules_import_no_layer(module: str) -> None:
    assert GRAPH[module] <= SHARED

"""The local stack's command line, against the running end-to-end stack: `status` reports it, a
second `up` in the same folder refuses (and names the running stack), and the recorded processes
are the ones answering."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from devstack.procs import http_ok
from devstack.stack import AlreadyRunning, Ports, Stack

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]


def stack_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "devstack.stack", *args],
        cwd=REPO,
        env={"PYTHONPATH": str(REPO / "scripts"), "PATH": "/usr/bin:/bin:/usr/sbin:/sbin"},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_status_reports_every_process_running(stack: Stack) -> None:
    result = stack_cli("status", "--dir", str(stack.dir))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == stack.env_lines()
    for name in ("postgres", "synapse", "sidecar", "nginx"):
        assert f"{name}: running" in result.stderr


def test_a_second_up_refuses_and_names_the_running_stack(stack: Stack) -> None:
    result = stack_cli("up", "--dir", str(stack.dir), "--client-port", "1")
    assert result.returncode == 1
    assert "already running" in result.stderr
    assert f"CLIENT_URL={stack.client_url}" in result.stdout.splitlines()
    with pytest.raises(AlreadyRunning):
        Stack.up(stack.dir, Ports.free())
    # Nothing was disturbed by the refused attempts.
    assert all(Stack.load(stack.dir).running().values())  # type: ignore[union-attr]
    assert http_ok(f"{stack.sidecar_url}/health")


def test_the_sidecar_health_port_is_not_the_public_one(stack: Stack) -> None:
    assert http_ok(f"{stack.sidecar_url}/health")
    assert not http_ok(f"{stack.client_url}/health")
    assert not http_ok(f"{stack.client_url}/metrics")

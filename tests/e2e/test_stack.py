"""The local stack's command line, against the running end-to-end stack: `status` reports it, a
second `up` in the same folder refuses (and names the running stack), and the recorded processes
are the ones answering."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from devstack import procs
from devstack.matrix import Account
from devstack.procs import StackError, http_ok
from devstack.stack import AlreadyRunning, Ports, Stack

from tests.e2e.support import DELAY, Room, call, poll

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


def test_up_with_a_given_homeserver_starts_no_synapse_and_uses_it(
    stack: Stack, alice: Account
) -> None:
    # PostgreSQL runs as its own account, so the folder must be reachable by it.
    directory = Path(tempfile.mkdtemp(prefix="sidecar-given-hs-"))
    directory.chmod(0o755)
    given = Stack.up(directory, Ports.free(), homeserver_url=stack.homeserver_url)
    try:
        assert "synapse" not in given.processes
        assert given.homeserver_url == stack.homeserver_url
        created = call(
            given.client_url, "POST", "/_matrix/client/v3/createRoom", {}, token=alice.access_token
        )
        assert created.status == 200, created
        room = Room(
            given.client_url, stack.homeserver_url, alice.access_token, created.json()["room_id"]
        )
        scheduled = call(
            given.client_url,
            "PUT",
            f"/_matrix/client/v3/{room.path}/send/org.example.given/t1?{DELAY}=500",
            {"body": "through the given homeserver"},
            token=alice.access_token,
        )
        assert scheduled.status == 200, scheduled
        event = poll(lambda: room.find_event("org.example.given"), 30, "the delayed event")
        assert event["sender"] == alice.user_id
    finally:
        given.down()
        shutil.rmtree(directory, ignore_errors=True)


@pytest.mark.parametrize(
    "url", ["https://hs.example:443", "http://hs.example", "hs:8008", "http://h:1/x"]
)
def test_a_homeserver_url_must_be_plain_http_host_and_port(url: str, tmp_path: Path) -> None:
    with pytest.raises(StackError, match="--homeserver-url must look like"):
        Stack.up(tmp_path / "refused", Ports.free(), homeserver_url=url)


def test_start_up_goes_by_the_exit_status_not_the_command_line(tmp_path: Path) -> None:
    """A server whose command line changes while it starts (a launcher that execs it, as a
    wrapper or shim does) is running: start-up waits for it to answer, and `down` stops it."""
    stack = Stack(dir=tmp_path, ports=Ports.free())
    port = procs.free_port()
    launcher = 'exec "$0" -m http.server --bind 127.0.0.1 "$1"'
    log = tmp_path / "server.log"
    child = procs.spawn(["/bin/sh", "-c", launcher, sys.executable, str(port)], log)
    try:
        stack._record("synapse", child.pid, f"{launcher} {sys.executable}", child)
        stack._wait("synapse", f"http://127.0.0.1:{port}/", 60.0, log)
        assert http_ok(f"http://127.0.0.1:{port}/")
        with open(tmp_path / "down.log", "w") as out:
            stack.down(out)
        assert child.poll() is not None, "down left it running"
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


def test_start_up_reports_a_server_that_exits(tmp_path: Path) -> None:
    stack = Stack(dir=tmp_path, ports=Ports.free())
    log = tmp_path / "server.log"
    child = procs.spawn(["/bin/sh", "-c", "echo cannot start; exit 3"], log)
    stack._record("synapse", child.pid, "cannot start", child)
    with pytest.raises(StackError, match=r"synapse exited during start-up \(exit status 3\)"):
        stack._wait("synapse", f"http://127.0.0.1:{procs.free_port()}/", 60.0, log)
    assert "cannot start" in log.read_text()

"""The sidecar as a real process (`python -m app serve`), and the client calls the fault tests
make to it.

Each process runs in its own session; killing it signals its whole process group.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
from devstack.procs import free_port, tail, wait_until

ROOT = Path(__file__).resolve().parents[2]
PYTHON = ROOT / ".venv" / "bin" / "python"
DELAY = "org.matrix.msc4140.delay"
V1 = "/_matrix/client/v1/delayed_events"
# Generous enough for a machine several times slower than a developer's, under load.
READY_TIMEOUT = 120.0
PROBE_ROOM = "!pace-probe:test"


def enc(value: str) -> str:
    return quote(value, safe="")


class Sidecar:
    """One sidecar process; `start()` may be called again after `kill()` or `stop()`."""

    def __init__(self, name: str, env: Mapping[str, str], log_dir: Path) -> None:
        self.name = name
        self.port = int(env.get("SIDECAR_LISTEN_PORT") or free_port())
        self.env = {**os.environ, **env, "SIDECAR_LISTEN_PORT": str(self.port)}
        self.log = log_dir / f"{name}.log"
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.kills = 0
        self.starts = 0

    def start(self, wait: bool = True) -> None:
        assert self.proc is None, f"{self.name} is running"
        executable = str(PYTHON) if PYTHON.exists() else sys.executable
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [executable, "-m", "app", "serve"],
                cwd=ROOT,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.starts += 1
        if wait:
            self.wait_ready()

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        def ready() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.name} exited:\n{tail(self.log)}")
            try:
                return httpx.get(self.url + "/ready", timeout=2.0).status_code == 200
            except httpx.HTTPError:
                return False

        if not wait_until(ready, timeout, interval=0.05):
            raise AssertionError(f"{self.name} not ready in {timeout} s:\n{tail(self.log)}")

    def kill(self) -> None:
        """SIGKILL the process group: no clean-up of any kind happens in the sidecar."""
        self._signal(signal.SIGKILL)
        self.kills += 1

    def stop(self) -> None:
        """SIGTERM, as an operator's restart does; SIGKILL if it lingers."""
        if self.proc is None:
            return
        self._signal(signal.SIGTERM, wait=15.0)

    def _signal(self, sig: signal.Signals, wait: float = 10.0) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # Calls ---------------------------------------------------------------------------------------

    def request(
        self,
        method: str,
        path: str,
        *,
        token: str | None = None,
        body: Any = None,
        timeout: float = 10.0,
    ) -> httpx.Response:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.request(method, self.url + path, headers=headers, json=body, timeout=timeout)

    def schedule_message(
        self,
        token: str,
        room: str,
        content: dict[str, Any],
        delay_ms: int,
        txn: str | None = None,
        timeout: float = 10.0,
    ) -> httpx.Response:
        txn = txn or uuid.uuid4().hex
        path = f"/_matrix/client/v3/rooms/{enc(room)}/send/m.room.message/{txn}?{DELAY}={delay_ms}"
        return self.request("PUT", path, token=token, body=content, timeout=timeout)

    def schedule_state(
        self,
        token: str,
        room: str,
        event_type: str,
        state_key: str,
        content: dict[str, Any],
        delay_ms: int,
        timeout: float = 10.0,
    ) -> httpx.Response:
        path = (
            f"/_matrix/client/v3/rooms/{enc(room)}/state/{enc(event_type)}/{enc(state_key)}"
            f"?{DELAY}={delay_ms}"
        )
        return self.request("PUT", path, token=token, body=content, timeout=timeout)

    def act(self, token: str, delay_id: str, action: str, timeout: float = 10.0) -> httpx.Response:
        """A v1 management action: 200 when done (or already done), 409 on a conflict."""
        return self.request(
            "POST", f"{V1}/{enc(delay_id)}/{action}", token=token, body={}, timeout=timeout
        )

    def pace(self, token: str, probes: int = 5) -> float:
        """Seconds one scheduling request takes on this machine now: the mean of `probes`
        messages scheduled an hour ahead in a room of their own and cancelled again (they never
        reach the homeserver)."""
        started = time.monotonic()
        ids = []
        for _ in range(probes):
            answer = self.schedule_message(token, PROBE_ROOM, {"seq": "probe"}, 3_600_000)
            assert answer.status_code == 200, answer.text
            ids.append(answer.json()["delay_id"])
        seconds = (time.monotonic() - started) / probes
        for delay_id in ids:
            assert self.act(token, delay_id, "cancel").status_code == 200
        return seconds

    def lookup(self, token: str, delay_id: str) -> dict[str, Any]:
        answer = self.request("GET", f"{V1}/{enc(delay_id)}", token=token)
        assert answer.status_code == 200, answer.text
        found: dict[str, Any] = answer.json()
        return found

    def metrics(self) -> dict[str, float]:
        """Prometheus samples by their full name with labels, e.g. `x_total{a="b"}`."""
        text = httpx.get(self.url + "/metrics", timeout=10.0).text
        samples: dict[str, float] = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                samples[name] = float(value)
        return samples

    def scheduled_now(self) -> int:
        return int(self.metrics()["sidecar_scheduled_delayed_events"])

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no delayed event is scheduled any more."""

        def idle() -> bool:
            try:
                return self.scheduled_now() == 0
            except httpx.HTTPError:
                return False

        return wait_until(idle, timeout, interval=0.2)


def elapsed_since(start: float) -> float:
    return time.monotonic() - start

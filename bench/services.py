"""The servers a benchmark run measures, started on free loopback ports and stopped on exit.

- the local stack (PostgreSQL, Synapse with its MSC4140 off, the sidecar, nginx) from
  scripts/devstack, with a per-user cap high enough for the bursts;
- a second Synapse from .venv-synapse with its own MSC4140 on and its rate limits out of the way;
- the trivial FastAPI app (bench/trivial.py), the framework's ceiling;
- an nginx answering `{}` itself, the load generators' own ceiling.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

from devstack import nginx, procs, synapse  # noqa: E402
from devstack.stack import Ports, Stack  # noqa: E402

PYTHON = REPO / ".venv" / "bin" / "python"
UNLIMITED = {"per_second": 100000, "burst_count": 100000}
# A cap per user high enough that one user can hold a whole burst; the heartbeat spreads its
# events over several users anyway.
MAX_SCHEDULED_PER_USER = 5000


@dataclass
class Native:
    """A Synapse with its own delayed events switched on."""

    url: str
    port: int
    registration_shared_secret: str


@dataclass
class Services:
    stack: Stack
    native: Native
    trivial_port: int
    static_port: int
    out: Path


def wait_http(url: str, timeout: float, pid: int, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if procs.http_ok(url, timeout=2.0):
            return
        if not procs.is_alive(pid):
            break
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer; see {log}:\n{procs.tail(log)}")


def start_native(root: Path, started: list[tuple[subprocess.Popen[bytes], str]]) -> Native:
    port = procs.free_port()
    config = synapse.configure(
        root,
        port,
        {
            "max_event_delay_duration": "24h",
            "rc_delayed_event_mgmt": UNLIMITED,
            "rc_message": UNLIMITED,
        },
    )
    process = synapse.start(config)
    started.append((process, synapse.MARKER))
    wait_http(f"{config.url}/health", 180, process.pid, root / "synapse.out")
    return Native(config.url, port, config.registration_shared_secret)


def start_trivial(root: Path, started: list[tuple[subprocess.Popen[bytes], str]]) -> int:
    port = procs.free_port()
    log = root / "trivial.log"
    process = procs.spawn(
        [str(PYTHON), str(REPO / "bench" / "trivial.py"), str(port)], log, cwd=REPO
    )
    started.append((process, "trivial.py"))
    wait_http(f"http://127.0.0.1:{port}/health", 60, process.pid, log)
    return port


STATIC_CONF = """
worker_processes 1;
daemon off;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log;
events {{ worker_connections 512; }}
http {{
    access_log off;
    keepalive_requests 10000000;
    client_body_temp_path {prefix}/tmp;
    server {{
        listen 127.0.0.1:{port};
        location / {{ default_type application/json; return 200 '{{}}'; }}
    }}
}}
"""


def start_static(root: Path, started: list[tuple[subprocess.Popen[bytes], str]]) -> int:
    port = procs.free_port()
    prefix = root.resolve()
    (prefix / "tmp").mkdir(parents=True, exist_ok=True)
    conf = prefix / "nginx.conf"
    user = "user root;\n" if os.geteuid() == 0 else ""
    conf.write_text(user + STATIC_CONF.format(prefix=prefix, port=port))
    process = procs.spawn(
        [nginx.find_nginx(), "-p", str(prefix), "-e", str(prefix / "error.log"), "-c", str(conf)],
        prefix / "nginx.out",
    )
    started.append((process, "nginx"))
    wait_http(f"http://127.0.0.1:{port}/", 60, process.pid, prefix / "nginx.out")
    return port


def stop(process: subprocess.Popen[bytes], marker: str) -> None:
    if procs.is_alive(process.pid, marker):
        procs.stop(process.pid, marker)


def resolve_baseline(rev: str) -> str | None:
    """The commit to compare the sidecar with: `rev`, or for "auto" the one before restarts were
    batched (the parent of the commit that added app/restarts.py); None for "none"."""
    if rev == "none":
        return None
    if rev == "auto":
        added = subprocess.run(
            ["git", "log", "--diff-filter=A", "--format=%H", "-1", "--", "app/restarts.py"],
            capture_output=True,
            text=True,
            cwd=REPO,
            check=True,
        ).stdout.strip()
        rev = f"{added}^" if added else "HEAD"
    return subprocess.run(
        ["git", "rev-parse", "--short", rev], capture_output=True, text=True, cwd=REPO, check=True
    ).stdout.strip()


@contextlib.contextmanager
def baseline_sidecar(stack: Stack, commit: str, root: Path) -> Iterator[int]:
    """The sidecar as it was at `commit`, beside the current one: same database, same homeserver,
    same token key, its own port. Only for as long as the block runs (it replays too)."""
    src = root / "src"
    shutil.rmtree(root, ignore_errors=True)
    src.mkdir(parents=True)
    archive = subprocess.run(
        ["git", "archive", commit, "app", "migrations"], capture_output=True, cwd=REPO, check=True
    )
    subprocess.run(["tar", "-x", "-C", str(src)], input=archive.stdout, check=True)
    environ = Path(f"/proc/{stack.processes['sidecar'].pid}/environ").read_bytes()
    env = dict(item.split("=", 1) for item in environ.decode().split("\0") if "=" in item)
    port = procs.free_port()
    env["SIDECAR_LISTEN_PORT"] = str(port)
    log = root / "sidecar.log"
    # `python -m app` from src/ imports this copy of the package, ahead of the installed one.
    process = procs.spawn([str(PYTHON), "-m", "app", "serve"], log, env=env, cwd=src)
    try:
        wait_http(f"http://127.0.0.1:{port}/ready", 60, process.pid, log)
        yield port
    finally:
        stop(process, "-m app serve")


@contextlib.contextmanager
def running(out: Path) -> Iterator[Services]:
    """Everything up, and down again however the block ends."""
    os.environ["SIDECAR_MAX_SCHEDULED_PER_USER"] = str(MAX_SCHEDULED_PER_USER)
    # The rate limiters stay in the request path (their cost is measured) but never refuse, as
    # the native Synapse's rc_* limits are raised out of the way.
    for limit in ("SCHEDULE", "MANAGE", "TOKENLESS"):
        os.environ[f"SIDECAR_RATELIMIT_{limit}_PER_SECOND"] = str(UNLIMITED["per_second"])
        os.environ[f"SIDECAR_RATELIMIT_{limit}_BURST"] = str(UNLIMITED["burst_count"])
    started: list[tuple[subprocess.Popen[bytes], str]] = []
    stack: Stack | None = None
    for name in ("native-synapse", "trivial", "static-nginx", "scale"):
        shutil.rmtree(out / name, ignore_errors=True)
    try:
        stack = Stack.up(out / "stack", Ports.free())
        native = start_native(out / "native-synapse", started)
        trivial_port = start_trivial(out / "trivial", started)
        static_port = start_static(out / "static-nginx", started)
        yield Services(stack, native, trivial_port, static_port, out)
    finally:
        for process, marker in reversed(started):
            with contextlib.suppress(Exception):
                stop(process, marker)
        if stack is not None:
            stack.down()

"""Starting, watching and stopping the local stack's background processes.

Each process runs in its own session, so its process group holds exactly what it spawned (nginx's
workers, for instance) and can be signalled as a whole without touching anything else.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path


class StackError(RuntimeError):
    """Something in the stack failed to start or stop; the message says what and where to look."""


def spawn(
    cmd: Sequence[str],
    log_path: Path,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> subprocess.Popen[bytes]:
    """Start `cmd` in a new session, detached from the terminal, output appended to `log_path`."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            list(cmd),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=dict(env) if env is not None else None,
            cwd=cwd,
            start_new_session=True,
        )


def cmdline(pid: int) -> str:
    """The command line of a running process, or "" when there is none (or it is a zombie)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        if stat.rsplit(")", 1)[-1].split()[0] == "Z":
            return ""
        return (
            Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        )
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return ""


def is_alive(pid: int, marker: str = "") -> bool:
    """Whether `pid` runs. For a child of this process its exit status decides (an unreaped
    child's pid cannot be reused); for any other process, that its command line contains `marker`
    (guards against reused pids)."""
    try:
        # Reaps it if it is our own child that has exited, so it does not linger as a zombie.
        done, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        line = cmdline(pid)
        return bool(line) and marker in line
    # The command line is no guide here: it changes when a launcher execs the server, and reads
    # empty while it does.
    return done != pid


def _signal(pid: int, sig: signal.Signals) -> None:
    try:
        if os.getpgid(pid) == pid:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)
    except ProcessLookupError:
        pass


def stop(pid: int, marker: str, timeout: float = 15.0) -> str:
    """SIGTERM the process (and its group), SIGKILL it after `timeout`; returns what happened."""
    if not is_alive(pid, marker):
        return "not running"
    _signal(pid, signal.SIGTERM)
    if wait_until(lambda: not is_alive(pid, marker), timeout):
        return "stopped"
    _signal(pid, signal.SIGKILL)
    if wait_until(lambda: not is_alive(pid, marker), 5.0):
        return "killed"
    raise StackError(f"process {pid} ({marker}) survived SIGKILL")


def wait_until(condition: Callable[[], bool], timeout: float, interval: float = 0.1) -> bool:
    """Poll `condition` until it holds or `timeout` seconds pass; returns whether it held."""
    deadline = time.monotonic() + timeout
    while True:
        if condition():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def http_ok(url: str, timeout: float = 2.0) -> bool:
    """Whether a GET of `url` answers 200."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return int(response.status) == 200
    except (urllib.error.URLError, OSError):
        return False


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


def free_port() -> int:
    """A port nobody listens on right now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tail(path: Path, lines: int = 40) -> str:
    """The last `lines` lines of a log file, for error messages."""
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return f"(no log at {path})"
    return "\n".join(text.splitlines()[-lines:])

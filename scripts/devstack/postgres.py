"""A throwaway PostgreSQL server on loopback, started from the binaries on the machine.

Used by the test suite and by the local stack. The server keeps its data, socket and log in one
directory; stopping it removes nothing, so a failed run can be inspected.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

SERVICE_USER = "postgres"


def find_bindir() -> Path:
    """The newest PostgreSQL `bin` folder on the machine (or the one holding `pg_ctl` on PATH)."""
    on_path = shutil.which("pg_ctl")
    if on_path:
        return Path(on_path).resolve().parent
    candidates = sorted(
        glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(p.split("/")[-2].split(".")[0])
    )
    if not candidates:
        raise RuntimeError(
            "no PostgreSQL binaries found (looked for pg_ctl and /usr/lib/postgresql)"
        )
    return Path(candidates[-1])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _as_service_user(cmd: list[str]) -> list[str]:
    """initdb and postgres refuse to run as root: drop to the `postgres` account when root."""
    if os.geteuid() != 0:
        return cmd
    return ["runuser", "-u", SERVICE_USER, "--", *cmd]


@dataclass
class PostgresServer:
    datadir: Path
    port: int
    bindir: Path

    @property
    def url(self) -> str:
        return f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/postgres"

    def database_url(self, name: str) -> str:
        return f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/{name}"

    def start(self) -> None:
        if not (self.datadir / "PG_VERSION").exists():
            self.datadir.mkdir(parents=True, exist_ok=True)
            if os.geteuid() == 0:
                shutil.chown(self.datadir, SERVICE_USER, SERVICE_USER)
            subprocess.run(
                _as_service_user(
                    [
                        str(self.bindir / "initdb"),
                        "-D",
                        str(self.datadir),
                        "-U",
                        "postgres",
                        "--auth=trust",
                        "--encoding=UTF8",
                        "--locale=C",
                    ]
                ),
                check=True,
                capture_output=True,
            )
        options = (
            f"-c listen_addresses=127.0.0.1 -c port={self.port} "
            f"-c unix_socket_directories={self.datadir} -c fsync=off "
            "-c max_connections=200 -c shared_buffers=128MB"
        )
        subprocess.run(
            _as_service_user(
                [
                    str(self.bindir / "pg_ctl"),
                    "-D",
                    str(self.datadir),
                    "-l",
                    str(self.datadir / "server.log"),
                    "-o",
                    options,
                    "-w",
                    "-t",
                    "60",
                    "start",
                ]
            ),
            check=True,
            capture_output=True,
        )
        self.wait_ready()

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            probe = subprocess.run(
                [str(self.bindir / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port)],
                capture_output=True,
            )
            if probe.returncode == 0:
                return
            time.sleep(0.1)
        raise RuntimeError(f"PostgreSQL on port {self.port} did not become ready")

    def create_database(self, name: str) -> None:
        subprocess.run(
            [
                str(self.bindir / "createdb"),
                "-h",
                "127.0.0.1",
                "-p",
                str(self.port),
                "-U",
                "postgres",
                name,
            ],
            check=True,
            capture_output=True,
        )

    def stop(self, mode: str = "fast") -> None:
        subprocess.run(
            _as_service_user(
                [str(self.bindir / "pg_ctl"), "-D", str(self.datadir), "-m", mode, "-w", "stop"]
            ),
            capture_output=True,
        )


def start_throwaway(datadir: Path, port: int | None = None) -> PostgresServer:
    """Initialise (if needed) and start a server in `datadir`; the caller stops it."""
    server = PostgresServer(datadir=datadir, port=port or free_port(), bindir=find_bindir())
    server.start()
    return server

"""The local stack: PostgreSQL, Synapse, the sidecar and nginx, all on loopback.

    scripts/stack up [--dir DIR] [--client-port N] ...   start everything, print the URLs
    scripts/stack up --monitoring      also Prometheus, scraping the sidecar with the shipped rules
    scripts/stack status | down | register USER

`up` prints one `NAME=value` line each for CLIENT_URL, HOMESERVER_URL, SIDECAR_URL and
REGISTRATION_SHARED_SECRET on stdout (so `eval "$(scripts/stack up)"` works); progress goes to
stderr and each process logs into its own folder under DIR. DIR/stack.json records what was
started, and `down` stops exactly that. Every `up` starts from empty databases.

Tests use the same code through `Stack.up(dir, ports)` and `stack.down()`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TextIO

from devstack import matrix, nginx, procs, prometheus, synapse
from devstack.postgres import PostgresServer, find_bindir, start_throwaway
from devstack.procs import StackError

REPO = Path(__file__).resolve().parents[2]
SIDECAR_PYTHON = REPO / ".venv" / "bin" / "python"
SIDECAR_MARKER = "-m app serve"
POSTGRES_MARKER = "postgres"
DATABASE = "sidecar"
STATE_FILE = "stack.json"
STOP_ORDER = ("prometheus", "nginx", "sidecar", "synapse", "postgres")
PORT_NAMES = ("client", "homeserver", "sidecar", "postgres", "prometheus")


@dataclass(frozen=True)
class Ports:
    """Loopback ports of the stack's servers (Prometheus's only used with monitoring)."""

    client: int = 8080
    homeserver: int = 8008
    sidecar: int = 8009
    postgres: int = 54329
    prometheus: int = 9090

    @classmethod
    def from_env(cls) -> Ports:
        """Defaults, overridden by STACK_CLIENT_PORT, STACK_HOMESERVER_PORT, ... when set."""
        defaults = cls()
        return cls(
            **{
                name: int(os.environ.get(f"STACK_{name.upper()}_PORT", getattr(defaults, name)))
                for name in PORT_NAMES
            }
        )

    @classmethod
    def free(cls) -> Ports:
        """Ports nobody listens on right now."""
        chosen: set[int] = set()
        while len(chosen) < len(PORT_NAMES):
            chosen.add(procs.free_port())
        return cls(**dict(zip(PORT_NAMES, sorted(chosen), strict=True)))


@dataclass
class Process:
    pid: int
    marker: str

    def alive(self) -> bool:
        return procs.is_alive(self.pid, self.marker)


@dataclass
class Stack:
    """One running (or stopped) stack, as recorded in DIR/stack.json."""

    dir: Path
    ports: Ports
    registration_shared_secret: str = ""
    processes: dict[str, Process] = field(default_factory=dict)
    # Application-service mode: Synapse loads the sidecar's registration and the sidecar sends
    # with its token. The token is only held while starting.
    appservice: bool = False
    appservice_token: str | None = field(default=None, repr=False)
    # A homeserver of the user's own (plain HTTP, e.g. http://127.0.0.1:8008) instead of a
    # local Synapse.
    external_homeserver: str | None = None
    # Prometheus too, scraping the sidecar with deploy/prometheus/alerts.yml.
    monitoring: bool = False
    # The processes this `up` started, by name: their exit status says whether they still run.
    children: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict, repr=False)

    @property
    def client_url(self) -> str:
        return f"http://127.0.0.1:{self.ports.client}"

    @property
    def homeserver_url(self) -> str:
        if self.external_homeserver is not None:
            return self.external_homeserver
        return f"http://127.0.0.1:{self.ports.homeserver}"

    @property
    def sidecar_url(self) -> str:
        return f"http://127.0.0.1:{self.ports.sidecar}"

    @property
    def prometheus_url(self) -> str:
        return f"http://127.0.0.1:{self.ports.prometheus}"

    @property
    def synapse_log(self) -> Path:
        return self.dir / "synapse" / "homeserver.log"

    @property
    def sidecar_log(self) -> Path:
        return self.dir / "sidecar" / "sidecar.log"

    @property
    def nginx_config(self) -> nginx.NginxConfig:
        return nginx.NginxConfig(prefix=self.dir / "nginx", listen_port=self.ports.client)

    def env_lines(self) -> list[str]:
        return [
            f"CLIENT_URL={self.client_url}",
            f"HOMESERVER_URL={self.homeserver_url}",
            f"SIDECAR_URL={self.sidecar_url}",
            f"REGISTRATION_SHARED_SECRET={self.registration_shared_secret}",
            *([f"PROMETHEUS_URL={self.prometheus_url}"] if self.monitoring else []),
        ]

    def running(self) -> dict[str, bool]:
        return {name: proc.alive() for name, proc in self.processes.items()}

    def register(self, username: str, password: str, admin: bool = False) -> matrix.Account:
        """A new account on the stack's homeserver, logged in on a first device."""
        return matrix.register(
            self.homeserver_url, self.registration_shared_secret, username, password, admin
        )

    # -- state file -------------------------------------------------------------------------

    def save(self) -> None:
        data = {
            "ports": asdict(self.ports),
            "registration_shared_secret": self.registration_shared_secret,
            "external_homeserver": self.external_homeserver,
            "monitoring": self.monitoring,
            "processes": {name: asdict(proc) for name, proc in self.processes.items()},
        }
        path = self.dir / STATE_FILE
        path.write_text(json.dumps(data, indent=2) + "\n")
        path.chmod(0o600)

    @classmethod
    def load(cls, directory: Path) -> Stack | None:
        path = directory / STATE_FILE
        if not path.exists():
            return None
        data = json.loads(path.read_text())
        return cls(
            dir=directory,
            ports=Ports(**data["ports"]),
            registration_shared_secret=data["registration_shared_secret"],
            external_homeserver=data.get("external_homeserver"),
            monitoring=bool(data.get("monitoring", False)),
            processes={name: Process(**proc) for name, proc in data["processes"].items()},
        )

    # -- lifecycle ---------------------------------------------------------------------------

    @classmethod
    def up(
        cls,
        directory: Path,
        ports: Ports | None = None,
        log: TextIO = sys.stderr,
        *,
        appservice: bool = False,
        homeserver_url: str | None = None,
        monitoring: bool = False,
    ) -> Stack:
        """Start everything in `directory` and wait until it answers; stop it all on failure."""
        directory = directory.resolve()
        directory.mkdir(parents=True, exist_ok=True)
        existing = cls.load(directory)
        if existing is not None and any(existing.running().values()):
            raise AlreadyRunning(existing)
        external = _plain_http(homeserver_url) if homeserver_url else None
        if external is not None and appservice:
            raise StackError("--appservice needs the local Synapse (it loads the registration)")
        stack = cls(
            dir=directory,
            ports=ports or Ports.from_env(),
            appservice=appservice,
            external_homeserver=external,
            monitoring=monitoring,
        )
        needed = asdict(stack.ports)
        if external is not None:
            del needed["homeserver"]
        if not monitoring:
            del needed["prometheus"]
        taken = [str(p) for p in needed.values() if not procs.port_is_free(p)]
        if taken:
            raise StackError(f"port(s) already in use on 127.0.0.1: {', '.join(taken)}")
        stack._fresh_dirs()
        try:
            stack._start_postgres(log)
            if external is None:
                stack._start_synapse(log)
            stack._start_sidecar(log)
            stack._start_nginx(log)
            if monitoring:
                stack._start_prometheus(log)
        except BaseException:
            print("start-up failed; stopping what was started", file=log)
            stack.down(log)
            raise
        return stack

    def _fresh_dirs(self) -> None:
        for name in ("postgres", "synapse", "sidecar", "nginx", "prometheus"):
            shutil.rmtree(self.dir / name, ignore_errors=True)
        (self.dir / STATE_FILE).unlink(missing_ok=True)
        if os.geteuid() == 0:
            # PostgreSQL runs as its own account and must be able to reach its data folder.
            self.dir.chmod(0o755)

    def _record(
        self, name: str, pid: int, marker: str, child: subprocess.Popen[bytes] | None = None
    ) -> None:
        self.processes[name] = Process(pid=pid, marker=marker)
        if child is not None:
            self.children[name] = child
        self.save()

    def _start_postgres(self, log: TextIO) -> None:
        print(f"starting PostgreSQL on 127.0.0.1:{self.ports.postgres}", file=log)
        datadir = self.dir / "postgres"
        try:
            server = start_throwaway(datadir, self.ports.postgres)
        except subprocess.CalledProcessError as exc:
            details = (exc.stderr or b"").decode(errors="replace")
            raise StackError(
                f"PostgreSQL did not start: {details}\n{procs.tail(datadir / 'server.log')}"
            ) from None
        pid = int((datadir / "postmaster.pid").read_text().split()[0])
        self._record("postgres", pid, POSTGRES_MARKER)
        server.create_database(DATABASE)

    def _start_synapse(self, log: TextIO) -> None:
        print(f"starting Synapse on {self.homeserver_url}", file=log)
        extra: dict[str, object] = {}
        if self.appservice:
            registration = (self.dir / "synapse" / "msc4140-appservice.yaml").resolve()
            registration.parent.mkdir(parents=True, exist_ok=True)
            self.sidecar_log.parent.mkdir(parents=True, exist_ok=True)
            printed = self._sidecar_run(
                [
                    "appservice-registration",
                    "--server-name",
                    "localhost",
                    "--output",
                    str(registration),
                ],
                self._sidecar_env(),
            )
            self.appservice_token = printed.strip().removeprefix("SIDECAR_APPSERVICE_TOKEN=")
            extra["app_service_config_files"] = [str(registration)]
        config = synapse.configure(self.dir / "synapse", self.ports.homeserver, extra)
        self.registration_shared_secret = config.registration_shared_secret
        process = synapse.start(config)
        self._record("synapse", process.pid, synapse.MARKER, process)
        self._wait("synapse", f"{self.homeserver_url}/health", 180.0, config.root / "synapse.out")

    def _start_sidecar(self, log: TextIO) -> None:
        print(f"starting the sidecar on {self.sidecar_url}", file=log)
        root = self.dir / "sidecar"
        root.mkdir(parents=True, exist_ok=True)
        env = self._sidecar_env()
        key = self._sidecar_run(["gen-key"], env).strip()
        env["SIDECAR_TOKEN_KEYS"] = key
        self._sidecar_run(["migrate"], env)
        process = procs.spawn(
            [str(SIDECAR_PYTHON), "-m", "app", "serve"], self.sidecar_log, env=env, cwd=REPO
        )
        self._record("sidecar", process.pid, SIDECAR_MARKER, process)
        self._wait("sidecar", f"{self.sidecar_url}/ready", 60.0, self.sidecar_log)

    def _sidecar_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        env.update(
            SIDECAR_DATABASE_URL=f"postgresql://postgres@127.0.0.1:{self.ports.postgres}/{DATABASE}",
            SIDECAR_HOMESERVER_URL=self.homeserver_url,
            SIDECAR_LISTEN_HOST="127.0.0.1",
            SIDECAR_LISTEN_PORT=str(self.ports.sidecar),
        )
        if self.appservice_token is not None:
            env["SIDECAR_APPSERVICE_TOKEN"] = self.appservice_token
        return env

    def _sidecar_run(self, args: list[str], env: dict[str, str]) -> str:
        result = subprocess.run(
            [str(SIDECAR_PYTHON), "-m", "app", *args],
            env=env,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
        )
        with open(self.sidecar_log, "a") as out:
            out.write(f"$ python -m app {' '.join(args)}\n{result.stderr}")
        if result.returncode != 0:
            raise StackError(
                f"`python -m app {' '.join(args)}` failed (exit {result.returncode}):\n"
                f"{result.stdout}{result.stderr}"
            )
        return result.stdout

    def _start_nginx(self, log: TextIO) -> None:
        print(f"starting nginx on {self.client_url}", file=log)
        homeserver: int | str = self.ports.homeserver
        if self.external_homeserver is not None:
            homeserver = self.external_homeserver.removeprefix("http://")
        config = nginx.render(self.dir / "nginx", self.ports.client, homeserver, self.ports.sidecar)
        process = nginx.start(config)
        self._record("nginx", process.pid, nginx.MARKER, process)
        self._wait("nginx", f"{self.client_url}/_matrix/client/versions", 30.0, config.error_log)

    def _start_prometheus(self, log: TextIO) -> None:
        print(f"starting Prometheus on {self.prometheus_url}", file=log)
        config = prometheus.configure(
            self.dir / "prometheus", self.ports.prometheus, self.ports.sidecar
        )
        process = prometheus.start(config)
        self._record("prometheus", process.pid, prometheus.MARKER, process)
        self._wait("prometheus", f"{self.prometheus_url}/-/ready", 60.0, config.log)

    def _wait(self, name: str, url: str, timeout: float, log_path: Path) -> None:
        process = self.processes[name]
        child = self.children.get(name)

        def exited() -> str | None:
            """How it ended, if it has. A process started here has exited only once it has an
            exit status; what /proc shows of it (its command line) can be empty or another
            program's for a while although it runs, e.g. while a launcher execs the server."""
            if child is not None:
                code = child.poll()
                return None if code is None else f"exit status {code}"
            return None if process.alive() else "no longer running"

        def answered() -> bool:
            if procs.http_ok(url):
                return True
            how = exited()
            if how is not None:
                raise StackError(
                    f"{name} exited during start-up ({how}); last lines of {log_path}:\n"
                    f"{procs.tail(log_path)}"
                )
            return False

        if not procs.wait_until(answered, timeout, interval=0.25):
            raise StackError(
                f"{name} did not answer {url} within {timeout:.0f}s; last lines of {log_path}:\n"
                f"{procs.tail(log_path)}"
            )

    def down(self, log: TextIO = sys.stderr) -> None:
        """Stop every recorded process, newest first: SIGTERM, then SIGKILL after a timeout."""
        for name in STOP_ORDER:
            process = self.processes.get(name)
            if process is None:
                continue
            if name == "postgres" and process.alive():
                # pg_ctl's fast shutdown first: it lets the server finish cleanly.
                PostgresServer(
                    datadir=self.dir / "postgres", port=self.ports.postgres, bindir=find_bindir()
                ).stop()
                outcome = procs.stop(process.pid, process.marker)
                outcome = "stopped" if outcome == "not running" else outcome
            else:
                outcome = procs.stop(process.pid, process.marker)
            print(f"{name} (pid {process.pid}): {outcome}", file=log)
        self.processes.clear()
        self.children.clear()
        (self.dir / STATE_FILE).unlink(missing_ok=True)


def _plain_http(url: str) -> str:
    """A homeserver URL nginx and the sidecar can both use: http://host:port, nothing after."""
    url = url.rstrip("/")
    host_port = url.removeprefix("http://")
    if not url.startswith("http://") or "/" in host_port or ":" not in host_port:
        raise StackError(
            f"--homeserver-url must look like http://HOST:PORT (the homeserver's plain-HTTP "
            f"client listener), not {url!r}"
        )
    return url


class AlreadyRunning(StackError):
    def __init__(self, stack: Stack) -> None:
        super().__init__(f"a stack is already running in {stack.dir} (scripts/stack down stops it)")
        self.stack = stack


# -- command line ----------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    dir_help = "state folder (default: .stack in the repository, or $STACK_DIR)"
    parser = argparse.ArgumentParser(prog="scripts/stack", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--dir",
        type=Path,
        default=Path(os.environ.get("STACK_DIR", REPO / ".stack")),
        help=dir_help,
    )
    # --dir is accepted after the command as well; there it overrides the one before.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--dir", type=Path, default=argparse.SUPPRESS, help=dir_help)
    commands = parser.add_subparsers(dest="command", required=True)
    up = commands.add_parser("up", parents=[common], help="start the stack and print its URLs")
    defaults = Ports.from_env()
    for name in PORT_NAMES:
        up.add_argument(
            f"--{name}-port",
            type=int,
            default=getattr(defaults, name),
            help=f"default {getattr(defaults, name)} (or $STACK_{name.upper()}_PORT)",
        )
    up.add_argument(
        "--homeserver-url",
        default=os.environ.get("STACK_HOMESERVER_URL"),
        help="use this homeserver (http://HOST:PORT) instead of starting a local Synapse",
    )
    up.add_argument(
        "--appservice",
        action="store_true",
        help="application-service mode: Synapse loads the sidecar's registration",
    )
    up.add_argument(
        "--monitoring",
        action="store_true",
        help="also start Prometheus, scraping the sidecar with deploy/prometheus/alerts.yml",
    )
    commands.add_parser("down", parents=[common], help="stop what `up` started")
    commands.add_parser("status", parents=[common], help="show what runs and the URLs")
    register = commands.add_parser(
        "register", parents=[common], help="create a user; prints USER_ID, ACCESS_TOKEN, DEVICE_ID"
    )
    register.add_argument("username")
    register.add_argument("--password", default=None, help="default: the user name")
    register.add_argument("--admin", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    directory: Path = args.dir.resolve()
    try:
        if args.command == "up":
            ports = Ports(**{name: getattr(args, f"{name}_port") for name in PORT_NAMES})
            stack = Stack.up(
                directory,
                ports,
                appservice=args.appservice,
                homeserver_url=args.homeserver_url,
                monitoring=args.monitoring,
            )
            print("\n".join(stack.env_lines()))
            print(
                f"stack is up; logs under {directory}; `scripts/stack down` stops it",
                file=sys.stderr,
            )
            return 0
        existing = Stack.load(directory)
        if existing is None:
            print(f"no stack recorded in {directory}", file=sys.stderr)
            return 0 if args.command == "down" else 1
        if args.command == "down":
            existing.down()
            print(f"stack in {directory} is down", file=sys.stderr)
            return 0
        if args.command == "status":
            states = existing.running()
            for name, alive in states.items():
                pid = existing.processes[name].pid
                print(
                    f"{name}: {'running' if alive else 'NOT running'} (pid {pid})", file=sys.stderr
                )
            print("\n".join(existing.env_lines()))
            return 0 if states and all(states.values()) else 1
        account = existing.register(args.username, args.password or args.username, args.admin)
        print(f"USER_ID={account.user_id}")
        print(f"ACCESS_TOKEN={account.access_token}")
        print(f"DEVICE_ID={account.device_id}")
        return 0
    except AlreadyRunning as exc:
        print(f"scripts/stack: {exc}", file=sys.stderr)
        print("\n".join(exc.stack.env_lines()))
        return 1
    except (StackError, matrix.MatrixError) as exc:
        print(f"scripts/stack: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

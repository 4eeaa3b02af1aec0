"""nginx for the local stack: the deployed routing snippets inside a loopback-only vhost.

The full configuration is rendered from `deploy/nginx/stack.conf.template`, which includes
`deploy/nginx/sidecar-map.conf` and `sidecar-locations.conf` unchanged, so the stack exercises the
very files operators install. Everything nginx writes (pid, logs, temp files) stays in its folder.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from devstack.procs import StackError, spawn

REPO = Path(__file__).resolve().parents[2]
DEPLOY_DIR = REPO / "deploy" / "nginx"
TEMPLATE = DEPLOY_DIR / "stack.conf.template"
MARKER = "nginx"


def find_nginx() -> str:
    """The nginx binary (PATH, then Debian's location)."""
    found = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else "")
    if not found:
        raise StackError("nginx is not installed (scripts/setup nginx installs it)")
    return found


@dataclass(frozen=True)
class NginxConfig:
    """A rendered configuration and the folder that holds everything it writes."""

    prefix: Path
    listen_port: int

    @property
    def conf(self) -> Path:
        return self.prefix / "nginx.conf"

    @property
    def error_log(self) -> Path:
        return self.prefix / "error.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.listen_port}"

    def command(self, *extra: str) -> list[str]:
        # -e: the error log to use before the configuration is read (else /var/log/nginx).
        return [
            find_nginx(),
            "-p",
            str(self.prefix),
            "-e",
            str(self.error_log),
            "-c",
            str(self.conf),
            *extra,
        ]


def render(prefix: Path, listen_port: int, homeserver: int | str, sidecar_port: int) -> NginxConfig:
    """Write `prefix/nginx.conf` for a vhost on 127.0.0.1:`listen_port`; `homeserver` is a port
    on loopback or a `host:port`."""
    prefix = prefix.resolve()
    for sub in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (prefix / "tmp" / sub).mkdir(parents=True, exist_ok=True)
    # As root the master would hand its workers to `nobody`; keep them with the current user.
    user = ""
    if os.geteuid() == 0:
        user = f"user {pwd.getpwuid(os.geteuid()).pw_name};"
    text = TEMPLATE.read_text()
    for name, value in {
        "USER_DIRECTIVE": user,
        "PREFIX": str(prefix),
        "DEPLOY_DIR": str(DEPLOY_DIR),
        "LISTEN_PORT": str(listen_port),
        "HOMESERVER_ADDRESS": homeserver
        if isinstance(homeserver, str)
        else f"127.0.0.1:{homeserver}",
        "SIDECAR_PORT": str(sidecar_port),
    }.items():
        text = text.replace(f"@{name}@", value)
    config = NginxConfig(prefix=prefix, listen_port=listen_port)
    config.conf.write_text(text)
    return config


def check(config: NginxConfig) -> subprocess.CompletedProcess[str]:
    """`nginx -t` on the rendered configuration (output in `.stderr`)."""
    return subprocess.run(config.command("-t"), capture_output=True, text=True)


def start(config: NginxConfig) -> subprocess.Popen[bytes]:
    """Run nginx in the foreground of its own session (`daemon off` in the template)."""
    result = check(config)
    if result.returncode != 0:
        raise StackError(f"nginx rejected {config.conf}:\n{result.stderr}")
    return spawn(config.command(), config.prefix / "nginx.out")

"""A throwaway Synapse for the local stack: SQLite, server name `localhost`, loopback only.

MSC4140 stays off (no `max_event_delay_duration`), so every delayed event the stack shows is the
sidecar's work. Registration is closed except through the shared secret; rate limits are high
enough for tests that create many users, rooms and events quickly.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import subprocess
from dataclasses import dataclass
from pathlib import Path

from devstack.procs import spawn

REPO = Path(__file__).resolve().parents[2]
VENV_PYTHON = REPO / ".venv-synapse" / "bin" / "python"
SERVER_NAME = "localhost"
MARKER = "synapse.app.homeserver"

_GENEROUS = {"per_second": 1000, "burst_count": 10000}


@dataclass(frozen=True)
class SynapseConfig:
    """The files of one homeserver instance, all under `root`."""

    root: Path
    port: int
    registration_shared_secret: str

    @property
    def config_path(self) -> Path:
        return self.root / "homeserver.yaml"

    @property
    def log_path(self) -> Path:
        """Synapse's own log, access log included (one line per request, raw URI)."""
        return self.root / "homeserver.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def _signing_key() -> str:
    # Synapse's format: algorithm, key version, unpadded base64 of the 32-byte ed25519 seed.
    seed = base64.b64encode(secrets.token_bytes(32)).decode().rstrip("=")
    return f"ed25519 a_{secrets.token_hex(2)} {seed}\n"


def _homeserver_yaml(root: Path, port: int, shared_secret: str) -> dict[str, object]:
    return {
        "server_name": SERVER_NAME,
        "public_baseurl": f"http://127.0.0.1:{port}/",
        "pid_file": str(root / "homeserver.pid"),
        "listeners": [
            {
                "port": port,
                "bind_addresses": ["127.0.0.1"],
                "type": "http",
                "tls": False,
                "x_forwarded": True,
                "resources": [{"names": ["client"], "compress": False}],
            }
        ],
        "database": {"name": "sqlite3", "args": {"database": str(root / "homeserver.db")}},
        "log_config": str(root / "log.config"),
        "media_store_path": str(root / "media_store"),
        "signing_key_path": str(root / "signing.key"),
        "registration_shared_secret": shared_secret,
        "enable_registration": False,
        "report_stats": False,
        "macaroon_secret_key": secrets.token_urlsafe(32),
        "form_secret": secrets.token_urlsafe(32),
        "trusted_key_servers": [],
        "suppress_key_server_warning": True,
        "federation_domain_whitelist": [],
        "presence": {"enabled": False},
        "rc_message": _GENEROUS,
        "rc_registration": _GENEROUS,
        "rc_login": {"address": _GENEROUS, "account": _GENEROUS, "failed_attempts": _GENEROUS},
        "rc_joins": {"local": _GENEROUS, "remote": _GENEROUS},
        "rc_joins_per_room": _GENEROUS,
        "rc_invites": {"per_room": _GENEROUS, "per_user": _GENEROUS, "per_issuer": _GENEROUS},
        "rc_room_creation": _GENEROUS,
        "rc_admin_redaction": _GENEROUS,
    }


def _log_config(log_path: Path) -> dict[str, object]:
    return {
        "version": 1,
        "formatters": {
            "precise": {
                "format": "%(asctime)s - %(name)s - %(lineno)d - %(levelname)s - %(request)s - "
                "%(message)s"
            }
        },
        "handlers": {
            "file": {
                "class": "logging.FileHandler",
                "formatter": "precise",
                "filename": str(log_path),
                "encoding": "utf8",
            }
        },
        "loggers": {"synapse.storage.SQL": {"level": "WARNING"}},
        "root": {"level": "INFO", "handlers": ["file"]},
        "disable_existing_loggers": False,
    }


def configure(root: Path, port: int, extra: dict[str, object] | None = None) -> SynapseConfig:
    """Write a fresh homeserver configuration (YAML is a superset of JSON) into `root`."""
    root = root.resolve()
    (root / "media_store").mkdir(parents=True, exist_ok=True)
    config = SynapseConfig(
        root=root, port=port, registration_shared_secret=secrets.token_urlsafe(32)
    )
    signing_key = root / "signing.key"
    if not signing_key.exists():
        signing_key.write_text(_signing_key())
        signing_key.chmod(0o600)
    homeserver = _homeserver_yaml(root, port, config.registration_shared_secret)
    homeserver.update(extra or {})
    config.config_path.write_text(json.dumps(homeserver, indent=2) + "\n")
    config.config_path.chmod(0o600)
    (root / "log.config").write_text(json.dumps(_log_config(config.log_path), indent=2) + "\n")
    return config


def start(config: SynapseConfig) -> subprocess.Popen[bytes]:
    """Run the homeserver in the foreground of its own session; stdout/stderr to `synapse.out`."""
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    return spawn(
        [str(VENV_PYTHON), "-m", MARKER, "--config-path", str(config.config_path)],
        config.root / "synapse.out",
        env=env,
        cwd=config.root,
    )

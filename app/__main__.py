"""Command line: `python -m app serve | migrate | gen-key | check-config |
appservice-registration --server-name NAME [--output FILE] | admin ...`, or `--version`."""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import math
import signal
import sys
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from app.settings import Settings, SettingsError, load_database_settings, load_settings
from app.version import DISTRIBUTION, version

if TYPE_CHECKING:
    import uvicorn
    from fastapi import FastAPI

ROOT = Path(__file__).resolve().parent.parent


def migrate(database_url: str) -> None:
    """Bring the schema up to date (Alembic `upgrade head`). The migrations sit beside the `app`
    package, in a checkout and in an installed wheel alike."""
    from alembic import command
    from alembic.config import Config

    scripts = ROOT / "migrations"
    if not (scripts / "env.py").is_file():
        raise SystemExit(f"migrations not found in {scripts}")
    config = Config()
    config.set_main_option("script_location", str(scripts))
    config.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    config.set_main_option("path_separator", "os")
    config.attributes["configure_logging"] = False
    command.upgrade(config, "head")


def configure_logging(settings: Settings) -> None:
    """Log as the settings say (level and text or JSON format) to standard error."""
    from app import logs

    logs.configure(settings.log_level, settings.log_format, sys.stderr)


def serve(settings: Settings) -> None:
    """Serve until SIGTERM or SIGINT. SIGTERM starts the drain at once (`app.main.Drain`: `/ready`
    answers 503, nothing more is claimed, claims not at the homeserver are given back), goes on
    serving for `SIDECAR_DRAIN_SECONDS` so that load balancers see the 503 and send requests
    elsewhere, then stops accepting connections; requests still open get as long as the drain
    (`server_config`), and the lifespan's end waits for the drain before it gives up the replica
    lock. A second SIGTERM, or SIGINT, skips the wait."""
    import uvicorn

    from app.main import Drain, create_app

    configure_logging(settings)
    log = logging.getLogger(__name__)
    log.info("%s %s starting", DISTRIBUTION, version())
    app = create_app(settings)
    drain: Drain = app.state.drain

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            if sig != signal.SIGTERM or drain.started:
                super().handle_exit(sig, frame)
                return
            try:
                loop = asyncio.get_running_loop()
                drain.start()
            except RuntimeError:  # not serving yet: nothing to drain
                super().handle_exit(sig, frame)
                return
            log.info("SIGTERM: draining; serving %.1f s more", settings.drain_seconds)
            loop.call_later(settings.drain_seconds, super().handle_exit, sig, frame)

    config = server_config(app, settings)
    # What start-up built lives as long as the process: keep it out of the collector's full
    # passes, which otherwise walk it all again and again under load.
    gc.freeze()
    server = Server(config)
    server.run()
    if not server.started:
        sys.exit(3)  # as uvicorn.run: start-up failed


def server_config(app: FastAPI, settings: Settings) -> uvicorn.Config:
    """uvicorn's configuration. Requests still open when it stops accepting connections (a send
    action among them) get as long as the drain does (`app.main.shutdown_seconds`)."""
    import uvicorn

    from app.api.middleware import http_protocol
    from app.main import shutdown_seconds

    return uvicorn.Config(
        app,
        host=settings.listen_host,
        port=settings.listen_port,
        log_level=settings.log_level.lower(),
        # Logging is configured above (text or JSON); uvicorn's lines go through it too.
        log_config=None,
        access_log=False,
        proxy_headers=True,
        server_header=False,
        http=http_protocol(),
        timeout_graceful_shutdown=math.ceil(shutdown_seconds(settings)),
    )


def main(argv: list[str] | None = None) -> int:
    given = sys.argv[1:] if argv is None else argv
    if given[:1] == ["admin"]:
        # The operators' commands (app/admin_cli.py): the database setting alone.
        from app.admin_cli import main as admin_main

        return admin_main(given[1:])
    parser = argparse.ArgumentParser(prog="python -m app", description=__doc__)
    parser.add_argument("--version", action="version", version=f"{DISTRIBUTION} {version()}")
    parser.add_argument(
        "command",
        choices=["serve", "migrate", "gen-key", "check-config", "appservice-registration"],
    )
    parser.add_argument("--server-name", help="appservice-registration: the homeserver's name")
    parser.add_argument(
        "--output",
        default="msc4140-appservice.yaml",
        help="appservice-registration: where to write the file",
    )
    args = parser.parse_args(argv)
    if args.command == "appservice-registration":
        if not args.server_name:
            parser.error("appservice-registration needs --server-name")
        from app.appservice import write_registration

        as_token = write_registration(Path(args.output), args.server_name)
        print(f"wrote {args.output}; give the sidecar:", file=sys.stderr)  # noqa: T201
        print(f"SIDECAR_APPSERVICE_TOKEN={as_token}")  # noqa: T201
        return 0
    if args.command == "gen-key":
        from app.crypto import new_key

        print(new_key())  # noqa: T201
        return 0
    try:
        if args.command == "migrate":
            # An init container or a one-off job needs the database URL and nothing else.
            migrate(load_database_settings().database_url)
            return 0
        settings = load_settings()
    except SettingsError as exc:
        print(exc, file=sys.stderr)  # noqa: T201
        return 2
    if args.command == "check-config":
        print("settings are valid")  # noqa: T201
    else:
        serve(settings)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The container image builds and runs, checked without a Docker engine.

The Dockerfile's build stage is replayed on this machine: a fresh folder stands in for the image's
file system, each COPY brings exactly what the build context holds (after .dockerignore) and each
RUN runs with the image's absolute paths moved into that folder. What the runtime stage takes from
the build stage, the virtualenv, must then migrate an empty database and serve `/ready` on its
own, from a working directory outside the checkout and without the checkout on any path.

Two liberties keep it quick, neither touching what is built: pip keeps its cache (the image
turns it off to stay small), and the dependencies are pinned to the versions this checkout's
virtualenv already has, so they come from that cache.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import tomllib
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from devstack.postgres import PostgresServer, start_throwaway
from devstack.procs import free_port, tail, wait_until

from tests.unit.test_deploy_files import dockerfile_instructions, dockerignore_patterns, ignored

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
# The image's own folders that RUN lines name; they are moved under the stand-in root.
IMAGE_DIRS = ("/opt", "/tmp", "/src", "/srv")
READY_TIMEOUT = 60.0

Instruction = tuple[str, str]


def stages(pairs: list[Instruction]) -> dict[str, list[Instruction]]:
    """The Dockerfile's stages by name (`FROM … AS name`), each with its instructions."""
    named: dict[str, list[Instruction]] = {}
    current: list[Instruction] = []
    for word, args in pairs:
        if word == "FROM":
            current = []
            named[args.split()[-1] if " AS " in args.upper() else str(len(named))] = current
        current.append((word, args))
    return named


def in_image(root: Path, path: str, workdir: str) -> Path:
    absolute = path if path.startswith("/") else f"{workdir.rstrip('/')}/{path}"
    return root / absolute.lstrip("/")


def copy_from_context(args: str, root: Path, workdir: str, patterns: list[str]) -> None:
    """One `COPY src… dest` from the repository as the build context, like Docker does it: a
    folder's contents land in dest, a file lands in dest (or in it when dest ends in /), and
    whatever .dockerignore leaves out is not there to copy."""
    parts = [p for p in args.split() if not p.startswith("--")]
    sources, dest = parts[:-1], parts[-1]
    target = in_image(root, dest, workdir)
    for source in sources:
        source = source.rstrip("/")
        if ignored(source, patterns) or not (ROOT / source).exists():
            raise AssertionError(f"COPY {source}: not in the build context")
        origin = ROOT / source
        if origin.is_file():
            into = target / origin.name if dest.endswith("/") else target
            into.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(origin, into)
            continue
        for file in sorted(origin.rglob("*")):
            relative = file.relative_to(ROOT).as_posix()
            if file.is_file() and not ignored(relative, patterns):
                into = target / file.relative_to(origin)
                into.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(file, into)


def moved(command: str, root: Path) -> str:
    pattern = "|".join(re.escape(d) for d in IMAGE_DIRS)
    return re.sub(rf"(?<![\w./-])({pattern})(?=/|\s|$)", lambda m: f"{root}{m.group(1)}", command)


def pinned_versions(path: Path) -> None:
    """Constraints: every distribution of this virtualenv at its installed version; the project
    itself and the packaging tools (which the build picks for itself) left out."""
    left_out = {PROJECT["name"], "pip", "setuptools", "wheel"}
    lines = {
        f"{dist.metadata['Name']}=={dist.version}"
        for dist in importlib.metadata.distributions()
        if dist.metadata["Name"] and dist.metadata["Name"].lower() not in left_out
    }
    path.write_text("\n".join(sorted(lines)) + "\n")


def build(root: Path, stage: list[Instruction], log: Path) -> None:
    """Replay one build stage: ENV, WORKDIR, COPY from the context, RUN."""
    patterns = dockerignore_patterns(DOCKERIGNORE.read_text())
    root.mkdir(parents=True, exist_ok=True)
    constraints = root.parent / "constraints.txt"
    pinned_versions(constraints)
    env = {
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "HOME": os.environ.get("HOME", str(root)),
        "PIP_CONSTRAINT": str(constraints),
    }
    for name in ("PIP_FIND_LINKS", "PIP_CERT", "PIP_DEFAULT_TIMEOUT", "PIP_INDEX_URL"):
        if name in os.environ:
            env[name] = os.environ[name]
    workdir = "/"
    for word, args in stage:
        if word == "ENV":
            for name, value in re.findall(r"(\w+)=(\S+)", args):
                if name != "PIP_NO_CACHE_DIR":
                    env[name] = moved(value, root)
        elif word == "WORKDIR":
            workdir = args
            in_image(root, args, "/").mkdir(parents=True, exist_ok=True)
        elif word == "COPY":
            assert "--from=" not in args, "the build stage copies only from the context"
            copy_from_context(args, root, workdir, patterns)
        elif word == "RUN":
            with log.open("a") as out:
                out.write(f"== RUN {args}\n")
                out.flush()
                done = subprocess.run(
                    ["/bin/sh", "-c", moved(args, root)],
                    cwd=in_image(root, workdir, "/"),
                    env=env,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                )
            assert done.returncode == 0, f"RUN {args}\n{tail(log)}"


@pytest.fixture
def empty_database() -> Iterator[str]:
    """A database no migration has touched yet, on a throwaway server."""
    with tempfile.TemporaryDirectory(prefix="sidecar-pg-") as tmp:
        os.chmod(tmp, 0o755)  # the server may run as the postgres user
        server: PostgresServer = start_throwaway(Path(tmp) / "data")
        try:
            server.create_database("image_build")
            yield server.database_url("image_build")
        finally:
            server.stop()


def test_the_image_builds_migrates_and_serves(tmp_path: Path, empty_database: str) -> None:
    named = stages(dockerfile_instructions(DOCKERFILE.read_text()))
    assert set(named) >= {"build", "runtime"}, f"stages: {sorted(named)}"

    image = tmp_path / "image"
    log = tmp_path / "build.log"
    build(image, named["build"], log)
    python = image / "opt/sidecar/bin/python"
    assert python.is_file(), "the build stage made no virtualenv at /opt/sidecar"
    # The runtime stage takes the virtualenv from the build stage and nothing else from the
    # repository: what runs below is what the image runs.
    runtime_copies = [args for word, args in named["runtime"] if word == "COPY"]
    assert runtime_copies == ["--from=build /opt/sidecar /opt/sidecar"], runtime_copies
    entry = [args for word, args in named["runtime"] if word == "ENTRYPOINT"]
    assert entry == ['["python", "-m", "app"]'], entry

    # From here on: the virtualenv alone, run from an empty folder with a clean environment.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    base_env = {"PATH": f"{python.parent}:/usr/bin:/bin", "HOME": str(elsewhere)}

    def run(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(python), *args],
            cwd=elsewhere,
            env={**base_env, **env},
            capture_output=True,
            text=True,
            timeout=120,
        )

    where = run("-c", "import app, migrations; print(app.__file__, *migrations.__path__)")
    assert where.returncode == 0, where.stderr
    for line in where.stdout.split():
        assert Path(line).is_relative_to(image / "opt/sidecar"), line

    version = run("-m", "app", "--version")
    assert version.returncode == 0, version.stderr
    assert version.stdout.strip().endswith(PROJECT["version"]), version.stdout

    # An init container knows the database and nothing else.
    migrated = run("-m", "app", "migrate", SIDECAR_DATABASE_URL=empty_database)
    assert migrated.returncode == 0, migrated.stderr[-3000:]

    key = run("-m", "app", "gen-key")
    assert key.returncode == 0, key.stderr
    port = free_port()
    serve_log = tmp_path / "serve.log"
    with serve_log.open("ab") as out:
        proc = subprocess.Popen(
            [str(python), "-m", "app", "serve"],
            cwd=elsewhere,
            env={
                **base_env,
                "SIDECAR_DATABASE_URL": empty_database,
                "SIDECAR_HOMESERVER_URL": "http://127.0.0.1:9",
                "SIDECAR_TOKEN_KEYS": key.stdout.strip(),
                "SIDECAR_LISTEN_PORT": str(port),
            },
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:

        def ready() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"serve exited:\n{tail(serve_log)}")
            try:
                return httpx.get(f"http://127.0.0.1:{port}/ready", timeout=2.0).status_code == 200
            except httpx.HTTPError:
                return False

        assert wait_until(ready, READY_TIMEOUT, interval=0.1), tail(serve_log)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

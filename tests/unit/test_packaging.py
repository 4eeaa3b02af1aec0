"""The package builds as a wheel that carries its migrations, so an installed sidecar can run
`python -m app migrate`; its version lives in pyproject.toml alone."""

from __future__ import annotations

import importlib.metadata
import re
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

from app.__main__ import main
from app.settings import Settings
from app.version import version

ROOT = Path(__file__).resolve().parents[2]


def test_wheel_carries_the_migrations(tmp_path: Path) -> None:
    built = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "-q",
            "--wheel-dir",
            str(tmp_path),
            str(ROOT),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert built.returncode == 0, built.stderr[-2000:]
    (wheel,) = tmp_path.glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "app/__main__.py" in names
    assert "migrations/env.py" in names
    assert "migrations/script.py.mako" in names
    versions = {ROOT / "migrations" / "versions" / Path(n).name for n in names}
    for migration in (ROOT / "migrations" / "versions").glob("*.py"):
        assert migration in versions, migration.name


def test_version_comes_from_the_package_metadata(capsys: pytest.CaptureFixture[str]) -> None:
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out.strip() == f"delayed-events-sidecar {declared}"
    assert version() == declared == importlib.metadata.version("delayed-events-sidecar")


def test_the_version_is_written_in_one_place() -> None:
    """pyproject.toml holds it; the code reads it from the installed package's metadata."""
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    pattern = re.compile(rf"""\b(__version__|VERSION)\s*=|["']{re.escape(declared)}["']""")
    for path in (ROOT / "app").rglob("*.py"):
        assert not pattern.search(path.read_text()), path


def test_migrate_needs_the_database_url_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in Settings.model_fields:
        monkeypatch.delenv(f"SIDECAR_{name.upper()}", raising=False)
        monkeypatch.delenv(f"SIDECAR_{name.upper()}_FILE", raising=False)
    migrated: list[str] = []
    monkeypatch.setattr("app.__main__.migrate", migrated.append)
    monkeypatch.setenv("SIDECAR_DATABASE_URL", "postgresql://u:p@db:5432/sidecar")
    assert main(["migrate"]) == 0
    assert migrated == ["postgresql+asyncpg://u:p@db:5432/sidecar"]
    # serve and check-config still want the rest.
    assert main(["check-config"]) == 2

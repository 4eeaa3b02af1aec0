"""The package builds as a wheel that carries its migrations, so an installed sidecar can run
`python -m app migrate`."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

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

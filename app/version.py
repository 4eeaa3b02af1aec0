"""The sidecar's version. pyproject.toml is the one place it is written; the code reads it from
the installed package's metadata."""

from __future__ import annotations

import importlib.metadata

DISTRIBUTION = "delayed-events-sidecar"


def version() -> str:
    try:
        return importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"  # run from a checkout that was never installed

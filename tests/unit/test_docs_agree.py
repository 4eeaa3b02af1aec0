"""The docs agree with the code: docs/deploy.md's settings table is the one list of the settings
(every field of app/settings.py has exactly one row, with its environment variable and its
default, and there is no other row), and the README's Layout matches the tree."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from pydantic.fields import FieldInfo

from app.settings import ENV_PREFIX, Settings

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "docs/deploy.md"
ROW = re.compile(r"^\|\s*`(SIDECAR_\w+)`\s*\|([^|]*)\|")


def table_rows(text: str) -> list[tuple[str, str]]:
    """(variable, default cell) of each row of the table under "## Settings"."""
    section = text.split("\n## Settings\n", 1)[1].split("\n## ", 1)[0]
    table = section.split("\n\n### ", 1)[0]
    return [
        (m.group(1), m.group(2).strip()) for line in table.splitlines() if (m := ROW.match(line))
    ]


def documented_default(field: FieldInfo) -> str:
    if field.is_required():
        return "required"
    value = field.default
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, float) and value.is_integer():
        return f"`{int(value)}`"
    return f"`{value}`"


def table_problems(text: str) -> list[str]:
    rows = table_rows(text)
    problems = []
    seen: dict[str, int] = {}
    for name, _ in rows:
        seen[name] = seen.get(name, 0) + 1
    fields = {ENV_PREFIX + name.upper(): field for name, field in Settings.model_fields.items()}
    for name in sorted(set(fields) - set(seen)):
        problems.append(f"{name} has no row")
    for name in sorted(set(seen) - set(fields)):
        problems.append(f"{name} has a row but is not a setting")
    for name, count in seen.items():
        if count > 1:
            problems.append(f"{name} has {count} rows")
    for name, default in rows:
        if name in fields:
            want = documented_default(fields[name])
            if default.split(" (")[0].strip() != want:
                problems.append(f"{name}: the table says {default!r}, the code {want!r}")
    return problems


def test_every_setting_has_one_row_with_its_default() -> None:
    assert table_problems(DEPLOY.read_text()) == []


def test_the_check_catches_a_missing_an_extra_and_a_wrong_row() -> None:
    text = DEPLOY.read_text()
    assert table_rows(text)
    missing = re.sub(r"^\| `SIDECAR_LOG_LEVEL` .*\n", "", text, flags=re.M)
    assert table_problems(missing) == ["SIDECAR_LOG_LEVEL has no row"]
    extra = text.replace(
        "| `SIDECAR_LOG_LEVEL` |", "| `SIDECAR_LOG_COLOUR` | `on` | |\n| `SIDECAR_LOG_LEVEL` |"
    )
    assert table_problems(extra) == ["SIDECAR_LOG_COLOUR has a row but is not a setting"]
    wrong = text.replace(
        "| `SIDECAR_MAX_BODY_BYTES` | `65536` |", "| `SIDECAR_MAX_BODY_BYTES` | `1` |"
    )
    assert table_problems(wrong) == [
        "SIDECAR_MAX_BODY_BYTES: the table says '`1`', the code '`65536`'"
    ]


def layout_problems(readme: str, root: Path) -> list[str]:
    """The README's Layout names every top-level folder and every module of app/, and nothing
    that is not there."""
    layout = readme.split("\n## Layout\n", 1)[1].split("```")[1]
    named_dirs = set(re.findall(r"^(\w[\w.-]*)/", layout, re.M))
    named_modules = set(re.findall(r"\b(\w+\.py)\b", layout.split("\nmigrations/")[0]))
    tracked = subprocess.run(
        ["git", "ls-files"], cwd=root, capture_output=True, text=True, check=True
    ).stdout.split()
    dirs = {path.split("/")[0] for path in tracked if "/" in path and not path.startswith(".")}
    modules = {Path(p).name for p in tracked if re.fullmatch(r"app/\w+\.py", p)}
    modules.discard("__init__.py")
    problems = [f"{d}/ is not in the Layout" for d in sorted(dirs - named_dirs)]
    problems += [f"{d}/ is in the Layout but not in the tree" for d in sorted(named_dirs - dirs)]
    problems += [f"app/{m} is not in the Layout" for m in sorted(modules - named_modules)]
    problems += [f"app/{m} is in the Layout, not in app/" for m in sorted(named_modules - modules)]
    return problems


def test_the_readme_layout_matches_the_tree() -> None:
    assert layout_problems((ROOT / "README.md").read_text(), ROOT) == []


def test_the_layout_check_catches_a_missing_module() -> None:
    readme = re.sub(
        r"restarts\.py\s+\(restarts in batches\),\s*", "", (ROOT / "README.md").read_text()
    )
    assert layout_problems(readme, ROOT) == ["app/restarts.py is not in the Layout"]

from __future__ import annotations

import re
import stat
from pathlib import Path

from app.__main__ import main
from app.appservice import registration_yaml, write_registration


def test_registration_names_every_local_user_non_exclusively() -> None:
    text = registration_yaml("example.org", as_token="A", hs_token="H")
    assert 'as_token: "A"' in text
    assert 'hs_token: "H"' in text
    assert "url: null" in text
    assert "exclusive: false" in text
    regex = re.search(r'regex: "(.*)"', text)
    assert regex is not None
    pattern = regex.group(1).replace("\\\\", "\\")
    assert re.fullmatch(pattern, "@alice:example.org")
    assert not re.fullmatch(pattern, "@alice:exampleXorg")
    assert not re.fullmatch(pattern, "@alice:evil.org")


def test_written_file_is_private_and_tokens_are_fresh(tmp_path: Path) -> None:
    first = write_registration(tmp_path / "a.yaml", "example.org")
    second = write_registration(tmp_path / "b.yaml", "example.org")
    assert first != second
    assert len(first) >= 40
    mode = stat.S_IMODE((tmp_path / "a.yaml").stat().st_mode)
    assert mode == 0o600
    assert f'as_token: "{first}"' in (tmp_path / "a.yaml").read_text()


def test_command_prints_the_setting(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "reg.yaml"
    assert main(["appservice-registration", "--server-name", "hs.test", "--output", str(out)]) == 0
    printed = capsys.readouterr().out.strip()
    assert printed.startswith("SIDECAR_APPSERVICE_TOKEN=")
    assert printed.removeprefix("SIDECAR_APPSERVICE_TOKEN=") in out.read_text()


def test_replays_stay_under_the_homeserver_s_rate_limits() -> None:
    """The sidecar sends as any user of the namespace: unlimited, a user could replay far more
    messages through it (delay 0) than the homeserver lets them send themselves."""
    text = registration_yaml("example.org", as_token="A", hs_token="H")
    assert "rate_limited: true" in text.splitlines()

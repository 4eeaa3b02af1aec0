from __future__ import annotations

from app.api.middleware import redacted_path
from app.metrics import errcode_label


def test_errcode_labels_are_bounded() -> None:
    assert errcode_label("M_FORBIDDEN") == "M_FORBIDDEN"
    assert errcode_label("unreachable") == "unreachable"
    assert errcode_label("M_MADE_UP_BY_A_HOSTILE_SERVER_12345") == "other"
    assert errcode_label(None) == "other"
    assert errcode_label(["M_FORBIDDEN"]) == "other"


def test_unhandled_error_logs_cut_delay_ids_short() -> None:
    path = "/_matrix/client/v1/delayed_events/AbCdEfGhIjKlMnOpQrStUvWx/restart"
    assert redacted_path(path) == "/_matrix/client/v1/delayed_events/AbCdEf…/restart"
    assert "AbCdEfGhIjKlMnOpQrStUvWx" not in redacted_path(path)
    assert redacted_path("/_matrix/client/versions") == "/_matrix/client/versions"

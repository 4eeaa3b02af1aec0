"""After real traffic through nginx (scheduling, actions, lookups, errors, replays that land and
one the homeserver refuses), the sidecar's log holds no access token (Synapse's begin `syt_`), no
`Bearer` and none of the event content, at DEBUG (the e2e stack's level); and no file nginx
writes holds a token, however the client sent it."""

from __future__ import annotations

import uuid

from devstack.matrix import Account
from devstack.stack import Stack

from tests.e2e.support import DELAY, UNSTABLE, Room, call, enc, poll, unique


def test_sidecar_log_holds_no_token_or_content(stack: Stack, alice: Account, room: Room) -> None:
    mark = f"MARK{uuid.uuid4().hex}"
    token = alice.access_token
    assert token.startswith("syt_")
    base = f"/_matrix/client/v3/{room.path}"

    def schedule(path: str, delay: int, body: object) -> str:
        answer = call(stack.client_url, "PUT", f"{path}?{DELAY}={delay}", body, token=token)
        assert answer.status == 200, answer
        delay_id: str = answer.json()["delay_id"]
        return delay_id

    landing = schedule(
        f"{base}/send/m.room.message/{unique('t')}", 300, {"msgtype": "m.text", "body": f"{mark}-1"}
    )
    waiting = schedule(f"{base}/state/m.secret.test/{enc('k')}", 600_000, {"m": f"{mark}-2"})
    # Never sent: restarted with and without a token, then cancelled.
    for auth in (token, None):
        answer = call(
            stack.client_url, "POST", f"{UNSTABLE}/delayed_events/{waiting}/restart", {}, auth
        )
        assert answer.status == 200, answer
    answer = call(stack.client_url, "GET", f"{UNSTABLE}/delayed_events", token=token)
    assert answer.status == 200
    assert mark in answer.body.decode()  # the owner does see their content
    answer = call(
        stack.client_url, "POST", f"{UNSTABLE}/delayed_events/{waiting}/cancel", {}, token
    )
    assert answer.status == 200
    # Refused requests, carrying the token or content.
    answer = call(
        stack.client_url,
        "PUT",
        f"{base}/send/m.room.message/{unique('t')}?{DELAY}=-1",
        {"body": f"{mark}-3"},
        token=token,
    )
    assert answer.status == 400
    answer = call(
        stack.client_url,
        "PUT",
        f"{base}/send/m.room.message/{unique('t')}?{DELAY}=10",
        raw_body=f'{{"body": "{mark}-4"'.encode(),
        token=token,
    )
    assert answer.status == 400
    answer = call(stack.client_url, "GET", f"{UNSTABLE}/delayed_events", token=token + "x")
    assert answer.status == 401
    # A replay the homeserver refuses: alice is in no such room.
    nowhere = f"/_matrix/client/v3/rooms/{enc('!nowhere:localhost')}"
    refused = schedule(f"{nowhere}/send/m.room.message/{unique('t')}", 0, {"body": f"{mark}-5"})

    poll(lambda: room.find_event("m.room.message"), 30.0, "the delayed message to land")

    def finalised() -> bool | None:
        answer = call(
            stack.client_url, "GET", f"/_matrix/client/v1/delayed_events/{refused}", token=token
        )
        return True if answer.status == 200 and "finalised" in answer.json() else None

    poll(finalised, 30.0, "the refused replay to be finalised")
    assert landing

    log = stack.sidecar_log.read_text(errors="replace")
    assert "homeserver refused" in log  # the replays were logged
    assert " DEBUG " in log  # at the most talkative level
    assert token not in log
    assert "syt_" not in log
    assert "Bearer" not in log
    assert mark not in log
    assert waiting not in log


def test_tokens_in_the_query_reach_no_log(stack: Stack, alice: Account, room: Room) -> None:
    """Clients may send the token as `?access_token=` (the spec allows it): ordinary traffic that
    way, through nginx to both the sidecar and the homeserver, leaves it in no file of nginx's and
    not in the sidecar's log."""
    token = alice.access_token
    base = f"/_matrix/client/v3/{room.path}"
    # The first two are the token (the name decoded); the homeserver reads no upper-case name, so
    # that request carries the token in its header too (both ways at once would be refused).
    spellings = {"access_token": None, "access%5Ftoken": None, "ACCESS_TOKEN": token}
    delay_ids = []
    for name, header in spellings.items():
        answer = call(
            stack.client_url,
            "PUT",
            f"{base}/send/m.room.message/{unique('t')}?{DELAY}=600000&{name}={token}",
            {"msgtype": "m.text", "body": "later"},
            token=header,
        )
        assert answer.status == 200, answer
        delay_ids.append(answer.json()["delay_id"])
    for delay_id in delay_ids:
        answer = call(
            stack.client_url,
            "POST",
            f"{UNSTABLE}/delayed_events/{delay_id}/cancel?access_token={token}",
            {},
        )
        assert answer.status == 200, answer
    for target in (
        f"{UNSTABLE}/delayed_events?access_token={token}&status=finalised",
        f"/_matrix/client/v3/sync?access_token={token}&timeout=0;access_token={token}",
        f"{base}/messages?dir=b&access_token={token}",
        f"/_matrix/client/v3/capabilities?access_token={token}",
    ):
        answer = call(stack.client_url, "GET", target)
        assert answer.status == 200, answer
    answer = call(stack.client_url, "GET", f"/_matrix/client/v3/sync?access_token={token}x")
    assert answer.status == 401

    nginx_dir = stack.dir / "nginx"
    files = [path for path in nginx_dir.rglob("*") if path.is_file()]
    assert nginx_dir / "access.log" in files
    for path in [*files, stack.sidecar_log]:
        text = path.read_text(errors="replace")
        assert token not in text, path
        assert token.removeprefix("syt_") not in text, path
    access = (nginx_dir / "access.log").read_text()
    redacted = "access_token=REDACTED&timeout=0;access_token=REDACTED"
    assert f"/_matrix/client/v3/sync?{redacted} HTTP/1.1" in access

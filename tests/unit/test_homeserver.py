from __future__ import annotations

from collections.abc import Callable

import httpx
import pytest

from app.errors import HomeserverError, HomeserverUnavailable
from app.homeserver import Credential, Homeserver, Refused, Sent, Transient, encode_segment

Handler = Callable[[httpx.Request], httpx.Response]


def _homeserver(handler: Handler) -> Homeserver:
    return Homeserver("http://hs.test/", httpx.AsyncClient(transport=httpx.MockTransport(handler)))


async def _replay(handler: Handler, **overrides: object) -> object:
    args: dict[str, object] = {
        "credential": Credential("tok"),
        "room_id": "!room:test",
        "event_type": "m.room.message",
        "state_key": None,
        "content": '{"body":"hi"}',
        "query": "",
        "txn_id": "msc4140.abc",
    }
    args.update(overrides)
    return await _homeserver(handler).replay(**args)  # type: ignore[arg-type]


async def test_whoami_reads_user_and_device() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"user_id": "@a:test", "device_id": "DEV"})

    whoami = await _homeserver(handler).whoami("secret")
    assert (whoami.user_id, whoami.device_id) == ("@a:test", "DEV")
    assert seen[0].headers["authorization"] == "Bearer secret"
    assert seen[0].url.path == "/_matrix/client/v3/account/whoami"


async def test_whoami_passes_token_errors_through_unchanged() -> None:
    body = {"errcode": "M_UNKNOWN_TOKEN", "error": "Invalid token", "soft_logout": True}
    with pytest.raises(HomeserverError) as raised:
        await _homeserver(lambda r: httpx.Response(401, json=body)).whoami("t")
    assert raised.value.status == 401
    assert raised.value.body() == body


@pytest.mark.parametrize(
    "response",
    [
        httpx.Response(200, content=b"<html>"),
        httpx.Response(200, json=["not", "an", "object"]),
        httpx.Response(200, json={"user_id": 5}),
        httpx.Response(500, content=b"oops"),
    ],
)
async def test_whoami_garbage_is_a_clean_502(response: httpx.Response) -> None:
    with pytest.raises(HomeserverUnavailable) as raised:
        await _homeserver(lambda r: response).whoami("t")
    assert raised.value.status == 502
    assert "t" not in raised.value.message.split()


async def test_whoami_unreachable_is_a_502() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused")

    with pytest.raises(HomeserverUnavailable):
        await _homeserver(handler).whoami("t")


async def test_replay_message_uses_the_txn_id_and_encodes_segments() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"event_id": "$e"})

    result = await _replay(handler, query="org.matrix.msc4354.sticky_duration_ms=10")
    assert result == Sent("$e")
    assert seen[0].method == "PUT"
    assert seen[0].url.raw_path == (
        b"/_matrix/client/v3/rooms/%21room%3Atest/send/m.room.message/msc4140.abc"
        b"?org.matrix.msc4354.sticky_duration_ms=10"
    )
    assert seen[0].content == b'{"body":"hi"}'


async def test_replay_state_encodes_the_key_once() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"event_id": "$e"})

    await _replay(handler, state_key="_@alice:test_DEV_m.call/✓", event_type="m.call")
    assert seen[0].url.raw_path == (
        b"/_matrix/client/v3/rooms/%21room%3Atest/state/m.call/"
        + encode_segment("_@alice:test_DEV_m.call/✓").encode()
    )
    assert b"%40alice%3Atest_DEV_m.call%2F%E2%9C%93" in seen[0].url.raw_path


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        (httpx.Response(502, content=b"bad gateway"), Transient),
        (httpx.Response(503, json={"errcode": "M_UNKNOWN", "error": "x"}), Transient),
        (httpx.Response(429, json={"errcode": "M_LIMIT_EXCEEDED", "error": "x"}), Transient),
        (httpx.Response(200, json={}), Transient),
        (httpx.Response(403, json={"errcode": "M_FORBIDDEN", "error": "power"}), Refused),
        (httpx.Response(404, json={"errcode": "M_NOT_FOUND", "error": "room"}), Refused),
        (httpx.Response(401, json={"errcode": "M_UNKNOWN_TOKEN", "error": "t"}), Refused),
    ],
)
async def test_replay_classifies_answers(response: httpx.Response, expected: type) -> None:
    assert isinstance(await _replay(lambda r: response), expected)


async def test_replay_429_carries_retry_after() -> None:
    body = {"errcode": "M_LIMIT_EXCEEDED", "error": "slow", "retry_after_ms": 1234}
    result = await _replay(lambda r: httpx.Response(429, json=body))
    assert isinstance(result, Transient)
    assert result.retry_after_ms == 1234


async def test_replay_refusal_keeps_the_homeservers_error() -> None:
    body = {"errcode": "M_FORBIDDEN", "error": "You don't have permission"}
    result = await _replay(lambda r: httpx.Response(403, json=body))
    assert result == Refused(403, body)


@pytest.mark.parametrize(
    "exc",
    [httpx.ConnectError("refused"), httpx.ReadTimeout("slow"), httpx.RemoteProtocolError("x")],
)
async def test_replay_network_failures_are_transient(exc: Exception) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise exc

    result = await _replay(handler)
    assert isinstance(result, Transient)
    assert "tok" not in str(result.error)


async def test_application_service_credential_names_user_and_device() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"event_id": "$e"})

    credential = Credential("as_secret", "@alice:test", "DEV 1")
    await _replay(handler, credential=credential, query="org.matrix.msc4354.sticky_duration_ms=5")
    assert seen[0].headers["authorization"] == "Bearer as_secret"
    assert seen[0].url.raw_path.endswith(
        b"?user_id=%40alice%3Atest&device_id=DEV%201&org.matrix.msc3202.device_id=DEV%201"
        b"&org.matrix.msc4354.sticky_duration_ms=5"
    )
    await _replay(handler, credential=credential.without_device())
    assert seen[1].url.raw_path.endswith(b"?user_id=%40alice%3Atest")


# However a stored query (a row written before the allowlist, or by hand) names them, the only
# user_id, device_id and ts on a replay are the credential's own.
FORGED = [
    "user_id=%40admin%3Ahs",
    "user%5Fid=%40admin%3Ahs",
    "user%5fid=%40admin%3Ahs",
    "%75ser_id=%40admin%3Ahs",
    "USER_ID=%40admin%3Ahs",
    "user_id=%40admin%3Ahs%23",
    "ts=1000",
    "%74s=1000",
    "device_id=ADMINDEV",
    "device%5Fid=ADMINDEV",
    "org.matrix.msc3202.device_id=ADMINDEV",
    "org%2Ematrix%2Emsc3202%2Edevice_id=ADMINDEV",
    "org%2ematrix%2emsc3202%2edevice%5fid=ADMINDEV",
    "access_token=stolen",
    "org.matrix.msc4140.delay=5",
]


def _decoded_params(request: httpx.Request) -> list[tuple[str, str]]:
    return list(httpx.QueryParams(request.url.query.decode()).multi_items())


@pytest.mark.parametrize("forged", FORGED)
@pytest.mark.parametrize("separator", ["&", ";"])
async def test_replay_carries_exactly_the_credentials_parameters(
    forged: str, separator: str
) -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"event_id": "$e"})

    stored = f"{forged}{separator}org.matrix.msc4354.sticky_duration_ms=7{separator}{forged}"
    await _replay(handler, credential=Credential("as", "@alice:test", "DEV"), query=stored)
    await _replay(handler, credential=Credential("tok"), query=stored)
    assert _decoded_params(seen[0]) == [
        ("user_id", "@alice:test"),
        ("device_id", "DEV"),
        ("org.matrix.msc3202.device_id", "DEV"),
        ("org.matrix.msc4354.sticky_duration_ms", "7"),
    ]
    assert _decoded_params(seen[1]) == [("org.matrix.msc4354.sticky_duration_ms", "7")]


async def test_state_lookup_carries_exactly_the_credentials_parameters() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(404, json={"errcode": "M_NOT_FOUND", "error": "no"})

    await _homeserver(handler).state_event(
        credential=Credential("as", "@alice:test", "DEV"),
        room_id="!r:test",
        event_type="m.call",
        state_key="k",
    )
    assert _decoded_params(seen[0]) == [
        ("user_id", "@alice:test"),
        ("device_id", "DEV"),
        ("org.matrix.msc3202.device_id", "DEV"),
        ("format", "event"),
    ]

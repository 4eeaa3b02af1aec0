from __future__ import annotations

import pytest
from starlette.requests import Request

from app.api import requests as rq
from app.errors import BadJson, InvalidParam, NotJson


def _request(query: bytes) -> Request:
    return Request(
        {"type": "http", "method": "GET", "path": "/", "query_string": query, "headers": []}
    )


@pytest.mark.parametrize(
    "query",
    [
        b"org.matrix.msc4140.delay=1500",
        b"org%2Ematrix%2Emsc4140%2Edelay=1500",
        b"org%2ematrix%2emsc4140%2edelay=1500",
        b"a=1&org.matrix.msc4140.delay=1500&b=2",
        b"a=1;org.matrix.msc4140.delay=1500",
    ],
)
def test_delay_parameter_in_any_position_and_encoding(query: bytes) -> None:
    pairs = rq.query_pairs(_request(query))
    assert rq.single(pairs, rq.DELAY_PARAM) == "1500"


def test_duplicate_delay_is_refused() -> None:
    pairs = rq.query_pairs(_request(b"org.matrix.msc4140.delay=1&org.matrix.msc4140.delay=2"))
    with pytest.raises(InvalidParam):
        rq.single(pairs, rq.DELAY_PARAM)


def test_replayed_query_keeps_only_the_allowlist() -> None:
    query = (
        b"org.matrix.msc4354.sticky_duration_ms=3600000&org.matrix.msc4140.delay=10"
        b"&org.matrix.msc4140.parent_delay_id=x&access_token=secret&a=1&USER_ID=%40x%3Ay"
        b"&User_Id=%40x%3Ay&user_id%20=%40x%3Ay"
    )
    pairs = rq.query_pairs(_request(query))
    assert rq.replayed_query(pairs) == "org.matrix.msc4354.sticky_duration_ms=3600000"


def test_replayed_query_is_re_encoded_from_the_decoded_value() -> None:
    pairs = rq.query_pairs(_request(b"org%2Ematrix%2Emsc4354%2Esticky_duration_ms=%31%30"))
    assert rq.replayed_query(pairs) == "org.matrix.msc4354.sticky_duration_ms=10"


# Who the replay acts as, and when: never taken from the client, however the name is encoded.
IDENTITY_KEYS = [
    b"user_id",
    b"user%5Fid",
    b"user%5fid",
    b"%75ser_id",
    b"%75%73%65%72%5F%69%64",
    b"ts",
    b"%74s",
    b"%74%73",
    b"device_id",
    b"device%5Fid",
    b"%64evice_id",
    b"org.matrix.msc3202.device_id",
    b"org%2Ematrix%2Emsc3202%2Edevice_id",
    b"org%2ematrix%2emsc3202%2edevice%5fid",
]


@pytest.mark.parametrize("key", IDENTITY_KEYS)
def test_identity_parameters_are_refused(key: bytes) -> None:
    pairs = rq.query_pairs(_request(b"org.matrix.msc4140.delay=0&" + key + b"=%40admin%3Ahs"))
    with pytest.raises(InvalidParam):
        rq.replayed_query(pairs)
    with pytest.raises(InvalidParam):
        rq.refuse_identity(pairs)


@pytest.mark.parametrize("bad", [b"a=%zz", b"a=%", b"%ff%fe=1"])
def test_bad_percent_encoding_is_refused(bad: bytes) -> None:
    with pytest.raises(InvalidParam):
        rq.query_pairs(_request(bad))


@pytest.mark.parametrize("value", ["0", "1500", "999999999999999999"])
def test_delay_accepts_non_negative_integers(value: str) -> None:
    assert rq.parse_delay(value) == int(value)


@pytest.mark.parametrize("value", ["1000000000000000000", "100000000000000000000000000000"])
def test_a_delay_beyond_eighteen_digits_is_beyond_any_maximum(value: str) -> None:
    assert rq.parse_delay(value) == rq.TOO_LONG


@pytest.mark.parametrize("value", ["9" * 5000, "0" * 5000 + "7" * 19, "1" + "0" * 4300])
def test_a_delay_too_long_to_read_is_beyond_any_maximum(value: str) -> None:
    assert rq.parse_delay(value) == rq.TOO_LONG


def test_leading_zeros_do_not_make_a_delay_long() -> None:
    assert rq.parse_delay("0" * 5000 + "1500") == 1500


def test_a_long_integer_in_json_is_kept_apart_and_never_stored() -> None:
    body = rq.parse_json_object(b'{"delay_ms": %s, "content": {}}' % (b"9" * 5000))
    assert isinstance(body["delay_ms"], rq.LongInteger)
    negative = rq.parse_json_object(b'{"n": -%s}' % (b"9" * 5000))
    assert negative["n"].negative
    with pytest.raises(NotJson):
        rq.compact_json(body)


# int() takes each of these (Synapse parses the delay with it); the sidecar refuses them.
@pytest.mark.parametrize(
    "value", ["", "-1", "1.5", "1e3", "+5", " 5", "٣", "0x10", "+600000", "600000 ", "-0", "1_0"]
)
def test_delay_refuses_everything_else(value: str) -> None:
    with pytest.raises(InvalidParam):
        rq.parse_delay(value)


def test_json_object_parsing() -> None:
    assert rq.parse_json_object(b'{"a": 1}') == {"a": 1}
    assert rq.parse_json_object(b"", empty_ok=True) == {}
    with pytest.raises(NotJson):
        rq.parse_json_object(b"")
    with pytest.raises(NotJson):
        rq.parse_json_object(b"{nope")
    with pytest.raises(NotJson):
        rq.parse_json_object(b'{"a": NaN}')
    with pytest.raises(NotJson):
        rq.parse_json_object(b"\xff\xfe")
    with pytest.raises(BadJson):
        rq.parse_json_object(b"[1, 2]")


def test_content_is_stored_as_compact_ascii() -> None:
    assert rq.compact_json({"body": "tест", "n": 1}) == '{"body":"t\\u0435\\u0441\\u0442","n":1}'


@pytest.mark.parametrize(
    ("raw", "decoded"),
    [
        ("_%40alice%3Aexample.org_DEV_m.call", "_@alice:example.org_DEV_m.call"),
        ("a%2Fb", "a/b"),
        ("%E2%9C%93", "\u2713"),
        ("a+b", "a+b"),
        ("%2541", "%41"),
    ],
)
def test_path_segments_decode_exactly_once(raw: str, decoded: str) -> None:
    assert rq.path_segment(raw, "state key") == decoded


def test_path_segment_length_is_bounded() -> None:
    with pytest.raises(InvalidParam):
        rq.path_segment("a" * 256, "state key")


@pytest.mark.parametrize("raw", ["room", "%23alias%3Aserver", "", "!"])
def test_room_ids_must_be_room_ids(raw: str) -> None:
    with pytest.raises(InvalidParam):
        rq.room_id(raw)


def test_txn_key_ignores_prefix_and_encoding() -> None:
    encoded = rq.txn_key("send", "%21r%3Ax", "m.room.message", "t1")
    plain = rq.txn_key("send", "!r:x", "m.room.message", "t1")
    assert encoded == plain
    assert rq.txn_key("delayed_event", "!r:x", "m.room.message", "t1") != plain
    assert rq.txn_key("send", "!r:x", "m.room.message", "t2") != plain

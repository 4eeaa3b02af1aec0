"""Reading requests strictly: bodies with a size limit, JSON objects, raw query parameters and
path segments decoded exactly once. Every refusal is a Matrix error."""

from __future__ import annotations

import json
import math
import re
from typing import Any
from urllib.parse import unquote

from starlette.requests import Request

from app.errors import BadJson, InvalidParam, NotJson, TooLarge
from app.homeserver import no_constants, replayable_query
from app.models import storable_text

DELAY_PARAM = "org.matrix.msc4140.delay"
PARENT_PARAM = "org.matrix.msc4140.parent_delay_id"
# Who a replay acts as and when: with an application-service token the homeserver takes these
# from the query, so they come from the replay's credential only, never from a client.
IDENTITY_PARAMS = frozenset({"user_id", "device_id", "org.matrix.msc3202.device_id", "ts"})
_MAX_ID = 255
# Deeper JSON is refused: lookups render stored content inside a few more levels, and common
# JSON libraries (serde_json's default is 128) refuse much deeper documents.
MAX_JSON_DEPTH = 100


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The request body, refusing more than `max_bytes` before reading it all."""
    declared = request.headers.get("content-length")
    if (
        declared is not None
        and declared.isascii()
        and declared.isdigit()
        and digits_value(declared) > max_bytes
    ):
        raise TooLarge(f"Request body is larger than {max_bytes} bytes")
    chunks = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise TooLarge(f"Request body is larger than {max_bytes} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is out of range")
    return value


def _too_deep(value: Any) -> bool:
    pending = [(value, 1)]
    while pending:
        item, depth = pending.pop()
        if isinstance(item, dict):
            children = list(item.values())
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > MAX_JSON_DEPTH:
            return True
        pending.extend((child, depth + 1) for child in children)
    return False


def parse_json_object(body: bytes, *, empty_ok: bool = False) -> dict[str, Any]:
    """A JSON object, or M_NOT_JSON (not JSON at all, or a number no float holds) / M_BAD_JSON
    (JSON, but not an object, or nested deeper than MAX_JSON_DEPTH). An integer too long for
    int() is a LongInteger, which `compact_json` refuses."""
    if not body.strip():
        if empty_ok:
            return {}
        raise NotJson("Content not JSON.")
    try:
        value = json.loads(
            body, parse_constant=no_constants, parse_float=_finite, parse_int=_integer
        )
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise NotJson("Content not JSON.") from None
    if not isinstance(value, dict):
        raise BadJson("Content must be a JSON object.")
    if _too_deep(value):
        raise BadJson(f"Content is nested deeper than {MAX_JSON_DEPTH} levels.")
    return value


def compact_json(value: dict[str, Any]) -> str:
    """The form content is stored and replayed in: compact, ASCII-only JSON. M_NOT_JSON if it
    holds an integer too long to read."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=True, default=_not_json)


def query_pairs(request: Request) -> list[tuple[str, str, str]]:
    """(decoded key, decoded value, raw pair) for each query parameter, in order."""
    raw = request.scope.get("query_string", b"").decode("latin-1")
    pairs = []
    # `;` separates parameters too, as in the homeserver's own parser: a delay hidden behind one
    # must still be seen here.
    for part in re.split("[&;]", raw):
        if not part:
            continue
        key, _, value = part.partition("=")
        pairs.append((_decode(key, "query parameter name"), _decode(value, "query value"), part))
    return pairs


def _decode(raw: str, what: str) -> str:
    text = raw.replace("+", " ")
    if re.search(r"%(?![0-9A-Fa-f]{2})", text):
        raise InvalidParam(f"Invalid percent-encoding in {what}")
    try:
        value = unquote(text, errors="strict")
    except UnicodeDecodeError:
        raise InvalidParam(f"Invalid percent-encoding in {what}") from None
    if not storable_text(value):
        raise InvalidParam(f"Invalid character in {what}")
    return value


def single(pairs: list[tuple[str, str, str]], name: str) -> str | None:
    """The value of a parameter that may appear at most once."""
    values = [value for key, value, _ in pairs if key == name]
    if len(values) > 1:
        raise InvalidParam(f"{name} is given more than once")
    return values[0] if values else None


def refuse_identity(pairs: list[tuple[str, str, str]]) -> None:
    """Refuse a scheduling request that names who or when its event is sent as: the sidecar
    authenticated the request as someone, and its event is sent as exactly them."""
    for key, _, _ in pairs:
        if key in IDENTITY_PARAMS:
            raise InvalidParam(f"{key} cannot be given when scheduling a delayed event")


def replayed_query(pairs: list[tuple[str, str, str]]) -> str:
    """The query to send on with the event: the allowlisted parameters (a sticky duration),
    encoded anew; the rest (the delay, the ignored parent, `access_token`) is dropped."""
    refuse_identity(pairs)
    return replayable_query([(key, value) for key, value, _ in pairs])


# What an integer too long to read stands for: beyond a bigint, so beyond any maximum.
TOO_LONG = 2**63


def digits_value(digits: str) -> int:
    """The value of ASCII decimal digits, or TOO_LONG when it has more than 18 significant ones
    (int() refuses more than 4,300 digits, and reading them all is work for nothing)."""
    significant = digits.lstrip("0")
    return int(significant or "0") if len(significant) <= 18 else TOO_LONG


DEFAULT_PAGE = 100
MAX_PAGE = 1000


def page_limit(pairs: list[tuple[str, str, str]]) -> int:
    """The `limit=` of a lookup: 1 to MAX_PAGE items, DEFAULT_PAGE when absent."""
    value = single(pairs, "limit")
    if value is None:
        return DEFAULT_PAGE
    if not value.isascii() or not value.isdigit() or not 1 <= digits_value(value) <= MAX_PAGE:
        raise InvalidParam(f"limit must be an integer from 1 to {MAX_PAGE}")
    return digits_value(value)


def parse_delay(value: str) -> int:
    """A delay in milliseconds: plain decimal digits, however many. A sign, whitespace or
    underscores, which the homeserver's int() would take, are refused."""
    if not value.isascii() or not value.isdigit():
        raise InvalidParam(f"{DELAY_PARAM} must be a non-negative integer")
    return digits_value(value)


class LongInteger:
    """An integer in a JSON body too long for int(); only its sign is kept."""

    def __init__(self, negative: bool) -> None:
        self.negative = negative


def _integer(text: str) -> int | LongInteger:
    try:
        return int(text)
    except ValueError:
        return LongInteger(text.startswith("-"))


def _not_json(value: Any) -> Any:
    raise NotJson("Content not JSON.")


def path_segment(raw: str, what: str) -> str:
    """A path segment from the raw path, decoded exactly once."""
    value = _decode(raw.replace("+", "%2B"), what)
    if len(value.encode()) > _MAX_ID:
        raise InvalidParam(f"{what} is too long")
    return value


def room_id(raw: str) -> str:
    value = path_segment(raw, "room id")
    if not value.startswith("!") or len(value) < 2:
        raise InvalidParam("Invalid room id")
    return value


def event_type(raw: str) -> str:
    value = path_segment(raw, "event type")
    if not value:
        raise InvalidParam("Invalid event type")
    return value


def txn_key(endpoint: str, room: str, kind: str, txn: str) -> str:
    """What identifies a transaction, whatever the prefix and however the client encoded the
    path: the endpoint and its decoded room id, event type and transaction id."""
    parts = (room_id(room), event_type(kind), path_segment(txn, "transaction id"))
    return json.dumps([endpoint, *parts], ensure_ascii=True, separators=(",", ":"))

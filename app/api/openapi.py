"""What the OpenAPI document says about the requests the routes read themselves (bodies and query
parameters), so that clients and schema-driven tools see the whole request."""

from __future__ import annotations

from typing import Any

from app.api.requests import DELAY_PARAM


def _json_body(schema: dict[str, Any], *, required: bool = True) -> dict[str, Any]:
    return {"required": required, "content": {"application/json": {"schema": schema}}}


def _query(name: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": "query",
        "required": False,
        "schema": schema,
        "description": description,
    }


_DELAY_QUERY = _query(
    DELAY_PARAM,
    {"type": "integer", "minimum": 0},
    "Delay in milliseconds; without it the request is passed through to the homeserver",
)
_CONTENT = {"type": "object", "additionalProperties": True}

SCHEDULE_A: dict[str, Any] = {
    "parameters": [_DELAY_QUERY],
    "requestBody": _json_body(_CONTENT),
}
SCHEDULE_B: dict[str, Any] = {
    "requestBody": _json_body(
        {
            "type": "object",
            "properties": {
                "delay_ms": {"type": "integer", "minimum": 0},
                "delay": {"type": "integer", "minimum": 0},
                "state_key": {"type": "string"},
                "content": _CONTENT,
            },
            "required": ["delay_ms", "content"],
        }
    )
}
ACT: dict[str, Any] = {"requestBody": _json_body({"type": "object"}, required=False)}
ACT_FROM_BODY: dict[str, Any] = {
    "requestBody": _json_body(
        {
            "type": "object",
            "properties": {"action": {"type": "string", "enum": ["send", "cancel", "restart"]}},
            "required": ["action"],
        }
    )
}
LIST: dict[str, Any] = {
    "parameters": [
        _query("status", {"type": "string", "enum": ["scheduled", "finalised"]}, "Which list"),
        _query("delay_id", {"type": "array", "items": {"type": "string"}}, "Only these events"),
        _query("from", {"type": "string"}, "next_batch of the previous page"),
        _query("limit", {"type": "integer", "minimum": 1, "maximum": 1000}, "Page size"),
    ]
}

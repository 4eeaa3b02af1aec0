"""Schema-driven fuzzing with schemathesis: requests generated from the sidecar's own OpenAPI
document, valid and invalid, over every endpoint, through the application and the fake
homeserver. No answer is a 5xx, and every error is a Matrix error."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
import schemathesis
from fastapi import FastAPI
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import Case, GenerationMode

HEADERS = [
    {},
    {"Authorization": "Bearer alice_token"},
    {"Authorization": "Bearer bob_token"},
    {"Authorization": "Bearer unknown"},
]


@pytest.fixture
def settings_overrides() -> dict[str, Any]:
    return {
        "ratelimit_schedule_per_second": 0,
        "ratelimit_manage_per_second": 0,
        "ratelimit_tokenless_per_second": 0,
        "max_scheduled_per_user": 100_000,
    }


def schema_of(app: FastAPI) -> Any:
    return schemathesis.openapi.from_dict(app.openapi())


def cases(mode: GenerationMode) -> st.SearchStrategy[Case]:
    # The document is the same for every application instance; build it from a throwaway one.
    from app.main import create_app
    from tests.conftest import make_settings

    app = create_app(make_settings("postgresql://unused@127.0.0.1:9/none"), start_scheduler=False)
    return schema_of(app).as_strategy(generation_mode=mode)


def httpx_request(case: Case) -> dict[str, Any]:
    """The case as arguments of httpx's `request`."""
    kwargs = case.as_transport_kwargs(base_url="http://sidecar.test")
    request: dict[str, Any] = {
        "method": kwargs["method"],
        "url": kwargs["url"],
        "headers": dict(kwargs.get("headers") or {}),
        "params": kwargs.get("params") or None,
    }
    if "json" in kwargs:
        request["content"] = json.dumps(kwargs["json"]).encode()
        request["headers"].setdefault("Content-Type", "application/json")
    elif kwargs.get("data") is not None:
        data = kwargs["data"]
        request["content"] = data if isinstance(data, bytes) else str(data).encode()
    return request


def assert_matrix_answer(response: httpx.Response, case: Case) -> None:
    where = f"{case.method} {case.formatted_path}: {response.status_code} {response.text[:300]}"
    if case.path == "/ready":
        # The tests drive replays themselves, so the scheduler is stopped and /ready says so.
        assert response.json()["scheduler"] == "stopped", where
        return
    assert response.status_code < 500, where
    if response.status_code >= 400:
        body = response.json()
        assert isinstance(body, dict), where
        assert isinstance(body.get("errcode"), str), where
        assert isinstance(body.get("error"), str), where


FUZZ = settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.filter_too_much,
        HealthCheck.data_too_large,
    ],
)


def test_every_route_is_in_the_schema(app: FastAPI) -> None:
    operations = {
        (method.upper(), path) for path, item in app.openapi()["paths"].items() for method in item
    }
    assert len(operations) >= 20
    body_routes = [
        op
        for path, item in app.openapi()["paths"].items()
        for method, op in item.items()
        if "delayed_event" in path or "/send/" in path or "/state/" in path
        if method in ("put", "post")
    ]
    assert body_routes
    assert all("requestBody" in op for op in body_routes)


@FUZZ
@given(case=cases(GenerationMode.POSITIVE), headers=st.sampled_from(HEADERS))
async def test_valid_requests(
    client: httpx.AsyncClient, case: Case, headers: dict[str, str]
) -> None:
    request = httpx_request(case)
    request["headers"].update(headers)
    response = await client.request(**request)
    assert_matrix_answer(response, case)


@FUZZ
@given(case=cases(GenerationMode.NEGATIVE), headers=st.sampled_from(HEADERS))
async def test_invalid_requests(
    client: httpx.AsyncClient, case: Case, headers: dict[str, str]
) -> None:
    request = httpx_request(case)
    request["headers"].update(headers)
    try:
        response = await client.request(**request)
    except (httpx.InvalidURL, UnicodeEncodeError):
        return  # not a request any HTTP client can send
    assert_matrix_answer(response, case)

"""Prometheus metrics. Labels carry generations, outcomes and errcodes: never user ids, room ids,
tokens or content."""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import Counter, Gauge, Histogram, Info
from starlette.types import ASGIApp, Receive, Scope, Send

BUILD = Info("sidecar_build", "The running sidecar's version")
SCHEDULED_NOW = Gauge(
    "sidecar_scheduled_delayed_events",
    "Delayed events scheduled and not yet finalised, read from the shared database at scrape time "
    "(exact up to 10000, the planner's estimate beyond): every replica reports the same number, so "
    "aggregate with max, not sum",
)
OLDEST_OVERDUE_SECONDS = Gauge(
    "sidecar_oldest_overdue_event_age_seconds",
    "How long past its send time the oldest scheduled, not yet sent, delayed event is (0 when none "
    "is overdue); read from the shared database at scrape time, so aggregate with max",
)
DATABASE_POOL_IN_USE = Gauge(
    "sidecar_database_pool_connections_in_use",
    "Database connections this replica has checked out of its pool",
)
SCRAPE_ERRORS = Counter(
    "sidecar_metrics_database_errors_total",
    "Scrapes whose database figures could not be read (the gauges keep their last values)",
)
REQUEST_SECONDS = Histogram(
    "sidecar_http_request_duration_seconds",
    "Time to answer an HTTP request, by the route's template and method",
    ["route", "method"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
SCHEDULED = Counter(
    "sidecar_delayed_events_scheduled_total",
    "Scheduling requests, by generation (A: query parameter, B: delayed_event endpoint)",
    ["generation", "outcome"],
)
RESTARTED = Counter(
    "sidecar_delayed_events_restarted_total", "Restart actions", ["generation", "outcome"]
)
CANCELLED = Counter(
    "sidecar_delayed_events_cancelled_total",
    "Cancellations, by the cancel action or by newer state",
    ["generation", "outcome"],
)
SENT = Counter(
    "sidecar_delayed_events_sent_total",
    "Delayed events the homeserver accepted, on timeout (delay) or by the send action",
    ["generation", "outcome"],
)
FAILED = Counter(
    "sidecar_delayed_events_failed_total",
    "Delayed events finalised with the homeserver's refusal or after the retry window",
    ["generation", "outcome"],
)
RETRIED = Counter(
    "sidecar_replay_retries_total", "Replays put off after a transient homeserver failure"
)
REPLAY_SECONDS = Histogram(
    "sidecar_replay_duration_seconds",
    "Time the homeserver took to take one replayed event",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
LATENESS_SECONDS = Histogram(
    "sidecar_replay_lateness_seconds",
    "How long after its send time a delayed event was accepted by the homeserver",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 3600),
)
HOMESERVER_ERRORS = Counter(
    "sidecar_homeserver_errors_total",
    "Error answers from the homeserver (or unreachable / bad_response), by errcode",
    ["errcode"],
)


# Errcodes worth a label of their own; anything else a homeserver says is counted as "other", so
# that a misbehaving homeserver cannot create an unbounded number of series.
_KNOWN_ERRCODES = frozenset(
    {
        "M_BAD_JSON",
        "M_CANCELLED_BY_STATE_UPDATE",
        "M_FORBIDDEN",
        "M_GUEST_ACCESS_FORBIDDEN",
        "M_INVALID_PARAM",
        "M_LIMIT_EXCEEDED",
        "M_MISSING_PARAM",
        "M_MISSING_TOKEN",
        "M_NOT_FOUND",
        "M_NOT_JSON",
        "M_RESOURCE_LIMIT_EXCEEDED",
        "M_TOO_LARGE",
        "M_UNKNOWN",
        "M_UNKNOWN_DEVICE",
        "M_UNKNOWN_TOKEN",
        "M_UNRECOGNIZED",
        "M_USER_DEACTIVATED",
        "M_USER_SUSPENDED",
        "M_USER_LOCKED",
        "ORG.MATRIX.MSC4326.M_UNKNOWN_DEVICE",
        "bad_response",
        "unreachable",
    }
)


def errcode_label(errcode: object) -> str:
    """A bounded label for an errcode."""
    return errcode if isinstance(errcode, str) and errcode in _KNOWN_ERRCODES else "other"


# The ASGI scope key under which a handler that answers ahead of routing (the heartbeat) names
# the route template it serves.
ROUTE_TEMPLATE = "delayed_events.route_template"
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"})


class RequestMetricsMiddleware:
    """Time each HTTP request into REQUEST_SECONDS, labelled by the template of the route that
    answered it (`unmatched` when none did), never by the path itself. The labelled children are
    kept, so that a request costs a dictionary look-up and one observation."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._children: dict[tuple[str, str], Any] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        try:
            await self.app(scope, receive, send)
        finally:
            elapsed = time.perf_counter() - started
            route = str(
                scope.get(ROUTE_TEMPLATE) or getattr(scope.get("route"), "path", "unmatched")
            )
            method = str(scope["method"]) if scope["method"] in _METHODS else "other"
            key = (route, method)
            child = self._children.get(key)
            if child is None:
                child = self._children[key] = REQUEST_SECONDS.labels(route, method)
            child.observe(elapsed)

"""Prometheus metrics. Labels carry generations, outcomes and errcodes: never user ids, room ids,
tokens or content."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

SCHEDULED_NOW = Gauge(
    "sidecar_scheduled_delayed_events",
    "Delayed events scheduled and not yet finalised (read from the database at scrape time)",
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

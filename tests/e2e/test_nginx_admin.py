"""The sidecar's admin API (`/_sidecar/admin/v1/…`) is for its own port only: the public nginx
listener of deploy/nginx/ answers 404 for it and passes nothing on, in any spelling of the path,
also when dot segments would resolve it to a routed path (nginx passes the raw target on)."""

from __future__ import annotations

import pytest

from tests.e2e.support import raw_call
from tests.e2e.test_nginx_routing import Proxy, proxy, route

__all__ = ["proxy"]  # the recording nginx of test_nginx_routing, for this module too

pytestmark = pytest.mark.e2e

ADMIN = "/_sidecar/admin/v1"
ALICE = "%40alice%3Alocalhost"
ROOM = "%21room%3Alocalhost"

ADMIN_REQUESTS = [
    ("GET", f"{ADMIN}/stats"),
    ("GET", f"{ADMIN}/delayed_events?user_id={ALICE}&status=scheduled"),
    ("POST", f"{ADMIN}/delayed_events/abcdef/cancel"),
    ("POST", f"{ADMIN}/users/{ALICE}/cancel"),
    ("POST", f"{ADMIN}/rooms/{ROOM}/cancel"),
    ("POST", f"{ADMIN}/users/{ALICE}/purge"),
    ("GET", "/%5Fsidecar/admin/v1/stats"),
    ("GET", "//_sidecar/admin/v1/stats"),
    ("GET", f"{ADMIN}/stats?org.matrix.msc4140.delay=1"),
]


@pytest.mark.parametrize(("method", "target"), ADMIN_REQUESTS)
def test_the_admin_api_is_not_routed(proxy: Proxy, method: str, target: str) -> None:
    status, seen = route(proxy, method, target)
    assert status == 404
    assert seen == []


# Targets whose path nginx resolves (dot segments, also encoded) to one it routes to the sidecar
# or the homeserver, while the raw target it would pass on still starts with the admin prefix.
TRAVERSALS = [
    f"{ADMIN}/stats/../../../../_matrix/client/v1/delayed_events",
    f"{ADMIN}/stats/%2e%2e/%2e%2e/%2e%2e/%2e%2e/_matrix/client/v1/delayed_events",
    f"{ADMIN}/users/x/../../../../../_matrix/client/versions",
    f"{ADMIN}/x/../../../../_matrix/client/v3/rooms/{ROOM}/send/m.room.message/t1",
    "/_matrix/client/v1/delayed_events/../../../../_sidecar/admin/v1/stats",
]


@pytest.mark.parametrize("target", TRAVERSALS)
def test_dot_segments_do_not_lead_to_the_admin_api(proxy: Proxy, target: str) -> None:
    proxy.recorder.take()
    answer = raw_call(proxy.url, "GET", target)
    seen = proxy.recorder.take()
    assert not any(path.startswith("/_sidecar") for _, _, path in seen), seen
    assert answer.status in (400, 404), answer.status
    assert answer.json()["errcode"] == "M_UNRECOGNIZED"

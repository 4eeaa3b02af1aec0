"""What the routes need, built once in the lifespan and found on the application's state."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.requests import Request

from app.auth import Authenticator
from app.health import HealthService
from app.homeserver import Homeserver
from app.lookups import Lookups
from app.ratelimit import RateLimits
from app.replay import ReplayEngine, ReplayRunner
from app.scheduler import WakeUpScheduler
from app.service import DelayedEventService
from app.settings import Settings


@dataclass
class Container:
    settings: Settings
    engine: AsyncEngine
    homeserver: Homeserver
    # The replays' own client (own connection pool); `homeserver` serves what clients send.
    replay_homeserver: Homeserver
    auth: Authenticator
    service: DelayedEventService
    replay_engine: ReplayEngine
    replay: ReplayRunner
    lookups: Lookups
    scheduler: WakeUpScheduler
    limits: RateLimits
    health: HealthService


def container(request: Request) -> Container:
    found: Container = request.app.state.container
    return found

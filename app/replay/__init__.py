"""Replaying delayed events to the homeserver, as the user who scheduled them.

- `wakeup`: the one wake-up, shared by whoever asks for a time and the scheduler;
- `runner` and `run`: runs that claim what is due and work it off room by room;
- `claims`: the claims a run or a send action holds, kept alive until their outcomes are written;
- `engine`: one attempt at sending one event, and its outcome;
- `order`: what of a room may go out side by side;
- `state_checks`: newer-state checks started ahead of their sends;
- `outcomes`: the batched writes of sent events' outcomes;
- `send_action`: the send action of the request path;
- `tokens`: the sealed credential, sealed at schedule time and opened at replay time.
"""

from app.replay.claims import ClaimKeeper
from app.replay.engine import (
    CANCELLED_BY_STATE,
    NEWER_STATE_ERROR,
    Attempt,
    Lost,
    NewerState,
    ReplayEngine,
    longest_attempt_seconds,
    request_deadline_seconds,
    txn_id_for,
)
from app.replay.order import next_group, side_by_side
from app.replay.outcomes import OutcomeWriter, count_sent, log_id
from app.replay.run import Run
from app.replay.runner import ReplayRunner
from app.replay.send_action import CancelledByNewerState, SendAction, TakenOver
from app.replay.state_checks import StateChecks
from app.replay.tokens import Credentials, RecentSeals, SealedToken, token_context
from app.replay.wakeup import WakeUp

__all__ = [
    "CANCELLED_BY_STATE",
    "CancelledByNewerState",
    "NEWER_STATE_ERROR",
    "Attempt",
    "ClaimKeeper",
    "Credentials",
    "RecentSeals",
    "Lost",
    "NewerState",
    "OutcomeWriter",
    "ReplayEngine",
    "ReplayRunner",
    "Run",
    "SealedToken",
    "SendAction",
    "StateChecks",
    "TakenOver",
    "WakeUp",
    "count_sent",
    "log_id",
    "longest_attempt_seconds",
    "next_group",
    "request_deadline_seconds",
    "side_by_side",
    "token_context",
    "txn_id_for",
]

"""The MatrixRTC heartbeat: `POST …/delayed_events/{id}/restart` with the owner's token, rotating
over call-member "leave" events of several users, closed loop (wrk) and open loop at fixed rates
(bench/loadgen.py), against each target in turn."""

from __future__ import annotations

import asyncio
import json
import resource
import shlex
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from client import RTC_TYPE, MatrixClient, bounded
from devstack import matrix
from services import PYTHON, REPO, Services

RESTART = "/_matrix/client/unstable/org.matrix.msc4140/delayed_events/{}/restart"
USERS = 4
EVENTS_PER_USER = 50
# Long enough that no heartbeat event fires between two runs that restart it; the cost of a
# restart does not depend on the delay.
DELAY_MS = 30 * 60 * 1000


@dataclass(frozen=True)
class Target:
    name: str
    host_port: int
    targets_file: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.host_port}"


async def schedule_calls(
    register: Callable[[str], matrix.Account], homeserver_url: str, schedule_url: str
) -> list[tuple[str, str]]:
    """USERS users, each in a room of their own holding EVENTS_PER_USER devices' delayed leaves,
    scheduled through `schedule_url` (the sidecar, or the native Synapse itself)."""
    ids: list[tuple[str, str]] = []
    for u in range(USERS):
        account = register(f"hb{u}")
        hs = MatrixClient(homeserver_url, account.access_token)
        scheduler = MatrixClient(schedule_url, account.access_token, connections=8)
        try:
            room = await hs.create_room()
            jobs = [
                (
                    lambda d=d, s=scheduler, r=room, uid=account.user_id: s.delayed_state(
                        r, RTC_TYPE, f"_{uid}_DEVICE{d}_m.call", {}, DELAY_MS
                    )
                )
                for d in range(EVENTS_PER_USER)
            ]
            for delay_id in await bounded(8, jobs):
                ids.append((RESTART.format(delay_id), account.access_token))
        finally:
            await hs.close()
            await scheduler.close()
    return ids


def _write(path: Path, ids: list[tuple[str, str]]) -> Path:
    path.write_text("".join(f"{p}\t{t}\n" for p, t in ids))
    return path


def prepare(services: Services) -> list[Target]:
    """Schedule the heartbeat events on the sidecar (through the stack's homeserver) and on the
    native Synapse; the trivial app and the generator ceiling get ids that mean nothing."""
    stack, out, native = services.stack, services.out, services.native
    sidecar_ids = asyncio.run(
        schedule_calls(
            lambda name: stack.register(name, "bench-password"),
            stack.homeserver_url,
            stack.sidecar_url,
        )
    )
    native_ids = asyncio.run(
        schedule_calls(
            lambda name: matrix.register(
                native.url, native.registration_shared_secret, name, "bench-password"
            ),
            native.url,
            native.url,
        )
    )
    fake = [(RESTART.format(f"fake{i}"), "token") for i in range(len(sidecar_ids))]
    side_file = _write(out / "heartbeat-sidecar.tsv", sidecar_ids)
    return [
        Target("sidecar", stack.ports.sidecar, side_file),
        Target("sidecar via nginx", stack.ports.client, side_file),
        Target(
            "native Synapse", services.native.port, _write(out / "heartbeat-native.tsv", native_ids)
        ),
        Target("trivial FastAPI", services.trivial_port, _write(out / "heartbeat-fake.tsv", fake)),
    ]


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_wrk(target: Target, connections: int, duration: float) -> dict[str, Any]:
    """Closed loop with wrk: `connections` connections, each sends when it has its answer."""
    cmd = [
        "wrk",
        "-t2",
        f"-c{connections}",
        f"-d{int(duration)}s",
        "--timeout",
        "10s",
        "-s",
        str(REPO / "bench" / "rotate.lua"),
        target.url,
    ]
    cpu0, started = _children_cpu(), time.monotonic()
    result = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        env={"BENCH_TARGETS": str(target.targets_file), "PATH": "/usr/bin:/bin"},
        timeout=duration + 60,
    )
    wall, cpu = time.monotonic() - started, _children_cpu() - cpu0
    line = next(x for x in result.stdout.splitlines() if x.startswith("BENCH_JSON "))
    raw = json.loads(line.removeprefix("BENCH_JSON "))
    errors = sum(raw[k] for k in ("connect", "read", "write", "status", "timeout"))
    return {
        "rate": (raw["requests"] - errors) / (raw["duration_us"] / 1e6),
        "errors": errors,
        "latency_ms": raw["latency_ms"],
        "generator_cpu_share": cpu / wall,
        "command": f"BENCH_TARGETS={target.targets_file.name} " + shlex.join(cmd),
    }


def run_loadgen(
    target: Target, rate: float, duration: float, connections: int = 64, timeout: float = 5.0
) -> dict[str, Any]:
    """Open loop (or closed, with rate 0) with bench/loadgen.py."""
    cmd = [
        str(PYTHON),
        str(REPO / "bench" / "loadgen.py"),
        "--port",
        str(target.host_port),
        "--targets",
        str(target.targets_file),
        "--rate",
        f"{rate:g}",
        "--duration",
        f"{duration:g}",
        "--connections",
        str(connections),
        "--timeout",
        f"{timeout:g}",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + timeout + 60)
    if result.returncode != 0:
        raise RuntimeError(f"loadgen failed: {result.stderr[-2000:]}")
    answer: dict[str, Any] = json.loads(result.stdout)
    answer["command"] = shlex.join(["bench/loadgen.py", *cmd[2:]]).replace(
        str(target.targets_file), target.targets_file.name
    )
    return answer

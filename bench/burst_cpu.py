"""Where the CPU goes in a burst: CPU-seconds used by the sidecar, Synapse and PostgreSQL while
one burst is scheduled through the sidecar and delivered, against the same events sent straight
to Synapse (plain, unordered), per event. With --profile, py-spy records the sidecar during the
second repeat of each case (raw folded stacks, into bench/out/; needs `.venv/bin/pip install
py-spy`). Run `bench/run --quick` once first, or `scripts/setup sidecar synapse nginx`.

    .venv/bin/python bench/burst_cpu.py 2000:100:2:message 50:1:0:leave [--repeats 2] [--profile]

A case is N:ROOMS:SPREAD_SECONDS:KIND (KIND message or leave), as in bench/bursts.py. Starts and
stops its own stack (bench/services.py), like bench/run; run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
from pathlib import Path

from bursts import Bursts, Case
from services import REPO, running

TICKS = os.sysconf("SC_CLK_TCK")
OUT = REPO / "bench" / "out"


def cpu_seconds(pid: int, *, children: bool = False) -> float:
    """User + system CPU time of one process (and of its children that have ended)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])
    if children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / TICKS


def postgres_seconds(postmaster: int) -> float:
    """CPU time of the stack's PostgreSQL: every live postgres process, plus the backends that
    have ended (counted in the postmaster's children's time)."""
    total = cpu_seconds(postmaster, children=True)
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == postmaster:
            continue
        try:
            if (entry / "comm").read_text().strip() == "postgres":
                total += cpu_seconds(int(entry.name))
        except (OSError, IndexError, ValueError):
            continue
    return total


def parse_case(text: str) -> Case:
    n, rooms, spread, kind = text.split(":")
    return Case(int(n), int(rooms), float(spread), kind)


async def measure(cases: list[Case], repeats: int, profile: bool) -> None:
    with running(OUT) as services:
        sidecar = services.stack.processes["sidecar"].pid
        synapse = services.stack.processes["synapse"].pid
        postmaster = services.stack.processes["postgres"].pid

        def usage() -> tuple[float, float, float]:
            return cpu_seconds(sidecar), cpu_seconds(synapse), postgres_seconds(postmaster)

        print(
            "case | sends | repeat | events/s | CPU s sidecar / Synapse / PostgreSQL | "
            "CPU ms per event sidecar / Synapse / PostgreSQL"
        )
        async with Bursts(services) as bursts:
            for case in cases:
                for repeat in range(repeats):
                    for mode in ("sidecar", "plain"):
                        spy = None
                        if profile and mode == "sidecar" and repeat == 1:
                            target = OUT / f"burst-cpu-{case.n}-{case.rooms}-{case.kind}.txt"
                            spy = subprocess.Popen(
                                [
                                    str(REPO / ".venv/bin/py-spy"),
                                    "record",
                                    "-p",
                                    str(sidecar),
                                    "-o",
                                    str(target),
                                    "-f",
                                    "raw",
                                    "-r",
                                    "200",
                                    "-d",
                                    str(int(20 + case.n / 40)),
                                ],
                                stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL,
                            )
                        before = (
                            cpu_seconds(sidecar),
                            cpu_seconds(synapse),
                            postgres_seconds(postmaster),
                        )
                        if mode == "sidecar":
                            result = await bursts.sidecar_run(case)
                        else:
                            result = await bursts.plain_run(case)
                        after = (
                            cpu_seconds(sidecar),
                            cpu_seconds(synapse),
                            postgres_seconds(postmaster),
                        )
                        used = [b - a for a, b in zip(before, after, strict=True)]
                        per_event = " / ".join(f"{u * 1000 / case.n:.2f}" for u in used)
                        print(
                            f"{case.name} | {mode} | {repeat + 1} | {result['rate']:.1f} | "
                            + " / ".join(f"{u:.2f}" for u in used)
                            + f" | {per_event}",
                            flush=True,
                        )
                        if spy is not None:
                            spy.wait()
                        await asyncio.sleep(2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("cases", nargs="+", type=parse_case)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--profile", action="store_true", help="py-spy the sidecar (needs py-spy)")
    args = parser.parse_args()
    asyncio.run(measure(args.cases, args.repeats, args.profile))


if __name__ == "__main__":
    main()

"""Every benchmark against the local stack, in one run: heartbeat, bursts, scale, and the capacity
model's per-operation costs (bench/capacity.py, on servers of its own). `bench/run`
starts this after installing what it needs; see docs/benchmarks.md for what each figure means.

Each figure is the median of repeats interleaved across targets (A, B, C, A, B, C, …), so that
a noisy neighbour slows every target alike rather than one of them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import capacity
from bursts import REPLAY_CONCURRENCY, Bursts, Case
from heartbeat import Target, prepare, run_loadgen, run_wrk
from scale import Scale
from services import REPO, Services, baseline_sidecar, resolve_baseline, running


@dataclass(frozen=True)
class Plan:
    reps: int
    duration: float
    closed: tuple[int, ...]
    rates: tuple[int, ...]
    bursts: tuple[Case, ...]
    scale_rows: int
    scale_duration: float


FULL = Plan(
    reps=3,
    duration=6,
    closed=(10, 50),
    rates=(300, 1000, 3000),
    bursts=(
        Case(500, 1, 2.0, "message"),
        Case(500, 100, 2.0, "message"),
        Case(2000, 1, 2.0, "message"),
        Case(2000, 100, 2.0, "message"),
        Case(50, 1, 0.0, "leave"),
        Case(10, 10, 0.0, "message"),
        Case(25, 25, 0.0, "message"),
        Case(50, 50, 0.0, "message"),
    ),
    scale_rows=1_000_000,
    scale_duration=5,
)
QUICK = Plan(
    reps=1,
    duration=3,
    closed=(10, 50),
    rates=(300, 1000, 3000),
    bursts=(
        Case(200, 1, 2.0, "message"),
        Case(200, 100, 2.0, "message"),
        Case(50, 1, 0.0, "leave"),
        Case(50, 50, 0.0, "message"),
    ),
    scale_rows=100_000,
    scale_duration=3,
)


def median(values: list[float]) -> float:
    clean = [v for v in values if v == v]
    return statistics.median(clean) if clean else float("nan")


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def rotated(items: list[Any], by: int) -> list[Any]:
    by %= len(items)
    return items[by:] + items[:by]


# -- heartbeat ---------------------------------------------------------------------------------


def heartbeat(services: Services, plan: Plan, baseline: str | None) -> dict[str, Any]:
    targets = prepare(services)
    if baseline is None:
        return _heartbeat(services, plan, targets)
    with baseline_sidecar(services.stack, baseline, services.out / "baseline") as port:
        before = Target(f"sidecar at {baseline}", port, targets[0].targets_file)
        return _heartbeat(services, plan, [*targets[:2], before, *targets[2:]])


def _heartbeat(services: Services, plan: Plan, targets: list[Target]) -> dict[str, Any]:
    static = Target(
        "nginx return 200 (generator ceiling)", services.static_port, targets[-1].targets_file
    )
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {}
    workloads: list[tuple[str, Any]] = [(f"closed {c}", c) for c in plan.closed]
    workloads += [(f"open {r}/s", r) for r in plan.rates]

    def record(workload: str, target: Target, result: dict[str, Any]) -> None:
        runs.setdefault(workload, {}).setdefault(target.name, []).append(result)

    for rep in range(plan.reps):
        for workload, value in workloads:
            for target in rotated(targets, rep):
                log(f"heartbeat rep {rep + 1}/{plan.reps}: {workload} -> {target.name}")
                if workload.startswith("closed"):
                    result = run_wrk(target, value, plan.duration)
                else:
                    result = run_loadgen(target, value, plan.duration)
                record(workload, target, result)
        # The generators' own ceiling, interleaved with the rest.
        log(f"heartbeat rep {rep + 1}/{plan.reps}: generator ceilings")
        record("generator ceiling: wrk closed 50", static, run_wrk(static, 50, plan.duration))
        record(
            "generator ceiling: loadgen closed 64",
            static,
            run_loadgen(static, 0, plan.duration),
        )
        record(
            f"generator ceiling: loadgen open {max(plan.rates)}/s",
            static,
            run_loadgen(static, max(plan.rates), plan.duration),
        )
    return runs


def summarise_heartbeat(runs: dict[str, dict[str, list[dict[str, Any]]]]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for workload, by_target in runs.items():
        for name, results in by_target.items():
            summary.setdefault(workload, {})[name] = {
                "rate": median([r["rate"] for r in results]),
                "p50": median([r["latency_ms"]["50"] for r in results]),
                "p99": median([r["latency_ms"]["99"] for r in results]),
                "p99.9": median([r["latency_ms"]["99.9"] for r in results]),
                "errors": sum(r["errors"] for r in results),
                "generator_cpu": median([r["generator_cpu_share"] for r in results]),
                "repeats": len(results),
                "command": results[0]["command"],
            }
    return summary


# -- bursts ------------------------------------------------------------------------------------


async def bursts(services: Services, plan: Plan) -> dict[str, Any]:
    results: dict[str, dict[str, list[dict[str, Any]]]] = {}
    async with Bursts(services) as b:
        for rep in range(plan.reps):
            for case in plan.bursts:
                for mode in rotated(["sidecar", "plain", "ordered"], rep):
                    log(f"bursts rep {rep + 1}/{plan.reps}: {case.name} ({mode})")
                    run = {"sidecar": b.sidecar_run, "plain": b.plain_run, "ordered": b.ordered_run}
                    outcome = await run[mode](case)
                    results.setdefault(case.name, {}).setdefault(mode, []).append(outcome)
                    await asyncio.sleep(1.0)
    return results


def summarise_bursts(results: dict[str, dict[str, list[dict[str, Any]]]]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for name, modes in results.items():
        side = modes["sidecar"]
        pooled = sorted(x for r in side for x in r["lateness_s"])
        row: dict[str, Any] = {
            "n": side[0]["n"],
            "repeats": len(side),
            "sidecar_rate": median([r["rate"] for r in side]),
            "sidecar_drain_s": median([r["drain_s"] for r in side]),
            "lost": sum(r["lost"] for r in side),
            "duplicated": sum(r["duplicated"] for r in side),
            "scheduled_late": sum(r["scheduled_late"] for r in side),
            "scheduling_rate": median([r["scheduling_rate"] for r in side]),
            "lateness_p50_ms": _pct(pooled, 50) * 1000,
            "lateness_p99_ms": _pct(pooled, 99) * 1000,
            "lateness_max_ms": (pooled[-1] if pooled else float("nan")) * 1000,
            "lateness_s": pooled,
        }
        # Two homeserver baselines: "plain" (unordered sends) and "ordered" (one at a time per
        # room, in order, as the sidecar replays), each as the sidecar's rate against theirs,
        # repeat by repeat (the runs of one repeat are interleaved).
        for mode in ("plain", "ordered"):
            if mode not in modes:
                continue
            base = modes[mode]
            row[f"{mode}_rate"] = median([r["rate"] for r in base])
            row[f"{mode}_drain_s"] = median([r["drain_s"] for r in base])
            row[f"{mode}_lost"] = sum(r["lost"] for r in base)
            row[f"{mode}_duplicated"] = sum(r["duplicated"] for r in base)
            base_pooled = sorted(x for r in base for x in r["latency_s"])
            row[f"{mode}_p50_ms"] = _pct(base_pooled, 50) * 1000
            row[f"{mode}_p99_ms"] = _pct(base_pooled, 99) * 1000
            row[f"{mode}_latency_s"] = base_pooled
            row[f"vs_{mode}"] = median(
                [s["rate"] / b["rate"] for s, b in zip(side, base, strict=False)]
            )
        if "plain" in modes:
            plain = modes["plain"]
            # The sidecar cannot finish before its last event is due (spread_s after the first),
            # nor faster than the homeserver takes the same sends: its drain time against the
            # longer of those two bounds, per repeat.
            ratios = [
                min(1.0, max(s["spread_s"], p["drain_s"]) / s["drain_s"])
                for s, p in zip(side, plain, strict=False)
            ]
            row["vs_ceiling"] = median(ratios)
        summary[name] = row
    return summary


def _pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    return values[max(0, min(len(values) - 1, int(-(-p * len(values) // 100)) - 1))]


# -- scale -------------------------------------------------------------------------------------


def scale(services: Services, plan: Plan) -> dict[str, Any]:
    s = Scale(services, plan.scale_rows)
    log(f"scale: preparing two databases, bulk-inserting {plan.scale_rows:,} rows")
    s.prepare()
    log(f"scale: bulk insert took {s.bulk_seconds:.1f} s")
    runs: dict[str, list[dict[str, Any]]] = {}
    for rep in range(plan.reps):
        for database in rotated(["scale_empty", "scale_full"], rep):
            log(f"scale rep {rep + 1}/{plan.reps}: {database}")
            runs.setdefault(database, []).append(s.measure(database, 300, plan.scale_duration))
    summary = {
        database: {
            "startup_s": median([r["startup_s"] for r in results]),
            "rss_ready_mb": median([r["rss_ready_mb"] for r in results]),
            "rss_after_mb": median([r["rss_after_mb"] for r in results]),
            "restart_p50": median([r["restart"]["latency_ms"]["50"] for r in results]),
            "restart_p99": median([r["restart"]["latency_ms"]["99"] for r in results]),
            "errors": sum(r["restart"]["errors"] for r in results),
            "repeats": len(results),
            "command": results[0]["restart"]["command"],
        }
        for database, results in runs.items()
    }
    return {"rows": plan.scale_rows, "bulk_insert_s": s.bulk_seconds, "summary": summary}


# -- the run -----------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    model = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    mem = Path("/proc/meminfo").read_text().splitlines()[0].split()[1]
    synapse = "not installed"
    if (REPO / ".venv-synapse").exists():  # the capacity section alone runs without it
        synapse = subprocess.run(
            [
                str(REPO / ".venv-synapse" / "bin" / "python"),
                "-c",
                "import synapse; print(synapse.__version__)",
            ],
            capture_output=True,
            text=True,
            cwd="/",  # Synapse adds the git state of its working folder to its version
        ).stdout.strip()
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO
    ).stdout.strip()
    return {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": os.cpu_count(),
        "cpu": model,
        "memory_gib": round(int(mem) / 1024 / 1024, 1),
        "python": platform.python_version(),
        "synapse": synapse,
        "commit": commit,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="one short repeat of each, a smoke run"
    )
    parser.add_argument(
        "--only",
        choices=["heartbeat", "bursts", "scale", "capacity"],
        action="append",
        help="run only these",
    )
    parser.add_argument(
        "--baseline",
        default="auto",
        help="a commit whose sidecar also runs the heartbeat, for before/after figures; "
        "'auto' = before restarts were batched, 'none' = skip",
    )
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out")
    parser.add_argument("--plots", type=Path, default=None, help="where the PNGs go")
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else FULL
    baseline = resolve_baseline(args.baseline)
    sections = args.only or ["heartbeat", "bursts", "scale", "capacity"]
    # The capacity section starts servers of its own, after the stack is down.
    on_stack = [s for s in sections if s != "capacity"]
    out: Path = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    plots = (args.plots or (out if args.quick else REPO / "docs" / "benchmarks")).resolve()
    started = time.monotonic()
    results: dict[str, Any] = {"machine": machine(), "quick": args.quick, "plan": repr(plan)}
    results["replay_concurrency"] = REPLAY_CONCURRENCY
    results["baseline"] = baseline
    failed = []
    with running(out) if on_stack else contextlib.nullcontext() as services:
        for section in on_stack:
            try:
                if section == "heartbeat":
                    runs = heartbeat(services, plan, baseline)
                    results["heartbeat"] = summarise_heartbeat(runs)
                elif section == "bursts":
                    results["bursts"] = summarise_bursts(asyncio.run(bursts(services, plan)))
                else:
                    results["scale"] = scale(services, plan)
            except Exception:
                # The other sections still run and report; the run as a whole fails.
                log(f"{section} failed:\n{traceback.format_exc()}")
                failed.append(section)
    if "capacity" in sections:
        try:
            results["capacity"] = capacity.run(args.quick, out)
        except Exception:
            log(f"capacity failed:\n{traceback.format_exc()}")
            failed.append("capacity")
    results["elapsed_s"] = time.monotonic() - started
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    from report import plot, tables

    text = tables(results)
    (out / "tables.md").write_text(text)
    if "heartbeat" in results or "bursts" in results:
        plot(results, plots)
    print(text)
    print(f"results: {out / 'results.json'}; plots in {plots}")
    if failed:
        print(f"FAILED: {', '.join(failed)} (see the log above)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

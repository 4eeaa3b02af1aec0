"""Tables (Markdown) and plots (PNG) from a run's results."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any


def _f(value: float, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if math.isinf(value):
        return "∞ (saturated)"
    return f"{value:,.{digits}f}"


def tables(results: dict[str, Any]) -> str:
    m = results["machine"]
    lines = [
        f"Run {m['date']} at {m['commit']}: {m['nproc']} × {m['cpu']}, {m['memory_gib']} GiB, "
        f"Python {m['python']}, Synapse {m['synapse']}"
        f"{' (quick mode)' if results['quick'] else ''}; took {results['elapsed_s'] / 60:.1f} min.",
        "",
    ]
    if "heartbeat" in results:
        lines += _heartbeat(results["heartbeat"], results.get("baseline"))
    if "bursts" in results:
        lines += _bursts(results["bursts"], results["replay_concurrency"])
    if "scale" in results:
        lines += _scale(results["scale"])
    if "capacity" in results:
        lines += capacity_tables(results["capacity"]).splitlines()
    return "\n".join(lines) + "\n"


def _heartbeat(summary: dict[str, Any], baseline: str | None) -> list[str]:
    lines = [
        "### Heartbeat: POST …/delayed_events/{id}/restart",
        "",
        "| workload | target | ok req/s | p50 ms | p99 ms | p99.9 ms | errors | generator CPU |",
        "|---|---|--:|--:|--:|--:|--:|--:|",
    ]
    commands = []
    for workload, by_target in summary.items():
        for name, row in by_target.items():
            lines.append(
                f"| {workload} | {name} | {_f(row['rate'], 0)} | {_f(row['p50'], 2)} | "
                f"{_f(row['p99'], 2)} | {_f(row['p99.9'], 2)} | {row['errors']} | "
                f"{_f(row['generator_cpu'] * 100, 0)} % |"
            )
            commands.append(f"- {workload}, {name} (×{row['repeats']}): `{row['command']}`")
    closed = [w for w in summary if w.startswith("closed")]
    ratios = []
    for workload in closed:
        row = summary[workload]
        before = f"sidecar at {baseline}"
        if before in row:
            ratios.append(
                f"{workload}: sidecar {row['sidecar']['rate'] / row[before]['rate']:.1f}× "
                f"the sidecar at {baseline}"
            )
        if "sidecar" in row and "native Synapse" in row:
            ratios.append(
                f"{workload}: sidecar {row['sidecar']['rate'] / row['native Synapse']['rate']:.1f}×"
                f" native Synapse, via nginx "
                f"{row['sidecar via nginx']['rate'] / row['native Synapse']['rate']:.1f}×"
            )
    lines += ["", "Restart throughput (closed loop): " + "; ".join(ratios) + ".", ""]
    lines += ["Commands (targets files hold `PATH<TAB>TOKEN` lines):", "", *commands, ""]
    return lines


def _bursts(summary: dict[str, Any], concurrency: int) -> list[str]:
    lines = [
        "### Bursts: when delayed events reach a /sync client",
        "",
        f"Plain = the same events as ordinary sends straight to Synapse, {concurrency} at a time "
        "(the sidecar's replay concurrency) in no particular order; ordered plain = the same "
        "sends one at a time per room, each once the previous one is answered, in send order, "
        f"with up to {concurrency} rooms side by side (the order the sidecar keeps). Both start "
        "as one go, as if all were due then. Lateness = /sync arrival − due time; (ordered) plain "
        "p50 / p99 = /sync arrival − start of those sends (the homeserver's own floor). vs "
        "unordered / "
        "vs ordered plain sends = the sidecar's events/s / that baseline's, per repeat. vs own "
        "ceiling = the longer of (due-time spread, plain drain time) / the sidecar's drain time "
        "(first due → last arrival).",
        "",
        "| case | sidecar events/s | plain events/s | ordered plain events/s "
        "| vs unordered plain sends | vs ordered plain sends | vs own ceiling "
        "| lateness p50 / p99 / max ms | plain p50 / p99 ms | ordered plain p50 / p99 ms "
        "| lost | duplicated | scheduled late |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]

    def pct(row: dict[str, Any], key: str) -> str:
        value = row.get(key)
        return "—" if value is None or math.isnan(value) else f"{value * 100:.0f} %"

    def p50_p99(row: dict[str, Any], mode: str) -> str:
        return (
            f"{_f(row.get(f'{mode}_p50_ms', math.nan), 0)} / "
            f"{_f(row.get(f'{mode}_p99_ms', math.nan), 0)}"
        )

    for name, row in summary.items():
        lines.append(
            f"| {name} (×{row['repeats']}) | {_f(row['sidecar_rate'], 0)} | "
            f"{_f(row.get('plain_rate', math.nan), 0)} | "
            f"{_f(row.get('ordered_rate', math.nan), 0)} | {pct(row, 'vs_plain')} | "
            f"{pct(row, 'vs_ordered')} | {pct(row, 'vs_ceiling')} | "
            f"{_f(row['lateness_p50_ms'], 0)} / {_f(row['lateness_p99_ms'], 0)} / "
            f"{_f(row['lateness_max_ms'], 0)} | {p50_p99(row, 'plain')} | "
            f"{p50_p99(row, 'ordered')} | {row['lost']} | {row['duplicated']} | "
            f"{row['scheduled_late']} |"
        )
    baseline_lost = sum(
        row.get("plain_lost", 0) + row.get("ordered_lost", 0) for row in summary.values()
    )
    baseline_duplicated = sum(
        row.get("plain_duplicated", 0) + row.get("ordered_duplicated", 0)
        for row in summary.values()
    )
    lines += [
        "",
        f"Baselines: {baseline_lost} lost, {baseline_duplicated} duplicated over all plain and "
        "ordered plain sends.",
        "",
    ]
    return lines


def _scale(scale: dict[str, Any]) -> list[str]:
    lines = [
        f"### Scale: {scale['rows']:,} scheduled rows (bulk insert {scale['bulk_insert_s']:.0f} s)",
        "",
        "| table | start-up to /ready s | RSS at ready MB | RSS after load MB "
        "| restart p50 / p99 ms at 300/s | errors |",
        "|---|--:|--:|--:|--:|--:|",
    ]
    for database, row in scale["summary"].items():
        label = "empty" if database.endswith("empty") else f"{scale['rows']:,} rows"
        lines.append(
            f"| {label} (×{row['repeats']}) | {_f(row['startup_s'], 2)} | "
            f"{_f(row['rss_ready_mb'], 1)} | {_f(row['rss_after_mb'], 1)} | "
            f"{_f(row['restart_p50'], 2)} / {_f(row['restart_p99'], 2)} | {row['errors']} |"
        )
    command = next(iter(scale["summary"].values()))["command"]
    lines += ["", f"Restart load: `{command}`", ""]
    return lines


def plot(results: dict[str, Any], where: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    where.mkdir(parents=True, exist_ok=True)
    if "heartbeat" in results:
        summary = results["heartbeat"]
        opens = [w for w in summary if w.startswith("open")]
        rates = [int(w.split()[1].removesuffix("/s")) for w in opens]
        fig, ax = plt.subplots(figsize=(8, 5))
        colours = {
            "sidecar": "tab:blue",
            "sidecar via nginx": "tab:cyan",
            f"sidecar at {results.get('baseline')}": "tab:purple",
            "native Synapse": "tab:red",
            "trivial FastAPI": "tab:gray",
        }
        for name, colour in colours.items():
            for pct, style in (("p50", ":"), ("p99", "-")):
                ys = [summary[w].get(name, {}).get(pct, float("nan")) for w in opens]
                ys = [y if y is not None and math.isfinite(y) else float("nan") for y in ys]
                ax.plot(rates, ys, style, marker="o", color=colour, label=f"{name} {pct}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(rates, [f"{r:,}" for r in rates])
        ax.set_xlabel("offered restarts per second (open loop)")
        ax.set_ylabel("latency from intended send time, ms")
        ax.set_title("Heartbeat restart latency against offered rate (missing point = saturated)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8, ncol=2)
        fig.tight_layout()
        fig.savefig(where / "heartbeat-latency.png", dpi=110)
        plt.close(fig)
    if "bursts" in results:
        fig, ax = plt.subplots(figsize=(8, 5))
        for name, row in results["bursts"].items():
            values = [v * 1000 for v in row["lateness_s"]]
            if not values:
                continue
            ys = [(i + 1) / len(values) for i in range(len(values))]
            (line,) = ax.plot(values, ys, label=name)
            if "due at once" in name:
                # All due together: the homeserver's own arrival times for the same sends are the
                # floor under the sidecar's lateness.
                for mode, style, what in (
                    ("plain", "--", "plain"),
                    ("ordered", ":", "ordered plain"),
                ):
                    base = [v * 1000 for v in row.get(f"{mode}_latency_s", [])]
                    if base:
                        ys = [(i + 1) / len(base) for i in range(len(base))]
                        ax.plot(
                            base,
                            ys,
                            style,
                            color=line.get_color(),
                            label=f"  same events, {what} sends",
                        )
        ax.set_xscale("symlog", linthresh=10)
        ax.set_xlabel(
            "lateness at a /sync client, ms (arrival − due time; plain: − start of sends)"
        )
        ax.set_ylabel("fraction of events")
        ax.set_title(
            "Burst lateness, all repeats pooled (dashed / dotted: plain / ordered plain sends)"
        )
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(where / "burst-lateness.png", dpi=110)
        plt.close(fig)


def capacity_tables(capacity: dict[str, Any]) -> str:
    """The capacity section alone (bench/capacity.py prints it too)."""
    summary, plan = capacity["summary"], capacity["plan"]
    lines = [
        "### Capacity: cost per operation, one replica and two on one database",
        "",
        f"Medians of {plan['reps']} repeat(s), one and two replicas interleaved; each counter's "
        "growth per operation less the same replicas' idle background over as long. Statements "
        "= pg_stat_statements calls (BEGIN/COMMIT included; the pool's pre-ping, an empty query, "
        "is not listed); write transactions = transaction ids assigned.",
        "",
        "| operation | replicas | sidecar CPU µs | PostgreSQL CPU µs | statements | "
        "write transactions | WAL bytes |",
        "|---|--:|--:|--:|--:|--:|--:|",
    ]
    ops = (
        ("restart", f"restart at {plan['restart_rate']:g}/s"),
        ("restart_tokenless", f"restart without a token (the SFU's) at {plan['restart_rate']:g}/s"),
        ("restart_max", "restart, closed loop (64 connections)"),
        ("schedule", f"schedule (call-member leave) at {plan['schedule_rate']:g}/s"),
        ("replay", f"replayed message ({plan['messages']} due at once, {plan['rooms']} rooms)"),
    )
    for key, label in ops:
        for replicas in ("1", "2"):
            if replicas not in summary:
                continue
            row = summary[replicas][key]
            lines.append(
                f"| {label} | {replicas} | {_f(row['sidecar_us'], 0)} | "
                f"{_f(row['postgres_us'], 0)} | {_f(row['statements'], 2)} | "
                f"{_f(row['write_xacts'], 2)} | {_f(row['wal_bytes'], 0)} |"
            )
    lines += [
        "",
        "| replicas | restarts/s closed loop | restart p99 ms at the steady rate | "
        "replay events/s | out-of-order arrivals per repeat | rooms out of order | "
        "duplicated | missing | scheduled late | idle CPU (sidecar / PostgreSQL, % of a core) | "
        "connections held, peak | busy connections, peak (restart / tokenless / closed loop / "
        "schedule / replay) |",
        "|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for replicas in ("1", "2"):
        if replicas not in summary:
            continue
        row = summary[replicas]
        idle = row["idle_per_s"]
        lines.append(
            f"| {replicas} | {_f(row['restart_rate_max'], 0)} | {_f(row['restart_p99_ms'], 2)} | "
            f"{_f(row['replay_rate'], 0)} | {', '.join(map(str, row['out_of_order']))} | "
            f"{', '.join(map(str, row['rooms_out_of_order']))} of {plan['rooms']} | "
            f"{row['duplicates']} | {row['missing']} | {row['scheduled_late']} | "
            f"{_f(idle['sidecar_cpu_s'] * 100, 1)} / {_f(idle['postgres_cpu_s'] * 100, 1)} | "
            f"{row['peak_connections']} | "
            f"{' / '.join(str(n) for n in row['peak_active'].values())} |"
        )
    if "two_over_one" in summary:
        ratio = summary["two_over_one"]
        lines += [
            "",
            f"Two replicas over one (median of per-repeat ratios): restarts "
            f"{ratio['restart_rate_max']:.2f}×, replay {ratio['replay_rate']:.2f}×.",
        ]
    one = summary.get("1") or summary.get("2")
    lines += ["", "Commands (one replica; two replicas: `--port` twice):", ""]
    for op, command in one["commands"].items():
        lines.append(f"- {op}: `{command}`")
    sizes = capacity.get("sizes")
    if sizes and "error" not in sizes:
        lines += [
            "",
            f"Tables at the end: delayed_event rows {sizes['delayed_event_rows']}, device_token "
            f"rows {sizes['device_token_rows']}; bytes (heap + indexes + TOAST) as run "
            f"{sizes['as_run']}, after VACUUM FULL {sizes['compacted']}.",
        ]
    lines += ["", "Statements per phase (one replica, first repeat, calls):", ""]
    for op, queries in one["queries"].items():
        lines.append(f"- {op}: " + "; ".join(f"`{q}` {n}" for q, n in queries.items()))
    return "\n".join(lines) + "\n"

"""The goals, judged, and the table."""

from __future__ import annotations

from typing import Any

# bench/common: bench/ is on sys.path, bench/trigger.py being run as a script.
from trigger_bench.runs import alternations
from trigger_bench.setup import DECODING, FORM_TITLES, VARIANT_TITLES

#: Issue #21's goals, per variant: the application's dispatch throughput at
#: full speed (INSERT and UPDATE forms) against no trigger, and its latency
#: (average and p99) at 500 tps.
GOALS: dict[str, Any] = {
    "throughput_ratio_min": {"ours": 0.85, DECODING: 0.97},
    "latency_ratio_max": {"ours": 1.10, DECODING: 1.03},
    "throughput_forms": ("insert", "update"),
    "commit_to_request_p50_ms_low_rates": 5.0,
    "commit_to_request_p99_ms": 50.0,
    # Both variants: every order's first check at its slot, late by at most 1 s p99.
    "first_check_late_p99_s": 1.0,
}


#: Where each variant's first-check and busy-cpu results are.
PART_KEYS = {
    "ours": ("first_check", "busy_cpu"),
    DECODING: ("first_check_decoding", "busy_cpu_decoding"),
}


def verdicts(results: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for variant, least in GOALS["throughput_ratio_min"].items():
        for form, s in results.get("throughput", {}).items():
            if f"{variant}_tps" not in s["ratios"]:
                continue
            ratio = s["ratios"][f"{variant}_tps"]["median"]
            rounds = len(s["ratios"][f"{variant}_tps"]["per_round"])
            judged = form in GOALS["throughput_forms"]
            out[f"throughput_{variant}_{form}"] = {
                "target": f"{variant} >= {least:.0%} of no trigger"
                + ("" if judged else " (not a goal for this form: shown)"),
                "measured": f"{ratio:.1%} (median of {rounds} rounds)",
                "met": ratio >= least if judged else None,
            }
    for variant, most in GOALS["latency_ratio_max"].items():
        for form, s in results.get("latency", {}).items():
            for key, label in (("latency_avg_ms", "average"), ("latency_p99_ms", "p99")):
                if f"{variant}_{key}" not in s["ratios"]:
                    continue
                ratio = s["ratios"][f"{variant}_{key}"]["median"]
                out[f"latency_{variant}_{form}_{label}"] = {
                    "target": f"{variant} {label} within +{most - 1:.0%} of no trigger",
                    "measured": f"{ratio:.1%} of it",
                    "met": ratio <= most,
                }
    commit = results.get("commit_to_request", [])
    low = [r for r in commit if r["rate"] is not None]
    if low:
        worst = max(r["p50_ms"] for r in low)
        out["commit_to_request_p50_low_rates"] = {
            "target": f"p50 < {GOALS['commit_to_request_p50_ms_low_rates']:g} ms"
            " at the fixed rates",
            "measured": ", ".join(f"{r['p50_ms']:.1f} ms at {r['rate']:g}/s" for r in low),
            "met": worst < GOALS["commit_to_request_p50_ms_low_rates"],
        }
    if commit:
        worst = max(r["p99_ms"] for r in commit)
        out["commit_to_request_p99"] = {
            "target": f"p99 < {GOALS['commit_to_request_p99_ms']:g} ms at every rate",
            "measured": ", ".join(
                f"{r['p99_ms']:.1f} ms at {r['achieved_rate']:,.0f}/s" for r in commit
            ),
            "met": worst < GOALS["commit_to_request_p99_ms"],
        }
    for variant, (key, _) in PART_KEYS.items():
        first = results.get(key, [])
        if not first:
            continue
        worst = max(r["p99_s"] for r in first)
        out[f"first_check_late_p99_{variant}"] = {
            "target": f"{variant}: first check late by at most"
            f" {GOALS['first_check_late_p99_s']:g} s p99 at every rate",
            "measured": ", ".join(
                f"{r['p99_s']:.3f} s at {r['achieved_rate']:,.0f}/s" for r in first
            ),
            "met": worst <= GOALS["first_check_late_p99_s"],
        }
        wrong = sum(r["missed"] + r["before_pull_window"] for r in first)
        out[f"first_check_every_order_{variant}"] = {
            "target": f"{variant}: every order checked, none before its slot's pull window",
            "measured": f"{sum(r['missed'] for r in first)} missed, "
            f"{sum(r['before_pull_window'] for r in first)} too early, over "
            f"{sum(r['orders'] for r in first):,} orders",
            "met": wrong == 0,
        }
    runs = [
        run
        for part in ("throughput", "latency")
        for s in results.get(part, {}).values()
        for run in s["runs"]
    ]
    if runs:
        missed = sum(r["orders_missed"] + r["unexpected_announcements"] for r in runs)
        out["no_order_missed"] = {
            "target": "every order in flight after a run was announced to the daemon"
            " (v1: LISTEN; decoding: read from the slot)",
            "measured": f"{missed} missed or unexpected over {len(runs)} runs",
            "met": missed == 0,
        }
    return out


def ms(value: float) -> str:
    """Milliseconds in at most six characters (a saturated run's are in the thousands)."""
    return f"{value:.2f}" if value < 100 else f"{value:.0f}"


def table(report: dict[str, Any]) -> str:
    m, pg, plan = report["machine"], report["postgres"], report["plan"]
    variants: tuple[str, ...] = tuple(plan["variants"])
    others = [v for v in variants if v != "off"]
    r = report["results"]
    lines = [
        f"order-monitor trigger benchmark (issues #10, #21), {report['started']}",
        f"machine: {m['cpus']} CPUs ({m.get('cpu_model', '?')}), {m.get('memory_gib', '?')} GiB,"
        f" PostgreSQL {pg['server_version']} (synchronous_commit {pg['synchronous_commit']},"
        f" fsync {pg['fsync']}), load average at start {m['loadavg_start'][0]:.2f}",
        f"pgbench {plan['clients']} connections ({plan['threads']} threads, prepared),"
        f" {plan['seconds']:g} s a run, {plan['rounds']} rounds alternating"
        f" {' / '.join(' '.join(o) for o in alternations(min(2, plan['rounds']), variants))}",
    ]
    if plan.get("decoding_note"):
        lines.append(plan["decoding_note"])
    elif plan.get("decoding"):
        lines.append(
            "decoding: wal_level = logical, so every variant writes the WAL logical decoding"
            " needs (the same server for all: the ratios stay fair)"
        )
    lines.append("")
    head = f"{'':<36}" + "".join(f"{VARIANT_TITLES[v]:>17}" for v in variants)
    head += "".join(f"{v + '/none':>16}" for v in others)
    if "throughput" in r:
        lines += ["application tps, full speed (median)", head]
        for form, s in r["throughput"].items():
            med, ratios = s["medians"], s["ratios"]
            lines.append(
                f"{FORM_TITLES[form]:<36}"
                + "".join(f"{med[v]['tps']:>17,.0f}" for v in variants)
                + "".join(f"{ratios[v + '_tps']['median']:>16.1%}" for v in others)
            )
        lines.append("  each run (tps, by round):")
        for form, s in r["throughput"].items():
            for v in variants:
                figures = [run["tps"] for run in s["runs"] if run["variant"] == v]
                lines.append(f"    {form:<10}{v:<12}" + ", ".join(f"{x:,.0f}" for x in figures))
        lines.append("")
    if "latency" in r:
        lines += [
            f"latency at {plan['latency_rate']:g} tps, {plan['latency_clients']} connections,"
            " ms average / p99 (median)",
            head,
        ]
        for form, s in r["latency"].items():
            med, ratios = s["medians"], s["ratios"]
            cells = "".join(
                f"{ms(med[v]['latency_avg_ms']):>9} /{ms(med[v]['latency_p99_ms']):>6}"
                for v in variants
            )
            lines.append(
                f"{FORM_TITLES[form]:<36}{cells}"
                + "".join(f"{ratios[v + '_latency_avg_ms']['median']:>16.1%}" for v in others)
                + "  (average)"
            )
            lines.append(
                f"{'':<36}{'':>{17 * len(variants)}}"
                + "".join(f"{ratios[v + '_latency_p99_ms']['median']:>16.1%}" for v in others)
                + "  (p99)"
            )
        lines.append("  each run (average / p99 ms and the rate reached, by round):")
        for form, s in r["latency"].items():
            for v in variants:
                figures = [
                    f"{ms(run['latency_avg_ms'])} / {ms(run['latency_p99_ms'])}"
                    f" ({run['tps']:,.0f} tps)"
                    for run in s["runs"]
                    if run["variant"] == v
                ]
                lines.append(f"    {form:<10}{v:<12}" + ", ".join(figures))
        for form, s in r["latency"].items():
            for v in variants:
                reached = s["medians"][v]["tps"]
                if reached < 0.95 * plan["latency_rate"]:
                    lines.append(
                        f"  note: {form} {v} reached only {reached:,.0f} tps: it could not keep"
                        " up, so its latency includes waiting for a free connection"
                    )
        lines.append("")
    if "commit_to_request" in r:
        lines.append("COMMIT -> first provider request (ours, initial_delay=0)")
        for c in r["commit_to_request"]:
            asked = f"{c['rate']:g}/s asked" if c["rate"] is not None else "flat out"
            lines.append(
                f"  {asked:<14} {c['writers']} writer(s), {c['achieved_rate']:>7,.0f}/s reached,"
                f" {c['orders']:>7,} orders: p50 {c['p50_ms']:6.1f} ms, p99 {c['p99_ms']:6.1f} ms,"
                f" max {c['max_ms']:6.1f} ms; {c['notified']:,.0f} by NOTIFY,"
                f" {c['from_reads']:,.0f} read by the daemon"
            )
        lines.append("")
    for variant, (first_key, _) in PART_KEYS.items():
        if first_key in r:
            lines += first_check_lines(r[first_key], variant)
    for variant, (_, busy_key) in PART_KEYS.items():
        if busy_key in r:
            lines += busy_cpu_lines(r[busy_key], variant)
    runs = [
        run
        for part in ("throughput", "latency")
        for s in r.get(part, {}).values()
        for run in s["runs"]
    ]
    heard = [run for run in runs if run["variant"] == "ours" and run["orders_in_flight"]]
    if heard:
        lines.append(
            f"orders (ours runs): {sum(x['orders_in_flight'] for x in heard):,} in flight,"
            f" {sum(x['orders_announced'] for x in heard):,} reached the daemon"
            f" ({sum(x['notified'] for x in heard):,.0f} notifications,"
            f" {sum(x['from_reads'] for x in heard):,.0f} read while busy),"
            f" slowest catch-up after a run {max(x['catch_up_s'] for x in heard):.2f} s"
        )
        lines.append("")
    decoded = [run for run in runs if run["variant"] == DECODING]
    if decoded:
        rest = [run for run in runs if run["variant"] != DECODING]
        lines.append(
            f"orders (decoding runs): {sum(x['orders_in_flight'] for x in decoded):,} in flight,"
            f" {sum(x['orders_announced'] for x in decoded):,} reached the daemon"
            f" ({sum(x['from_reads'] for x in decoded):,.0f} read from the slot during runs,"
            f" {sum(x['orders_known_before_run'] for x in decoded):,} from the resets' loads),"
            f" slowest catch-up after a run {max(x['catch_up_s'] for x in decoded):.2f} s;"
            " a reset's load decoded in at most"
            f" {max(x['slot_caught_up_before_run_s'] for x in decoded):.1f} s before its run,"
            " the slot confirmed past a run at most"
            f" {max(x['slot_caught_up_after_run_s'] for x in decoded):.1f} s after it"
        )
        lines.append(
            "  the decoding daemon's slot reads during its runs"
            f" {sum(x['decoding_reads_s'] for x in decoded):.2f} s, during the other variants'"
            f" {sum(x['decoding_reads_s'] for x in rest):.2f} s (it reads every second whatever"
            " runs: the server decodes the whole cluster's WAL for it)"
        )
        lines.append("")
    for name, verdict in report["targets"].items():
        mark = {True: "met", False: "MISSED", None: "n/a"}[verdict["met"]]
        lines.append(f"target {name}: {verdict['target']}; measured {verdict['measured']}: {mark}")
    return "\n".join(lines)


def first_check_lines(first: list[dict[str, Any]], variant: str = "ours") -> list[str]:
    delay = first[0]["initial_delay_s"]
    reads = "reads of the slot" if variant == DECODING else "busy reads"
    lines = [
        f"first check against its slot ({variant}, initial_delay {delay:g} s, {reads} every"
        f' {first[0]["busy_read_interval_s"]:g} s): lateness = first request - ("sentAt"'
        " + the order's first slot), negative = early",
    ]
    for c in first:
        asked = f"{c['rate']:g}/s asked" if c["rate"] is not None else "flat out"
        busy = c["busy_share_while_dispatching"]
        lines.append(
            f"  {asked:<14} {c['writers']} writer(s), {c['achieved_rate']:>7,.0f}/s reached,"
            f" {c['orders']:>7,} orders: late p50 {c['p50_s']:6.3f} s, p99 {c['p99_s']:6.3f} s,"
            f" max {c['max_s']:6.3f} s, min {c['min_s']:6.3f} s"
        )
        how = (
            f" {c['from_reads']:,.0f} taken from the slot ({c['read_known']:,.0f} known)"
            if variant == DECODING
            else f" {c['notified']:,.0f} by NOTIFY, {c['from_reads']:,.0f} taken by busy reads"
            f" ({c['read_known']:,.0f} known); {c['switches_to_busy']:,.0f} switch(es) to busy,"
            f" busy {(busy or 0):.0%} of the dispatch"
        )
        lines.append(
            f"{'':<17}{c['early']:,} early ({c['before_pull_window']:,} before the pull window),"
            f" {c['late_over_1s']:,} over 1 s late, {c['missed']:,} never checked,"
            f" {c['checked_twice_or_more']:,} checked twice;{how}"
        )
        nominal = c["vs_nominal"]
        lines.append(
            f'{"":<17}vs "sentAt" + {delay:g} s (no jitter): p50 {nominal["p50_s"]:.3f} s,'
            f" p99 {nominal['p99_s']:.3f} s, min {nominal['min_s']:.3f} s,"
            f" max {nominal['max_s']:.3f} s"
        )
    lines.append("")
    return lines


def busy_cpu_lines(busy: list[dict[str, Any]], variant: str = "ours") -> list[str]:
    decoding = variant == DECODING
    lines = [
        (
            f"CPU while reading the slot (decoding, {busy[0]['mode']}, reads every"
            if decoding
            else f"CPU while busy (ours, {busy[0]['mode']}, busy reads every"
        )
        + f" {busy[0]['busy_read_interval_s']:g} s), CPU seconds per second",
        f"  {'in flight':>19} {'daemon':>8} {'database':>9} {'(daemon':>8} {'app':>6}"
        f" {'other)':>7} {'reads/s':>8} {'ms/read':>8} {'taken/s':>8} {'busy':>5}",
    ]
    for b in busy:
        flight = f"{b['orders_in_flight_window_start']:,}-{b['orders_in_flight_window_end']:,}"
        if b["db_cpu_per_s"] is None:
            db = f"{'n/a':>9} {'':>8} {'':>6} {'':>7}"
        else:
            g = b["db_cpu_per_s_by_group"]
            db = (
                f"{b['db_cpu_per_s']:>9.3f} {g['daemon']:>8.3f} {g['application']:>6.3f}"
                f" {g['other']:>7.3f}"
            )
        lines.append(
            f"  {flight:>19} {b['daemon_cpu_per_s']:>8.3f} {db}"
            f" {b['busy_reads_per_s']:>8.2f} {b['busy_read_mean_ms']:>8.2f}"
            f" {b['busy_read_orders_taken'] / b['window_s']:>8.1f}"
            + (f" {'n/a':>5}" if decoding else f" {(b['busy_share'] or 0):>5.0%}")
        )
        if b["provider_requests"]:
            lines.append(
                f"  note: {b['provider_requests']:,} provider requests in the window:"
                " checks were made, the CPU is not the busy mode's alone"
            )
        if not decoding and (not b["busy_at_window_start"] or (b["busy_share"] or 0) < 1):
            lines.append("  note: the daemon was not busy for the whole window")
    lines.append(
        "  (database = every process of the server; daemon/app/other: the daemon's sessions,"
        " the application's, the rest: background processes, other databases)"
    )
    lines.append("")
    return lines

"""The trigger benchmark's plan and fixed parts: variants, forms, pgbench scripts."""

from __future__ import annotations

from dataclasses import dataclass, replace

# bench/common: bench/ is on sys.path, bench/trigger.py being run as a script.
from common import (
    BENCH,
)

from order_monitor import schema
from order_monitor.config import Layout

ROOT = BENCH.parent


V1_INSTALL = ROOT / "tests" / "integration" / "fixtures" / "install_v1.sql"


#: The last version 5 release's install: the in-flight rule in the triggers' WHEN.
V5_INSTALL = ROOT / "tests" / "integration" / "fixtures" / "install_v5.sql"


DEFAULT_DSN = "postgresql://postgres@127.0.0.1:5432/test"


LAYOUT = Layout()


NAMES = schema.Names(LAYOUT)


V2_TRIGGERS = (NAMES.insert_trigger_name, NAMES.update_trigger_name)


VARIANTS = ("ours", "off", "v1")


#: Added to the variants when the server has wal_level = logical (and not
#: --no-decoding): ORDER_MONITOR_CAPTURE=decoding on a database of its own,
#: decoding.sql applied, so no trigger of ours is on its table.
DECODING = "decoding"


#: --diagnose adds it: our objects with no daemon, so nobody holds the idle
#: lock and no order is announced; the trigger's own cost (its WHEN), without
#: the daemon's reads.
DIAGNOSTIC = "nodaemon"


#: --diagnose adds it too: no object of ours, only two AFTER ROW triggers on
#: the events ours fire on, each ``WHEN (false)`` calling a function that does
#: nothing: what any trigger costs the application's statements, however
#: cheap its condition (the floor under every trigger design).
EMPTY_TRIGGER = "whenfalse"


#: --diagnose adds it too: version 5's objects (its WHEN tested the in-flight
#: rule before the idle lock's try) with no daemon: beside ``nodaemon``, what
#: moving the rule into the function saved, in the same run.
V5_DIAGNOSTIC = "v5nodaemon"


#: Every variant --diagnose adds, in the order they run.
DIAGNOSTICS = (DIAGNOSTIC, V5_DIAGNOSTIC, EMPTY_TRIGGER)


VARIANT_TITLES = {
    "ours": "ours (v6)",
    "off": "no trigger",
    "v1": "v1 (NOTIFY/row)",
    DECODING: "decoding",
    DIAGNOSTIC: "ours, no daemon",
    V5_DIAGNOSTIC: "v5, no daemon",
    EMPTY_TRIGGER: "WHEN (false)",
}


FORMS = ("insert", "update", "unrelated")


LATENCY_FORMS = ("insert", "update")


FORM_TITLES = {
    "insert": "dispatch INSERT",
    "update": "dispatch UPDATE",
    "unrelated": 'unrelated UPDATE ("lastSyncAt")',
}


# The application's statements. The providerId is the one the daemon's
# provider serves, so every announced order is one the daemon would check.
SCRIPTS = {
    "insert": (
        'INSERT INTO product_orders ("providerId", "externalStatus", "sentAt", provider_referans)\n'
        "    VALUES ('bench', 'sent', now(), md5(random()::text));\n"
    ),
    # The row goes from not sent (reference NULL) to in flight: the update
    # trigger's WHEN holds. A row drawn twice gets a new reference while in
    # flight, which fires it as well (a re-dispatch).
    "update": (
        "\\set n random(1, {rows})\n"
        "UPDATE product_orders SET provider_referans = md5(random()::text),\n"
        '    "externalStatus" = \'sent\', "sentAt" = now()\n'
        '    WHERE "orderNo" = :n;\n'
    ),
    # On rows in flight, so that only UPDATE OF keeps the trigger out.
    "unrelated": (
        "\\set n random(1, {rows})\n"
        'UPDATE product_orders SET "lastSyncAt" = now() WHERE "orderNo" = :n;\n'
    ),
}


@dataclass
class Plan:
    parts: list[str]
    variants: tuple[str, ...]
    forms: tuple[str, ...]
    rounds: int
    seconds: float
    clients: int
    threads: int
    latency_clients: int
    latency_rate: float
    rows: int
    commit_rates: list[tuple[float, int]]
    commit_seconds: float
    max_writers: int
    pgbench: str
    psql: str
    #: first-check: fixed rates (orders/s, writers), then max_writers flat out.
    first_check_rates: list[tuple[float, int]]
    first_check_seconds: float
    initial_delay: float
    #: busy-cpu: orders in flight, the window and its warm-up, the dispatch
    #: rate that keeps the daemon busy (0: scan mode, nothing dispatched).
    busy_sizes: list[int]
    busy_seconds: float
    busy_warmup: float
    busy_rate: float
    #: The decoding variant is in (the server has wal_level = logical); when it
    #: is not, *decoding_note* says why (printed and in the table).
    decoding: bool = False
    decoding_note: str = ""


PARTS = ["throughput", "latency", "commit", "first-check", "busy-cpu"]


def with_decoding(plan: Plan, wal_level: str, wanted: bool) -> Plan:
    """The plan with the decoding variant when the server decodes its WAL and it is wanted.

    Otherwise the plan without it, and ``decoding_note`` saying why (printed,
    and in the table).
    """
    if not wanted:
        note = "decoding: left out (--no-decoding)"
    elif wal_level != "logical":
        note = (
            f"decoding: left out: the server's wal_level is {wal_level}, not logical"
            " (ALTER SYSTEM SET wal_level = logical and a restart, or --dsn a server that has it)"
        )
    else:
        # After ours/off/v1, before --diagnose's variant.
        base = tuple(v for v in plan.variants if v != DECODING)
        variants = (*base[: len(VARIANTS)], DECODING, *base[len(VARIANTS) :])
        return replace(plan, variants=variants, decoding=True, decoding_note="")
    return replace(
        plan,
        variants=tuple(v for v in plan.variants if v != DECODING),
        decoding=False,
        decoding_note=note,
    )

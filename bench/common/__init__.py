"""What the benchmark scenarios share: the server, the fake provider, the daemon, the measuring.

``bench/run.py``, ``bench/single.py`` and ``bench/trigger.py`` import this
package (they are run as scripts, so ``bench/`` is on ``sys.path``). Helpers
live here once a second scenario needs them; a scenario's own code stays in
its module. ``report`` (messages, percentiles, the machine, the results
file), ``services`` (the server and the fake provider), ``daemon`` (the
daemon in this process) and ``measuring``.
"""

from common.daemon import (
    BATCH_SIZE,
    CONCURRENCY,
    PROVIDER_ID,
    PROVIDER_LIMITS,
    daemon_settings,
    finished,
    running,
    until_idle,
    wait_finished,
)
from common.measuring import (
    commit_to_request,
    cpu_meter,
    cpu_seconds,
    histogram_totals,
    insert_dispatched,
    last_completed,
    start_app_writers,
)
from common.report import BENCH, RESULTS, machine, percentile, run_header, say, write_report
from common.services import REFERENCE_DDL, TOKEN, Fake, Server

__all__ = [
    "BATCH_SIZE",
    "BENCH",
    "CONCURRENCY",
    "PROVIDER_ID",
    "PROVIDER_LIMITS",
    "REFERENCE_DDL",
    "RESULTS",
    "TOKEN",
    "Fake",
    "Server",
    "commit_to_request",
    "cpu_meter",
    "cpu_seconds",
    "daemon_settings",
    "finished",
    "histogram_totals",
    "insert_dispatched",
    "last_completed",
    "machine",
    "percentile",
    "run_header",
    "running",
    "say",
    "start_app_writers",
    "until_idle",
    "wait_finished",
    "write_report",
]

"""Running the daemon as a process: logging, signals, reload, exit status."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Collection
from pathlib import Path

from order_monitor import logs
from order_monitor.config import Settings, load_settings
from order_monitor.daemon import Daemon
from order_monitor.errors import OrderMonitorError

log = logs.get_logger()


def run_forever(env_file: Path | None, *, also_known: Collection[str] = ()) -> None:
    """*also_known*: ORDER_MONITOR_* variables the command line reads itself."""
    settings = load_settings(env_file=env_file, also_known=also_known)
    logs.configure(settings.log_level, settings.log_format)
    log_unknown_variables(settings)
    asyncio.run(_main(Daemon(settings), env_file, also_known))


def log_unknown_variables(settings: Settings) -> None:
    """A warning per ORDER_MONITOR_* name no setting reads: a typo is otherwise silent."""
    for unknown in settings.unknown_variables:
        log.warning(
            "config.unknown_variable",
            variable=unknown.name,
            did_you_mean=unknown.suggestion,
            message=str(unknown),
        )


async def _main(daemon: Daemon, env_file: Path | None, also_known: Collection[str] = ()) -> None:
    loop = asyncio.get_running_loop()

    def stop(signame: str) -> None:
        log.info("daemon.signal", signal=signame)
        daemon.request_stop()
        # A second Ctrl-C (or SIGTERM) kills at once: the default action is back.
        loop.remove_signal_handler(signal.SIGINT)
        loop.remove_signal_handler(signal.SIGTERM)

    def reload() -> None:
        log.info("daemon.signal", signal="SIGHUP")
        try:
            new = load_settings(env_file=env_file, also_known=also_known)
        except OrderMonitorError as exc:
            log.error("config.reload_rejected", error=str(exc), kept="the running configuration")
            return
        logs.configure(new.log_level, new.log_format)
        log_unknown_variables(new)
        try:
            daemon.reload(new)
        except OrderMonitorError as exc:
            log.error("config.reload_rejected", error=str(exc), kept="the running configuration")

    loop.add_signal_handler(signal.SIGTERM, stop, "SIGTERM")
    loop.add_signal_handler(signal.SIGINT, stop, "SIGINT")
    loop.add_signal_handler(signal.SIGHUP, reload)
    await daemon.run()

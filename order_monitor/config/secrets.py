"""Where secrets come from: the DSN, systemd credentials, and the providers file's secret specs.

No message here quotes a secret, nor a byte of a file that holds one.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import psycopg.conninfo

from order_monitor.config import environment
from order_monitor.config.environment import PREFIX, Env
from order_monitor.errors import ConfigError
from order_monitor.redaction import Secret


def read_dsn(env: Env, values: Mapping[str, str], *, required: bool) -> Secret:
    """ORDER_MONITOR_DSN, else the 'dsn' systemd credential, checked as a connection string."""
    dsn = env.raw("DSN") or ""
    if not dsn:
        dsn = read_credential("dsn", values) or ""
    if not dsn and not required:
        return Secret("")
    if not dsn and not any(values.get(v) for v in ("PGHOST", "PGDATABASE", "PGSERVICE")):
        raise ConfigError(
            f"no database configured: set {PREFIX}DSN (a libpq connection string or "
            "postgresql:// URI), a 'dsn' systemd credential, or libpq's PGHOST/PGDATABASE"
        )
    try:
        psycopg.conninfo.conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        # libpq's message may quote the string, password included: ours does not.
        raise ConfigError(
            f"{PREFIX}DSN is not a valid connection string (expected key=value pairs "
            "or a postgresql:// URI)"
        ) from None
    return Secret(dsn)


def read_page_token(env: Env, values: Mapping[str, str]) -> Secret | None:
    """ORDER_MONITOR_PAGE_TOKEN, else the 'page-token' systemd credential; None when neither."""
    token = env.raw("PAGE_TOKEN") or read_credential("page-token", values)
    if not token:
        return None
    if len(token) < 16:
        # Guessed at a few thousand tries a second over the network otherwise;
        # the length is said, never the value.
        raise ConfigError(
            f"{PREFIX}PAGE_TOKEN is {len(token)} characters long: use at least 16 "
            "(e.g. the output of `openssl rand -base64 24`)"
        )
    return Secret(token)


def read_credential(name: str, values: Mapping[str, str]) -> str | None:
    """A systemd credential (LoadCredential=) by name, if the service has one.

    Outside the service (no ``CREDENTIALS_DIRECTORY``) the credential's own
    file, ``/etc/order-monitor/<name>`` where the README and the package put
    it, when this user may read it: an operator's ``order-monitor doctor`` on
    the service's host then checks what the service runs, with no arguments.
    """
    directory = values.get("CREDENTIALS_DIRECTORY")
    if directory:
        path = Path(directory) / name
    else:
        found = environment.system_config_file(name)
        if found is None:
            return None
        path = found
    try:
        return path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ConfigError(f"credential {name!r} cannot be read: {exc.strerror}") from None
    except UnicodeDecodeError:
        # The decoder's message quotes the offending byte: part of the secret.
        raise ConfigError(f"credential {name!r} ({path}) is not UTF-8 text") from None


def resolve_secret(spec: object, at: str, environ: Mapping[str, str]) -> Secret:
    """One secret of the providers file, from its spec (*at* names it in errors).

    A literal string, or one of ``{ env = "VAR" }``, ``{ file = "/path" }``,
    ``{ credential = "name" }`` (a systemd credential).
    """
    value: str | None
    if isinstance(spec, str):
        value = spec
    elif isinstance(spec, dict) and len(spec) == 1:
        ((source, ref),) = spec.items()
        if not isinstance(ref, str):
            raise ConfigError(f"{at}: the {source!r} reference must be a string")
        if source == "env":
            value = environ.get(ref)
            if not value:
                raise ConfigError(f"{at}: environment variable {ref} is not set")
        elif source == "file":
            try:
                value = Path(ref).read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise ConfigError(f"{at}: file {ref!r} cannot be read: {exc.strerror}") from None
            except UnicodeDecodeError:
                # The decoder's message quotes the offending byte of the secret.
                raise ConfigError(f"{at}: file {ref!r} is not UTF-8 text") from None
        elif source == "credential":
            value = read_credential(ref, environ)
            if value is None:
                raise ConfigError(
                    f"{at}: systemd credential {ref!r} is not available "
                    "(is it in LoadCredential= and CREDENTIALS_DIRECTORY set?)"
                )
        else:
            raise ConfigError(f"{at}: unknown source {source!r}; use env, file or credential")
    else:
        raise ConfigError(
            f'{at}: expected a string or one of {{ env = "VAR" }}, '
            '{ file = "/path" }, { credential = "name" }'
        )
    if not value:
        raise ConfigError(f"{at} is empty")
    return Secret(value)

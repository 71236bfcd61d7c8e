"""The providers file's ``[actions.NAME]`` tables: how finished orders reach the application.

Each table becomes one :class:`~order_monitor.config.settings.ActionConfig`
(``order_monitor.delivery`` sends them). Everything a template could get
wrong is refused here, at start-up, rather than at the first delivery: an
unknown placeholder, a secret where it would be logged or stored (a URL, a
body), the order list anywhere but as a whole body string, a body that does
not name the orders, a URL whose host a row could choose.

No message quotes a secret, a header's value, the URL or a body string: any
of them may hold a token an operator pasted in.

Pure but for resolving the secrets (environment, files, credentials), which
``resolve_secrets=False`` skips, as for providers.
"""

from __future__ import annotations

import base64
import binascii
import math
import re
from collections.abc import Iterable, Mapping
from datetime import date, datetime, time
from typing import Any, Final
from urllib.parse import urlsplit

from standardwebhooks.webhooks import EmptyWebhookSecretError, Webhook

from order_monitor.config.environment import has_control_characters, parse_duration
from order_monitor.config.providers_file import parse_limits, parse_secrets
from order_monitor.config.settings import DELIVERABLE_OUTCOMES, WEBHOOK_SECRET, ActionConfig
from order_monitor.delivery.templates import LISTS, Placeholder, TemplateError, parse_template
from order_monitor.errors import ConfigError
from order_monitor.redaction import Secret

KINDS: Final = ("http", "webhook")
METHODS: Final = ("POST", "PUT", "PATCH")
#: Keys only one kind takes: a webhook's event and its batching are fixed,
#: and its answer is its status (nothing in the body is read).
HTTP_ONLY: Final = frozenset(
    {"method", "body", "batch_size", "success", "errors_path", "error_id_key", "error_key"}
)
WEBHOOK_ONLY: Final = frozenset({"columns"})
KEYS: Final = frozenset(
    {
        "kind",
        "outcomes",
        "url",
        "headers",
        "confirm_status",
        "max_age",
        "attempts",
        "limits",
        "secrets",
    }
    | HTTP_ONLY
    | WEBHOOK_ONLY
)
MAX_BATCH: Final = 1000
#: Retrying for less than a minute would turn a short outage into dead letters.
MIN_MAX_AGE: Final = 60.0
#: As for every other age of the settings: beyond a month it is a mistake
#: (and an unbounded one reaches float('inf')).
MAX_MAX_AGE: Final = 30 * 86400.0
DEFAULT_MAX_AGE: Final = 3 * 86400.0
#: Standard Webhooks: signing keys of 24 to 64 bytes.
MIN_SIGNING_KEY: Final = 24
MAX_SIGNING_KEY: Final = 64
_SIGNING_PREFIX: Final = "whsec_"
#: Headers the HTTP client or the message framing owns.
_FRAMING_HEADERS: Final = frozenset({"host", "content-length", "transfer-encoding", "connection"})
#: Headers a webhook sets itself (its event and its signature).
_WEBHOOK_HEADERS: Final = frozenset(
    {"content-type", "webhook-id", "webhook-timestamp", "webhook-signature"}
)
#: RFC 9110's token: what a header name may be made of.
_HEADER_NAME: Final = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
#: What a placeholder's text looks like when it is a mistyped one (shown in errors).
_PLACEHOLDER_LIKE: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_.:-]{0,39}")
#: PostgreSQL truncates longer names silently (as in ``config.environment``).
_MAX_IDENTIFIER: Final = 63


def parse_actions(
    document: Mapping[str, Any],
    environ: Mapping[str, str],
    *,
    source: str = "providers file",
    resolve_secrets: bool = True,
) -> tuple[ActionConfig, ...]:
    """The ``[actions.NAME]`` tables of a parsed providers file (the top level is checked
    by ``providers_file.check_top_level``)."""
    table = document.get("actions", {})
    if not isinstance(table, dict):
        raise ConfigError(f"{source}: 'actions' must be a table of [actions.NAME] entries")
    actions = tuple(
        _action(name, entry, environ, source, resolve_secrets) for name, entry in table.items()
    )
    _one_action_per_outcome(actions, source)
    return actions


def delivered_outcomes(actions: Iterable[ActionConfig]) -> tuple[str, ...]:
    """``OutcomeWrites.deliver``: the outcomes the write function records for delivery."""
    return tuple(sorted({outcome for action in actions for outcome in action.outcomes}))


def delivered_columns(actions: Iterable[ActionConfig]) -> tuple[str, ...]:
    """``OutcomeWrites.deliver_columns``: every row column the actions use."""
    return tuple(sorted({column for action in actions for column in action_columns(action)}))


def action_columns(action: ActionConfig) -> tuple[str, ...]:
    """The row columns one action uses: its templates' ``{column:NAME}`` and its ``columns``."""
    texts = [action.url, *action.headers.values(), *(text for _, text in _strings(action.body))]
    named = [
        p.name
        for text in texts
        for p in parse_template(text).placeholders
        if p.kind == "column" and p.name is not None
    ]
    return tuple(dict.fromkeys([*named, *action.columns]))


# --- one action -------------------------------------------------------------------------


def _action(
    name: object, entry: object, environ: Mapping[str, str], source: str, resolve: bool
) -> ActionConfig:
    if not isinstance(name, str) or not name or _unsendable(name):
        raise ConfigError(
            f"{source}: [actions.{name!r}]: an action's name must be non-empty text "
            "without line breaks or other control characters"
        )
    where = f"{source}: [actions.{name}]"
    if not isinstance(entry, dict):
        raise ConfigError(f"{where} must be a table")
    unknown = set(entry) - KEYS
    if unknown:
        raise ConfigError(f"{where}: unknown keys {sorted(unknown)}; allowed: {sorted(KEYS)}")
    kind = entry.get("kind")
    if kind not in KINDS:
        raise ConfigError(
            f"{where} kind: required, one of {', '.join(KINDS)} "
            "(http: batched requests to the application's API; webhook: signed events)"
        )
    wrong_kind = set(entry) & (WEBHOOK_ONLY if kind == "http" else HTTP_ONLY)
    if wrong_kind:
        key = sorted(wrong_kind)[0]
        why = (
            "only a webhook action takes it (an http action names its columns in its templates)"
            if kind == "http"
            else "a webhook's event, its method and its batching are fixed, and its answer "
            "is its HTTP status"
        )
        raise ConfigError(f"{where} {key}: not allowed for kind = {kind!r}: {why}")

    secret_names = _secret_names(entry.get("secrets", {}), where)
    if kind == "webhook" and WEBHOOK_SECRET not in secret_names:
        raise ConfigError(
            f"{where} secrets.{WEBHOOK_SECRET}: required for a webhook action: its Standard "
            "Webhooks signing key ('whsec_' and base64), shared with the receiver"
        )
    url = _url(entry.get("url"), where)
    headers = _headers(entry.get("headers", {}), where, kind, secret_names)
    body = _body(entry, where) if kind == "http" else None
    columns = _columns(entry.get("columns", []), where)
    action = ActionConfig(
        name=name,
        kind=kind,
        outcomes=_outcomes(entry.get("outcomes"), where),
        url=url,
        limits=parse_limits(entry.get("limits", {}), where),
        secrets=_secrets(entry.get("secrets", {}), where, environ, kind) if resolve else {},
        method=_method(entry.get("method", "POST"), where),
        headers=headers,
        body=body,
        batch_size=_whole(entry, "batch_size", where, 100, minimum=1, maximum=MAX_BATCH),
        success=_success(entry.get("success", {}), where),
        errors_path=_path(entry["errors_path"], where, "errors_path")
        if "errors_path" in entry
        else None,
        error_id_key=_text(entry, "error_id_key", where, "id"),
        error_key=_text(entry, "error_key", where, "error"),
        confirm_status=_confirm_status(entry, where),
        max_age=_max_age(entry.get("max_age", DEFAULT_MAX_AGE), where),
        attempts=_whole(entry, "attempts", where, 5, minimum=1),
        columns=columns,
    )
    for column in action_columns(action):
        _check_column(column, where)
    return action


def _outcomes(raw: object, where: str) -> tuple[str, ...]:
    expected = f"a non-empty list of {', '.join(DELIVERABLE_OUTCOMES)}"
    if not isinstance(raw, list) or not raw:
        raise ConfigError(f"{where} outcomes: required, {expected}")
    for item in raw:
        if item not in DELIVERABLE_OUTCOMES:
            shown = repr(item) if isinstance(item, str) and len(item) <= 40 else "an entry"
            raise ConfigError(f"{where} outcomes: {shown} is not an outcome: expected {expected}")
    return tuple(dict.fromkeys(raw))


def _one_action_per_outcome(actions: Iterable[ActionConfig], source: str) -> None:
    owner: dict[str, str] = {}
    for action in actions:
        for outcome in action.outcomes:
            if outcome in owner:
                raise ConfigError(
                    f"{source}: [actions.{owner[outcome]}] and [actions.{action.name}] both "
                    f"deliver {outcome!r} results: one action per outcome (a result is "
                    "delivered once)"
                )
            owner[outcome] = action.name


def _method(raw: object, where: str) -> str:
    if not isinstance(raw, str) or raw.upper() not in METHODS:
        raise ConfigError(f"{where} method: expected one of {', '.join(METHODS)}")
    return raw.upper()


def _whole(
    entry: Mapping[str, Any],
    key: str,
    where: str,
    default: int,
    *,
    minimum: int,
    maximum: int | None = None,
) -> int:
    raw = entry.get(key, default)
    bounds = f">= {minimum}" + ("" if maximum is None else f" and <= {maximum}")
    if (
        not isinstance(raw, int)
        or isinstance(raw, bool)
        or raw < minimum
        or (maximum is not None and raw > maximum)
    ):
        raise ConfigError(f"{where} {key}: expected a whole number {bounds}")
    return raw


def _text(entry: Mapping[str, Any], key: str, where: str, default: str) -> str:
    raw = entry.get(key, default)
    if not isinstance(raw, str) or not raw:
        raise ConfigError(f"{where} {key}: expected a non-empty string")
    return raw


def _confirm_status(entry: Mapping[str, Any], where: str) -> str | None:
    if "confirm_status" not in entry:
        return None
    raw = entry["confirm_status"]
    if not isinstance(raw, str) or not raw.strip() or has_control_characters(raw):
        raise ConfigError(
            f"{where} confirm_status: expected the status word the row must read once the "
            "application took the order (e.g. 'approved'), without control characters"
        )
    return raw


def _max_age(raw: object, where: str) -> float:
    expected = (
        "a number of seconds or a duration such as 90m, 12h or 3d, "
        f"at least {MIN_MAX_AGE:g} s and at most 30 days"
    )
    if isinstance(raw, str):
        try:
            seconds = parse_duration(raw)
        except ValueError:
            raise ConfigError(f"{where} max_age: expected {expected}") from None
    elif isinstance(raw, int | float) and not isinstance(raw, bool):
        try:
            seconds = float(raw)
        except OverflowError:
            raise ConfigError(f"{where} max_age: expected {expected}") from None
    else:
        raise ConfigError(f"{where} max_age: expected {expected}")
    # nan compares false both ways: it fails this test too.
    if not MIN_MAX_AGE <= seconds <= MAX_MAX_AGE:
        raise ConfigError(f"{where} max_age: expected {expected}")
    return seconds


def _path(raw: object, where: str, key: str) -> str:
    if not isinstance(raw, str) or not raw or not all(raw.split(".")):
        raise ConfigError(
            f"{where} {key}: expected a dotted path into the answer's JSON, e.g. 'errors' "
            "or 'data.errors' (no empty step)"
        )
    return raw


def _success(raw: object, where: str) -> dict[str, Any]:
    """``path = value`` pairs; a TOML dotted key (``data.ok = true``) is a nested table,
    flattened back into its path."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} success: expected a table of 'path = value'")
    flat: dict[str, Any] = {}

    def walk(table: Mapping[str, Any], prefix: str) -> None:
        for key, value in table.items():
            path = f"{prefix}{key}"
            if isinstance(value, dict) and value:
                walk(value, path + ".")
                continue
            at = f"{where} success.{_shown(path)}"
            _path(path, where, f"success.{_shown(path)}")
            if not _is_json_scalar(value):
                raise ConfigError(
                    f"{at}: expected a string, a number or a boolean (the value the "
                    "answer must hold at that path)"
                )
            if path in flat:
                raise ConfigError(f"{at}: the path is given twice")
            flat[path] = value

    walk(raw, "")
    return flat


def _is_json_scalar(value: object) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    return isinstance(value, str | int | bool)


def _columns(raw: object, where: str) -> tuple[str, ...]:
    if not isinstance(raw, list) or not all(isinstance(c, str) for c in raw):
        raise ConfigError(f"{where} columns: expected a list of the orders table's column names")
    return tuple(dict.fromkeys(raw))


def _check_column(column: str, where: str) -> None:
    # Rendered into the write function's SQL as a quoted name: the same
    # rules as the layout's ORDER_MONITOR_COLUMN_* names.
    if (
        not column
        or len(column.encode("utf-8", "surrogatepass")) > _MAX_IDENTIFIER
        or has_control_characters(column)
        or _has_surrogate(column)
        or "%" in column
    ):
        shown = repr(column) if len(column) <= _MAX_IDENTIFIER * 2 else "a long name"
        raise ConfigError(
            f"{where}: column {shown} is not a usable column name: expected a PostgreSQL "
            f"name of at most {_MAX_IDENTIFIER} bytes, without control characters or '%'"
        )


# --- templates --------------------------------------------------------------------------


def _template(text: str, at: str) -> list[Placeholder]:
    try:
        return list(parse_template(text).placeholders)
    except TemplateError as exc:
        raise ConfigError(f"{at}: {_shown_error(exc)}") from None


def _shown_error(exc: TemplateError) -> str:
    """The template's error, without an unknown placeholder that does not look like one.

    Braces around a pasted token (``Bearer {abc/def+...}``) would otherwise
    put the token in the message.
    """
    message = str(exc)
    head, known = "unknown placeholder {", "}; known: "
    if message.startswith(head) and known in message:
        content = message[len(head) : message.index(known)]
        if not _PLACEHOLDER_LIKE.fullmatch(content):
            return (
                "an unknown placeholder (not shown: it may be a pasted value); "
                + (message[message.index(known) + 3 :])
            )
    return message


def _url(raw: object, where: str) -> str:
    at = f"{where} url"
    expected = "an absolute http:// or https:// URL with a host"
    if not isinstance(raw, str) or not raw:
        raise ConfigError(f"{at}: required, {expected}")
    if _unsendable(raw) or any(ch.isspace() for ch in raw):
        raise ConfigError(f"{at}: spaces and control characters cannot stand in a URL")
    found = _template(raw, at)
    for placeholder in found:
        if placeholder.kind == "secret":
            raise ConfigError(
                f"{at}: {{secret:...}} only in a header: a URL is logged and stored; "
                "send the secret in a header"
            )
        if placeholder.kind in LISTS:
            raise ConfigError(
                f"{at}: {placeholder} only as a whole string of the body (the JSON list)"
            )
    # The text before the first placeholder (all of it when there is none).
    parts = parse_template(raw).parts
    fixed = parts[0] if parts and isinstance(parts[0], str) else ""
    try:
        split = urlsplit(fixed)
        split.port  # noqa: B018 - raises ValueError on a port that is not one
    except ValueError:
        raise ConfigError(f"{at}: expected {expected} (its port is not a number)") from None
    if split.scheme.lower() not in ("http", "https") or not split.hostname:
        raise ConfigError(f"{at}: expected {expected}")
    if "@" in split.netloc:
        raise ConfigError(
            f"{at}: no user or password in the URL (it is logged): use a header such as "
            'Authorization = "Bearer {secret:token}"'
        )
    if found and not any(ch in fixed.split("://", 1)[-1] for ch in "/?#"):
        # Else a row's value could choose the host, and the headers (the
        # secrets) would go there.
        raise ConfigError(
            f"{at}: a placeholder may stand only after the host (in the path or the query): "
            "the host must be written out"
        )
    return raw


def _headers(raw: object, where: str, kind: str, secret_names: set[str]) -> dict[str, str]:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} headers: expected a table of 'Name = \"value\"'")
    seen: set[str] = set()
    for name, value in raw.items():
        at = f"{where} headers.{name}"
        if not _HEADER_NAME.fullmatch(name):
            raise ConfigError(
                f"{where} headers: {name!r} is not a header name (letters, digits and "
                "!#$%&'*+-.^_`|~ only)"
            )
        lowered = name.lower()
        if lowered in seen:
            raise ConfigError(f"{at}: given twice (header names ignore case)")
        seen.add(lowered)
        if lowered in _FRAMING_HEADERS:
            raise ConfigError(f"{at}: set by the HTTP client itself, not by an action")
        if kind == "webhook" and lowered in _WEBHOOK_HEADERS:
            raise ConfigError(f"{at}: a webhook sets it itself (its event and its signature)")
        if not isinstance(value, str):
            raise ConfigError(f"{at}: expected a string")
        if _unsendable(value):
            raise ConfigError(
                f"{at}: a line break or other control character cannot stand in a header"
            )
        for placeholder in _template(value, at):
            if placeholder.kind in LISTS:
                raise ConfigError(
                    f"{at}: {placeholder} only as a whole string of the body (the JSON list)"
                )
            if placeholder.kind == "secret":
                if placeholder.name not in secret_names:
                    known = ", ".join(sorted(secret_names)) or "none"
                    raise ConfigError(
                        f"{at}: {{secret:{_shown(placeholder.name or '')}}} is not a secret of "
                        "this action "
                        f"([actions.NAME.secrets] has: {known})"
                    )
                if kind == "webhook" and placeholder.name == WEBHOOK_SECRET:
                    raise ConfigError(
                        f"{at}: the signing secret signs the event and is never sent itself"
                    )
    return dict(raw)


def _body(entry: Mapping[str, Any], where: str) -> dict[str, Any]:
    if "body" not in entry:
        raise ConfigError(
            f'{where} body: required for an http action, e.g. {{ ids = "{{ids}}", '
            'note = "{message}" }'
        )
    raw = entry["body"]
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} body: expected a table (the JSON object sent)")
    _json_values(raw, f"{where} body")
    names_orders = False
    for path, text in _strings(raw):
        at = f"{where} body{path}"
        found = _template(text, at)
        whole = parse_template(text).whole
        for placeholder in found:
            if placeholder.kind == "secret":
                raise ConfigError(
                    f"{at}: {{secret:...}} only in a header: a body is logged and stored by "
                    "the application"
                )
            if placeholder.kind in LISTS:
                if whole is None:
                    raise ConfigError(
                        f'{at}: {placeholder} only as a whole string ("{placeholder}"), '
                        "which becomes the JSON list"
                    )
                names_orders = True
    if not names_orders:
        raise ConfigError(
            f'{where} body: must name the orders: "{{ids}}" (the order ids) or '
            '"{delivery_ids}" as a whole string somewhere in it'
        )
    return raw


def _json_values(value: object, at: str) -> None:
    """Every value of the body can be sent as JSON (TOML has dates and nan; JSON has not)."""
    if isinstance(value, dict):
        for key, item in value.items():
            if "{" in key and _has_placeholder(key):
                raise ConfigError(
                    f"{at}: the key {key!r} looks like a template: only values are; write "
                    "{{ and }} for a literal brace"
                )
            _json_values(item, f"{at}.{_shown(key)}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _json_values(item, f"{at}[{index}]")
    elif isinstance(value, datetime | date | time):
        raise ConfigError(f"{at}: a TOML date or time is not JSON: write it as a string")
    elif isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{at}: nan and inf are not JSON numbers")


def _has_placeholder(text: str) -> bool:
    try:
        return bool(parse_template(text).placeholders)
    except TemplateError:
        return False


def _strings(value: object, path: str = "") -> list[tuple[str, str]]:
    """Every string of a body (values, not keys) with its path (``.note``, ``.items[0]``)."""
    if isinstance(value, str):
        return [(path, value)]
    if isinstance(value, Mapping):
        return [s for key, item in value.items() for s in _strings(item, f"{path}.{_shown(key)}")]
    if isinstance(value, list | tuple):
        return [s for index, item in enumerate(value) for s in _strings(item, f"{path}[{index}]")]
    return []


def _shown(key: str) -> str:
    """A key of the file as an error shows it: as written when plain, else quoted (escaped),
    so a message stays one printable line."""
    return key if key and not _unsendable(key) and not key.isspace() else repr(key)


def _unsendable(text: str) -> bool:
    """Control characters (CR, LF, NUL...) or lone surrogates: no request carries them."""
    return has_control_characters(text) or _has_surrogate(text)


def _has_surrogate(text: str) -> bool:
    return any("\ud800" <= ch <= "\udfff" for ch in text)


# --- secrets ----------------------------------------------------------------------------


def _secret_names(raw: object, where: str) -> set[str]:
    """The secrets' names, known before (and without) resolving them."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: 'secrets' must be a table")
    for name in raw:
        if _shown(name) != name:
            raise ConfigError(
                f"{where} secrets: the name {_shown(name)} is not usable: a secret's name is "
                "non-empty text without line breaks or other control characters"
            )
    return set(raw)


def _secrets(raw: object, where: str, environ: Mapping[str, str], kind: str) -> dict[str, Secret]:
    secrets = parse_secrets(raw, where, environ)
    for name, secret in secrets.items():
        if _unsendable(secret.reveal()):
            raise ConfigError(
                f"{where}.secrets.{name} holds a line break, NUL or other control character: "
                "no header can carry it (check the file or variable it comes from)"
            )
    if kind == "webhook":
        _check_signing_key(secrets[WEBHOOK_SECRET].reveal(), f"{where}.secrets.{WEBHOOK_SECRET}")
    return secrets


def _check_signing_key(value: str, at: str) -> None:
    """A Standard Webhooks key: 'whsec_' and base64 of 24 to 64 bytes. Never quoted."""
    encoded = value.removeprefix(_SIGNING_PREFIX)
    expected = (
        f"expected a Standard Webhooks signing key: '{_SIGNING_PREFIX}' and the base64 of "
        f"{MIN_SIGNING_KEY} to {MAX_SIGNING_KEY} random bytes (the receiver's library "
        "makes one)"
    )
    try:
        # Webhook() alone decodes leniently (it skips what is not base64), so
        # a password would pass as a short key: decode strictly first.
        key = base64.b64decode(encoded, validate=True)
        Webhook(value)
    except (binascii.Error, ValueError, EmptyWebhookSecretError, RuntimeError):
        raise ConfigError(f"{at} is not valid: {expected}") from None
    if not MIN_SIGNING_KEY <= len(key) <= MAX_SIGNING_KEY:
        raise ConfigError(f"{at} is too short or too long: {expected}")

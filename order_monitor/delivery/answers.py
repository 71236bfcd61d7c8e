"""What the application's answer to one request means for each delivery it carried: pure.

:func:`interpret` never raises, whatever the bytes, the status or the headers:
an answer nobody can make sense of is a RETRY (not the order's fault), never
an exception in the relay's round. Every text it returns is cleaned (no NUL,
control character or lone surrogate), bounded and scrubbed of the action's
secrets (an application may echo a header back), so the relay can store and
log it as it is.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Mapping
from typing import Final

from order_monitor.config import ActionConfig
from order_monitor.delivery.model import Answer, Verdict
from order_monitor.delivery.requests import Request
from order_monitor.delivery.templates import as_text
from order_monitor.providers.base import bounded, clean_str
from order_monitor.providers.http import parse_retry_after
from order_monitor.providers.limits import MAX_RETRY_AFTER, MIN_RETRY_AFTER
from order_monitor.redaction import prepare_secrets, scrub_prepared

#: Longest excerpt of an answer's body (or a value of it) in an error.
MAX_EXCERPT: Final = 200
#: Bytes of a body read for its excerpt: enough to find a secret to hide
#: before the cut, without scrubbing a whole megabyte.
_EXCERPT_BYTES: Final = 16_384
_SPACES: Final = re.compile(r"\s+")
_LONE_SURROGATE: Final = re.compile("[\ud800-\udfff]")
#: Statuses that say "not now" rather than "not this": the order is tried again.
_TRANSIENT: Final = frozenset({408, 425, 429})


def interpret(
    action: ActionConfig,
    request: Request,
    status: int | None,
    body: bytes | None,
    headers: Mapping[str, str] | None,
    *,
    failure: str | None,
    now: float,
) -> Answer:
    """A verdict per delivery of *request*, from the answer (see the module's docstring).

    *now* is the wall clock (Unix seconds), for a Retry-After given as a date.
    """
    reader = _Reader(action, request, status)
    if status is None:
        return reader.all(Verdict.RETRY, failure or "no answer")
    if status in (401, 403):
        return reader.all(Verdict.AUTH, f"HTTP {status}: the application refused our credentials")
    if status == 429 or (status == 503 and _header(headers, "Retry-After") is not None):
        wait = _retry_after(headers, now)
        advice = "" if wait is None else f" (Retry-After {wait:g} s)"
        return reader.all(
            Verdict.RETRY,
            f"HTTP {status}: the application asked us to wait{advice}",
            retry_after=wait,
        )
    if status in _TRANSIENT or 500 <= status <= 599:
        return reader.all(Verdict.RETRY, reader.with_excerpt(body))
    if not 200 <= status <= 599:
        # Not a final HTTP status at all: nothing the order did.
        return reader.all(Verdict.RETRY, f"HTTP {status} is not an answer HTTP defines")
    if not 200 <= status <= 299:
        # 3xx (redirects are not followed: the Authorization header would go
        # with them) and every other 4xx: the application refused the request.
        return reader.all(Verdict.REJECTED, reader.with_excerpt(body))
    return reader.success(body)


class _Reader:
    """One answer's reading: the request's deliveries and the texts it produces."""

    def __init__(self, action: ActionConfig, request: Request, status: int | None) -> None:
        self.action = action
        self.request = request
        self.status = status
        self.ids = [entry.delivery_id for entry in request.deliveries]
        self.secrets = prepare_secrets(s.reveal() for s in action.secrets.values())

    def text(self, value: str, limit: int = MAX_EXCERPT) -> str:
        """*value* safe to store and log: scrubbed, cleaned, on one line, bounded."""
        cleaned = clean_str(scrub_prepared(value, self.secrets))
        return bounded(_SPACES.sub(" ", cleaned).strip(), limit)

    def with_excerpt(self, body: bytes | None) -> str:
        excerpt = self.text(body[:_EXCERPT_BYTES].decode("utf-8", "replace")) if body else ""
        return f"HTTP {self.status}: {excerpt or '(no body)'}"

    def all(self, verdict: Verdict, error: str, *, retry_after: float | None = None) -> Answer:
        # A failure text of only whitespace or controls cleans to nothing.
        error = self.text(error, 500) or (
            "no answer" if self.status is None else f"HTTP {self.status}"
        )
        return Answer(
            verdicts=dict.fromkeys(self.ids, verdict),
            errors=dict.fromkeys(self.ids, error),
            retry_after=retry_after,
            status=self.status,
        )

    def success(self, body: bytes | None) -> Answer:
        action = self.action
        accepted = Verdict.TAKEN if action.confirm_status is not None else Verdict.DELIVERED
        if action.kind == "webhook" or not (action.success or action.errors_path):
            return Answer(dict.fromkeys(self.ids, accepted), status=self.status)
        document = _json_object(body)
        if document is None:
            return self.bad_answer("the body is not the JSON the action expects")
        for path, expected in action.success.items():
            found, value = _at(document, path)
            if not found:
                return self.all(Verdict.REJECTED, f"HTTP {self.status} but {path} is missing")
            if not _json_equal(value, expected):
                return self.all(
                    Verdict.REJECTED,
                    f"HTTP {self.status} but {path} is {self.text(_shown(value))} "
                    f"(expected {self.text(_shown(expected))})",
                )
        rejected: dict[uuid.UUID, str] = {}
        if action.errors_path:
            found, listed = _at(document, action.errors_path)
            if found and listed is not None:
                if not isinstance(listed, list):
                    return self.bad_answer(f"{action.errors_path} is not a list")
                rejected = self._rejections(listed)
        verdicts = {i: Verdict.REJECTED if i in rejected else accepted for i in self.ids}
        return Answer(verdicts, errors=rejected, status=self.status)

    def bad_answer(self, why: str) -> Answer:
        return self.all(Verdict.RETRY, f"HTTP {self.status} but {why}")

    def _rejections(self, listed: list[object]) -> dict[uuid.UUID, str]:
        """The deliveries the per-id error list names, and why."""
        by_order: dict[str, list[uuid.UUID]] = {}
        for entry in self.request.deliveries:
            by_order.setdefault(str(entry.order_id), []).append(entry.delivery_id)
        rejected: dict[uuid.UUID, str] = {}
        for item in listed:
            if not isinstance(item, dict):
                continue
            order = _order_key(item.get(self.action.error_id_key))
            if order is None or order not in by_order:
                # Another request's order, or no id at all: not ours to judge.
                continue
            reason = item.get(self.action.error_key)
            error = (
                ""
                if reason is None
                else self.text(as_text(reason) if isinstance(reason, str) else _shown(reason))
            )
            for delivery_id in by_order[order]:
                rejected.setdefault(delivery_id, error or "refused by the application (no reason)")
        return rejected


def _header(headers: Mapping[str, str] | None, name: str) -> str | None:
    """A header's value whatever the case of its name (a dict of a response loses that)."""
    if headers is None:
        return None
    wanted = name.lower()
    for key, value in headers.items():
        if isinstance(key, str) and key.lower() == wanted and isinstance(value, str):
            return value
    return None


def _retry_after(headers: Mapping[str, str] | None, now: float) -> float | None:
    value = _header(headers, "Retry-After")
    if value is None:
        return None
    try:
        wait = parse_retry_after(value, now)
    except (ValueError, OverflowError):
        return None
    if wait is None or wait != wait:  # NaN cannot be bounded
        return None
    # Between the bounds, as for providers: neither a hot loop nor a pause for good.
    return min(max(wait, MIN_RETRY_AFTER), MAX_RETRY_AFTER)


def _json_object(body: bytes | None) -> dict[str, object] | None:
    """*body* as a JSON object, or None when it is not one a string of ours could carry."""
    if not body:
        return None
    try:
        # utf-8-sig: a byte order mark (some frameworks send one) is no reason
        # to retry an answer for days.
        document = json.loads(body.decode("utf-8-sig"), parse_constant=_not_json)
    except (ValueError, RecursionError):
        # UnicodeDecodeError and JSONDecodeError are ValueErrors; a deeply
        # nested body exhausts the recursion limit.
        return None
    if not isinstance(document, dict) or _has_lone_surrogate(document):
        return None
    return document


def _not_json(constant: str) -> object:
    # NaN and Infinity: Python's json reads them, JSON has no such values.
    raise ValueError(f"{constant} is not JSON")


def _has_lone_surrogate(value: object) -> bool:
    # Iterative: the document may be as deep as json.loads allowed.
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if _LONE_SURROGATE.search(item):
                return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def _at(document: object, path: str) -> tuple[bool, object]:
    """The value at a dotted path (a number steps into a list); (found, value)."""
    current = document
    for step in path.split("."):
        if isinstance(current, dict) and step in current:
            current = current[step]
        elif isinstance(current, list) and step.isdecimal() and int(step) < len(current):
            current = current[int(step)]
        else:
            return False, None
    return True, current


def _json_equal(left: object, right: object) -> bool:
    """Equality of JSON values: 1 == 1.0, but true is not 1 and "1" is not 1."""
    if isinstance(left, bool) or isinstance(right, bool):
        return isinstance(left, bool) and isinstance(right, bool) and left == right
    if isinstance(left, int | float) and isinstance(right, int | float):
        return left == right
    if isinstance(left, list) and isinstance(right, list | tuple):
        return len(left) == len(right) and all(map(_json_equal, left, right))
    if isinstance(left, dict) and isinstance(right, Mapping):
        return left.keys() == right.keys() and all(_json_equal(left[k], right[k]) for k in left)
    return type(left) is type(right) and left == right


def _shown(value: object) -> str:
    try:
        return json.dumps(value, ensure_ascii=False, sort_keys=True, allow_nan=True)
    except (TypeError, ValueError, RecursionError):
        return "(a value too large or too deep to show)"


def _order_key(value: object) -> str | None:
    """An error entry's id as the form ``str(uuid)`` takes, or None when it names no order."""
    if isinstance(value, bool) or not isinstance(value, str | int):
        return None
    text = str(value).strip()
    try:
        return str(uuid.UUID(text))
    except ValueError:
        return text

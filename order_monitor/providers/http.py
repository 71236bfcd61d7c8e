"""HTTP plumbing the adapters share: one bounded request, errors without secrets.

Adapters build a URL and parse a body; everything between (status codes,
Retry-After, the body size bound, decoding, what a log line may show) lives
here so the three adapters behave the same way when a provider misbehaves.
"""

from __future__ import annotations

import email.utils
import errno
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC
from typing import Any, Final, NoReturn
from uuid import UUID

import aiohttp
import structlog
import yarl

from order_monitor.errors import ProviderAuthError, ProviderError
from order_monitor.providers.base import Outcome, RateLimited, clean_str
from order_monitor.redaction import Secret, prepare_secrets, redact_url, scrub_prepared

log = structlog.get_logger()

#: Longest piece of a provider's body that goes into a log line or an error.
EXCERPT: Final = 200
# Enough of an error page to tell a proxy's page from the provider's own text.
_ERROR_BODY_READ: Final = 4096
_DELTA_SECONDS: Final = re.compile(r"^[0-9]+(?:\.[0-9]+)?$", re.ASCII)


def excerpt(text: str, limit: int = EXCERPT) -> str:
    text = text.strip()
    return text if len(text) <= limit else text[:limit] + "…"


def parse_retry_after(value: str, now: float) -> float | None:
    """Seconds to wait from a Retry-After value (delta-seconds or HTTP-date).

    *now* is a Unix timestamp, so the function stays pure. A date in the past
    means "now" (0.0); an unreadable value means the header gave no advice.
    """
    text = value.strip()
    if not text:
        return None
    if _DELTA_SECONDS.match(text):
        return float(text)
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        # RFC 9110: an HTTP-date is always GMT, even when it fails to say so.
        when = when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp() - now)


@dataclass(frozen=True, slots=True)
class Failure:
    """A request that got no reply, described without the library's own text."""

    kind: str
    host: str
    port: int | None
    os_error: str | None = None

    def __str__(self) -> str:
        where = f"{self.host}:{self.port}" if self.port is not None else self.host
        text = f"{self.kind} connecting to {where}"
        return f"{text}: {self.os_error}" if self.os_error else text


def describe_failure(exc: BaseException, url: str | yarl.URL) -> Failure:
    """What went wrong, from the exception's type and attributes only.

    The host and port come from the URL we built (or the connector's
    attributes), the OS error from errno/strerror: never ``str(exc)``, which
    for some aiohttp errors carries the URL with its credentials.
    """
    try:
        parsed = url if isinstance(url, yarl.URL) else yarl.URL(url)
        host, port = parsed.host or "?", parsed.port
    except (ValueError, TypeError):
        host, port = "?", None
    os_error: OSError | None = None
    if isinstance(exc, aiohttp.ClientConnectorError):
        os_error = exc.os_error
        host, port = exc.host, exc.port
    elif isinstance(exc, OSError):
        os_error = exc
    detail = None
    if os_error is not None and (os_error.errno is not None or os_error.strerror):
        name = errno.errorcode.get(os_error.errno or -1, "")
        strerror = os_error.strerror or ""
        detail = " ".join(p for p in (f"[{name}]" if name else "", strerror) if p) or None
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        detail = "connect timed out"
    elif isinstance(exc, aiohttp.SocketTimeoutError):
        detail = "read timed out"
    elif isinstance(exc, TimeoutError) and detail is None:
        detail = "timed out"
    return Failure(type(exc).__name__, clean_str(host), port, detail)


class BadAnswer(ProviderError):
    """A body that is not an answer in the provider's protocol.

    Raised by the adapters' pure parsers, which know nothing of HTTP; the
    adapter turns it into a logged ProviderError naming the provider.
    """

    def __init__(self, reason: str, body: str) -> None:
        super().__init__(f"{reason}: {excerpt(clean_str(body))!r}")
        self.reason = reason
        self.body = body


class ErrorAnswer(BadAnswer):
    """A well-formed answer in which the provider reports an error for the whole request."""


@dataclass(frozen=True, slots=True)
class Reply:
    status: int
    text: str


@dataclass(frozen=True, slots=True)
class Transport:
    """How one provider is called: its name, body bound and what must stay secret."""

    provider: str
    max_body: int
    #: Query parameters whose values are credentials (lower case).
    secret_params: frozenset[str] = frozenset()
    secrets: tuple[Secret, ...] = ()
    #: The provider's connect and read timeouts, per request: the shared
    #: session serves every provider and carries none of its own.
    timeout: aiohttp.ClientTimeout | None = None
    clock: Callable[[], float] = field(default=time.time, repr=False)
    #: The values scrub() looks for, worked out once: safe() runs for every
    #: string of every answer.
    _forms: tuple[str, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        values = [secret.reveal() for secret in self.secrets]
        # Provider text has been through clean_str before it is scrubbed, so
        # a secret holding a control character shows in its cleaned form.
        forms = values + [clean_str(v) for v in values if clean_str(v) != v]
        object.__setattr__(self, "_forms", prepare_secrets(forms))

    def safe(self, text: str) -> str:
        """*text* with every credential value removed, in any encoding (see :func:`scrub`)."""
        return scrub_prepared(text, self._forms)

    def safe_url(self, url: str | yarl.URL) -> str:
        return self.safe(redact_url(str(url), set(self.secret_params)))

    def safe_outcome(self, outcome: Outcome) -> Outcome:
        """*outcome* with the credentials scrubbed from every text it carries.

        A PIN that holds a credential can be neither written (the secret
        would land in the table) nor scrubbed (the customer would get a wrong
        code): the order gets an ERROR outcome instead, as for any unusable
        PIN (see :meth:`Outcome.done`).
        """
        if outcome.pin is not None and self.safe(outcome.pin) != outcome.pin:
            return Outcome.unusable_pin(
                "its PIN contains one of our credentials",
                message=self._maybe(outcome.message),
                raw_status=self._maybe(outcome.raw_status),
            )
        message, raw_status, error = (
            self._maybe(outcome.message),
            self._maybe(outcome.raw_status),
            self._maybe(outcome.error),
        )
        if (message, raw_status, error) == (outcome.message, outcome.raw_status, outcome.error):
            return outcome  # nearly always: no copy (and no second cleaning) per answer
        return replace(outcome, message=message, raw_status=raw_status, error=error)

    def safe_outcomes(self, outcomes: Mapping[UUID, Outcome]) -> dict[UUID, Outcome]:
        """Every outcome an adapter returns passes here: none leaves it unscrubbed."""
        return {order_id: self.safe_outcome(o) for order_id, o in outcomes.items()}

    def log(self, level: str, event: str, **fields: Any) -> None:
        """Log *event* with every string field scrubbed, whatever produced it."""
        getattr(log, level)(event, **{k: self._scrubbed(v) for k, v in fields.items()})

    def _scrubbed(self, value: Any) -> Any:
        if isinstance(value, str):
            return self.safe(value)
        if isinstance(value, list | tuple):
            return [self._scrubbed(v) for v in value]
        return value

    def _maybe(self, text: str | None) -> str | None:
        return None if text is None else self.safe(text)

    async def request(
        self,
        session: aiohttp.ClientSession,
        method: str,
        url: str | yarl.URL,
        headers: Mapping[str, str] | None = None,
    ) -> Reply:
        """One request; a 2xx reply with its body decoded, or an exception.

        Raises RateLimited (429, or 503 with Retry-After), ProviderAuthError
        (401/403) and ProviderError (anything else that is not an answer). A
        :class:`yarl.URL` is sent as it is (an adapter that encoded it itself).
        """
        # The URL carries credentials (znet puts them in the query string), so
        # every text that names it uses safe_url(url). That scrub reads every
        # encoding of the URL: worked out only when a failure is reported,
        # never on the path an answer takes.
        try:
            # No redirects: a custom auth header (api-token) would follow the
            # request to whatever host the Location names.
            async with session.request(
                method,
                url,
                headers=dict(headers or {}),
                allow_redirects=False,
                timeout=self.timeout if self.timeout is not None else session.timeout,
            ) as response:
                if not 200 <= response.status < 300:
                    await self._refuse(response, url)
                body = await self._read(response, url)
                return Reply(response.status, body.decode("utf-8", errors="replace"))
        except ProviderError:
            raise
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            # Never str(exc): aiohttp's texts carry the URL as yarl re-encoded
            # it on the wire (ConnectionTimeoutError), a form no list of
            # encodings we make is sure to hold. What it is, where and the
            # OS's word for it is all a sysadmin needs.
            failure = describe_failure(exc, url)
            safe_url = self.safe_url(url)
            self.log(
                "warning",
                "provider.request_failed",
                provider=self.provider,
                url=safe_url,
                error=failure.kind,
                host=failure.host,
                port=failure.port,
                os_error=failure.os_error,
            )
            raise ProviderError(
                self.safe(f"{self.provider}: request failed ({failure}) for {safe_url}")
            ) from None

    def bad_answer(self, exc: BadAnswer, status: int) -> ProviderError:
        """Log a body that is no answer and return the error to raise."""
        reason = self.safe(clean_str(exc.reason))
        body = self.safe(excerpt(clean_str(exc.body)))
        self.log(
            "warning",
            "provider.error_answer" if isinstance(exc, ErrorAnswer) else "provider.bad_body",
            provider=self.provider,
            status=status,
            reason=reason,
            body=body,
        )
        # Rendered from the scrubbed parts, then scrubbed again: repr() adds
        # escapes, and scrub reads those too.
        return ProviderError(self.safe(f"{self.provider}: HTTP {status}: {reason}: {body!r}"))

    async def _refuse(self, response: aiohttp.ClientResponse, url: str | yarl.URL) -> None:
        status = response.status
        safe_url = self.safe_url(url)
        body = self.safe(excerpt(clean_str(await self._peek(response))))
        if status == 429 or (status == 503 and "Retry-After" in response.headers):
            retry_after = parse_retry_after(response.headers.get("Retry-After", ""), self.clock())
            self.log(
                "warning",
                "provider.rate_limited",
                provider=self.provider,
                status=status,
                retry_after=retry_after,
            )
            raise RateLimited(
                f"{self.provider}: HTTP {status} (retry after {retry_after} s) from {safe_url}",
                retry_after,
            )
        if status in (401, 403):
            # Wrong credentials or a caller IP off the whitelist: an operator
            # must act, so this is an error, not a warning.
            self.log(
                "error",
                "provider.auth_failed",
                provider=self.provider,
                status=status,
                url=safe_url,
                body=body,
            )
            raise ProviderAuthError(
                f"{self.provider}: HTTP {status} from {safe_url}: "
                "credentials or caller IP refused; check the providers file"
            )
        self.log(
            "warning",
            "provider.http_error",
            provider=self.provider,
            status=status,
            url=safe_url,
            body=body,
        )
        raise ProviderError(self.safe(f"{self.provider}: HTTP {status} from {safe_url}: {body!r}"))

    async def _peek(self, response: aiohttp.ClientResponse) -> str:
        """A little of an error reply's body, for the log; never fails."""
        try:
            data = await response.content.read(min(self.max_body, _ERROR_BODY_READ))
        except (aiohttp.ClientError, TimeoutError):
            return ""
        return data.decode("utf-8", errors="replace")

    async def _read(self, response: aiohttp.ClientResponse, url: str | yarl.URL) -> bytes:
        """The whole body, refusing to hold more than max_body bytes of it."""
        limit = self.max_body
        declared = response.content_length
        if declared is not None and declared > limit:
            self._too_large(response.status, url)
        chunks: list[bytes] = []
        size = 0
        while chunk := await response.content.read(limit + 1 - size):
            chunks.append(chunk)
            size += len(chunk)
            if size > limit:
                self._too_large(response.status, url)
        return b"".join(chunks)

    def _too_large(self, status: int, url: str | yarl.URL) -> NoReturn:
        self.log(
            "warning",
            "provider.body_too_large",
            provider=self.provider,
            status=status,
            limit=self.max_body,
        )
        raise ProviderError(
            f"{self.provider}: HTTP {status} body larger than {self.max_body} bytes "
            f"(limits.max_body) from {self.safe_url(url)}"
        )

"""What the fake answers: per-reference scripts, the rule for the rest, and global knobs."""

from __future__ import annotations

import enum
import hashlib
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

MSG_PENDING: Final = "İşlem bekleniyor"
MSG_DONE: Final = "İşlem tamamlandı"
MSG_FAILED: Final = "İşlem iptal edildi"

#: znet error codes the fake uses (``{code}|{message}``).
ZNET_AUTH_ERROR: Final = "8"
ZNET_NOT_FOUND: Final = "4"
ZNET_BAD_REQUEST: Final = "2"

#: Bodies no protocol parser should accept (garbage_rate picks among them).
GARBAGE_BODIES: Final = (
    "<html><head><title>502 Bad Gateway</title></head><body>nginx</body></html>",
    '{"status": "OK", "data": [',
    "",
)


class Answer(enum.Enum):
    """What a reference finally answers, after its pending polls."""

    DONE = "done"
    FAILED = "failed"
    #: Pending for ever.
    PENDING = "pending"
    #: The provider does not know the reference.
    UNKNOWN = "unknown"
    #: No answer at all: the request stays open until the client gives up.
    HANG = "hang"


def default_pin(reference: str) -> str:
    """The PIN a DONE script without one answers: stable, so tests can predict it."""
    return "PIN-" + hashlib.sha256(reference.encode()).hexdigest()[:12].upper()


@dataclass(frozen=True, slots=True)
class Script:
    """How one reference behaves: ``pending_polls`` pending answers, then ``answer``."""

    answer: Answer = Answer.DONE
    pending_polls: int = 0
    #: DONE: the PIN (default :func:`default_pin`); an empty string means none.
    pin: str | None = None
    #: The provider's text for the final answer (default: the Turkish stock phrase).
    message: str | None = None
    #: barakat's status word for the final answer (default accept/reject);
    #: to exercise the adapter's word list ("Completed", "CANCELLED", ...).
    word: str | None = None

    @classmethod
    def done(cls, pin: str | None = None, *, after: int = 0, message: str | None = None) -> Script:
        return cls(Answer.DONE, after, pin=pin, message=message)

    @classmethod
    def failed(cls, reason: str = MSG_FAILED, *, after: int = 0) -> Script:
        return cls(Answer.FAILED, after, message=reason)

    @classmethod
    def pending(cls) -> Script:
        return cls(Answer.PENDING)

    @classmethod
    def unknown(cls) -> Script:
        return cls(Answer.UNKNOWN)

    @classmethod
    def hang(cls) -> Script:
        return cls(Answer.HANG)

    def at(self, poll: int) -> Answer:
        """The answer to the *poll*-th answered poll (1-based). Pure."""
        if self.answer in (Answer.UNKNOWN, Answer.HANG):
            return self.answer
        return Answer.PENDING if poll <= self.pending_polls else self.answer


def always_done(reference: str) -> Script:
    return Script.done()


def mixture(
    *,
    done: float = 0.85,
    failed: float = 0.1,
    unknown: float = 0.05,
    pending_polls: tuple[int, int] = (0, 2),
    seed: int = 0,
) -> Callable[[str], Script]:
    """A rule for many references: a stable mix of answers, drawn per reference.

    The draw depends only on (seed, reference), never on the order requests
    arrive in, so a benchmark or demo run is repeatable. Weights are relative.
    """
    total = done + failed + unknown
    if total <= 0:
        raise ValueError("mixture needs at least one positive weight")

    def rule(reference: str) -> Script:
        rng = random.Random(f"{seed}:{reference}")  # noqa: S311 - a simulation, not a secret
        draw = rng.random() * total
        polls = rng.randint(*pending_polls)
        if draw < done:
            return Script.done(after=polls)
        if draw < done + failed:
            return Script.failed(after=polls)
        return Script.unknown()

    return rule


@dataclass(slots=True)
class Behaviour:
    """Global knobs; mutable, so a test may change them while the server runs."""

    #: Script for a reference without one of its own (asked once per reference).
    default: Callable[[str], Script] = always_done
    #: Seconds before each answer: fixed, or a (low, high) range drawn per request.
    latency: float | tuple[float, float] = 0.0
    #: Fraction of requests answered 500.
    error_rate: float = 0.0
    #: Fraction of requests answered 200 with a body that is no answer.
    garbage_rate: float = 0.0

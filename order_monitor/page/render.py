"""HTML from the page's views: Jinja2 templates, every value escaped.

Autoescaping is on for every template (``select_autoescape`` would leave a
template named otherwise unescaped), and undefined names are errors, so a
typo in a template fails its test instead of showing a blank. Text that came
from a provider or the table goes through :func:`shown` first: control and
invisible format characters (a bidi override, a zero-width joiner, a lone
surrogate) become visible escapes, as in the operator commands, and long
text is cut; the template then puts it in a ``<bdi>`` so Arabic and Hebrew
read right without reordering the line around them.
"""

from __future__ import annotations

import datetime as dt
from typing import Any, Final

import jinja2

from order_monitor.engine.policy import format_seconds
from order_monitor.operator import printable

#: Characters of provider or table text shown; the rest is cut (the row has it).
SHOWN_CHARS: Final = 300

_environment = jinja2.Environment(
    loader=jinja2.PackageLoader("order_monitor.page", "templates"),
    autoescape=True,
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)


def shown(text: object, limit: int = SHOWN_CHARS) -> str:
    """Text from outside, safe to show: visible escapes, at most *limit* characters."""
    if text is None:
        return "—"
    value = printable(str(text))
    return value if len(value) <= limit else value[: limit - 1] + "…"


def ago(seconds: float | None) -> str:
    """'4m12s' for an age; '—' when unknown; 'in the future' for a negative one."""
    if seconds is None:
        return "—"
    if seconds < 0:
        return "in the future"
    return span(seconds)


def span(seconds: float | None) -> str:
    """A duration either way: '3m' ahead or '3m' overdue (the template says which)."""
    if seconds is None:
        return "—"
    # Tenths below a second: '7.3e-05s' reads as noise on a page.
    return f"{abs(seconds):.1f}s" if abs(seconds) < 1 else format_seconds(abs(seconds))


def when(moment: dt.datetime | None) -> str:
    if moment is None:
        return "—"
    return moment.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def percent(ratio: float | None) -> str:
    return "—" if ratio is None else f"{ratio * 100:.0f} %"


_environment.filters.update(shown=shown, ago=ago, span=span, when=when, percent=percent)


def render(template: str, **context: Any) -> str:
    return _environment.get_template(template).render(**context)

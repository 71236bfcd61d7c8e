"""A small reading of the page's HTML for tests: text by element id, rows by data attribute.

The standard library's HTMLParser, so what is checked is what a browser
parses (entities decoded), not what a regular expression happens to match.
"""

from __future__ import annotations

from html.parser import HTMLParser

#: Elements that never have a closing tag.
_VOID = frozenset({"meta", "link", "input", "br", "img", "hr"})


class Page(HTMLParser):
    def __init__(self, html: str) -> None:
        super().__init__(convert_charrefs=True)
        self.by_id: dict[str, str] = {}
        #: (attribute, value) -> the text of every element carrying it.
        self.by_data: dict[tuple[str, str], str] = {}
        #: data-field texts inside each data-provider/-unserved/-order row.
        self.fields: dict[tuple[str, str], dict[str, str]] = {}
        self.text_parts: list[str] = []
        self.title = ""
        self._open: list[tuple[str, str | None, tuple[str, str] | None, list[str]]] = []
        self._row: tuple[str, str] | None = None
        self.feed(html)

    @property
    def text(self) -> str:
        return "".join(self.text_parts)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _VOID:
            return
        found = dict(attrs)
        data = next(
            ((k, v or "") for k, v in attrs if k.startswith("data-") and k != "data-field"), None
        )
        if tag == "tr" and data is not None:
            self._row = data
            self.fields[data] = {}
        field = found.get("data-field")
        self._open.append((tag, found.get("id"), data, []))
        if field is not None and self._row is not None:
            self._open[-1] = (tag, found.get("id"), ("field", field), [])

    def handle_endtag(self, tag: str) -> None:
        if tag in _VOID or not self._open:
            return
        while self._open:
            name, ident, data, parts = self._open.pop()
            text = " ".join("".join(parts).split())
            if ident is not None:
                self.by_id[ident] = text
            if data is not None and data[0] == "field" and self._row is not None:
                self.fields[self._row][data[1]] = text
            elif data is not None:
                self.by_data[data] = text
            if name == "title":
                self.title = text
            if name == "tr":
                self._row = None
            if self._open:
                self._open[-1][3].append("".join(parts))
            if name == tag:
                break

    def handle_data(self, data: str) -> None:
        self.text_parts.append(data)
        if self._open:
            self._open[-1][3].append(data)

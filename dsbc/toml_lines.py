"""Where things are written in a TOML document: the line of every table header, key path
and array element, and the key a line belongs to.

tomllib and msgspec say *what* is wrong (a key path, or a line with no key); an operator
needs both (``dsbc.toml:17: systems.target.sip[1]: bad port``).  This is a line scanner,
not a parser: it reads documents tomllib has accepted (or, for a syntax error, the valid
part before the error line), and follows strings, comments, brackets and commas just far
enough to know which key each line belongs to.
"""

from __future__ import annotations

import re

Key = tuple[str | int, ...]

_TOML_KEY = r"""(?:[A-Za-z0-9_\-]+|"[^"\\]*(?:\\.[^"\\]*)*"|'[^']*')"""
_TOML_DOTTED = rf"{_TOML_KEY}(?:\s*\.\s*{_TOML_KEY})*"
_HEADER_RE = re.compile(rf"^\s*(\[\[?)\s*({_TOML_DOTTED})\s*\]\]?\s*(?:#.*)?$")
_KEYLINE_RE = re.compile(rf"^\s*({_TOML_DOTTED})\s*=(.*)$")


def _key_parts(dotted: str) -> tuple[str, ...]:
    return tuple(k.strip("\"'") for k in re.findall(_TOML_KEY, dotted))


class _Value:
    """One value, fed line by line until it is complete: outside strings and comments it
    counts brackets, and notes the line where each element of an outer array starts."""

    __slots__ = ("array", "depth", "expect", "items", "quote")

    def __init__(self) -> None:
        self.depth = 0  # open [ and { of the value
        self.quote = ""  # the delimiter of an open string
        self.array = False  # the value is an array (its elements are located)
        self.expect = False  # the next thing written at depth 1 starts an element
        self.items: list[int] = []

    @property
    def done(self) -> bool:
        return self.depth <= 0 and not self.quote

    def _item(self, n: int) -> None:
        if self.array and self.depth == 1 and self.expect:
            self.items.append(n)
            self.expect = False

    def feed(self, line: str, n: int) -> None:
        i = 0
        while i < len(line):
            ch = line[i]
            if self.quote:
                if ch == "\\" and self.quote[0] == '"':  # an escape, or a line-ending backslash
                    i += 2
                elif line.startswith(self.quote, i):
                    i += len(self.quote)
                    self.quote = ""
                else:
                    i += 1
                continue
            if ch == "#":
                break
            if ch in "\"'":
                self._item(n)
                self.quote = ch * 3 if line.startswith(ch * 3, i) else ch
                i += len(self.quote)
                continue
            if ch in "[{":
                if ch == "[" and self.depth == 0:  # the value is an array
                    self.array = self.expect = True
                else:
                    self._item(n)
                self.depth += 1
            elif ch in "]}":
                self.depth -= 1
                if self.depth <= 1:
                    self.expect = False
            elif ch == "," and self.depth == 1:
                self.expect = True
            elif not ch.isspace():
                self._item(n)
            i += 1
        if len(self.quote) == 1:  # a one-line string does not go on (tomllib said so already)
            self.quote = ""


def scan(text: str) -> tuple[dict[Key, int], dict[int, Key]]:
    """``(first, owner)``: the first line (1-based) of every table header, key path and array
    element (``("sip", "listen", 1)``), and the key or table each line that is not blank or
    a comment belongs to (the lines of a multi-line array or string belong to its key).

    Array-of-tables entries get their index (``("api", "vhosts", 1, "realm")``)."""
    first: dict[Key, int] = {}
    owner: dict[int, Key] = {}
    counts: dict[Key, int] = {}
    table: Key = ()
    value: _Value | None = None
    key: Key = ()
    for n, line in enumerate(text.split("\n"), 1):  # TOML lines end with LF (or CRLF) only
        if value is None:
            m = _HEADER_RE.match(line)
            if m:
                parts: Key = _key_parts(m.group(2))
                owner[n] = parts
                if m.group(1) == "[[":
                    first.setdefault(parts, n)
                    counts[parts] = counts.get(parts, -1) + 1
                    parts = parts + (counts[parts],)
                table = parts
                first.setdefault(table, n)
                continue
            m = _KEYLINE_RE.match(line)
            if not m:
                continue
            keys = _key_parts(m.group(1))
            key = table + keys
            for i in range(1, len(keys) + 1):  # a.b.c = 1 also writes a and a.b
                first.setdefault(table + keys[:i], n)
            value = _Value()
            line = m.group(2)
        owner[n] = key
        value.feed(line, n)
        if value.done:
            for i, at in enumerate(value.items):
                first.setdefault(key + (i,), at)
            value = None
    return first, owner


def key_lines(text: str) -> dict[Key, int]:
    """The first line of every table header, key path and array element (`scan`)."""
    return scan(text)[0]


def locate(text: str, parts: list[str | int] | Key) -> int:
    """The line (1-based) of a key path in a TOML document, or of its nearest ancestor that
    is written there (an inline table, the table header), or 1."""
    where = key_lines(text)
    path = tuple(parts)
    while path:
        if path in where:
            return where[path]
        path = path[:-1]
    return 1

"""Combined queries: weighted sums of text and image terms with negatives.

Syntax (CLI, API and UI alike)::

    "2:dog" + ./beach.jpg - "snow"      text "dog" weighted 2, plus an image file, minus text "snow"
    #42 - "people"                      indexed photo 42 minus "people"
    dog on a beach at sunset            no quotes, no operators: one plain text term

A term is a quoted text, an image path, or ``#ID`` / ``id:ID`` for an indexed photo; an optional ``W:`` prefix
(inside or before the quotes) weights it. Terms are joined by ``+`` or ``-``. Front ends that must not touch
the server's files (the UI, the query server) parse with ``allow_files=False``: an image term is then refused
before any path is looked at, so the answer never says whether a file exists.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from clipsearch.indexer.errors import UsageError

MAX_QUERY_CHARS = 1000  # longer text is a paste gone wrong: the text tower reads 77 tokens (32 for the demo model)
_WEIGHT = re.compile(r"^(\d+(?:\.\d+)?):(?=\S)(.*)$", re.S)
_ID = re.compile(r"^(?:#|id:)(\d+)$")


@dataclass(frozen=True)
class Term:
    """One part of a combined query."""

    kind: str  # "text" | "image" | "photo"
    value: str  # the text, the image path, or the photo id as a string
    weight: float  # negative for subtracted terms


def _looks_combined(query: str) -> bool:
    return '"' in query or bool(re.search(r"(^|\s)[+-](\s|$)", query)) or bool(_ID.match(query.strip()))


def _tokens(query: str) -> list[tuple[str, bool]]:
    """Split into (token, was_quoted) with +/- as their own tokens."""
    out: list[tuple[str, bool]] = []
    i, n = 0, len(query)
    while i < n:
        c = query[i]
        if c.isspace():
            i += 1
        elif c in "+-" and (i + 1 == n or query[i + 1].isspace()):
            out.append((c, False))
            i += 1
        else:  # a word, or a quoted text with an optional W: prefix glued to it
            j = i
            while j < n and not query[j].isspace() and query[j] != '"':
                j += 1
            if j < n and query[j] == '"':
                close = query.find('"', j + 1)
                if close < 0:
                    raise UsageError(f"unbalanced quote in query: {query}")
                out.append((query[i:j] + query[j + 1 : close], True))
                i = close + 1
            else:
                out.append((query[i:j], False))
                i = j
    return out


FILES_REFUSED = ("image files on the server cannot be used in a query here: quote text terms (\"dog\"), use "
                 "#ID for a catalogued photo, or upload an image on the Image page")


def parse_query(query: str, allow_files: bool = True) -> list[Term]:
    """Parse a query into weighted terms; a plain sentence is one text term of weight 1."""
    query = query.strip()
    if not query:
        raise UsageError("empty query: type what the photos you want show")
    if len(query) > MAX_QUERY_CHARS:
        raise UsageError(f"the query is {len(query):,} characters long; at most {MAX_QUERY_CHARS:,} are read "
                         "(a model reads the first few dozen words)")
    if not _looks_combined(query):
        return [Term("text", query, 1.0)]
    terms: list[Term] = []
    sign = 1.0
    expect_term = True
    for tok, quoted in _tokens(query):
        if not quoted and tok in "+-":
            if expect_term and terms:
                raise UsageError(f"two operators in a row in query: {query}")
            sign, expect_term = (1.0 if tok == "+" else -1.0), True
            continue
        if not expect_term:
            raise UsageError(f"missing + or - before '{tok}' in query: {query}")
        weight, body = 1.0, tok
        m = _WEIGHT.match(tok)
        if m:
            weight, body = float(m.group(1)), m.group(2)
        if quoted:
            terms.append(Term("text", body, sign * weight))
        elif _ID.match(body):
            terms.append(Term("photo", _ID.match(body).group(1), sign * weight))  # type: ignore[union-attr]
        elif not allow_files:
            raise UsageError(f"'{body}': {FILES_REFUSED}")
        else:
            path = os.path.expanduser(body)
            if not os.path.isfile(path):
                raise UsageError(f"'{body}' is neither a quoted text, an image file, nor #ID")
            terms.append(Term("image", path, sign * weight))
        sign, expect_term = 1.0, False
    if expect_term:
        raise UsageError(f"query ends with an operator: {query}")
    if all(t.weight <= 0 for t in terms):
        raise UsageError("a query needs at least one positive term")
    return terms

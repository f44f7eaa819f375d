"""Lexer of the query string mini-language (SPEC 3.6 "Query string grammar"); `query.py` builds the query.

A query string is a list of whitespace-separated parts, each optionally prefixed by ``+`` (MUST) or ``-``
(MUST_NOT), default SHOULD:

* ``word``; ``field:value``;
* ``"a phrase"``, ``field:"a phrase"`` (an unterminated quote runs to the end);
* ``(several words)``, ``field:(several words)``;
* special fields ``type:<name>`` and ``sort:<x>`` (interpreted by `query.py`).

Field names are lowercased; values keep their case (text is lowercased by the analyzer anyway, and exact
string fields keep matching their indexed case).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Occur(enum.Enum):
    SHOULD = 0
    MUST = 1
    MUST_NOT = 2


class PartKind(enum.Enum):
    WORD = "word"
    PHRASE = "phrase"
    GROUP = "group"


@dataclass(frozen=True, slots=True)
class Part:
    occur: Occur
    kind: PartKind
    field: str | None
    text: str


def parse_query_string(text: str) -> list[Part]:
    """Split a query string into parts (never fails; empty parts are dropped)."""
    parts: list[Part] = []
    i, n = 0, len(text)
    while i < n:
        if text[i].isspace():
            i += 1
            continue
        occur = Occur.SHOULD
        if text[i] in "+-":
            occur = Occur.MUST if text[i] == "+" else Occur.MUST_NOT
            i += 1
            if i >= n or text[i].isspace():
                continue
        field: str | None = None
        if text[i] == '"':
            end = text.find('"', i + 1)
            end = n if end < 0 else end
            parts.append(Part(occur, PartKind.PHRASE, None, text[i + 1 : end]))
            i = end + 1
            continue
        if text[i] == "(":
            end = text.find(")", i + 1)
            end = n if end < 0 else end
            _append(parts, Part(occur, PartKind.GROUP, None, text[i + 1 : end].strip()))
            i = end + 1
            continue
        start = i
        while i < n and not text[i].isspace():
            if text[i] == ":" and field is None and i > start:
                field = text[start:i].lower()
                i += 1
                if i < n and text[i] == '"':
                    end = text.find('"', i + 1)
                    end = n if end < 0 else end
                    parts.append(Part(occur, PartKind.PHRASE, field, text[i + 1 : end]))
                    i = end + 1
                    break
                if i < n and text[i] == "(":
                    end = text.find(")", i + 1)
                    end = n if end < 0 else end
                    _append(parts, Part(occur, PartKind.GROUP, field, text[i + 1 : end].strip()))
                    i = end + 1
                    break
                start = i
                continue
            i += 1
        else:
            _append(parts, Part(occur, PartKind.WORD, field, text[start:i]))
    return parts


def _append(parts: list[Part], part: Part) -> None:
    if part.text:
        parts.append(part)

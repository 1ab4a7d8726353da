"""What a person asks the Inspect tab to show: a word, a phrase, one occurrence, a token, a special token.

=============  =================================  ===========================
query          map                                 Python
=============  =================================  ===========================
``circle``     the word (all its occurrences)      ``maps["circle"]``
``red circle`` the phrase (sum of its words)       ``maps["red circle"]``
``a (2)``      the second occurrence of "a"        ``maps.word("a", occurrence=2)``
``#5``         token position 5                    ``maps.token(5)``
``<end>``      the start / end / padding tokens    ``maps.special("end")``
=============  =================================  ===========================
"""

from __future__ import annotations

import re

_TOKEN = re.compile(r"^#\s*(\d+)$")
_SPECIAL = re.compile(r"^<\s*(start|end|padding)\s*>$", re.IGNORECASE)
_OCCURRENCE = re.compile(r"^(.*\S)\s+\((\d+)\)$")


def parse_query(query: str) -> tuple[str, str | int, int | None]:
    """``(kind, value, occurrence)``: ``("token", 5, None)``, ``("special", "end", None)``, ``("word", "a", 2)``."""
    if not isinstance(query, str) or not query.strip():
        raise ValueError("name a word or phrase of the prompt (or #5 for token 5, <end> for the end token)")
    text = query.strip()
    if m := _TOKEN.match(text):
        return "token", int(m.group(1)), None
    if m := _SPECIAL.match(text):
        return "special", m.group(1).lower(), None
    if m := _OCCURRENCE.match(text):
        return "word", m.group(1), int(m.group(2))
    return "word", text, None


def heatmap(maps, query: str):
    """The :class:`pc.HeatMap` of ``query`` in ``maps`` (a ``pc.HeatMaps``); the API's own errors otherwise."""
    kind, value, occurrence = parse_query(query)
    if kind == "token":
        return maps.token(value)
    if kind == "special":
        return maps.special(value)
    return maps.word(value, occurrence)


def word_labels(words: list[str]) -> list[str]:
    """One label per word, repeats numbered as :func:`parse_query` reads them: ``a (1)``, ``red``, ``a (2)``."""
    counts: dict[str, int] = {}
    totals = {w.lower(): sum(x.lower() == w.lower() for x in words) for w in words}
    labels = []
    for w in words:
        counts[w.lower()] = counts.get(w.lower(), 0) + 1
        labels.append(f"{w} ({counts[w.lower()]})" if totals[w.lower()] > 1 else w)
    return labels

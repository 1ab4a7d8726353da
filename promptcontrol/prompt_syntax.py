"""Weight syntax people already type: AUTOMATIC1111's emphasis and prompt editing, and compel's ``+``/``-``.

``parse_prompt("a ((red)) circle [and] a (blue square:1.3)")`` gives the *plain prompt* (exactly what the
tokenizer should see: ``"a red circle and a blue square"``) and weighted character spans of it, so that a
repeated word keeps its own weight at each occurrence.

A1111 emphasis (its documented rules, reproduced):

* ``(text)`` ×1.1, ``((text))`` ×1.21, ``[text]`` ÷1.1, ``(text:1.5)`` ×1.5; nesting multiplies;
* ``\\(`` ``\\)`` ``\\[`` ``\\]`` ``\\\\`` are literal characters (a backslash before any character makes it
  literal, which is also what A1111 ends up doing);
* an unclosed ``(`` or ``[`` weights everything after it (×1.1 / ÷1.1); a ``)`` or ``]`` that closes nothing is
  literal text; a ``:`` that is not ``:number)`` is literal text;
* ``BREAK`` (A1111: start a new 75-token chunk) — promptcontrol encodes one 77-token chunk, so the keyword is
  removed and replaced by one space; its position in the plain prompt is kept in ``ParsedPrompt.breaks``.

compel (on by default, ``compel=False`` turns it off): ``word+`` ×1.1, ``word++`` ×1.21, ``word-`` ×0.9,
``word--`` ×0.81, ``(a phrase)1.3`` ×1.3, ``(a phrase)+`` ×1.1. The signs weight the whole of compel's word:
every character up to the previous space or syntax character (``()[]:|",.+-=``), so ``big-cat+``, ``don't+``,
``score_9+``, ``🐱+`` and ``\\(a\\)+`` weight all of ``big-cat``, ``don't``, ``score_9``, ``🐱``, ``(a)``. A number
or a run of ``+``/``-`` right after ``)`` is compel's group weight (A1111 would weight the group ×1.1 and keep the
number as text). Write ``\\+`` or ``\\-`` for a literal sign after a word (``c\\+\\+``). compel's operators
(``.swap()``, ``.blend()``, ``.and()``, ``.add()``, ``.attend()``, ``withLora()``/``useLora()``) and quoted
weights (``"a red car"1.3``) are not supported: they raise ``ValueError`` saying what to write instead.

A1111 prompt editing (applied before emphasis, as A1111 does): ``[from:to:when]`` uses ``from`` until step
``when`` and ``to`` from then on; ``[to:when]`` adds ``to`` at ``when``; ``[from::when]`` removes ``from`` at
``when``. ``when`` is a signed number (``2``, ``0.5``, ``-1``, ``3e0``); A1111's ``use_old_scheduling`` rule
decides what it means: ``when < 1`` is a fraction of the steps (``int(when * steps)``), otherwise a step number
(``1.0`` is step 1); step ``i`` (0-based) uses ``from`` while ``i < when``, so a switch that rounds to step 0 (or
below) uses ``to`` from the first step. ``[a|b]`` alternates per step. :meth:`ParsedPrompt.at_step` and
:meth:`ParsedPrompt.schedule` give the prompt of each step. ``.prompt`` is the prompt of the first step: of a
run of ``steps`` steps when :func:`parse_prompt` is given ``steps=``; without it, of a run long enough that no
fraction rounds to step 0 (``[cat:dog:0.05]`` gives "cat", though 10 steps switch at step 0).

Text is read in Unicode NFC (as CLIP's tokenizer reads it), so decomposed accents stay inside their words.
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Union

from .tokens import WORD_PATTERN, normalize_text, special_counts

ROUND = 1.1
SQUARE = 1 / 1.1
COMPEL_UP = 1.1
COMPEL_DOWN = 0.9

_WEIGHTED_CLOSE = re.compile(r":\s*([+-]?[.\d]+)\s*\)")
_COMPEL_GROUP = re.compile(r"(\d+(?:\.\d*)?|\.\d+|\++|-+)(?=[^\w.+\-]|$)")
# one character of a compel word: an escape pair, or anything but space and syntax (compel's ()",.+-= and A1111's
# []:|\ — so "(cat+:1.5)" weights "cat" twice)
_COMPEL_CHAR = r"(?:\\\S|[^\s()\[\]:|\\\",.+\-=])"
# a compel word: its characters, with inner (or leading) signs that a word character follows ("big-cat", "-5")
_COMPEL_TERM = re.compile(rf"(?:[+\-](?={_COMPEL_CHAR}))*{_COMPEL_CHAR}(?:{_COMPEL_CHAR}|[+\-](?={_COMPEL_CHAR}))*")
# the weight after a word: a whole run of one sign, not followed by a word character ("cat+-" weights "cat", as
# compel does; "cat++x" stays text)
_COMPEL_SIGNS = re.compile(rf"(\++(?!\+)|-+(?!-))(?!{_COMPEL_CHAR})")
_COMPEL_OPERATOR = re.compile(r"(?<!\\)\.(swap|blend|and|add|attend)\s*\(|\b(withLora|useLora)\s*\(")
_QUOTED_WEIGHT = re.compile(r'(?<!\\)"((?:[^"\\]|\\.)*)"(\++|-+|\d+(?:\.\d*)?|\.\d+)')
_BREAK = re.compile(r"\s*\bBREAK\b\s*")
_TEXT = re.compile(r"[^\\()\[\]:]+")
_WHEN = re.compile(r"^\s*([+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?)\s*$")  # lark's SIGNED_NUMBER, as A1111


@dataclass(frozen=True)
class WeightedSpan:
    """Characters ``[start, end)`` of the plain prompt that carry ``weight`` (≠ 1)."""

    start: int
    end: int
    weight: float
    text: str


@dataclass(frozen=True)
class WeightedWord:
    """A word of the plain prompt (as :mod:`promptcontrol.tokens` splits words) with a weight ≠ 1."""

    text: str
    start: int
    end: int
    weight: float


# ---- prompt editing: a tree of plain text, scheduled and alternating parts ------------------------------------
@dataclass(frozen=True)
class _Scheduled:
    before: tuple
    after: tuple
    when: float


@dataclass(frozen=True)
class _Alternate:
    options: tuple


_Node = Union[str, _Scheduled, _Alternate]


def _parse_nodes(text: str, i: int, stops: str) -> tuple[list[_Node], int]:
    """Nodes from ``text[i:]`` up to the first unescaped character of ``stops`` (returned index points at it)."""
    nodes: list[_Node] = []
    buf: list[str] = []

    def flush() -> None:
        if buf:
            nodes.append("".join(buf))
            buf.clear()

    n = len(text)
    while i < n:
        c = text[i]
        if c == "\\":
            buf.append(text[i : i + 2])
            i += 2
            continue
        if c in stops:
            break
        if c == "(":
            inner, j = _parse_nodes(text, i + 1, ")")
            if j < n:
                flush()
                nodes.extend(["(", *inner, ")"])
                i = j + 1
                continue
        elif c == "[":
            parts, seps, j = [], [], i + 1
            while True:
                part, j = _parse_nodes(text, j, ":|]")
                parts.append(part)
                if j >= n or text[j] == "]":
                    break
                seps.append(text[j])
                j += 1
            if j < n:
                flush()
                nodes.extend(_bracket(parts, seps))
                i = j + 1
                continue
        buf.append(c)  # plain text, or an opening bracket that is never closed
        i += 1
    flush()
    return nodes, i


def _bracket(parts: list[list[_Node]], seps: list[str]) -> list[_Node]:
    """A ``[...]`` group: prompt editing, alternation, or plain text for the emphasis parser (``[word]``)."""
    if seps and set(seps) == {":"} and len(parts) in (2, 3):
        last = parts[-1]
        match = _WHEN.match(last[0]) if len(last) == 1 and isinstance(last[0], str) else None  # "3", "-1", "3e0"
        if match:
            before, after = (parts[0], parts[1]) if len(parts) == 3 else ([], parts[0])
            return [_Scheduled(tuple(before), tuple(after), float(match.group(1)))]
    if seps and set(seps) == {"|"}:
        return [_Alternate(tuple(tuple(p) for p in parts))]
    out: list[_Node] = ["["]
    for k, part in enumerate(parts):
        if k:
            out.append(seps[k - 1])
        out.extend(part)
    out.append("]")
    return out


def _switch_step(when: float, total: int | None) -> float:
    """First (0-based) step that uses the ``to`` side: A1111's ``use_old_scheduling`` rule.

    ``when < 1`` is a fraction of ``total`` (``int(when * total)``), otherwise a step number; clipped to
    ``[0, total]`` (so ``1e999`` and ``-1e999`` need no special case). Without ``total``, ``when`` itself.
    """
    if total is None:
        return when
    step = when * total if when < 1 else when
    return int(min(max(step, 0.0), total))


def _render(nodes, step: int, total: int | None) -> str:
    out = []
    for node in nodes:
        if isinstance(node, str):
            out.append(node)
        elif isinstance(node, _Scheduled):
            out.append(_render(node.before if step < _switch_step(node.when, total) else node.after, step, total))
        else:
            out.append(_render(node.options[step % len(node.options)], step, total))
    return "".join(out)


# ---- emphasis -------------------------------------------------------------------------------------------------
def _compel_weight(suffix: str) -> float:
    if suffix[0] == "+":
        return COMPEL_UP ** len(suffix)
    if suffix[0] == "-":
        return COMPEL_DOWN ** len(suffix)
    return float(suffix)


def _plain_number(value: float) -> str:
    """``value`` as a plain decimal that reads back to the same float (``1e-05`` → ``0.00001``): A1111's weight
    syntax ``[+-]?[.\\d]+`` has no exponents."""
    return format(Decimal(repr(float(value))), "f")


def _compel_words_as_groups(text: str) -> str:
    """``text`` with each compel word weight (``big-cat+``) written as the A1111 group ``(big-cat:1.1)``.

    A word is a run of :data:`_COMPEL_CHAR` (escape pairs included, so ``\\(a\\)+`` weights ``(a)``); the signs
    must follow it directly and end at a space, syntax character or the end. The group multiplies exactly as
    compel's weight does, inside any brackets around it.
    """
    out, i, n = [], 0, len(text)
    while i < n:
        word = _COMPEL_TERM.match(text, i)
        if word is None:
            step = 2 if text[i] == "\\" else 1  # an escaped space: keep the pair together
            out.append(text[i : i + step])
            i += step
            continue
        signs = _COMPEL_SIGNS.match(text, word.end())
        if signs is None:
            out.append(word.group(0))
            i = word.end()
        else:
            out.append(f"({word.group(0)}:{_plain_number(_compel_weight(signs.group(1)))})")
            i = signs.end()
    return "".join(out)


def _check_compel_operators(text: str) -> None:
    """Raise ``ValueError`` for compel syntax that promptcontrol does not read (it would become mangled text)."""
    m = _COMPEL_OPERATOR.search(text)
    if m:
        name = m.group(1) or m.group(2)
        instead = {
            "swap": "for a prompt-to-prompt swap use pc.edit(pipe, source, edited); for a switch during the run "
            "use A1111's [from:to:when]",
            "attend": "write (text)1.3 or (text:1.3)",
            "blend": "blending text embeddings is not supported",
            "and": "conjunctions (compel's .and(), A1111's AND) are not supported",
            "add": "conjunctions (compel's .add(), A1111's AND) are not supported",
            "withLora": "load LoRA weights with pipe.load_lora_weights(...)",
            "useLora": "load LoRA weights with pipe.load_lora_weights(...)",
        }[name]
        written = f".{name}()" if m.group(1) else f"{name}()"
        raise ValueError(
            f"compel's {written} operator (at character {m.start()} of {text!r}) is not supported by promptcontrol's "
            f"prompt syntax: {instead}; or pass compel=False to read it as plain text"
        )
    m = _QUOTED_WEIGHT.search(text)
    if m:
        raise ValueError(
            f"compel's quoted weight {m.group(0)!r} is not supported by promptcontrol's prompt syntax: write "
            f"({m.group(1)}){m.group(2)} instead; or pass compel=False to read it as plain text"
        )


def _emphasis(text: str, compel: bool) -> tuple[list[tuple[str, float]], list[int]]:
    """Fragments ``(text, weight)`` whose concatenation is the plain prompt, and the fragment indices of BREAKs."""
    res: list[list] = []  # [text, weight, is_break]
    rounds: list[int] = []
    squares: list[int] = []

    def multiply(start: int, weight: float) -> None:
        for fragment in res[start:]:
            if not fragment[2]:
                fragment[1] *= weight

    def add_text(chunk: str) -> None:
        for k, part in enumerate(_BREAK.split(chunk)):
            if k:
                res.append([" ", 1.0, True])
            res.append([part, 1.0, False])

    if compel:
        text = _compel_words_as_groups(text)
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == "\\":
            res.append([text[i + 1 : i + 2], 1.0, False])
            i += 2
        elif c == "(":
            rounds.append(len(res))
            i += 1
        elif c == "[":
            squares.append(len(res))
            i += 1
        elif c == ":":
            m = _WEIGHTED_CLOSE.match(text, i)
            weight = None
            if m and rounds:
                try:
                    weight = float(m.group(1))
                except ValueError:
                    weight = None
            if weight is not None:
                multiply(rounds.pop(), weight)
                i = m.end()
            else:
                res.append([":", 1.0, False])
                i += 1
        elif c == ")":
            if rounds:
                start = rounds.pop()
                m = _COMPEL_GROUP.match(text, i + 1) if compel else None
                if m:
                    multiply(start, _compel_weight(m.group(1)))
                    i = m.end()
                else:
                    multiply(start, ROUND)
                    i += 1
            else:
                res.append([")", 1.0, False])
                i += 1
        elif c == "]":
            if squares:
                multiply(squares.pop(), SQUARE)
            else:
                res.append(["]", 1.0, False])
            i += 1
        else:
            m = _TEXT.match(text, i)
            add_text(m.group(0))
            i = m.end()
    for start in rounds:
        multiply(start, ROUND)
    for start in squares:
        multiply(start, SQUARE)
    fragments, breaks = [], []
    for text_, weight, is_break in res:
        if is_break:
            breaks.append(len(fragments))
        if text_:
            fragments.append((text_, weight))
    return fragments, breaks


# ---- the result -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ParsedPrompt:
    """A prompt with weight syntax, parsed.

    source:  the text given to :func:`parse_prompt`
    prompt:  the plain prompt of the first step: what the tokenizer sees (syntax removed, escapes resolved, NFC)
    spans:   weighted character spans of ``prompt`` (weights ≠ 1; adjacent equal weights merged)
    breaks:  character offsets in ``prompt`` where a ``BREAK`` was removed
    steps:   the run's number of steps given to :func:`parse_prompt` (``prompt`` is that run's first step), or None
    """

    source: str
    prompt: str
    spans: tuple[WeightedSpan, ...] = ()
    breaks: tuple[int, ...] = ()
    compel: bool = field(default=True, repr=False)
    steps: int | None = field(default=None, repr=False)
    _tree: tuple = field(default=(), repr=False, compare=False)

    @property
    def is_scheduled(self) -> bool:
        """Whether the prompt changes during the run (``[from:to:when]`` or ``[a|b]``)."""
        return any(not isinstance(node, str) for node in self._tree)

    def weight_of(self, start: int, end: int) -> float:
        """The weight of characters ``[start, end)``: the weight covering most of them (1 where none)."""
        best, best_cover = 1.0, 0
        covered = 0
        for span in self.spans:
            overlap = min(end, span.end) - max(start, span.start)
            if overlap > 0:
                covered += overlap
                if overlap > best_cover:
                    best, best_cover = span.weight, overlap
        if (end - start) - covered > best_cover:
            return 1.0
        return best

    @property
    def words(self) -> tuple[WeightedWord, ...]:
        """Every word of the plain prompt with a weight ≠ 1, in order (a repeated word appears at each place)."""
        out = []
        for m in WORD_PATTERN.finditer(self.prompt):
            weight = self.weight_of(m.start(), m.end())
            if weight != 1.0:
                out.append(WeightedWord(m.group(0), m.start(), m.end(), weight))
        return tuple(out)

    def at_step(self, step: int, total: int | None = None) -> "ParsedPrompt":
        """The prompt used at 0-based ``step`` of a run of ``total`` steps (default: ``steps``; no schedule left).

        With neither, fractions count as in a long run (see :attr:`prompt`).
        """
        if not self.is_scheduled:
            return self
        total = self.steps if total is None else total
        return _parse_plain(self.source, _render(self._tree, step, total), self.compel)

    def schedule(self, total: int | None = None) -> list["ParsedPrompt"]:
        """The prompt of every step of a run of ``total`` steps (default: the ``steps`` given to parse_prompt).

        ``schedule(total)[0]`` is :attr:`prompt` when the prompt was parsed with ``steps=total``.
        """
        if total is None:
            if self.steps is None:
                raise ValueError("schedule needs the number of steps: schedule(steps), or parse_prompt(..., steps=)")
            total = self.steps
        total = _check_steps(total, "schedule")
        if self.steps is not None and total != self.steps:
            raise ValueError(
                f"this prompt was parsed for steps={self.steps} (its .prompt is that run's first step); "
                f"parse it again with steps={total} for a run of {total} steps"
            )
        return [self.at_step(step, total) for step in range(total)]

    def token_weights(self, tokenizer) -> dict[int, float]:
        """``{token position: weight}`` of the plain prompt for ``tokenizer`` (0 is the start token).

        A token takes the weight of the characters it mostly covers. Weighted tokens past the tokenizer's
        limit are dropped with a warning that names their words.
        """
        encoded = tokenizer(self.prompt, add_special_tokens=True, return_offsets_mapping=True, truncation=False)
        ids, offsets = list(encoded["input_ids"]), list(encoded["offset_mapping"])
        before, after = special_counts(tokenizer, ids)  # CLIP: start and end token; T5: end only; Gemma: start only
        limit = int(getattr(tokenizer, "model_max_length", 77))
        last_kept = limit - 1 - after
        weights, cut = {}, []
        for position, (start, end) in enumerate(offsets):
            if end <= start or position < before or position >= len(ids) - after:
                continue
            weight = self.weight_of(start, end)
            if weight == 1.0:
                continue
            if position > last_kept:
                word = next((m.group(0) for m in WORD_PATTERN.finditer(self.prompt) if m.start() < end and start < m.end()), None)
                name = word or self.prompt[start:end]
                if name not in cut:
                    cut.append(name)
                continue
            weights[position] = weight
        if cut:
            warnings.warn(
                f"the weighted word(s) {', '.join(map(repr, cut))} fall past the {limit}-token limit of the "
                "text encoder and are cut off; shorten the prompt",
                stacklevel=2,
            )
        return weights

    def to_syntax(self) -> str:
        """The plain prompt and its weights written back as A1111 syntax (``(text:w)``); parses back to ``self``."""
        out, last = [], 0
        for span in self.spans:
            out.append(_escape(self.prompt[last : span.start]))
            out.append(f"({_escape(span.text)}:{_plain_number(span.weight)})")
            last = span.end
        out.append(_escape(self.prompt[last:]))
        return "".join(out)


def _escape(text: str) -> str:
    """Plain text written so that no part of it reads as syntax (a ``-`` only where it could be a weight)."""
    text = re.sub(r'([\\()\[\]:|+"])', r"\\\1", text)
    text = re.sub(rf"(?<=\S)-(?!{_COMPEL_CHAR})", r"\\-", text)
    return re.sub(r"\bBREAK\b", r"\\BREAK", text)


def _check_steps(steps, name: str) -> int:
    """``steps`` if it is an int >= 1, else a ``ValueError`` naming the caller."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"{name} needs a number of steps >= 1 (an int), got {steps!r}")
    return steps


def _parse_plain(source: str, text: str, compel: bool) -> ParsedPrompt:
    fragments, break_indices = _emphasis(text, compel)
    prompt, spans, breaks, offset = [], [], [], 0
    starts = []
    for text_, weight in fragments:
        starts.append(offset)
        prompt.append(text_)
        if weight != 1.0:
            if spans and spans[-1][1] == offset and spans[-1][2] == weight:
                spans[-1][1] = offset + len(text_)
            else:
                spans.append([offset, offset + len(text_), weight])
        offset += len(text_)
    for index in break_indices:
        breaks.append(starts[index] if index < len(starts) else offset)
    plain = "".join(prompt)
    for s, e, w in spans:
        if not math.isfinite(w):
            raise ValueError(f"the weight of {plain[s:e]!r} in {text!r} is {w}; weights must be finite numbers")
    return ParsedPrompt(
        source=source,
        prompt=plain,
        spans=tuple(WeightedSpan(s, e, w, plain[s:e]) for s, e, w in spans),
        breaks=tuple(breaks),
        compel=compel,
    )


def parse_prompt(text: str, *, compel: bool = True, steps: int | None = None) -> ParsedPrompt:
    """Parse A1111 emphasis and prompt editing and compel weights (see the module docstring).

    ``steps``: the number of steps of the run, when known: ``.prompt`` is then that run's first step (a switch
    that rounds to step 0 is in it) and ``.schedule()`` needs no argument.

    Returns a :class:`ParsedPrompt`: ``.prompt`` (plain text of the first step), ``.spans`` (weighted
    character spans), ``.words`` (weighted words), ``.token_weights(tokenizer)``, ``.schedule(steps)``.
    Raises ``ValueError`` for compel operators it does not read (``.swap()``, ``.blend()``, ...).
    """
    if not isinstance(text, str):
        raise TypeError(f"parse_prompt expects a string, got {type(text).__name__}")
    if steps is not None:
        steps = _check_steps(steps, "parse_prompt")
    normal = normalize_text(text)  # NFC, as CLIP's tokenizer reads it: "naïve" is one word either way
    if compel:
        _check_compel_operators(normal)
    tree, _ = _parse_nodes(normal, 0, "")
    first = _parse_plain(text, _render(tree, 0, steps), compel)
    return ParsedPrompt(
        source=text, prompt=first.prompt, spans=first.spans, breaks=first.breaks, compel=compel, steps=steps,
        _tree=tuple(tree),
    )

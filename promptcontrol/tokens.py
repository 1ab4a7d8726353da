"""Prompt → tokens → words: which token positions belong to which word of a prompt.

The mapping uses the tokenizer's character offsets, so multi-token words ("photorealistic" → photo +
realistic), punctuation, hyphenated words ("blue-green" is one word of three tokens), repeated words and
case all work. Prompts and queries are read in Unicode NFC, as CLIP's tokenizer reads them, so a decomposed
accent ("nai" + U+0308 + "ve") stays inside its word and either spelling finds it. CLIP: position 0 is the start
token; the prompt's tokens follow; then the end token and padding up to ``max_length`` (77). T5 (PixArt) has no
start token (the prompt starts at 0, ``</s>`` follows it), Gemma (Sana) a start token and no end token: the special
tokens around the prompt are read from the tokenizer, never assumed. Words whose tokens fall past the limit are
reported as truncated.

SDXL: both text encoders tokenize the prompt with the same byte-pair vocabulary and their features are
concatenated along the feature axis, so token positions (and therefore word positions) are shared.
"""

from __future__ import annotations

import difflib
import re
import unicodedata
from dataclasses import dataclass

_MARKS = "\u0300-\u036f\u1ab0-\u1aff\u1dc0-\u1dff\u20d0-\u20ff\ufe20-\ufe2f"  # combining diacritics
_LETTERS = rf"(?:[^\W_][{_MARKS}]*)+"
WORD_PATTERN = re.compile(rf"{_LETTERS}(?:['’\-]{_LETTERS})*")
"""A word: letters/digits (with combining accents that NFC leaves, "q̃"), with inner hyphens or apostrophes
(``blue-green``, ``don't``); punctuation is not a word."""


def normalize_text(text: str) -> str:
    """``text`` in Unicode NFC, the form CLIP's tokenizer normalises to (token ids are the same either way)."""
    return unicodedata.normalize("NFC", text)


@dataclass(frozen=True)
class Word:
    """One word of a prompt: its text, its index among the words, its character span, its token positions."""

    text: str
    index: int
    start: int
    end: int
    tokens: tuple[int, ...]  # positions in the padded token sequence (0 is the start token)


@dataclass(frozen=True)
class PromptTokens:
    """A prompt as its tokenizer sees it, with the word ↔ token-position mapping.

    input_ids:  token ids with start and end tokens, before padding, cut to ``max_length``
    words:      every word, in order (truncated words keep the positions that survived, possibly none)
    truncated:  the words with at least one token past the limit
    max_length: the tokenizer's sequence length (the UNet's number of keys)
    prompt_start: position of the prompt's first token (1 after CLIP's / Gemma's start token, 0 for T5)
    end_count:  how many special tokens follow the prompt (1: CLIP's and T5's end token; 0: Gemma)
    """

    prompt: str  # in NFC (see normalize_text): word offsets index this string
    input_ids: tuple[int, ...]
    words: tuple[Word, ...]
    truncated: tuple[Word, ...]
    max_length: int
    prompt_start: int = 1
    end_count: int = 1

    @property
    def texts(self) -> list[str]:
        """The words' texts, in order."""
        return [w.text for w in self.words]

    @property
    def start_position(self) -> int:
        """Position 0: the start token (CLIP, Gemma), or the prompt's first token where there is none (T5)."""
        return 0

    @property
    def end_position(self) -> int:
        """Position of the end token, or the first padding slot where there is none (Gemma): the first
        padding-like slot after the prompt."""
        return len(self.input_ids) - self.end_count

    @property
    def padding_positions(self) -> tuple[int, ...]:
        """Positions after the end token, up to ``max_length``."""
        return tuple(range(len(self.input_ids), self.max_length))

    def matches(self, query: str) -> list[tuple[Word, ...]]:
        """Every run of consecutive words equal (ignoring case) to the words of ``query``, in prompt order."""
        wanted = [m.group(0).lower() for m in WORD_PATTERN.finditer(normalize_text(query))]
        if not wanted:
            raise KeyError(f"{query!r} contains no word; the prompt's words are: {', '.join(self.texts)}")
        lowered = [w.text.lower() for w in self.words]
        n = len(wanted)
        return [
            tuple(self.words[i : i + n]) for i in range(len(lowered) - n + 1) if lowered[i : i + n] == wanted
        ]

    def find(self, query: str, occurrence: int | None = None) -> tuple[Word, ...]:
        """The words of ``query`` (a word or a phrase) in the prompt.

        ``occurrence`` (1-based) picks one match of a repeated word/phrase; ``None`` takes all matches.
        Raises ``KeyError`` listing the prompt's words (and the closest one) when the query is not there.
        """
        found = self.matches(query)
        if not found:
            close = difflib.get_close_matches(normalize_text(query).lower(), [t.lower() for t in self.texts], n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise KeyError(f"{query!r} is not in the prompt {self.prompt!r}; its words are: {', '.join(self.texts)}{hint}")
        if occurrence is None:
            return tuple(w for match in found for w in match)
        if not 1 <= occurrence <= len(found):
            raise KeyError(
                f"{query!r} occurs {len(found)} time(s) in the prompt {self.prompt!r}; occurrence must be 1..{len(found)}"
            )
        return found[occurrence - 1]

    def positions(self, query: str, occurrence: int | None = None) -> list[int]:
        """Token positions of ``query`` (see :meth:`find`), sorted; empty if every one was truncated."""
        return sorted({p for w in self.find(query, occurrence) for p in w.tokens})


def special_counts(tokenizer, ids: list[int]) -> tuple[int, int]:
    """(special tokens before the prompt, special tokens after it) in ``ids``, by the tokenizer's special ids."""
    special = set(getattr(tokenizer, "all_special_ids", ()) or ())
    start = 0
    while start < len(ids) and ids[start] in special:
        start += 1
    end = 0
    while end < len(ids) - start and ids[len(ids) - 1 - end] in special:
        end += 1
    return start, end


def tokenize(tokenizer, prompt: str, max_length: int | None = None) -> PromptTokens:
    """Tokenize ``prompt`` (read in NFC) and map its words to token positions (needs a tokenizer with offsets).

    ``max_length``: the sequence length the text encoder saw (e.g. a pipeline's ``max_sequence_length``);
    default the tokenizer's ``model_max_length``."""
    if not isinstance(prompt, str):
        raise TypeError(f"a prompt must be a string, got {type(prompt).__name__}")
    prompt = normalize_text(prompt)
    max_length = int(max_length or getattr(tokenizer, "model_max_length", 77))
    try:
        encoded = tokenizer(prompt, add_special_tokens=True, return_offsets_mapping=True, truncation=False)
    except NotImplementedError as error:  # slow tokenizers have no offsets
        raise TypeError(f"{type(tokenizer).__name__} gives no character offsets; use a fast tokenizer") from error
    ids = list(encoded["input_ids"])
    offsets = list(encoded["offset_mapping"])
    start_count, end_count = special_counts(tokenizer, ids)
    last_kept = max_length - 1 - end_count  # the last position that holds a prompt token (end tokens follow it)
    words, truncated = [], []
    for index, match in enumerate(WORD_PATTERN.finditer(prompt)):
        start, end = match.span()
        positions = [
            p for p, (s, e) in enumerate(offsets) if e > s and s < end and e > start and start_count <= p < len(ids) - end_count
        ]
        word = Word(match.group(0), index, start, end, tuple(p for p in positions if p <= last_kept))
        words.append(word)
        if any(p > last_kept for p in positions):
            truncated.append(word)
    if len(ids) > max_length:  # what truncation gives: the first tokens, then the end tokens
        ids = ids[: max_length - end_count] + ids[len(ids) - end_count :]
    return PromptTokens(prompt, tuple(ids), tuple(words), tuple(truncated), max_length, start_count, end_count)


def word_tokenizer(pipe):
    """The tokenizer whose tokens a pipeline's denoiser attends to as text keys: ``tokenizer_2`` (T5) on Flux
    pipelines (a transformer with single-stream blocks; their CLIP ``tokenizer`` gives only the pooled vector),
    ``tokenizer`` elsewhere; ``None`` without a pipeline."""
    denoiser = getattr(pipe, "transformer", None)
    denoiser = getattr(denoiser, "_orig_mod", denoiser)
    if hasattr(denoiser, "single_transformer_blocks") and getattr(pipe, "tokenizer_2", None) is not None:
        return pipe.tokenizer_2
    return getattr(pipe, "tokenizer", None)

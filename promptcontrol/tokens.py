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

SD3 with its T5 encoder: the text keys are two segments, CLIP's 77 tokens then T5's ``max_sequence_length``
(``tokenizer_3``, cut as the pipeline cuts it). :class:`SegmentedTokenizer` tokenizes both and
:class:`SegmentedTokens` holds the layout: a word's positions are its CLIP positions and its T5 positions + 77.
Without T5 the segment is zeros (no words).
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
    a :class:`SegmentedTokenizer` of ``tokenizer`` and ``tokenizer_3`` on SD3 with its T5 encoder loaded (text keys
    [CLIP 77 | T5]), ``tokenizer`` elsewhere; ``None`` without a pipeline."""
    denoiser = getattr(pipe, "transformer", None)
    denoiser = getattr(denoiser, "_orig_mod", denoiser)
    if hasattr(denoiser, "single_transformer_blocks") and getattr(pipe, "tokenizer_2", None) is not None:
        return pipe.tokenizer_2
    if t5_loaded(pipe) and getattr(pipe, "tokenizer", None) is not None:
        return SegmentedTokenizer(pipe.tokenizer, pipe.tokenizer_3)
    return getattr(pipe, "tokenizer", None)


# ---- SD3: text keys in two segments, CLIP's then T5's ---------------------------------------------------------
SEGMENTS = ("clip", "t5", "both")
"""The ``segment=`` choices of SD3's text keys: the CLIP segment, the T5 segment, or both."""
SD3_T5_LENGTH = 256  # StableDiffusion3Pipeline's default max_sequence_length


@dataclass(frozen=True)
class TokenSegment:
    """One tokenizer's part of the text keys: its name, its first key position, its own tokens (positions from 0)."""

    name: str
    offset: int
    tokens: PromptTokens

    @property
    def end(self) -> int:
        """One past the segment's last key position."""
        return self.offset + self.tokens.max_length


@dataclass(frozen=True)
class SegmentedTokens(PromptTokens):
    """A prompt over text keys made of several tokenizers' segments one after another (SD3 with T5: CLIP's 77
    keys, then T5's ``max_sequence_length``).

    ``words[i].tokens`` holds the word's positions in every segment (each segment's shifted by its offset);
    ``truncated`` the words cut in any segment; ``max_length`` the whole text length; ``input_ids``,
    ``prompt_start`` and ``end_count`` are the first segment's (the start token is position 0). The special
    positions come from the segments: ``end_position`` is the first segment's end token, ``padding_positions``
    every segment's padding. Padding is never part of a word.
    """

    segments: tuple[TokenSegment, ...] = ()

    @property
    def end_position(self) -> int:
        first = self.segments[0]
        return first.offset + first.tokens.end_position

    @property
    def start_position(self) -> int:
        return self.segments[0].offset

    @property
    def padding_positions(self) -> tuple[int, ...]:
        return tuple(s.offset + p for s in self.segments for p in s.tokens.padding_positions)

    @property
    def names(self) -> tuple[str, ...]:
        """The segments' names, in key order."""
        return tuple(s.name for s in self.segments)

    def only(self, name: str) -> "SegmentedTokens":
        """The same prompt with one segment's token positions alone (positions still index the whole text keys)."""
        chosen = [s for s in self.segments if s.name == name]
        if not chosen:
            raise ValueError(f"no {name!r} segment in these text keys; they hold {', '.join(map(repr, self.names))}")
        return join_segments(self.prompt, tuple(chosen), self.max_length)


def join_segments(prompt: str, segments: tuple[TokenSegment, ...], length: int) -> SegmentedTokens:
    """One :class:`SegmentedTokens` from segments of one prompt (each tokenized by :func:`tokenize`)."""
    words = []
    for parts in zip(*(s.tokens.words for s in segments)):  # the same words: one pattern over one NFC prompt
        positions = tuple(s.offset + p for s, word in zip(segments, parts) for p in word.tokens)
        first = parts[0]
        words.append(Word(first.text, first.index, first.start, first.end, positions))
    cut = {w.index for s in segments for w in s.tokens.truncated}
    first = segments[0].tokens
    return SegmentedTokens(
        prompt, first.input_ids, tuple(words), tuple(w for w in words if w.index in cut), length,
        first.prompt_start, first.end_count, segments,
    )


class SegmentedTokenizer:
    """SD3's two tokenizers as the text keys see them: ``clip`` (77 keys), then ``t5`` (the call's
    ``max_sequence_length`` keys).

    Anywhere one tokenizer is asked for it acts as ``clip`` (calls and attributes go to it), so CLIP-only users
    (prompt-to-prompt edits, the weight syntax, :func:`tokenize`) see SD3 as before; :meth:`tokenize` gives the
    two-segment layout.
    """

    def __init__(self, clip, t5):
        self.clip = clip
        self.t5 = t5

    def __call__(self, *args, **kwargs):
        return self.clip(*args, **kwargs)

    def __getattr__(self, name: str):
        if name in ("clip", "t5"):  # not set yet (copy / unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.clip, name)

    def __len__(self) -> int:
        return len(self.clip)

    def __repr__(self) -> str:
        return f"SegmentedTokenizer(clip={type(self.clip).__name__}, t5={type(self.t5).__name__})"

    @property
    def clip_length(self) -> int:
        """Keys of the CLIP segment: the CLIP tokenizer's ``model_max_length`` (77)."""
        return int(getattr(self.clip, "model_max_length", 77))

    def tokenize(self, prompt: str, text_length: int | None = None) -> SegmentedTokens:
        """``prompt`` over both segments; ``text_length``: all the text keys (77 + ``max_sequence_length``),
        default 77 + 256 (SD3's default)."""
        clip_length = self.clip_length
        length = int(text_length) if text_length is not None else clip_length + SD3_T5_LENGTH
        if length <= clip_length:
            raise ValueError(
                f"{length} text keys leave no T5 segment after CLIP's {clip_length}: SD3 with a T5 encoder has "
                f"{clip_length} + max_sequence_length keys"
            )
        clip = tokenize(self.clip, prompt, max_length=clip_length)
        t5 = tokenize(self.t5, prompt, max_length=length - clip_length)
        return join_segments(clip.prompt, (TokenSegment("clip", 0, clip), TokenSegment("t5", clip_length, t5)), length)


def text_key_weights(tokenizer, weights_for, max_sequence_length: int | None = None) -> dict[int, float]:
    """``{text-key position: weight}`` from ``weights_for(one tokenizer) -> {its position: weight}`` (e.g.
    ``ParsedPrompt.token_weights``): the tokenizer's own positions, and on SD3 with T5 (a
    :class:`SegmentedTokenizer`) also T5's, shifted by 77 and cut where the pipeline cuts them
    (``max_sequence_length``, default 256; its last key is T5's end token)."""
    if not isinstance(tokenizer, SegmentedTokenizer):
        return dict(weights_for(tokenizer))
    length = int(max_sequence_length or SD3_T5_LENGTH)
    weights = dict(weights_for(tokenizer.clip))
    offset = tokenizer.clip_length
    weights.update({offset + p: w for p, w in weights_for(tokenizer.t5).items() if p < length - 1})
    return weights


def has_t5_segment(pipe) -> bool:
    """Whether ``pipe`` is an SD3 pipeline (it has a ``text_encoder_3`` slot) whose text keys end in a T5 segment
    (zeros when ``text_encoder_3`` is ``None``; T5 tokens when it is loaded)."""
    return pipe is not None and hasattr(pipe, "text_encoder_3") and hasattr(pipe, "tokenizer_3")


def t5_loaded(pipe) -> bool:
    """Whether ``pipe`` is an SD3 pipeline with its T5 encoder and tokenizer loaded."""
    return has_t5_segment(pipe) and pipe.text_encoder_3 is not None and pipe.tokenizer_3 is not None


def no_t5_message(what: str) -> str:
    """The error for asking SD3's T5 segment for words when no T5 encoder is loaded."""
    return (
        f"{what}: no T5 encoder is loaded (text_encoder_3 is None), so SD3's T5 segment is zeros and holds no words; "
        "use the CLIP segment (segment='clip', token positions 0..76) or load the pipeline with its "
        "text_encoder_3 and tokenizer_3"
    )

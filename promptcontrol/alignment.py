"""Token alignment between a source prompt and an edited prompt (prompt-to-prompt's mappers).

An alignment is a :class:`TokenMap`: a matrix ``M`` (K × K, source token × edit token) and a vector ``alpha`` (K,).
During an edit, the edited prompt's cross-attention map at token ``n`` becomes

    alpha[n] * (P_source @ M)[:, n] + (1 - alpha[n]) * P_edit[:, n]

* :func:`replace_map` (word swap, same number of words): unchanged words map one-to-one. A swapped word
  that becomes a different number of tokens gets, at each of its ``m`` tokens, the *sum* of the source word's
  token maps divided by ``m`` (prompt-to-prompt's ``ratio = 1 / len(target)``), so the word keeps the source
  word's total attention. ``alpha`` is 1 everywhere except edit tokens with no source counterpart at all
  (punctuation added between words), which keep their own map.
* :func:`refine_map` (words added or removed): the prompt tokens are aligned by a longest common subsequence
  (prompt-to-prompt's global alignment with gap 0, match 1, mismatch −1 has the same optimum); matched tokens
  take the source map (``alpha`` 1), new tokens keep their own map (``alpha`` 0).

Start, end and padding tokens: start ↔ start, end ↔ end, and padding aligned from the end token on (edit
padding ``end_e + k`` ↔ source ``end_s + k``, clipped to the last position). Prompt-to-prompt maps the tokens
after the last swapped word by position (``mapper[j, j]``), which is off by the length difference when a
swapped word changed its token count; here they stay aligned.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .tokens import PromptTokens


@dataclass(frozen=True)
class TokenMap:
    """How the edited prompt's tokens take their attention from the source prompt's tokens.

    matrix: (K, K) float32, ``matrix[w, n]`` = share of source token ``w``'s map given to edit token ``n``
    alpha:  (K,) float32, 1 where edit token ``n`` takes the mapped source map, 0 where it keeps its own
    """

    matrix: torch.Tensor
    alpha: torch.Tensor
    source: PromptTokens
    edit: PromptTokens

    @property
    def size(self) -> int:
        return int(self.alpha.shape[0])


def _check_pair(source: PromptTokens, edit: PromptTokens) -> int:
    if source.max_length != edit.max_length:
        raise ValueError(
            f"the prompts were tokenized with different lengths ({source.max_length} and {edit.max_length}); "
            "tokenize both with the pipeline's tokenizer"
        )
    return source.max_length


def _word_groups(tokens: PromptTokens) -> list[tuple[int, ...]]:
    """Token positions grouped as ``gap_0, word_0, gap_1, word_1, ..., gap_n``.

    A gap holds the prompt tokens between two words that belong to no word (punctuation); gaps may be empty.
    """
    in_word = {p for w in tokens.words for p in w.tokens}
    groups: list[tuple[int, ...]] = []
    cursor = tokens.prompt_start  # after the start token (CLIP, Gemma); 0 where there is none (T5)
    for word in tokens.words:
        first = min(word.tokens) if word.tokens else cursor
        groups.append(tuple(p for p in range(cursor, first) if p not in in_word))
        groups.append(tuple(word.tokens))
        cursor = max(max(word.tokens) + 1 if word.tokens else cursor, cursor)
    groups.append(tuple(p for p in range(cursor, tokens.end_position) if p not in in_word))
    return groups


def _tail(matrix: torch.Tensor, source: PromptTokens, edit: PromptTokens) -> None:
    """Start ↔ start; end token and padding aligned from the end token on (clipped to the last position)."""
    size = matrix.shape[0]
    matrix[0, 0] = 1.0
    for j in range(edit.end_position, size):
        i = min(source.end_position + (j - edit.end_position), size - 1)
        matrix[i, j] = 1.0


def replace_map(source: PromptTokens, edit: PromptTokens) -> TokenMap:
    """The word-swap alignment: both prompts must have the same number of words."""
    size = _check_pair(source, edit)
    if len(source.words) != len(edit.words):
        raise ValueError(
            f"Replace swaps words one for one, but the source prompt has {len(source.words)} words "
            f"({' '.join(source.texts)}) and the edited prompt {len(edit.words)} ({' '.join(edit.texts)}); "
            "use pc.Refine for prompts that add or remove words"
        )
    matrix = torch.zeros(size, size)
    alpha = torch.ones(size)
    for src, dst in zip(_word_groups(source), _word_groups(edit)):
        if not dst:
            continue
        if not src:
            alpha[list(dst)] = 0.0  # nothing to take the map from: the edit token keeps its own
        elif len(src) == len(dst):
            matrix[list(src), list(dst)] = 1.0
        else:  # prompt-to-prompt's spreading: every source token to every target token, 1/len(target) each
            for n in dst:
                matrix[list(src), n] = 1.0 / len(dst)
    _tail(matrix, source, edit)
    return TokenMap(matrix, alpha, source, edit)


def _lcs_pairs(a: list[int], b: list[int]) -> list[tuple[int, int]]:
    """Index pairs ``(i, j)`` of a longest common subsequence of ``a`` and ``b`` (in order)."""
    n, m = len(a), len(b)
    table = [[0] * (m + 1) for _ in range(n + 1)]
    for i in range(n - 1, -1, -1):
        for j in range(m - 1, -1, -1):
            table[i][j] = table[i + 1][j + 1] + 1 if a[i] == b[j] else max(table[i + 1][j], table[i][j + 1])
    pairs, i, j = [], 0, 0
    while i < n and j < m:
        if a[i] == b[j]:
            pairs.append((i, j))
            i, j = i + 1, j + 1
        elif table[i + 1][j] >= table[i][j + 1]:
            i += 1
        else:
            j += 1
    return pairs


def refine_map(source: PromptTokens, edit: PromptTokens) -> TokenMap:
    """The refinement alignment (words added or removed): matched tokens take the source map, new ones their own."""
    size = _check_pair(source, edit)
    s0, e0 = source.prompt_start, edit.prompt_start  # the prompt's first token (1 after CLIP's start token)
    src_ids = list(source.input_ids[s0 : source.end_position])
    dst_ids = list(edit.input_ids[e0 : edit.end_position])
    matrix = torch.zeros(size, size)
    alpha = torch.ones(size)
    alpha[e0 : edit.end_position] = 0.0
    for i, j in _lcs_pairs(src_ids, dst_ids):
        matrix[i + s0, j + e0] = 1.0
        alpha[j + e0] = 1.0
    _tail(matrix, source, edit)
    return TokenMap(matrix, alpha, source, edit)


def _pairs_by_prompt(items: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """``(item, prompt)`` pairs → ``(edit item, source item)``: the k-th item of prompt p ↔ the k-th of prompt 0."""
    by_prompt: dict[int, list[int]] = {}
    for item, prompt in items:
        by_prompt.setdefault(prompt, []).append(item)
    sources = by_prompt.get(0, [])
    pairs = []
    for prompt, members in sorted(by_prompt.items()):
        if prompt == 0:
            continue
        for k, item in enumerate(members):
            if k < len(sources):
                pairs.append((item, sources[k]))
    return pairs


def edit_rows(layout) -> list[tuple[int, int]]:
    """``(edit row, source row)`` for every conditional batch row of an edited prompt (prompt index ≥ 1).

    The source is prompt 0; with several images per prompt the k-th image of each prompt pairs with the k-th
    image of the source. Unconditional rows are never edited (prompt-to-prompt edits the conditional half only).
    """
    return _pairs_by_prompt([(r, layout.prompt_of_row[r]) for r in layout.cond_rows])


def edit_images(layout) -> list[tuple[int, int]]:
    """``(edit image, source image)`` over the output images (the latents between scheduler steps)."""
    return _pairs_by_prompt([(layout.image_of_row[r], layout.prompt_of_row[r]) for r in layout.cond_rows])

"""Rebuild the tiny T5- and Gemma-format tokenizers shipped as test assets (deterministic, offline, < 100 kB).

    python scripts/make_t5_tokenizer.py          # writes promptcontrol/assets/{t5,gemma}-tiny-tokenizer/

Both are Unigram vocabularies written by hand (no training, so every rebuild is byte-identical): whole words
("▁circle") for the toy world and common English, and single characters ("▁", a-z, digits, punctuation) so any
other word still tokenizes, into several pieces — like a real SentencePiece model, which is what tests of
word ↔ token offsets need. T5 format: no start token, ``</s>`` at the end, ``<pad>`` = 0, right padding
(``T5TokenizerFast``, the class PixArt-Σ loads). Gemma format: BPE over the same pieces (spaces read as "▁"), ``<bos>`` first,
no end token, ``<pad>`` = 0, right padding (``GemmaTokenizerFast``, the class Sana loads).
"""

from __future__ import annotations

import string
from pathlib import Path

ASSETS = Path(__file__).resolve().parents[1] / "promptcontrol" / "assets"
T5_DIR = ASSETS / "t5-tiny-tokenizer"
GEMMA_DIR = ASSETS / "gemma-tiny-tokenizer"
MAX_LENGTH = 300  # PixArt-Σ's and Sana's default max_sequence_length

TOY_WORDS = (
    "red green blue yellow circle square triangle left right top bottom on the at next to and a an of with in"
).split()
COMMON_WORDS = (
    "car cat dog house tree photo picture image painting of by is are was it this that for from as be or "
    "big small large little bright dark black white orange purple pink brown grey gray sky sea sun moon man "
    "woman child city street road forest mountain river flower garden table chair window door book beautiful "
    "old new very over under near behind front background style art drawing realistic high quality detailed"
).split()


def _pieces() -> list[tuple[str, float]]:
    """(piece, log-probability) in id order after the special tokens: words first, then single characters."""
    words = list(dict.fromkeys(TOY_WORDS + COMMON_WORDS))
    chars = list(string.ascii_lowercase + string.ascii_uppercase + string.digits + string.punctuation)
    pieces = [("▁" + w, -5.0) for w in words]
    pieces += [("▁", -8.0)] + [(c, -10.0) for c in chars] + [("▁" + c, -11.0) for c in chars]
    return pieces


def _unigram(specials: list[str], unk: str):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, decoders

    vocab = [(s, 0.0) for s in specials] + _pieces()
    tokenizer = Tokenizer(models.Unigram(vocab, unk_id=specials.index(unk), byte_fallback=False))
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace("  ", " ")])
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    return tokenizer


def build_t5():
    """A ``T5TokenizerFast``: ids 0 ``<pad>``, 1 ``</s>``, 2 ``<unk>``; ``</s>`` appended."""
    from tokenizers import processors
    from transformers import T5TokenizerFast

    tokenizer = _unigram(["<pad>", "</s>", "<unk>"], "<unk>")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    return T5TokenizerFast(
        tokenizer_object=tokenizer, eos_token="</s>", unk_token="<unk>", pad_token="<pad>", extra_ids=0,
        model_max_length=MAX_LENGTH, padding_side="right",
    )


def _bpe_vocab_and_merges(specials: list[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Gemma's BPE form of the same pieces: every character, and merges that grow "▁" + word left to right."""
    chars = ["▁"] + list(string.ascii_lowercase + string.ascii_uppercase + string.digits + string.punctuation)
    vocab = {piece: i for i, piece in enumerate(specials + chars)}
    merges = []
    for word in dict.fromkeys(TOY_WORDS + COMMON_WORDS):
        piece = "▁"
        for char in word:
            if (piece, char) not in merges:
                merges.append((piece, char))
            piece += char
            vocab.setdefault(piece, len(vocab))
    return vocab, merges


def build_gemma():
    """A ``GemmaTokenizerFast`` (BPE, spaces as "▁"): ids 0 ``<pad>``, 1 ``<eos>``, 2 ``<bos>``, 3 ``<unk>``;
    ``<bos>`` prepended, no end token."""
    from transformers import GemmaTokenizerFast

    vocab, merges = _bpe_vocab_and_merges(["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"])
    return GemmaTokenizerFast(
        vocab=vocab, merges=merges, add_bos_token=True, add_eos_token=False, model_max_length=MAX_LENGTH,
        padding_side="right",
    )


def main() -> None:
    for build, folder in ((build_t5, T5_DIR), (build_gemma, GEMMA_DIR)):
        build().save_pretrained(str(folder))
        print(f"wrote {folder} ({sum(p.stat().st_size for p in folder.iterdir())} bytes)")


if __name__ == "__main__":
    main()

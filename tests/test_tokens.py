"""Word ↔ token positions with the real CLIP tokenizer; expected positions worked out by hand from the vocabulary."""

import unicodedata

import pytest

from promptcontrol.testing import clip_tokenizer
from promptcontrol.tokens import tokenize


@pytest.fixture(scope="module")
def tok():
    return clip_tokenizer()


def test_known_ids_and_multi_token_word(tok):
    p = tokenize(tok, "a photorealistic cat")
    assert p.input_ids == (49406, 320, 1153, 16157, 2368, 49407)  # from the tokenizer's README
    assert p.texts == ["a", "photorealistic", "cat"]
    assert p.positions("photorealistic") == [2, 3]
    assert p.positions("cat") == [4]
    assert p.end_position == 5 and p.padding_positions == tuple(range(6, 77))


def test_punctuation_hyphens_case_and_repeats(tok):
    p = tokenize(tok, "A Cat, a blue-green cat!")
    assert p.texts == ["A", "Cat", "a", "blue-green", "cat"]
    # tokens: <s> a cat , a blue - green cat ! </s>
    assert p.positions("cat") == [2, 8]
    assert p.positions("CAT", occurrence=2) == [8]
    assert p.positions("blue-green") == [5, 6, 7]
    assert p.positions("blue-green cat") == [5, 6, 7, 8]
    assert p.positions("a") == [1, 4]


def test_unknown_word_lists_words_and_closest(tok):
    p = tokenize(tok, "a red circle and a blue square")
    with pytest.raises(KeyError, match="its words are: a, red, circle, and, a, blue, square.*'circle'"):
        p.find("circel")
    with pytest.raises(KeyError, match="occurs 2 time"):
        p.find("a", occurrence=3)
    with pytest.raises(KeyError, match="no word"):
        p.find("!!")


def test_truncated_words_are_reported(tok):
    prompt = " ".join(["red"] * 75 + ["zebra", "giraffe"])
    p = tokenize(tok, prompt)
    assert len(p.input_ids) == 77 and p.input_ids[-1] == 49407
    assert [w.text for w in p.truncated] == ["zebra", "giraffe"]
    assert p.positions("zebra") == [] and p.find("red", occurrence=75)[0].tokens == (75,)


def test_decomposed_accents_stay_in_their_word(tok):
    nfc = "a naïve cat"
    nfd = unicodedata.normalize("NFD", nfc)  # "nai" + U+0308 + "ve": looks the same, one character longer
    assert nfd != nfc and len(nfd) == len(nfc) + 1
    for prompt in (nfc, nfd):
        p = tokenize(tok, prompt)
        # tokens: <s> a na ï ve cat </s> — CLIP's tokenizer reads both spellings as NFC
        assert p.input_ids == (49406, 320, 1097, 35689, 563, 2368, 49407)
        assert p.texts == ["a", "naïve", "cat"]
        assert p.positions(nfc[2:7]) == [2, 3, 4]  # the NFC spelling of the query
        assert p.positions(nfd[2:8]) == [2, 3, 4]  # the NFD spelling of the query
        assert p.positions("NAÏVE cat") == [2, 3, 4, 5]


def test_combining_accent_without_a_composed_form_stays_in_its_word(tok):
    p = tokenize(tok, "a q\u0303uiet cat")  # q + combining tilde: NFC has no single character for it
    assert p.texts == ["a", "q\u0303uiet", "cat"]

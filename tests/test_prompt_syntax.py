"""parse_prompt: A1111 emphasis and prompt editing, compel weights; expected results written out by hand."""

from __future__ import annotations

import unicodedata

import pytest

import promptcontrol as pc
from promptcontrol.testing import clip_tokenizer

R, S = 1.1, 1 / 1.1

# (prompt, plain prompt, [(weighted text, weight)]) — by hand, from A1111's and compel's documented rules.
TABLE = [
    ("normal text", "normal text", []),
    ("an (important) word", "an important word", [("important", R)]),
    ("a ((red)) circle [and] a (blue square:1.3)", "a red circle and a blue square", [("red", R * R), ("and", S), ("blue square", 1.3)]),
    ("(unbalanced", "unbalanced", [("unbalanced", R)]),
    ("[unbalanced", "unbalanced", [("unbalanced", S)]),
    ("\\(literal\\]", "(literal]", []),
    ("a \\\\ b", "a \\ b", []),
    ("(unnecessary)(parens)", "unnecessaryparens", [("unnecessaryparens", R)]),
    # A1111's own doctest: nesting multiplies, the :1.3 applies inside two more parens
    (
        "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
        "a house on a hill, sun, sky.",
        [("house", 1.3 * R * R), (" ", R), (" a ", R), ("hill", 0.5 * R), (", sun, ", R), ("sky", R**4), (".", R)],
    ),
    ("stray ) and ] stay", "stray ) and ] stay", []),
    ("a: colon, (x :  0.5 ) and ratio 16:9", "a: colon, x  and ratio 16:9", [("x ", 0.5)]),
    ("(red:0)", "red", [("red", 0.0)]),
    ("(red:-1.5) car", "red car", [("red", -1.5)]),
    ("a [[red]] car", "a red car", [("red", S * S)]),
    ("((red:2) car)", "red car", [("red", 2 * R), (" car", R)]),
    # compel
    ("a red circle and a blue square-", "a red circle and a blue square", [("square", 0.9)]),
    ("a ball++ in the forest--", "a ball in the forest", [("ball", R * R), ("forest", 0.81)]),
    ("(a cat)1.3 playing", "a cat playing", [("a cat", 1.3)]),
    ("(a cat)+ and (a dog)-", "a cat and a dog", [("a cat", 1.1), ("a dog", 0.9)]),
    ("(red+ car)1.5", "red car", [("red", 1.1 * 1.5), (" car", 1.5)]),
    ("a blue-green sci-fi car", "a blue-green sci-fi car", []),
    ("c\\+\\+ code", "c++ code", []),
    # compel's + / - weight its whole word: everything back to a space or a syntax character ()[]",.+-=
    ("big-cat+ in grass", "big-cat in grass", [("big-cat", R)]),
    ("a sky-blue+ sky", "a sky-blue sky", [("sky-blue", R)]),
    ("don't+ stop", "don't stop", [("don't", R)]),
    ("score_9+ art", "score_9 art", [("score_9", R)]),
    ("a 🐱+ cat", "a 🐱 cat", [("🐱", R)]),
    ("\\(a\\)+ b", "(a) b", [("(a)", R)]),
    ("l'été-- ok", "l'été ok", [("l'été", 0.81)]),
    ("x -cat+", "x -cat", [("-cat", R)]),  # compel: a sign that a letter follows is part of the word
    ("a,cat+ dog", "a,cat dog", [("cat", R)]),
    ("cat+- x", "cat- x", [("cat", R)]),
    ("cat++x 5- -5", "cat++x 5 -5", [("5", 0.9)]),  # a sign that a letter follows is inner text
    ("a cat+ (b)-", "a cat b", [("cat", R), ("b", 0.9)]),
    ("(cat+:1.5) 16:9+", "cat 16:9", [("cat", R * 1.5), ("9", R)]),  # A1111's ":" ends a compel word
    # mixed
    ("a (red:2.0) circle and a blue square-", "a red circle and a blue square", [("red", 2.0), ("square", 0.9)]),
    # BREAK is removed (one space)
    ("a cat BREAK a dog", "a cat a dog", []),
]


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-9 * max(1.0, abs(b))


@pytest.mark.parametrize("text, plain, weighted", TABLE, ids=[t[0] for t in TABLE])
def test_table(text, plain, weighted):
    parsed = pc.parse_prompt(text)
    assert parsed.prompt == plain
    got = [(s.text, s.weight) for s in parsed.spans]
    assert [t for t, _ in got] == [t for t, _ in weighted], got
    assert all(_close(g, w) for (_, g), (_, w) in zip(got, weighted)), got
    for span in parsed.spans:  # spans index the plain prompt
        assert parsed.prompt[span.start : span.end] == span.text


ROUND_TRIP_EXTRA = [
    "a (red) red car", "x (y:2)z w", "well-(lit)- room", "(a:0.00001)", "(a:12345678901234567890)", "a - b",
    'say \\"hi\\"2 \\(ok\\)3', "a cat\\.swap\\(dog\\)", "(x:1e-300) y--",
]


@pytest.mark.parametrize("text", [t[0] for t in TABLE] + ROUND_TRIP_EXTRA)
def test_round_trip(text):
    parsed = pc.parse_prompt(text)
    again = pc.parse_prompt(parsed.to_syntax())
    assert again.prompt == parsed.prompt
    assert again.spans == parsed.spans


def test_to_syntax_writes_plain_decimals():
    # A1111 (and this parser) read [+-]?[.\d]+ after the colon: no exponents
    assert pc.parse_prompt("(a:0.00001) b").to_syntax() == "(a:0.00001) b"
    assert pc.parse_prompt("(a:12345678901234567890)").to_syntax() == "(a:12345678901234567000)"
    tiny = pc.parse_prompt("(a:1e-300)".replace("1e-300", "0." + "0" * 299 + "1"))
    assert tiny.spans[0].weight == 1e-300 and "e" not in tiny.to_syntax().replace("a", "")
    assert pc.parse_prompt(tiny.to_syntax()).spans == tiny.spans


def test_compel_word_weight_covers_every_token_of_the_word():
    tokenizer = clip_tokenizer()
    # <start> a big - cat on grass <end>: big-cat is one word of three tokens (as in tokens.py)
    parsed = pc.parse_prompt("a big-cat+ on grass")
    assert [(w.text, w.weight) for w in parsed.words] == [("big-cat", R)]
    assert parsed.token_weights(tokenizer) == {2: R, 3: R, 4: R}
    # <start> score _ 9 art <end>; <start> a 🐱 cat <end>
    assert pc.parse_prompt("score_9+ art").token_weights(tokenizer) == {1: R, 2: R, 3: R}
    assert pc.parse_prompt("a 🐱+ cat").token_weights(tokenizer) == {2: R}


@pytest.mark.parametrize(
    "text, match",
    [
        ("a cat.swap(dog)", r"\.swap\(\).*pc\.edit.*\[from:to:when\]"),
        ("(a cat, a dog).blend(0.5, 0.5)", r"\.blend\(\)"),
        ("(a cat).and()", r"\.and\(\)"),
        ("cat.add(dog)", r"\.add\(\)"),
        ("(a cat).attend(1.3)", r"\.attend\(\).*\(text\)1\.3"),
        ('"a red car"1.3', r"quoted weight.*write \(a red car\)1\.3"),
        ('"a red car"++', r"quoted weight.*write \(a red car\)\+\+"),
        ("withLora(style, 0.5) a cat", r"withLora\(\).*load_lora_weights"),
    ],
)
def test_unsupported_compel_operators_raise(text, match):
    with pytest.raises(ValueError, match=match) as error:
        pc.parse_prompt(text)
    assert "compel=False" in str(error.value)


def test_compel_operators_as_plain_text():
    assert pc.parse_prompt("a cat.swap(dog)", compel=False).prompt == "a cat.swapdog"  # A1111 reads (dog) ×1.1
    assert pc.parse_prompt("a cat\\.swap\\(dog\\)").prompt == "a cat.swap(dog)"  # escaped: literal text
    assert pc.parse_prompt('a sign saying "open" now').prompt == 'a sign saying "open" now'  # quotes stay text


def test_nfd_accents_stay_in_their_word():
    nfc = "a (naïve:1.2) cat"
    nfd = unicodedata.normalize("NFD", nfc)
    assert nfd != nfc
    parsed = pc.parse_prompt(nfd)
    assert parsed.source == nfd and parsed.prompt == "a naïve cat"
    assert [(w.text, w.weight) for w in parsed.words] == [("naïve", 1.2)]
    assert parsed.spans == pc.parse_prompt(nfc).spans
    # <start> a na ï ve cat <end> (CLIP normalises to NFC itself): all three tokens of the word weighted
    assert parsed.token_weights(clip_tokenizer()) == {2: 1.2, 3: 1.2, 4: 1.2}


def test_repeated_words_keep_their_own_weight():
    parsed = pc.parse_prompt("a (red) red car")
    assert parsed.prompt == "a red red car"
    assert [(w.text, w.start, w.end, w.weight) for w in parsed.words] == [("red", 2, 5, R)]
    # token positions: <start> a red red car <end>  ->  only the first "red" (position 2)
    assert parsed.token_weights(clip_tokenizer()) == {2: R}
    assert pc.parse_prompt("a red (red:1.5) car").token_weights(clip_tokenizer()) == {3: 1.5}


def test_token_weights_multi_token_word():
    # "photorealistic" is two tokens (photo + realistic): both carry the weight
    parsed = pc.parse_prompt("a (photorealistic:1.4) cat")
    assert parsed.token_weights(clip_tokenizer()) == {2: 1.4, 3: 1.4}


def test_break_position():
    parsed = pc.parse_prompt("a cat BREAK a (dog:1.2)")
    assert parsed.prompt == "a cat a dog"
    assert parsed.breaks == (5,)
    assert [(s.text, s.weight) for s in parsed.spans] == [("dog", 1.2)]


def test_compel_off_keeps_signs():
    parsed = pc.parse_prompt("a blue square- (cat)1.3", compel=False)
    assert parsed.prompt == "a blue square- cat1.3"
    assert [(s.text, s.weight) for s in parsed.spans] == [("cat", pytest.approx(R))]


def test_truncated_weighted_word_warns():
    prompt = " ".join(["cat"] * 80) + " (dragon:1.5)"
    with pytest.warns(UserWarning, match="dragon"):
        weights = pc.parse_prompt(prompt).token_weights(clip_tokenizer())
    assert weights == {}


def test_not_a_string():
    with pytest.raises(TypeError, match="string"):
        pc.parse_prompt(["a", "b"])


def test_huge_weight_is_rejected():
    with pytest.raises(ValueError, match="finite"):
        pc.parse_prompt("(red:" + "9" * 400 + ")")


# ---- prompt editing ----------------------------------------------------------------------------------------------
def _plain(parsed, total):
    return [p.prompt for p in parsed.schedule(total)]


def test_edit_fraction():
    parsed = pc.parse_prompt("a [cat:dog:0.5] on a mat")
    assert parsed.is_scheduled
    assert parsed.prompt == "a cat on a mat"
    # A1111: when < 1 is a fraction: int(0.5 * 10) = 5 -> steps 0..4 use "cat"
    assert _plain(parsed, 10) == ["a cat on a mat"] * 5 + ["a dog on a mat"] * 5
    assert _plain(parsed, 5) == ["a cat on a mat"] * 2 + ["a dog on a mat"] * 3  # int(2.5) = 2


def test_edit_step_number_add_remove():
    assert _plain(pc.parse_prompt("[cat:dog:3]"), 5) == ["cat"] * 3 + ["dog"] * 2
    assert _plain(pc.parse_prompt("[cat:dog:1.0]"), 4) == ["cat"] + ["dog"] * 3  # 1.0 is a step number
    assert _plain(pc.parse_prompt("a [red:2] car"), 4) == ["a  car"] * 2 + ["a red car"] * 2
    assert _plain(pc.parse_prompt("a [red::2] car"), 4) == ["a red car"] * 2 + ["a  car"] * 2
    assert _plain(pc.parse_prompt("[cat:dog:0]"), 3) == ["dog"] * 3
    assert _plain(pc.parse_prompt("[cat:dog:99]"), 3) == ["cat"] * 3


def test_switch_that_rounds_to_step_zero_is_in_the_first_step():
    # A1111: int(0.05 * 10) = 0, so "dog" from the first step on
    parsed = pc.parse_prompt("a [cat:dog:0.05] in grass", steps=10)
    assert parsed.prompt == "a dog in grass"
    assert _plain(parsed, 10) == ["a dog in grass"] * 10
    assert [p.prompt for p in parsed.schedule()] == ["a dog in grass"] * 10
    # 100 steps: int(0.05 * 100) = 5 -> "cat" on steps 0..4
    long = pc.parse_prompt("a [cat:dog:0.05] in grass", steps=100)
    assert long.prompt == "a cat in grass" and _plain(long, 100)[4:6] == ["a cat in grass", "a dog in grass"]
    # the first step's weights too
    weighted = pc.parse_prompt("a [(cat:1.5):(dog:0.5):0.05]", steps=10)
    assert weighted.prompt == "a dog" and [(s.text, s.weight) for s in weighted.spans] == [("dog", 0.5)]
    # without steps, .prompt is the first step of a long run
    assert pc.parse_prompt("a [cat:dog:0.05] in grass").prompt == "a cat in grass"


def test_steps_mismatch_and_bad_steps():
    parsed = pc.parse_prompt("a [cat:dog:0.5]", steps=10)
    with pytest.raises(ValueError, match=r"parsed for steps=10.*steps=20"):
        parsed.schedule(20)
    with pytest.raises(ValueError, match="number of steps"):
        pc.parse_prompt("a [cat:dog:2]").schedule()
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match=">= 1"):
            pc.parse_prompt("a [cat:dog:2]", steps=bad)


def test_edit_signed_and_exponent_numbers():
    # A1111's grammar takes lark's SIGNED_NUMBER: signs and exponents (use_old_scheduling rule after that)
    assert _plain(pc.parse_prompt("[a:b:-1]"), 3) == ["b"] * 3  # -1 * 3 steps -> below step 0
    assert _plain(pc.parse_prompt("[a:b:3e0]"), 5) == ["a"] * 3 + ["b"] * 2  # 3.0 is step 3
    assert _plain(pc.parse_prompt("[a:b:+2]"), 4) == ["a"] * 2 + ["b"] * 2
    assert _plain(pc.parse_prompt("[a:b:5e-1]"), 4) == ["a"] * 2 + ["b"] * 2  # 0.5 of 4 steps
    assert _plain(pc.parse_prompt("[a:b:2.]"), 4) == ["a"] * 2 + ["b"] * 2
    assert _plain(pc.parse_prompt("[a:b:1e999]"), 3) == ["a"] * 3  # inf: never switches
    assert _plain(pc.parse_prompt("[a:b:-1e999]"), 3) == ["b"] * 3
    assert pc.parse_prompt("[a:b:-1]").prompt == "b"
    assert not pc.parse_prompt("[a:b:--1]").is_scheduled  # not a number: text (÷1.1)


def test_edit_with_weights_and_nesting():
    parsed = pc.parse_prompt("a [(red:1.5):[blue:green:3]:2] car")
    steps = parsed.schedule(4)
    assert [p.prompt for p in steps] == ["a red car", "a red car", "a blue car", "a green car"]
    assert [(s.text, s.weight) for s in steps[0].spans] == [("red", 1.5)]
    assert steps[3].spans == ()


def test_alternation():
    assert _plain(pc.parse_prompt("a [cat|dog|bird]"), 4) == ["a cat", "a dog", "a bird", "a cat"]


def test_brackets_that_are_not_edits():
    parsed = pc.parse_prompt("a [cat:dog] and [x:y:z] [mouse")
    assert not parsed.is_scheduled
    assert parsed.prompt == "a cat:dog and x:y:z mouse"
    assert [(s.text, round(s.weight, 6)) for s in parsed.spans] == [
        ("cat:dog", round(S, 6)),
        ("x:y:z", round(S, 6)),
        ("mouse", round(S, 6)),
    ]


def test_escaped_brackets_are_not_edits():
    parsed = pc.parse_prompt("a \\[cat:dog:2\\]")
    assert not parsed.is_scheduled
    assert parsed.prompt == "a [cat:dog:2]"

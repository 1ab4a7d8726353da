"""parse_prompt: A1111 emphasis and prompt editing, compel weights; expected results written out by hand."""

from __future__ import annotations

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


@pytest.mark.parametrize("text", [t[0] for t in TABLE] + ["a (red) red car", "x (y:2)z w", "well-(lit)- room"])
def test_round_trip(text):
    parsed = pc.parse_prompt(text)
    again = pc.parse_prompt(parsed.to_syntax())
    assert again.prompt == parsed.prompt
    assert again.spans == parsed.spans


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

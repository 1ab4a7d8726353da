"""The toy world: deterministic, masks equal the drawn pixels, captions name the right objects."""
from __future__ import annotations

import math

import numpy as np
import pytest

from promptcontrol.toy import world
from promptcontrol.toy.evaluate import caption_accuracy, classify_shape, Generation, prototype, segment, side_of

SAMPLES = world.dataset(300, seed=5)


def test_same_seed_same_sample_and_other_seed_differs():
    a, b, c = world.sample(11), world.sample(11), world.sample(12)
    assert a.caption == b.caption and a.scene == b.scene
    assert np.array_equal(a.image, b.image)
    assert all(np.array_equal(x, y) for x, y in zip(a.masks, b.masks))
    assert a.scene != c.scene


def test_dataset_prefix_is_stable():
    assert [s.caption.text for s in world.dataset(5, seed=3)] == [s.caption.text for s in world.dataset(9, seed=3)[:5]]


@pytest.mark.parametrize("s", SAMPLES[:100], ids=lambda s: s.caption.text)
def test_masks_are_exactly_the_drawn_pixels(s):
    union = np.zeros(s.image.shape[:2], bool)
    for obj, mask in zip(s.scene.objects, s.masks):
        assert mask.sum() >= 40
        assert (s.image[mask] == world.COLOURS[obj.colour]).all()
        assert not (union & mask).any(), "objects overlap"
        union |= mask
    assert (s.image[~union] == world.BACKGROUND).all()


def test_shape_areas_match_geometry():
    h = 6.0
    square = world.object_mask(world.Obj("square", "red", 16, 16, h))
    assert square.sum() == 12 * 12  # pixel centres 10.5 … 21.5
    circle = world.object_mask(world.Obj("circle", "red", 16, 16, h))
    assert abs(circle.sum() - math.pi * h * h) < 0.08 * math.pi * h * h
    tri = world.object_mask(world.Obj("triangle", "red", 16, 16, h))
    assert abs(tri.sum() - 2 * h * h) < 0.15 * 2 * h * h
    ys, xs = np.nonzero(tri)
    assert ys.min() < 16 - h + 2 and (xs[ys == ys.max()].size > xs[ys == ys.min()].size)  # apex up


def test_captions_name_each_object():
    for s in SAMPLES:
        words = s.caption.words
        assert len(s.caption.objects) == len(s.scene.objects)
        for obj, ow in zip(s.scene.objects, s.caption.objects):
            assert words[ow.adjective] == obj.colour
            assert words[ow.noun] == obj.shape
            assert ow.adjective + 1 == ow.noun
            if ow.position is None:
                assert s.scene.layout != "named"
            else:
                assert words[ow.position] == obj.position
        if s.scene.layout != "named":
            assert not set(words) & set(world.POSITIONS)


def test_named_positions_are_where_they_say():
    n = 0
    for s in SAMPLES:
        for obj in s.scene.objects:
            if obj.position is not None:
                assert side_of(obj.cx, obj.cy, s.scene.size) == obj.position
                n += 1
    assert n > 100


def test_grammar_varies_word_order_and_connectives():
    texts = [s.caption.text for s in SAMPLES]
    assert any(t.startswith(("on the", "at the")) for t in texts)  # position before the noun
    assert any(t.endswith(tuple(world.POSITIONS)) for t in texts)  # position after the noun
    assert any(" next to " in t for t in texts) and any(" and " in t for t in texts)
    assert any(len(s.scene.objects) == 1 for s in SAMPLES) and any(len(s.scene.objects) == 2 for s in SAMPLES)
    assert not any(w.endswith("s") and w != "is" for t in texts for w in t.split() if w not in ("bottom",))


def test_two_objects_have_distinct_colours():
    assert all(len({o.colour for o in s.scene.objects}) == len(s.scene.objects) for s in SAMPLES)


def test_bad_input_is_refused_with_the_fix():
    with pytest.raises(ValueError, match="unknown shape 'star'"):
        world.Obj("star", "red", 5, 5, 3)
    with pytest.raises(ValueError, match="unknown colour"):
        world.Obj("circle", "pink", 5, 5, 3)
    red = world.Obj("circle", "red", 8, 8, 3)
    with pytest.raises(ValueError, match="different colours"):
        world.Scene((red, world.Obj("square", "red", 24, 24, 3)))
    with pytest.raises(ValueError, match="layout"):
        world.random_scene(np.random.default_rng(0), n_objects=1, layout="next_to")


# ----------------------------------------------------------------------- the evaluator on ground truth


def test_evaluator_scores_ground_truth_images_perfectly():
    gens = [Generation(s, 0, s.image, segment(s.image)) for s in SAMPLES]
    acc = caption_accuracy(gens)
    assert acc.colour == acc.shape == acc.position == acc.all_correct == 1.0
    assert acc.extra == 0.0


def test_evaluator_scores_a_blank_image_zero():
    blank = np.zeros_like(SAMPLES[0].image)
    acc = caption_accuracy([Generation(s, 0, blank, segment(blank)) for s in SAMPLES[:20]])
    assert acc.colour == acc.shape == acc.all_correct == 0.0


def test_evaluator_notices_a_wrong_shape_and_side():
    s = world.sample(0, n_objects=1, layout="named")
    obj = s.scene.objects[0]
    other = next(sh for sh in world.SHAPES if sh != obj.shape)
    flipped = world.Obj(other, obj.colour, world.SIZE - obj.cx, world.SIZE - obj.cy, obj.half, None)
    img, _ = world.render(world.Scene((flipped,)))
    acc = caption_accuracy([Generation(s, 0, img, segment(img))])
    assert (acc.colour, acc.shape, acc.position) == (1.0, 0.0, 0.0)


@pytest.mark.parametrize("shape", world.SHAPES)
def test_shape_classifier_knows_its_prototypes(shape):
    for h, w in ((10, 10), (13, 11), (14, 14)):
        assert classify_shape(prototype(shape, h, w))[0] == shape

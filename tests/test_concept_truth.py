"""Issue 18 item 3's scorer (``promptcontrol.toy.concept_truth``): raw vs concept maps against the world's masks.

The scoring on hand-made 4×4 arrays against IoUs computed by hand; the rows; the refusal of a UNet pipeline (with
nothing left installed); and the glue on the tiny SD3 pipeline against an independent reading of the same trace
(``evaluate.score_maps`` for the raw row, a numpy min-max of the unnormalised concept maps for the concept row)."""
from __future__ import annotations

import math
import os
from dataclasses import replace

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest

from promptcontrol.toy import evaluate, world
from promptcontrol.toy import concept_truth as ct
from promptcontrol.toy.segment import Segment

CONCEPTS = ("circle", "square", "triangle", "background")


def _mask(cells, size=4) -> np.ndarray:
    m = np.zeros((size, size), bool)
    for y, x in cells:
        m[y, x] = True
    return m


def _segment(colour, cells) -> Segment:
    return Segment(colour, _mask(cells), "square", 1.0, 0.0, 0.0)


def _sample(text: str, shapes: tuple[str, str]) -> world.Sample:
    """A two-object 4×4 sample whose caption is ``"a C1 S1 and a C2 S2"`` (colours red, blue)."""
    objs = (world.Obj(shapes[0], "red", 1.0, 1.0, 1.0), world.Obj(shapes[1], "blue", 3.0, 3.0, 1.0))
    caption = world.Caption(text, (world.ObjectWords(1, 2), world.ObjectWords(5, 6)))
    return world.Sample(world.Scene(objs, "free", 4), caption, np.zeros((4, 4, 3), np.uint8))


def _maps(raw, concept, labels) -> ct.ImageMaps:
    return ct.ImageMaps(tuple(raw), dict(concept), np.asarray(labels), CONCEPTS)


RED = [(0, 0), (0, 1), (1, 0), (1, 1)]  # object 0's segment: the top-left 2×2
BLUE = [(2, 2), (2, 3), (3, 2), (3, 3)]  # object 1's: the bottom-right 2×2


# ---- pure scoring ------------------------------------------------------------------------------------------------
def test_background_mask_is_every_pixel_in_no_segment():
    segs = {"red": _segment("red", RED), "green": _segment("green", [(3, 0)])}  # green: a colour not in a caption
    got = ct.background_mask(segs, (4, 4))
    assert got.sum() == 16 - 5
    assert not got[0, 0] and not got[3, 0] and got[3, 3] and got[0, 3]
    assert ct.background_mask({}, (4, 4)).all()
    with pytest.raises(ValueError, match="shape"):
        ct.background_mask(segs, (8, 8))


def test_unique_nouns_score_raw_concept_and_argmax_regions_against_their_segment():
    sample = _sample("a red circle and a blue square", ("circle", "square"))
    segs = {"red": _segment("red", RED), "blue": _segment("blue", BLUE)}
    raw0 = _mask([(0, 0), (0, 1)]) * 0.5  # region (>= 0.4): 2 of the 4 red cells -> IoU 2/4
    raw1 = _mask(BLUE + [(0, 3), (1, 3)]) * 0.9 + 0.3 * ~_mask(BLUE + [(0, 3), (1, 3)])  # 4 in, 2 out -> 4/6
    circle = _mask(RED + [(2, 0)]).astype(float)  # 4 in, 1 out -> 4/5
    square = _mask([(3, 3)]) * 0.39  # below τ everywhere -> empty region -> 0
    background = _mask([(0, 2), (0, 3), (1, 2), (1, 3)]) * 1.0  # 4 of the 8 background cells -> 4/8
    labels = np.full((4, 4), 3)  # background everywhere but:
    labels[0, 0] = 0  # circle: 1 of 4 red cells -> 1/4
    labels[2:, 2:] = 1  # square: exactly the blue segment -> 1
    labels[1, 1] = 2  # triangle (not in the caption) takes a red cell
    maps = _maps([raw0, raw1], {"circle": circle, "square": square, "triangle": 0 * circle,
                                "background": background}, labels)
    scores = ct.score_image(sample, segs, maps)
    assert scores.repeated == ()
    assert np.array(scores.unique) == pytest.approx(np.array([(2 / 4, 4 / 5, 1 / 4), (4 / 6, 0.0, 1.0)]))
    # background: 8 cells; argmax labels background on 16 - 1 - 4 - 1 = 10 cells, all 8 background ones -> 8/10
    assert scores.background == pytest.approx((4 / 8, 8 / 10))


def test_a_missing_segment_scores_zero_and_its_pixels_stay_background():
    sample = _sample("a red circle and a blue square", ("circle", "square"))
    segs = {"red": _segment("red", RED)}  # the blue square was not drawn
    one = np.ones((4, 4))
    maps = _maps([one, one], {c: one for c in CONCEPTS}, np.zeros((4, 4), int))
    scores = ct.score_image(sample, segs, maps)
    assert scores.unique[1] == (0.0, 0.0, 0.0)
    assert scores.unique[0] == pytest.approx((4 / 16, 4 / 16, 4 / 16))
    assert scores.background == pytest.approx((12 / 16, 0.0))  # argmax says circle everywhere


def test_a_repeated_noun_is_scored_against_the_union_of_its_objects_only_in_its_own_rows():
    sample = _sample("a red square and a blue square", ("square", "square"))
    segs = {"red": _segment("red", RED), "blue": _segment("blue", BLUE)}
    raw0, raw1 = _mask(RED).astype(float), _mask([(2, 2)]).astype(float)  # union region: 5 of the 8 union cells
    square = _mask(RED + BLUE + [(0, 3)]).astype(float)  # 8 in, 1 out -> 8/9
    labels = np.full((4, 4), 3)
    labels[:2, :2] = 1  # square on the red object only -> 4/8
    maps = _maps([raw0, raw1], {"square": square, "circle": 0 * square, "triangle": 0 * square,
                                "background": 1 - square}, labels)
    scores = ct.score_image(sample, segs, maps)
    assert scores.unique == ()
    assert np.array(scores.repeated) == pytest.approx(np.array([(5 / 8, 8 / 9, 4 / 8)]))
    truth = ct.collect([scores], concepts=CONCEPTS, raw_sites="r", concept_sites="c")
    assert truth.repeated_captions == 1 and truth.unique_raw == () and truth.repeated_concept == pytest.approx((8 / 9,))


def test_a_noun_that_is_no_traced_concept_is_refused_by_name():
    sample = _sample("a red circle and a blue square", ("circle", "square"))
    one = np.ones((4, 4))
    maps = ct.ImageMaps((one, one), {"circle": one, "background": one}, np.zeros((4, 4), int),
                        ("circle", "background"))
    with pytest.raises(ValueError, match="'square'.*not a traced concept"):
        ct.score_image(sample, {}, maps)


# ---- the result and its rows -------------------------------------------------------------------------------------
def _truth() -> ct.ConceptTruth:
    images = [ct.ImageScores(((0.2, 0.6, 0.5), (0.4, 0.3, 0.1)), (), (0.7, 0.9)),
              ct.ImageScores(((0.0, 0.5, 0.4),), ((0.1, 0.8, 0.6),), (0.5, 0.3))]
    return ct.collect(images, concepts=CONCEPTS, raw_sites="transformer@0", concept_sites="blocks 2-4")


def test_collect_keeps_each_column_and_counts_the_repeated_captions():
    t = _truth()
    assert t.unique_raw == (0.2, 0.4, 0.0) and t.unique_concept == (0.6, 0.3, 0.5)
    assert t.unique_argmax == (0.5, 0.1, 0.4)
    assert (t.repeated_raw, t.repeated_concept, t.repeated_argmax) == ((0.1,), (0.8,), (0.6,))
    assert (t.background_concept, t.background_argmax) == ((0.7, 0.5), (0.9, 0.3))
    assert (t.n_images, t.repeated_captions) == (2, 1)


def test_concept_rows_hold_the_means_the_paired_margin_and_the_targets():
    rows = {m: (v, target, over) for m, v, target, over in ct.concept_rows(_truth())}
    assert rows["noun mIoU, raw attention"][0] == pytest.approx(0.2)
    assert rows["noun mIoU, concept map"][0] == pytest.approx(1.4 / 3)
    value, target, over = rows["noun mIoU, concept - raw (paired)"]
    assert value == pytest.approx((0.4 - 0.1 + 0.5) / 3) and target == "concept > raw"
    assert "wins 2/3" in over
    assert rows["noun mIoU, concept argmax"][0] == pytest.approx(1.0 / 3)
    assert rows["repeated noun IoU, concept map"][0] == pytest.approx(0.8)
    assert rows["background mIoU, concept map (not in prompt)"][0] == pytest.approx(0.6)
    assert rows["background mIoU, concept argmax"][0] == pytest.approx(0.6)
    assert all(t in ("reported", "concept > raw") for _, t, _ in rows.values())
    assert "3 objects, 1 captions (1 with a repeated noun out)" in rows["noun mIoU, raw attention"][2]
    assert "blocks 2-4" in rows["noun mIoU, raw attention"][2]


def test_empty_rows_are_nan_not_an_error():
    t = ct.collect([ct.ImageScores((), (), (1.0, 1.0))], concepts=CONCEPTS, raw_sites="r", concept_sites="c")
    rows = {m: v for m, v, *_ in ct.concept_rows(t)}
    assert math.isnan(rows["noun mIoU, raw attention"]) and math.isnan(rows["noun mIoU, concept - raw (paired)"])


# ---- pipelines ---------------------------------------------------------------------------------------------------
def test_a_unet_pipeline_is_refused_with_the_concept_controllers_reason_and_nothing_installed(tiny_pipes):
    pipe = tiny_pipes("sd15")
    before = {k: type(v) for k, v in pipe.unet.attn_processors.items()}
    with pytest.raises(ValueError, match=r"concept maps need joint attention.*tr\.heatmaps\(\)"):
        ct.concept_truth(pipe, evaluate.eval_samples(1, 6161), seed=0, steps=1)
    assert {k: type(v) for k, v in pipe.unet.attn_processors.items()} == before


def test_concepts_must_cover_every_caption_noun_and_the_background():
    samples = [s for s in evaluate.eval_samples(8, 6161) if "triangle" in s.caption.words][:1]
    with pytest.raises(ValueError, match=r"missing: \['triangle'\]"):
        ct.concept_truth(None, samples, seed=0, concepts=("circle", "square", "background"))
    with pytest.raises(ValueError, match="missing: \\['background'\\]"):
        ct.concept_truth(None, samples, seed=0, concepts=("circle", "square", "triangle"))


def _unrepeated(n: int) -> list[world.Sample]:
    return [s for s in evaluate.eval_samples(12, 6161) if len(ct.noun_groups(s)) == len(s.caption.objects)][:n]


def _quadrant_segments(g: evaluate.Generation) -> evaluate.Generation:
    """``g`` with hand-made segments: object 0 the top-left quadrant, object 1 the bottom-right one."""
    h, w = g.image.shape[:2]
    segs = {}
    for i, o in enumerate(g.sample.scene.objects):
        m = np.zeros((h, w), bool)
        m[i * h // 2:(i + 1) * h // 2, i * w // 2:(i + 1) * w // 2] = True
        segs[o.colour] = Segment(o.colour, m, o.shape, 1.0, 0.0, 0.0)
    return replace(g, segments=segs)


def test_scores_from_a_tiny_sd3_trace_match_an_independent_reading_of_it():
    from promptcontrol.testing_sd3 import tiny_sd3

    pipe = tiny_sd3()
    before = {k: type(v) for k, v in pipe.transformer.attn_processors.items()}
    repeated = next(s for s in evaluate.eval_samples(16, 6161) if len(ct.noun_groups(s)) == 1 < len(s.caption.objects))
    gens, tr = ct.concept_generations(pipe, _unrepeated(2) + [repeated], seed=5, steps=2)
    assert {k: type(v) for k, v in pipe.transformer.attn_processors.items()} == before
    gens = [_quadrant_segments(g) for g in gens]
    late = {"blocks": [1, 2]}
    truth = ct.score_trace(gens, tr, concept_sites=late)

    unique = gens[:2]
    reference = evaluate.score_maps(unique, [evaluate.MAP_RULE.heatmaps(tr, k) for k in range(2)])
    assert np.mean(truth.unique_raw) == pytest.approx(reference.noun_miou, abs=1e-12)
    assert len(truth.unique_raw) == reference.n_objects == sum(len(g.sample.caption.objects) for g in unique)
    noun = repeated.caption.words[repeated.caption.objects[0].noun]
    hm = tr.heatmaps(2, sites=evaluate._best_sites, weighting="level")  # MAP_RULE, spelt out
    both = (hm.word(noun, occurrence=1).numpy() >= 0.4) | (hm.word(noun, occurrence=2).numpy() >= 0.4)
    union = np.logical_or.reduce([s.mask for s in gens[2].segments.values()])
    assert truth.repeated_raw == pytest.approx((evaluate.iou(both, union),), abs=1e-12)
    assert truth.repeated_captions == 1
    concept, argmax, ground = [], [], []
    for k, g in enumerate(unique):
        raw = tr.concept_maps(k, sites=late).raw().numpy()  # (C, H, W), unnormalised softmax maps
        names = list(tr.concepts.concepts)
        lo, hi = raw.min(axis=(1, 2), keepdims=True), raw.max(axis=(1, 2), keepdims=True)
        normalised = (raw - lo) / (hi - lo)
        labels = raw.argmax(0)
        for o, ow in zip(g.sample.scene.objects, g.sample.caption.objects):
            j, truth_mask = names.index(g.sample.caption.words[ow.noun]), g.segments[o.colour].mask
            concept.append(evaluate.iou(normalised[j] >= evaluate.HEAT_THRESHOLD, truth_mask))
            argmax.append(evaluate.iou(labels == j, truth_mask))
        outside = ~np.logical_or.reduce([s.mask for s in g.segments.values()])
        ground.append(evaluate.iou(normalised[names.index("background")] >= evaluate.HEAT_THRESHOLD, outside))
    assert truth.unique_concept == pytest.approx(concept, abs=1e-12)
    assert truth.unique_argmax == pytest.approx(argmax, abs=1e-12)
    assert truth.background_concept[:2] == pytest.approx(ground, abs=1e-12)
    assert truth.concept_sites == str(late)
    every = ct.score_trace(gens, tr)  # every recorded joint block: other maps than the later blocks alone
    assert every.unique_concept != truth.unique_concept and every.unique_raw == truth.unique_raw

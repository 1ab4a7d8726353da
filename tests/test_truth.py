"""Truth, measured: does the embedded model draw what its caption says? (model-only bars, issue 6)

Each bar must hold for the shipped model with margin and fail for a random-weight model of the same shape;
both are tested. Numbers measured at the time of writing are in ``docs/embedded-model.md``.
The heat-map / edit / weight bars (``pc.trace``, ``pc.edit``, ``pc.generate`` weights) are below the caption bars,
with controls that must fail them: the same model's maps given to the wrong words, and (by construction) an edit
that does nothing. Seeds: captions ``eval_samples(48, 1234)`` (caption i from seed 1234 + i; the map captions are
the first 16), swaps ``eval_samples(8, 99)`` (seed 99 + j), weights ``eval_samples(8, 77)`` (seed 77 + j), the
position test seeds 0..7; the map shuffle uses ``np.random.default_rng([0, caption])``.
"""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch

from promptcontrol.loading import EMBEDDED, load_pipeline
from promptcontrol.toy.evaluate import PromptSets, evaluate
from promptcontrol.toy.model import build_pipeline

SETS = PromptSets()  # 48 captions (seed 1234), 16 map captions, 8 swaps (seed 99), 8 weighted captions (seed 77)
STEPS = 20
GUIDANCE = 7.5  # the pipeline's default: the model must work as a user calls it

# Bars (issue 6's targets were colour 0.95, shape 0.90, position 0.80). Measured (48 captions, guidance 7.5): the
# shipped model (v3, step 4,774) colour 1.00, shape 1.00, position 1.00; a random-weight model of its shape 0.05 /
# 0.01 / 0.00 (see docs/embedded-model.md; the v2 model scored 1.00 / 0.99 / 1.00, the first, ε-prediction model
# 1.00 / 0.96 / 0.38).
BARS = {"colour": 0.95, "shape": 0.95, "position": 0.95}

pytestmark = pytest.mark.skipif(not (EMBEDDED / "model_index.json").is_file(),
                                reason="embedded weights not built (python -m promptcontrol.toy.train)")


def _accuracy(pipe):
    return evaluate(pipe, sets=SETS, parts=("captions",), steps=STEPS, guidance_scale=GUIDANCE).caption


@pytest.fixture(scope="module")
def shipped_pipe():
    return load_pipeline(device="cpu")


@pytest.fixture(scope="module")
def random_pipe():
    return build_pipeline(seed=0)


@pytest.fixture(scope="module")
def shipped(shipped_pipe):
    return _accuracy(shipped_pipe)


@pytest.fixture(scope="module")
def random_model(random_pipe):
    return _accuracy(random_pipe)


def test_prompt_set_is_a_few_dozen_with_named_positions(shipped):
    assert shipped.n_images == SETS.captions and shipped.n_objects > SETS.captions and shipped.n_positions >= 30


@pytest.mark.parametrize("metric", sorted(BARS))
def test_shipped_model_draws_its_captions(shipped, metric):
    assert getattr(shipped, metric) >= BARS[metric], shipped


@pytest.mark.parametrize("metric", sorted(BARS))
def test_random_model_of_the_same_shape_fails_the_bars(random_model, metric):
    assert getattr(random_model, metric) < BARS[metric], random_model


def _sides(pipe, seeds=range(8)):
    """Share of images whose red circle sits on the side its caption names: four captions that differ only in
    the position word, the same seeds for each (so the word, not the noise, must move the object)."""
    from promptcontrol.toy.evaluate import segment, side_of

    hits = []
    for side, phrase in (("left", "on the left"), ("right", "on the right"), ("top", "at the top"),
                         ("bottom", "at the bottom")):
        out = pipe([f"a red circle {phrase}"] * len(seeds), num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                   generator=[torch.Generator().manual_seed(s) for s in seeds], output_type="np")
        for image in (np.clip(out.images, 0, 1) * 255).round().astype(np.uint8):
            red = segment(image).get("red")
            hits.append(red is not None and side_of(red.cx, red.cy, image.shape[0]) == side)
    return float(np.mean(hits))


def test_position_words_move_the_object_from_the_same_noise(shipped_pipe, random_pipe):
    """The first embedded model drew "on the left" and "on the right" in the same place from the same seed."""
    shipped, random_model = _sides(shipped_pipe), _sides(random_pipe)
    assert shipped >= 0.9 > 0.25 > random_model, (shipped, random_model)


# --------------------------------------------------------------------------- heat maps, edits, weights
# Smaller prompt sets (CPU time, see PromptSets); each is seeded and the same for both models.

# Measured (shipped v3 / random): noun mIoU 0.623 / 0.000, adjective mIoU 0.650 / 0.000 (16 captions, 27 objects;
# evaluate.MAP_RULE: every site but the mid block's, "resolution" weighting, τ = 0.4); own-object preference
# 1.00 / 0.00 (44 words of two-object captions). Issue 16's targets (0.60 / 0.50 / 0.95) are met on these sets and
# on fresh ones (docs/embedded-model.md); the bars sit below them with margin. (v2: 0.47 / 0.33 / 0.93.)
MAP_BARS = {"noun_miou": 0.45, "adjective_miou": 0.45, "own_object": 0.90}
# Measured (shipped v3 / random, 8 swaps): swapped-object IoU with pc.edit(0.8, 0.4) 0.86 / 0.00; plain prompt
# change 0.81 / 0.00; both recolour 8 of 8 swaps. EDIT_BARS are sanity bars only (the edit still draws the new
# colour in place): the plain change passes them too, so they are no evidence of control. The evidence is paired:
# per swap, the controlled edit's IoU minus the plain change's from the same seed — measured (seeds 99..106)
# +0.082, +0.034, +0.184, +0.082, -0.169, +0.172, +0.033, 0.000: mean +0.052, better on 6 of 8 (v2: +0.062, 7 of
# 8). An edit that does nothing (cross_steps=0, self_steps=0 is the plain change) has every difference exactly 0
# and fails PAIRED_BARS; on v2 so did pc.edit with Replace disabled (self injection alone: mean -0.005, better on
# 2 of 8) and with Replace on the first 15–30 % of steps only (+0.003 to +0.011, better on 3–4 of 8).
EDIT_BARS = {"controlled": 0.70, "recoloured_controlled": 0.75}
PAIRED_BARS = {"mean_margin": 0.03, "swaps_better": 5}
# Measured (shipped v3 / random, 8 captions, object 0's colour weighted 0.5 / 1 / 2): mean colour share of the
# foreground — embedding mode (A1111) 0.75 → 0.74 → 0.87 / 0.37 → 0.37 → 0.37, rising monotonically (no step down
# by > 0.02, rise >= 0.05) on 0.50 / 0.00 of the captions. The attention mode (pc.generate's default, the P2P
# equalizer) is measured in docs/embedded-model.md and not asserted: on this model it does not rise.
RISE_BAR = 0.08
MONO_BAR = 0.375


def _truths(pipe):
    report = evaluate(pipe, sets=SETS, parts=("maps", "edits", "weights"), steps=STEPS, guidance_scale=GUIDANCE)
    return {"maps": report.heatmaps, "edits": report.edits,
            "weights": next(w for w in report.weights if w.mode == "embedding")}


@pytest.fixture(scope="module")
def shipped_truths(shipped_pipe):
    return _truths(shipped_pipe)


@pytest.fixture(scope="module")
def random_truths(random_pipe):
    return _truths(random_pipe)


@pytest.mark.parametrize("metric", sorted(MAP_BARS))
def test_shipped_heatmaps_find_the_named_objects(shipped_truths, metric):
    assert getattr(shipped_truths["maps"], metric) >= MAP_BARS[metric], shipped_truths["maps"]


@pytest.mark.parametrize("metric", sorted(MAP_BARS))
def test_random_model_heatmaps_fail_the_bars(random_truths, metric):
    assert not getattr(random_truths["maps"], metric) >= MAP_BARS[metric], random_truths["maps"]


# ---- controls that tell good maps from bad ones: the shipped model's own maps, given to the wrong words ----
# Measured on v3 (16 captions, seed 1234; noun / adjective mIoU, own-object; true maps 0.62 / 0.65 / 1.00): the
# words' maps shuffled within each caption 0.25 / 0.16 / 0.43; each object's maps taken from the next caption
# 0.16 / 0.16 / 0.39 (v2: 0.15 / 0.13 / 0.64 and 0.11 / 0.11 / 0.39). Every one is below every MAP_BAR.
SHUFFLE_SEED = 0


@pytest.fixture(scope="module")
def traced_maps(shipped_pipe):
    """The map captions (``eval_samples(16, 1234)``, caption i from seed 1234 + i) generated under ``pc.trace``
    as ``heatmap_truth`` does, with every word's map of each caption: ``[(generation, [map per word])]``."""
    from promptcontrol.toy.evaluate import MAP_RULE, _occurrence, eval_samples, generate
    from promptcontrol.tracing import trace

    samples = eval_samples(SETS.maps, SETS.seed)
    with trace(shipped_pipe) as tr:
        gens = generate(shipped_pipe, samples, seed=SETS.seed, steps=STEPS, guidance_scale=GUIDANCE)
    out = []
    for k, g in enumerate(gens):
        hm, words = MAP_RULE.heatmaps(tr, k), g.sample.caption.words
        out.append((g, [hm.word(w, occurrence=_occurrence(words, i)).numpy() for i, w in enumerate(words)]))
    return out


def _map_truth(traced, map_of) -> dict[str, float]:
    """``heatmap_truth``'s three numbers with ``map_of(k, i, role)`` (caption k, object i, ``"noun"`` or
    ``"adjective"``) as the map of each object word: IoU of the map ≥ τ with the object's segment, and whether
    the map is higher on its own object than on the other one (two-object captions)."""
    from promptcontrol.toy.evaluate import HEAT_THRESHOLD, iou

    scores = {"noun": [], "adjective": [], "own": []}
    for k, (g, _) in enumerate(traced):
        segs = [g.segment_of(i) for i in range(len(g.sample.caption.objects))]
        for i, seg in enumerate(segs):
            for role in ("noun", "adjective"):
                m = map_of(k, i, role)  # (H, W) in [0, 1]
                scores[role].append(0.0 if seg is None else iou(m >= HEAT_THRESHOLD, seg.mask))
                if len(segs) == 2:
                    other = segs[1 - i]
                    scores["own"].append(seg is not None and other is not None
                                         and bool(m[seg.mask].mean() > m[other.mask].mean()))
    return {"noun_miou": float(np.mean(scores["noun"])), "adjective_miou": float(np.mean(scores["adjective"])),
            "own_object": float(np.mean(scores["own"]))}


def _own_maps(traced):
    def map_of(k, i, role):
        g, maps = traced[k]
        return maps[getattr(g.sample.caption.objects[i], role)]
    return map_of


def _derangement(n: int, rng: np.random.Generator) -> np.ndarray:
    """A permutation of range(n) that moves every index (n ≥ 2)."""
    while True:
        perm = rng.permutation(n)
        if not np.any(perm == np.arange(n)):
            return perm


def _shuffled_maps(traced):
    """Each word gets the map of another word of its own caption (a derangement, seeds [SHUFFLE_SEED, k])."""
    perms = [_derangement(len(maps), np.random.default_rng([SHUFFLE_SEED, k])) for k, (_, maps) in enumerate(traced)]

    def map_of(k, i, role):
        g, maps = traced[k]
        return maps[perms[k][getattr(g.sample.caption.objects[i], role)]]
    return map_of


def _next_caption_maps(traced):
    """Each object word gets the same word's map of the next caption's object (its last one if it has fewer)."""
    def map_of(k, i, role):
        g, maps = traced[(k + 1) % len(traced)]
        objects = g.sample.caption.objects
        return maps[getattr(objects[min(i, len(objects) - 1)], role)]
    return map_of


CONTROLS = {"words' maps shuffled within each caption": _shuffled_maps, "maps of the next caption": _next_caption_maps}


def test_map_controls_are_scored_by_heatmap_truths_measure(traced_maps, shipped_truths):
    """The scorer the controls use gives ``heatmap_truth``'s numbers on the true maps (same seeds, same images)."""
    ours, theirs = _map_truth(traced_maps, _own_maps(traced_maps)), shipped_truths["maps"]
    for metric in MAP_BARS:
        assert ours[metric] == pytest.approx(getattr(theirs, metric), abs=1e-9), (metric, ours, theirs)


@pytest.mark.parametrize("metric", sorted(MAP_BARS))
@pytest.mark.parametrize("control", sorted(CONTROLS))
def test_shipped_maps_given_to_the_wrong_words_fail_the_bars(traced_maps, control, metric):
    """The bars tell the model's maps from the same model's maps on the wrong words (16 captions, seed 1234)."""
    score = _map_truth(traced_maps, CONTROLS[control](traced_maps))
    assert score[metric] < MAP_BARS[metric], (control, score)


@pytest.mark.parametrize("metric", sorted(EDIT_BARS))
def test_shipped_colour_swap_keeps_the_object(shipped_truths, metric):
    """Sanity only: the plain prompt change passes these bars too (see PAIRED_BARS for the evidence)."""
    assert getattr(shipped_truths["edits"], metric) >= EDIT_BARS[metric], shipped_truths["edits"]


@pytest.fixture(scope="module")
def paired_swaps(shipped_pipe):
    """Per swap (``eval_samples(8, 99)``, swap j from seed 99 + j, as ``edit_truth``): the swapped object's IoU
    with ``pc.edit(0.8, 0.4)`` and with the plain prompt change (0, 0), as ``[(controlled, plain)]``."""
    from promptcontrol.editing import edit
    from promptcontrol.toy.evaluate import eval_samples, iou, segment, swap_prompts

    def swapped_object_iou(src, dst, c0, c1, seed, cross, self_):
        res = edit(shipped_pipe, src, dst, cross_steps=cross, self_steps=self_, seed=seed,
                   num_inference_steps=STEPS, output_type="np")
        a, b = (segment((np.clip(np.asarray(im), 0, 1) * 255).round().astype(np.uint8)) for im in res.images)
        return 0.0 if a.get(c0) is None or b.get(c1) is None else iou(a[c0].mask, b[c1].mask)

    swaps = swap_prompts(eval_samples(SETS.swaps, SETS.swap_seed))
    return [tuple(swapped_object_iou(*swap, SETS.swap_seed + j, cross, self_) for cross, self_ in ((0.8, 0.4), (0, 0)))
            for j, swap in enumerate(swaps)]


def test_paired_swaps_are_edit_truths_measure(paired_swaps, shipped_truths):
    edits = shipped_truths["edits"]
    assert np.mean([c for c, _ in paired_swaps]) == pytest.approx(edits.controlled, abs=1e-9), (paired_swaps, edits)
    assert np.mean([p for _, p in paired_swaps]) == pytest.approx(edits.plain, abs=1e-9), (paired_swaps, edits)


def test_shipped_colour_swap_keeps_the_object_better_than_a_plain_prompt_change(paired_swaps):
    """Paired over the 8 swaps (seeds 99..106): the controlled edit keeps the swapped object's mask better than
    the plain prompt change from the same seed by a mean margin, on most swaps. An edit that does nothing gives
    every difference 0 and fails both bars."""
    margins = [c - p for c, p in paired_swaps]
    better = sum(m > 0 for m in margins)
    assert np.mean(margins) >= PAIRED_BARS["mean_margin"], margins
    assert better >= PAIRED_BARS["swaps_better"], margins


@pytest.mark.parametrize("metric", sorted(EDIT_BARS))
def test_random_model_colour_swap_fails_the_bar(random_truths, metric):
    assert not getattr(random_truths["edits"], metric) >= EDIT_BARS[metric], random_truths["edits"]


def test_shipped_colour_weight_raises_the_colour(shipped_truths):
    w = shipped_truths["weights"]
    assert w.rise >= RISE_BAR and w.monotonic >= MONO_BAR, w


def test_random_model_colour_weight_fails_the_bars(random_truths):
    w = random_truths["weights"]
    assert w.rise < RISE_BAR, w
    assert w.monotonic < MONO_BAR, w

"""Issue 16's rows of ``promptcontrol evaluate``: the new metric functions on hand-made arrays, the table of a
report built by hand, ``--only blend`` and ``--maps-by-level`` (on the tiny test pipeline). No full evaluation."""
from __future__ import annotations

import json
import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest

from promptcontrol import cli as cli_module
from promptcontrol.toy import evaluate, world
from promptcontrol.toy.blend_truth import (BlendScores, BlendTruth, blend_mask_iou, blend_swap, object_mask,
                                           psnr_outside, upsample_mask)


# ---- metrics on synthetic arrays ---------------------------------------------------------------------------------
def test_psnr_outside_a_mask_counts_only_the_pixels_outside():
    a = np.zeros((4, 4, 3), np.uint8)
    b = np.full((4, 4, 3), 51, np.uint8)  # 0.2 off everywhere outside ...
    mask = np.zeros((4, 4), bool)
    mask[:2, :2] = True
    b[mask] = 255  # ... and 1.0 off inside, which must not count
    # outside: 12 pixels × 3 channels, each (0.2)² → mse 0.04 → 10·log10(1 / 0.04) = 13.979 dB
    assert psnr_outside(a, b, mask) == pytest.approx(10 * math.log10(25), abs=1e-9)
    assert psnr_outside(a, b, np.zeros((4, 4), bool)) < 13.0  # the inside pixels count once unmasked
    assert psnr_outside(a, a.copy(), mask) == math.inf
    assert math.isnan(psnr_outside(a, b, np.ones((4, 4), bool)))  # nothing outside to compare


def test_psnr_outside_reads_float_images_in_unit_range_and_refuses_mismatched_masks():
    a = np.zeros((2, 2, 3), np.float32)
    b = np.full((2, 2, 3), 0.1, np.float32)
    assert psnr_outside(a, b, np.zeros((2, 2), bool)) == pytest.approx(20.0, abs=1e-6)  # mse 0.01
    with pytest.raises(ValueError, match="mask shape"):
        psnr_outside(a, b, np.zeros((4, 4), bool))


def test_blend_mask_iou_upsamples_the_latent_mask_by_nearest():
    latent = np.array([[True, False], [False, False]])  # top-left latent pixel → the top-left 2×2 image pixels
    assert upsample_mask(latent, (4, 4)).sum() == 4 and upsample_mask(latent, (4, 4))[:2, :2].all()
    obj = np.zeros((4, 4), bool)
    obj[:3, :3] = True  # 9 pixels; the blend mask's 4 lie inside: IoU 4 / 9
    assert blend_mask_iou(latent, obj) == pytest.approx(4 / 9)
    obj2 = np.zeros((4, 4), bool)
    obj2[2:, 2:] = True  # disjoint: IoU 0
    assert blend_mask_iou(latent, obj2) == 0.0
    with pytest.raises(ValueError, match="multiple"):
        upsample_mask(latent, (5, 4))


def test_object_mask_is_the_union_of_the_object_before_and_after():
    before_scene = world.Scene((world.Obj("square", "red", 8.0, 8.0, 5.0),
                                world.Obj("circle", "blue", 24.0, 24.0, 5.0)))
    after_scene = world.Scene((world.Obj("square", "green", 10.0, 9.0, 5.0),
                               world.Obj("circle", "blue", 24.0, 24.0, 5.0)))
    (before, (red, blue)), (after, (green, _)) = world.render(before_scene), world.render(after_scene)
    mask = object_mask(before, after, "red", "green")
    assert np.array_equal(mask, red | green)  # the moved square both places, the kept circle not at all
    assert not (mask & blue).any()


def test_blend_swap_changes_object_zero_to_an_unused_colour_and_names_its_phrase():
    sample = world.dataset(1, 2024, n_objects=2)[0]
    swap = blend_swap(sample)
    old = sample.scene.objects[0].colour
    noun = sample.caption.words[sample.caption.objects[0].noun]
    assert swap.old == old and swap.new not in {o.colour for o in sample.scene.objects}
    assert swap.source_phrase == f"{old} {noun}" and swap.edited_phrase == f"{swap.new} {noun}"
    assert swap.edited == swap.source.replace(old, swap.new) and swap.edited_phrase in swap.edited


def test_paired_margin_gives_mean_sample_spread_and_wins():
    m = evaluate.paired_margin([0.9, 0.8, 0.7], [0.8, 0.85, 0.5])
    # differences 0.1, -0.05, 0.2: mean 0.083333; deviations 0.016667, -0.133333, 0.116667,
    # squares sum 0.031667 / (3 - 1) = 0.015833 → sd 0.125831; a wins 2 of 3
    assert m.mean == pytest.approx(0.25 / 3)
    assert m.sd == pytest.approx(0.1258306, abs=1e-6)
    assert (m.won, m.n) == (2, 3)
    one = evaluate.paired_margin([0.5], [0.5])
    assert one.mean == 0.0 and math.isnan(one.sd) and one.won == 0  # a tie is no win; one item has no spread
    with pytest.raises(ValueError, match="equal-length"):
        evaluate.paired_margin([1.0, 2.0], [1.0])


# ---- the table of a report built by hand -------------------------------------------------------------------------
def _hand_report() -> evaluate.TruthReport:
    edits = evaluate.EditTruth(0.86, 0.80, 1.0, 1.0, 0.85, 0.80, 3,
                               object_pairs=((0.9, 0.8), (0.8, 0.85), (0.7, 0.5)),
                               layout_pairs=((0.9, 0.8), (0.8, 0.85), (0.7, 0.5)))
    weights = [evaluate.WeightTruth((0.5, 1.0, 2.0), (0.6, 0.7, 0.8), 0.875, 8, mode) for mode in evaluate.WEIGHT_MODES]
    blend = BlendTruth(BlendScores((31.0, 35.0), (0.5, 0.7), "generated scenes", (True, False)),
                       BlendScores((28.0,), (0.25,), "inverted scenes", (True,)), (29.5,))
    return evaluate.TruthReport(
        caption=evaluate.CaptionAccuracy(1.0, 0.99, 0.98, 0.97, 0.02, 48, 76, 53),
        heatmaps=evaluate.HeatmapTruth(0.61, 0.52, 0.96, 27, 44), edits=edits, weights=weights, blend=blend)


ISSUE_16_ROWS = {  # metric → target (issue 16's "Goal")
    "noun map mIoU": ">= 0.60", "adjective map mIoU": ">= 0.50", "map prefers own object": ">= 0.95",
    "colour accuracy": ">= 0.97", "shape accuracy": ">= 0.97", "position accuracy": ">= 0.97",
    "colour-swap layout IoU, pc.edit 0.8/0.4": ">= 0.85", "colour-swap layout IoU, plain change": "< pc.edit",
    "layout IoU margin over plain (mean)": "> 0", "layout IoU margin over plain (sd)": "stated",
    "rising monotonically, attention": ">= 7/8", "rising monotonically, embedding": ">= 7/8",
    "blend PSNR outside object, generated (mean)": ">= 30 dB", "blend PSNR outside object, generated (min)": ">= 30 dB",
    "blend PSNR outside object, inverted (mean)": ">= 30 dB", "blend PSNR outside object, inverted (min)": ">= 30 dB",
    "blend mask IoU with object, generated": "reported", "blend mask IoU with object, inverted": "reported",
    "blend recoloured the object, generated": "all", "blend recoloured the object, inverted": "all",
}


def test_the_table_shows_every_row_of_issue_16_with_its_target():
    report = _hand_report()
    rows = {m: (v, t, n) for m, v, t, n in report.rows()}
    for metric, target in ISSUE_16_ROWS.items():
        assert metric in rows, metric
        assert rows[metric][1] == target, (metric, rows[metric])
    table = report.table()
    for metric in ISSUE_16_ROWS:
        assert metric in table
    # the numbers are the report's: layout margin from the per-swap pairs, blend summaries from the per-swap values
    assert rows["layout IoU margin over plain (mean)"][0] == pytest.approx(0.25 / 3)
    assert rows["layout IoU margin over plain (sd)"][0] == pytest.approx(0.1258306, abs=1e-6)
    assert "2 of 3 swaps won" in rows["layout IoU margin over plain (mean)"][2]
    assert rows["colour-swap layout IoU, pc.edit 0.8/0.4"][0] == 0.85
    assert rows["blend PSNR outside object, generated (mean)"][0] == pytest.approx(33.0)
    assert rows["blend PSNR outside object, generated (min)"][0] == pytest.approx(31.0)
    assert rows["blend mask IoU with object, generated"][0] == pytest.approx(0.6)
    assert rows["blend PSNR outside object, inverted (min)"][0] == pytest.approx(28.0)
    assert rows["blend recoloured the object, generated"][0] == pytest.approx(0.5)  # an edit that kept everything
    assert "generated scenes" in rows["blend PSNR outside object, generated (mean)"][2]  # the scenes are named
    # the older meaning stays: swapped-object IoU rows are still there
    assert rows["swap IoU, pc.edit 0.8/0.4"][0] == 0.86 and rows["swap IoU, plain prompt change"][0] == 0.80


# ---- the command line --------------------------------------------------------------------------------------------
@pytest.fixture
def captured_evaluate(monkeypatch):
    """``evaluate.evaluate`` replaced by a recorder returning the hand-made report; the random model not built."""
    calls = []

    def fake(pipe, **kwargs):
        calls.append(kwargs)
        return _hand_report()

    class Pipe:
        def to(self, device):
            return self

    monkeypatch.setattr(evaluate, "evaluate", fake)
    monkeypatch.setattr("promptcontrol.toy.model.build_pipeline", lambda: Pipe())
    return calls


@pytest.mark.parametrize("only, parts", [(["--only", "blend"], ("blend",)), ([], evaluate.PARTS)])
def test_only_blend_is_parsed_and_random_measures_every_part(captured_evaluate, capsys, only, parts):
    code = cli_module.main(["evaluate", "--random", *only, "--quiet"])
    assert code == 0
    assert captured_evaluate[0]["parts"] == parts and "blend" in parts
    printed = capsys.readouterr().out
    for metric in ISSUE_16_ROWS:  # --random prints every row of the report it gets
        assert metric in printed


def test_maps_by_level_without_the_maps_part_and_bad_map_sites_are_refused(captured_evaluate, capsys):
    assert cli_module.main(["evaluate", "--random", "--only", "blend", "--maps-by-level", "--quiet"]) == 2
    assert "add maps to --only" in capsys.readouterr().err
    assert cli_module.main(["evaluate", "--random", "--map-sites", "down0", "--quiet"]) == 2
    assert "PLACE:LEVEL" in capsys.readouterr().err
    assert captured_evaluate == []  # refused before measuring


def test_map_sites_are_passed_by_place_and_level(captured_evaluate):
    assert cli_module.main(["evaluate", "--random", "--only", "maps", "--map-sites", "up:0", "mid:1", "--quiet"]) == 0
    rule = captured_evaluate[0]["map_rule"]
    assert rule.sites == evaluate.PlaceLevels((("up", 0), ("mid", 1))) and str(rule.sites) == "up@0+mid@1"
    assert rule.weighting == evaluate.MAP_RULE.weighting  # the part not given stays the default rule's
    assert captured_evaluate[0]["by_level"] is False


def test_map_weighting_all_sites_blend_rule_and_seed_offset_reach_the_measurement(captured_evaluate):
    argv = ["evaluate", "--random", "--map-sites", "all", "--map-weighting", "layer", "--blend-threshold", "0.45",
            "--blend-levels", "0", "1", "--seed-offset", "7000", "--quiet"]
    assert cli_module.main(argv) == 0
    call = captured_evaluate[0]
    assert call["map_rule"] == evaluate.MapRule(None, "layer")
    assert call["blend_rule"] == evaluate.BlendRule(0.45, (0, 1)) and str(call["blend_rule"]) == "0.45@0+1"
    sets, default = call["sets"], evaluate.PromptSets()
    assert (sets.seed, sets.swap_seed, sets.weight_seed, sets.blend_seed, sets.invert_seed) == (
        default.seed + 7000, default.swap_seed + 7000, default.weight_seed + 7000, default.blend_seed + 7000,
        default.invert_seed + 7000)


def test_only_the_blend_threshold_keeps_the_default_levels_and_bad_rules_are_refused(captured_evaluate, capsys):
    assert cli_module.main(["evaluate", "--random", "--only", "blend", "--blend-threshold", "0.6", "--quiet"]) == 0
    assert captured_evaluate[0]["blend_rule"] == evaluate.BlendRule(0.6, evaluate.BLEND_RULE.levels)
    assert cli_module.main(["evaluate", "--random", "--blend-threshold", "1.5", "--quiet"]) == 2
    assert "share of the map's maximum" in capsys.readouterr().err
    assert cli_module.main(["evaluate", "--random", "--blend-levels", "x", "--quiet"]) == 2
    assert "levels" in capsys.readouterr().err
    assert len(captured_evaluate) == 1  # the refused ones measured nothing


def test_the_blend_rule_makes_the_local_blend_it_names():
    from promptcontrol.controllers.blend import LocalBlend

    blend = evaluate.BlendRule(0.5, (0, 1)).controller([["red circle"], ["green circle"]])
    assert isinstance(blend, LocalBlend) and blend.threshold == 0.5 and blend.levels == (0, 1)
    default = evaluate.BlendRule().controller([["red circle"], ["green circle"]])
    assert default.threshold == 0.3 and default.levels is None  # prompt-to-prompt's mask, LocalBlend's defaults


def test_the_default_map_sites_are_the_old_blocks_on_the_embedded_shape():
    """``down_blocks.0`` + ``up_blocks.0`` (what the map numbers always used), now said by place and level."""
    from promptcontrol.sites import find_sites
    from promptcontrol.toy.model import build_pipeline

    sites = [s for s in find_sites(build_pipeline().unet) if s.kind == "cross"]
    chosen = {s.module_path.split(".attentions")[0] for s in sites if evaluate._best_sites(s)}
    assert chosen == {"down_blocks.0", "up_blocks.0"}


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    from promptcontrol.testing import tiny_pipeline

    folder = tmp_path_factory.mktemp("tiny") / "sd15"
    tiny_pipeline("sd15").save_pretrained(folder)
    return folder


def test_maps_by_level_runs_on_the_tiny_pipeline(tiny_folder, tmp_path, capsys):
    """One row pair per recorded (place, level); each is the map measurement with that (place, level) alone."""
    from promptcontrol.loading import load_pipeline
    from promptcontrol.sites import find_sites

    out = tmp_path / "eval"
    code = cli_module.main(["evaluate", "--model", str(tiny_folder), "--only", "maps", "--maps-by-level", "--quick",
                            "--steps", "2", "--quiet", "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0
    pipe = load_pipeline(str(tiny_folder), device="cpu")
    place_levels = sorted({(s.place, s.level) for s in find_sites(pipe.unet) if s.kind == "cross"})
    assert len(place_levels) >= 3
    for place, level in place_levels:
        assert f"noun map mIoU, {place}@{level} alone" in printed
        assert f"adjective map mIoU, {place}@{level} alone" in printed
    levels = json.loads((out / "report.json").read_text())["measurements"]["maps_by_level"]
    assert sorted((m["place"], m["level"]) for m in levels) == place_levels
    place, level = "up", 0
    alone = next(m for m in levels if (m["place"], m["level"]) == (place, level))["truth"]
    direct = evaluate.heatmap_truth(pipe, evaluate.eval_samples(evaluate.QUICK.maps, 1234), seed=1234, steps=2,
                                    rule=evaluate.MapRule(evaluate.PlaceLevels(((place, level),))))
    assert alone["noun_miou"] == pytest.approx(direct.noun_miou, abs=1e-9)
    assert alone["adjective_miou"] == pytest.approx(direct.adjective_miou, abs=1e-9)


def test_random_toy_sd3_is_the_sd3_shape_and_random_alone_is_the_unet_one(monkeypatch, tmp_path):
    """``--random toy-sd3`` measures a random SD3-architecture pipeline; bare ``--random`` the UNet toy shape."""
    from diffusers import StableDiffusion3Pipeline, StableDiffusionPipeline

    seen = []

    def fake(pipe, **kwargs):
        seen.append(pipe)
        return _hand_report()

    monkeypatch.setattr(evaluate, "evaluate", fake)
    assert cli_module.main(["evaluate", "--random", "toy-sd3", "--quiet", "--out", str(tmp_path / "a")]) == 0
    assert cli_module.main(["evaluate", "--random", "--quiet", "--out", str(tmp_path / "b")]) == 0
    assert isinstance(seen[0], StableDiffusion3Pipeline) and not hasattr(seen[0], "unet")
    assert isinstance(seen[1], StableDiffusionPipeline)
    assert json.loads((tmp_path / "a" / "report.json").read_text())["model"] == "random toy-sd3"
    assert json.loads((tmp_path / "b" / "report.json").read_text())["model"] == "random"


def test_only_concepts_prints_the_concept_rows_on_toy_sd3_and_is_refused_on_a_unet(tiny_folder, capsys):
    """``--only concepts``: ConceptAttention maps vs raw attention on an SD3 model (toy-sd3, 1 step, 8 captions);
    a UNet model is refused with the reason before anything is measured."""
    from promptcontrol.loading import EMBEDDED_MODELS

    assert cli_module.main(["evaluate", "--model", str(tiny_folder), "--only", "concepts", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "joint attention" in err and "--model toy-sd3" in err
    if not (EMBEDDED_MODELS["toy-sd3"][0] / "model_index.json").is_file():
        pytest.skip("toy-sd3 not shipped")
    assert cli_module.main(["evaluate", "--model", "toy-sd3", "--only", "concepts", "captions", "--quick",
                            "--steps", "1", "--quiet"]) == 0
    printed = capsys.readouterr().out
    for metric in ("noun mIoU, raw attention", "noun mIoU, concept map", "noun mIoU, concept - raw (paired)",
                   "background mIoU, concept map (not in prompt)", "colour accuracy"):
        assert metric in printed, metric


def test_blend_truth_on_a_flow_model_measures_the_generated_swaps_and_says_why_not_the_inverted(monkeypatch):
    """SD3 has no ``pc.invert``: the generated swaps are measured, the inverted rows are nan and name the reason."""
    from promptcontrol.testing_sd3 import tiny_sd3
    from promptcontrol.toy import blend_truth as bt

    calls = []
    monkeypatch.setattr(bt, "generated_blends", lambda pipe, n, seed, **kw: calls.append((n, seed)) or
                        BlendScores((31.0,), (0.5,), "generated scenes"))
    monkeypatch.setattr(bt, "inverted_blends", lambda *a, **kw: pytest.fail("inverted a flow model"))
    truth = bt.blend_truth(tiny_sd3(), n_generated=1, n_inverted=2, blend_seed=5, invert_seed=6)
    rows = {m: (v, n) for m, v, _, n in bt.blend_rows(truth)}
    assert calls == [(1, 5)] and rows["blend PSNR outside object, generated (mean)"][0] == 31.0
    assert math.isnan(rows["blend PSNR outside object, inverted (mean)"][0])
    assert "needs a UNet model" in rows["blend PSNR outside object, inverted (mean)"][1]


def test_a_blend_edit_that_changes_nothing_keeps_everything_outside_but_is_not_recoloured():
    """The PSNR row alone would reward an edit that does nothing (inf dB): the recoloured flag tells it apart."""
    from promptcontrol.toy import blend_truth as bt

    sample = world.dataset(1, 2024, n_objects=2)[0]
    swap = bt.blend_swap(sample)
    image = np.asarray(sample.image)

    class Result:
        controllers = [bt.BlendRule().controller([[swap.source_phrase], [swap.edited_phrase]])]

    psnr, _, recoloured = bt._score(image, image, image, Result(), swap)
    assert psnr == math.inf and recoloured is False
    from dataclasses import replace

    scene = world.Scene((replace(sample.scene.objects[0], colour=swap.new), *sample.scene.objects[1:]))
    edited, _ = world.render(scene)
    assert bt._score(image, edited, image, Result(), swap)[2] is True

"""HeatMaps: the aggregation rule, words ↔ tokens, normalisation, upsampling to any size, pictures and export,
checked against references computed here from the store's per-site maps."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import promptcontrol as pc
from promptcontrol.heatmap import aggregate, level_weights
from promptcontrol.sites import AttentionSite

PROMPT = "a red circle and a blue-green, photorealistic square circle!"


@pytest.fixture(scope="module")
def traced(tiny_pipes):
    pipe = tiny_pipes("sd15")
    with pc.trace(pipe, per_step=True) as tr:
        out = pipe([PROMPT, "a dog"], num_inference_steps=3, height=32, width=48, output_type="pil",
                   generator=torch.Generator().manual_seed(0))
    return tr, out.images


def fake_site(level, i=0):
    return AttentionSite(f"s{level}.{i}", "cross", "up", 0, i, 0, level, 2)


def upsampled(maps, size, mode):
    """Σ over tokens of each token map (n, h, w) upsampled to ``size`` (bicubic: each clamped at 0)."""
    out = F.interpolate(maps[None], size=size, mode=mode, align_corners=False)[0]
    return (out.clamp_min(0) if mode == "bicubic" else out).sum(dim=0)


def reference_map(tr, image, positions, size, weights_rule="level", sites=None, mode="bicubic"):
    """Σ_levels w_l · upsample(mean over the level's sites of the token maps), summed over the positions, written
    out here; by default every site but the mid block's."""
    store = tr.store
    by_level = {}
    for site in store.recorded_sites(image):
        if (sites is not None and site.key not in sites) or (sites is None and site.place == "mid"):
            continue
        m = store.site_map(image, site)[list(positions)]  # (n, h, w)
        by_level.setdefault(site.level, []).append(m)
    if weights_rule == "level":
        w = {lv: 1 / len(by_level) for lv in by_level}
    else:  # every layer the same
        n = sum(len(v) for v in by_level.values())
        w = {lv: len(v) / n for lv, v in by_level.items()}
    out = torch.zeros(size)
    for lv, maps in by_level.items():
        out += w[lv] * upsampled(torch.stack(maps).mean(dim=0), size, mode)
    return out


def test_level_weighting_rules():
    groups = {0: [torch.zeros(3, 16, 16)] * 2, 1: [torch.zeros(3, 8, 8)] * 6}
    assert level_weights(groups, "level") == {0: 0.5, 1: 0.5}
    assert level_weights(groups, "layer") == {0: 0.25, 1: 0.75}
    assert level_weights(groups, "resolution") == pytest.approx({0: 256 / 320, 1: 64 / 320})
    assert level_weights(groups, {0: 3.0, 1: 1.0}) == {0: 0.75, 1: 0.25}
    with pytest.raises(ValueError, match="weighting"):
        level_weights(groups, "mean")
    # many low-resolution layers do not outvote one high-resolution layer under the default rule
    site_maps = [(fake_site(0), torch.ones(2, 4, 4))] + [(fake_site(1, i), torch.zeros(2, 2, 2)) for i in range(5)]
    (w0, m0), (w1, m1) = aggregate(site_maps)
    assert (w0, w1) == (0.5, 0.5) and m0.shape == (2, 4, 4) and float(m1.abs().max()) == 0.0


def test_word_map_equals_reference_from_site_maps(traced):
    tr, _ = traced
    maps = tr.heatmaps(0, normalize=None)
    assert maps.size == (32, 48)
    pos = maps.tokens.positions("photorealistic")
    assert len(pos) == 2  # photo + realistic: a multi-token word is the union of its pieces
    ref = reference_map(tr, 0, pos, (32, 48))
    torch.testing.assert_close(maps["photorealistic"].tensor, ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(
        maps["photorealistic"].tensor, maps.token(pos[0]).tensor + maps.token(pos[1]).tensor, atol=1e-6, rtol=1e-5
    )
    layer = tr.heatmaps(0, normalize=None, weighting="layer")
    torch.testing.assert_close(layer["red"].tensor, reference_map(tr, 0, maps.tokens.positions("red"), (32, 48), "layer"))


def test_all_tokens_sum_to_one_everywhere(traced):
    tr, _ = traced
    maps = tr.heatmaps(0, normalize=None, interpolation="bilinear")
    total = maps.raw(range(maps.num_tokens))  # bilinear interpolation keeps each pixel a convex mix
    torch.testing.assert_close(total, torch.ones(32, 48), atol=1e-5, rtol=0)
    bicubic = tr.heatmaps(0, normalize=None)  # the default: sharper, every token map clamped at 0
    assert float(bicubic.raw(range(bicubic.num_tokens)).min()) > 0.5


def test_default_sites_leave_out_the_mid_block(traced, sd15):
    tr, _ = traced
    recorded = tr.store.recorded_sites(0)
    mid = [s.key for s in recorded if s.place == "mid"]
    assert mid, "the tiny UNet has a mid-block cross-attention site"
    maps = tr.heatmaps(0, normalize=None)
    assert [s.key for s in maps.sites] == [s.key for s in recorded if s.place != "mid"]
    every = tr.heatmaps(0, sites=["down", "mid", "up"], normalize=None)
    assert [s.key for s in every.sites] == [s.key for s in recorded]
    pos = maps.tokens.positions("red")
    torch.testing.assert_close(every["red"].tensor, reference_map(tr, 0, pos, (32, 48), sites={s.key for s in recorded}))
    assert [s.key for s in tr.heatmaps(0, sites=mid).sites] == mid  # named sites are taken as given
    with pc.trace(sd15, sites="mid") as only_mid:  # nothing else recorded: the mid block stays
        sd15("a red circle", num_inference_steps=2, output_type="latent")
    assert [s.key for s in only_mid.heatmaps(0).sites] == mid


def test_selection_by_place_level_and_site(traced):
    tr, _ = traced
    up0 = [s.key for s in tr.store.recorded_sites(0) if s.place == "up" and s.level == 0]
    maps = tr.heatmaps(0, sites={"places": ["up"], "levels": [0]}, normalize=None)
    assert [s.key for s in maps.sites] == up0
    pos = maps.tokens.positions("circle")
    torch.testing.assert_close(maps["circle"].tensor, reference_map(tr, 0, pos, (32, 48), sites=set(up0)))
    one = tr.heatmaps(0, sites=[up0[0]], normalize=None)
    assert len(one.sites) == 1
    with pytest.raises(ValueError, match="no recorded site"):
        tr.heatmaps(0, sites={"places": ["mid"], "levels": [0]})


def test_words_phrases_repeats_case_and_specials(traced):
    tr, _ = traced
    maps = tr.heatmaps(0, normalize=None)
    assert maps.words == ["a", "red", "circle", "and", "a", "blue-green", "photorealistic", "square", "circle"]
    tok = maps.tokens
    c1, c2 = tok.find("circle", 1)[0].tokens, tok.find("circle", 2)[0].tokens
    torch.testing.assert_close(maps.word("circle", occurrence=2).tensor, maps.raw(c2))
    torch.testing.assert_close(maps["circle"].tensor, maps.raw(c1) + maps.raw(c2), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(maps["Red Circle"].tensor, maps.raw(tok.positions("red")) + maps.raw(c1), atol=1e-6, rtol=1e-5)
    assert len(maps["blue-green"].positions) == 3  # blue, -, green
    word_positions = {p for w in tok.words for p in w.tokens}
    assert 0 not in word_positions and tok.end_position not in word_positions
    torch.testing.assert_close(maps.special("start").tensor, maps.raw([0]))
    torch.testing.assert_close(maps.special("end").tensor, maps.raw([tok.end_position]))
    assert maps.special("padding").positions == tuple(range(tok.end_position + 1, 77))
    with pytest.raises(KeyError, match="did you mean 'circle'") as err:
        maps["cirlce"]
    assert "red, circle" in str(err.value)
    with pytest.raises(KeyError, match="occurs 2 time"):
        maps.word("circle", occurrence=3)
    with pytest.raises(KeyError, match="'start', 'end' or 'padding'"):
        maps.special("bos")


def test_normalisation_rules(traced):
    tr, _ = traced
    raw = tr.heatmaps(0, normalize=None)
    per_word = tr.heatmaps(0)
    glob = tr.heatmaps(0, normalize="global")
    r = raw["square"].tensor
    torch.testing.assert_close(per_word["square"].tensor, (r - r.min()) / (r.max() - r.min()))
    peak = max(float(raw.raw(w.tokens).max()) for w in raw.word_list)
    torch.testing.assert_close(glob["square"].tensor, r / peak)
    stacked = glob.to_tensor()
    assert stacked.shape == (9, 32, 48) and float(stacked.max()) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="normalize"):
        tr.heatmaps(0, normalize="max")


def test_size_and_interpolation(traced):
    tr, _ = traced
    big = tr.heatmaps(0, size=(40, 100), normalize=None)
    assert big.interpolation == "bicubic"
    pos = big.tokens.positions("blue-green")
    m = big["blue-green"].tensor
    assert m.shape == (40, 100) and float(m.min()) >= 0.0
    ref = torch.zeros(40, 100)
    by_level = {}
    for s in tr.store.recorded_sites(0):
        if s.place != "mid":
            by_level.setdefault(s.level, []).append(tr.store.site_map(0, s)[pos])
    for maps in by_level.values():
        ref += 0.5 * sum(
            F.interpolate(torch.stack(maps).mean(0)[p][None, None], size=(40, 100), mode="bicubic",
                          align_corners=False)[0, 0].clamp_min(0) for p in range(len(pos))
        )  # each token upsampled and clamped on its own, then summed
    torch.testing.assert_close(m, ref, atol=1e-6, rtol=1e-5)
    bilinear = tr.heatmaps(0, size=(40, 100), interpolation="bilinear", normalize=None)
    torch.testing.assert_close(bilinear["blue-green"].tensor, reference_map(tr, 0, pos, (40, 100), mode="bilinear"))
    with pytest.raises(ValueError, match="interpolation"):
        tr.heatmaps(0, interpolation="nearest")


def test_steps_after_the_run_and_strip(traced):
    tr, images = traced
    maps = tr.heatmaps(0, steps=[2], normalize=None)
    pos = maps.tokens.positions("red")
    by_level = {}
    for s in tr.store.recorded_sites(0):
        if s.place != "mid":
            by_level.setdefault(s.level, []).append(tr.store.image(0).run.step_maps[2][s.key][0].float()[pos])
    ref = sum(0.5 * upsampled(torch.stack(v).mean(0), (32, 48), "bicubic") for v in by_level.values())
    torch.testing.assert_close(maps["red"].tensor, ref, atol=1e-6, rtol=1e-5)
    frames = tr.heatmaps(0).step_maps("red")
    assert [s for s, _ in frames] == [0, 1, 2]
    torch.testing.assert_close(frames[2][1], ref, atol=1e-6, rtol=1e-5)
    strip = tr.heatmaps(0).strip("red", images[0])
    assert isinstance(strip, Image.Image) and strip.width > strip.height
    with pytest.raises(ValueError, match="were not recorded"):
        tr.heatmaps(0, steps=[7])


def test_pictures(traced):
    tr, images = traced
    maps = tr.heatmaps(0)
    over = maps["circle"].overlay(images[0])
    assert over.size == images[0].size == (48, 32)
    alone = np.asarray(maps["circle"].overlay())
    assert alone.shape == (32, 48, 3)
    hot = np.unravel_index(int(maps["circle"].tensor.argmax()), (32, 48))
    assert alone[hot][0] > alone[hot][2]  # the hottest pixel is red in the jet colour map
    assert maps["circle"].overlay(images[0], legend=True).width > 48
    grid = maps.grid(images[0])
    assert isinstance(grid, Image.Image) and grid.width > 6 * 48
    assert isinstance(maps.grid(words=["red", "square"], cols=1), Image.Image)


def test_pictures_read_any_image_the_same_way():
    from promptcontrol import images

    rgb = np.random.default_rng(0).integers(0, 256, (6, 5, 3), dtype=np.uint8)
    want = rgb.astype(np.float32) / 255  # (H, W, 3) in [0, 1]
    chw = torch.from_numpy(want).permute(2, 0, 1)
    for image in (Image.fromarray(rgb), rgb, chw, rgb.astype(np.float32)):  # PIL, uint8, CHW tensor, 0..255 floats
        np.testing.assert_allclose(images.rgb_array(image), want, atol=1e-6, rtol=0)
    grey = images.rgb_array(rgb[..., 0])
    assert grey.shape == (6, 5, 3) and np.array_equal(grey[..., 2], grey[..., 0])
    assert np.array_equal(np.asarray(images.as_pil(chw)), rgb)
    np.testing.assert_array_equal(images.float_array(rgb), rgb / 255.0)
    with pytest.raises(ValueError, match="expected an image"):
        images.rgb_array(np.zeros((2, 3, 4, 5)))


def test_export_roundtrip(traced, tmp_path):
    tr, images = traced
    maps = tr.heatmaps(0)
    tensor = maps.to_tensor()
    from safetensors import safe_open

    path = maps.save(tmp_path / "maps.safetensors")
    with safe_open(str(path), "pt") as f:
        assert f.metadata()["prompt"] == PROMPT
        keys = sorted(f.keys())
        assert keys[2] == "02_circle" and len(keys) == len(maps.words)
        torch.testing.assert_close(f.get_tensor("06_photorealistic"), tensor[6])
    npz = np.load(maps.save(tmp_path / "maps.npz"))
    np.testing.assert_allclose(npz["08_circle"], tensor[8].numpy())
    assert str(npz["meta_prompt"]) == PROMPT
    maps["red"].save(tmp_path / "red.png", images[0])
    with Image.open(tmp_path / "red.png") as png:
        assert png.size == (48, 32)
    maps["red"].save(tmp_path / "red.npy")
    np.testing.assert_allclose(np.load(tmp_path / "red.npy"), maps["red"].numpy())
    with pytest.raises(ValueError, match="safetensors"):
        maps.save(tmp_path / "maps.txt")


def test_prompt_longer_than_the_limit_warns_and_cut_words_have_no_map(sd15):
    words = [f"word{i}" for i in range(60)] + ["zebra", "giraffe"]  # each "wordN" is two tokens
    prompt = " ".join(words)
    with pc.trace(sd15) as tr:
        sd15(prompt, num_inference_steps=2, output_type="latent")
    with pytest.warns(UserWarning, match="cut off.*'zebra', 'giraffe'"):
        maps = tr.heatmaps(0)
    assert "zebra" not in maps.words and "word0" in maps.words
    with pytest.raises(KeyError, match="cut off"):
        maps["giraffe"]


def test_errors_before_recording_out_of_range_and_embeddings(sd15):
    tr = pc.trace(sd15)
    with pytest.raises(RuntimeError, match="nothing was recorded"):
        tr.heatmaps(0)
    embeds, negative = sd15.encode_prompt("a red circle", "cpu", 1, True)
    with tr:
        sd15(prompt_embeds=embeds, negative_prompt_embeds=negative, num_inference_steps=2, output_type="latent")
    with pytest.raises(IndexError, match="out of range"):
        tr.heatmaps(1)
    with pytest.raises(ValueError, match="prompt="):
        tr.heatmaps(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        maps = tr.heatmaps(0, prompt="a red circle")
    assert maps.words == ["a", "red", "circle"]


def test_steps_from_per_level_step_maps(sd15):
    with pc.trace(sd15, per_step="level", dtype=torch.float32) as tr:
        sd15("a red circle", num_inference_steps=3, output_type="latent")
    maps = tr.heatmaps(0, steps=[1, 2], normalize=None)
    pos = maps.tokens.positions("circle")
    ref = torch.zeros(32, 32)
    for level in (0, 1):  # per-level step maps mix every site of a level, the mid block's included
        mean = torch.stack([tr.store.image(0).run.level_steps[s][level][0] for s in (1, 2)]).mean(0)[pos]
        ref += 0.5 * upsampled(mean, (32, 32), "bicubic")
    torch.testing.assert_close(maps["circle"].tensor, ref, atol=1e-6, rtol=1e-5)
    assert [s for s, _ in tr.heatmaps(0).step_maps("circle")] == [0, 1, 2]
    with pytest.raises(ValueError, match="per level"):
        tr.heatmaps(0, steps=[1], sites="up")
    with pytest.raises(ValueError, match="per_step=True"):
        tr.heatmaps(0, sites="up").strip("circle")

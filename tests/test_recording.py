"""Recording: the read API between the store and heat maps. Heat maps from a Recording written here from tensors
(no session, no pipeline), against maps computed here by plain tensor ops; the store hands out what it holds;
the one steps=/sites= vocabulary in the store and heat maps; the old spellings warn and keep their meaning."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
import torch.nn.functional as F

import promptcontrol as pc
from promptcontrol.heatmap import build_heatmaps
from promptcontrol.recording import Recording
from promptcontrol.sites import AttentionSite

K = 77
GRIDS = {0: (4, 6), 1: (2, 3)}  # level → (h, w) of a 4×6 latent


def site(path: str, place: str, level: int) -> AttentionSite:
    return AttentionSite(f"{path}.attn2.processor", "cross", place, 0, 0, 0, level, 2)


SITES = (
    site("down_blocks.0.attentions.0.transformer_blocks.0", "down", 0),
    site("down_blocks.1.attentions.0.transformer_blocks.0", "down", 1),
    site("mid_block.attentions.0.transformer_blocks.0", "mid", 1),
    site("up_blocks.1.attentions.0.transformer_blocks.0", "up", 0),
)


def rows(h: int, w: int, seed: int) -> torch.Tensor:
    """(h·w, K) softmax rows: what one step × head adds to a site's sum."""
    return torch.randn(h * w, K, generator=torch.Generator().manual_seed(seed)).softmax(dim=-1)


def as_grid(qk: torch.Tensor, hw) -> torch.Tensor:
    """(Q, K) → (K, h, w), written out: query q is pixel (q // w, q % w)."""
    return qk.T.reshape(K, *hw)


def hand_made(**extra) -> Recording:
    """4 steps × 2 heads summed per site, with every step's map kept (per_step="site") and per-head sums."""
    sums, step_maps, head_sums = {}, {}, {}
    for i, s in enumerate(SITES):
        hw = GRIDS[s.level]
        per = [[rows(*hw, seed=100 * i + 10 * step + head) for head in range(2)] for step in range(4)]
        sums[s.key] = sum(r for step in per for r in step)  # (Q, K)
        for step in range(4):
            step_maps.setdefault(step, {})[s.key] = as_grid((per[step][0] + per[step][1]) / 2, hw)
        head_sums[s.key] = torch.stack([as_grid(sum(per[t][h] for t in range(4)), hw) for h in range(2)])
    fields = dict(
        sites=SITES, grids={s.key: GRIDS[s.level] for s in SITES}, sums=sums, counts={s.key: 8 for s in SITES},
        latent_hw=(4, 6), steps=(0, 1, 2, 3), prompt="a red circle", tokenizer=pc.testing.clip_tokenizer(),
        scale_factor=2, total=4, per_step="site", step_maps=step_maps, per_head=True, head_sums=head_sums,
        head_counts={s.key: 4 for s in SITES},
    )
    return Recording(**{**fields, **extra})


def expected(site_maps: dict, positions, size=(8, 12), mode="bicubic") -> torch.Tensor:
    """Σ_levels ½ · Σ_tokens upsample(mean of the level's site maps (K, h, w))[token], each token clamped at 0."""
    out = torch.zeros(size)
    for level in (0, 1):
        maps = [m for s, m in site_maps.items() if s.level == level]
        mean = torch.stack(maps).mean(dim=0)[list(positions)]  # (n, h, w)
        up = F.interpolate(mean[None], size=size, mode=mode, align_corners=False)[0]
        out += 0.5 * (up.clamp_min(0) if mode == "bicubic" else up).sum(dim=0)
    return out


def test_heat_maps_from_a_hand_made_recording():
    rec = hand_made()
    maps = build_heatmaps(rec, normalize=None)
    assert maps.size == (8, 12) and maps.words == ["a", "red", "circle"]  # latent 4×6 × scale factor 2
    assert [s.place for s in maps.sites] == ["down", "down", "up"]  # the mid block is left out by default
    no_mid = {s: as_grid(rec.sums[s.key] / 8, GRIDS[s.level]) for s in SITES if s.place != "mid"}
    torch.testing.assert_close(maps["circle"].tensor, expected(no_mid, [3]), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(maps["red circle"].tensor, expected(no_mid, [2, 3]), atol=1e-6, rtol=1e-5)
    word = build_heatmaps(rec)["circle"].tensor  # default normalize="word": min-max of the raw map
    raw = maps["circle"].tensor
    torch.testing.assert_close(word, (raw - raw.min()) / (raw.max() - raw.min()))
    every = build_heatmaps(rec, sites=["down", "mid", "up"], interpolation="bilinear", normalize=None)
    torch.testing.assert_close(every.raw(range(K)), torch.ones(8, 12), atol=1e-5, rtol=0)  # convex mixes
    all_sites = {s: as_grid(rec.sums[s.key] / 8, GRIDS[s.level]) for s in SITES}
    torch.testing.assert_close(every["red"].tensor, expected(all_sites, [2], mode="bilinear"), atol=1e-6, rtol=1e-5)


def test_steps_and_heads_of_a_hand_made_recording():
    rec = hand_made()
    no_mid = [s for s in SITES if s.place != "mid"]

    def at_steps(steps):
        return expected({s: torch.stack([rec.step_maps[t][s.key] for t in steps]).mean(0) for s in no_mid}, [2])

    for spec, steps in (([0, 2], [0, 2]), ((0.0, 0.5), [0, 1]), (lambda ctx: ctx.index % 2 == 1, [1, 3])):
        maps = build_heatmaps(rec, steps=spec, normalize=None)  # a list, a window of fractions, a function
        assert maps.steps == steps
        torch.testing.assert_close(maps["red"].tensor, at_steps(steps), atol=1e-6, rtol=1e-5)
    frames = build_heatmaps(rec).step_maps("red", steps=(0.5, 1.0))
    assert [s for s, _ in frames] == [2, 3]
    torch.testing.assert_close(frames[1][1], at_steps([3]), atol=1e-6, rtol=1e-5)
    heads = build_heatmaps(rec, heads=[1], normalize=None)
    ref = expected({s: rec.head_sums[s.key][1] / 4 for s in no_mid}, [2])
    torch.testing.assert_close(heads["red"].tensor, ref, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="selects none of the recorded steps"):
        build_heatmaps(rec, steps=lambda ctx: ctx.index > 9)
    with pytest.raises(ValueError, match=r"steps \[7\] were not recorded"):
        build_heatmaps(rec, steps=[7])
    with pytest.raises(ValueError, match="per-step maps"):
        build_heatmaps(hand_made(per_step=None, step_maps={}), steps=[0])


def test_a_recording_is_frozen_and_refuses_data_that_does_not_fit():
    rec = hand_made()
    with pytest.raises(dataclasses.FrozenInstanceError):
        rec.prompt = "another"
    key = SITES[0].key
    with pytest.raises(ValueError, match=r"sums\['down_blocks.0.*\(24, K\) for grid \(4, 6\)"):
        hand_made(sums={**rec.sums, key: torch.zeros(23, K)})
    with pytest.raises(ValueError, match="per_step must be"):
        hand_made(per_step="steps")
    with pytest.raises(ValueError, match="needs sums"):
        hand_made(counts={})
    with pytest.raises(KeyError, match="no data for site nowhere"):
        rec.site_map("nowhere")


def test_the_store_hands_out_what_it_holds(sd15):
    with pc.trace(sd15, per_step=True, per_head=True) as tr:
        sd15(["a red circle", "a dog"], num_inference_steps=3, output_type="latent",
             generator=torch.Generator().manual_seed(0))
    rec = tr.store.recording(1)
    assert rec.prompt == "a dog" and rec.index == 1 and rec.steps == (0, 1, 2) and rec.total == 3
    assert [s.key for s in rec.sites] == [s.key for s in tr.store.recorded_sites(1)]
    run, slot = tr.store.image(1).run, tr.store.image(1).slot
    for s in rec.sites:  # the recording holds the store's numbers for this image
        torch.testing.assert_close(rec.sums[s.key], run.sums[s.key][slot], atol=0, rtol=0)
        torch.testing.assert_close(rec.step_maps[2][s.key], run.step_maps[2][s.key][slot], atol=0, rtol=0)
    for options in ({}, {"steps": [1, 2], "normalize": None}, {"heads": [0], "sites": "up"}):
        ours, theirs = build_heatmaps(rec, **options), tr.heatmaps(1, **options)
        assert torch.equal(ours.to_tensor(), theirs.to_tensor())


def test_a_recording_taken_during_the_run_keeps_what_was_there(sd15):
    site = next(s for s in pc.find_sites(sd15.unet) if s.is_cross and s.place == "up" and s.level == 0)
    store = pc.AttentionStore(per_step=True, dtype=torch.float32, max_side=None)
    taken = []

    def take(pipe, step, timestep, kwargs):
        if step == 0:
            taken.append(store.recording(0))
        return kwargs

    with pc.control(sd15, store):
        sd15("a red circle", num_inference_steps=3, output_type="latent", callback_on_step_end=take,
             generator=torch.Generator().manual_seed(0))
    during = taken[0]
    assert during.steps == (0,) and list(during.step_maps) == [0]
    torch.testing.assert_close(during.site_map(site), store.site_map(0, site, steps=[0]), atol=1e-6, rtol=1e-5)
    assert (during.site_map(site) - store.site_map(0, site)).abs().max() > 1e-4  # later steps changed the store


def test_store_takes_the_steps_and_sites_vocabulary(sd15):
    stores = {
        "fractions": pc.AttentionStore(steps=(0.0, 0.5)),
        "function": pc.AttentionStore(steps=lambda ctx: ctx.index == 3),
        "place": pc.AttentionStore(sites="up"),
        "pattern": pc.AttentionStore(sites="up_blocks.1.*"),
        "dict": pc.AttentionStore(sites={"levels": [1], "places": ["down", "mid"]}),
    }
    with pc.control(sd15, *stores.values()):
        sd15("a cat", num_inference_steps=4, output_type="latent")
    assert stores["fractions"].steps(0) == [0, 1] and stores["function"].steps(0) == [3]
    cross = [s for s in pc.find_sites(sd15.unet) if s.is_cross]
    chosen = {name: [s.key for s in store.recorded_sites(0)] for name, store in stores.items()}
    assert chosen["place"] == [s.key for s in cross if s.place == "up"]
    assert chosen["pattern"] == [s.key for s in cross if s.key.startswith("up_blocks.1.")]
    assert chosen["dict"] == [s.key for s in cross if s.level == 1 and s.place in ("down", "mid")]
    before = dict(sd15.unet.attn_processors)
    with pytest.raises(ValueError, match=r"names no cross-attention site: up_blocks\.9\.\*"):
        with pc.control(sd15, pc.AttentionStore(sites=["up", "up_blocks.9.*"])):
            pass
    assert sd15.unet.attn_processors == before


def test_old_spellings_warn_at_the_caller_and_keep_their_meaning(sd15):
    with pytest.warns(DeprecationWarning, match=r"pass a list \(steps=\[1, 3\]\)") as caught:
        two = pc.AttentionStore(steps=(1, 3))  # meant steps 1 and 3, not the window 1 <= step < 3
    assert caught[0].filename == __file__  # pointed at the line that needs the change
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the new spelling is quiet
        new = pc.AttentionStore(sites={"places": ["up"], "levels": [0]}, steps=[1, 2], per_step=True)
    with pytest.warns(DeprecationWarning, match=r"sites=\{'places': \('up',\), 'levels': \[0\]\}") as caught:
        old = pc.trace(sd15, new, two, places=("up",), levels=[0], steps=[1, 2], per_step=True)
    assert len(caught) == 1 and caught[0].filename == __file__
    with old:
        sd15("a red circle", num_inference_steps=4, output_type="latent", generator=torch.Generator().manual_seed(0))
    assert two.steps(0) == [1, 3]
    assert [s.key for s in old.store.recorded_sites(0)] == [s.key for s in new.recorded_sites(0)]
    assert {(s.place, s.level) for s in new.recorded_sites(0)} == {("up", 0)}
    with pytest.warns(DeprecationWarning, match="old spelling") as caught:
        by_place = new.heatmaps(0, places=["up"], normalize=None)
    assert caught[0].filename == __file__
    assert torch.equal(by_place.to_tensor(), new.heatmaps(0, sites="up", normalize=None).to_tensor())
    with pytest.warns(DeprecationWarning, match="pass a list") as caught:
        pair = old.heatmaps(0, steps=(1, 2), normalize=None)
    assert caught[0].filename == __file__ and pair.steps == [1, 2]
    assert torch.equal(pair.to_tensor(), old.heatmaps(0, steps=[1, 2], normalize=None).to_tensor())
    with pytest.warns(DeprecationWarning), pytest.raises(ValueError, match="both as keywords and in sites="):
        pc.AttentionStore(sites={"levels": [0]}, levels=[1])

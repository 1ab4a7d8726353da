"""``torch.compile(unet, fullgraph=True)`` under a session: no graph break, no recompile per step or per weight.

Usage that these tests pin down: compile the UNet first, then ``pc.control`` the compiled module (or the pipeline
that holds it). The session's per-step hooks are then registered on the compile wrapper and run eagerly, and the
compiled region is the UNet forward with the controlled processors inside it. A counting backend (which runs
the captured graph eagerly, so the tests stay fast on CPU) tells how many graphs were compiled; ``fullgraph=True``
turns any graph break into an error.
"""

from __future__ import annotations

import pytest
import torch

import promptcontrol as pc
from promptcontrol.controllers.inject import InjectSelf
from promptcontrol.controllers.edit import AutoEdit

PROMPT = "a red car"
EDIT = ["a red car", "a blue car"]


class CountingBackend:
    """A ``torch.compile`` backend that counts the graphs it is given and runs them as captured."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return gm.forward


@pytest.fixture
def pipe():
    """A fresh tiny SD 1.5 pipeline (its UNet gets swapped for the compiled one); dynamo's caches emptied around
    each test (they are keyed by code object, shared by every UNet, and capped at 8 entries)."""
    torch._dynamo.reset()
    yield pc.testing.tiny_pipeline("sd15")
    torch._dynamo.reset()


def generate(pipe, prompts, steps=3):
    g = torch.Generator().manual_seed(0)
    return pipe(
        prompts, height=32, width=32, num_inference_steps=steps, generator=g, output_type="latent"
    ).images


def compiled(pipe):
    """(backend, raw UNet); ``pipe.unet`` becomes ``torch.compile(raw, fullgraph=True)``."""
    backend = CountingBackend()
    raw = pipe.unet
    pipe.unet = torch.compile(raw, fullgraph=True, backend=backend)
    return backend, raw


def hooks(module):
    return (dict(module._forward_pre_hooks), dict(module._forward_hooks))


def test_pass_through_compiles_whole_and_equals_stock(pipe):
    stock = generate(pipe, PROMPT)
    backend, raw = compiled(pipe)
    outer_before, inner_before = hooks(pipe.unet), hooks(raw)
    with pc.control(pipe, pc.PassThrough()) as session:
        assert session.unet is raw
        out = generate(pipe, PROMPT)
    assert backend.graphs == 1  # one graph for the 3 steps; fullgraph=True would have raised on a break
    assert (out - stock).abs().max() <= 1e-5
    assert hooks(pipe.unet) == outer_before and hooks(raw) == inner_before  # hooks removed
    assert all(type(p).__name__ == "AttnProcessor2_0" for p in raw.attn_processors.values())


def test_bare_compiled_unet_with_steps_driven_by_hand(pipe):
    """A bare compiled UNet under a session: the step hooks run outside the graph, timesteps change freely."""
    backend, raw = compiled(pipe)
    unet = pipe.unet
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    ehs = torch.randn(2, 77, raw.config.cross_attention_dim, generator=g)
    with pc.control(unet, pc.Reweight({2: 2.0}), cfg=True):
        for t in (900, 500, 100):
            unet(x, torch.tensor(t), ehs)
    assert backend.graphs == 1


def test_reweight_new_weight_reuses_the_graph_and_matches_eager(pipe):
    eager = {}
    for w in (2.0, 3.0):
        with pc.control(pipe, pc.Reweight({"red": w})):
            eager[w] = generate(pipe, PROMPT)
    assert (eager[2.0] - eager[3.0]).abs().max() > 1e-4  # the weight matters
    backend, raw = compiled(pipe)
    out = {}
    for w in (2.0, 3.0):
        with pc.control(pipe, pc.Reweight({"red": w})):
            out[w] = generate(pipe, PROMPT)
        assert backend.graphs == 1, f"weight {w} recompiled"
    for w in (2.0, 3.0):
        assert (out[w] - eager[w]).abs().max() <= 1e-5


@pytest.mark.parametrize("mode", ["attention", "softmax"])
def test_reweight_modes_compile_without_breaks(pipe, mode):
    backend, _ = compiled(pipe)
    with pc.control(pipe, pc.Reweight({"red": 2.0}, mode=mode)):
        generate(pipe, PROMPT, steps=2)
    assert backend.graphs == 1


def test_edit_compiles_without_breaks_and_matches_eager(pipe):
    def controllers():
        return AutoEdit(1.0), InjectSelf(1.0)

    with pc.control(pipe, *controllers()):
        eager = generate(pipe, EDIT)
    backend, _ = compiled(pipe)
    with pc.control(pipe, *controllers()):
        out = generate(pipe, EDIT)
    assert backend.graphs == 1
    assert (out - eager).abs().max() <= 1e-5
    assert (out[0] - out[1]).abs().max() > 0  # the edit changed the second image


def test_edit_window_ending_adds_one_graph_not_one_per_step(pipe):
    """Steps inside and outside the edit window run different graphs: two in all, however many steps."""
    backend, _ = compiled(pipe)
    with pc.control(pipe, AutoEdit(0.5), InjectSelf(0.25)):
        generate(pipe, EDIT, steps=4)
    first = backend.graphs
    with pc.control(pipe, AutoEdit(0.5), InjectSelf(0.25)):
        generate(pipe, EDIT, steps=4)
    assert first == 3 and backend.graphs == first  # edit + injection, edit only, neither


RECORDERS = {
    "default store": dict(),
    "per_step": dict(per_step=True),
    "per_step=level + per_head": dict(per_step="level", per_head=True),
}


@pytest.mark.parametrize("options", list(RECORDERS.values()), ids=list(RECORDERS))
def test_recording_compiles_whole_with_graphs_independent_of_steps(pipe, options):
    """Recording under fullgraph=True: the store's accumulation is in the graph (no break), and its bookkeeping
    (counts, grids, timesteps) happens in end_step, outside it — so the graphs do not multiply with the steps:
    one for a run's first recorded step (which allocates the sums), one for every later step."""
    eager = pc.AttentionStore(**options)
    with pc.control(pipe, eager):
        reference = generate(pipe, PROMPT, steps=5)
    backend, _ = compiled(pipe)
    store = pc.AttentionStore(**options)
    with pc.control(pipe, store):
        out = generate(pipe, PROMPT, steps=5)
    assert backend.graphs == 2, f"{backend.graphs} graphs for 5 recorded steps"
    assert (out - reference).abs().max() <= 1e-5
    want, got = eager.recording(0), store.recording(0)
    assert got.steps == want.steps == (0, 1, 2, 3, 4)
    assert got.timesteps == want.timesteps and got.counts == want.counts
    for key in want.sums:
        assert (got.sums[key] - want.sums[key]).abs().max() <= 1e-5
    for step, maps in want.step_maps.items():
        for key, m in maps.items():
            assert (got.step_maps[step][key].float() - m.float()).abs().max() <= 1e-3
    for step, maps in want.level_steps.items():
        for level, m in maps.items():
            assert (got.level_steps[step][level].float() - m.float()).abs().max() <= 1e-3
    for key, m in want.head_sums.items():
        assert (got.head_sums[key] - m).abs().max() <= 1e-5


def test_second_recorded_run_reuses_the_graphs(pipe):
    backend, _ = compiled(pipe)
    store = pc.AttentionStore()
    with pc.control(pipe, store):
        generate(pipe, PROMPT, steps=3)
        first = backend.graphs
        generate(pipe, "a blue car", steps=3)
    assert first == 2 and backend.graphs == first
    assert store.num_images == 2 and store.recording(1).steps == (0, 1, 2)


def test_record_with_an_edit_compiles_without_breaks(pipe):
    """Edit + self injection + per-step recording, fullgraph: one graph per kind of step, not per step."""
    backend, _ = compiled(pipe)
    with pc.control(pipe, AutoEdit(1.0), InjectSelf(1.0), pc.AttentionStore(per_step=True)):
        generate(pipe, EDIT, steps=4)
    assert backend.graphs == 2


# mode="reduce-overhead" (CUDA graphs) needs a GPU: not testable here (see docs/benchmarks.md).

"""The benchmark cases, defined once: the models and pipelines they run on, the explicit-attention processors they
are compared with, and the list of cases ``benchmarks/run.py`` times (the per-mode scripts import from here).

Every case times one pipeline call ``pipe(prompts, latents=..., num_inference_steps=steps, output_type="latent")``
on a ``StableDiffusionPipeline`` / ``StableDiffusionXLPipeline`` built around the full-size UNet (published config,
random weights) with small random text encoders of the UNet's text width and an unused VAE. So every case gets
the step context a user's run gets (prompts, CFG layout, step count), and the timed work is the UNet steps plus
a text encoder of 1 layer and the scheduler (both well under 1% of a step). Two groups, each with its own
stock baseline on the same rows:

* ``1 prompt``: one prompt with CFG, UNet batch 2 — stock, pass-through, record, reweight, explicit attention;
* ``2 prompts``: source + edit with CFG, UNet batch 4 — stock on the same 2 prompts, replace, refine,
  replace + local blend, explicit prompt-to-prompt.
"""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass
from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import promptcontrol as pc

from .harness import Case
from .models import sd15_unet, sdxl_unet

PROMPT = "a photo of a red car parked on a street"
SOURCE = "a photo of a red car parked on a street"
EDIT = "a photo of a blue car parked on a street"  # same words: Replace
REFINED = "a photo of a red sports car parked on a street"  # a word added: Refine
WEIGHTS = {2: 2.0, 7: 0.5}  # token positions of the conditional row (Reweight benchmarks on a bare UNet)
TARGETS = {"pass-through": 1.02, "reweight": 1.03, "edit": 1.05, "record": 1.15}


# ---- explicit attention, as prompt-to-prompt / Attend-and-Excite run it ---------------------------------------
@contextlib.contextmanager
def processors(unet, make: Callable[[str], object]):
    """Install ``make(key)`` at every attention site for the block; restore the previous processors after."""
    saved = dict(unet.attn_processors)
    unet.set_attn_processor({k: make(k) for k in saved})
    try:
        yield
    finally:
        unet.set_attn_processor(dict(saved))


def classic_processors(unet):
    """diffusers' explicit-softmax ``AttnProcessor`` at every site for the block; the originals after."""
    from diffusers.models.attention_processor import AttnProcessor

    return processors(unet, lambda key: AttnProcessor())


class ExplicitEditProcessor:
    """Prompt-to-prompt's way, for comparison: explicit softmax at every layer, then the maps edited in memory
    (cross: edited conditional row's map = source map @ mapper; self: source map where queries ≤ ``max_queries``)."""

    def __init__(self, is_cross: bool, mapper: torch.Tensor, rows: tuple[int, int], max_queries: int):
        self.is_cross, self.mapper, self.rows, self.max_queries = is_cross, mapper, rows, max_queries

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        batch = hidden_states.shape[0]
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        query = attn.head_to_batch_dim(attn.to_q(hidden_states))
        key = attn.head_to_batch_dim(attn.to_k(context))
        value = attn.head_to_batch_dim(attn.to_v(context))
        probs = attn.get_attention_scores(query, key, None)  # (B*h, Q, K)
        probs = probs.view(batch, attn.heads, *probs.shape[1:])
        edit, source = self.rows
        if self.is_cross:
            probs[edit] = torch.einsum("hqk,kn->hqn", probs[source], self.mapper.to(probs))
        elif probs.shape[2] <= self.max_queries:
            probs[edit] = probs[source]
        out = torch.bmm(probs.reshape(batch * attn.heads, *probs.shape[2:]), value)
        out = attn.to_out[0](attn.batch_to_head_dim(out))
        return out / attn.rescale_output_factor


def explicit_edit(pipe, size: int):
    """A context that runs :class:`ExplicitEditProcessor` everywhere for ``pipe([SOURCE, EDIT])`` (rows 3 ← 2)."""
    from promptcontrol.alignment import replace_map
    from promptcontrol.controllers.inject import default_self_levels
    from promptcontrol.tokens import tokenize

    sites = {s.key: s for s in pc.find_sites(pipe.unet)}
    levels = default_self_levels(list(sites.values()))
    side = size // 8
    max_queries = (-(-side // 2 ** min(levels))) ** 2  # injected at the same levels as InjectSelf's default
    mapper = replace_map(tokenize(pipe.tokenizer, SOURCE), tokenize(pipe.tokenizer, EDIT)).matrix

    def make(key):
        site = sites.get(key)
        return ExplicitEditProcessor(site is not None and site.is_cross, mapper, (3, 2), max_queries)

    return lambda: processors(pipe.unet, make)


# ---- models and pipelines -------------------------------------------------------------------------------------
def _text_encoder(hidden: int, projection: int | None, dtype, device):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=49408, hidden_size=hidden, intermediate_size=1024, num_hidden_layers=1, num_attention_heads=4,
        max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
        projection_dim=projection or hidden,
    )
    model = CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)
    return model.to(device=device, dtype=dtype).eval()


def build_pipeline(unet):
    """An SD (or, for a ``text_time`` UNet, SDXL) pipeline around ``unet``: small random text encoders of the
    UNet's text width (SDXL: the second one as wide as the pooled embedding), a VAE that is never run."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    torch.manual_seed(0)
    param = next(unet.parameters())
    dtype, device = param.dtype, param.device
    vae = AutoencoderKL(  # never run (output_type="latent"); four blocks give the usual scale factor 8
        block_out_channels=(4, 4, 4, 4), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, norm_num_groups=2, layers_per_block=1,
    ).to(device=device, dtype=dtype)
    scheduler = DDIMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1, clip_sample=False,
        set_alpha_to_one=False,
    )
    cfg = unet.config
    if cfg.addition_embed_type == "text_time":
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        pipe = StableDiffusionXLPipeline(
            vae=vae, unet=unet, scheduler=scheduler,
            text_encoder=_text_encoder(cfg.cross_attention_dim - pooled, None, dtype, device),
            text_encoder_2=_text_encoder(pooled, pooled, dtype, device),
            tokenizer=pc.testing.clip_tokenizer(), tokenizer_2=pc.testing.clip_tokenizer(),
        )
    else:
        pipe = StableDiffusionPipeline(
            vae=vae, unet=unet, scheduler=scheduler,
            text_encoder=_text_encoder(cfg.cross_attention_dim, None, dtype, device),
            tokenizer=pc.testing.clip_tokenizer(), safety_checker=None, feature_extractor=None,
            requires_safety_checker=False,
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_unet(model: str, dtype: torch.dtype, device: str):
    """``sd15`` / ``sdxl``: the full-size UNet; ``tiny-sd15`` / ``tiny-sdxl``: the test UNets (smoke runs)."""
    if model == "sd15":
        return sd15_unet(dtype=dtype, device=device)
    if model == "sdxl":
        return sdxl_unet(dtype=dtype, device=device)
    if model.startswith("tiny-"):
        return pc.testing.tiny_unet(model[5:]).to(device=device, dtype=dtype).requires_grad_(False)
    raise ValueError(f"unknown model {model!r}; choose sd15, sdxl, tiny-sd15 or tiny-sdxl")


# ---- the cases ------------------------------------------------------------------------------------------------
@dataclass
class Bench:
    """One model at one size, ready to time: its pipeline, the starting latents, steps per timed call."""

    pipe: object
    size: int
    steps: int
    device: str
    latents: torch.Tensor  # (1, 4, size/8, size/8), repeated per prompt

    @property
    def unet(self):
        return self.pipe.unet

    def generate(self, prompts: list[str]) -> Callable[[], object]:
        latents = self.latents.repeat(len(prompts), 1, 1, 1)

        def call():
            return self.pipe(
                prompts, latents=latents, height=self.size, width=self.size, num_inference_steps=self.steps,
                output_type="latent",
            )

        return call


def make_bench(model: str, size: int, steps: int, device: str, dtype: torch.dtype) -> Bench:
    pipe = build_pipeline(build_unet(model, dtype, device))
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, size // 8, size // 8, generator=g).to(device=device, dtype=dtype)
    return Bench(pipe, size, steps, device, latents)


@dataclass
class Entry:
    """A case, the case it is a ratio to, and the target (name in :data:`TARGETS`) it answers to."""

    case: Case
    baseline: str
    target: str | None = None
    group: str = ""


def step_cases(bench: Bench) -> list[Entry]:
    """Every mode, in two groups (1 prompt, UNet batch 2; source + edit, UNet batch 4), stock first in each."""
    from promptcontrol.controllers.inject import InjectSelf

    pipe, one, two = bench.pipe, bench.generate([PROMPT]), bench.generate([SOURCE, EDIT])
    refine = bench.generate([SOURCE, REFINED])
    def control(*make):  # fresh controllers for every timing, built outside the timed region
        return lambda: pc.control(pipe, *(m() for m in make))

    g1, g2 = "1 prompt + CFG (UNet batch 2)", "source + edit + CFG (UNet batch 4)"
    s1, s2 = "stock AttnProcessor2_0", "stock AttnProcessor2_0, 2 prompts"
    return [
        Entry(Case(s1, one), s1, None, g1),
        Entry(Case("pass-through (pc.control + PassThrough, all sites)", one, control(pc.PassThrough)), s1,
              "pass-through", g1),
        Entry(Case("record: pc.trace default store (running sums)", one, lambda: pc.trace(pipe)), s1, "record", g1),
        Entry(Case("record: pc.trace per_step=True (maps of every step)", one,
                   lambda: pc.trace(pipe, per_step=True)), s1, None, g1),
        Entry(Case("reweight: Reweight({'red': 2}) (attention mode)", one,
                   control(lambda: pc.Reweight({"red": 2.0}))), s1, "reweight", g1),
        Entry(Case("explicit: diffusers AttnProcessor everywhere", one, lambda: classic_processors(pipe.unet)), s1,
              None, g1),
        Entry(Case(s2, two), s2, None, g2),
        Entry(Case("edit: Replace + self injection, every step", two,
                   control(lambda: pc.Replace(1.0), lambda: InjectSelf(1.0))), s2, "edit", g2),
        Entry(Case("edit: Refine + self injection, every step", refine,
                   control(lambda: pc.Refine(1.0), lambda: InjectSelf(1.0))), s2, "edit", g2),
        Entry(Case("edit: Replace + self injection + LocalBlend", two,
                   control(lambda: pc.Replace(1.0), lambda: InjectSelf(1.0),
                           lambda: pc.LocalBlend([["red"], ["blue"]], start=0.0))), s2, "edit", g2),
        Entry(Case("explicit prompt-to-prompt (softmax + map edits)", two, explicit_edit(pipe, bench.size)), s2,
              None, g2),
    ]


def compiled_cases(bench: Bench, backend: str) -> list[Entry]:
    """The same modes on ``torch.compile(unet, fullgraph=True, dynamic=False)``, against stock compiled alike.

    The compiled module goes into ``pipe.unet`` and the session is built on the pipeline, so its step hooks run
    outside the graph (see ``tests/test_compile.py``). Compilation happens in the untimed warm-up round; each case
    keeps its own cached graph afterwards (no recompiles while timing)."""
    from promptcontrol.controllers.inject import InjectSelf

    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 16)
    pipe = bench.pipe
    compiled = torch.compile(pipe.unet, fullgraph=True, dynamic=False, backend=backend)
    one, two = bench.generate([PROMPT]), bench.generate([SOURCE, EDIT])

    def on_compiled(*make):
        @contextlib.contextmanager
        def context():
            raw, pipe.unet = pipe.unet, compiled
            try:
                if make:
                    with pc.control(pipe, *(m() for m in make)):
                        yield
                else:
                    yield
            finally:
                pipe.unet = raw

        return context

    g1, g2 = f"compiled ({backend}), 1 prompt + CFG", f"compiled ({backend}), source + edit + CFG"
    s1, s2 = f"stock, compiled ({backend})", f"stock, compiled ({backend}), 2 prompts"
    return [
        Entry(Case(s1, one, on_compiled()), s1, None, g1),
        Entry(Case("pass-through, compiled", one, on_compiled(pc.PassThrough)), s1, "pass-through", g1),
        Entry(Case("reweight, compiled", one, on_compiled(lambda: pc.Reweight({"red": 2.0}))), s1, "reweight", g1),
        Entry(Case(s2, two, on_compiled()), s2, None, g2),
        Entry(Case("edit: Replace + self injection, compiled", two,
                   on_compiled(lambda: pc.Replace(1.0), lambda: InjectSelf(1.0))), s2, "edit", g2),
    ]


# ---- CPU memory -----------------------------------------------------------------------------------------------
class PeakTensorBytes(TorchDispatchMode):
    """Peak bytes of live tensor storages created inside the mode (storages in ``exclude`` are not counted)."""

    def __init__(self, exclude: set[int]):
        super().__init__()
        self.exclude = exclude
        self.live: dict[int, list[int]] = {}  # data_ptr → [nbytes, tensors alive]
        self.current = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                self._track(t)
        return out

    def _track(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        ptr, nbytes = storage.data_ptr(), storage.nbytes()
        if ptr == 0 or ptr in self.exclude:
            return
        entry = self.live.get(ptr)
        if entry is None:
            self.live[ptr] = [nbytes, 1]
            self.current += nbytes
            self.peak = max(self.peak, self.current)
        else:
            entry[1] += 1
        weakref.finalize(t, self._release, ptr)

    def _release(self, ptr: int) -> None:
        entry = self.live.get(ptr)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.current -= entry[0]
            del self.live[ptr]


def cpu_peak_bytes(case: Case, unet, inputs=None) -> int:
    """Peak live tensor bytes of one untimed run of ``case`` on the CPU (parameters, buffers and ``inputs``
    excluded)."""
    exclude = {p.untyped_storage().data_ptr() for p in unet.parameters()}
    exclude |= {b.untyped_storage().data_ptr() for b in unet.buffers()}
    exclude |= {t.untyped_storage().data_ptr() for t in tree_flatten(inputs)[0] if isinstance(t, torch.Tensor)}
    with case.context():
        mode = PeakTensorBytes(exclude)
        with torch.inference_mode(), mode:
            case.run()
        return mode.peak

"""Transformer benchmarks: each mode's transformer forward against stock diffusers, in one run (issue 17 item 6,
issue 18 item 5).

Two architectures, each its published config with random weights (timing does not depend on the weights), called
directly, one denoising step per timing, on random inputs (the text encoders are not what is measured):

* ``--arch sd3``: SD3-medium ``SD3Transformer2DModel``: latents ``(B, 16, size/8, size/8)``, text features
  ``(B, 77 + 256, 4096)``, pooled ``(B, 2048)``; CFG rows ``[uncond | cond]``;
* ``--arch flux``: Flux.1-dev ``FluxTransformer2DModel``: packed latents ``(B, (size/16)², 64)`` with their
  ``img_ids``, T5 features ``(B, 512, 4096)`` with ``txt_ids``, pooled CLIP ``(B, 768)``, the guidance scale
  (guidance-distilled: no CFG rows, one denoiser call per step).

Modes, interleaved round-robin after a warm-up round (``benchmarks/harness.py``), each against the stock case on
the same rows:

* *1 prompt* (SD3: + CFG, batch 2; Flux: batch 1): stock processor (``JointAttnProcessor2_0`` /
  ``FluxAttnProcessor``); pass-through (``pc.PassThrough``, every site); record (``pc.trace``, default store);
  reweight (``pc.Reweight({"red": 2.0})``, one word × 2);
* *source + edit* (SD3: + CFG, batch 4; Flux: batch 2): stock on the same rows; edit (``pc.Replace(1.0)`` +
  ``InjectSelf(1.0)``: cross from the source and self injection, at every site, as ``pc.edit`` runs inside both
  windows).

Why a pipeline around the transformer: word weights and edits need the prompts' words (the tokenizer), the batch
layout and the number of steps, which a session reads from a pipeline call (``encode_prompt``, the scheduler). So
the session is built on the architecture's pipeline (``StableDiffusion3Pipeline`` / ``FluxPipeline``) around the
benchmark's transformer with 1-layer text encoders (SD3: two CLIP on the real CLIP tokenizer, no T5; Flux: CLIP
for the pooled vector and a T5 encoder on the package's T5-format tokenizer, whose tokens are Flux's text keys);
each timing's session is told its call (``encode_prompt`` on the prompts, ``scheduler.set_timesteps(28)``)
*outside* the timed region, and the timed region is the transformer's forward alone — step 0 of 28, the step at
which every mode acts.

CPU cost: full depth at 512² takes minutes per forward on 2 cores, so ``--layers`` builds fewer blocks: SD3
``--layers N`` joint blocks (CPU default 2 of 24), Flux ``--layers D,S`` double- and single-stream blocks (CPU
default 1,1 of 19,38; each Flux block is ~10× an SD3-medium block). Blocks of a kind are identical, so per-kind
ratios carry to the full depth: on the CPU forward hooks time the blocks of each kind (*block* columns), and *est.
full depth* recomposes each round's forward as outside + full count × per-block time of each kind (Flux: weights
the kinds 19:38). ``--gpu`` builds every block.

CPU:  ``python -m benchmarks.run --only sd3`` / ``--only flux`` (or ``python -m benchmarks.transformers --arch
      flux``): float32, 512²
GPU:  ``python -m benchmarks.run --only sd3 --gpu`` (CUDA float16) / ``--only flux --gpu`` (CUDA bfloat16, what
      Flux.1-dev is run in): 1024², every block, peak CUDA memory
Smoke: ``python -m benchmarks.transformers --tiny [--arch flux]`` (a tiny config, seconds)
Writes ``benchmarks/results/<arch>-<device>-<dtype>.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

import promptcontrol as pc

from .cases import EDIT, PROMPT, SOURCE, Entry, _text_encoder, cpu_peak_bytes
from .harness import CLOCKS, Case, Result, compare, machine

# ---- architectures --------------------------------------------------------------------------------------------
SD3_MEDIUM_CONFIG = dict(  # stabilityai/stable-diffusion-3-medium-diffusers, transformer/config.json
    sample_size=128,
    patch_size=2,
    in_channels=16,
    out_channels=16,
    num_layers=24,
    attention_head_dim=64,
    num_attention_heads=24,  # 24 heads × 64 = 1536 wide
    joint_attention_dim=4096,  # T5-XXL width; CLIP-L + CLIP-G features (768 + 1280) are zero-padded up to it
    caption_projection_dim=1536,
    pooled_projection_dim=2048,  # CLIP-L pooled 768 + CLIP-G pooled 1280
    pos_embed_max_size=192,
)  # no qk_norm, no dual_attention_layers (those are SD3.5's): diffusers' defaults

TINY_SD3_CONFIG = dict(  # the shapes of promptcontrol.testing_sd3.tiny_sd3_transformer, SD3 (not 3.5) flavour
    sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=8,
    num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=16,
    pos_embed_max_size=32,
)

FLUX_DEV_CONFIG = dict(  # black-forest-labs/FLUX.1-dev, transformer/config.json (_diffusers_version 0.30.0.dev0)
    patch_size=1,  # the pipeline packs 2×2 latent patches itself: 16 VAE channels × 4 = 64 in
    in_channels=64,
    num_layers=19,  # double-stream blocks (FluxTransformerBlock)
    num_single_layers=38,  # single-stream blocks (FluxSingleTransformerBlock)
    attention_head_dim=128,
    num_attention_heads=24,  # 24 heads × 128 = 3072 wide
    joint_attention_dim=4096,  # T5-XXL width
    pooled_projection_dim=768,  # CLIP-L pooled
    guidance_embeds=True,  # dev is guidance-distilled (schnell: False)
    axes_dims_rope=(16, 56, 56),  # rotary over (0, row, col) ids: 16 + 56 + 56 = 128
)  # out_channels None (= in_channels): diffusers' default, as in the published config

TINY_FLUX_CONFIG = dict(  # the shapes of promptcontrol.testing_flux.tiny_flux_transformer
    patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=8, num_attention_heads=2,
    joint_attention_dim=16, pooled_projection_dim=8, guidance_embeds=True, axes_dims_rope=(2, 2, 4),
)


@dataclass(frozen=True)
class BlockKind:
    """One kind of transformer block: what the report calls it, the model's ``ModuleList`` of them, the config key
    that counts them."""

    name: str
    attribute: str
    config_key: str


@dataclass(frozen=True)
class Architecture:
    """One transformer family: its published config, how to build it, its pipeline (for words, layout and steps),
    the inputs of one denoising step, and how a session is told about a call without running the pipeline."""

    name: str
    title: str
    config: dict
    tiny_config: dict
    kinds: tuple[BlockKind, ...]  # the block kinds, in the order ``--layers`` counts them
    cpu_layers: tuple[int, ...]  # the CPU (and --tiny) default of ``--layers``
    build: Callable[[dict, torch.dtype, str], torch.nn.Module]
    pipeline: Callable[[torch.nn.Module, int], Any]  # (model, text tokens) -> the pipeline around it
    inputs: Callable[[torch.nn.Module, int, int, int], dict]  # (model, image size, batch, text tokens) -> kwargs
    announce: Callable[[Any, list[str], int], None]  # (pipe, prompts, steps): what a pipeline call tells a session
    depth_note: Callable[["Bench"], str]  # what a shallower model than the published one measured
    stock_processor: str
    cfg: bool  # whether the pipeline's calls carry [uncond | cond] rows
    text_tokens: int  # the text sequence the denoiser sees in the pipeline's default call
    tiny_text_tokens: int
    gpu_dtype: str = "float16"
    vae_scale: int = 8
    pack: int = 1  # latent patches the pipeline packs into one token per side (Flux: 2), on top of patch_size
    steps: int = 28  # the pipeline's default step count: the session is told it; step 0 is timed

    def full_layers(self) -> tuple[int, ...]:
        return tuple(self.config[kind.config_key] for kind in self.kinds)

    def layers_text(self, layers: tuple[int, ...]) -> str:
        """``"2 blocks"`` (one kind) or ``"1 double-stream + 1 single-stream blocks"``."""
        if len(self.kinds) == 1:
            return f"{layers[0]} block{'s' if layers[0] != 1 else ''}"
        return " + ".join(f"{n} {kind.name}" for n, kind in zip(layers, self.kinds)) + " blocks"


def build_model(cls, config: dict, dtype: torch.dtype, device: str) -> torch.nn.Module:
    """``cls(**config)`` with seeded random weights, built directly in ``dtype`` on ``device`` (full Flux.1-dev in
    float32 would be 48 GB before a cast), in eval mode without gradients."""
    previous = torch.get_default_dtype()
    torch.manual_seed(0)
    try:
        torch.set_default_dtype(dtype)
        with torch.device(device):
            model = cls(**config)
    finally:
        torch.set_default_dtype(previous)
    if any(p.dtype != dtype for p in model.parameters()):  # none expected; diffusers warns on every cast
        model = model.to(dtype=dtype)
    return model.eval().requires_grad_(False)


def build_sd3(config: dict, dtype: torch.dtype, device: str) -> torch.nn.Module:
    from diffusers import SD3Transformer2DModel

    return build_model(SD3Transformer2DModel, config, dtype, device)


def sd3_pipeline(transformer: torch.nn.Module, text_tokens: int | None = None):
    """A ``StableDiffusion3Pipeline`` around ``transformer``: two 1-layer CLIP encoders (pooled widths summing to
    the transformer's ``pooled_projection_dim``) on the real CLIP tokenizer, no T5 (``text_tokens`` unused: no T5
    words), no VAE (never decoded)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    param = next(transformer.parameters())
    pooled = transformer.config.pooled_projection_dim
    tokenizer = pc.testing.clip_tokenizer()
    torch.manual_seed(1)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=None,
        text_encoder=_text_encoder(8, pooled // 2, param.dtype, param.device), tokenizer=tokenizer,
        text_encoder_2=_text_encoder(8, pooled - pooled // 2, param.dtype, param.device), tokenizer_2=tokenizer,
        text_encoder_3=None, tokenizer_3=None,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


SD3_TEXT_TOKENS = 77 + 256  # CLIP's 77, then T5's StableDiffusion3Pipeline default max_sequence_length 256


def sd3_inputs(model: torch.nn.Module, size: int, batch: int, text_tokens: int) -> dict:
    """One denoising step's forward kwargs: latents ``(B, C, size/8, size/8)``, text ``(B, text_tokens,
    joint_dim)``, pooled ``(B, pooled_dim)``, timestep ``(B,)`` (random: the text encoders are not the point)."""
    cfg = model.config
    param = next(model.parameters())
    g = torch.Generator().manual_seed(0)
    latent = size // 8
    return dict(
        hidden_states=torch.randn(batch, cfg.in_channels, latent, latent, generator=g).to(param),
        encoder_hidden_states=torch.randn(batch, text_tokens, cfg.joint_attention_dim, generator=g).to(param),
        pooled_projections=torch.randn(batch, cfg.pooled_projection_dim, generator=g).to(param),
        timestep=torch.full((batch,), 980.0, device=param.device, dtype=param.dtype),
        return_dict=False,
    )


def sd3_announce(pipe, prompts: list[str], steps: int) -> None:
    """What ``pipe(prompts, num_inference_steps=steps)`` tells an active session before its first step."""
    pipe.scheduler.set_timesteps(steps, device=pipe.transformer.device)
    pipe.encode_prompt(prompts, None, None, device=pipe.transformer.device, do_classifier_free_guidance=True)


def sd3_depth_note(bench: "Bench") -> str:
    (layers,), (full,) = bench.layers, bench.arch.full_layers()
    return (
        f"Measured: {layers} of the SD3-medium architecture's {full} joint blocks (`--layers {layers}`). "
        "The blocks are identical (1536 wide, 24 heads × 64, the same joint attention over image + text tokens), so "
        "per-block ratios carry to the full depth. Two caveats, both small: the layers outside the blocks (patch "
        "embedding, context embedder, final layer) run the same in every mode and dilute a shallow model's ratios "
        f"slightly toward 1; and the last block is `context_pre_only` (no text feed-forward), 1 of {layers} "
        f"here against 1 of {full} in the full model."
    )


def build_flux(config: dict, dtype: torch.dtype, device: str) -> torch.nn.Module:
    from diffusers import FluxTransformer2DModel

    return build_model(FluxTransformer2DModel, config, dtype, device)


FLUX_TEXT_TOKENS = 512  # FluxPipeline's default max_sequence_length (T5), Flux.1-dev's tokenizer_2 model_max_length


def _t5_encoder(vocab_size: int, dtype: torch.dtype, device):
    """A 1-layer random ``T5EncoderModel`` 16 wide: only its call matters (the session reads the prompts there)."""
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=vocab_size, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
        relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )
    return T5EncoderModel(config).to(device=device, dtype=dtype).eval()


def flux_pipeline(transformer: torch.nn.Module, text_tokens: int = FLUX_TEXT_TOKENS):
    """A ``FluxPipeline`` around ``transformer``: a 1-layer CLIP text model (pooled vector only) on the real CLIP
    tokenizer and a 1-layer T5 encoder on the package's T5-format tokenizer (``T5TokenizerFast``, padded to
    ``text_tokens``: its tokens are the joint attention's text keys, the words' positions), no VAE (never
    decoded; the pipeline's VAE scale is then 8, as Flux.1-dev's)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    from promptcontrol.testing_dit import t5_tokenizer

    param = next(transformer.parameters())
    t5 = t5_tokenizer()
    t5.model_max_length = text_tokens
    torch.manual_seed(1)
    pipe = FluxPipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=None,
        text_encoder=_text_encoder(8, None, param.dtype, param.device), tokenizer=pc.testing.clip_tokenizer(),
        text_encoder_2=_t5_encoder(len(t5), param.dtype, param.device), tokenizer_2=t5,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def flux_image_ids(rows: int, cols: int) -> torch.Tensor:
    """``(rows·cols, 3)`` ids ``(0, row, col)`` of the packed image tokens, row-major, as FluxPipeline makes them."""
    grid = torch.cartesian_prod(torch.arange(rows), torch.arange(cols))  # (N, 2)
    return torch.cat([torch.zeros(rows * cols, 1), grid.float()], dim=1)


def flux_inputs(model: torch.nn.Module, size: int, batch: int, text_tokens: int) -> dict:
    """One denoising step's forward kwargs: packed latents ``(B, (size/16)², in_channels)`` with their ``img_ids``,
    T5 features ``(B, text_tokens, joint_dim)`` with zero ``txt_ids``, pooled ``(B, pooled_dim)``, timestep and
    guidance ``(B,)`` as FluxPipeline passes them (``t / 1000``; 3.5, its default)."""
    cfg = model.config
    param = next(model.parameters())
    g = torch.Generator().manual_seed(0)
    grid = size // 16  # VAE ×8, then 2×2 packing
    inputs = dict(
        hidden_states=torch.randn(batch, grid * grid, cfg.in_channels, generator=g).to(param),
        encoder_hidden_states=torch.randn(batch, text_tokens, cfg.joint_attention_dim, generator=g).to(param),
        pooled_projections=torch.randn(batch, cfg.pooled_projection_dim, generator=g).to(param),
        timestep=torch.full((batch,), 0.98, device=param.device, dtype=param.dtype),
        img_ids=flux_image_ids(grid, grid).to(param),
        txt_ids=torch.zeros(text_tokens, 3).to(param),
        return_dict=False,
    )
    if cfg.guidance_embeds:
        inputs["guidance"] = torch.full((batch,), 3.5, device=param.device, dtype=torch.float32)
    return inputs


def flux_announce(pipe, prompts: list[str], steps: int) -> None:
    """What ``pipe(prompts, num_inference_steps=steps)`` tells an active session before its first step (Flux.1-dev:
    no CFG rows, so no negative prompt)."""
    pipe.encode_prompt(prompts, None, device=pipe.transformer.device,
                       max_sequence_length=pipe.tokenizer_2.model_max_length)
    pipe.scheduler.set_timesteps(steps, device=pipe.transformer.device)


def flux_depth_note(bench: "Bench") -> str:
    (double, single), (full_double, full_single) = bench.layers, bench.arch.full_layers()
    return (
        f"Measured: {double} of the Flux.1-dev architecture's {full_double} double-stream and {single} of its "
        f"{full_single} single-stream blocks (`--layers {double},{single}`). Blocks of a kind are identical (3072 "
        "wide, 24 heads × 128, rotary embeddings; double-stream: separate image and text projections, single-stream: "
        "one projection over [text | image] fused with the MLP), so each kind's per-block ratio carries to the full "
        f"depth. The whole-forward ratio does not carry as it stands: here it weights the kinds {double}:{single} and "
        f"counts the layers outside the blocks (embedders, rotary tables, final layer) once; the full model weights "
        f"the kinds {full_double}:{full_single}. That is what *est. full depth* does (below)."
    )


ARCHITECTURES: dict[str, Architecture] = {
    "sd3": Architecture(
        name="sd3", title="SD3-medium architecture SD3Transformer2DModel (published config, random weights)",
        config=SD3_MEDIUM_CONFIG, tiny_config=TINY_SD3_CONFIG,
        kinds=(BlockKind("joint", "transformer_blocks", "num_layers"),), cpu_layers=(2,),
        build=build_sd3, pipeline=sd3_pipeline, inputs=sd3_inputs, announce=sd3_announce,
        depth_note=sd3_depth_note, stock_processor="JointAttnProcessor2_0", cfg=True,
        text_tokens=SD3_TEXT_TOKENS, tiny_text_tokens=77 + 16,
    ),
    "flux": Architecture(
        name="flux", title="Flux.1-dev architecture FluxTransformer2DModel (published config, random weights)",
        config=FLUX_DEV_CONFIG, tiny_config=TINY_FLUX_CONFIG,
        kinds=(BlockKind("double-stream", "transformer_blocks", "num_layers"),
               BlockKind("single-stream", "single_transformer_blocks", "num_single_layers")),
        cpu_layers=(1, 1), build=build_flux, pipeline=flux_pipeline, inputs=flux_inputs, announce=flux_announce,
        depth_note=flux_depth_note, stock_processor="FluxAttnProcessor", cfg=False,
        text_tokens=FLUX_TEXT_TOKENS, tiny_text_tokens=16, gpu_dtype="bfloat16", pack=2,
    ),
}


# ---- the cases ------------------------------------------------------------------------------------------------
class BlockClock:
    """Time spent inside the blocks of each kind, per forward, by forward (pre-)hooks on the blocks; ``take()``
    returns the last forward's ``{kind: seconds}`` and starts again. CPU only (no device sync)."""

    def __init__(self, model: torch.nn.Module, kinds: tuple[BlockKind, ...], clock: str):
        self.now = CLOCKS[clock]
        self.blocks = {kind.name: list(getattr(model, kind.attribute)) for kind in kinds}
        self.totals = dict.fromkeys(self.blocks, 0.0)
        self.handles: list = []
        self._start = 0.0

    def _enter(self, *_):
        self._start = self.now()

    def _leave(self, kind: str):
        def leave(*_):
            self.totals[kind] += self.now() - self._start

        return leave

    @contextlib.contextmanager
    def installed(self):
        try:
            for kind, blocks in self.blocks.items():
                for block in blocks:
                    self.handles.append(block.register_forward_pre_hook(self._enter))
                    self.handles.append(block.register_forward_hook(self._leave(kind)))
            yield self
        finally:
            for handle in self.handles:
                handle.remove()
            self.handles.clear()

    def take(self) -> dict[str, float]:
        totals, self.totals = self.totals, dict.fromkeys(self.blocks, 0.0)
        return totals


@dataclass
class Bench:
    """One architecture at one size and depth, ready to time."""

    arch: Architecture
    model: torch.nn.Module
    pipe: Any
    size: int
    layers: tuple[int, ...]  # blocks built, one count per kind (arch.kinds)
    device: str
    text_tokens: int
    inputs: dict[int, dict] = field(default_factory=dict)  # batch -> forward kwargs
    clock: BlockClock | None = None  # set while block times are taken
    block_times: dict[str, list[dict[str, float]]] = field(default_factory=dict)  # case -> one dict per forward

    def forward(self, batch: int, name: str) -> Callable[[], object]:
        """Case ``name``'s timed call: one forward on ``batch`` rows (and its block times, while a clock runs)."""
        if batch not in self.inputs:
            self.inputs[batch] = self.arch.inputs(self.model, self.size, batch, self.text_tokens)
        inputs = self.inputs[batch]

        def run():
            out = self.model(**inputs)
            if self.clock is not None:
                self.block_times.setdefault(name, []).append(self.clock.take())
            return out

        return run

    def session(self, prompts: list[str], make: Callable[[], Any]) -> Callable[[], contextlib.AbstractContextManager]:
        """A context factory: a fresh session from ``make()`` (``pc.control`` / ``pc.trace``), told its call."""

        @contextlib.contextmanager
        def context():
            with make() as session:
                self.arch.announce(self.pipe, prompts, self.arch.steps)
                yield session

        return context


def make_bench(arch: Architecture, size: int, layers: tuple[int, ...], device: str, dtype: torch.dtype,
               tiny: bool) -> Bench:
    """``arch`` (its published config, or the tiny one) with ``layers`` blocks of each kind, random weights, in its
    pipeline."""
    check_size(arch, size, tiny)
    check_layers(arch, layers)
    config = {**(arch.tiny_config if tiny else arch.config),
              **{kind.config_key: n for kind, n in zip(arch.kinds, layers)}}
    model = arch.build(config, dtype, device)
    text_tokens = arch.tiny_text_tokens if tiny else arch.text_tokens
    return Bench(arch, model, arch.pipeline(model, text_tokens), size, tuple(layers), device, text_tokens)


def check_layers(arch: Architecture, layers: tuple[int, ...]) -> None:
    """One block count per kind, none negative, at least one block in all."""
    kinds = ",".join(kind.name for kind in arch.kinds)
    full = ",".join(map(str, arch.full_layers()))
    if len(layers) != len(arch.kinds):
        raise ValueError(f"--layers {','.join(map(str, layers))}: {arch.name} takes {len(arch.kinds)} block "
                         f"count(s), {kinds} (the full model: --layers {full})")
    if min(layers) < 0 or sum(layers) < 1:
        raise ValueError(f"--layers must give at least 1 block and no negative count (got "
                         f"{','.join(map(str, layers))}); the full {arch.name} model has --layers {full} ({kinds})")


def check_size(arch: Architecture, size: int, tiny: bool) -> None:
    """The image side must give whole patches (and fit the position embedding table where there is one)."""
    config = arch.tiny_config if tiny else arch.config
    step = arch.vae_scale * arch.pack * config["patch_size"]
    table = config.get("pos_embed_max_size")
    largest = table * step if table else None
    if size % step or size < step or (largest and size > largest):
        packing = f", packed {arch.pack}×{arch.pack}" if arch.pack > 1 else ""
        bound = (f" between {step} and {largest} (pos_embed_max_size {table})" if largest else
                 f", at least {step} (rotary embeddings: no upper bound)")
        raise ValueError(f"--size {size}: {arch.name} needs a multiple of {step} (VAE ×{arch.vae_scale}{packing}, "
                         f"patch {config['patch_size']}){bound}")


def image_tokens(arch: Architecture, size: int, patch_size: int) -> int:
    return (size // (arch.vae_scale * arch.pack * patch_size)) ** 2


def transformer_cases(bench: Bench) -> list[Entry]:
    """Every mode in two groups, stock first in each: 1 prompt (+ CFG rows), and source + edit (+ CFG rows)."""
    from promptcontrol.controllers.inject import InjectSelf

    pipe, rows = bench.pipe, 2 if bench.arch.cfg else 1

    def control(prompts, *make):  # fresh controllers for every timing, built outside the timed region
        return bench.session(prompts, lambda: pc.control(pipe, *(m() for m in make)))

    def case(name, batch, context=contextlib.nullcontext):
        return Case(name, bench.forward(batch, name), context)

    cfg = " + CFG" if bench.arch.cfg else ""
    g1, g2 = f"1 prompt{cfg} (batch {rows})", f"source + edit{cfg} (batch {2 * rows})"
    s1, s2 = f"stock {bench.arch.stock_processor}", f"stock {bench.arch.stock_processor}, 2 prompts"
    return [
        Entry(case(s1, rows), s1, None, g1),
        Entry(case("pass-through (pc.control + PassThrough, all sites)", rows, control([PROMPT], pc.PassThrough)),
              s1, "pass-through", g1),
        Entry(case("record: pc.trace default store", rows, bench.session([PROMPT], lambda: pc.trace(pipe))),
              s1, "record", g1),
        Entry(case("reweight: Reweight({'red': 2.0})", rows, control([PROMPT], lambda: pc.Reweight({"red": 2.0}))),
              s1, "reweight", g1),
        Entry(case(s2, 2 * rows), s2, None, g2),
        Entry(case("edit: Replace + self injection (every site)", 2 * rows,
                   control([SOURCE, EDIT], lambda: pc.Replace(1.0), lambda: InjectSelf(1.0))), s2, "edit", g2),
    ]


# ---- measuring ------------------------------------------------------------------------------------------------
def spread(ratios: list[float]) -> dict:
    return dict(ratio=statistics.median(ratios), ratio_min=min(ratios), ratio_max=max(ratios))


def per_group_ratios(results: list[Result], entries: list[Entry]) -> list[dict]:
    """Each result against its group's stock case: median / min / max of per-round ratios, and best of N."""
    by_name = {r.name: r for r in results}
    rows = []
    for entry, r in zip(entries, results):
        base = by_name[entry.baseline]
        rows.append(dict(
            name=r.name, group=entry.group, baseline=entry.baseline,
            best_s=min(r.times_s), median_s=statistics.median(r.times_s),
            best_ratio=min(r.times_s) / min(base.times_s),
            **spread([t / b for t, b in zip(r.times_s, base.times_s)]),
            peak_mb=r.peak_mb, peak_ratio=(r.peak_mb / base.peak_mb) if r.peak_mb and base.peak_mb else None,
            times_s=r.times_s,
        ))
    return rows


def full_depth_time(total: float, blocks: dict[str, float], measured: dict[str, int], full: dict[str, int]) -> float:
    """One forward recomposed at the full depth: the time outside the blocks once, plus each kind's per-block time
    × its full count (a kind must have been measured)."""
    outside = total - sum(blocks.values())
    return outside + sum(blocks[kind] / measured[kind] * full[kind] for kind in blocks)


def add_block_ratios(bench: Bench, rows: list[dict], repeats: int) -> None:
    """Per-kind block ratios (time inside the blocks of a kind against stock's, per round) and the full-depth
    estimate per round, from the last ``repeats`` forwards of each case (the timed rounds, after the warm-up)."""
    measured = {kind.name: n for kind, n in zip(bench.arch.kinds, bench.layers)}
    full = dict(zip(measured, bench.arch.full_layers()))
    timed = {name: times[-repeats:] for name, times in bench.block_times.items()}
    totals = {row["name"]: row["times_s"] for row in rows}
    for row in rows:
        mine, base = timed[row["name"]], timed[row["baseline"]]
        row["block_s"] = mine
        row["blocks"] = {kind: spread([m[kind] / b[kind] for m, b in zip(mine, base)])
                         for kind, n in measured.items() if n}
        if all(measured.values()):
            rounds = zip(totals[row["name"]], totals[row["baseline"]], mine, base)
            row["full_depth"] = spread([full_depth_time(t, m, measured, full) / full_depth_time(tb, b, measured, full)
                                        for t, tb, m, b in rounds])


def cpu_peaks(bench: Bench, entries: list[Entry], rows: list[dict]) -> None:
    """CPU: peak live tensor bytes of one more, untimed run per case (weights and inputs excluded)."""
    peaks = {e.case.name: cpu_peak_bytes(e.case, bench.model, list(bench.inputs.values())) for e in entries}
    for entry, row in zip(entries, rows):
        row["peak_mb"] = peaks[entry.case.name] / 2**20
        row["peak_ratio"] = peaks[entry.case.name] / peaks[entry.baseline] if peaks[entry.baseline] else None


def check_installed_nothing(bench: Bench, before: dict) -> None:
    """Every mode's session restored the stock processors and left no hooks (else the ratios would lie)."""
    after = {k: type(v).__name__ for k, v in bench.model.attn_processors.items()}
    hooked = [m for m in bench.model.modules() if m._forward_pre_hooks or m._forward_hooks]
    if after != before or hooked:
        raise RuntimeError(f"a benchmark session left something installed on the {bench.arch.name} transformer")


def takes_block_times(args: argparse.Namespace, arch: Architecture) -> bool:
    """Block times where they are needed and cheap: on the CPU clock, with fewer blocks than the published model."""
    return args.clock == "cpu" and tuple(args.layers) != arch.full_layers()


# ---- the report -----------------------------------------------------------------------------------------------
def depth_note(bench: Bench, tiny: bool) -> str:
    described = bench.arch.layers_text(bench.layers)
    if tiny:
        return f"Tiny config ({described}): a smoke run, not a measurement of the {bench.arch.name} architecture."
    if bench.layers == bench.arch.full_layers():
        return f"Measured: all {described} of the {bench.arch.title.split(' (')[0]}."
    return bench.arch.depth_note(bench)


def block_note(arch: Architecture) -> str:
    counts = " + ".join(f"{n} × {kind.name}" for n, kind in zip(arch.full_layers(), arch.kinds))
    return (
        "*Block* columns: the CPU time inside the blocks of that kind (forward hooks on each block) over stock's, "
        "per round, median (min–max); blocks of a kind are identical, so this per-block ratio is the full "
        f"model's for that kind. *est. full depth*: each round's forward recomposed as outside the blocks + {counts} "
        "per-block time, over stock's recomposed the same way — the whole-transformer ratio of the published "
        "depth, on the assumption (true of identical blocks) that every block of a kind costs what the measured "
        "ones did. Work a session does at its first attention call counts in the first block and is multiplied "
        "with it, so the estimate leans high if anything."
    )


def megabytes(mb: float) -> str:
    return f"{mb:,.0f} MB" if mb >= 10 else f"{mb:.2f} MB"


def ratio_text(r: dict | None) -> str:
    return "—" if r is None else f"{r['ratio']:.3f} ({r['ratio_min']:.3f}–{r['ratio_max']:.3f})"


def table(title: str, rows: list[dict], unit: str, kinds: list[str]) -> str:
    """The Markdown table; ``kinds``: the block kinds with block columns (none: no block times taken)."""
    extra = [f"{kind} block ratio" for kind in kinds] + (["est. full depth ratio"] if kinds else [])
    head = ["case", f"best time / {unit}", "ratio to stock, best of N", "median per-round ratio (min–max)", *extra,
            "peak memory"]
    lines = [f"**{title}**", "", "| " + " | ".join(head) + " |", "| --- |" + " ---: |" * (len(head) - 1)]
    group = None
    for row in rows:
        if row["group"] != group:
            group = row["group"]
            lines.append(f"| *{group}* |" + " |" * (len(head) - 1))
        peak = "—" if row["peak_mb"] is None else f"{megabytes(row['peak_mb'])} ({row['peak_ratio']:.2f}×)"
        blocks = [ratio_text(row["blocks"].get(kind)) for kind in kinds]
        blocks += [ratio_text(row.get("full_depth"))] if kinds else []
        cells = [row["name"], f"{row['best_s'] * 1000:,.1f} ms", f"{row['best_ratio']:.3f}", ratio_text(row), *blocks,
                 peak]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_layers(text: str) -> tuple[int, ...]:
    """``"2"`` or ``"1,1"`` → block counts (argparse type)."""
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: block counts, N or D,S (e.g. 2 for SD3, 1,1 for Flux)")


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="sd3", choices=sorted(ARCHITECTURES))
    parser.add_argument("--gpu", action="store_true", help="CUDA at 1024², every block (SD3 float16, Flux bfloat16)")
    parser.add_argument("--device", help="cpu or cuda (default: cuda with --gpu, else cpu)")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--size", type=int, help="image side (default 512 on the CPU, 1024 on CUDA, 64 with --tiny)")
    parser.add_argument(
        "--layers", type=parse_layers, help="blocks to build: SD3 N joint blocks (default 2 on the CPU, 24 on "
        "CUDA); Flux D,S double- and single-stream blocks (default 1,1 on the CPU, 19,38 on CUDA)")
    parser.add_argument("--repeats", type=int, help="interleaved timed rounds (default 5 on the CPU, 10 on CUDA)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--clock", choices=["wall", "cpu"], help="default: cpu on the CPU, wall on CUDA")
    parser.add_argument("--no-memory", action="store_true", help="CPU: skip the peak-memory runs (1 more run each)")
    parser.add_argument("--tiny", action="store_true", help="the architecture's tiny config (smoke test, seconds)")
    parser.add_argument("--out", help="path prefix (default benchmarks/results/<arch>); -<device>-<dtype> is added")
    args = parser.parse_args(argv)
    arch = ARCHITECTURES[args.arch]
    cuda = (args.device or ("cuda" if args.gpu else "cpu")).startswith("cuda")
    args.device = args.device or ("cuda" if cuda else "cpu")
    args.dtype = args.dtype or (arch.gpu_dtype if cuda else "float32")
    if args.size is None:
        args.size = 64 if args.tiny else 1024 if cuda else 512
    if args.layers is None:
        args.layers = arch.cpu_layers if args.tiny or not cuda else arch.full_layers()
    if args.repeats is None:
        args.repeats = 2 if args.tiny else 10 if cuda else 5
    args.clock = args.clock or ("wall" if cuda else "cpu")
    args.out = args.out or f"benchmarks/results/{arch.name}"
    if args.repeats < 1 or args.warmup < 0:
        parser.error(f"--repeats must be at least 1 and --warmup at least 0 (got {args.repeats}, {args.warmup})")
    return args


def measure(bench: Bench, args: argparse.Namespace) -> list[dict]:
    """Time every mode interleaved (with block times where :func:`takes_block_times`), then peak memory."""
    entries = transformer_cases(bench)
    cases = [e.case for e in entries]
    timing = dict(repeats=args.repeats, warmup=args.warmup, device=args.device, clock=args.clock,
                  progress=not args.tiny)
    if takes_block_times(args, bench.arch):
        bench.clock = BlockClock(bench.model, bench.arch.kinds, args.clock)
        try:
            with bench.clock.installed():
                rows = per_group_ratios(compare(cases, **timing), entries)
        finally:
            bench.clock = None
        add_block_ratios(bench, rows, args.repeats)
    else:
        rows = per_group_ratios(compare(cases, **timing), entries)
    if args.device == "cpu" and not args.no_memory:
        cpu_peaks(bench, entries, rows)
    return rows


def run(args: argparse.Namespace) -> tuple[str, dict]:
    """Build, time every mode interleaved, and return (Markdown, payload)."""
    arch = ARCHITECTURES[args.arch]
    dtype = getattr(torch, args.dtype)
    bench = make_bench(arch, args.size, args.layers, args.device, dtype, args.tiny)
    before = {k: type(v).__name__ for k, v in bench.model.attn_processors.items()}
    rows = measure(bench, args)
    check_installed_nothing(bench, before)
    latent = args.size // arch.vae_scale
    tokens = image_tokens(arch, args.size, bench.model.config.patch_size)
    packed = f" → packed {arch.pack}×{arch.pack}" if arch.pack > 1 else ""
    title = (
        f"{f'tiny {arch.name} config' if args.tiny else arch.title}, {args.size}×{args.size} (latent "
        f"{latent}×{latent}{packed} → {tokens} image tokens, text {bench.text_tokens} tokens), "
        f"{arch.layers_text(bench.layers)}, {args.dtype}, one transformer forward per timing, {args.clock} clock, "
        f"{args.repeats} interleaved rounds after {args.warmup} warm-up — {machine()}"
    )
    memory = ("peak CUDA memory per case (allocator)" if args.device.startswith("cuda") else
              "peak memory: live tensor bytes of one more, untimed run per case (weights and inputs excluded)"
              if not args.no_memory else "peak memory: not measured (--no-memory)")
    layout = "prompts, CFG" if arch.cfg else "prompts, no CFG rows"
    kinds = [kind.name for kind, n in zip(arch.kinds, bench.layers) if n] if takes_block_times(args, arch) else []
    notes = [
        depth_note(bench, args.tiny),
        *([block_note(arch)] if kinds else []),
        "Ratios are to the stock case of the same group (same rows). *best of N*: the case's fastest round over "
        "stock's fastest; *median per-round ratio*: the median of the N rounds' ratios, with their min–max. "
        f"Each session is entered and told its call ({layout}, {arch.steps} steps) outside the timed region; "
        "per-run work the controllers do at step 0 (resolving words, aligning prompts) is inside it. " + memory + ".",
    ]
    markdown = "\n\n".join([table(title, rows, "forward", kinds), *notes])
    config = {**(arch.tiny_config if args.tiny else arch.config),
              **{kind.config_key: n for kind, n in zip(arch.kinds, bench.layers)}}
    payload = dict(arch=arch.name, config=config, full_layers=dict(zip([k.name for k in arch.kinds],
                   arch.full_layers())), image_tokens=tokens, text_tokens=bench.text_tokens, title=title,
                   notes=notes, rows=rows)
    return markdown, payload


def main(argv: list[str] | None = None) -> str:
    args = parse(argv)
    markdown, payload = run(args)
    device = "cuda" if args.device.startswith("cuda") else args.device
    out = Path(f"{args.out}-{device}-{args.dtype}")
    out.parent.mkdir(parents=True, exist_ok=True)
    text = f"Machine: {machine()}\n\n{markdown}\n"
    out.with_suffix(".md").write_text(text)
    out.with_suffix(".json").write_text(json.dumps({"machine": machine(), "args": vars(args), **payload}, indent=2))
    print(text, flush=True)
    return text


if __name__ == "__main__":
    main()

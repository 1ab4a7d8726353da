"""Cost of a prompt-to-prompt edit (1 source + 1 edit) against stock diffusers generating the same 2 prompts.

A ``StableDiffusionPipeline`` around an SD 1.5-architecture UNet (published config, random weights) with a small
random text encoder (768 wide, so the UNet accepts it) and output ``latent`` (no VAE decode): the timed call is
``pipe([source, edit], latents=..., num_inference_steps=--steps)`` — text encoding, ``--steps`` UNet calls of
batch 4 (CFG) and the scheduler. Cases, interleaved after warm-up (``benchmarks/harness.py``):

* stock diffusers (``AttnProcessor2_0``, SDPA) — the baseline;
* ``pc.edit``'s controllers with every step inside both windows (Replace on every cross site, source
  self-attention injected at the two coarsest levels) — the worst case, fused on SDPA;
* the same plus ``LocalBlend`` (records probabilities at the blend sites only, masks the latents each step);
* stock diffusers with the classic ``AttnProcessor`` at every layer (explicit softmax, what prompt-to-prompt's
  attention hook needs), and an explicit prompt-to-prompt processor that also edits the materialised maps.

CPU:  ``python -m benchmarks.edit`` (256×256, latent 32×32)      GPU: ``--device cuda --dtype float16 --size 512``
"""

from __future__ import annotations

import argparse
import contextlib

import torch

import promptcontrol as pc
from promptcontrol.alignment import replace_map
from promptcontrol.controllers.inject import InjectSelf, default_self_levels
from promptcontrol.editing import AutoEdit
from promptcontrol.tokens import tokenize

from .harness import Case, compare, machine, markdown_table, save
from .models import sd15_unet

SOURCE = "a photo of a red car parked on a street"
EDIT = "a photo of a blue car parked on a street"


def build_pipeline(unet):
    """An SD pipeline around ``unet`` with a small random text encoder of the UNet's cross-attention width."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    param = next(unet.parameters())
    text = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408, hidden_size=unet.config.cross_attention_dim, intermediate_size=1024,
            num_hidden_layers=1, num_attention_heads=4, max_position_embeddings=77,
            bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
        )
    ).to(param).eval()
    vae = AutoencoderKL(  # never run (output_type="latent"); four blocks give the usual scale factor 8
        block_out_channels=(4, 4, 4, 4), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, norm_num_groups=2, layers_per_block=1,
    ).to(param)
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text, tokenizer=pc.testing.clip_tokenizer(), unet=unet,
        scheduler=DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1,
                                clip_sample=False, set_alpha_to_one=False),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


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


@contextlib.contextmanager
def processors(unet, make):
    """Install ``make(key)`` at every attention site for the block; restore the previous processors after."""
    saved = dict(unet.attn_processors)
    unet.set_attn_processor({k: make(k) for k in saved})
    try:
        yield
    finally:
        unet.set_attn_processor(dict(saved))


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=1, help="denoising steps per timed call")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--out", default="benchmarks/results/edit")
    args = parser.parse_args(argv)

    from diffusers.models.attention_processor import AttnProcessor

    dtype = getattr(torch, args.dtype)
    unet = sd15_unet(dtype=dtype, device=args.device)
    pipe = build_pipeline(unet)
    prompts = [SOURCE, EDIT]
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, args.size // 8, args.size // 8, generator=g).repeat(2, 1, 1, 1).to(args.device, dtype)

    def generate():
        return pipe(prompts, latents=latents, num_inference_steps=args.steps, output_type="latent")

    sites = pc.find_sites(unet)
    levels = default_self_levels(sites)
    side = args.size // 8
    max_queries = (-(-side // 2 ** min(levels))) ** 2  # the explicit processor injects at the same levels
    mapper = replace_map(*(tokenize(pipe.tokenizer, p) for p in prompts)).matrix
    explicit_keys = {s.key: s for s in sites}

    def explicit_edit(key):
        site = explicit_keys.get(key)
        return ExplicitEditProcessor(site is not None and site.is_cross, mapper, (3, 2), max_queries)

    def edit_controllers(blend: bool):
        controllers = [AutoEdit(1.0), InjectSelf(1.0)]
        if blend:
            controllers.append(pc.LocalBlend([["red"], ["blue"]], start=0.0))
        return lambda: pc.control(pipe, *controllers)

    cases = [
        Case("stock diffusers (SDPA), 2 prompts", generate),
        Case("pc.edit controllers (replace + self injection, every step)", generate, edit_controllers(False)),
        Case("pc.edit controllers + LocalBlend", generate, edit_controllers(True)),
        Case("classic AttnProcessor everywhere (explicit softmax)", generate, lambda: processors(unet, lambda k: AttnProcessor())),
        Case("explicit prompt-to-prompt (softmax + map edits)", generate, lambda: processors(unet, explicit_edit)),
    ]
    results = compare(cases, repeats=args.repeats, device=args.device)
    title = (
        f"1 source + 1 edit, SD 1.5 UNet, {args.size}×{args.size}, CFG (UNet batch 4), {args.steps} step(s) per call, "
        f"{args.dtype}, {machine()}"
    )
    table = markdown_table(title, results, {cases[1].name: 1.05, cases[2].name: 1.05})
    save(f"{args.out}-{args.device}-{args.dtype}-{args.size}", title, results)
    print(table)
    return table


if __name__ == "__main__":
    main()

"""``pc.invert``: turn a real image into starting noise (and per-step null embeddings) that the pipeline redraws.

Two methods, both on a DDIM scheduler built from the pipeline's own scheduler config (the pipeline's scheduler
need not be DDIM); their maths is in :mod:`promptcontrol.ddim`:

* ``"ddim"``: encode the image with the VAE (``latent_dist.mean × scaling_factor``) and run the deterministic
  DDIM update backwards with the conditional noise prediction (guidance 1). Every latent of the trajectory is
  kept: ``inv.latents[0]`` is the encoded image, ``inv.latents[-1]`` is x_T. Sampling from x_T reconstructs the
  image well at guidance 1 but drifts at guidance 7.5.
* ``"null-text"`` (Mokady et al. 2022): after the DDIM inversion, walk the sampling steps forwards and optimise
  the *unconditional* text embedding of each step with Adam so that the guided DDIM step lands on the inversion
  trajectory's next latent (the schedules of rate and early stop: :mod:`promptcontrol.ddim`).

This module is the job: image input, the pipeline's VAE and prompt encoding, :func:`invert`, and the result
:class:`Inversion` with its save / load. Reconstruction and edits run the *pipeline itself* from x_T:
:class:`~promptcontrol.controllers.inversion_guidance.InversionGuidance` swaps in the DDIM scheduler for the call
(the session restores it) and writes ``null_embeddings[i]`` into every unconditional row's text features at step
``i``, so any controller (``pc.trace``, ``pc.Replace``, ``pc.LocalBlend``...) composes with it, and
``pc.edit(pipe, inv, "edited prompt", ...)`` edits the real image.
"""

from __future__ import annotations

import inspect
import math
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .controllers.base import Controller
from .controllers.inversion_guidance import InversionGuidance
from .ddim import DDIMSteps, _Text, ddim_trajectory, null_text_optimisation
from .images import float_array, prepare_image  # noqa: F401  (prepare_image: part of this module's face)

METHODS = ("null-text", "ddim")


def psnr(a, b) -> float:
    """Peak signal-to-noise ratio in dB between two images (PIL, uint8 / [0, 1] float arrays, [0, 1] tensors).

    Both are read as RGB in [0, 1]; identical images give ``inf``.
    """
    x, y = float_array(a), float_array(b)
    if x.shape != y.shape:
        raise ValueError(f"psnr needs images of the same shape, got {x.shape} and {y.shape}")
    mse = float(np.mean((x - y) ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(1.0 / mse)


def size_multiple(pipe) -> int:
    """The multiple image sides must have: 8 (the pipelines' check) and the VAE's downsampling factor."""
    factor = int(getattr(pipe, "vae_scale_factor", 8) or 8)
    return math.lcm(8, factor)


def _check_pipe(pipe) -> None:
    missing = [name for name in ("unet", "vae", "encode_prompt", "scheduler") if getattr(pipe, name, None) is None]
    if missing:
        raise TypeError(
            f"pc.invert needs a Stable Diffusion pipeline (unet, vae, text encoder, scheduler); "
            f"{type(pipe).__name__} lacks {', '.join(missing)}"
        )
    if "image" in inspect.signature(pipe.__call__).parameters:
        raise TypeError(
            f"pc.invert reconstructs and edits with a text-to-image pipeline, got {type(pipe).__name__}; build one from "
            "the same components: StableDiffusionPipeline(**pipe.components) (or StableDiffusionXLPipeline)"
        )


def _is_sdxl(pipe) -> bool:
    return getattr(pipe.unet.config, "addition_embed_type", None) == "text_time"


def _device(pipe) -> torch.device:
    device = getattr(pipe, "_execution_device", None)
    return torch.device(device) if device is not None else pipe.unet.device


def _encode_text(pipe, prompt: str, height: int, width: int) -> _Text:
    """The pipeline's own prompt encoding (with guidance, as a pipeline call does with no negative prompt)."""
    device = _device(pipe)
    if _is_sdxl(pipe):
        cond, uncond, pooled, pooled_uncond = pipe.encode_prompt(
            prompt=prompt, device=device, num_images_per_prompt=1, do_classifier_free_guidance=True
        )
        projection = int(pooled.shape[-1])
        time_ids = pipe._get_add_time_ids(
            (height, width), (0, 0), (height, width), dtype=cond.dtype, text_encoder_projection_dim=projection
        ).to(device)
        return _Text(
            cond, uncond, {"text_embeds": pooled, "time_ids": time_ids}, {"text_embeds": pooled_uncond, "time_ids": time_ids}
        )
    cond, uncond = pipe.encode_prompt(prompt=prompt, device=device, num_images_per_prompt=1, do_classifier_free_guidance=True)
    return _Text(cond, uncond)


def _vae_encode(pipe, image, seed: int | None) -> torch.Tensor:
    """(1, C, h, w) float32 latent of a PIL image: ``(latent_dist.mean − shift) × scaling_factor``."""
    vae = pipe.vae
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)[None]
    upcast = vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False)
    dtype = torch.float32 if upcast else vae.dtype
    original = vae.dtype
    try:
        if upcast:
            vae.to(torch.float32)
        dist = vae.encode(x.to(device=vae.device, dtype=dtype)).latent_dist
        if seed is None:
            latent = dist.mean
        else:
            latent = dist.sample(generator=torch.Generator(vae.device).manual_seed(int(seed)))
    finally:
        if upcast:
            vae.to(original)
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return ((latent.float() - shift) * vae.config.scaling_factor).to(_device(pipe))


def decode_latents(pipe, latents: torch.Tensor):
    """PIL images from (B, C, h, w) latents, as the pipeline decodes them (VAE upcast in fp16 when it must be)."""
    vae = pipe.vae
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    upcast = vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False)
    original = vae.dtype
    try:
        if upcast:
            vae.to(torch.float32)
        z = latents.float() / vae.config.scaling_factor + shift
        image = vae.decode(z.to(device=vae.device, dtype=vae.dtype), return_dict=False)[0]
    finally:
        if upcast:
            vae.to(original)
    return pipe.image_processor.postprocess(image.detach(), output_type="pil")


# ---- the result ----------------------------------------------------------------------------------------------------
@dataclass
class Inversion:
    """What :func:`invert` found for one image.

    prompt:          the prompt the image was inverted with (the source prompt of every edit)
    method:          ``"null-text"`` or ``"ddim"``
    latents:         (steps + 1, C, h, w) float32 trajectory: ``latents[0]`` the encoded image, ``latents[-1]`` x_T
    null_embeddings: (steps, K, D): the unconditional text features of each sampling step (``"ddim"``: the
                     pipeline's own negative embedding at every step)
    timesteps:       the DDIM timesteps of the sampling steps
    guidance_scale:  the guidance the null embeddings were fitted for
    image:           the input as used (RGB, after any resize)
    losses:          null-text: the last inner loss of each step (latent MSE); ``"ddim"``: empty
    reconstruction:  the image sampled back from x_T by the pipeline (``None`` with ``reconstruct=False``)
    reconstruction_latents: (1, C, h, w) the latent that sampling ended on
    """

    prompt: str
    method: str
    latents: torch.Tensor
    null_embeddings: torch.Tensor
    timesteps: list[int]
    guidance_scale: float
    image: Any
    scheduler_config: dict = field(repr=False, default_factory=dict)
    losses: list[float] = field(default_factory=list, repr=False)
    reconstruction: Any = field(default=None, repr=False)
    reconstruction_latents: torch.Tensor | None = field(default=None, repr=False)

    @property
    def steps(self) -> int:
        return len(self.timesteps)

    @property
    def x_T(self) -> torch.Tensor:
        """(1, C, h, w): the inverted starting noise."""
        return self.latents[-1:]

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of the image."""
        return tuple(self.image.size)

    @property
    def latent_hw(self) -> tuple[int, int]:
        return (int(self.latents.shape[-2]), int(self.latents.shape[-1]))

    def psnr(self, other=None) -> float:
        """PSNR (dB) of the reconstruction (or ``other``) against the input image."""
        target = self.reconstruction if other is None else other
        if target is None:
            raise ValueError("this inversion has no reconstruction (reconstruct=False); call inv.reconstruct(pipe)")
        return psnr(self.image, target)

    def latent_error(self) -> float:
        """Mean squared error between the reconstruction's final latent and the encoded image's latent."""
        if self.reconstruction_latents is None:
            raise ValueError("this inversion has no reconstruction (reconstruct=False); call inv.reconstruct(pipe)")
        return float(F.mse_loss(self.reconstruction_latents.float().cpu(), self.latents[:1].float().cpu()))

    def controller(self) -> "InversionGuidance":
        """The controller that makes a pipeline call sample from this inversion (see :class:`InversionGuidance`)."""
        return InversionGuidance(self)

    def pipe_kwargs(self, pipe, prompts: int = 1) -> dict:
        """Pipeline-call arguments that start ``prompts`` prompts from x_T with the inversion's steps and guidance."""
        latents = self.x_T.to(device=_device(pipe), dtype=pipe.unet.dtype).repeat(prompts, 1, 1, 1)
        w, h = self.size
        return dict(
            latents=latents, num_inference_steps=self.steps, guidance_scale=self.guidance_scale, height=h, width=w
        )

    def reconstruct(self, pipe, *controllers: Controller):
        """Sample the image back from x_T with the pipeline (plus any ``controllers``); sets and returns
        ``reconstruction``."""
        from .session import control

        with torch.no_grad(), control(pipe, self.controller(), *controllers):
            out = pipe(prompt=self.prompt, output_type="latent", **self.pipe_kwargs(pipe))
        latents = out.images if hasattr(out, "images") else out[0]
        self.reconstruction_latents = latents.detach().float()
        with torch.no_grad():
            self.reconstruction = decode_latents(pipe, latents)[0]
        return self.reconstruction

    def save(self, path: str | os.PathLike) -> None:
        """Write the inversion to one file (``torch.save`` of tensors and plain values; load with :meth:`load`)."""
        def image_tensor(image):
            return None if image is None else torch.from_numpy(np.array(image.convert("RGB"), dtype=np.uint8))

        torch.save(
            {
                "format": "promptcontrol.Inversion/1", "prompt": self.prompt, "method": self.method,
                "latents": self.latents.detach().cpu(), "null_embeddings": self.null_embeddings.detach().cpu(),
                "timesteps": list(self.timesteps), "guidance_scale": self.guidance_scale,
                "scheduler_config": _plain(self.scheduler_config), "losses": list(self.losses),
                "image": image_tensor(self.image), "reconstruction": image_tensor(self.reconstruction),
                "reconstruction_latents": None if self.reconstruction_latents is None else self.reconstruction_latents.cpu(),
            },
            path,
        )

    @classmethod
    def load(cls, path: str | os.PathLike, device: torch.device | str = "cpu") -> "Inversion":
        """Read an inversion written by :meth:`save` (tensors moved to ``device``)."""
        from PIL import Image

        data = torch.load(path, map_location=device, weights_only=True)
        if not isinstance(data, dict) or data.get("format") != "promptcontrol.Inversion/1":
            raise ValueError(f"{path} is not an inversion saved by Inversion.save")

        def image(t):
            return None if t is None else Image.fromarray(t.cpu().numpy())

        return cls(
            prompt=data["prompt"], method=data["method"], latents=data["latents"],
            null_embeddings=data["null_embeddings"], timesteps=list(data["timesteps"]),
            guidance_scale=float(data["guidance_scale"]), image=image(data["image"]),
            scheduler_config=dict(data["scheduler_config"]), losses=list(data["losses"]),
            reconstruction=image(data["reconstruction"]), reconstruction_latents=data["reconstruction_latents"],
        )

    def __repr__(self) -> str:
        w, h = self.size
        return (
            f"Inversion(method={self.method!r}, prompt={self.prompt!r}, steps={self.steps}, "
            f"guidance_scale={self.guidance_scale}, size={w}×{h})"
        )


def _plain(value):
    """A config as plain Python values (dicts, lists, numbers, strings, None) for ``torch.load(weights_only=True)``."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


# ---- pc.invert -----------------------------------------------------------------------------------------------------
def _half(pipe, half: bool | None) -> bool:
    if half is not None:
        return bool(half)
    return _device(pipe).type == "cuda" and pipe.unet.dtype == torch.float32


def invert(
    pipe,
    image,
    prompt: str,
    *,
    steps: int = 50,
    method: str = "null-text",
    guidance_scale: float = 7.5,
    inner_steps: int = 10,
    lr: float = 1e-2,
    early_stop: float = 1e-5,
    seed: int | None = None,
    progress: bool = True,
    half: bool | None = None,
    resize: bool | tuple[int, int] = False,
    reconstruct: bool = True,
) -> Inversion:
    """Invert a real image so that the pipeline draws it back from x_T (and edits it with ``pc.edit``).

    pipe:           a text-to-image Stable Diffusion pipeline (SD 1.x / 2.x / SDXL); its scheduler may be any kind
    image:          PIL image, path, uint8 array (H, W, 3) or [0, 1] float array / tensor; RGB, sides a multiple of 8
                    (and of the VAE's factor) unless ``resize`` (``True``: nearest multiple; ``(width, height)``)
    prompt:         a caption of the image; edits change this prompt
    steps:          DDIM steps (edits must use the same number)
    method:         ``"null-text"`` (Mokady et al.: faithful reconstruction at ``guidance_scale``) or ``"ddim"``
    guidance_scale: the guidance reconstruction and edits will use
    inner_steps, lr, early_stop: null-text optimisation: Adam iterations per step, learning rate at 50 steps, loss
                    threshold (see the module docstring for the schedules)
    seed:           ``None`` encodes the VAE posterior's mean (as the paper); a seed encodes a sample of it
    progress:       show a tqdm progress bar
    half:           run the null-text optimisation's UNet calls under float16 autocast (half the activation
                    memory); ``None``: on CUDA when the UNet is float32 (a float16 pipeline is half already)
    reconstruct:    sample the reconstruction right away (``inv.reconstruction``; costs one pipeline call)
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(repr(m) for m in METHODS)}, got {method!r}")
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be one caption string, got {type(prompt).__name__}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if method == "null-text":
        if guidance_scale <= 1:
            raise ValueError(
                f"null-text inversion fits the unconditional embedding, which guidance_scale={guidance_scale} "
                "(<= 1) never uses: use method='ddim', or a guidance_scale above 1"
            )
        if isinstance(inner_steps, bool) or not isinstance(inner_steps, int) or inner_steps < 0:
            raise ValueError(f"inner_steps must be an integer >= 0, got {inner_steps!r}")
        if not lr > 0:
            raise ValueError(f"lr must be positive, got {lr!r}")
    _check_pipe(pipe)
    picture = prepare_image(image, size_multiple(pipe), resize)
    width, height = picture.size
    ddim = DDIMSteps(pipe.scheduler.config, steps)
    with torch.no_grad():
        x0 = _vae_encode(pipe, picture, seed)
        text = _encode_text(pipe, prompt, height, width)
    trajectory = ddim_trajectory(pipe, x0, text, ddim, progress)
    losses: list[float] = []
    if method == "null-text":
        nulls, losses = null_text_optimisation(
            pipe, trajectory, text, ddim, guidance_scale=float(guidance_scale), inner_steps=inner_steps,
            lr=float(lr), early_stop=float(early_stop), progress=progress, half=_half(pipe, half),
        )
    else:
        nulls = text.uncond.detach()[0].repeat(steps, 1, 1)
    inv = Inversion(
        prompt=prompt,
        method=method,
        latents=trajectory.detach(),
        null_embeddings=nulls.detach(),
        timesteps=list(ddim.timesteps),
        guidance_scale=float(guidance_scale),
        image=picture,
        scheduler_config=ddim.config,
        losses=losses,
    )
    if reconstruct:
        inv.reconstruct(pipe)
    return inv

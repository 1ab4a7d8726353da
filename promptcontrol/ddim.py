"""The DDIM maths of ``pc.invert``: the deterministic DDIM step forwards and backwards, the DDIM inversion of a
latent, and the null-text optimisation (Mokady et al. 2022), on a UNet and its text inputs.

* DDIM inversion (:func:`ddim_trajectory`): the deterministic DDIM update (η = 0) run backwards with the
  conditional noise prediction (guidance 1), every latent kept: ``latents[0]`` is the encoded image,
  ``latents[-1]`` is x_T.
* Null-text optimisation (:func:`null_text_optimisation`): walk the sampling steps forwards; at step ``i``
  optimise the *unconditional* text embedding (started from the previous step's result, at step 0 from the
  pipeline's own negative embedding) with Adam so that the guided DDIM step from the current latent lands on the
  inversion trajectory's next latent::

      eps    = eps(x_i, t_i, null) + g · (eps(x_i, t_i, prompt) − eps(x_i, t_i, null))
      loss   = mse(ddim_step(eps, t_i, x_i), latents[T − i − 1])
      lr_i   = lr · (50 / steps) · (1 − i / (2 · steps))      the paper's 1e-2 · (1 − i/100) at 50 steps
      stop when loss < early_stop + 2e-5 · i · 50 / steps      the paper's threshold ε + 2e-5 · i at 50 steps

  ``lr`` is the rate at the paper's 50 steps: fewer, larger steps leave larger gaps to close, so the rate is
  scaled by 50 / steps (on the embedded model, 10 steps at 1e-2 reached 16.7 dB where 5e-2 reached 30.0 dB,
  the VAE's own round trip; 50 steps at 1e-2 also 30.0 dB).

  then ``x_{i+1}`` = the guided step with the optimised embedding. Only one step's graph exists at a time: the
  conditional prediction and everything between steps run under ``torch.no_grad()``, the UNet's parameters do
  not take gradients (no weight-gradient buffers), the embedding is a float32 leaf even when the UNet runs in
  fp16. On CUDA the optimisation's UNet calls run under float16 autocast (``half``) when the pipeline is float32;
  the step taken with the optimised embedding runs in the pipeline's own precision, so sampling follows it exactly.

Nothing here reads images or knows the pipeline beyond its ``unet``: :mod:`promptcontrol.inversion` is the job.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F


# ---- the UNet's inputs -------------------------------------------------------------------------------------------
@dataclass
class _Text:
    """What the UNet gets for the prompt and for the unconditional rows (SDXL: pooled text and time ids too)."""

    cond: torch.Tensor  # (1, K, D)
    uncond: torch.Tensor  # (1, K, D)
    added_cond: dict | None = None  # SDXL: {"text_embeds": (1, P), "time_ids": (1, 6)}
    added_uncond: dict | None = None


def _model_output(unet, latent: torch.Tensor, t, text: torch.Tensor, added: dict | None) -> torch.Tensor:
    """The UNet's raw output (B, C, h, w) for one latent batch and text features."""
    kwargs = {"added_cond_kwargs": added} if added is not None else {}
    return unet(latent.to(unet.dtype), t, encoder_hidden_states=text.to(unet.dtype), return_dict=False, **kwargs)[0]


# ---- DDIM ----------------------------------------------------------------------------------------------------------
def ddim_scheduler(config):
    """A deterministic ``DDIMScheduler`` from any scheduler's config (clipping and thresholding off)."""
    from diffusers import DDIMScheduler

    return DDIMScheduler.from_config(dict(config), clip_sample=False, thresholding=False)


class DDIMSteps:
    """DDIM's deterministic update (η = 0) at the timesteps ``DDIMScheduler.set_timesteps(steps)`` gives.

    ``step(out, i, x)``: sampling step ``i`` (level t_i → t_i − stride), exactly ``DDIMScheduler.step``;
    ``invert(out, i, x)``: the same update backwards (level t_i − stride → t_i), the model evaluated at t_i.
    """

    def __init__(self, config, steps: int, device: torch.device | str = "cpu"):
        scheduler = ddim_scheduler(config)
        scheduler.set_timesteps(steps)
        self.config = dict(scheduler.config)
        self.timesteps = [int(t) for t in scheduler.timesteps]
        self.stride = scheduler.config.num_train_timesteps // steps
        self.alphas = scheduler.alphas_cumprod.float()
        self.final = scheduler.final_alpha_cumprod.float()
        self.prediction = scheduler.config.prediction_type

    def alpha(self, t: int) -> torch.Tensor:
        return self.alphas[t] if t >= 0 else self.final

    def _move(self, out: torch.Tensor, x: torch.Tensor, a_from: torch.Tensor, a_to: torch.Tensor) -> torch.Tensor:
        if self.prediction == "epsilon":
            x0 = (x - (1 - a_from) ** 0.5 * out) / a_from**0.5
            eps = out
        elif self.prediction == "v_prediction":
            x0 = a_from**0.5 * x - (1 - a_from) ** 0.5 * out
            eps = a_from**0.5 * out + (1 - a_from) ** 0.5 * x
        elif self.prediction == "sample":
            x0 = out
            eps = (x - a_from**0.5 * out) / (1 - a_from) ** 0.5
        else:
            raise ValueError(f"unsupported prediction_type {self.prediction!r} (epsilon, v_prediction or sample)")
        return a_to**0.5 * x0 + (1 - a_to) ** 0.5 * eps

    def step(self, out: torch.Tensor, i: int, x: torch.Tensor) -> torch.Tensor:
        t = self.timesteps[i]
        return self._move(out, x, self.alpha(t), self.alpha(t - self.stride))

    def invert(self, out: torch.Tensor, i: int, x: torch.Tensor) -> torch.Tensor:
        t = self.timesteps[i]
        return self._move(out, x, self.alpha(t - self.stride), self.alpha(t))


# ---- DDIM inversion and the null-text optimisation ---------------------------------------------------------------
@contextlib.contextmanager
def _frozen(module: torch.nn.Module) -> Iterator[None]:
    """The module's parameters take no gradients inside the block (their flags are restored after, also on error)."""
    flags = [(p, p.requires_grad) for p in module.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def _autocast(device: torch.device, half: bool):
    """float16 autocast on ``device`` when ``half``, else nothing."""
    if not half:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.float16)


def _progress(total: int, enabled: bool, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled, desc=desc, leave=False)


def ddim_trajectory(pipe, x0: torch.Tensor, text: _Text, ddim: DDIMSteps, progress: bool = False) -> torch.Tensor:
    """(steps + 1, C, h, w) float32: the DDIM inversion of ``x0`` with the conditional prediction (guidance 1)."""
    steps = len(ddim.timesteps)
    latents = [x0.float()]
    x = x0.float()
    with torch.no_grad(), _progress(steps, progress, "DDIM inversion") as bar:
        for i in reversed(range(steps)):
            out = _model_output(pipe.unet, x, ddim.timesteps[i], text.cond, text.added_cond).float()
            x = ddim.invert(out, i, x)
            latents.append(x)
            bar.update()
    return torch.cat(latents)


def null_text_optimisation(
    pipe, trajectory: torch.Tensor, text: _Text, ddim: DDIMSteps, *, guidance_scale: float, inner_steps: int,
    lr: float, early_stop: float, progress: bool = False, half: bool = False,
) -> tuple[torch.Tensor, list[float]]:
    """Per-step unconditional embeddings (steps, K, D) that make guided DDIM sampling follow ``trajectory``,
    and the last loss of each step. See the module docstring for the schedule."""
    unet = pipe.unet
    steps = len(ddim.timesteps)
    null = text.uncond.detach().float()  # (1, K, D)
    x = trajectory[-1:].clone()
    found, losses = [], []
    with _frozen(unet), _progress(steps * inner_steps, progress, "null-text inversion") as bar:
        for i, t in enumerate(ddim.timesteps):
            target = trajectory[steps - i - 1 : steps - i]
            with torch.no_grad():
                out_cond = _model_output(unet, x, t, text.cond, text.added_cond).float()
            param = null.clone().requires_grad_(True)
            optimiser = torch.optim.Adam([param], lr=lr * (50.0 / steps) * (1.0 - i / (2.0 * steps)))
            threshold = early_stop + 2e-5 * i * 50.0 / steps
            done = 0
            loss_value = float("nan")
            for _ in range(inner_steps):
                with torch.enable_grad(), _autocast(x.device, half):
                    out_uncond = _model_output(unet, x, t, param, text.added_uncond).float()
                    guided = out_uncond + guidance_scale * (out_cond - out_uncond)
                    loss = F.mse_loss(ddim.step(guided, i, x), target)
                    optimiser.zero_grad(set_to_none=True)
                    loss.backward()
                optimiser.step()
                loss_value = float(loss.detach())
                done += 1
                bar.update()
                if loss_value < threshold:
                    break
            bar.update(inner_steps - done)
            null = param.detach()
            del param, optimiser
            with torch.no_grad():
                out_uncond = _model_output(unet, x, t, null, text.added_uncond).float()
                x = ddim.step(out_uncond + guidance_scale * (out_cond - out_uncond), i, x)
            found.append(null[0].to(text.uncond.dtype))
            losses.append(loss_value)
    return torch.stack(found), losses

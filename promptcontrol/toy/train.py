"""Train the embedded model from scratch: ``python -m promptcontrol.toy.train [options]``.

Two stages, one state file (``<ckpt-dir>/state.pt``), resumable at any chunk boundary:

1. ``vae``: the autoencoder on rendered scenes (MSE + a tiny KL), then the latent scaling factor
   (1 / std of latents) and a cache of latents for a fixed set of training scenes;
2. ``diffusion``: UNet and text encoder jointly from scratch (v-prediction on a zero-terminal-SNR schedule —
   see ``model.build_scheduler`` for why —, loss weights capped at high SNR, AdamW, warm-up then cosine decay,
   EMA of the weights, 10 % empty captions for classifier-free guidance). ``--init-from`` starts the stage from
   another run's weights and latent cache instead (e.g. to move an ε-prediction run to the v schedule);
   ``--init-weights`` starts the UNet and text encoder from a saved pipeline folder of the same parameter shapes
   and trains a VAE of this run's shape (e.g. ``--vae-channels 32,64``: a 16×16 latent) first.

Text-encoder padding: the stock pipeline always pads the prompt to 77 tokens with the end token, and a
causal text encoder lets those padding positions summarise the whole caption, so the UNet learns to read
the caption from padding and heat maps of the words go flat. Here the UNet only ever sees, at the end
token and after it, the hidden states of the *empty* prompt (caption-independent), and an auxiliary loss
teaches the text encoder to produce exactly those there by itself — so at inference, with the stock
pipeline, the caption is only in the caption's own tokens.

Each run trains for ``--minutes`` of wall clock, saves the state, writes the pipeline folder (EMA weights,
fp16 safetensors, written to a temporary folder and renamed) and exits; rerun the same command to go on.
The result is a function of ``--seed`` and the options alone (every step draws from RNGs seeded by the step).
"""
from __future__ import annotations

import argparse
import copy
import math
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import safetensors.torch
import torch
import torch.nn.functional as F

from . import world
from .model import TOKENIZER, ToyConfig, assemble, build_scheduler, build_text_encoder, build_tokenizer, \
    build_unet, build_vae


def log(msg: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {msg}", flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m promptcontrol.toy.train", description=__doc__.split("\n")[0])
    p.add_argument("--ckpt-dir", default="checkpoints", help="where state.pt and the latent cache live")
    p.add_argument("--out", default=None, help="pipeline folder to write (default: <ckpt-dir>/pipeline)")
    p.add_argument("--minutes", type=float, default=25.0, help="wall-clock minutes for this chunk")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vae-steps", type=int, default=1200)
    p.add_argument("--vae-batch", type=int, default=32)
    p.add_argument("--vae-lr", type=float, default=1e-3)
    p.add_argument("--scenes", type=int, default=30000, help="training scenes with cached latents")
    p.add_argument("--steps", type=int, default=12000, help="diffusion steps in all (the cosine schedule's end)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=300)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--uncond-prob", type=float, default=0.1, help="share of empty captions (for CFG)")
    p.add_argument("--pad-loss", type=float, default=1.0, help="weight of the padding-invariance loss (0: off)")
    p.add_argument("--no-pad-fix", action="store_true", help="feed the UNet the real padding states (ablation)")
    p.add_argument("--text-layers", type=int, default=None, help="text encoder depth (new runs only)")
    p.add_argument("--unet-channels", default=None, help="e.g. 64,128 (new runs only)")
    p.add_argument("--vae-channels", default=None,
                   help="VAE widths, one per level, e.g. 32,64: 2 levels → a 16×16 latent for 32-px images "
                        "(new runs only; default 32,64,64: 3 levels → 8×8)")
    p.add_argument("--init-weights", default=None, metavar="PIPELINE_DIR",
                   help="new runs only: start the UNet and text encoder from a saved pipeline folder of the same "
                        "shapes (e.g. promptcontrol/assets/toy-sd); the VAE and its latent cache are made here")
    p.add_argument("--prediction", default=None, choices=["epsilon", "v_prediction"],
                   help="what the UNet predicts (new runs only; default v_prediction)")
    p.add_argument("--sd1-schedule", action="store_true",
                   help="SD 1.x's schedule without the zero-terminal-SNR rescale (new runs only; an ablation)")
    p.add_argument("--init-from", default=None, metavar="CKPT_DIR",
                   help="new runs only: take the VAE, the latent cache and the (EMA) UNet/text weights of that run "
                        "and start the diffusion stage from them at step 0")
    p.add_argument("--until-step", type=int, default=None,
                   help="end this chunk at this diffusion step (to replay a run whose options changed between chunks)")
    p.add_argument("--save-every", type=float, default=8.0, help="minutes between state saves")
    args = p.parse_args(argv)
    if args.device not in ("cpu", "cuda") and not args.device.startswith("cuda:"):
        p.error(f"--device must be cpu or cuda, got {args.device!r}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda asked for, but torch sees no CUDA device: use --device cpu")
    if args.minutes <= 0:
        p.error("--minutes must be > 0")
    if args.init_from and args.init_weights:
        p.error("--init-from (another run's state, VAE included) and --init-weights (a pipeline's UNet and text "
                "encoder, new VAE) exclude each other: pass one")
    for name in ("unet_channels", "vae_channels"):
        if getattr(args, name) is not None:
            setattr(args, name, parse_widths(p, "--" + name.replace("_", "-"), getattr(args, name)))
    if args.vae_channels is not None and ToyConfig.image_size % 2 ** (len(args.vae_channels) - 1):
        p.error(f"--vae-channels: {len(args.vae_channels)} levels do not divide the {ToyConfig.image_size}-px image")
    return args


def parse_widths(p: argparse.ArgumentParser, option: str, text: str) -> tuple[int, ...]:
    """'64,128' → (64, 128); every width a positive multiple of the norm groups (GroupNorm needs it)."""
    groups = ToyConfig.norm_groups
    try:
        widths = tuple(int(c) for c in text.split(","))
    except ValueError:
        p.error(f"{option} takes comma-separated integers like 32,64, got {text!r}")
    if not widths or any(c <= 0 or c % groups for c in widths):
        p.error(f"{option}: every width must be a positive multiple of {groups} (the norm groups), got {text!r}")
    return widths


# --------------------------------------------------------------------------- state


class Trainer:
    def __init__(self, args: argparse.Namespace, argv: list[str] | None = None):
        self.args = args
        self.dev = torch.device(args.device)
        self.ckpt = Path(args.ckpt_dir)
        self.ckpt.mkdir(parents=True, exist_ok=True)
        self.out = Path(args.out) if args.out else self.ckpt / "pipeline"
        self.tok = build_tokenizer()
        state_path = self.ckpt / "state.pt"
        self.state = torch.load(state_path, map_location="cpu", weights_only=False) if state_path.exists() else None
        init = None
        if self.state is None and args.init_from:
            init = torch.load(Path(args.init_from) / "state.pt", map_location="cpu", weights_only=False)
            if init["stage"] == "vae":
                raise SystemExit(f"--init-from {args.init_from}: that run has not finished its VAE stage")
        if self.state is None:
            cfg = ToyConfig.from_dict(init["config"]) if init else ToyConfig()
            cfg.prediction_type, cfg.zero_terminal_snr = ToyConfig.prediction_type, ToyConfig.zero_terminal_snr
            if args.prediction:
                cfg.prediction_type = args.prediction
            if args.sd1_schedule:
                cfg.zero_terminal_snr = False
            if cfg.zero_terminal_snr and cfg.prediction_type == "epsilon":
                raise SystemExit("a zero-terminal-SNR schedule needs --prediction v_prediction (ε is undefined at "
                                 "pure noise); add --sd1-schedule for an ε run")
            if args.text_layers is not None:
                cfg.text_layers = args.text_layers
            if args.unet_channels:
                cfg.unet_channels = args.unet_channels
                cfg.unet_heads = tuple(max(1, c // 32) for c in cfg.unet_channels)
            if args.vae_channels:
                cfg.vae_channels = args.vae_channels
            self.state = {"config": cfg.to_dict(), "stage": "vae", "vae_step": 0, "step": 0, "seed": args.seed}
            if args.init_weights:
                self.state["init_weights"] = str(args.init_weights)
            if init:
                self.state.update(stage="diffusion", vae_step=init["vae_step"], vae=init["vae"], unet=init["unet"],
                                  te=init["te"], init_from=str(args.init_from), init_step=init["step"])
                shutil.copyfile(Path(args.init_from) / "latents.pt", self.ckpt / "latents.pt")
                log(f"new run in {self.ckpt} from {args.init_from} (its step {init['step']}): {cfg}")
            else:
                log(f"new run in {self.ckpt}: {cfg}")
        else:
            log(f"resuming {self.ckpt}: stage {self.state['stage']}, vae step {self.state['vae_step']}, "
                f"step {self.state['step']}")
            if self.state["seed"] != args.seed:
                raise SystemExit(f"{state_path} was made with --seed {self.state['seed']}, not {args.seed}: "
                                 "use the same seed or another --ckpt-dir")
        # every chunk's options, so that the weights can be retraced from the state alone
        self.state.setdefault("chunks", []).append({"argv": list(sys.argv[1:]) if argv is None else list(argv),
                                                    "vae_step": self.state["vae_step"], "step": self.state["step"],
                                                    "started": time.strftime("%Y-%m-%d %H:%M:%S")})
        log(f"options: {' '.join(self.state['chunks'][-1]['argv'])}")
        self.cfg = ToyConfig.from_dict(self.state["config"])
        torch.manual_seed(args.seed)
        self.vae = build_vae(self.cfg).to(self.dev)
        self.unet = build_unet(self.cfg).to(self.dev)
        self.te = build_text_encoder(self.cfg, self.tok).to(self.dev)
        for name in ("vae", "unet", "te"):
            if name in self.state:
                getattr(self, name).load_state_dict(self.state[name])
        if init is not None and "ema" in init:  # start from the other run's exported (EMA) weights
            load_ema([self.unet, self.te], init["ema"])
        if "unet" not in self.state and args.init_weights:  # a new run: the pipeline's weights, kept by save()
            load_pipeline_weights(self.unet, self.te, Path(args.init_weights))
            log(f"UNet and text encoder start from {args.init_weights}")
        self.scheduler = build_scheduler(self.cfg)
        self.t0 = time.time()

    def elapsed_min(self) -> float:
        return (time.time() - self.t0) / 60

    def save(self) -> None:
        self.state["vae"] = self.vae.state_dict()
        self.state["unet"] = self.unet.state_dict()
        self.state["te"] = self.te.state_dict()
        tmp = self.ckpt / "state.pt.tmp"
        torch.save(self.state, tmp)
        os.replace(tmp, self.ckpt / "state.pt")
        log(f"saved state: stage {self.state['stage']}, vae step {self.state['vae_step']}, step {self.state['step']}")

    # ----------------------------------------------------------------------- stage 1: VAE

    def batch_images(self, rng: np.random.Generator, n: int) -> torch.Tensor:
        """(n, 3, H, W) float in [-1, 1] of fresh random scenes."""
        imgs = [world.to_tensor_range(world.render(world.random_scene(rng, self.cfg.image_size))[0]) for _ in range(n)]
        return torch.from_numpy(np.stack(imgs))

    def train_vae(self) -> bool:
        a = self.args
        opt = torch.optim.AdamW(self.vae.parameters(), lr=a.vae_lr, weight_decay=0.0)
        if "vae_opt" in self.state:
            opt.load_state_dict(self.state["vae_opt"])
        self.vae.train()
        last_save = time.time()
        while self.state["vae_step"] < a.vae_steps:
            step = self.state["vae_step"]
            if self.elapsed_min() > a.minutes:
                self.state["vae_opt"] = opt.state_dict()
                return False
            rng = np.random.default_rng([a.seed, 1, step])
            x = self.batch_images(rng, a.vae_batch).to(self.dev)
            for g in opt.param_groups:
                g["lr"] = a.vae_lr * min(1.0, (step + 1) / 100) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / a.vae_steps)))
            post = self.vae.encode(x).latent_dist
            gen = torch.Generator(self.dev).manual_seed(a.seed * 7919 + step)
            z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen, device=self.dev)
            rec = self.vae.decode(z).sample
            mse = F.mse_loss(rec, x)
            kl = post.kl().mean() / z[0].numel()
            loss = mse + 1e-4 * kl
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.vae.parameters(), 1.0)
            opt.step()
            self.state["vae_step"] = step + 1
            if step % 50 == 0:
                log(f"vae step {step} mse {mse.item():.5f} kl/dim {kl.item():.3f}")
            if time.time() - last_save > a.save_every * 60:
                self.state["vae_opt"] = opt.state_dict()
                self.save()
                last_save = time.time()
        self.state.pop("vae_opt", None)
        self.finish_vae()
        return True

    @torch.no_grad()
    def finish_vae(self) -> None:
        """Scaling factor (1 / latent std) and the latent cache of the training scenes."""
        a = self.args
        self.vae.eval()
        rng = np.random.default_rng([a.seed, 2])
        scenes = [world.random_scene(rng, self.cfg.image_size) for _ in range(a.scenes)]
        means, stds = [], []
        for i in range(0, len(scenes), 256):
            x = torch.from_numpy(np.stack([world.to_tensor_range(world.render(s)[0]) for s in scenes[i:i + 256]]))
            post = self.vae.encode(x.to(self.dev)).latent_dist
            means.append(post.mean.cpu())
            stds.append(post.std.cpu())
        mean, std = torch.cat(means), torch.cat(stds)  # (N, 4, h, w) each
        sf = float(1.0 / (mean.std() + 1e-6))
        self.cfg.vae_scaling_factor = sf
        self.state["config"] = self.cfg.to_dict()
        self.vae.register_to_config(scaling_factor=sf)
        torch.save({"mean": mean.half(), "std": std.half(), "scenes": scenes}, self.ckpt / "latents.pt")
        self.state["stage"] = "diffusion"
        log(f"vae done: scaling factor {sf:.4f}, latent std mean {std.mean():.4f}, cached {len(scenes)} scenes")
        self.save()

    # ----------------------------------------------------------------------- stage 2: UNet + text encoder

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        """(B, 77) token ids, padded with the end token exactly as the pipeline does."""
        return self.tok(texts, padding="max_length", max_length=self.tok.model_max_length, truncation=True,
                        return_tensors="pt").input_ids

    def encode_text(self, ids: torch.Tensor, te: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """Hidden states for the UNet (B, 77, D) with the end/padding positions taken from the empty
        prompt, and the padding-invariance loss (how far the encoder's own padding states are from those)."""
        h = te(ids.to(self.dev)).last_hidden_state  # (B, 77, D)
        empty_ids = self.tokenize([""]).to(self.dev)
        empty = te(empty_ids).last_hidden_state  # (1, 77, D)
        eos = self.tok.eos_token_id
        first_end = (ids == eos).int().argmax(dim=1).to(self.dev)  # (B,) index of the first end token
        pos = torch.arange(ids.shape[1], device=self.dev)
        pad = (pos[None, :] >= first_end[:, None]).unsqueeze(-1)  # (B, 77, 1)
        pad_loss = ((h - empty.detach()) ** 2 * pad).sum() / (pad.sum() * h.shape[-1])
        if self.args.no_pad_fix:
            return h, pad_loss
        return torch.where(pad, empty.expand_as(h), h), pad_loss

    def train_diffusion(self) -> bool:
        a = self.args
        cache = torch.load(self.ckpt / "latents.pt", weights_only=False)
        lat_mean, lat_std, scenes = cache["mean"].float(), cache["std"].float(), cache["scenes"]
        sf = self.cfg.vae_scaling_factor
        params = list(self.unet.parameters()) + list(self.te.parameters())
        opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=0.01)
        if "opt" in self.state:
            opt.load_state_dict(self.state["opt"])
        ema = [p.detach().clone() for p in params]
        if "ema" in self.state:
            ema = [e.to(self.dev) for e in self.state["ema"]]
        alphas = self.scheduler.alphas_cumprod.to(self.dev)  # (1000,)
        self.unet.train(), self.te.train()
        last_save, tick, run_loss = time.time(), time.time(), []
        while self.state["step"] < a.steps:
            step = self.state["step"]
            if self.elapsed_min() > a.minutes or (a.until_step is not None and step >= a.until_step):
                break
            rng = np.random.default_rng([a.seed, 3, step])
            gen = torch.Generator().manual_seed(a.seed * 1_000_003 + step)
            idx = rng.integers(0, len(scenes), a.batch)
            texts = ["" if rng.random() < a.uncond_prob else world.caption(scenes[i], rng).text for i in idx]
            ids = self.tokenize(texts)
            z0 = (lat_mean[idx] + lat_std[idx] * torch.randn(lat_mean[idx].shape, generator=gen)) * sf
            noise = torch.randn(z0.shape, generator=gen)
            t = torch.randint(0, self.scheduler.config.num_train_timesteps, (a.batch,), generator=gen)
            z0, noise, t = z0.to(self.dev), noise.to(self.dev), t.to(self.dev)
            zt = self.scheduler.add_noise(z0, noise, t)
            target = noise if self.cfg.prediction_type == "epsilon" else self.scheduler.get_velocity(z0, noise, t)
            lr = a.lr * min(1.0, (step + 1) / a.warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / a.steps)))
            for g in opt.param_groups:
                g["lr"] = lr
            cond, pad_loss = self.encode_text(ids, self.te)
            pred = self.unet(zt, t, cond).sample
            snr = alphas[t] / (1 - alphas[t])
            if self.cfg.prediction_type == "epsilon":
                w = torch.clamp(snr, max=5.0) / snr  # min-SNR-5 for ε-prediction
            else:  # v-loss = (SNR + 1) × x0-loss: cap that factor at 6, so noisy steps (the layout) keep weight 1
                w = torch.clamp(snr + 1, max=6.0) / (snr + 1)
            diff = ((pred - target) ** 2).mean(dim=(1, 2, 3))
            loss_d = (w * diff).mean()
            loss = loss_d + a.pad_loss * pad_loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            decay = min(a.ema, (1 + step) / (10 + step))
            with torch.no_grad():
                torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - decay)
            self.state["step"] = step + 1
            run_loss.append((diff.mean().item(), pad_loss.item()))
            if step % 100 == 0:
                d, pl = np.mean(run_loss, axis=0)
                log(f"step {step} loss {d:.4f} pad {pl:.4f} lr {lr:.2e} {len(run_loss) / (time.time() - tick):.2f} it/s")
                run_loss, tick = [], time.time()
            if time.time() - last_save > a.save_every * 60:
                self.state["opt"], self.state["ema"] = opt.state_dict(), [e.cpu() for e in ema]
                self.save()
                last_save = time.time()
        self.state["opt"], self.state["ema"] = opt.state_dict(), [e.cpu() for e in ema]
        done = self.state["step"] >= a.steps
        if done:
            self.state["stage"] = "done"
        self.save()
        self.export(ema)
        return done

    # ----------------------------------------------------------------------- export

    def export(self, ema: list[torch.Tensor]) -> None:
        """Write the pipeline (EMA weights, fp16 safetensors, the package's tokenizer) atomically to ``out``."""
        unet, te = copy.deepcopy(self.unet), copy.deepcopy(self.te)
        load_ema([unet, te], ema)
        vae = copy.deepcopy(self.vae)
        parts = [m.to("cpu", torch.float16) for m in (vae, unet, te)]  # plain fp16 weights, no variant
        pipe = assemble(*parts, self.tok, build_scheduler(self.cfg))
        write_pipeline(pipe, self.out)
        log(f"wrote pipeline to {self.out} (step {self.state['step']})")


def load_ema(modules: list[torch.nn.Module], ema: list[torch.Tensor]) -> None:
    """Copy EMA tensors into the modules' parameters, in order (the EMA list follows ``parameters()`` of
    the UNet, then of the text encoder)."""
    params = [p for m in modules for p in m.parameters()]
    if len(params) != len(ema):
        raise ValueError(f"{len(ema)} EMA tensors for {len(params)} parameters: the runs' shapes differ")
    with torch.no_grad():
        for p, e in zip(params, ema):
            p.copy_(e)


PIPELINE_WEIGHTS = {"unet": "unet/diffusion_pytorch_model.safetensors", "text encoder": "text_encoder/model.safetensors"}


def load_pipeline_weights(unet: torch.nn.Module, te: torch.nn.Module, folder: Path) -> None:
    """Copy the UNet and text-encoder weights of a saved pipeline folder into the modules (cast to their dtype).

    The UNet's parameter shapes do not depend on the latent size, so a model trained on 8×8 latents can start
    one on 16×16 latents if channels, heads and text width match; anything else is refused by name."""
    for (part, rel), module in zip(PIPELINE_WEIGHTS.items(), (unet, te)):
        path = Path(folder) / rel
        if not path.is_file():
            raise SystemExit(f"--init-weights {folder}: no {part} weights at {path} (expected a pipeline folder "
                             "written by save_pretrained with safetensors)")
        weights = safetensors.torch.load_file(str(path))
        own = module.state_dict()
        missing, extra = sorted(set(own) - set(weights)), sorted(set(weights) - set(own))
        wrong = [f"{k} {tuple(weights[k].shape)} there, {tuple(own[k].shape)} here"
                 for k in own if k in weights and weights[k].shape != own[k].shape]
        if missing or extra or wrong:
            raise SystemExit(f"--init-weights {folder}: its {part} does not fit this run's shape "
                             f"(missing {missing[:3]}, unexpected {extra[:3]}, shapes {wrong[:3]}): pass the "
                             "--unet-channels / --text-layers of that model")
        module.load_state_dict(weights)


def write_pipeline(pipe, out: Path, tokenizer_src: Path = TOKENIZER,
                   tokenizer_folders: tuple[str, ...] = ("tokenizer",)) -> None:
    """``save_pretrained`` into a sibling temp folder, the package's tokenizer files in each of
    ``tokenizer_folders``, then swap it in (a failure leaves the old folder as it was and no temp folder)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        pipe.save_pretrained(tmp, safe_serialization=True)
        for name in tokenizer_folders:
            shutil.rmtree(tmp / name)
            shutil.copytree(tokenizer_src, tmp / name)  # the exact committed copy, not a re-serialisation
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    tr = Trainer(args, argv)
    if tr.state["stage"] == "done" and tr.state["step"] < args.steps:
        tr.state["stage"] = "diffusion"  # a larger --steps extends a finished run
        log(f"extending the finished run from step {tr.state['step']} to {args.steps}")
    if tr.state["stage"] == "vae":
        if not tr.train_vae():
            tr.save()
            log("chunk over during the VAE stage: rerun to go on")
            return 0
    if tr.state["stage"] == "diffusion":
        done = tr.train_diffusion()
        log("training finished" if done else "chunk over: rerun the same command to go on")
    else:
        log("training already finished; nothing to do")
    return 0


if __name__ == "__main__":
    sys.exit(main())

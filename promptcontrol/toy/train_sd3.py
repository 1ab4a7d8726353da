"""Train the embedded SD3-architecture model ("toy-sd3"): ``python -m promptcontrol.toy.train_sd3 [options]``.

Rectified flow as SD3: x_t = (1 − t) x0 + t ε, the transformer predicts the velocity ε − x0 at timestep 1000 t,
t drawn logit-normal (SD3's choice) with a share drawn uniform (the noisiest t, where this world's layout is
decided, keep some weight); the text encoders are trained jointly with the transformer (``--init-text`` starts the
first from the UNet toy model's), the VAE is an existing folder (``--vae-from``) and is not trained. AdamW,
warm-up then cosine decay, EMA of the weights (exported), 10 % empty captions for classifier-free guidance.

Two tricks, both exact at inference with the stock pipeline:
- padding: the transformer only ever sees the *empty* prompt's CLIP states at the end token and after it, and an
  auxiliary loss teaches the encoders to produce exactly those there (as ``toy.train`` does for the UNet model),
  so the caption lives in the caption's own tokens;
- the T5 segment: without T5 the pipeline appends 256 zero vectors; they are identical tokens at every layer, so
  training appends one and adds log 256 to its key logit (``CollapsedT5Processor``) — the same function, 255
  fewer tokens.

Stages in one state file (``<ckpt-dir>/state.pt``): ``latents`` (encode ``--scenes`` scenes once, cache them in
``latents.pt``), ``train``, ``done``. Each run trains for ``--minutes``, saves, writes the pipeline folder (EMA
weights, fp16 safetensors, temp folder then rename) and exits; rerun the same command to go on. The result is a
function of ``--seed`` and the options alone (every step draws from RNGs seeded by the step).
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import safetensors.torch
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL

from . import world
from .model import TOKENIZER, build_tokenizer
from .model_sd3 import DEFAULT_VAE, T5_TOKENS, ToySD3Config, adaln_zero_, assemble, build_scheduler, \
    build_text_encoders, build_transformer, config_for_vae, load_vae
from .train import log
from .train import write_pipeline as write_pipeline_folder

NUM_TRAIN_TIMESTEPS = 1000


# --------------------------------------------------------------------------- the T5 segment, collapsed


class CollapsedT5Processor:
    """``JointAttnProcessor2_0`` op for op, plus a logit bias ``log(copies)`` on the last text key.

    The last text token stands for ``copies`` identical tokens: for every query q,
    ``Σ_j exp(q·k_j) v_j`` over n equal keys/values is ``exp(q·k + log n) v``, so one key biased by log n gives the
    softmax (and the output) of n copies; their identical queries give identical outputs, so they stay identical in
    every later layer. Joint blocks only (image + text); training only (the exported model has stock processors).
    """

    def __init__(self, copies: int):
        if copies < 1:
            raise ValueError(f"copies must be >= 1, got {copies}")
        self.log_copies = math.log(copies)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        if encoder_hidden_states is None:
            raise ValueError("CollapsedT5Processor is for joint (image + text) attention; this call has no text")
        batch, n_img = hidden_states.shape[:2]
        query, key, value = (_heads(p(hidden_states), attn.heads) for p in (attn.to_q, attn.to_k, attn.to_v))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        t_q, t_k, t_v = (_heads(p(encoder_hidden_states), attn.heads)
                         for p in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
        if attn.norm_added_q is not None:
            t_q = attn.norm_added_q(t_q)
        if attn.norm_added_k is not None:
            t_k = attn.norm_added_k(t_k)
        query, key, value = torch.cat([query, t_q], 2), torch.cat([key, t_k], 2), torch.cat([value, t_v], 2)
        bias = torch.zeros(1, 1, 1, key.shape[2], dtype=query.dtype, device=query.device)  # (1, 1, 1, N_all)
        bias[..., -1] = self.log_copies
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=bias, dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).reshape(batch, -1, query.shape[1] * query.shape[3]).to(query.dtype)
        image, text = out[:, :n_img], out[:, n_img:]
        if not attn.context_pre_only:
            text = attn.to_add_out(text)
        image = attn.to_out[1](attn.to_out[0](image))
        return image, text


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, N, H·d) → (B, H, N, d)."""
    return x.view(x.shape[0], x.shape[1], heads, -1).transpose(1, 2)


def install_collapsed_t5(transformer, copies: int = T5_TOKENS) -> None:
    """Every joint block's ``attn`` gets a ``CollapsedT5Processor`` (SD3.5's image-only ``attn2`` is left alone)."""
    for block in transformer.transformer_blocks:
        block.attn.set_processor(CollapsedT5Processor(copies))


# --------------------------------------------------------------------------- options


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m promptcontrol.toy.train_sd3", description=__doc__.split("\n")[0])
    p.add_argument("--ckpt-dir", default="checkpoints/sd3", help="where state.pt and the latent cache live")
    p.add_argument("--out", default=None, help="pipeline folder to write (default: <ckpt-dir>/pipeline)")
    p.add_argument("--minutes", type=float, default=20.0, help="wall-clock minutes for this chunk")
    p.add_argument("--save-every", type=float, default=5.0, help="minutes between state saves")
    p.add_argument("--until-step", type=int, default=None, help="end this chunk at this step")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=100, help="steps between log lines")
    p.add_argument("--scenes", type=int, default=30000, help="training scenes with cached latents")
    p.add_argument("--steps", type=int, default=12000, help="steps in all (the cosine schedule's end)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--warmup", type=int, default=300)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--uncond-prob", type=float, default=0.1, help="share of empty captions (for CFG)")
    p.add_argument("--pad-loss", type=float, default=1.0, help="weight of the padding-invariance loss (0: off)")
    p.add_argument("--logit-mean", type=float, default=0.0, help="t = sigmoid(N(mean, std)): SD3's logit-normal")
    p.add_argument("--logit-std", type=float, default=1.0)
    p.add_argument("--uniform-share", type=float, default=0.2, help="share of the batch with t ~ U(0, 1)")
    new = p.add_argument_group("new runs only (kept in the state)")
    new.add_argument("--vae-from", default=str(DEFAULT_VAE), metavar="FOLDER",
                     help="an AutoencoderKL folder (default: the UNet toy model's, 8×8×4 latents)")
    new.add_argument("--init-text", default=None, metavar="FOLDER",
                     help="start text_encoder from a CLIPTextModel of the same width (a pipeline folder with "
                          "text_encoder/, e.g. promptcontrol/assets/toy-sd, or the text_encoder folder itself)")
    new.add_argument("--width", type=int, default=None, help=f"transformer width (default {ToySD3Config.width})")
    new.add_argument("--layers", type=int, default=None, help=f"joint blocks (default {ToySD3Config.layers})")
    new.add_argument("--patch", type=int, default=None, choices=(1, 2), help="patch size on the latent (default 1)")
    new.add_argument("--shift", type=float, default=None, help="the scheduler's shift (default 1.0)")
    new.add_argument("--pooled", action="store_true", help="let the pooled caption embedding condition the "
                     "transformer (SD3's way; off by default: zero, frozen text_projection)")
    new.add_argument("--t5-tokens", type=int, default=T5_TOKENS,
                     help="how many zero T5 tokens the one trained token stands for (the pipeline's default 256)")
    args = p.parse_args(argv)
    if args.device not in ("cpu", "cuda") and not args.device.startswith("cuda:"):
        p.error(f"--device must be cpu or cuda, got {args.device!r}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda asked for, but torch sees no CUDA device: use --device cpu")
    for name in ("minutes", "batch", "steps", "scenes", "log_every", "warmup", "t5_tokens"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    if not 0 <= args.uniform_share <= 1 or not 0 <= args.uncond_prob <= 1:
        p.error("--uniform-share and --uncond-prob are shares: between 0 and 1")
    return args


def new_config(args: argparse.Namespace, vae: AutoencoderKL) -> ToySD3Config:
    """The run's sizes: defaults, the options given, the VAE's latent shape."""
    cfg = ToySD3Config()
    for option, field in (("width", "width"), ("layers", "layers"), ("patch", "patch_size"), ("shift", "shift")):
        if getattr(args, option) is not None:
            setattr(cfg, field, getattr(args, option))
    cfg.pooled = args.pooled
    cfg = config_for_vae(cfg, vae)
    cfg.check()
    return cfg


# --------------------------------------------------------------------------- state


def open_state(args: argparse.Namespace, ckpt: Path) -> tuple[dict, AutoencoderKL]:
    """The run's state and VAE: resumed from ``<ckpt>/state.pt``, or a new run's (sizes from the options and
    the ``--vae-from`` folder, stage ``latents``)."""
    state_path = ckpt / "state.pt"
    if state_path.exists():
        state = torch.load(state_path, map_location="cpu", weights_only=False)
        log(f"resuming {ckpt}: stage {state['stage']}, step {state['step']}")
        if state["seed"] != args.seed:
            raise SystemExit(f"{state_path} was made with --seed {state['seed']}, not {args.seed}: "
                             "use the same seed or another --ckpt-dir")
        return state, vae_from_state(state)
    vae = load_vae(args.vae_from)
    cfg = new_config(args, vae)
    log(f"new run in {ckpt}: {cfg}")
    return {"config": cfg.to_dict(), "stage": "latents", "step": 0, "seed": args.seed, "vae_from": str(args.vae_from),
            "vae_config": dict(vae.config), "vae": vae.state_dict(), "t5_tokens": args.t5_tokens,
            "init_text": args.init_text}, vae


class Trainer:
    def __init__(self, args: argparse.Namespace, argv: list[str] | None = None):
        self.args = args
        self.dev = torch.device(args.device)
        self.ckpt = Path(args.ckpt_dir)
        self.ckpt.mkdir(parents=True, exist_ok=True)
        self.out = Path(args.out) if args.out else self.ckpt / "pipeline"
        self.tok = build_tokenizer(TOKENIZER)
        self.state, self.vae = open_state(args, self.ckpt)
        self.state.setdefault("chunks", []).append({"argv": list(sys.argv[1:]) if argv is None else list(argv),
                                                    "step": self.state["step"],
                                                    "started": time.strftime("%Y-%m-%d %H:%M:%S")})
        log(f"options: {' '.join(self.state['chunks'][-1]['argv'])}")
        self.cfg = ToySD3Config.from_dict(self.state["config"])
        self.vae.to(self.dev)
        torch.manual_seed(args.seed)
        self.transformer = build_transformer(self.cfg).to(self.dev)
        self.te1, self.te2 = (m.to(self.dev) for m in build_text_encoders(self.cfg, self.tok))
        for name, module in self.modules().items():
            if name in self.state:
                module.load_state_dict(self.state[name])
        if "transformer" not in self.state:  # a new run: adaLN-Zero, the text encoder from --init-text
            adaln_zero_(self.transformer)
            if self.state["init_text"]:
                started = init_text_encoder(self.te1, Path(self.state["init_text"]))
                log(f"text_encoder starts from {self.state['init_text']} ({started})")
        install_collapsed_t5(self.transformer, self.state["t5_tokens"])
        self.t0 = time.time()

    def modules(self) -> dict[str, torch.nn.Module]:
        return {"transformer": self.transformer, "text_encoder": self.te1, "text_encoder_2": self.te2}

    def elapsed_min(self) -> float:
        return (time.time() - self.t0) / 60

    def save(self) -> None:
        for name, module in self.modules().items():
            self.state[name] = module.state_dict()
        tmp = self.ckpt / "state.pt.tmp"
        torch.save(self.state, tmp)
        os.replace(tmp, self.ckpt / "state.pt")
        log(f"saved state: stage {self.state['stage']}, step {self.state['step']}")

    # ----------------------------------------------------------------------- stage 1: the latent cache

    @torch.no_grad()
    def cache_latents(self) -> None:
        """Posterior mean and std of ``--scenes`` fixed training scenes, through the (frozen) VAE."""
        rng = np.random.default_rng([self.args.seed, 2])
        scenes = [world.random_scene(rng, self.cfg.image_size) for _ in range(self.args.scenes)]
        means, stds = [], []
        for i in range(0, len(scenes), 256):
            x = torch.from_numpy(np.stack([world.to_tensor_range(world.render(s)[0]) for s in scenes[i:i + 256]]))
            post = self.vae.encode(x.to(self.dev)).latent_dist
            means.append(post.mean.cpu())
            stds.append(post.std.cpu())
        mean, std = torch.cat(means), torch.cat(stds)  # (N, C, h, w) each
        torch.save({"mean": mean.half(), "std": std.half(), "scenes": scenes}, self.ckpt / "latents.pt")
        self.state["stage"] = "train"
        log(f"cached {len(scenes)} scenes: latent std {float(mean.std() * self.cfg.vae_scaling_factor):.3f} "
            f"after the scaling factor {self.cfg.vae_scaling_factor:.4f}")
        self.save()

    # ----------------------------------------------------------------------- stage 2: transformer + text

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        """(B, 77) token ids, padded with the end token exactly as the pipeline does."""
        return self.tok(texts, padding="max_length", max_length=self.tok.model_max_length, truncation=True,
                        return_tensors="pt").input_ids

    def encode_text(self, ids: torch.Tensor, pad_fix: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """What ``StableDiffusion3Pipeline.encode_prompt`` gives without T5, the T5 segment as ONE zero token:
        text states (B, 77 + 1, joint_dim), pooled (B, joint_dim), and the padding-invariance loss. With
        ``pad_fix`` the end/padding positions carry the empty prompt's states (see the module docstring)."""
        ids = ids.to(self.dev)
        clip, pooled = clip_states(self.te1, self.te2, ids)  # (B, 77, w1 + w2), (B, p1 + p2)
        empty, _ = clip_states(self.te1, self.te2, self.tokenize([""]).to(self.dev))  # (1, 77, w1 + w2)
        first_end = (ids == self.tok.eos_token_id).int().argmax(dim=1)  # (B,)
        pad = (torch.arange(ids.shape[1], device=self.dev)[None, :] >= first_end[:, None]).unsqueeze(-1)  # (B, 77, 1)
        pad_loss = ((clip - empty.detach()) ** 2 * pad).sum() / (pad.sum() * clip.shape[-1])
        if pad_fix:
            clip = torch.where(pad, empty.expand_as(clip), clip)
        clip = F.pad(clip, (0, self.cfg.joint_dim - clip.shape[-1]))
        t5 = clip.new_zeros(clip.shape[0], 1, self.cfg.joint_dim)  # stands for the pipeline's 256 zero vectors
        return torch.cat([clip, t5], dim=1), pooled, pad_loss

    def trainable(self) -> list[torch.nn.Parameter]:
        """Transformer, then text encoders, without the frozen (zero) text projections; the EMA follows this order."""
        return [p for m in self.modules().values() for p in m.parameters() if p.requires_grad]

    def batch(self, step: int, cache: dict) -> tuple[list[str], torch.Tensor, torch.Tensor, torch.Tensor]:
        """Step ``step``'s captions, clean latents z0 (B, C, h, w), noise ε and t (B,): a function of seed, step."""
        a = self.args
        rng = np.random.default_rng([a.seed, 3, step])
        gen = torch.Generator().manual_seed(a.seed * 1_000_003 + step)
        idx = rng.integers(0, len(cache["scenes"]), a.batch)
        texts = ["" if rng.random() < a.uncond_prob else world.caption(cache["scenes"][i], rng).text for i in idx]
        mean, std = cache["mean"][idx], cache["std"][idx]
        z0 = (mean + std * torch.randn(mean.shape, generator=gen)) * self.cfg.vae_scaling_factor  # shift factor 0
        noise = torch.randn(z0.shape, generator=gen)
        t = torch.sigmoid(torch.randn(a.batch, generator=gen) * a.logit_std + a.logit_mean)
        uniform = torch.rand(a.batch, generator=gen)
        t = torch.where(torch.rand(a.batch, generator=gen) < a.uniform_share, uniform, t)
        return texts, z0, noise, t

    def train(self) -> bool:
        a = self.args
        cache = torch.load(self.ckpt / "latents.pt", weights_only=False)
        cache["mean"], cache["std"] = cache["mean"].float(), cache["std"].float()
        params = self.trainable()
        opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=0.01)
        if "opt" in self.state:
            opt.load_state_dict(self.state["opt"])
        ema = [e.to(self.dev) for e in self.state["ema"]] if "ema" in self.state else \
            [p.detach().clone() for p in params]
        for m in self.modules().values():
            m.train()
        last_save, tick, run_loss = time.time(), time.time(), []
        while self.state["step"] < a.steps:
            step = self.state["step"]
            if self.elapsed_min() > a.minutes or (a.until_step is not None and step >= a.until_step):
                break
            texts, z0, noise, t = (x.to(self.dev) if torch.is_tensor(x) else x for x in self.batch(step, cache))
            lr = a.lr * min(1.0, (step + 1) / a.warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / a.steps)))
            for g in opt.param_groups:
                g["lr"] = lr
            loss_v, pad_loss = self.losses(texts, z0, noise, t)
            opt.zero_grad(set_to_none=True)
            (loss_v + a.pad_loss * pad_loss).backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            with torch.no_grad():
                torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - min(a.ema, (1 + step) / (10 + step)))
            self.state["step"] = step + 1
            run_loss.append((loss_v.item(), pad_loss.item()))
            if step % a.log_every == 0:
                d, pl = np.mean(run_loss, axis=0)
                rate = len(run_loss) / (time.time() - tick)
                log(f"step {step} loss {d:.4f} pad {pl:.4f} lr {lr:.2e} {rate:.2f} it/s")
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

    def losses(self, texts, z0, noise, t) -> tuple[torch.Tensor, torch.Tensor]:
        """Velocity MSE on x_t = (1 − t) z0 + t ε (target ε − z0) and the padding loss."""
        xt, target = flow_pair(z0, noise, t)
        cond, pooled, pad_loss = self.encode_text(self.tokenize(texts))
        pred = self.transformer(hidden_states=xt, timestep=t * NUM_TRAIN_TIMESTEPS, encoder_hidden_states=cond,
                                pooled_projections=pooled, return_dict=False)[0]
        return F.mse_loss(pred, target), pad_loss

    # ----------------------------------------------------------------------- export

    def export(self, ema: list[torch.Tensor]):
        """Write the pipeline (EMA weights, stock processors, fp16 safetensors, the package's tokenizer) to ``out``."""
        fresh = {"transformer": build_transformer(self.cfg)}
        fresh["text_encoder"], fresh["text_encoder_2"] = build_text_encoders(self.cfg, self.tok)
        for name, module in fresh.items():
            module.load_state_dict(self.modules()[name].state_dict())
        trained = [p for m in fresh.values() for p in m.parameters() if p.requires_grad]
        with torch.no_grad():
            for p, e in zip(trained, ema, strict=True):
                p.copy_(e)
        vae = vae_from_state(self.state)
        with quiet_libraries():  # casting and saving warnings / bars that say nothing here
            parts = {k: m.to("cpu", torch.float16) for k, m in {**fresh, "vae": vae}.items()}  # plain fp16
            pipe = assemble(parts["transformer"], parts["vae"], parts["text_encoder"], parts["text_encoder_2"],
                            self.tok, build_scheduler(self.cfg))
            write_pipeline(pipe, self.out)
        log(f"wrote pipeline to {self.out} (step {self.state['step']})")
        return pipe


@contextlib.contextmanager
def quiet_libraries():
    """diffusers and transformers at error level and without progress bars, restored afterwards."""
    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog

    levels = dlog.get_verbosity(), tlog.get_verbosity()
    bars = tlog.is_progress_bar_enabled()
    dlog.set_verbosity_error(), tlog.set_verbosity_error(), tlog.disable_progress_bar()
    try:
        yield
    finally:
        dlog.set_verbosity(levels[0]), tlog.set_verbosity(levels[1])
        if bars:
            tlog.enable_progress_bar()


def flow_pair(z0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rectified flow: x_t = (1 − t) z0 + t ε and the velocity target ε − z0 (z0, ε: (B, C, h, w); t: (B,))."""
    tt = t.view(-1, 1, 1, 1)
    return (1 - tt) * z0 + tt * noise, noise - z0


def clip_states(te1, te2, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both encoders as the SD3 pipeline reads them: ``hidden_states[-2]`` side by side (B, 77, w1 + w2) and the
    projected end-token embeddings side by side (B, p1 + p2)."""
    out1, out2 = (te(ids, output_hidden_states=True) for te in (te1, te2))
    return (torch.cat([out1.hidden_states[-2], out2.hidden_states[-2]], dim=-1),
            torch.cat([out1.text_embeds, out2.text_embeds], dim=-1))


def vae_from_state(state: dict) -> AutoencoderKL:
    """The run's VAE, rebuilt from the config and weights kept in the state (float32, eval, shift factor 0)."""
    vae = AutoencoderKL.from_config(state["vae_config"])
    vae.load_state_dict(state["vae"])
    return vae.eval()


def init_text_encoder(te, folder: Path) -> str:
    """Copy a ``CLIPTextModel``'s weights (a pipeline folder's text_encoder/, or that folder) into ``te``: the
    embeddings, its layers and the final norm; ``te``'s further layers and its projection keep their own values.
    Another width, vocabulary or more layers than ``te`` has are refused by name."""
    path = next((f for f in (folder / "text_encoder" / "model.safetensors", folder / "model.safetensors")
                 if f.is_file()), None)
    if path is None:
        raise SystemExit(f"--init-text {folder}: no text_encoder/model.safetensors or model.safetensors there "
                         "(pass a pipeline folder such as promptcontrol/assets/toy-sd)")
    own = te.state_dict()
    weights = {k if k in own else f"text_model.{k}": v for k, v in safetensors.torch.load_file(str(path)).items()}
    extra = sorted(set(weights) - set(own))
    wrong = [f"{k} {tuple(v.shape)} there, {tuple(own[k].shape)} here" for k, v in weights.items()
             if k in own and v.shape != own[k].shape]
    if extra or wrong:
        raise SystemExit(f"--init-text {folder}: that encoder does not fit text_encoder (unexpected {extra[:3]}, "
                         f"shapes {wrong[:3]}): it needs width {own['text_model.final_layer_norm.weight'].shape[0]} "
                         "and at most as many layers")
    te.load_state_dict({**own, **{k: v.to(own[k].dtype) for k, v in weights.items()}})
    return f"{len(weights)} of {len(own)} tensors copied"


def write_pipeline(pipe, out: Path, tokenizer_src: Path = TOKENIZER) -> None:
    """The toy trainer's atomic export, with the package's tokenizer in both CLIP tokenizer folders."""
    write_pipeline_folder(pipe, out, tokenizer_src, ("tokenizer", "tokenizer_2"))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    tr = Trainer(args, argv)
    if tr.state["stage"] == "done" and tr.state["step"] < args.steps:
        tr.state["stage"] = "train"  # a larger --steps extends a finished run
        log(f"extending the finished run from step {tr.state['step']} to {args.steps}")
    if tr.state["stage"] == "latents":
        tr.cache_latents()
    if tr.state["stage"] == "train":
        done = tr.train()
        log("training finished" if done else "chunk over: rerun the same command to go on")
    else:
        log("training already finished; nothing to do")
    return 0


if __name__ == "__main__":
    sys.exit(main())

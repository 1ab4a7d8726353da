"""Cost of one null-text inner iteration (``pc.invert``) against a stock sampling step, and its memory.

One inner iteration = the UNet forward of the unconditional row with gradients towards the text embedding, the
guided DDIM step, the MSE loss and its backward (what ``null_text_optimisation`` does ``inner_steps`` times per
step). Three cases, interleaved after warm-up, median of per-round ratios with min–max:

* stock CFG sampling step: one UNet call on batch 2 (uncond | cond), no gradients — the yardstick;
* promptcontrol inner iteration: UNet parameters frozen for the optimisation (no weight-gradient buffers),
  the embedding a float32 leaf;
* the prompt-to-prompt notebook's inner iteration: same math with the UNet's parameters left requiring
  gradients (``from_pretrained`` leaves them so), so every backward also fills 860 M weight gradients.

SD 1.5-architecture UNet (published config, random weights), batch 1 for the inner iteration. Peak memory: on
CUDA the allocator's peak; on CPU the peak of live tensor bytes created during the call (parameters and inputs
excluded), counted by a ``TorchDispatchMode`` in separate, untimed runs.

CPU:  ``python -m benchmarks.inversion``                (256×256, latent 32×32)
GPU:  ``python -m benchmarks.inversion --device cuda --dtype float16 --size 512``
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from promptcontrol.ddim import DDIMSteps, _frozen, _model_output

from .harness import Result, machine, markdown_table, save
from .models import sd15_unet, unet_inputs
from .record import PeakTensorBytes

SCHEDULER = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon",
)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--out", default="benchmarks/results/inversion")
    args = parser.parse_args(argv)

    dtype = getattr(torch, args.dtype)
    unet = sd15_unet(dtype=dtype, device=args.device)  # built with requires_grad_(False)
    inputs = unet_inputs(unet, args.size, batch=2)
    x = inputs["sample"][:1].float()
    text = inputs["encoder_hidden_states"]
    cond, null0 = text[1:], text[:1].float()
    ddim = DDIMSteps(SCHEDULER, 50)
    i, t = 10, ddim.timesteps[10]
    with torch.no_grad():
        out_cond = _model_output(unet, x, t, cond, None).float()
        target = ddim.step(out_cond, i, x)

    def stock():
        with torch.no_grad():
            unet(inputs["sample"], t, encoder_hidden_states=text)

    def inner_iteration():
        param = null0.clone().requires_grad_(True)
        out_uncond = _model_output(unet, x, t, param, None).float()
        loss = F.mse_loss(ddim.step(out_uncond + 7.5 * (out_cond - out_uncond), i, x), target)
        loss.backward()
        return param.grad

    def frozen():
        with _frozen(unet):
            inner_iteration()

    def weights_require_grad():
        flags = [(p, p.requires_grad) for p in unet.parameters()]
        for p, _ in flags:
            p.requires_grad_(True)
        try:
            inner_iteration()
        finally:
            for p, flag in flags:
                p.requires_grad_(flag)
                p.grad = None

    cases = [
        ("stock CFG sampling step (batch 2, no grad)", stock),
        ("null-text inner iteration, promptcontrol (UNet frozen)", frozen),
        ("null-text inner iteration, UNet weights requiring grad (P2P notebook)", weights_require_grad),
    ]

    def timed(run) -> tuple[float, float | None]:
        if args.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        _sync(args.device)
        start = time.perf_counter()
        run()
        _sync(args.device)
        peak = torch.cuda.max_memory_allocated() / 2**20 if args.device.startswith("cuda") else None
        return time.perf_counter() - start, peak

    for _, run in cases:  # warm-up
        timed(run)
    times = {name: [] for name, _ in cases}
    peaks = {name: [] for name, _ in cases}
    for _ in range(args.repeats):
        for name, run in cases:
            s, p = timed(run)
            times[name].append(s)
            if p is not None:
                peaks[name].append(p)
    if args.device == "cpu":
        exclude = {p.untyped_storage().data_ptr() for p in unet.parameters()}
        exclude |= {b.untyped_storage().data_ptr() for b in unet.buffers()}
        exclude |= {v.untyped_storage().data_ptr() for v in (inputs["sample"], text, x, out_cond, target, null0)}
        for name, run in cases:
            mode = PeakTensorBytes(exclude)
            with mode:
                run()
            peaks[name] = [mode.peak / 2**20]
    base = cases[0][0]
    results = []
    for name, _ in cases:
        ratios = [a / b for a, b in zip(times[name], times[base])]
        peak = max(peaks[name]) if peaks[name] else None
        base_peak = max(peaks[base]) if peaks[base] else None
        results.append(Result(
            name=name, median_s=statistics.median(times[name]), ratio=statistics.median(ratios),
            ratio_min=min(ratios), ratio_max=max(ratios), peak_mb=peak,
            peak_ratio=None if peak is None or not base_peak else peak / base_peak, times_s=times[name],
        ))
    title = (
        f"Null-text inversion, one inner iteration vs one stock sampling step: SD 1.5 UNet, {args.size}×{args.size}, "
        f"{args.dtype}, {machine()}"
    )
    table = markdown_table(title, results)
    save(f"{args.out}-{args.device}-{args.dtype}-{args.size}", title, results, {"markdown": table})
    print(table)
    return table


if __name__ == "__main__":
    main()

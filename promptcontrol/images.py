"""Pictures: any image as an RGB array or a PIL image, colour-mapped overlays, labelled panel grids with a colour
bar, and the files heat maps are saved as.

Three readings of "an image" (a PIL image, an array (H, W, C) or a tensor (C, H, W) / (H, W, C)), each for its job:

* :func:`rgb_array` — float32 RGB (H, W, 3) in [0, 1] for drawing: lenient (0..255 floats are scaled, values
  clipped, greyscale repeated, alpha dropped);
* :func:`as_pil` — an RGB PIL image for showing (floats in [0, 1] → uint8);
* :func:`float_array` — the values as they are, float64 (H, W, C) (uint8 and PIL scaled to [0, 1]), for
  measuring (:func:`promptcontrol.inversion.psnr`) and for :func:`prepare_image`, which refuses what it cannot
  take (transparency, values outside [0, 1], sides that are not a multiple) instead of guessing.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image

CONVERTIBLE_MODES = ("L", "1", "P", "CMYK", "YCbCr", "LAB", "HSV", "I;16", "I", "F")  # converted to RGB as they are


# ---- any image → array / PIL ---------------------------------------------------------------------------------------
def rgb_array(image: Any) -> np.ndarray:
    """An image (PIL, HWC uint8/float array, CHW/HWC tensor) as float32 RGB (H, W, 3) in [0, 1]."""
    if hasattr(image, "convert"):  # PIL
        return np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    arr = image.detach().cpu().float().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if arr.ndim == 3 and arr.shape[0] in (1, 3) and arr.shape[-1] not in (1, 3):
        arr = arr.transpose(1, 2, 0)
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[-1] not in (1, 3, 4):
        raise ValueError(f"expected an image (PIL, H×W×3 array or tensor); got shape {arr.shape}")
    arr = arr[..., :3].astype(np.float32)
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    if arr.max() > 1.0:
        arr = arr / 255.0
    return np.clip(arr, 0.0, 1.0)


def as_pil(image: Any) -> "Image.Image":
    """An RGB PIL image from a PIL image, an array (H, W, C) / (C, H, W) or a tensor (floats in [0, 1], or uint8)."""
    from PIL import Image

    if isinstance(image, Image.Image):
        return image.convert("RGB")
    array = image.detach().float().cpu().numpy() if isinstance(image, torch.Tensor) else image
    if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
        array = array.transpose(1, 2, 0)
    if array.dtype != "uint8":
        array = (array.clip(0, 1) * 255).round().astype("uint8")
    if array.shape[-1] == 1:
        array = array[..., 0]
    return Image.fromarray(array).convert("RGB")


def float_array(image: Any) -> np.ndarray:
    """(H, W, C) float64 in [0, 1] from a PIL image, a uint8/float array (H, W, C) or a tensor (C, H, W) in [0, 1]."""
    from PIL import Image

    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0
    if isinstance(image, torch.Tensor):
        t = image.detach().float().cpu()
        if t.ndim == 4 and t.shape[0] == 1:
            t = t[0]
        if t.ndim == 3 and t.shape[0] in (1, 3):
            t = t.permute(1, 2, 0)
        return t.numpy().astype(np.float64)
    array = np.asarray(image)
    if array.ndim == 4 and array.shape[0] == 1:
        array = array[0]
    if array.dtype == np.uint8:
        return array.astype(np.float64) / 255.0
    return array.astype(np.float64)


def nearest_multiple(side: int, multiple: int) -> int:
    """The multiple of ``multiple`` nearest to ``side`` (halves round up), at least ``multiple``."""
    return max(multiple, int(side / multiple + 0.5) * multiple)


def _array_to_pil(image: Any) -> "Image.Image":
    """An opaque RGB PIL image from an array / tensor in [0, 1] (uint8 arrays: 0..255); clear errors otherwise."""
    from PIL import Image

    array = float_array(image)
    if array.ndim == 2 or (array.ndim == 3 and array.shape[-1] == 1):  # greyscale
        array = np.repeat(array.reshape(*array.shape[:2], 1), 3, axis=-1)
    if array.ndim == 3 and array.shape[-1] in (2, 4):
        raise ValueError(
            "the image array has an alpha channel; inversion needs an opaque RGB image: composite it onto a "
            "background first, or drop the alpha (array[..., :3])"
        )
    if array.ndim != 3 or array.shape[-1] != 3:
        raise ValueError(f"an image array must be (H, W, 3) or a tensor (3, H, W); got shape {tuple(np.shape(image))}")
    if array.min() < -1e-6 or array.max() > 1 + 1e-6:
        raise ValueError(
            f"float images must hold values in [0, 1] (got {array.min():.3g}..{array.max():.3g}); "
            "pass a uint8 array or a PIL image for 0..255 values"
        )
    return Image.fromarray((array.clip(0, 1) * 255).round().astype(np.uint8))


def _opaque_rgb(image: "Image.Image") -> "Image.Image":
    """``image`` in RGB; images with transparency or an unknown mode are refused with the way to fix them."""
    has_alpha = image.mode in ("RGBA", "LA", "RGBa", "La", "PA") or (image.mode == "P" and "transparency" in image.info)
    if has_alpha:
        raise ValueError(
            f"the image has transparency (mode {image.mode}); inversion needs an opaque RGB image. Put it on a "
            "background first, e.g. bg = Image.new('RGB', im.size, 'white'); bg.paste(im, mask=im.getchannel('A')), "
            "or drop the alpha with im.convert('RGB')"
        )
    if image.mode == "RGB":
        return image
    if image.mode not in CONVERTIBLE_MODES:
        raise ValueError(f"unsupported image mode {image.mode!r}: convert it to RGB first (image.convert('RGB'))")
    return image.convert("RGB")


def prepare_image(image: Any, multiple: int = 8, resize: bool | tuple[int, int] = False) -> "Image.Image":
    """The input as an RGB PIL image whose sides are multiples of ``multiple``.

    image:  a PIL image, a path, a uint8 array (H, W, 3) or a float array / tensor in [0, 1] ((H, W, 3) or (3, H, W))
    resize: ``False`` refuses other sizes; ``True`` resizes each side to the nearest multiple; ``(width, height)``
            resizes to that size (which must be a multiple itself)

    Greyscale, palette, CMYK and other colour modes are converted to RGB; images with transparency (RGBA, LA,
    palette with alpha) are refused, because what belongs under transparent pixels is the caller's choice.
    """
    from PIL import Image

    if isinstance(image, (str, os.PathLike)):
        image = Image.open(image)
        image.load()
    if isinstance(image, (torch.Tensor, np.ndarray)):
        image = _array_to_pil(image)
    if not isinstance(image, Image.Image):
        raise TypeError(f"image must be a PIL image, a path, a numpy array or a tensor; got {type(image).__name__}")
    image = _opaque_rgb(image)
    w, h = image.size
    near = (nearest_multiple(w, multiple), nearest_multiple(h, multiple))
    if resize is True:
        size = near
    elif resize:
        size = (int(resize[0]), int(resize[1]))
        if size[0] % multiple or size[1] % multiple or min(size) <= 0:
            raise ValueError(f"resize={tuple(resize)} is not a positive multiple of {multiple} on each side")
    else:
        size = (w, h)
        if w % multiple or h % multiple:
            raise ValueError(
                f"image size {w}×{h} is not a multiple of {multiple} on each side (this pipeline's VAE and UNet need "
                f"width and height divisible by {multiple}, e.g. {near[0]}×{near[1]}); pass resize=True to resize "
                "to the nearest such size, or resize=(width, height)"
            )
    if size != (w, h):
        image = image.resize(size, Image.LANCZOS)
    return image


# ---- heat over a picture ------------------------------------------------------------------------------------------
def colour(heat: np.ndarray, cmap: str, vmin: float, vmax: float) -> np.ndarray:
    """``heat`` (H, W) through the matplotlib colour map ``cmap`` on [vmin, vmax]: RGB (H, W, 3) float32."""
    import matplotlib

    scaled = np.clip((heat - vmin) / (vmax - vmin), 0.0, 1.0) if vmax > vmin else np.zeros_like(heat)
    return matplotlib.colormaps[cmap](scaled)[..., :3].astype(np.float32)


def resize_heat(heat: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``heat`` (h, w) → (H, W), bilinear (``align_corners=False``); unchanged when it already has that size."""
    if tuple(heat.shape) == tuple(size):
        return heat
    return F.interpolate(heat[None, None].float(), size=tuple(size), mode="bilinear", align_corners=False)[0, 0]


def blend(heat: torch.Tensor, image: Any, cmap: str, alpha: float, vmin: float, vmax: float) -> np.ndarray:
    """RGB (H, W, 3) in [0, 1]: the colour-mapped heat over the image (or alone when ``image`` is None)."""
    if image is None:
        return colour(heat.numpy(), cmap, vmin, vmax)
    base = rgb_array(image)
    heat = resize_heat(heat, base.shape[:2])
    return (1.0 - alpha) * base + alpha * colour(heat.numpy(), cmap, vmin, vmax)


def to_pil(rgb: np.ndarray) -> "Image.Image":
    """RGB (H, W, 3) in [0, 1] → a PIL image (rounded to uint8)."""
    from PIL import Image

    return Image.fromarray((np.clip(rgb, 0, 1) * 255).round().astype(np.uint8))


def figure_to_pil(fig) -> "Image.Image":
    """A matplotlib figure drawn off-screen (Agg) as a PIL RGB image."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from PIL import Image

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return Image.fromarray(np.asarray(canvas.buffer_rgba())[..., :3].copy())


def panels(
    pictures: list[tuple[str, np.ndarray]], cmap: str, vmin: float, vmax: float, legend: bool, cols: int | None
) -> "Image.Image":
    """One picture of labelled panels (RGB arrays) in a grid, with a colour bar for the heat scale."""
    from matplotlib import cm, colors
    from matplotlib.figure import Figure

    n = len(pictures)
    cols = max(1, min(cols or n, n))
    rows = math.ceil(n / cols)
    h, w = pictures[0][1].shape[:2]
    cell = 2.0
    aspect = w / h
    fig = Figure(figsize=(cols * cell * aspect + (0.8 if legend else 0.0), rows * (cell + 0.35)), dpi=100, layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < n:
            label, rgb = pictures[i]
            ax.imshow(rgb, interpolation="nearest")
            ax.set_title(label, fontsize=9)
    if legend:
        mappable = cm.ScalarMappable(norm=colors.Normalize(vmin=vmin, vmax=vmax), cmap=cmap)
        fig.colorbar(mappable, ax=axes.ravel().tolist(), fraction=0.04, pad=0.02)
    return figure_to_pil(fig)


# ---- maps as files ------------------------------------------------------------------------------------------------
def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """``tensors`` (and ``metadata``) as ``.safetensors``, ``.npz``, ``.pt`` or (one tensor) ``.npy``, by suffix."""
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    elif suffix == ".npz":
        arrays = {k: v.numpy() for k, v in tensors.items()}
        np.savez(path, **arrays, **{f"meta_{k}": np.array(v) for k, v in metadata.items()})
    elif suffix == ".npy" and len(tensors) == 1:
        np.save(path, next(iter(tensors.values())).numpy())
    elif suffix == ".pt":
        torch.save({"maps": tensors, "metadata": metadata}, path)
    else:
        raise ValueError(f"cannot save heat maps as {suffix or 'a file without suffix'}: use .safetensors, .npz, .pt or .png")


# ---- heat-map pictures ------------------------------------------------------------------------------------------
def colour_range(heat: torch.Tensor, normalize: str | None) -> tuple[float, float]:
    """Colour scale (vmin, vmax) of one map: [0, 1] for normalised maps (wider if a global-scaled phrase exceeds
    1), [0, peak] for raw ones."""
    peak = float(heat.max())
    if normalize == "word":
        return 0.0, 1.0
    if normalize == "global":
        return 0.0, max(1.0, peak)
    return 0.0, max(peak, 1e-12)


def overlay(heat: torch.Tensor, image: Any, normalize: str | None, *, cmap: str, alpha: float, label: str | None):
    """``heat`` (H, W) coloured over ``image`` (or alone): a picture of the image's size, or (with a ``label``) a
    labelled figure with a colour bar."""
    vmin, vmax = colour_range(heat, normalize)
    rgb = blend(heat, image, cmap, alpha, vmin, vmax)
    if label is None:
        return to_pil(rgb)
    return panels([(label, rgb)], cmap, vmin, vmax, True, 1)


def heat_panels(
    labelled: list[tuple[str, torch.Tensor]],
    image: Any,
    vmax: float,
    *,
    cmap: str,
    alpha: float,
    legend: bool,
    cols: int,
    show_image: bool,
) -> "Image.Image":
    """Labelled maps (H, W) on one scale [0, vmax], each over ``image`` (when given; first as its own panel when
    ``show_image``), in a grid of ``cols`` columns with one colour bar."""
    base = None if image is None else rgb_array(image)
    pictures = [("image", base)] if show_image and base is not None else []
    pictures += [(label, blend(heat, base, cmap, alpha, 0.0, vmax)) for label, heat in labelled]
    return panels(pictures, cmap, 0.0, vmax, legend, cols)

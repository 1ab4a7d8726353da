"""``load_pipeline``: the embedded toy model by default, or any diffusers pipeline from a folder or hub id.

- ``load_pipeline()``: the embedded model (``promptcontrol/assets/toy-sd``, a ``StableDiffusionPipeline``
  trained on captioned shapes), float32, offline, progress bar off (an image takes well under a second,
  a bar per call would only be noise);
- ``load_pipeline("toy")`` is the same; ``load_pipeline("toy-sd3")`` the embedded SD3-architecture model
  (``promptcontrol/assets/toy-sd3``) once it is shipped (until then a clear error saying how to build it);
- ``load_pipeline("path/to/folder")``: any pipeline saved with ``save_pretrained`` (SD 1.x/2.x, SDXL, SD3,
  PixArt-Σ, Sana, ...), through ``diffusers.DiffusionPipeline.from_pretrained`` (the class named in
  ``model_index.json``); a component saved as None (SD3 without T5: ``text_encoder_3 = None``) loads as None;
- ``load_pipeline("owner/name")``: a hub id; without network (or with ``HF_HUB_OFFLINE=1`` and nothing
  cached) this raises ``ModelUnavailableError``: "no network: pass a local folder".

Device: ``None`` picks cuda, then mps, then cpu. Dtype: ``None`` is float32, except float16 for a
folder/hub model on cuda; ``torch_dtype=`` is accepted as an alias of ``dtype=``.
"""
from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError

from .errors import PromptControlError

ASSETS = Path(__file__).resolve().parent / "assets"
EMBEDDED = ASSETS / "toy-sd"
EMBEDDED_MODELS = {  # name -> (folder, how to build it when it is not shipped)
    "toy": (EMBEDDED, "python -m promptcontrol.toy.train --out <folder> (docs/embedded-model.md)"),
    "toy-sd3": (ASSETS / "toy-sd3", "scripts/train_sd3.sh, then copy checkpoints/sd3/pipeline there "
                                    "(docs/embedded-model.md, \"toy-sd3\")"),
}
"""The embedded models by name: ``load_pipeline("toy")`` is ``load_pipeline()``; ``"toy-sd3"`` the SD3-architecture
one (loaded as its folder's pipeline class, offline)."""
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


class ModelUnavailableError(PromptControlError, OSError):
    """A model named by hub id could not be fetched (no network) or found."""


class ModelFolderError(PromptControlError, OSError):
    """A local pipeline folder that cannot be loaded: a file missing, truncated or damaged."""


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def _unreadable_weights(folder: Path) -> list[str]:
    """``file (reason)`` for each safetensors file of ``folder`` whose header cannot be read (truncated, damaged)."""
    from safetensors import safe_open

    found = []
    for file in sorted(folder.rglob("*.safetensors")):
        try:
            with safe_open(str(file), framework="pt"):
                pass
        except (SafetensorError, OSError) as error:
            found.append(f"{file.relative_to(folder)} ({_first_line(error)})")
    return found


def _folder_error(path: Path, error: BaseException) -> ModelFolderError:
    """One line naming the folder and what is wrong with it."""
    damaged = _unreadable_weights(path)
    if damaged:
        what = f"{', '.join(damaged)} cannot be read: the file is truncated or damaged"
    else:
        what = f"{_first_line(error)} (a file is missing or damaged)"
    return ModelFolderError(f"cannot load the pipeline folder {path}: {what}")


def default_device() -> torch.device:
    """cuda if available, then mps, then cpu."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def _device(device) -> torch.device:
    if device is None:
        return default_device()
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but torch sees no CUDA device: pass device='cpu' or None")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError(f"device {device!r} asked for, but MPS is not available: pass device='cpu' or None")
    return dev


def _dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str) and dtype.lower().removeprefix("torch.") in _DTYPES:
        return _DTYPES[dtype.lower().removeprefix("torch.")]
    raise ValueError(f"unknown dtype {dtype!r}: pass a torch.dtype or one of {sorted(_DTYPES)}")


def _looks_offline(err: BaseException) -> bool:
    """Whether an exception (or its causes) says the hub could not be reached / nothing is cached."""
    hints = ("offline", "connect", "timed out", "timeout", "not cached", "localentrynotfound",
             "name resolution", "network", "couldn't reach", "max retries")
    e: BaseException | None = err
    while e is not None:
        text = f"{type(e).__name__} {e}".lower()
        if any(h in text for h in hints):
            return True
        e = e.__cause__ or e.__context__
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")


def _from_pretrained(cls, name: str, dtype: torch.dtype, **kwargs):
    """``cls.from_pretrained`` with ``torch_dtype`` (newer diffusers warn that it is renamed; older lack ``dtype``)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch_dtype.*deprecated.*")
        return cls.from_pretrained(name, torch_dtype=dtype, **kwargs)


def _saved_as_none(folder: Path) -> dict[str, None]:
    """``name=None`` for each component ``model_index.json`` records as ``[null, null]`` (saved as None, e.g. SD3's
    ``text_encoder_3``): diffusers refuses to load a folder whose required component is absent unless it is
    passed explicitly; passing None loads the pipeline as it was saved."""
    import json

    try:
        index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ModelFolderError(f"cannot load the pipeline folder {folder}: model_index.json cannot be read "
                               f"({_first_line(error)})") from error
    if not isinstance(index, dict):
        raise ModelFolderError(f"cannot load the pipeline folder {folder}: model_index.json is not a JSON object")
    return {name: None for name, spec in index.items()
            if not name.startswith("_") and isinstance(spec, list) and all(part is None for part in spec)}


def load_pipeline(model: str | os.PathLike | None = None, *, device=None, dtype=None, **kwargs):
    """Load a diffusers pipeline onto ``device``: the embedded toy model when ``model`` is None.

    ``kwargs`` go to ``from_pretrained`` (e.g. ``variant="fp16"``, ``safety_checker=None``).
    """
    from diffusers import DiffusionPipeline, StableDiffusionPipeline

    if "torch_dtype" in kwargs:
        if dtype is not None:
            raise ValueError("pass dtype= or torch_dtype=, not both")
        dtype = kwargs.pop("torch_dtype")
    dev, dt = _device(device), _dtype(dtype)

    if isinstance(model, str) and model in EMBEDDED_MODELS and model != "toy":
        folder, build = EMBEDDED_MODELS[model]
        if not (folder / "model_index.json").is_file():
            raise FileNotFoundError(f"the embedded model {model!r} is not shipped in this version (no {folder}); "
                                    f"build it with {build}, or pass its folder")
        pipe = load_pipeline(folder, device=device, dtype=dtype if dtype is not None else torch.float32, **kwargs)
        pipe.set_progress_bar_config(disable=True)
        return pipe
    if model is None or model == "toy":
        if not (EMBEDDED / "model_index.json").is_file():
            raise FileNotFoundError(f"the embedded model is missing at {EMBEDDED}: reinstall promptcontrol, "
                                    "or train it with `python -m promptcontrol.toy.train --out <folder>`")
        pipe = _from_pretrained(StableDiffusionPipeline, str(EMBEDDED), dt or torch.float32,
                                local_files_only=True, **kwargs)
        pipe.set_progress_bar_config(disable=True)
        return pipe.to(dev)

    if dt is None:
        dt = torch.float16 if dev.type == "cuda" else torch.float32
    path = Path(os.fspath(model)).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise FileNotFoundError(f"{path} is not a diffusers pipeline folder (no model_index.json): "
                                    "pass a folder written by pipe.save_pretrained(...)")
        kwargs = {**_saved_as_none(path), **kwargs}  # the caller's components win
        try:
            pipe = _from_pretrained(DiffusionPipeline, str(path), dt, **kwargs)
        except (OSError, SafetensorError) as err:  # diffusers: a missing file; safetensors: a truncated one
            raise _folder_error(path, err) from err
        return pipe.to(dev)
    name = os.fspath(model)
    if not _HUB_ID.match(name):
        raise FileNotFoundError(f"no folder at {name!r}, and it is not a hub id ('owner/name'): "
                                "pass an existing pipeline folder, a hub id, or nothing for the embedded model")
    try:
        pipe = _from_pretrained(DiffusionPipeline, name, dt, **kwargs)
    except (OSError, ValueError) as err:
        if _looks_offline(err):
            raise ModelUnavailableError(
                f"cannot load {name!r}: no network: pass a local folder (a pipeline saved with "
                "save_pretrained), or call load_pipeline() for the embedded model") from err
        raise ModelUnavailableError(f"cannot load hub model {name!r}: {err}") from err
    return pipe.to(dev)

"""The toy world and the embedded default model: a tiny Stable Diffusion trained on captioned shapes.

``world`` makes the data (images, masks, captions); ``model`` builds the SD 1.x components; ``train``
trains them; ``evaluate`` measures what a model draws against its caption.
"""
from . import world
from .world import Caption, Obj, ObjectWords, Sample, Scene, caption, dataset, render, sample

__all__ = ["world", "Caption", "Obj", "ObjectWords", "Sample", "Scene", "caption", "dataset", "render", "sample"]

"""``pc.trace(pipe)``: record cross-attention for the length of a ``with`` block, then ask for per-word heat maps.

A thin layer over ``pc.control(pipe, AttentionStore(...))``::

    with pc.trace(pipe) as tr:
        out = pipe(["a red circle and a blue square", "a dog"], num_images_per_prompt=2)
    maps = tr.heatmaps(image_index=0)
    maps["circle"].overlay(out.images[0]).save("circle.png")

The recordings stay in ``tr.store`` after the block ends; the UNet keeps nothing.
"""

from __future__ import annotations

from typing import Any

from .controllers.base import Controller
from .controllers.concept import ConceptAttention, ConceptMaps
from .controllers.store import AttentionStore
from .heatmap import HeatMaps, build_heatmaps
from .recording import fold_place_level, old_step_tuple
from .session import Session, control

_STORE_OPTIONS = (
    "steps", "sites", "per_step", "per_head", "dtype", "max_side", "device", "joint_norm", "places", "levels",
)


class Trace:
    """A recording session; ``with pc.trace(pipe) as tr`` gives this object back.

    store:    the :class:`AttentionStore` holding the recordings
    session:  the underlying :class:`~promptcontrol.session.Session` (``None`` outside the block)
    """

    def __init__(
        self, target: Any, store: AttentionStore, extra: tuple[Controller, ...], cfg, tokenizer,
        concepts: ConceptAttention | None = None,
    ):
        self.target = target
        self.store = store
        self.concepts = concepts  # the ConceptAttention controller when pc.trace got concepts=
        self._extra = extra
        self._cfg = cfg
        self._tokenizer = tokenizer
        self.session: Session | None = None
        self._used = False

    def __enter__(self) -> "Trace":
        if self._used:
            raise RuntimeError("this trace was already used; call pc.trace(pipe) again (the recordings stay in .store)")
        self._used = True
        last = (self.concepts,) if self.concepts is not None else ()  # last: it appends to the inputs after all others
        session = control(self.target, self.store, *self._extra, *last, cfg=self._cfg, tokenizer=self._tokenizer)
        session.__enter__()
        self.session = session
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        session, self.session = self.session, None
        if session is not None:
            session.__exit__(exc_type, exc, tb)

    @property
    def num_images(self) -> int:
        """How many images have been recorded (in generation order)."""
        return self.store.num_images

    def heatmaps(self, image_index: int = 0, **options) -> HeatMaps:
        """Per-word :class:`HeatMaps` of recorded image ``image_index`` at that image's size.

        Options (all documented in :mod:`promptcontrol.heatmap`): ``prompt`` (required when the pipeline got
        embeddings only), ``steps`` (needs ``per_step=True``), ``heads`` (needs ``per_head=True``), ``sites``
        (default: every recorded site but the mid block's), ``weighting`` (``"level"`` default, ``"resolution"``,
        ``"layer"`` or a dict), ``segment`` (SD3: ``"both"`` / ``"clip"`` / ``"t5"`` — which text segment's tokens a
        word's map sums; ``"both"`` when a T5 encoder is loaded), ``size``, ``interpolation`` (``"bicubic"`` default or ``"bilinear"``),
        ``normalize`` (``"word"`` default, ``"global"`` or ``None``), ``tokenizer``. ``steps`` and ``sites`` take
        the specs of :func:`promptcontrol.schedule.step_filter` / ``site_filter`` (``places=`` / ``levels=``: the
        old spelling, for one release).
        """
        return build_heatmaps(self.store.recording(image_index), **options)

    def concept_maps(self, image_index: int = 0, **options) -> ConceptMaps:
        """Output-space :class:`ConceptMaps` (ConceptAttention) of recorded image ``image_index``, one map per
        concept given to ``pc.trace(pipe, concepts=[...])`` (SD3 / SD3.5 and Flux.1; see docs/transformers.md, "Concept maps").

        Options: ``sites`` (a subset of the recorded joint sites, :func:`promptcontrol.schedule.site_filter`),
        ``concepts`` (a subset of the traced concepts), ``size``, ``interpolation`` (``"bicubic"`` default or
        ``"bilinear"``), ``normalize`` (``None`` default: the maps as computed; ``"word"`` or ``"global"``).
        """
        if self.concepts is None:
            raise ValueError(
                "this trace recorded no concepts: trace with pc.trace(pipe, concepts=['circle', 'background']) "
                "(concept tokens must ride through the blocks while the image is made)"
            )
        return self.concepts.maps(image_index, **options)

    def __repr__(self) -> str:
        state = "recording" if self.session is not None else "closed"
        return f"Trace({state}, images={self.store.num_images})"


def trace(
    target: Any, *controllers: Controller, cfg: bool | None = None, tokenizer=None, concepts: Any = None, **options
) -> Trace:
    """Record the cross-attention of ``target`` (a pipeline or UNet) inside a ``with`` block.

    ``options`` go to :class:`AttentionStore`: ``steps``, ``sites`` (the specs of
    :func:`promptcontrol.schedule.step_filter` / ``site_filter``), ``per_step``, ``per_head``, ``dtype``,
    ``max_side``, ``device``; ``places`` / ``levels`` are the old spelling of ``sites={...}`` (for one release,
    with a ``DeprecationWarning``). Other ``controllers`` (e.g. ``pc.Reweight``) may run in the same session; the
    store records each row's own attention before they change it.

    ``concepts``: a list of concept texts (or a :class:`~promptcontrol.controllers.concept.ConceptAttention` for
    its ``sites`` / ``steps`` / ``softmax`` options) whose output-space maps ``tr.concept_maps()`` gives afterwards
    (SD3 / SD3.5 and Flux.1; the image is unchanged).
    """
    unknown = sorted(set(options) - set(_STORE_OPTIONS))
    if unknown:
        raise TypeError(f"pc.trace got unknown option(s) {', '.join(unknown)}; options are: {', '.join(_STORE_OPTIONS[:-2])}")
    places, levels = options.pop("places", None), options.pop("levels", None)
    options["sites"] = fold_place_level(options.get("sites"), places, levels, "pc.trace", stacklevel=2)
    options["steps"] = old_step_tuple(options.get("steps"), stacklevel=2)
    if concepts is not None and not isinstance(concepts, ConceptAttention):
        concepts = ConceptAttention(concepts)
    return Trace(target, AttentionStore(**options), controllers, cfg, tokenizer, concepts)

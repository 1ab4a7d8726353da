"""``pc.control``: install controlled processors for the length of a ``with`` block, and restore everything after.

Install is all-or-nothing: every change (the session marker on the UNet, each controller's binding, each
processor, each forward hook, each wrapped pipeline method) pushes its undo step before it is made, and any
failure while installing runs them all before the error propagates. On exit — normal or by exception — every
undo step runs, last change first, so the UNet keeps no reference to the session. Each undo step runs even when
an earlier one raised: the first error then propagates (the error of the ``with`` body, if there was one) and
the later ones are added to it as notes.

A controller object serves one active session at a time: a session refuses a controller that another active
session holds (two pipelines, nested ``with``) instead of rebinding it under the outer session's feet.

Step tracking: a forward pre-hook on the UNet builds a :class:`~promptcontrol.context.StepContext` at every
UNet call (one per denoising step, never counted per attention layer). A new pipeline run is noticed when the
pipeline calls ``encode_prompt`` (which also tells the prompts, ``num_images_per_prompt`` and whether guidance
is on) or ``scheduler.set_timesteps``; the step index then starts again at 0.

Pipelines that run guidance as a second denoiser call (FluxPipeline's true CFG: ``negative_prompt`` with
``true_cfg_scale > 1``) say so themselves: they encode the negative prompt by a second ``encode_prompt`` call
(whose ``encode_prompt`` has no ``negative_prompt`` parameter) and wrap the second call in
``transformer.cache_context("uncond")``. That call is the same step, its rows the negative prompt's: the
controllers do not see it (stock attention, no step counted), as on a UNet they leave the unconditional half alone.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import warnings
import weakref
from typing import Any, Callable

import torch

from .context import RunInfo, StepContext, batch_layout, batch_mismatch, timestep_value
from .controllers.base import Controller, bound_session, check_controller, claim, recorder_call, release
from .processors import OURS, kind_for, unserved, unserved_model
from .sites import AttentionSite, attention_modules, find_sites, is_denoiser
from .tokens import word_tokenizer
from .errors import PromptControlError

_ACTIVE_FLAG = "_promptcontrol_session_active"


class SessionError(PromptControlError, RuntimeError):
    """A session was used in a way it cannot be (nested on the same UNet, entered twice, ...)."""


_DENOISER_ATTRIBUTES = ("unet", "transformer")


def _resolve_target(target: Any) -> tuple[Any | None, torch.nn.Module]:
    """(pipeline or None, denoiser) from a pipeline (its ``.unet`` or ``.transformer``) or a bare denoiser; a
    ``torch.compile``d denoiser is unwrapped."""
    for attribute in _DENOISER_ATTRIBUTES:
        denoiser = getattr(target, attribute, None)
        denoiser = getattr(denoiser, "_orig_mod", denoiser)
        if denoiser is not None and hasattr(denoiser, "attn_processors"):
            return target, denoiser
    target = getattr(target, "_orig_mod", target)
    if hasattr(target, "attn_processors") and is_denoiser(target):
        return None, target
    raise TypeError(
        "pc.control expects a diffusers pipeline with a `.unet` (StableDiffusionPipeline, StableDiffusionXLPipeline, "
        "img2img, ...) or a `.transformer`, or the UNet2DConditionModel / transformer itself; "
        f"got {type(target).__name__}"
    )


def _outer_denoiser(pipe: Any, target: Any) -> Any:
    """The module the caller calls: the pipeline's (possibly compiled) denoiser, or the target itself."""
    if pipe is None:
        return target
    for attribute in _DENOISER_ATTRIBUTES:
        outer = getattr(pipe, attribute, None)
        if outer is not None and hasattr(getattr(outer, "_orig_mod", outer), "attn_processors"):
            return outer
    return target


def _as_list(prompt: Any) -> list[str] | None:
    if prompt is None:
        return None
    return [prompt] if isinstance(prompt, str) else list(prompt)


class Session:
    """An active control session over one UNet. Use through :func:`control` as a context manager.

    Attributes while active: ``pipe`` (or ``None``), ``unet``, ``sites`` (every attention site),
    ``controllers``, ``context`` (the current :class:`StepContext`, ``None`` between UNet calls of no run),
    ``run`` (what the current pipeline call said about its prompts), ``tokenizer``, ``hook_module`` (the module
    the caller calls — a ``torch.compile`` wrapper when given one — on which per-step hooks belong, so that they
    run outside a compiled graph).
    """

    def __init__(self, target: Any, controllers: tuple[Controller, ...], *, cfg: bool | None = None, tokenizer=None):
        self.pipe, self.denoiser = _resolve_target(target)
        # The module the caller calls: a torch.compile wrapper stays outside, so the step hooks registered on it
        # run eagerly and the compiled region holds only the denoiser's forward (no graph break, no per-step guards).
        outer = _outer_denoiser(self.pipe, target)
        self.hook_module = outer if getattr(outer, "_orig_mod", None) is self.denoiser else self.denoiser
        self.controllers = _distinct([check_controller(c) for c in controllers])
        self.sites: list[AttentionSite] = find_sites(self.denoiser)
        unsupported = unserved_model(self.sites)
        if unsupported:
            raise NotImplementedError(unsupported)
        if not any(site.attends_text for site in self.sites):
            raise ValueError(
                f"{type(self.denoiser).__name__} has no cross-attention layers: promptcontrol needs a text-conditioned "
                "UNet (Stable Diffusion 1.x / 2.x / SDXL)"
            )
        self._forward = inspect.signature(self.denoiser.forward)  # binds the hook's (args, kwargs) to names
        self.tokenizer = tokenizer if tokenizer is not None else word_tokenizer(self.pipe)
        self._cfg_forced = cfg
        self.context: StepContext | None = None
        self.run: RunInfo | None = None
        self._pending_run: RunInfo | None = None
        self._new_run = True
        self._step = -1
        self._run_id = 0
        self._total: int | None = None
        self._call_name: str | None = None  # the pipeline's cache_context name of the current denoiser call
        self._last_call_name: str | None = None
        self._cond_context: StepContext | None = None  # kept across a second ("uncond") call of the same step
        self._grid_ids: tuple[Any, tuple[int, int]] | None = None  # (weakref to img_ids, latent (h, w))
        self._undo: list[tuple[str, Callable[[], None]]] = []  # (what it restores, how), in install order
        self._active = False
        self._entered = False

    # ---- install / restore -------------------------------------------------------------------------------
    def __enter__(self) -> "Session":
        if self._entered:
            raise SessionError("this session was already used; call pc.control(...) again for a new one")
        if getattr(self.denoiser, _ACTIVE_FLAG, False):
            raise SessionError(
                "a promptcontrol session is already active on this UNet; pass all controllers to one "
                "pc.control(pipe, *controllers) instead of nesting sessions"
            )
        self._refuse_bound_controllers()
        self._entered = True
        try:
            self._install()
        except BaseException as error:
            _note_restore_failure(error, self._restore())
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        failure = self._restore()
        if failure is None:
            return
        if exc is not None:  # the body's error stays the one raised
            _note_restore_failure(exc, failure)
            return
        raise failure

    @property
    def unet(self):
        """The denoiser (the name every UNet-era controller knows; a transformer on transformer pipelines)."""
        return self.denoiser

    def __repr__(self) -> str:
        state = "active" if self._active else ("ended" if self._entered else "not entered")
        return f"<pc.control session on {self._target_name()}: {len(self.controllers)} controller(s), {state}>"

    def _target_name(self) -> str:
        if self.pipe is not None:
            return f"{type(self.pipe).__name__} at {id(self.pipe):#x}"
        return f"a bare {type(self.denoiser).__name__} at {id(self.denoiser):#x}"

    def _refuse_bound_controllers(self) -> None:
        """A controller bound to another active session would be rebound, breaking that session: refuse it."""
        for controller in self.controllers:
            other = bound_session(controller)
            if other is None:
                continue
            name = type(controller).__name__
            raise SessionError(
                f"this {name} is already bound to another active session, {other!r}; a "
                "controller serves one session at a time (it keeps that session's tokenizer, run and step state). "
                f"Make a new controller for this session ({name}(...) again with the same arguments), or reuse "
                "this one after the other session has ended"
            )

    def _push_undo(self, what: str, undo: Callable[[], None]) -> None:
        """Register how to undo the change about to be made (pushed first, so a change that fails halfway is undone)."""
        self._undo.append((what, undo))

    def _install(self) -> None:
        self._push_undo("the session marker on the UNet", self._clear_unet_marker)
        setattr(self.denoiser, _ACTIVE_FLAG, True)
        self._active = True
        modules = attention_modules(self.denoiser, self.sites)
        current = self.denoiser.attn_processors
        for controller in self.controllers:
            self._push_undo(f"the binding mark of {type(controller).__name__}", functools.partial(release, controller))
            claim(controller, self)
        for controller in self.controllers:  # bound first: applies_to may use session.sites / session.pipe
            self._push_undo(f"{type(controller).__name__}.unbind()", controller.unbind)
            controller.bind(self)
        record_calls = {id(c): recorder_call(c) for c in self.controllers}  # older recorders adapted once
        plan: dict[str, Any] = {}
        kinds = {}
        for site in self.sites:
            acting = [c for c in self.controllers if c.applies_to(site)]
            if acting:
                kind = kind_for(site)
                if kind is None:
                    raise NotImplementedError(unserved(site))
                refusal = kind.refuses(modules[site.key])
                if refusal:
                    raise NotImplementedError(f"{site.module_path}: {refusal}")
                kinds[site.key] = kind
                plan[site.key] = kind.make(self, site, acting, record_calls)
        self._check_processors({key: current[key] for key in plan}, kinds)
        for key, processor in plan.items():
            self._push_undo(f"the processor of {key}", functools.partial(modules[key].set_processor, current[key]))
            modules[key].set_processor(processor)
        pre_hook = self.hook_module.register_forward_pre_hook(self._before_unet, with_kwargs=True)
        self._push_undo("the UNet's forward pre-hook", pre_hook.remove)
        post_hook = self.hook_module.register_forward_hook(self._after_unet)
        self._push_undo("the UNet's forward hook", post_hook.remove)
        if self.pipe is not None:
            if callable(getattr(self.pipe, "encode_prompt", None)):
                self._wrap(self.pipe, "encode_prompt", self._wrapped_encode_prompt)
            scheduler = getattr(self.pipe, "scheduler", None)
            if scheduler is not None and callable(getattr(scheduler, "set_timesteps", None)):
                self._wrap(scheduler, "set_timesteps", self._wrapped_set_timesteps)
            if scheduler is not None and any(c.uses_latents for c in self.controllers):
                self._wrap(scheduler, "step", self._wrapped_scheduler_step)
            if callable(getattr(self.denoiser, "cache_context", None)):
                self._wrap(self.denoiser, "cache_context", self._wrapped_cache_context)
        elif any(c.uses_latents for c in self.controllers):
            raise ValueError(
                "a controller that changes latents between steps (e.g. pc.LocalBlend) needs a pipeline, "
                "not a bare UNet: pass the pipeline to pc.control"
            )

    def _check_processors(self, originals: dict[str, Any], kinds: dict[str, Any]) -> None:
        """Refuse processors whose behaviour would be lost; warn about memory-saving ones replaced for now."""
        replaced: dict[str, int] = {}
        for key, processor in originals.items():
            name = type(processor).__name__
            if isinstance(processor, OURS):
                raise ValueError(
                    f"the attention site {key} still runs a promptcontrol processor left by an earlier session whose "
                    "restore failed (see that error); call `unet.set_default_attn_processor()` (or set your own "
                    "processors again) before pc.control"
                )
            if name in kinds[key].equivalent:
                continue
            if name in kinds[key].replaceable:
                replaced[name] = replaced.get(name, 0) + 1
                continue
            raise ValueError(
                f"the attention site {key} runs a custom processor {name} (IP-Adapter, a custom LoRA or "
                "attention hack?); promptcontrol would drop its behaviour. Call `unet.set_default_attn_processor()` "
                "or remove that adapter before pc.control, or exclude the site from your controllers"
            )
        if replaced:
            what = ", ".join(f"{n} at {k} sites" for n, k in sorted(replaced.items()))
            warnings.warn(
                f"pc.control runs its own SDPA processor where {what} was installed (attention slicing / xformers / "
                "classic attention); they are restored when the session ends",
                stacklevel=4,
            )

    def _restore(self) -> BaseException | None:
        """Run every undo step, last change first, each even when another raised; the first error (later
        ones added to it as notes), or ``None``."""
        first: BaseException | None = None
        while self._undo:
            what, undo = self._undo.pop()
            try:
                undo()
            except BaseException as error:  # noqa: BLE001 — finish restoring, then re-raise the first
                if first is None:
                    first = error
                    error.add_note(f"pc.control: raised while restoring {what}; every other restore step still ran")
                else:
                    first.add_note(f"pc.control: restoring {what} also failed: {type(error).__name__}: {error}")
        self._active = False
        self.context = None
        return first

    def _clear_unet_marker(self) -> None:
        if hasattr(self.denoiser, _ACTIVE_FLAG):
            delattr(self.denoiser, _ACTIVE_FLAG)

    def _wrap(self, obj: Any, name: str, make_wrapper) -> None:
        """Shadow ``obj.name`` by an instance attribute for the session (restored exactly afterwards)."""
        previous = obj.__dict__.get(name, _MISSING)
        original = getattr(obj, name)
        self._push_undo(f"{type(obj).__name__}.{name}", functools.partial(_unshadow, obj, name, previous))
        obj.__dict__[name] = make_wrapper(original)

    def patch(self, obj: Any, name: str, value: Any) -> None:
        """Set ``obj.name = value`` for the length of the session; the session puts the old value back when it
        ends, whatever happens (an attribute ``obj`` did not have is removed again). For controllers, in
        :meth:`~promptcontrol.Controller.bind` or later while the session is active."""
        if not self._active:
            raise SessionError("session.patch works only while the session is installing or active")
        had = name in getattr(obj, "__dict__", {})
        previous = getattr(obj, name) if had else _MISSING
        self._push_undo(f"{type(obj).__name__}.{name}", functools.partial(_put_back, obj, name, previous))
        setattr(obj, name, value)

    # ---- run and step tracking ------------------------------------------------------------------------------
    def _wrapped_encode_prompt(self, original):
        signature = inspect.signature(original)

        def encode_prompt(*args, **kwargs):
            try:
                bound = signature.bind_partial(*args, **kwargs).arguments
            except TypeError:
                bound = kwargs
            if bound.get("complex_human_instruction"):
                raise ValueError(_INSTRUCTION_REFUSAL)
            if self._pending_run is not None and self._new_run and "negative_prompt" not in signature.parameters:
                # a second encode before any denoiser call: the negative prompt (FluxPipeline's true CFG)
                negative = _as_list(bound.get("prompt"))
                self._pending_run = dataclasses.replace(self._pending_run, negative_prompts=negative)
                return original(*args, **kwargs)
            cfg = bound.get("do_classifier_free_guidance")
            if cfg is None:
                cfg = getattr(self.pipe, "do_classifier_free_guidance", None)
            self._pending_run = RunInfo(
                prompts=_as_list(bound.get("prompt")),
                prompts_2=_as_list(bound.get("prompt_2")),
                prompts_3=_as_list(bound.get("prompt_3")),
                negative_prompts=_as_list(bound.get("negative_prompt")),
                images_per_prompt=int(bound.get("num_images_per_prompt") or 1),
                cfg=None if cfg is None else bool(cfg),
            )
            self._new_run = True
            return original(*args, **kwargs)

        return encode_prompt

    def _wrapped_cache_context(self, original):
        @contextlib.contextmanager
        def cache_context(name, *args, **kwargs):
            previous, self._call_name = self._call_name, name
            try:
                with original(name, *args, **kwargs):
                    yield
            finally:
                self._call_name = previous

        return cache_context

    def _wrapped_set_timesteps(self, original):
        @functools.wraps(original)  # keeps its signature: FluxPipeline's retrieve_timesteps looks for `sigmas`
        def set_timesteps(*args, **kwargs):
            self._new_run = True
            return original(*args, **kwargs)

        return set_timesteps

    def _wrapped_scheduler_step(self, original):
        def step(*args, **kwargs):
            out = original(*args, **kwargs)
            ctx = self.context
            if ctx is None:
                return out
            latents = out.prev_sample if hasattr(out, "prev_sample") else out[0]
            for controller in self.controllers:
                if controller.uses_latents:
                    latents = controller.transform_latents(ctx, latents)
            if hasattr(out, "prev_sample"):
                out.prev_sample = latents
                return out
            return (latents, *tuple(out)[1:])

        return step

    def reset_steps(self) -> None:
        """Start counting steps at 0 again at the next UNet call (for loops that call a bare UNet)."""
        self._new_run = True

    def _total_steps(self) -> int | None:
        if self.pipe is None:
            return None
        total = getattr(self.pipe, "_num_timesteps", None)
        if isinstance(total, int) and total > 0:
            return total
        timesteps = getattr(getattr(self.pipe, "scheduler", None), "timesteps", None)
        return len(timesteps) if timesteps is not None else None

    def _latent_hw(self, sample: torch.Tensor, inputs: dict[str, Any]) -> tuple[int, int]:
        """The latent's (h, w): the sample's last two sizes, or for Flux's packed token sequence (B, N, C) the
        VAE latent 2 × the token grid that ``img_ids`` spells (rows, cols); read once per ``img_ids`` tensor (the
        pipeline's, the same every step of a run: one host read per run on a GPU)."""
        ids = inputs.get("img_ids")
        if sample.ndim != 3 or not isinstance(ids, torch.Tensor):
            return int(sample.shape[-2]), int(sample.shape[-1])
        if self._grid_ids is not None and self._grid_ids[0]() is ids:
            return self._grid_ids[1]
        flat = ids[0] if ids.ndim == 3 else ids  # (N, 3): (0, row, col)
        hw = (2 * (int(flat[:, 1].max()) + 1), 2 * (int(flat[:, 2].max()) + 1))
        self._grid_ids = (weakref.ref(ids), hw)
        return hw

    def _second_pass(self) -> bool:
        """Whether this denoiser call is the pipeline's second ("uncond") call of the step just run."""
        previous, self._last_call_name = self._last_call_name, self._call_name
        return self._call_name == "uncond" and previous == "cond" and not self._new_run

    def _before_unet(self, module, args, kwargs):
        self._cond_context = None  # none left over from a second call that raised
        if self._second_pass():
            self._cond_context, self.context = self.context, None  # stock attention for the negative prompt
            return None
        bound = self._forward.bind_partial(*args, **kwargs)
        inputs = bound.arguments  # parameter name -> value, as the denoiser's forward names them
        sample = next(iter(inputs.values()))  # the latents: `sample` (UNet) or `hidden_states` (transformers)
        timestep = inputs.get("timestep")
        text = inputs.get("encoder_hidden_states")
        if self._new_run:
            self._new_run = False
            self._step = 0
            self._run_id += 1
            self.run, self._pending_run = self._pending_run, None
            self._total = self._total_steps()
        else:
            self._step += 1
        run = self.run
        if self._cfg_forced is not None:
            run = dataclasses.replace(run, cfg=self._cfg_forced) if run else RunInfo(cfg=self._cfg_forced)
        if not isinstance(timestep, torch.Tensor) or torch.compiler.is_compiling():
            timestep = timestep_value(timestep)  # hooks traced into a compiled UNet: as before (a float)
        self.context = StepContext(  # a tensor timestep stays as given: converting it would sync the device
            index=self._step,
            timestep=timestep,
            total=self._total,
            latent_hw=self._latent_hw(sample, inputs),
            layout=batch_layout(int(sample.shape[0]), run),
            run=run,
            run_id=self._run_id,
            text_length=int(text.shape[1]) if isinstance(text, torch.Tensor) and text.ndim == 3 else None,
        )
        if isinstance(text, torch.Tensor) and text.ndim == 3 and int(text.shape[0]) != int(sample.shape[0]):
            raise ValueError(batch_mismatch(self.context, int(text.shape[0])))
        for controller in self.controllers:
            controller.begin_step(self.context)
        changers = [c for c in self.controllers if c.uses_context or c.uses_inputs]
        if not changers:
            return None
        inputs = dict(inputs)
        for controller in changers:
            if controller.uses_context:
                inputs["encoder_hidden_states"] = controller.transform_context(
                    self.context, inputs.get("encoder_hidden_states")
                )
        for controller in changers:
            if controller.uses_inputs:
                inputs = controller.transform_inputs(self.context, inputs)
        changed = self._forward.bind_partial(**inputs)
        return changed.args, changed.kwargs

    def _after_unet(self, module, args, output):
        if self._cond_context is not None:  # the second call of a step: its controllers already closed it
            self.context, self._cond_context = self._cond_context, None
            return None
        if self.context is not None:
            for controller in self.controllers:
                controller.end_step(self.context)
        return None


_INSTRUCTION_REFUSAL = (
    "SanaPipeline prepends its complex_human_instruction to the prompt and keeps the last tokens of both, so the "
    "prompt's words do not sit where promptcontrol's word positions say (maps, weights and edits would land on the "
    "wrong tokens); call the pipeline with complex_human_instruction=None inside pc.control / pc.trace / "
    "pc.generate / pc.edit"
)


class _Missing:
    def __repr__(self) -> str:
        return "<missing>"


_MISSING = _Missing()


def _unshadow(obj: Any, name: str, previous: Any) -> None:
    """Undo :meth:`Session._wrap`: put back the instance attribute ``obj.name`` had (or none)."""
    if previous is _MISSING:
        obj.__dict__.pop(name, None)
    else:
        obj.__dict__[name] = previous


def _put_back(obj: Any, name: str, previous: Any) -> None:
    """Undo :meth:`Session.patch`: the attribute's old value, or no instance attribute when it had none."""
    if previous is _MISSING:
        if name in getattr(obj, "__dict__", {}):
            delattr(obj, name)
    else:
        setattr(obj, name, previous)


def _note_restore_failure(error: BaseException, failure: BaseException | None) -> None:
    """Tell, on the error that propagates, that restoring also failed (and with what)."""
    if failure is None or failure is error:
        return
    error.add_note(f"pc.control: restoring afterwards also failed: {type(failure).__name__}: {failure}")
    for note in getattr(failure, "__notes__", []):
        error.add_note(note)


def _distinct(controllers: list[Controller]) -> list[Controller]:
    """``controllers`` if no object appears twice (it would be bound twice and act twice at every site)."""
    seen: set[int] = set()
    for controller in controllers:
        if id(controller) in seen:
            name = type(controller).__name__
            raise ValueError(
                f"the same {name} object is given twice to pc.control; give it once, or build a second "
                f"{name}(...) if it should really act twice"
            )
        seen.add(id(controller))
    return controllers


def control(target: Any, *controllers: Controller, cfg: bool | None = None, tokenizer=None) -> Session:
    """Install ``controllers`` into ``target``'s UNet for the length of a ``with`` block.

    ``target``: a diffusers pipeline (SD 1.x / 2.x / SDXL, img2img, ...) or a bare ``UNet2DConditionModel``.
    ``cfg``: force the batch layout (``True``: ``[uncond | cond]``); by default it is read from the pipeline
    call, and a bare UNet's rows all count as conditional. ``tokenizer``: for a bare UNet, what word-based
    controllers should tokenize with (a pipeline's own tokenizer is used otherwise).

    Raises ``TypeError`` for a target or controller of the wrong type, ``ValueError`` for a UNet without
    cross-attention, a custom processor that would be dropped or one controller object given twice; on entering,
    :class:`SessionError` when the UNet already has an active session or a controller is bound to another active
    session (make a new controller; reusing one after its session ended is fine). Nothing is installed then.
    """
    return Session(target, controllers, cfg=cfg, tokenizer=tokenizer)

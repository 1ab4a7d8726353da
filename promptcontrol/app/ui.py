"""The Gradio page: three tabs (Inspect, Emphasise, Edit) over :mod:`.jobs`.

Every pipeline request shares one queue slot (``concurrency_id="pipeline"``, limit 1): a second request waits
its turn. Errors of the API are shown in the page as they are raised (``gr.Error`` with the same message).
Map requests (a word's map from a finished inspect) do not touch the pipeline and run beside it.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import gradio as gr

from . import jobs
from .guard import PipelineLeftChanged
from .runner import Runner, Stopped

MAX_SLIDERS = 12  # per-word weight sliders in the Emphasise tab; later words keep the weights of the syntax
PIPELINE = dict(concurrency_limit=1, concurrency_id="pipeline")
PRIVATE = dict(api_visibility="undocumented")
EXAMPLE = "a red circle on the left and a blue square on the right"
NO_RUN = "run an inspect first: its maps are what a word shows"


# ---- errors --------------------------------------------------------------------------------------------------------
def page_message(error: BaseException) -> str:
    """The API's own message for ``error`` (a ``KeyError``'s without the quotes ``str`` adds)."""
    if isinstance(error, KeyError) and error.args:
        return str(error.args[0])
    if isinstance(error, (ValueError, TypeError, RuntimeError, OSError, Stopped, PipelineLeftChanged)):
        return str(error)
    return f"{type(error).__name__}: {error}"


@contextmanager
def shown_in_page() -> Iterator[None]:
    """Raise any error as ``gr.Error`` with the API's message, so the page shows it where the result would be."""
    try:
        yield
    except gr.Error:
        raise
    except Exception as error:  # noqa: BLE001 — every failure is shown, none is swallowed
        expected = isinstance(error, (KeyError, ValueError, TypeError, Stopped))
        raise gr.Error(page_message(error), duration=None, print_exception=not expected) from error


def _files(paths) -> list[str]:
    return [str(p) for p in paths]


# ---- inspect ---------------------------------------------------------------------------------------------------
def _inspect_tab(runner: Runner) -> None:
    state = gr.State(None)
    with gr.Row():
        with gr.Column(scale=1):
            prompt = gr.Textbox(EXAMPLE, label="prompt", lines=2, elem_id="inspect-prompt")
            with gr.Row():
                seed = gr.Number(0, label="seed", precision=0, minimum=0)
                steps = gr.Slider(1, 100, 20, step=1, label="steps")
                guidance = gr.Slider(0, 15, 7.5, step=0.5, label="guidance")
            with gr.Row():
                per_step = gr.Checkbox(False, label="record per-step maps")
                normalize = gr.Radio(["word", "global", "none"], value="word", label="normalise maps")
            with gr.Row():
                run = gr.Button("Inspect", variant="primary", elem_id="inspect-run")
                stop = gr.Button("Stop", variant="stop")
        with gr.Column(scale=1):
            with gr.Row():
                image = gr.Image(label="image", type="pil", format="png", interactive=False, elem_id="inspect-image")
                overlay = gr.Image(label="map", type="pil", format="png", interactive=False, elem_id="inspect-map")
    words = gr.Radio([], label="words: click one to see its map", elem_id="inspect-words")
    with gr.Row():
        query = gr.Textbox(label="or type a word, a phrase, 'a (2)' for one occurrence, '#5' for a token, '<end>'",
                           scale=3)
        one_step = gr.Checkbox(False, label="one step only", visible=False, scale=1)
        step = gr.Slider(0, 19, 0, step=1, label="step", visible=False, scale=2)
    with gr.Accordion("tokens", open=False):
        tokens = gr.Radio([], label="every token position: click one to see its map")
    with gr.Row():
        make_grid = gr.Button("Grid of every word")
        files = gr.File(label="files: image, maps (safetensors), run.json, reproduce.py, grid",
                        file_count="multiple", interactive=False)
    grid_image = gr.Image(label="grid", type="pil", format="png", interactive=False, visible=False)
    code = gr.Code(label="the Python that reproduces this", language="python", buttons=["copy", "download"])
    record = gr.JSON(label="run record")

    def on_inspect(prompt_, seed_, steps_, guidance_, per_step_, normalize_, progress=gr.Progress()):
        with shown_in_page():
            result = jobs.inspect(runner, prompt_, seed=seed_, steps=steps_, guidance=guidance_, per_step=per_step_,
                                  normalize=normalize_, progress=progress)
            first = result.words[0] if result.words else None
            shown = jobs.show_map(result, first)[0] if first else None
        count = result.settings["steps"]
        return (result, jobs.enlarge(result.image), gr.update(choices=result.words, value=first),
                gr.update(choices=result.tokens(runner.tokenizer), value=None), first or "", shown,
                gr.update(visible=result.per_step, value=False), gr.update(visible=result.per_step, maximum=count - 1,
                                                                           value=count - 1),
                _files(result.files), result.code, result.record, gr.update(visible=False, value=None))

    def on_query(result, text, one_step_, step_):
        if result is None:
            raise gr.Error(NO_RUN, duration=None, print_exception=False)
        with shown_in_page():
            shown, code_text = jobs.show_map(result, text, int(step_) if one_step_ else None)
        return shown, code_text, text

    def on_grid(result):
        if result is None:
            raise gr.Error(NO_RUN, duration=None, print_exception=False)
        with shown_in_page():
            path = jobs.grid(result)
        return gr.update(value=str(path), visible=True), _files(result.files)

    outputs = [state, image, words, tokens, query, overlay, one_step, step, files, code, record, grid_image]
    inputs = [prompt, seed, steps, guidance, per_step, normalize]
    event = run.click(on_inspect, inputs, outputs, api_name="inspect", **PIPELINE)
    submitted = prompt.submit(on_inspect, inputs, outputs, **PIPELINE, **PRIVATE)
    stop.click(runner.stop, None, None, cancels=[event, submitted], queue=False, api_name="stop_inspect")
    map_outputs = [overlay, code, query]
    query.submit(on_query, [state, query, one_step, step], map_outputs, api_name="show_map")
    words.input(on_query, [state, words, one_step, step], map_outputs, **PRIVATE)
    tokens.input(on_query, [state, tokens, one_step, step], map_outputs, **PRIVATE)
    one_step.input(on_query, [state, query, one_step, step], map_outputs, **PRIVATE)
    step.release(on_query, [state, query, one_step, step], map_outputs, **PRIVATE)
    make_grid.click(on_grid, [state], [grid_image, files], api_name="grid")


# ---- emphasise -------------------------------------------------------------------------------------------------
def _slider_updates(prompt: str) -> list:
    """The per-word sliders for ``prompt`` (labels, weights, visibility), a note, and the compare choices."""
    try:
        words = jobs.prompt_words(prompt)
        scheduled = bool(prompt) and jobs.pc.parse_prompt(prompt).is_scheduled
    except (ValueError, TypeError) as error:
        return [gr.update(visible=False)] * MAX_SLIDERS + [f"*{page_message(error)}*", gr.update()]
    shown = [] if scheduled else words[:MAX_SLIDERS]
    sliders = [gr.update(visible=True, label=w, value=weight) for w, weight in shown]
    sliders += [gr.update(visible=False)] * (MAX_SLIDERS - len(sliders))
    if scheduled:
        note = "*This prompt uses prompt editing: set its weights in the syntax.*"
    elif len(words) > MAX_SLIDERS:
        note = f"*Sliders for the first {MAX_SLIDERS} words; the others keep the weights the syntax gives them.*"
    else:
        note = "*Move a slider to rewrite the prompt's weight syntax.*"
    choices = list(dict.fromkeys(w.lower() for w, _ in words))
    return sliders + [note, gr.update(choices=[""] + choices)]


def _emphasise_tab(runner: Runner):
    """The tab; returns (prompt box, slider outputs, their update function) for the page's load event."""
    with gr.Row():
        with gr.Column(scale=1):
            prompt = gr.Textbox("a red circle and a (blue:1.5) square", lines=2, elem_id="emphasise-prompt",
                                label="prompt with weights: (word:1.5), (word), [word], word+, word-")
            with gr.Group():
                note = gr.Markdown()
                with gr.Row():
                    sliders = [gr.Slider(0, 3, 1, step=0.05, visible=False, min_width=120)
                               for _ in range(MAX_SLIDERS)]
            with gr.Row():
                compare_word = gr.Dropdown([""], value="", label="compare one word at several weights",
                                           allow_custom_value=True, elem_id="emphasise-compare")
                compare_values = gr.Textbox("0.5, 1, 2", label="its weights", elem_id="emphasise-values")
            with gr.Row():
                mode = gr.Radio(["attention", "softmax", "embedding"], value="attention", label="mode")
                seed = gr.Number(0, label="seed", precision=0, minimum=0)
            with gr.Row():
                steps = gr.Slider(1, 100, 20, step=1, label="steps")
                guidance = gr.Slider(0, 15, 7.5, step=0.5, label="guidance")
            with gr.Row():
                run = gr.Button("Generate", variant="primary", elem_id="emphasise-run")
                stop = gr.Button("Stop", variant="stop")
        with gr.Column(scale=1):
            gallery = gr.Gallery(label="the same seed: plain prompt, as written, each compared weight", columns=3,
                                 format="png", type="pil", elem_id="emphasise-gallery", height=300)
            files = gr.File(label="files", file_count="multiple", interactive=False)
    code = gr.Code(label="the Python that reproduces this", language="python", buttons=["copy", "download"])
    record = gr.JSON(label="run record")

    def on_prompt(prompt_):
        return _slider_updates(prompt_)

    def on_slider(prompt_, *weights):
        with shown_in_page():
            count = min(len(jobs.prompt_words(prompt_)), MAX_SLIDERS)
            return jobs.with_weights(prompt_, {i: weights[i] for i in range(count)})

    def on_generate(prompt_, mode_, seed_, steps_, guidance_, word_, values_, progress=gr.Progress()):
        with shown_in_page():
            result = jobs.emphasise(runner, prompt_, mode=mode_, seed=seed_, steps=steps_, guidance=guidance_,
                                    compare_word=word_, compare_values=values_, progress=progress)
        pictures = [(jobs.enlarge(i), p) for i, p in zip(result.images, result.prompts)]
        return pictures, _files(result.files), result.code, result.record

    slider_outputs = sliders + [note, compare_word]
    prompt.change(on_prompt, [prompt], slider_outputs, api_name="words", queue=False)
    for slider in sliders:
        slider.release(on_slider, [prompt] + sliders, [prompt], **PRIVATE)
    inputs = [prompt, mode, seed, steps, guidance, compare_word, compare_values]
    event = run.click(on_generate, inputs, [gallery, files, code, record], api_name="emphasise", **PIPELINE)
    stop.click(runner.stop, None, None, cancels=[event], queue=False, api_name="stop_emphasise")
    return prompt, slider_outputs, on_prompt


# ---- edit --------------------------------------------------------------------------------------------------------
def _edit_tab(runner: Runner) -> None:
    with gr.Row():
        with gr.Column(scale=1):
            source = gr.Textbox(EXAMPLE, label="source prompt (the caption, for an uploaded image)", lines=2,
                                elem_id="edit-source")
            edits = gr.Textbox("a green circle on the left and a blue square on the right\n"
                               "a red triangle on the left and a blue square on the right",
                               label="edited prompts, one per line", lines=3, elem_id="edit-edits")
            with gr.Row():
                cross = gr.Slider(0, 1, 0.8, step=0.05, label="cross_steps: source's cross-attention")
                self_ = gr.Slider(0, 1, 0.4, step=0.05, label="self_steps: source's self-attention")
            with gr.Row():
                blend = gr.Textbox("", label="blend words (comma separated): only their region changes",
                                   elem_id="edit-blend")
                threshold = gr.Slider(0, 1, 0.3, step=0.05, label="blend threshold", elem_id="edit-threshold")
            with gr.Row():
                reweight = gr.Textbox("", label="reweight in the edits: green=1.5, square=0.5")
                mode = gr.Radio(["auto", "replace", "refine"], value="auto", label="edit mode")
            with gr.Row():
                seed = gr.Number(0, label="seed", precision=0, minimum=0)
                steps = gr.Slider(1, 100, 20, step=1, label="steps")
                guidance = gr.Slider(0, 15, 7.5, step=0.5, label="guidance")
            with gr.Accordion("edit an uploaded image (inverted first)", open=False):
                upload = gr.Image(label="image (leave empty to generate the source)", type="pil",
                                  sources=["upload", "clipboard"], format="png")
                with gr.Row():
                    method = gr.Radio(["null-text", "ddim"], value="null-text", label="inversion")
                    resize = gr.Checkbox(True, label="resize to the model's size")
            with gr.Row():
                run = gr.Button("Edit", variant="primary", elem_id="edit-run")
                stop = gr.Button("Stop", variant="stop")
        with gr.Column(scale=1):
            gallery = gr.Gallery(label="source, then each edit (same noise)", columns=3, format="png", type="pil",
                                 elem_id="edit-gallery", height=300)
            masks = gr.Gallery(label="blend masks: white = the edit may change the source", columns=3,
                               format="png", type="pil", elem_id="edit-masks", height=300)
            files = gr.File(label="files", file_count="multiple", interactive=False)
    code = gr.Code(label="the Python that reproduces this", language="python", buttons=["copy", "download"])
    record = gr.JSON(label="run record")

    def on_edit(source_, edits_, cross_, self__, blend_, threshold_, reweight_, mode_, seed_, steps_, guidance_,
                upload_, method_, resize_, progress=gr.Progress(track_tqdm=True)):
        with shown_in_page():
            result = jobs.edit(runner, source_, edits_, cross_steps=cross_, self_steps=self__, blend=blend_,
                               blend_threshold=threshold_, reweight=reweight_, mode=mode_, seed=seed_, steps=steps_,
                               guidance=guidance_, image=upload_, invert_method=method_, resize=resize_,
                               progress=progress)
        pictures = [(jobs.enlarge(i), p) for i, p in zip(result.images, result.prompts)]
        shown_masks = [(jobs.enlarge(m), p) for m, p in zip(result.masks, result.prompts[1:])]
        return pictures, shown_masks, _files(result.files), result.code, result.record

    inputs = [source, edits, cross, self_, blend, threshold, reweight, mode, seed, steps, guidance, upload, method,
              resize]
    event = run.click(on_edit, inputs, [gallery, masks, files, code, record], api_name="edit", **PIPELINE)
    stop.click(runner.stop, None, None, cancels=[event], queue=False, api_name="stop_edit")


# ---- the page --------------------------------------------------------------------------------------------------
def build_demo(runner: Runner) -> gr.Blocks:
    """The whole page for ``runner``'s pipeline, its queue set (one pipeline request at a time)."""
    with gr.Blocks(title="promptcontrol", analytics_enabled=False, delete_cache=(3600, 86400)) as demo:
        gr.Markdown(f"## promptcontrol — inspect, emphasise and edit the cross-attention\n"
                    f"Model: **{runner.model or 'embedded toy model'}** on **{runner.device}**. Every result shows "
                    "the Python that reproduces it and its run record.")
        with gr.Tabs():
            with gr.Tab("Inspect", id="inspect"):
                _inspect_tab(runner)
            with gr.Tab("Emphasise", id="emphasise"):
                prompt, slider_outputs, on_prompt = _emphasise_tab(runner)
            with gr.Tab("Edit", id="edit"):
                _edit_tab(runner)
        demo.load(on_prompt, [prompt], slider_outputs, queue=False, **PRIVATE)
    demo.queue(default_concurrency_limit=1)
    return demo

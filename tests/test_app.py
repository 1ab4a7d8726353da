"""`promptcontrol app`: the jobs called directly, the server driven through gradio_client, and one real browser.

Skipped with a reason where Gradio (the `[app]` extra), selenium or a Chromium browser is missing:
`bash scripts/setup_app.sh` installs all three.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import promptcontrol as pc

HAS_GRADIO = importlib.util.find_spec("gradio") is not None
needs_gradio = pytest.mark.skipif(not HAS_GRADIO, reason='gradio is not installed: pip install -e ".[app]" '
                                  "(or bash scripts/setup_app.sh)")
LOAD = "pipe = pc.testing.tiny_pipeline('sd15')"  # the snippets' load line: the same tiny pipeline, rebuilt
PROMPT = "a red circle and a red square"
STEPS = 3


def snapshot(pipe):
    """What a request could leave on the pipeline, by identity (written apart from the app's own guard)."""
    unet = pipe.unet
    return (
        {k: id(v) for k, v in unet.attn_processors.items()},
        (dict(unet._forward_pre_hooks), dict(unet._forward_hooks), dict(unet._forward_pre_hooks_with_kwargs)),
        sorted(k for k in vars(pipe) if k == "encode_prompt"),
        sorted(k for k in vars(pipe.scheduler) if k in ("step", "set_timesteps")),
        sorted(n for n in vars(unet) if n.startswith("_promptcontrol")),
    )


def pixels(image) -> np.ndarray:
    return np.asarray(Image.open(image) if isinstance(image, (str, Path)) else image.convert("RGB"), dtype=np.int16)


def run_snippet(code: str, folder: Path, monkeypatch) -> dict:
    """Execute a page's reproducing snippet in ``folder`` (a fresh namespace); returns that namespace."""
    monkeypatch.chdir(folder)
    namespace: dict = {}
    exec(compile(code, "reproduce.py", "exec"), namespace)
    return namespace


class GatedRunner:
    """Builds a Runner whose first denoising step can be held until the test opens the gate."""

    @staticmethod
    def make(pipe, workdir):
        from promptcontrol.app.runner import Runner

        class Gated(Runner):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                self.hold, self.entered, self.gate, self.started = False, threading.Event(), threading.Event(), 0

            def job(self):
                self.started += 1
                return super().job()

            def step_callback(self, progress, total, offset=0, what="step"):
                inner = super().step_callback(progress, total, offset, what)

                def callback(p, index, timestep, kwargs):
                    if self.hold and index == 0:
                        self.entered.set()
                        self.gate.wait(60)
                    return inner(p, index, timestep, kwargs)

                return callback

            def release(self):
                self.hold = False
                self.gate.set()

        return Gated(pipe, model="tiny sd15", load=LOAD, workdir=workdir)


@pytest.fixture
def runner(tiny_pipes, tmp_path):
    from promptcontrol.app.runner import Runner

    return Runner(tiny_pipes("sd15"), model="tiny sd15", load=LOAD, workdir=tmp_path / "work")


# ---- the package and the command ----------------------------------------------------------------------------------
def test_core_package_does_not_import_gradio():
    script = ("import sys, promptcontrol, promptcontrol.app; "
              "print(sorted(m for m in sys.modules if m == 'gradio' or m.startswith('gradio.')))")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]"


def test_app_without_gradio_says_how_to_install_it():
    script = ("import sys; sys.modules['gradio'] = None\n"  # import gradio now raises ImportError
              "from promptcontrol.app import main\n"
              "try:\n    main([])\nexcept SystemExit as e:\n    print(e.code)\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True)
    assert 'pip install -e ".[app]"' in out.stdout


def test_command_line_defaults_and_host_warning(monkeypatch):
    from promptcontrol.app import launch

    args = launch.build_parser().parse_args([])
    assert (args.host, args.port, args.model, args.device) == ("127.0.0.1", 7860, None, "auto")
    text = launch.build_parser().format_help()
    assert "0.0.0.0" in text and "no login" in text
    seen = {}
    monkeypatch.setattr(launch, "_gradio", lambda: None)  # the options are read before the page is built
    monkeypatch.setattr(launch, "make_runner", lambda model, device, dtype: seen.update(load=(model, device, dtype)))
    monkeypatch.setattr(launch, "serve", lambda runner, **kw: seen.update(serve=kw))
    assert launch.main(["--model", "some/model", "--device", "cpu", "--host", "0.0.0.0", "--port", "8000"]) == 0
    assert seen == {"load": ("some/model", "cpu", None), "serve": {"host": "0.0.0.0", "port": 8000, "block": True}}


def test_load_line_names_the_model():
    from promptcontrol.app.runner import load_code

    assert load_code() == "pipe = pc.load_pipeline()"
    assert load_code("a/b", "cuda", "float16") == "pipe = pc.load_pipeline('a/b', device='cuda', dtype='float16')"


# ---- the jobs, called directly ----------------------------------------------------------------------------------
def test_inspect_maps_and_the_code_that_reproduces_them(runner, tmp_path, monkeypatch):
    from promptcontrol.app import jobs

    run = jobs.inspect(runner, PROMPT, seed=3, steps=STEPS, guidance=5.0, per_step=True)  # not the defaults
    assert run.words == ["a (1)", "red (1)", "circle", "and", "a (2)", "red (2)", "square"]
    assert [q for _, q in run.tokens(runner.tokenizer)] == ["<start>"] + [f"#{p}" for p in range(1, 8)] + [
        "<end>", "<padding>"]
    assert sorted(p.name for p in run.files) == ["image.png", "maps.safetensors", "reproduce.py", "run.json"]
    assert json.loads((run.folder / "run.json").read_text())["parameters"]["seed"] == 3

    shown, code = jobs.show_map(run, "red (2)", step=1)
    done = run_snippet(code, tmp_path, monkeypatch)  # the snippet, run on its own tiny pipeline
    assert (pixels(done["image"]) == pixels(run.image)).all()
    assert torch.equal(done["maps"].to_tensor(), run.maps.to_tensor())
    expected = done["step_maps"].word("red", occurrence=2).overlay(done["image"])
    assert (pixels(shown) == pixels(jobs.enlarge(expected))).all()
    assert not (pixels(shown) == pixels(jobs.show_map(run, "red (2)")[0])).all()  # one step is not all steps


@pytest.mark.parametrize("query, expected", [("#3", lambda m: m.token(3)), ("<end>", lambda m: m.special("end")),
                                             ("red square", lambda m: m["red square"]),
                                             ("a (2)", lambda m: m.word("a", occurrence=2))])
def test_show_map_reads_words_phrases_occurrences_and_tokens(runner, query, expected):
    from promptcontrol.app import jobs

    run = jobs.inspect(runner, PROMPT, steps=2)
    shown, _ = jobs.show_map(run, query)
    assert (pixels(shown) == pixels(jobs.enlarge(expected(run.maps).overlay(run.image)))).all()


def test_show_map_errors_are_the_apis(runner):
    from promptcontrol.app import jobs

    run = jobs.inspect(runner, PROMPT, steps=2)
    with pytest.raises(KeyError) as direct:
        run.maps["cirle"]
    with pytest.raises(KeyError) as shown:
        jobs.show_map(run, "cirle")
    assert shown.value.args[0] == direct.value.args[0] and "did you mean 'circle'" in shown.value.args[0]
    with pytest.raises(ValueError, match="no per-step maps were recorded"):
        jobs.show_map(run, "red", step=0)


def test_grid_is_written_beside_the_files(runner):
    from promptcontrol.app import jobs

    run = jobs.inspect(runner, PROMPT, steps=2)
    path = jobs.grid(run)
    assert path in run.files and Image.open(path).size[0] > run.image.size[0] * len(run.words)


def test_progress_is_reported_for_every_step(runner):
    from promptcontrol.app import jobs

    seen = []
    jobs.inspect(runner, PROMPT, steps=STEPS, progress=lambda fraction, desc=None: seen.append(fraction))
    assert seen == [0.0] + [pytest.approx((i + 1) / STEPS) for i in range(STEPS)]


def test_word_sliders_round_trip_through_the_syntax():
    from promptcontrol.app import jobs

    assert jobs.prompt_words("a ((red)) circle") == [("a", 1.0), ("red", pytest.approx(1.21)), ("circle", 1.0)]
    written = jobs.with_weights(r"a \(red\) circle and a (blue:1.5) square", {2: 0.5})
    parsed = pc.parse_prompt(written)
    assert parsed.prompt == "a (red) circle and a blue square"  # escaped parentheses stay literal text
    assert [(w.text, w.weight) for w in parsed.words] == [("circle", 0.5), ("blue", 1.5)]
    with pytest.raises(ValueError, match="prompt editing"):
        jobs.with_weights("a [red:blue:0.5] circle", {0: 2.0})


def test_emphasise_same_seed_at_each_weight_and_its_code(runner, tmp_path, monkeypatch):
    from promptcontrol.app import jobs

    result = jobs.emphasise(runner, "a red circle and a (blue:1.5) square", steps=2, seed=4, guidance=6.0,
                            compare_word="blue", compare_values="0.5, 2")
    assert result.prompts == ["a red circle and a blue square", "a red circle and a (blue:1.5) square",
                              "a red circle and a (blue:0.5) square", "a red circle and a (blue:2.0) square"]
    done = run_snippet(result.code, tmp_path, monkeypatch)
    assert all((pixels(a) == pixels(b)).all() for a, b in zip(done["images"], result.images))
    alone = pc.generate(runner.pipe, result.prompts[3], seed=4, num_inference_steps=2, guidance_scale=6.0)[0]
    assert (pixels(alone) == pixels(result.images[3])).all()
    assert not (pixels(result.images[0]) == pixels(result.images[3])).all()  # the weight changed the picture


def test_emphasise_bad_syntax_and_unknown_word_are_the_apis_messages(runner):
    from promptcontrol.app import jobs

    with pytest.raises(ValueError) as direct:
        pc.parse_prompt("a red.swap(blue) circle")
    with pytest.raises(ValueError) as shown:
        jobs.emphasise(runner, "a red.swap(blue) circle", steps=1)
    assert str(shown.value) == str(direct.value)
    with pytest.raises(KeyError, match="'green' is not in the prompt .*its words are: a, red, circle"):
        jobs.emphasise(runner, "a red circle", steps=1, compare_word="green", compare_values="2")


def test_edit_same_noise_blend_mask_and_its_code(runner, tmp_path, monkeypatch):
    from promptcontrol.app import jobs

    result = jobs.edit(runner, "a red circle", "a green circle\na red circle on grass", blend="circle", steps=STEPS,
                       seed=2, guidance=5.0, reweight="green=1.5", cross_steps=0.0, self_steps=0.0, blend_threshold=0.8)
    assert result.prompts == ["a red circle", "a green circle", "a red circle on grass"] and len(result.masks) == 2
    done = run_snippet(result.code, tmp_path, monkeypatch)
    assert all((pixels(a) == pixels(b)).all() for a, b in zip(done["out"].images, result.images))
    masks = done["masks"]  # (images, 1, h, w) bool
    assert any(not torch.equal(masks[0] | masks[i], masks[i]) for i in (1, 2))  # so the union matters here
    for i, shown in enumerate(result.masks, start=1):
        union = (masks[0, 0] | masks[i, 0]).numpy()
        expected = np.kron(union, np.ones((result.images[0].height // union.shape[0],) * 2)) * 255
        assert (pixels(shown)[..., 0] == expected).all()


def test_edit_of_an_uploaded_image_inverts_it_first(runner, tmp_path, monkeypatch):
    from promptcontrol.app import jobs

    upload = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 48, 3), dtype=np.uint8))
    result = jobs.edit(runner, "a red circle", "a green circle", steps=2, guidance=5.0, image=upload,
                       invert_method="ddim")
    assert Image.open(result.folder / "input.png").size == runner.image_size()  # resized to the model's size
    assert "pc.invert(pipe, 'input.png', 'a red circle', steps=2, method='ddim'" in result.code
    shutil.copy(result.folder / "input.png", tmp_path / "input.png")
    done = run_snippet(result.code, tmp_path, monkeypatch)
    assert all((pixels(a) == pixels(b)).all() for a, b in zip(done["out"].images, result.images))


def test_failed_and_stopped_requests_leave_nothing_installed(runner):
    from promptcontrol.app import jobs
    from promptcontrol.app.runner import Stopped

    pipe = runner.pipe
    before = snapshot(pipe)
    with pytest.raises(KeyError, match="LocalBlend word 'circle' is not in the edited prompt 1"):  # inside the run
        jobs.edit(runner, "a red circle", "a blue square", blend="circle", steps=2)
    assert snapshot(pipe) == before

    def stop_at_first_report(fraction, desc=None):
        if fraction > 0:
            runner.stop()

    with pytest.raises(Stopped, match="stopped at step 2 of 3"):
        jobs.inspect(runner, PROMPT, steps=3, progress=stop_at_first_report)
    assert snapshot(pipe) == before
    assert jobs.inspect(runner, PROMPT, steps=1).image.size == (32, 32)  # the next request runs as usual


def test_guard_names_what_a_request_left_installed(runner):
    from promptcontrol.app.guard import PipelineLeftChanged

    handle = None
    try:
        with pytest.raises(PipelineLeftChanged, match="forward hooks on .*<unet>"):
            with runner.job():
                handle = runner.pipe.unet.register_forward_pre_hook(lambda module, args: None)
    finally:
        if handle is not None:
            handle.remove()


def test_bad_settings_are_refused_before_any_work(runner):
    from promptcontrol.app import jobs

    for kwargs, message in [(dict(steps=0), "steps must be a whole number from 1"),
                            (dict(seed=-1), "the seed must be a whole number"),
                            (dict(guidance=float("nan")), "guidance must be a finite number")]:
        with pytest.raises(ValueError, match=message):
            jobs.inspect(runner, PROMPT, **kwargs)
    with pytest.raises(ValueError, match="the prompt is empty"):
        jobs.inspect(runner, "   ")
    with pytest.raises(ValueError, match="the weight of 'green' is not a number"):
        jobs.edit(runner, "a red circle", "a green circle", reweight="green=lots")
    assert not any(runner.workdir.glob("*-inspect"))


# ---- the server, through gradio_client ---------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_pipes, tmp_path_factory):
    """The page on a free localhost port, serving the tiny SD 1.5 pipeline through a gated runner."""
    if not HAS_GRADIO:
        pytest.skip('gradio is not installed: pip install -e ".[app]" (or bash scripts/setup_app.sh)')
    from promptcontrol.app.launch import serve

    runner = GatedRunner.make(tiny_pipes("sd15"), tmp_path_factory.mktemp("app"))
    port = _free_port()
    demo = serve(runner, host="127.0.0.1", port=port, block=False)
    yield runner, f"http://127.0.0.1:{port}/", demo
    runner.release()
    demo.close()


@pytest.fixture
def client(server):
    from gradio_client import Client

    runner, url, _ = server
    runner.hold, runner.entered, runner.gate = False, threading.Event(), threading.Event()
    return Client(url, verbose=False)


INSPECT = dict(api_name="/inspect")


def _inspect_args(prompt=PROMPT, per_step=False):
    return (prompt, 0, STEPS, 7.5, per_step, "word")


@needs_gradio
def test_server_binds_localhost_without_share_link(server):
    runner, url, demo = server
    assert url.startswith("http://127.0.0.1:") and demo.share is False and demo.share_url is None
    pipeline_events = [fn for fn in demo.fns.values() if fn.api_name in ("inspect", "emphasise", "edit")]
    assert len(pipeline_events) == 3
    assert {(fn.concurrency_id, fn.concurrency_limit) for fn in pipeline_events} == {("pipeline", 1)}


@needs_gradio
def test_client_inspect_then_click_words(client):
    outputs = client.predict(*_inspect_args(per_step=True), **INSPECT)
    image, words, tokens, query, overlay, one_step, step, files, code, record, grid = outputs
    assert one_step["visible"] and step["maximum"] == STEPS - 1 and not grid["visible"]
    assert [value for _, value in words["choices"]] == ["a (1)", "red (1)", "circle", "and", "a (2)", "red (2)",
                                                        "square"]
    assert query == "a (1)" and record["parameters"]["prompt"] == PROMPT and record["model"] == "tiny sd15"
    assert sorted(Path(f).name for f in files) == ["image.png", "maps.safetensors", "reproduce.py", "run.json"]
    assert Image.open(image).size == (256, 256)  # 32² enlarged for the page
    shown, code_text, query = client.predict("square", True, 1, api_name="/show_map")
    assert query == "square" and "tr.heatmaps(steps=[1]" in code_text and "step_maps['square']" in code_text
    grid, files = client.predict(api_name="/grid")
    assert grid["visible"] and Image.open(grid["value"]).size[0] > 32 * 7
    assert "grid.png" in [Path(f).name for f in files]


@needs_gradio
def test_client_shows_the_apis_error_message(client, server):
    from gradio_client.exceptions import AppError

    from promptcontrol.app import jobs

    with pytest.raises(KeyError) as unknown_word:
        jobs.inspect(server[0], PROMPT, steps=1).maps["cirle"]
    with pytest.raises(ValueError) as bad_syntax:
        pc.parse_prompt("a red.swap(blue) circle")
    client.predict(*_inspect_args(), **INSPECT)
    with pytest.raises(AppError) as shown:
        client.predict("cirle", False, 0, api_name="/show_map")
    assert str(shown.value) == unknown_word.value.args[0] and "did you mean 'circle'?" in str(shown.value)
    with pytest.raises(AppError) as shown:
        client.predict("a red.swap(blue) circle", "attention", 0, 1, 7.5, "", "", api_name="/emphasise")
    assert str(shown.value) == str(bad_syntax.value)


@needs_gradio
def test_client_emphasise_and_edit(client):
    gallery, files, code, record = client.predict("a red circle and a (blue:1.5) square", "attention", 0, 2, 7.5,
                                                  "blue", "2", api_name="/emphasise")
    assert [item["caption"] for item in gallery] == ["a red circle and a blue square",
                                                     "a red circle and a (blue:1.5) square",
                                                     "a red circle and a (blue:2.0) square"]
    assert "pc.generate(pipe, prompt, seed=0, mode='attention'" in code and record["job"] == "emphasise"
    gallery, masks, files, code, record = client.predict(
        "a red circle", "a green circle", 0.8, 0.4, "circle", 0.3, "green=1.5", "auto", 0, STEPS, 7.5, None,
        "null-text", True, api_name="/edit")
    assert [item["caption"] for item in gallery] == ["a red circle", "a green circle"] and len(masks) == 1
    assert record["parameters"]["reweight"] == {"green": 1.5} and "blend = pc.LocalBlend(['circle']" in code


@needs_gradio
def test_second_request_waits_in_the_queue(client, server):
    from gradio_client.utils import Status

    runner = server[0]
    started = runner.started
    runner.hold = True
    first = client.submit(*_inspect_args("a red circle"), **INSPECT)
    try:
        assert runner.entered.wait(60)
        second = client.submit(*_inspect_args("a blue square"), **INSPECT)
        for _ in range(300):  # until the queue has it (bounded wait, no timing asserted)
            if second.status().code == Status.IN_QUEUE:
                break
            time.sleep(0.1)
        assert second.status().code == Status.IN_QUEUE and runner.started == started + 1  # held back, not started
    finally:
        runner.release()
    assert first.result(timeout=60)[-2]["parameters"]["prompt"] == "a red circle"
    assert second.result(timeout=60)[-2]["parameters"]["prompt"] == "a blue square"  # queued, not lost
    assert runner.started == started + 2


@needs_gradio
def test_stop_mid_run_leaves_nothing_installed(client, server):
    from gradio_client.exceptions import AppError

    runner = server[0]
    before = snapshot(runner.pipe)
    runner.hold = True
    job = client.submit(*_inspect_args(), **INSPECT)
    try:
        assert runner.entered.wait(60)
        client.predict(api_name="/stop_inspect")
    finally:
        runner.release()
    with pytest.raises(AppError, match="stopped at step 1 of 3; nothing was kept"):
        job.result(timeout=60)
    assert snapshot(runner.pipe) == before
    assert client.predict(*_inspect_args(), **INSPECT)[-2]["job"] == "inspect"


# ---- a real browser -----------------------------------------------------------------------------------------------
def _browser():
    """(chromium, chromedriver) paths, or a skip saying what is missing."""
    if importlib.util.find_spec("selenium") is None:
        pytest.skip("selenium is not installed: bash scripts/setup_app.sh (or pip install selenium)")
    chromium = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
    driver = shutil.which("chromedriver")
    if chromium is None or driver is None:
        pytest.skip("no Chromium browser and driver: apt-get install chromium chromium-driver "
                    "(or bash scripts/setup_app.sh)")
    return chromium, driver


@needs_gradio
def test_browser_runs_an_inspect_and_shows_the_image(server, tmp_path):
    chromium, driver_path = _browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    runner, url, _ = server
    runner.hold = False
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1280,1400", "--force-device-scale-factor=1"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        driver.get(url)
        wait = WebDriverWait(driver, 60)
        wait.until(ec.element_to_be_clickable((By.ID, "inspect-run")))
        box = driver.find_element(By.CSS_SELECTOR, "#inspect-prompt textarea")
        box.clear()
        box.send_keys("a blue square and a red circle")
        driver.find_element(By.ID, "inspect-run").click()
        picture = wait.until(ec.visibility_of_element_located((By.CSS_SELECTOR, "#inspect-image img")))
        wait.until(ec.visibility_of_element_located((By.CSS_SELECTOR, "#inspect-map img")))
        wait.until(lambda d: [e.text.strip() for e in d.find_elements(By.CSS_SELECTOR, "#inspect-words label")]
                   == ["a (1)", "blue", "square", "and", "a (2)", "red", "circle"])
        wait.until(lambda d: picture.get_attribute("complete") == "true" and
                   int(picture.get_attribute("naturalWidth")) == 256)
        shot = tmp_path / "inspect.png"
        assert driver.save_screenshot(str(shot))
        rect = picture.rect
    finally:
        driver.quit()
    screenshot = Image.open(shot).convert("RGB")
    assert screenshot.size[0] >= 1000
    drawn = screenshot.crop((round(rect["x"]), round(rect["y"]), round(rect["x"] + rect["width"]),
                             round(rect["y"] + rect["height"])))
    newest = sorted(runner.workdir.glob("*-inspect"))[-1]
    expected = Image.open(newest / "image.png").convert("RGB").resize(drawn.size, Image.NEAREST)
    assert np.abs(pixels(drawn) - pixels(expected)).mean() < 12  # the page drew the generated image

"""``promptcontrol app``: a local web page for the three jobs (inspect, emphasise, edit), built on Gradio.

Gradio is an optional extra (``pip install -e ".[app]"``); nothing here imports it until the page is built, and
the core package never imports this package. The pieces, each usable on its own:

* :mod:`.runner` — one pipeline, one job at a time, stop between steps, nothing left installed (checked);
* :mod:`.jobs` — the jobs as plain functions over the public API (``pc.trace``, ``pc.generate``, ``pc.edit``,
  ``pc.invert``), each returning its pictures, the Python code that reproduces them and a run record;
* :mod:`.code` — that code; :mod:`.records` — the run record;
* :mod:`.ui` — the Gradio layout (three tabs) over the jobs; :mod:`.launch` — the command line.
"""

from __future__ import annotations


def main(argv: list[str] | None = None) -> int:
    """``promptcontrol app [--model M] [--device D] [--host H] [--port P]``: load the pipeline, serve the page."""
    from .launch import main as launch_main

    return launch_main(argv)


__all__ = ["main"]

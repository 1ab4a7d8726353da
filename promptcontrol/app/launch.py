"""``promptcontrol app``: load the pipeline, build the page, serve it on 127.0.0.1 (no share link, ever)."""

from __future__ import annotations

import argparse
import os
import sys

HOST_HELP = (
    "address to listen on (default 127.0.0.1: only this machine can open the page). --host 0.0.0.0 listens on "
    "every network interface: anyone who can reach this machine on --port can use the app — run the model on "
    "your CPU/GPU, upload images, read the results — with no login and no encryption. To use it from another "
    "machine, prefer an SSH tunnel (ssh -L 7860:127.0.0.1:7860 host) or a reverse proxy with authentication"
)
INSTALL_HINT = 'the web app needs the [app] extra: pip install -e ".[app]" (or pip install "promptcontrol[app]")'


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="promptcontrol app",
        description="A local web page to inspect, emphasise and edit the cross-attention of a Stable Diffusion "
                    "pipeline (Gradio). Binds to 127.0.0.1; no share link is made.",
    )
    parser.add_argument("--model", default=None,
                        help="hub id or local pipeline folder (default: the embedded toy model)")
    parser.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cuda, mps or cpu")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    parser.add_argument("--host", default="127.0.0.1", help=HOST_HELP)
    parser.add_argument("--port", type=int, default=7860, help="port to listen on (default 7860)")
    return parser


def _gradio():
    """Import Gradio (its analytics off: the app makes no call outside this machine) or explain how to get it."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    try:
        import gradio
    except ImportError as error:
        raise SystemExit(f"promptcontrol app: error: {INSTALL_HINT}") from error
    return gradio


def make_runner(model: str | None = None, device: str | None = None, dtype: str | None = None):
    """Load the pipeline as ``pc.load_pipeline`` does and wrap it in a :class:`Runner`."""
    import promptcontrol as pc

    from .runner import Runner, load_code

    pipe = pc.load_pipeline(model, device=device, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return Runner(pipe, model=model, load=load_code(model, device, dtype))


def serve(runner, *, host: str = "127.0.0.1", port: int = 7860, block: bool = True):
    """Build the page for ``runner`` and serve it; returns the Gradio app (in the background unless ``block``)."""
    _gradio()
    from .ui import build_demo

    demo = build_demo(runner)
    demo.launch(server_name=host, server_port=port, share=False, prevent_thread_lock=not block, show_error=True,
                quiet=not block, footer_links=["api"], ssr_mode=False, mcp_server=False,
                allowed_paths=[str(runner.workdir)])
    return demo


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _gradio()  # before loading the model: a missing extra is said at once
    device = None if args.device == "auto" else args.device
    dtype = None if args.dtype == "auto" else args.dtype
    try:
        runner = make_runner(args.model, device, dtype)
    except (OSError, ValueError) as error:
        print(f"promptcontrol app: error: {error}", file=sys.stderr)
        return 2
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"promptcontrol app: listening on {args.host}: anyone who can reach this machine on port {args.port} "
              "can use the app (no login)", file=sys.stderr)
    print(f"promptcontrol app: http://{'127.0.0.1' if args.host == '0.0.0.0' else args.host}:{args.port} "
          "(Ctrl-C to stop)", file=sys.stderr)
    try:
        serve(runner, host=args.host, port=args.port, block=True)
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

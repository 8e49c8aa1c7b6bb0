"""Serve the cones web page on this machine: find concepts, generate with them, look inside.

  cones app                                   # the embedded model, on http://127.0.0.1:7860
  cones app --model path/to/stable-diffusion-v1-5 --port 7861

Needs the optional extra: pip install "cones[app]". Concepts found in the page are written to --workdir.
"""

from __future__ import annotations

from cones.cli._options import add_model_arguments

NAME = "app"
HELP = "serve a web page (Gradio) to find concepts, generate with them and see their attention maps"


def add_arguments(p) -> None:
    add_model_arguments(p, dtype=False)
    p.add_argument(
        "--host", default="127.0.0.1", help="address to serve on (default: %(default)s, this machine only)"
    )
    p.add_argument("--port", type=int, default=7860, help="port (default: %(default)s)")
    p.add_argument(
        "--workdir", default="cones-app", help="folder for the concepts found (default: %(default)s)"
    )


def run(args) -> int:
    from cones.cli import UsageError

    try:
        import gradio  # noqa: F401
    except ImportError:
        raise UsageError('the app needs Gradio; install it with: pip install "cones[app]"') from None
    from cones.app import launch

    print(f"cones app: loading the model; then open http://{args.host}:{args.port}", flush=True)
    launch(
        args.model,
        config=args.config,
        device=args.device,
        host=args.host,
        port=args.port,
        workdir=args.workdir,
        block=True,
    )
    return 0

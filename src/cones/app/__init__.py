"""`cones app`: a Gradio page on localhost to find concepts, generate with them and look inside.

    pip install "cones[app]"
    cones app                                # the embedded model, http://127.0.0.1:7860
    cones app --model path/to/sd-v1-5 --port 7861

The page has three tabs. **Find**: upload 3-5 pictures (or pick one of the model's example subjects),
name the identifier and the class, and search, watching the loss; cancel leaves nothing written; the
result is a `.cones` file to download and a before/after grid. **Generate**: shut one or several loaded
concepts and compare a prompt with and without them, seed by seed. **Inside**: each word's
cross-attention map before and after shutting. The model is loaded once; concepts switch per request.
"""

from __future__ import annotations

__all__ = ["launch", "serve"]


def serve(studio, *, host: str = "127.0.0.1", port: int = 7860, block: bool = True):
    """Start the page for `studio` on `host:port`; returns the Gradio app (running) when not `block`."""
    import os

    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from cones.app.ui import THEME, build_app

    app = build_app(studio)
    app.queue(default_concurrency_limit=1)
    app.launch(
        server_name=host,
        server_port=port,
        prevent_thread_lock=not block,
        share=False,
        inbrowser=False,
        show_error=False,
        ssr_mode=False,
        quiet=True,
        theme=THEME,
        footer_links=[],
        allowed_paths=[studio.workdir],
    )
    return app


def launch(model=None, *, config=None, device="cpu", host="127.0.0.1", port=7860, workdir=None, block=True):
    """Load `model` and serve the page (see the module's docstring)."""
    from cones.app.work import Studio

    studio = Studio.open(model, config=config, device=device, workdir=workdir)
    return serve(studio, host=host, port=port, block=block)

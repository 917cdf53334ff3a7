"""The standalone UI: the WebUI tab served by gradio on 127.0.0.1 (``python -m lib_loramerge ui``)."""

from __future__ import annotations

import os

from .host import Host

DEFAULT_PORT = 7870


def make_app(host: Host):
    """The tab inside a page of its own, queued (progress bars need gradio's queue)."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home from an offline tool
    import gradio as gr

    from .app import build_tab

    tab = build_tab(host)
    with gr.Blocks(title="LoRA Merge", analytics_enabled=False) as app:
        gr.Markdown("## LoRA Merge")
        tab.render()  # as A1111/Forge render an extension's tab
    app.queue()
    return app


def serve(host: Host, port: int = DEFAULT_PORT, *, block: bool = True):
    """Serve on 127.0.0.1:``port`` only (never on other interfaces); blocks until stopped unless ``block=False``."""
    app = make_app(host)
    app.launch(server_name="127.0.0.1", server_port=port, inbrowser=False, share=False, prevent_thread_lock=not block)
    return app

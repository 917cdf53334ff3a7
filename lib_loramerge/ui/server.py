"""The standalone UI: the WebUI tab served by gradio on 127.0.0.1 (``python -m lib_loramerge ui``)."""

from __future__ import annotations

import os
from pathlib import Path

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


def blocked_paths(host: Host) -> list[str]:
    """Folders gradio's ``/file=`` route must never serve from: the working directory (gradio 3 serves
    any file under it by default) and every folder holding the user's models. The tab itself serves
    no files, so nothing it needs is blocked."""
    folders = [Path.cwd(), *host.lora_dirs()]
    if host.checkpoint_dir() is not None:
        folders.append(host.checkpoint_dir())
    return [str(Path(f).resolve()) for f in dict.fromkeys(folders)]


def serve(host: Host, port: int = DEFAULT_PORT, *, block: bool = True):
    """Serve on 127.0.0.1:``port`` only (never on other interfaces); blocks until stopped unless ``block=False``."""
    app = make_app(host)
    app.launch(server_name="127.0.0.1", server_port=port, inbrowser=False, share=False, prevent_thread_lock=not block,
               blocked_paths=blocked_paths(host))
    return app

"""The "LoRA Merge" tab (gradio) and the hosts it runs in: A1111/Forge or the standalone ``ui`` command.

``build_tab`` needs gradio; importing this package does not.
"""

from .host import Host, StandaloneHost


def build_tab(host: Host):
    """The tab as a ``gr.Blocks`` (imports gradio)."""
    from .app import build_tab as build

    return build(host)


__all__ = ["Host", "StandaloneHost", "build_tab"]

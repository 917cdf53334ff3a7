"""WebUI glue: make lib_loramerge importable for the whole session and register the "LoRA Merge" tab.

A1111 puts an extension's root on sys.path only while its scripts load; handlers run later
and may import submodules lazily, so the root is added for good (at the end, so it never
shadows the WebUI's own modules).
"""

import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.append(_ROOT)

from modules import script_callbacks, scripts  # noqa: E402

import lib_loramerge  # noqa: E402,F401  (after the path fix, by design)
from lib_loramerge.webui import generation_params, on_model_loaded, on_ui_tabs  # noqa: E402

script_callbacks.on_ui_tabs(on_ui_tabs)
script_callbacks.on_model_loaded(on_model_loaded)


class LoraMergerLiveBake(scripts.Script):
    """Always on, no UI: writes an active live bake into each image's generation parameters."""

    def title(self):
        return "LoRA Merge: live bake"

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def ui(self, is_img2img):
        return []

    def process(self, p, *args):
        generation_params(p)

"""Build the tab under whatever gradio this interpreter has and check it the way a WebUI would use it.

Run in-process by the tests (gradio 3.41.2 in .venv) and as a script with .venv-gradio4's python
(gradio 4.40, as Forge ships): ``python tests/gradio_build.py`` prints ``ok gradio <version>``.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]


def choice_values(dropdown) -> list:
    return [c[0] if isinstance(c, (tuple, list)) else c for c in dropdown.choices]


def apply_update(block, update: dict) -> dict:
    """What gradio does with an update for ``block`` before sending it to the browser."""
    import gradio as gr
    from gradio.blocks import postprocess_update_dict

    if int(gr.__version__.split(".")[0]) >= 4:  # 4.x rebuilds the component from its arguments plus the update
        kwargs = {**block.constructor_args, **update, "render": False}
        for key in ("value", "__type__"):
            kwargs.pop(key, None)
        block = block.__class__(**kwargs)
    return postprocess_update_dict(block, dict(update))


def check_build(root: Path) -> str:
    import gradio as gr
    from uikit import checkpoint_folder, lora_folder

    from lib_loramerge.ui import StandaloneHost, build_tab
    from lib_loramerge.ui.app import ENERGY_CHART, MAX_ROWS, NORM_CHART
    from lib_loramerge.ui.handlers import BakeRequest, LoraRow, MergeRequest, bake, inspect, merge
    from lib_loramerge.ui.handlers_extract import ExtractRequest, ResizeRequest, extract, resize

    host = StandaloneHost([lora_folder(root)], checkpoint_folder(root))
    tab = build_tab(host)
    # as A1111 and Forge render an extension tab
    with gr.Blocks(analytics_enabled=False) as demo, gr.Tabs(), gr.TabItem("LoRA Merge", id="lora_merger",
                                                                           elem_id="tab_lora_merger"):
        tab.render()
    config = demo.get_config_file()
    assert config["components"], "no components"
    found = {b.elem_id: b for b in demo.blocks.values() if getattr(b, "elem_id", None)}
    for panel in ("merge", "bake"):
        for i in range(MAX_ROWS):
            for part in ("lora", "unet", "te", "weights", "refresh", "row"):
                assert f"lora_merger_{panel}_{part}_{i}" in found, f"missing lora_merger_{panel}_{part}_{i}"
    for elem in ("lora_merger_merge_method", "lora_merger_merge_t", "lora_merger_merge_density",
                 "lora_merger_analyze_loras", "lora_merger_analyze_button", "lora_merger_analyze_chart",
                 "lora_merger_bake_checkpoint", "lora_merger_bake_button", "lora_merger_inspect_lora",
                 "lora_merger_extract_base", "lora_merger_extract_tuned", "lora_merger_extract_rank",
                 "lora_merger_extract_button", "lora_merger_extract_stop", "lora_merger_extract_chart",
                 "lora_merger_resize_lora", "lora_merger_resize_policy", "lora_merger_resize_value",
                 "lora_merger_resize_button", "lora_merger_resize_stop", "lora_merger_resize_chart"):
        assert elem in found, f"missing {elem}"
    for elem, block in found.items():
        if isinstance(block, gr.Dropdown) and block.value is not None:  # gradio 4 warns otherwise
            assert block.value in choice_values(block), f"{elem}: {block.value!r} not among its choices"
    assert choice_values(found["lora_merger_merge_lora_0"]) == ["character_b.safetensors", "detail_c.safetensors",
                                                                "narrow_a.safetensors", "narrow_b.safetensors",
                                                                "style_a.safetensors"]
    assert choice_values(found["lora_merger_bake_checkpoint"]) == ["base_sd1.safetensors"]
    assert choice_values(found["lora_merger_extract_tuned"]) == ["base_sd1.safetensors"]
    assert choice_values(found["lora_merger_resize_lora"]) == choice_values(found["lora_merger_merge_lora_0"])
    # a merge and an inspection through the handlers, their charts through this gradio's BarPlot
    rows = [LoraRow("style_a.safetensors", 0.8, 0.5, "MIDD"), LoraRow("detail_c.safetensors", 1.0, 1.0)]
    merged = merge(host, MergeRequest(rows, "g", mode="svd", rank=2))
    assert merged.ok and merged.path.is_file(), merged.message
    slerped = merge(host, MergeRequest(rows, "s", mode="svd", rank=2, method="slerp", t=0.3))
    assert slerped.ok and "slerp (t = 0.3)" in slerped.message, slerped.message
    from lib_loramerge.ui.handlers_methods import analyze
    from lib_loramerge.ui.panels_methods import COSINE_CHART

    compared = analyze(host, ["style_a.safetensors", "detail_c.safetensors"])
    assert compared.ok and compared.chart, compared.message
    assert apply_update(found["lora_merger_analyze_chart"], COSINE_CHART.update(compared.chart)).get("value") is not None
    baked = bake(host, BakeRequest("base_sd1.safetensors", [LoraRow("narrow_a.safetensors")], "b"))
    assert baked.ok and baked.path.is_file(), baked.message
    inspected = inspect(host, "g.safetensors")
    assert inspected.ok, inspected.message
    extracted = extract(host, ExtractRequest("base_sd1.safetensors", "b.safetensors", "x", rank=4))
    assert extracted.ok and extracted.path.is_file() and extracted.chart, extracted.message
    resized = resize(host, ResizeRequest("g.safetensors", "g1", "rank", 1))
    assert resized.ok and resized.path.is_file() and resized.chart, resized.message
    for chart, elem, rows in ((ENERGY_CHART, "lora_merger_merge_chart", merged.chart),
                              (ENERGY_CHART, "lora_merger_extract_chart", extracted.chart),
                              (ENERGY_CHART, "lora_merger_resize_chart", resized.chart),
                              (NORM_CHART, "lora_merger_inspect_chart", inspected.chart), (NORM_CHART,
                              "lora_merger_inspect_chart", None)):
        update = apply_update(found[elem], chart.update(rows))
        assert update.get("visible", bool(rows)) == bool(rows), update
        assert update.get("value") is not None
    return gr.__version__


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        print(f"ok gradio {check_build(Path(tmp))}")

"""The Extract and Resize panels of the tab (layout and wiring only; the actions are :mod:`.handlers_extract`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import gradio as gr

from . import handlers_extract
from .app import DTYPES, ELEM, ENERGY_CHART, _progress_bridge, _refresh_button, output_checks, output_file_fields, run_controls
from .handlers_extract import RESIZE_POLICIES, SOURCE_DTYPE, ExtractRequest, ResizeRequest
from .host import Host

POLICY_HELP = ("rank: every module at this rank · threshold: keep this fraction of ‖ΔW‖² · sv_fro: of ‖ΔW‖_F · "
               "sv_ratio: keep σ ≥ σ_max/R · sv_cumulative: of Σσ · size_mib: the file fits in this many MiB")


@dataclass
class ExtractPanel:
    base: gr.Dropdown
    tuned: gr.Dropdown
    settings: list
    button: gr.Button
    stop: gr.Button
    result: gr.Textbox
    chart: gr.BarPlot


def extract_panel(host: Host, device_choices: list[str]) -> ExtractPanel:
    p = f"{ELEM}_extract"
    folder = host.checkpoint_dir()
    checkpoints = list(host.checkpoints())
    if folder is None:
        gr.Markdown("Extraction reads checkpoints: start the standalone UI with `--ckpt-dir DIR`.")
    else:
        gr.Markdown(f"Extract a LoRA from two checkpoints of the same model: per layer the best rank-k "
                    f"approximation of tuned − base (applied at strength 1 it reproduces the fine-tune as closely as "
                    f"the rank allows), saved in **{host.lora_output_dir()}**.")
    with gr.Row(equal_height=True):
        base = gr.Dropdown(choices=checkpoints, value=None, label="Base checkpoint", elem_id=f"{p}_base", scale=4)
        tuned = gr.Dropdown(choices=checkpoints, value=None, label="Tuned checkpoint", elem_id=f"{p}_tuned", scale=4)
        _refresh_button([base, tuned], host.refresh_checkpoints, lambda: list(host.checkpoints()),
                        f"{p}_refresh")
    with gr.Row():
        rank = gr.Number(value=32, precision=0, minimum=0, label="Rank (linear and 1×1 layers)", elem_id=f"{p}_rank",
                         scale=1)
        conv_rank = gr.Number(value=0, precision=0, minimum=0, label="Conv rank (3×3, LoCon; 0: off)",
                              elem_id=f"{p}_conv_rank", scale=1)
        threshold = gr.Number(value=0, minimum=0, maximum=1, label="Energy threshold (0: fixed rank)",
                              elem_id=f"{p}_threshold", scale=1)
        min_diff = gr.Number(value=0, minimum=0, label="Skip layers whose largest |ΔW| is at most",
                             elem_id=f"{p}_min_diff", scale=1)
    with gr.Row():
        text_encoder = gr.Checkbox(value=True, label="Text encoders too", elem_id=f"{p}_text_encoder", scale=1)
        dtype, device, output, overwrite = output_file_fields(p, device_choices, "extracted.safetensors")
    button, stop, result, chart = run_controls(p, "Extract", interactive=folder is not None)
    settings = [rank, conv_rank, threshold, min_diff, text_encoder, dtype, device, output, overwrite]
    return ExtractPanel(base, tuned, settings, button, stop, result, chart)


@dataclass
class ResizePanel:
    lora: gr.Dropdown
    settings: list
    button: gr.Button
    stop: gr.Button
    result: gr.Textbox
    chart: gr.BarPlot


def resize_panel(host: Host, lora_choices: list[str], device_choices: list[str]) -> ResizePanel:
    p = f"{ELEM}_resize"
    gr.Markdown(f"Resize one LoRA (any type; the result is a LoRA/LoCon): each module becomes its best approximation "
                f"of the rank a policy gives it, computed exactly from the factors. Saved in **{host.lora_output_dir()}**.")
    with gr.Row(equal_height=True):
        lora = gr.Dropdown(choices=lora_choices, value=None, label="LoRA", elem_id=f"{p}_lora", scale=4)
        _refresh_button([lora], host.refresh_loras, lambda: list(host.loras()), f"{p}_refresh")
    with gr.Row():
        policy = gr.Radio(list(RESIZE_POLICIES), value="rank", label="Policy", info=POLICY_HELP,
                          elem_id=f"{p}_policy", scale=3)
        value = gr.Number(value=16, minimum=0, label="Value (rank, fraction, ratio or MiB)", elem_id=f"{p}_value",
                          scale=1)
        max_rank = gr.Number(value=0, precision=0, minimum=0, label="At most rank (0: no cap)",
                             elem_id=f"{p}_max_rank", scale=1)
    with gr.Row():
        dtype, device, output, overwrite = output_file_fields(p, device_choices, "resized.safetensors",
                                                              [SOURCE_DTYPE, *DTYPES], "Save as (source: as the input)")
    metadata, verify = output_checks(p)
    button, stop, result, chart = run_controls(p, "Resize")
    return ResizePanel(lora, [policy, value, max_rank, dtype, device, output, overwrite, metadata, verify], button, stop,
                       result, chart)


def wire(host: Host, extract: ExtractPanel, resize: ResizePanel, list_new_loras: Callable[[], list],
         lora_dropdowns: list) -> None:
    """Connect both panels' buttons; a written LoRA is then listed in every LoRA dropdown (a second step,
    so that the dropdowns do not carry the job's progress bar)."""

    def run_extract(progress=gr.Progress(), *values):  # noqa: B008 (gradio finds its bar by this default)
        base, tuned, rank, conv_rank, threshold, min_diff, text_encoder, dtype, device, output, overwrite = values
        request = ExtractRequest(base=base, tuned=tuned, output=output, rank=rank, conv_rank=conv_rank,
                                 threshold=threshold, min_diff=min_diff, text_encoder=bool(text_encoder), dtype=dtype,
                                 device=device, overwrite=bool(overwrite))
        outcome = handlers_extract.extract(host, request, _progress_bridge(progress, "extracting", "modules"))
        return outcome.message, ENERGY_CHART.update(outcome.chart)

    extract.button.click(run_extract, inputs=[extract.base, extract.tuned, *extract.settings],
                         outputs=[extract.result, extract.chart]).then(
        list_new_loras, inputs=[], outputs=lora_dropdowns, show_progress="hidden", queue=False)
    extract.stop.click(host.interrupt, inputs=[], outputs=[], queue=False)

    def run_resize(progress=gr.Progress(), *values):  # noqa: B008 (gradio finds its bar by this default)
        lora, policy, value, max_rank, dtype, device, output, overwrite, metadata, verify = values
        request = ResizeRequest(lora=lora, output=output, policy=policy, value=value, max_rank=max_rank, dtype=dtype,
                                device=device, overwrite=bool(overwrite), metadata=metadata, verify=bool(verify))
        outcome = handlers_extract.resize(host, request, _progress_bridge(progress, "resizing", "modules"))
        return outcome.message, ENERGY_CHART.update(outcome.chart)

    resize.button.click(run_resize, inputs=[resize.lora, *resize.settings], outputs=[resize.result, resize.chart]).then(
        list_new_loras, inputs=[], outputs=lora_dropdowns, show_progress="hidden", queue=False)
    resize.stop.click(host.interrupt, inputs=[], outputs=[], queue=False)


def list_checkpoints(host: Host, chosen: list) -> list:
    """Both checkpoint dropdowns with the folder's current list, keeping choices still there."""
    choices = list(host.checkpoints())
    return [gr.update(choices=choices, value=c if c in choices else None) for c in chosen]

"""The Compare section of the Inspect tab: the interference analysis of two or more LoRAs (layout and
wiring only; the action is :mod:`.handlers_methods`)."""

from __future__ import annotations

import gradio as gr

from . import handlers_methods
from .app import ELEM, Chart
from .host import Host

COSINE_CHART = Chart("cosine", "Cosine of the first two LoRAs per block (+ aligned, − opposed)", "cosine", [-1, 1])


def analyze_panel(host: Host, lora_choices: list[str]) -> gr.Dropdown:
    p = f"{ELEM}_analyze"
    gr.Markdown("**Compare** LoRAs before merging: each one's ‖ΔW‖ per block and how much they point the same way "
                "(cosine): where they interfere, lower a block weight or use slerp / ties; where they are "
                "orthogonal, a plain sum keeps both.")
    with gr.Row(equal_height=True):
        loras = gr.Dropdown(choices=lora_choices, value=None, multiselect=True, label="LoRAs (two or more)",
                            elem_id=f"{p}_loras", scale=4)
        button = gr.Button("Compare", variant="primary", elem_id=f"{p}_button", scale=1)
    summary = gr.Markdown(elem_id=f"{p}_summary")
    chart = COSINE_CHART.component(f"{p}_chart")
    report = gr.Textbox(label="Per block", lines=12, max_lines=40, interactive=False, elem_id=f"{p}_report")

    def run(labels: list[str] | None):
        outcome = handlers_methods.analyze(host, labels)
        if not outcome.ok:
            return outcome.message, COSINE_CHART.update(None), ""
        return outcome.message, COSINE_CHART.update(outcome.chart), outcome.table[0][1]

    button.click(run, inputs=[loras], outputs=[summary, chart, report])
    return loras

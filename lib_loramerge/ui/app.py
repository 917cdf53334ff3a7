"""The "LoRA Merge" tab: Merge, Bake, Extract, Resize and Inspect panels, for gradio 3.41 (A1111) and 4.40 (Forge).

Only layout and wiring live here; every button calls a function of :mod:`.handlers`, which calls
the library. Portable gradio only: ``gr.update``, no ``gr.Box`` or ``.style()``, no JavaScript,
dropdown values always among their choices (custom values only where typing one is the point).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import gradio as gr

from ..formats.metadata import MODES as METADATA_MODES
from ..ops.method_names import METHODS
from . import handlers
from .handlers import NO_BLOCK_WEIGHTS, BakeRequest, ChartRows, LoraRow, MergeRequest
from .host import Host

MAX_ROWS = 8  # LoRA rows per panel
START_ROWS = 2  # rows shown at first; "Add LoRA" shows more
ELEM = "lora_merger"
MODES = ["svd", "concat", "add"]
DTYPES = ["fp16", "bf16", "fp32"]
BAKE_DTYPES = [*DTYPES, "keep"]
BAKE_TARGETS = ["a checkpoint file", "the loaded model"]
METHOD_HELP = ("sum: Σ strength·ΔW · slerp: two LoRAs, by t · karcher: spherical mean · perpendicular: the first "
               "plus the others' parts orthogonal to it · norm: each rescaled to the mean norm · ties/dare: in the "
               "aligned core space (svd mode) · -dense: element-wise on the dense ΔW (slow); see the README")
MODE_HELP = ("svd: best rank-k approximation of the exact sum · concat: exact, rank = sum of ranks · "
             "add: the classic factor sum (approximate, equal ranks only)")


def _progress_bridge(progress: gr.Progress, verb: str, unit: str) -> Callable[[int, int, str], None]:
    """The library's (done, total, item) → gradio's bar, about a hundred updates per job at most."""
    shown = [-1]

    def report(done: int, total: int, what: str) -> None:
        if done == total or done - shown[0] >= max(1, total // 100):
            shown[0] = done
            progress((done, total), desc=f"{verb}: {what}", unit=unit)

    return report


@dataclass(frozen=True)
class Chart:
    """A per-block bar chart; its properties are re-sent with every update (see ``update``)."""

    column: str
    title: str
    y_title: str
    y_lim: list[int] | None = None

    def properties(self) -> dict:
        # only arguments BarPlot takes in both 3.41 (vega-lite) and 4.40 (native plot)
        return {"x": "block", "y": self.column, "title": self.title, "x_title": "LBW block",
                "y_title": self.y_title, "y_lim": self.y_lim, "height": 260}

    def component(self, elem_id: str) -> gr.BarPlot:
        return gr.BarPlot(value=None, label=self.title, show_label=False, visible=False, elem_id=elem_id,
                          **self.properties())

    def update(self, rows: ChartRows | None) -> dict:
        """Show ``rows`` (hide the chart when None).

        gradio 3.41's BarPlot.update treats its default ``vertical=True`` as a changed property
        and then demands a DataFrame and x/y, so every update carries the data and all properties.
        """
        import pandas as pd  # a gradio dependency in both versions

        rows = rows or []
        frame = pd.DataFrame({"block": [b for b, _ in rows], self.column: [float(v) for _, v in rows]})
        return gr.update(value=frame, visible=bool(rows), **self.properties())


ENERGY_CHART = Chart("kept", "Energy kept per block (fraction of ‖ΔW‖²)", "fraction kept", [0, 1])
NORM_CHART = Chart("norm", "‖ΔW‖ per block (strength 1)", "‖ΔW‖ (Frobenius)")


def _markdown_table(rows: list[tuple[str, str]]) -> str:
    import html

    def cell(text: str) -> str:
        return html.escape(text).replace("|", "&#124;").replace("\n", " ")

    lines = ["| property | value |", "| --- | --- |"]
    lines += [f"| {cell(k)} | {cell(v)} |" for k, v in rows]
    return "\n".join(lines)


@dataclass
class LoraRows:
    """The repeated LoRA rows of a panel, with their add/remove buttons and shown-row count."""

    rows: list[gr.Row] = field(default_factory=list)
    loras: list[gr.Dropdown] = field(default_factory=list)
    unets: list[gr.Number] = field(default_factory=list)
    tes: list[gr.Number] = field(default_factory=list)
    weights: list[gr.Dropdown] = field(default_factory=list)
    shown: gr.State | None = None

    @property
    def inputs(self) -> list:
        return [c for i in range(MAX_ROWS) for c in (self.loras[i], self.unets[i], self.tes[i], self.weights[i])]

    @staticmethod
    def parse(values: list) -> list[LoraRow]:
        return [LoraRow(values[i], values[i + 1], values[i + 2], values[i + 3])
                for i in range(0, 4 * MAX_ROWS, 4)]

    def fill(self, rows: list[LoraRow]) -> list:
        """Updates for ``inputs`` + ``rows`` that show ``rows`` and clear and hide the rest."""
        values, shown = [], max(len(rows), START_ROWS)
        for i in range(MAX_ROWS):
            r = rows[i] if i < len(rows) else LoraRow(None, 1.0, 1.0, NO_BLOCK_WEIGHTS)
            values += [gr.update(value=r.lora), gr.update(value=r.unet), gr.update(value=r.te),
                       gr.update(value=r.weights or NO_BLOCK_WEIGHTS)]
        return values + [gr.update(visible=i < shown) for i in range(MAX_ROWS)] + [shown]


def _refresh_button(dropdowns: list[gr.Dropdown], refresh: Callable[[], None], choices: Callable[[], list[str]],
                    elem_id: str):
    """"Refresh": ``refresh()`` (the host re-reads its folders), then ``choices()`` into ``dropdowns``.

    A word, not 🔄: without an emoji font (headless browsers, many Linux desktops) a symbol-only
    button is an empty box."""
    button = gr.Button("Refresh", elem_id=elem_id, size="sm", scale=0, min_width=80)

    def click():
        refresh()
        updates = [gr.update(choices=choices()) for _ in dropdowns]
        return updates if len(updates) > 1 else updates[0]

    button.click(click, inputs=[], outputs=dropdowns, queue=False)
    return button


def _lora_rows(host: Host, prefix: str, lora_choices: list[str], preset_choices: list[str]) -> LoraRows:
    rows = LoraRows()
    for i in range(MAX_ROWS):
        with gr.Row(visible=i < START_ROWS, elem_id=f"{prefix}_row_{i}", equal_height=True) as row:
            rows.rows.append(row)
            rows.loras.append(gr.Dropdown(choices=lora_choices, value=None, label=f"LoRA {i + 1}", scale=4,
                                          elem_id=f"{prefix}_lora_{i}"))
            _refresh_button([rows.loras[i]], host.refresh_loras, lambda: list(host.loras()), f"{prefix}_refresh_{i}")
            rows.unets.append(gr.Number(value=1.0, label="UNet strength", scale=1, min_width=90,
                                        elem_id=f"{prefix}_unet_{i}"))
            rows.tes.append(gr.Number(value=1.0, label="TE strength", scale=1, min_width=90,
                                      elem_id=f"{prefix}_te_{i}"))
            rows.weights.append(gr.Dropdown(choices=preset_choices, value=NO_BLOCK_WEIGHTS, allow_custom_value=True,
                                            label="Block weights (preset, or LBW values)", scale=3,
                                            elem_id=f"{prefix}_weights_{i}"))
    rows.shown = gr.State(START_ROWS)
    with gr.Row():
        add = gr.Button("+ Add LoRA", size="sm", elem_id=f"{prefix}_add")
        remove = gr.Button("- Remove last", size="sm", elem_id=f"{prefix}_remove")

    def change(shown: int, delta: int):
        shown = max(1, min(MAX_ROWS, int(shown) + delta))
        cleared = [gr.update() if i < shown else gr.update(value=None) for i in range(MAX_ROWS)]
        return [gr.update(visible=i < shown) for i in range(MAX_ROWS)] + cleared + [shown]

    outputs = [*rows.rows, *rows.loras, rows.shown]
    add.click(lambda n: change(n, +1), inputs=[rows.shown], outputs=outputs, queue=False)
    remove.click(lambda n: change(n, -1), inputs=[rows.shown], outputs=outputs, queue=False)
    return rows


def build_tab(host: Host) -> gr.Blocks:
    """The whole tab as one ``gr.Blocks`` (A1111/Forge render it inside their own tab)."""
    from . import panels_extract, panels_methods  # (they build on this module's helpers)

    lora_choices = list(host.loras())
    presets = host.presets()
    preset_choices = [NO_BLOCK_WEIGHTS, *presets.names()]
    device_choices = list(dict.fromkeys([host.device(), "cpu", *(["cuda"] if _cuda() else [])]))
    all_lora_dropdowns: list[gr.Dropdown] = []

    with gr.Blocks(analytics_enabled=False, title="LoRA Merge") as tab:
        with gr.Tabs(elem_id=f"{ELEM}_panels"):
            with gr.Tab("Merge", id="merge", elem_id=f"{ELEM}_merge_panel"):
                m = _merge_panel(host, lora_choices, preset_choices, device_choices)
                all_lora_dropdowns += m.rows.loras
            with gr.Tab("Bake", id="bake", elem_id=f"{ELEM}_bake_panel") as bake_tab:
                b = _bake_panel(host, lora_choices, preset_choices, device_choices)
                all_lora_dropdowns += b.rows.loras
            with gr.Tab("Extract", id="extract", elem_id=f"{ELEM}_extract_panel") as extract_tab:
                x = panels_extract.extract_panel(host, device_choices)
            with gr.Tab("Resize", id="resize", elem_id=f"{ELEM}_resize_panel"):
                r = panels_extract.resize_panel(host, lora_choices, device_choices)
                all_lora_dropdowns.append(r.lora)
            with gr.Tab("Inspect", id="inspect", elem_id=f"{ELEM}_inspect_panel"):
                inspect_lora = _inspect_panel(host, lora_choices)
                all_lora_dropdowns.append(inspect_lora)
                all_lora_dropdowns.append(panels_methods.analyze_panel(host, lora_choices))

        def run_merge(progress=gr.Progress(), *values):  # noqa: B008 (gradio finds its bar by this default)
            *row_values, mode, rank, threshold, dtype, device, output, overwrite, metadata, verify, method, t, density = \
                values
            request = MergeRequest(rows=LoraRows.parse(row_values), output=output, mode=mode, rank=rank,
                                   threshold=threshold, dtype=dtype, device=device, overwrite=bool(overwrite),
                                   metadata=metadata, verify=bool(verify), method=method, t=t, density=density)
            outcome = handlers.merge(host, request, _progress_bridge(progress, "merging", "modules"))
            return outcome.message, ENERGY_CHART.update(outcome.chart)

        def list_new_loras():
            choices = list(host.loras())  # a merged LoRA appears in every LoRA dropdown
            return [gr.update(choices=choices) for _ in all_lora_dropdowns]

        # the dropdowns are refreshed in a second step: as outputs of the merge they would carry its progress bar
        m.merge.click(run_merge, inputs=[*m.rows.inputs, *m.settings], outputs=[m.result, m.chart]).then(
            list_new_loras, inputs=[], outputs=all_lora_dropdowns, show_progress="hidden", queue=False)
        m.stop.click(host.interrupt, inputs=[], outputs=[], queue=False)

        def run_bake(progress=gr.Progress(), *values):  # noqa: B008 (gradio finds its bar by this default)
            checkpoint, *row_values, dtype, device, output, overwrite, allow_unmatched, verify = values
            request = BakeRequest(checkpoint=checkpoint, rows=LoraRows.parse(row_values), output=output, dtype=dtype,
                                  device=device, overwrite=bool(overwrite), allow_unmatched=bool(allow_unmatched),
                                  verify=bool(verify))
            return handlers.bake(host, request, _progress_bridge(progress, "baking", "tensors")).message

        b.bake.click(run_bake, inputs=[b.checkpoint, *b.rows.inputs, *b.settings], outputs=[b.result]).then(
            lambda: gr.update(choices=list(host.checkpoints())),  # the new checkpoint is listed
            inputs=[], outputs=[b.checkpoint], show_progress="hidden", queue=False)
        b.stop.click(host.interrupt, inputs=[], outputs=[], queue=False)
        if b.live_buttons:
            _wire_live(host, b)

        def default_checkpoint(chosen: str | None):
            # the model loaded now, unless the user already chose one (the WebUI may load one after start-up)
            choices = list(host.checkpoints())
            current = host.current_checkpoint()
            value = chosen if chosen in choices else current if current in choices else None
            return gr.update(choices=choices, value=value)

        bake_tab.select(default_checkpoint, inputs=[b.checkpoint], outputs=[b.checkpoint], queue=False).then(
            lambda: handlers.live_status(host), inputs=[], outputs=[b.status], queue=False, show_progress="hidden")
        panels_extract.wire(host, x, r, list_new_loras, all_lora_dropdowns)
        extract_tab.select(lambda *chosen: panels_extract.list_checkpoints(host, list(chosen)),
                           inputs=[x.base, x.tuned], outputs=[x.base, x.tuned], queue=False)
    return tab


def _wire_live(host: Host, b: BakePanel) -> None:
    """The loaded-model buttons: apply / revert / save, each refreshing the status line after."""
    apply_button, revert_button, save_button, stop_button = b.live_buttons

    def show_target(target: str):
        live = target == BAKE_TARGETS[1]
        return gr.update(visible=not live), gr.update(visible=not live), gr.update(visible=live)

    b.target.change(show_target, inputs=[b.target], outputs=[b.checkpoint_row, b.file_buttons, b.live_row],
                    queue=False)

    def request(values: list) -> handlers.LiveRequest:
        *row_values, dtype, _device, output, overwrite, allow_unmatched, verify = values
        return handlers.LiveRequest(rows=LoraRows.parse(row_values), output=output, dtype=dtype,
                                    overwrite=bool(overwrite), allow_unmatched=bool(allow_unmatched),
                                    verify=bool(verify))

    def run_apply(progress=gr.Progress(), *values):  # noqa: B008
        return handlers.live_apply(host, request(list(values)), _progress_bridge(progress, "baking", "weights")).message

    def run_revert(progress=gr.Progress()):  # noqa: B008
        return handlers.live_revert(host, _progress_bridge(progress, "reverting", "weights")).message

    def run_save(progress=gr.Progress(), *values):  # noqa: B008
        return handlers.live_save(host, request(list(values)), _progress_bridge(progress, "saving", "tensors")).message

    status = {"fn": lambda: handlers.live_status(host), "inputs": [], "outputs": [b.status], "queue": False,
              "show_progress": "hidden"}
    apply_button.click(run_apply, inputs=[*b.rows.inputs, *b.settings], outputs=[b.result]).then(**status)
    revert_button.click(run_revert, inputs=[], outputs=[b.result]).then(**status)
    save_button.click(run_save, inputs=[*b.rows.inputs, *b.settings], outputs=[b.result]).then(
        lambda: gr.update(choices=list(host.checkpoints())), inputs=[], outputs=[b.checkpoint],
        show_progress="hidden", queue=False)
    stop_button.click(host.interrupt, inputs=[], outputs=[], queue=False)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


@dataclass
class MergePanel:
    rows: LoraRows
    settings: list
    merge: gr.Button
    stop: gr.Button
    result: gr.Textbox
    chart: gr.BarPlot


METADATA_HELP = ("merge: keep what the inputs agree on, sum tag counts, join trigger words · first: the first "
                 "input's · new: only this tool's · none: the minimum a loader needs")


def output_file_fields(p: str, device_choices: list[str], placeholder: str, dtypes: list[str] = DTYPES,
                       dtype_label: str = "Save as") -> tuple[gr.Dropdown, gr.Dropdown, gr.Textbox, gr.Checkbox]:
    """Dtype, device, file name and overwrite of a panel writing a LoRA, in the caller's row."""
    dtype = gr.Dropdown(dtypes, value=dtypes[0], label=dtype_label, elem_id=f"{p}_dtype", scale=1)
    device = gr.Dropdown(device_choices, value=device_choices[0], label="Device", elem_id=f"{p}_device", scale=1)
    output = gr.Textbox(label="Output file name (saved in the LoRA folder)", placeholder=placeholder,
                        elem_id=f"{p}_output", scale=3)
    overwrite = gr.Checkbox(value=False, label="Overwrite", elem_id=f"{p}_overwrite", scale=1)
    return dtype, device, output, overwrite


def run_controls(p: str, label: str, interactive: bool = True) -> tuple[gr.Button, gr.Button, gr.Textbox, gr.BarPlot]:
    """The run and stop buttons, the result text and the energy chart of a panel writing a LoRA."""
    with gr.Row():
        button = gr.Button(label, variant="primary", elem_id=f"{p}_button", scale=4, interactive=interactive)
        stop = gr.Button("Stop", elem_id=f"{p}_stop", scale=1)
    result = gr.Textbox(label="Result", lines=10, max_lines=30, interactive=False, elem_id=f"{p}_result")
    return button, stop, result, ENERGY_CHART.component(f"{p}_chart")


def output_checks(p: str) -> tuple[gr.Dropdown, gr.Checkbox]:
    """The metadata mode and the verify box of a panel writing a LoRA (merge, resize)."""
    with gr.Row():
        metadata = gr.Dropdown(list(METADATA_MODES), value="merge", label="Metadata", info=METADATA_HELP,
                               elem_id=f"{p}_metadata", scale=3)
        verify = gr.Checkbox(value=False, label="Verify (re-read the file and compare every module with its target)",
                             elem_id=f"{p}_verify", scale=1)
    return metadata, verify


def _merge_panel(host: Host, lora_choices: list[str], preset_choices: list[str], device_choices: list[str]) -> MergePanel:
    p = f"{ELEM}_merge"
    gr.Markdown(f"Merge LoRAs into one file in **{host.lora_output_dir()}**. A strength means what "
                "`<lora:name:te:unet>` means in the WebUI; block weights mean what LBW's `lbw=` means.")
    rows = _lora_rows(host, p, lora_choices, preset_choices)
    _prompt_filler(host, rows, p)
    with gr.Row():
        mode = gr.Radio(MODES, value="svd", label="Mode", info=MODE_HELP, elem_id=f"{p}_mode", scale=3)
        rank = gr.Number(value=0, precision=0, minimum=0, label="Rank (svd; 0: the largest input rank)",
                         elem_id=f"{p}_rank", scale=1)
        threshold = gr.Number(value=0, minimum=0, maximum=1, label="Energy threshold (svd; 0: off)",
                              elem_id=f"{p}_threshold", scale=1)
    with gr.Row():
        method = gr.Dropdown(list(METHODS), value="sum", label="Method", info=METHOD_HELP, elem_id=f"{p}_method",
                             scale=3)
        t = gr.Slider(0, 1, value=0.5, step=0.01, label="t (slerp: 0 = first LoRA, 1 = second)", elem_id=f"{p}_t",
                      scale=2)
        density = gr.Number(value=0, minimum=0, maximum=1, label="Density (ties/dare; 0: default)",
                            elem_id=f"{p}_density", scale=1)
    with gr.Row():
        dtype, device, output, overwrite = output_file_fields(p, device_choices, "merged.safetensors")
    metadata, verify = output_checks(p)
    merge, stop, result, chart = run_controls(p, "Merge")

    return MergePanel(rows, [mode, rank, threshold, dtype, device, output, overwrite, metadata, verify, method, t,
                             density], merge, stop, result, chart)


def _prompt_filler(host: Host, rows: LoraRows, p: str) -> None:
    with gr.Accordion("Fill the rows from a prompt", open=False, elem_id=f"{p}_prompt_box"):
        with gr.Row():
            prompt = gr.Textbox(label="Prompt with <lora:NAME:TE:UNET:lbw=…> tags", lines=2, scale=4,
                                elem_id=f"{p}_prompt")
            fill = gr.Button("Fill rows", scale=1, elem_id=f"{p}_fill")
        message = gr.Markdown(elem_id=f"{p}_fill_message")

    def from_prompt(text: str, shown: int):
        try:
            filled = handlers.rows_from_prompt(host, text, MAX_ROWS)
        except Exception as e:  # noqa: BLE001 (shown to the user, rows untouched)
            return [handlers.describe_error(e), *[gr.update() for _ in range(5 * MAX_ROWS)], shown]
        return [f"Filled {len(filled)} row{'s' if len(filled) != 1 else ''} from the prompt.", *rows.fill(filled)]

    fill.click(from_prompt, inputs=[prompt, rows.shown], outputs=[message, *rows.inputs, *rows.rows, rows.shown])


@dataclass
class BakePanel:
    checkpoint: gr.Dropdown
    rows: LoraRows
    settings: list
    bake: gr.Button
    stop: gr.Button
    result: gr.Textbox
    target: gr.Radio
    checkpoint_row: gr.Row
    file_buttons: gr.Row
    live_row: gr.Row
    live_buttons: list  # apply, revert, save, stop (a WebUI only)
    status: gr.Markdown


def _bake_panel(host: Host, lora_choices: list[str], preset_choices: list[str], device_choices: list[str]) -> BakePanel:
    p = f"{ELEM}_bake"
    folder = host.checkpoint_dir()
    checkpoints = list(host.checkpoints())
    current = host.current_checkpoint()
    if folder is None:
        gr.Markdown("Baking needs a checkpoint folder: start the standalone UI with `--ckpt-dir DIR`.")
    else:
        gr.Markdown(f"Bake LoRAs into a checkpoint: W' = W + Σ strength · ΔW, saved in **{folder}**. "
                    "Strengths and block weights mean what they mean in a prompt.")
    target = gr.Radio(BAKE_TARGETS, value=BAKE_TARGETS[1] if host.supports_live_bake else BAKE_TARGETS[0],
                      label="Bake into", elem_id=f"{p}_target", visible=host.supports_live_bake,
                      info="the loaded model: patched in place on the WebUI's device, generate at once, revert "
                           "exactly; save it as a file when it is right")
    live_default = host.supports_live_bake
    with gr.Row(equal_height=True, visible=not live_default) as checkpoint_row:
        checkpoint = gr.Dropdown(choices=checkpoints, value=current if current in checkpoints else None,
                                 label="Checkpoint", elem_id=f"{p}_checkpoint", scale=4)
        _refresh_button([checkpoint], host.refresh_checkpoints, lambda: list(host.checkpoints()),
                        f"{p}_checkpoint_refresh")
    rows = _lora_rows(host, p, lora_choices, preset_choices)
    _prompt_filler(host, rows, p)
    with gr.Row():
        dtype = gr.Dropdown(BAKE_DTYPES, value="fp16", label="Save as (keep: each tensor as it is)",
                            elem_id=f"{p}_dtype", scale=1)
        device = gr.Dropdown(device_choices, value=device_choices[0], label="Device", elem_id=f"{p}_device", scale=1)
        output = gr.Textbox(label="Output file name (saved in the checkpoint folder)", placeholder="baked.safetensors",
                            elem_id=f"{p}_output", scale=3)
        with gr.Column(scale=1, min_width=160):
            overwrite = gr.Checkbox(value=False, label="Overwrite", elem_id=f"{p}_overwrite")
            allow_unmatched = gr.Checkbox(value=False, label="Bake even if some modules match no layer",
                                          elem_id=f"{p}_allow_unmatched")
            verify = gr.Checkbox(value=False, label="Verify (re-read the patched tensors)", elem_id=f"{p}_verify")
    with gr.Row(visible=not live_default) as file_buttons:
        bake = gr.Button("Bake", variant="primary", elem_id=f"{p}_button", scale=4, interactive=folder is not None)
        stop = gr.Button("Stop", elem_id=f"{p}_stop", scale=1)
    live_buttons = []
    with gr.Row(visible=live_default) as live_row:
        if host.supports_live_bake:
            live_buttons = [gr.Button("Apply to the loaded model", variant="primary", elem_id=f"{p}_live_apply", scale=3),
                            gr.Button("Revert", elem_id=f"{p}_live_revert", scale=1),
                            gr.Button("Save as checkpoint", elem_id=f"{p}_live_save", scale=2),
                            gr.Button("Stop", elem_id=f"{p}_live_stop", scale=1)]
    status = gr.Markdown(handlers.live_status(host), elem_id=f"{p}_live_status", visible=host.supports_live_bake)
    result = gr.Textbox(label="Result", lines=10, max_lines=30, interactive=False, elem_id=f"{p}_result")
    return BakePanel(checkpoint, rows, [dtype, device, output, overwrite, allow_unmatched, verify], bake, stop, result,
                     target, checkpoint_row, file_buttons, live_row, live_buttons, status)


def _inspect_panel(host: Host, lora_choices: list[str]) -> gr.Dropdown:
    p = f"{ELEM}_inspect"
    with gr.Row(equal_height=True):
        lora = gr.Dropdown(choices=lora_choices, value=None, label="LoRA", elem_id=f"{p}_lora", scale=4)
        _refresh_button([lora], host.refresh_loras, lambda: list(host.loras()), f"{p}_refresh")
        button = gr.Button("Inspect", variant="primary", elem_id=f"{p}_button", scale=1)
    summary = gr.Markdown(elem_id=f"{p}_summary")
    chart = NORM_CHART.component(f"{p}_chart")
    table = gr.Markdown(elem_id=f"{p}_table")

    def run(label: str | None):
        outcome = handlers.inspect(host, label)
        if not outcome.ok:
            return outcome.message, NORM_CHART.update(None), ""
        return f"**{outcome.message}**", NORM_CHART.update(outcome.chart), _markdown_table(outcome.table)

    button.click(run, inputs=[lora], outputs=[summary, chart, table])
    return lora

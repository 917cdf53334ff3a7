"""The tab's interference analysis (Inspect → Compare), callable without gradio."""

from __future__ import annotations

from ..errors import LoraMergeError
from .handlers import ChartRows, Outcome, describe_error
from .host import Host


def analyze(host: Host, labels: list[str] | None) -> Outcome:
    """Norms and cosines of the chosen LoRAs per block; the chart is the first pair's cosine per block."""
    try:
        from ..formats.reader import read_lora
        from ..ops.analyze import analyze_loras, format_analysis

        labels = [label for label in (labels or []) if label]
        if len(labels) < 2:
            raise LoraMergeError("choose two or more LoRAs to compare")
        paths = []
        for label in labels:
            path = host.loras().get(label)
            if path is None:
                raise LoraMergeError(f"LoRA '{label}' is not in the LoRA folders any more (refresh the list)")
            paths.append(path)
        analysis = analyze_loras([read_lora(p, lazy=True) for p in paths])
        chart: ChartRows | None = [(b, s.cosine(0, 1)) for b, s in analysis.blocks.items()
                                   if b != "-" and s.cosine(0, 1) is not None] or None
        return Outcome(True, analysis.summary(), chart=chart, table=[("report", format_analysis(analysis))])
    except Exception as e:  # noqa: BLE001 (every failure becomes a message)
        return Outcome(False, describe_error(e))

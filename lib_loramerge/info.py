"""Inspect a LoRA: format, architecture, modules by kind, ranks, alphas, dtypes, metadata summary."""

from __future__ import annotations

import os
from collections import Counter
from typing import Any

import torch

from .arch import PRETTY
from .blocks.report import block_norms
from .formats.reader import read_lora
from .lycoris import algorithm_label, network_dim
from .model import LoraModel

SHORT_DTYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}

METADATA_SUMMARY_KEYS = (
    "ss_output_name", "ss_sd_model_name", "ss_base_model_version", "ss_v2", "modelspec.architecture",
    "modelspec.title", "ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_network_args",
    "ss_training_started_at", "ss_num_train_images", "ss_num_epochs", "ss_resolution", "ss_clip_skip",
    "sshs_model_hash", "lora_merger_recipe",
)


def short_dtype(dtype: torch.dtype) -> str:
    return SHORT_DTYPE.get(dtype, str(dtype).replace("torch.", ""))


# a file's algorithm is named by its most telling module type (a LoCon file has linear LoRA modules too)
_PRECEDENCE = ("LoRA", "LoCon", "LoCon (Tucker)")


def algorithm_of(model: LoraModel) -> str:
    """LoRA, LoCon, LoCon (Tucker), LoHa, LoKr, DoRA, … (joined with " + " when a file mixes them)."""
    labels = Counter(algorithm_label(m) for m in model.modules.values())
    plain = [label for label in _PRECEDENCE if label in labels]
    others = sorted((label for label in labels if label not in _PRECEDENCE), key=lambda x: -labels[x])
    return " + ".join(([plain[-1]] if plain else []) + others) or "LoRA"


def rank_summary(ranks: Counter) -> dict[str, Any]:
    return {"min": min(ranks), "max": max(ranks), "counts": {str(r): n for r, n in sorted(ranks.items())}}


def summarize(model: LoraModel, blocks: bool = True) -> dict[str, Any]:
    """A JSON-ready description of a LoRA (the ``info`` command's ``--json`` output).

    ``blocks``: add the ‖ΔW‖ of each LBW block (from the factors; reads every factor).
    """
    mods = list(model.modules.values())
    dtypes = Counter(short_dtype(m.dtype) for m in mods)
    ranks = Counter(network_dim(m) for m in mods)  # the rank the file declares (LoHa/LoKr: A1111's dim)
    effective = Counter(m.rank for m in mods)  # the rank of the exact factor form (LoHa/LoKr: r₁·r₂)
    alphas = Counter("none" if m.alpha is None else m.alpha for m in mods)
    te = sum(m.is_text_encoder for m in mods)
    meta = model.metadata
    return {
        "file": str(model.path) if model.path else None,
        "format": model.format,
        "algorithm": algorithm_of(model),
        "algorithms": dict(Counter(algorithm_label(m) for m in mods)),
        "arch": model.arch,
        "arch_notes": list(model.arch_notes),
        "modules": len(mods),
        "modules_by_kind": dict(Counter(m.kind for m in mods)),
        "unet_modules": len(mods) - te,
        "text_encoder_modules": te,
        "ranks": sorted(ranks),
        "rank_counts": {str(r): n for r, n in sorted(ranks.items())},
        "effective_ranks": rank_summary(effective) if effective else None,
        "alphas": sorted((a for a in alphas if a != "none"), key=float) + (["none"] if "none" in alphas else []),
        "dtype": dtypes.most_common(1)[0][0] if len(dtypes) == 1 else "mixed",
        "dtypes": dict(dtypes),
        "metadata": {k: meta[k] for k in METADATA_SUMMARY_KEYS if k in meta},
        "metadata_keys": len(meta),
        "extras": {k: {"dtype": d, "shape": list(s)} for k, (d, s) in model.extras.items()},
        "notes": list(model.notes),
        "blocks": _blocks(model) if blocks else None,
    }


def _blocks(model: LoraModel) -> dict[str, Any] | None:
    report = block_norms(model)
    return report.as_dict() if report else None


def inspect_lora(path: str | os.PathLike) -> dict[str, Any]:
    """Read ``path`` and describe it (raises LoraMergeError for files that are not supported LoRAs)."""
    return summarize(read_lora(path))


def _fmt_counts(counts: dict[Any, int]) -> str:
    return ", ".join(f"{k} ×{n}" for k, n in counts.items())


def format_summary(s: dict[str, Any]) -> str:
    """Human-readable text for a :func:`summarize` result."""
    lines = [
        f"file:        {s['file']}",
        f"format:      {s['format']} ({s['algorithm']})",
        *([f"algorithms:  {_fmt_counts(s['algorithms'])}"] if len(s["algorithms"]) > 1 else []),
        f"arch:        {PRETTY.get(s['arch'], s['arch'])}",
        *[f"             note: {n}" for n in s["arch_notes"]],
        f"modules:     {s['modules']} ({s['unet_modules']} {'transformer' if s['arch'] == 'flux' else 'UNet'}, "
        f"{s['text_encoder_modules']} text encoder); "
        f"{_fmt_counts(s['modules_by_kind'])}",
        f"ranks:       {_fmt_counts(s['rank_counts'])}",
        *([f"effective:   {_fmt_counts(s['effective_ranks']['counts'])} (rank of the exact factor form)"]
          if s["effective_ranks"] and s["effective_ranks"]["counts"] != s["rank_counts"] else []),
        f"alphas:      {', '.join(str(a) for a in s['alphas'])}",
        f"dtype:       {s['dtype']}" + (f" ({_fmt_counts(s['dtypes'])})" if s["dtype"] == "mixed" else ""),
    ]
    if s["metadata"]:
        lines.append(f"metadata:    {s['metadata_keys']} keys")
        width = max(len(k) for k in s["metadata"])
        for k, v in s["metadata"].items():
            v = " ".join(str(v).split())
            lines.append(f"  {k:<{width}}  {v[:160] + '…' if len(v) > 160 else v}")
    else:
        lines.append("metadata:    none")
    lines += [f"note:        {n}" for n in s["notes"]]
    blocks = s.get("blocks")
    if blocks:
        touched = [b for b in blocks["layout"] if blocks["modules"][b]]
        lines.append(f"blocks:      {len(touched)} of {len(blocks['layout'])} LBW blocks touched; ‖ΔW‖ per block:")
        peak = max((blocks["norms"][b] for b in touched), default=0.0) or 1.0
        for b in blocks["layout"]:
            n = blocks["modules"][b]
            bar = "#" * round(30 * blocks["norms"][b] / peak)
            lines.append(f"  {b:<5} {blocks['norms'][b]:10.4f}  {n:4d} modules  {bar}" if n else f"  {b:<5} {'-':>10}")
        if blocks.get("dora"):
            lines.append(f"  {len(blocks['dora'])} DoRA modules count with the ΔW they start from; their real effect "
                         "depends on the base weights")
        if blocks["no_block"]:
            lines.append(f"  not in any block (LBW keeps ratio 1): {len(blocks['no_block'])} modules, "
                         f"e.g. {blocks['no_block'][0]}")
    return "\n".join(lines)

"""What a merged or resized LoRA says about itself: the inputs' metadata kept or combined, and ours on top.

Modes (``--metadata``):

- ``merge`` (default): keys every input has with the same value are kept; what adds up is combined —
  ``ss_tag_frequency`` summed per dataset and tag, ``modelspec.trigger_phrase`` and
  ``modelspec.tags`` joined without duplicates, ``modelspec.merged_from`` the inputs' titles;
  training keys (``ss_*``) survive only when all inputs agree on them.
- ``first``: the first input's metadata.
- ``new``: only what this tool writes.
- ``none``: only what the WebUIs need to file and hash the LoRA (no recipe, nothing inherited).

Whatever the mode, the keys that describe the file as written are always ours and always right:
the kohya network keys (module, dim, alpha), the SD version (``ss_base_model_version``/``ss_v2``),
sai modelspec 1.0.1 (architecture, implementation, title, date, resolution, prediction type,
hash), ``ss_output_name`` and the sshs hashes over the bytes written (see :mod:`.writer`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ..errors import LoraMergeError

MODES = ("merge", "first", "new", "none")
RECIPE_KEY = "lora_merger_recipe"
# 2: recipe_version and the metadata mode recorded (tool 0.2); 1: tool 0.1's unversioned recipes
RECIPE_VERSION = 2

# keys that describe the file itself: never inherited (an input's value would be wrong for the output)
OWN_KEYS = frozenset({
    "ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_network_args", "ss_base_model_version", "ss_v2",
    "ss_output_name", "sshs_model_hash", "sshs_legacy_hash", "lora_merger_recipe",
    "modelspec.sai_model_spec", "modelspec.architecture", "modelspec.implementation", "modelspec.title",
    "modelspec.date", "modelspec.hash_sha256", "modelspec.merged_from", "modelspec.resolution",
    "modelspec.prediction_type",
})
TAG_FREQUENCY = "ss_tag_frequency"
LISTS = ("modelspec.trigger_phrase", "modelspec.tags")  # comma-separated lists that are unioned


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise LoraMergeError(f"unknown metadata mode '{mode}' (choose {', '.join(MODES)})")
    return mode


def inherited(inputs: Sequence[Mapping[str, str]], mode: str, notes: list[str] | None = None) -> dict[str, str]:
    """The part of the output's metadata that comes from the inputs, by ``mode`` (see the module doc)."""
    check_mode(mode)
    if mode in ("new", "none") or not inputs:
        return {}
    if mode == "first":
        return {k: v for k, v in inputs[0].items() if k not in OWN_KEYS}
    common = {k: v for k, v in inputs[0].items() if k not in OWN_KEYS and all(m.get(k) == v for m in inputs[1:])}
    tags = _summed_tags(inputs, notes)
    if tags:
        common[TAG_FREQUENCY] = json.dumps(tags, ensure_ascii=False)
    for key in LISTS:
        joined = _union(m.get(key, "") for m in inputs)
        if joined:
            common[key] = joined
    return common


_DEFAULT_RESOLUTION = {"sd1": "512x512", "sd2": "512x512", "sdxl": "1024x1024", "flux": "1024x1024"}
_RESOLUTION = re.compile(r"^\(?\s*(\d+)\s*[,x]\s*(\d+)\s*\)?$")


def spec_facts(inputs: Sequence[Mapping[str, str]], arch: str) -> dict[str, str]:
    """modelspec resolution and prediction type: what all the inputs say (modelspec, else kohya's
    ``ss_resolution``/``ss_v_parameterization``), else the architecture's default."""
    facts: dict[str, str] = {}
    resolution = _agreed([_resolution(m) for m in inputs]) or _DEFAULT_RESOLUTION.get(arch)
    if resolution:
        facts["modelspec.resolution"] = resolution
    if arch in ("sd1", "sd2", "sdxl"):
        said = _agreed([_prediction(m) for m in inputs])
        facts["modelspec.prediction_type"] = said or "epsilon"
    return facts


def _agreed(values: Sequence[str | None]) -> str | None:
    return values[0] if values and values[0] and all(v == values[0] for v in values) else None


def _resolution(meta: Mapping[str, str]) -> str | None:
    for key in ("modelspec.resolution", "ss_resolution"):
        found = _RESOLUTION.match(str(meta.get(key, "")).strip())
        if found:
            return f"{int(found[1])}x{int(found[2])}"
    return None


def _prediction(meta: Mapping[str, str]) -> str | None:
    said = str(meta.get("modelspec.prediction_type", "")).strip().lower()
    if said in ("epsilon", "v"):
        return said
    if "ss_v_parameterization" in meta:
        return "v" if str(meta["ss_v_parameterization"]) == "True" else "epsilon"
    return None


@dataclass
class OutputMetadata:
    """What a LoRA output's metadata holds besides the keys the writer computes from the modules."""

    inherited: dict[str, str]  # from the inputs, by the mode
    facts: dict[str, str]  # modelspec resolution, prediction type, merged_from
    minimal: bool  # mode "none": only what the WebUIs need (no modelspec extras, no recipe)


def for_output(sources: Sequence[tuple[Mapping[str, str], str]], arch: str, mode: str,
               notes: list[str] | None = None) -> OutputMetadata:
    """The metadata of an output made from ``sources`` ((metadata, name) per input) in ``mode``."""
    check_mode(mode)
    if mode == "none":
        return OutputMetadata({}, {}, True)
    metas = [m for m, _ in sources]
    facts = spec_facts(metas, arch)
    if len(sources) > 1:
        facts["modelspec.merged_from"] = merged_from([title_of(m, name) for m, name in sources])
    return OutputMetadata(inherited(metas, mode, notes), facts, False)


def merged_from(titles: Sequence[str]) -> str:
    """modelspec.merged_from: the inputs' titles, comma-separated (as kohya writes it)."""
    return ", ".join(t.replace(",", " ") for t in titles)


def title_of(metadata: Mapping[str, str], fallback: str) -> str:
    return metadata.get("modelspec.title") or metadata.get("ss_output_name") or fallback


def _union(values) -> str:
    seen: dict[str, None] = {}
    for value in values:
        for item in str(value).split(","):
            item = item.strip()
            if item:
                seen.setdefault(item, None)
    return ", ".join(seen)


def _summed_tags(inputs: Sequence[Mapping[str, str]], notes: list[str] | None) -> dict[str, dict[str, int]]:
    """ss_tag_frequency of every input, summed per dataset folder and tag (kohya: {dataset: {tag: count}})."""
    total: dict[str, dict[str, int]] = {}
    for i, meta in enumerate(inputs):
        raw = meta.get(TAG_FREQUENCY)
        if not raw:
            continue
        try:
            data = json.loads(raw)
            if not isinstance(data, dict):
                raise ValueError
            for dataset, tags in data.items():
                if not isinstance(tags, dict):
                    raise ValueError
                into = total.setdefault(str(dataset), {})
                for tag, count in tags.items():
                    into[str(tag)] = into.get(str(tag), 0) + int(count)
        except (ValueError, TypeError):
            if notes is not None:
                notes.append(f"input {i + 1}: ss_tag_frequency is not kohya's {{dataset: {{tag: count}}}} JSON; left out")
    return total

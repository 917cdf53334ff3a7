"""A1111 prompt tags ``<lora:NAME:TE[:UNET][:lbw=…][:x=…]>`` as a list of LoRAs to merge.

Parsed as A1111's extra-networks parser does (items split on ``:``; ``key=value`` items are
named): the first number is the text-encoder strength, the second the UNet strength (default:
the first), ``te=``/``unet=`` override them. ``lbw=`` (alias ``w=``) and ``x=`` are LBW's.
``start=``, ``stop=`` and ``step=`` act during sampling and cannot be baked: an error, as is any
option we do not understand.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..checks import as_strength
from ..errors import LoraMergeError, display_path

_TAG = re.compile(r"<(lora|lyco):([^>]+)>")
LORA_SUFFIXES = (".safetensors", ".pt", ".ckpt")
_SAMPLING_ONLY = ("start", "stop", "step")


@dataclass
class LoraTag:
    name: str
    te: float
    unet: float
    lbw: str | None
    x: float
    text: str


def _number(value: str, what: str, tag: str) -> float:
    try:
        number = float(value)
    except ValueError:
        hint = " (a block-weight preset goes in lbw=NAME)" if what == "UNet strength" else ""
        raise LoraMergeError(f"{tag}: {what} '{value}' is not a number{hint}") from None
    try:
        return as_strength(number, what)
    except LoraMergeError as e:
        raise LoraMergeError(f"{tag}: {e.reason}") from None


def parse_tag(text: str, body: str) -> LoraTag:
    positional: list[str] = []
    named: dict[str, str] = {}
    for item in body.split(":"):
        key, eq, value = item.partition("=")
        if eq:
            named[key.strip()] = value.strip()
        else:
            positional.append(item.strip())
    if not positional or not positional[0]:
        raise LoraMergeError(f"{text}: no LoRA name")
    for key in named:
        if key in _SAMPLING_ONLY:
            raise LoraMergeError(f"{text}: '{key}=' acts during sampling and cannot be baked into a file")
        if key not in ("te", "unet", "lbw", "w", "x"):
            raise LoraMergeError(f"{text}: unsupported option '{key}=' (supported: te, unet, lbw (w), x)")
    if len(positional) > 3:
        raise LoraMergeError(f"{text}: too many values (name, TE strength, UNet strength; options as key=value)")
    te = _number(positional[1], "TE strength", text) if len(positional) > 1 else 1.0
    te = _number(named["te"], "TE strength", text) if "te" in named else te
    unet = _number(positional[2], "UNet strength", text) if len(positional) > 2 else te
    unet = _number(named["unet"], "UNet strength", text) if "unet" in named else unet
    x = _number(named["x"], "x", text) if "x" in named else 1.0
    lbw = named.get("lbw", named.get("w"))
    return LoraTag(name=positional[0], te=te, unet=unet, lbw=lbw or None, x=x, text=text)


def parse_prompt(prompt: str) -> list[LoraTag]:
    """Every ``<lora:…>`` (or ``<lyco:…>``) tag in ``prompt``, in order; other text is ignored."""
    tags = [parse_tag(m[0], m[2]) for m in _TAG.finditer(prompt)]
    if not tags:
        raise LoraMergeError("the prompt holds no <lora:NAME:…> tags")
    return tags


def _alias(path: Path, unreadable: list[str]) -> str | None:
    from ..formats.safetensors_io import read_header

    if path.suffix.lower() != ".safetensors":
        return None
    try:
        return read_header(path).metadata.get("ss_output_name")
    except LoraMergeError as e:  # an unrelated broken file must not stop the lookup: skip it, say so
        unreadable.append(str(e))
    except OSError as e:
        unreadable.append(f"{display_path(path)}: {e.strerror or e}")
    return None


def find_lora(name: str, folders: list[str | os.PathLike], notes: list[str] | None = None) -> Path:
    """The file A1111 would pick for ``name``: by file name (without suffix) or by ``ss_output_name`` alias.

    Files whose header cannot be read are skipped while looking for an alias; they are listed in
    ``notes`` (and in the error when nothing is found).
    """
    files = [p for folder in folders for p in sorted(Path(folder).rglob("*"))
             if p.suffix.lower() in LORA_SUFFIXES and p.is_file()]
    by_name = [p for p in files if p.stem == name or p.with_suffix("").as_posix().endswith("/" + name)]
    unreadable: list[str] = []
    if not by_name:
        by_name = [p for p in files if _alias(p, unreadable) == name]
    if unreadable and notes is not None:
        notes.append(f"looking up '{name}': skipped {len(unreadable)} unreadable file"
                     f"{'s' if len(unreadable) > 1 else ''} ({unreadable[0]})")
    if len(by_name) == 1:
        return by_name[0]
    where = ", ".join(display_path(f) for f in folders)
    if not by_name:
        skipped = f"; {len(unreadable)} unreadable files skipped (e.g. {unreadable[0]})" if unreadable else ""
        raise LoraMergeError(f"no LoRA named '{name}' in {where} (by file name or ss_output_name alias){skipped}")
    raise LoraMergeError(f"LoRA name '{name}' is ambiguous: {', '.join(display_path(p) for p in by_name)}")

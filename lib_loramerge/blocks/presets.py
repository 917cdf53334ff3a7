"""LBW preset files: ``NAME:v1,…,vN`` per line, read the way LBW reads them — but never silently.

LBW skips a line with no ``:``, a line containing ``#`` anywhere, and a line whose value count is
not a layout length (12, 17, 20, 26, 61), without a word; later lines override earlier ones
with the same name. We apply the same rules and report every skipped line and every override.
Presets come from our own file, then an installed sd-webui-lora-block-weight's file, then files
the user names; a later source overrides an earlier one by name.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import LoraMergeError
from .layouts import VALID_LENGTHS

SHIPPED_PRESETS = Path(__file__).resolve().parents[2] / "presets" / "lbwpresets.txt"
LBW_PRESETS_IN_WEBUI = Path("extensions") / "sd-webui-lora-block-weight" / "scripts" / "lbwpresets.txt"


@dataclass
class PresetFile:
    source: str
    presets: dict[str, list[str]] = field(default_factory=dict)  # name → value tokens
    skipped: list[tuple[int, str, str]] = field(default_factory=list)  # (line number, line, why)
    overridden: list[str] = field(default_factory=list)  # names defined twice in this file


def parse_presets(text: str, source: str = "<text>") -> PresetFile:
    out = PresetFile(source)
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line:
            continue
        if "#" in line:
            out.skipped.append((number, line, "contains '#' (a comment for LBW)"))
            continue
        if ":" not in line:
            out.skipped.append((number, line, "no ':' between name and values"))
            continue
        name, values = line.split(":", 1)
        tokens = [v.strip() for v in values.split(",")]
        if len(tokens) not in VALID_LENGTHS:
            out.skipped.append((number, line, f"{len(tokens)} values (a layout has {', '.join(map(str, VALID_LENGTHS))})"))
            continue
        name = name.strip()
        if name in out.presets:
            out.overridden.append(name)
        out.presets[name] = tokens
    return out


def read_preset_file(path: str | os.PathLike) -> PresetFile:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise LoraMergeError("preset file not found", path) from None
    except (OSError, UnicodeDecodeError) as e:
        raise LoraMergeError(f"cannot read preset file ({e})", path) from None
    return parse_presets(text, str(path))


@dataclass
class PresetBook:
    """All presets by name, each with the file it came from; the files' skip reports."""

    presets: dict[str, tuple[list[str], str]] = field(default_factory=dict)
    files: list[PresetFile] = field(default_factory=list)

    def add(self, file: PresetFile) -> None:
        self.files.append(file)
        for name, tokens in file.presets.items():
            self.presets[name] = (tokens, file.source)

    def get(self, name: str) -> list[str] | None:
        entry = self.presets.get(name)
        return entry[0] if entry else None

    def names(self, length: tuple[int, ...] | None = None) -> list[str]:
        return [n for n, (t, _) in self.presets.items() if length is None or len(t) in length]

    def warnings(self) -> list[str]:
        notes = []
        for f in self.files:
            notes += [f"{f.source}:{n}: skipped ({why}): {line}" for n, line, why in f.skipped]
            notes += [f"{f.source}: preset '{name}' defined more than once; the last one counts" for name in f.overridden]
        return notes


def lbw_preset_file(webui_root: str | os.PathLike | None) -> Path | None:
    """The preset file of an installed sd-webui-lora-block-weight under ``webui_root``, if any."""
    if webui_root is None:
        return None
    path = Path(webui_root) / LBW_PRESETS_IN_WEBUI
    return path if path.is_file() else None


def load_presets(extra_files: list[str | os.PathLike] | None = None,
                 webui_root: str | os.PathLike | None = None) -> PresetBook:
    """Our presets, overridden by an installed LBW's, overridden by ``extra_files`` (in order)."""
    book = PresetBook()
    if SHIPPED_PRESETS.is_file():
        book.add(read_preset_file(SHIPPED_PRESETS))
    lbw = lbw_preset_file(webui_root)
    if lbw is not None:
        book.add(read_preset_file(lbw))
    for path in extra_files or []:
        book.add(read_preset_file(path))
    return book

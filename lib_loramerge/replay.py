"""Replay a recipe: find the inputs it names (by hash, then by name), run the same job again, compare the files.

Every output carries ``lora_merger_recipe``: the inputs with the sha256 of their data, strengths,
block weights as resolved (random tokens included), and the job's options. Recipes are versioned
(``recipe_version``; version 1 is the unversioned form of tool 0.1.0, which replays the same way).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .blocks.layouts import LAYOUTS
from .blocks.weights import BlockWeights
from .errors import LoraMergeError, display_path
from .formats.hashing import BackgroundHashes, HashCache, cache_file, data_sha256, file_sha256
from .formats.safetensors_io import read_header

RECIPE_KEY = "lora_merger_recipe"
RECIPE_VERSION = 2
KNOWN_VERSIONS = (1, 2)
LORA_SUFFIXES = (".safetensors", ".pt", ".ckpt")


def read_recipe(source: str | os.PathLike) -> dict:
    """The recipe of an output file (its metadata) or of a recipe file (.json, or .toml with Python ≥ 3.11)."""
    source = Path(source)
    if source.suffix.lower() == ".safetensors":
        raw = read_header(source).metadata.get(RECIPE_KEY)
        if raw is None:
            raise LoraMergeError("has no lora_merger_recipe: it was not made by this tool", source)
        recipe = _json(raw, source)
    else:
        recipe = read_document(source)
    if not isinstance(recipe, dict) or "inputs" not in recipe:
        raise LoraMergeError("not a recipe (no inputs)", source)
    version = recipe.get("recipe_version", 1)
    if version not in KNOWN_VERSIONS:
        raise LoraMergeError(f"recipe version {version} is newer than this tool understands ({max(KNOWN_VERSIONS)}): "
                             "update sd-webui-lora-merger to replay it", source)
    return recipe


def read_document(path: Path) -> object:
    """A JSON or TOML file as Python data (one-line errors)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise LoraMergeError("no such file", path) from None
    except (OSError, UnicodeDecodeError) as e:
        raise LoraMergeError(f"cannot read the file ({e})", path) from None
    if path.suffix.lower() == ".toml":
        try:
            import tomllib
        except ImportError:  # Python 3.10 (A1111's): tomli is the same parser, when installed
            try:
                import tomli as tomllib  # type: ignore[no-redef]
            except ImportError:
                raise LoraMergeError("TOML files need Python 3.11 or the tomli package; write the file as JSON",
                                     path) from None
        try:
            return tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise LoraMergeError(f"not valid TOML ({e})", path) from None
    return _json(text, path)


def _json(text: str, path: Path) -> object:
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as e:
        raise LoraMergeError(f"not valid JSON ({e})", path) from None


@dataclass
class Finder:
    """Files in folders, found by the sha256 the recipes record (cached like every hash of this tool)."""

    folders: Sequence[Path]
    whole: bool = False  # checkpoints: sha256 of the whole file; LoRAs: of the data section
    _files: list[Path] = field(default_factory=list)

    def __post_init__(self) -> None:
        suffixes = (".safetensors", ".ckpt") if self.whole else LORA_SUFFIXES
        for folder in self.folders:
            if not Path(folder).is_dir():
                raise LoraMergeError("folder not found", folder)
            self._files += sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in suffixes and p.is_file())

    def digest(self, path: Path) -> str:
        cache = HashCache(cache_file())
        known = cache.get(path, self.whole)
        if known:
            return known
        digest = file_sha256(path) if self.whole else data_sha256(path)
        cache.put(path, self.whole, digest)
        return digest

    def find(self, name: str, digest: str, what: str) -> Path:
        """The file with this hash: the one of that name first (refused when its content changed), else any."""
        named = [p for p in self._files if p.name == name]
        for path in named:
            if not digest or self.digest(path) == digest:
                return path
        for path in self._files:
            if path not in named and digest and self.digest(path) == digest:
                return path
        where = ", ".join(display_path(f) for f in self.folders) or "(no folder given)"
        if named:
            raise LoraMergeError(f"{what} '{name}' changed since the recipe was made (its hash is not "
                                 f"{digest[:12]}…) and no other file in {where} has that hash")
        raise LoraMergeError(f"{what} '{name}' (hash {digest[:12]}…) is not in {where}")


def block_ratio(entry: dict, arch: str):
    """The block weights an input was merged with, from the values the recipe recorded (no re-rolling)."""
    values = entry.get("lbw_values")
    if not values:
        return None, {}
    if len(values) not in LAYOUTS:
        raise LoraMergeError(f"the recipe's block weights have {len(values)} values, which is no LBW layout")
    weights = BlockWeights(spec=entry.get("lbw", ""), arch=arch, values=[float(v) for v in values],
                           seed=entry.get("lbw_seed"))
    return weights.ratio, weights.recipe()


def input_paths(recipe: dict, lora_dirs: Sequence[Path]) -> list[Path]:
    finder = Finder(lora_dirs)
    return [finder.find(entry["file"], entry.get("hash", ""), "input LoRA") for entry in recipe["inputs"]]


def identical(a: Path, b: Path) -> tuple[bool, bool, list[str]]:
    """(whole files identical, tensor data identical, metadata keys that differ)."""
    ha, hb = read_header(a), read_header(b)
    hashes = BackgroundHashes([a, b], whole=True)
    data = ha.entries == hb.entries and _data_hash(a, ha.data_start) == _data_hash(b, hb.data_start)
    differ = sorted(k for k in set(ha.metadata) | set(hb.metadata) if ha.metadata.get(k) != hb.metadata.get(k))
    return hashes.result(0) == hashes.result(1), data, differ


def _data_hash(path: Path, start: int) -> str:
    return file_sha256(path, start)

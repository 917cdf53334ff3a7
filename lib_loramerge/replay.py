"""Replay a recipe: find the inputs it names (by hash, then by name), run the same job again, compare the files.

Every output carries ``lora_merger_recipe``: the inputs with the sha256 of their data, strengths,
block weights as resolved (random tokens included), and the job's options. Recipes are versioned
(``recipe_version``; version 1 is the unversioned form of tool 0.1.0, which replays the same way).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .blocks.layouts import LAYOUTS
from .blocks.weights import BlockWeights
from .errors import LoraMergeError, display_path
from .formats.hashing import HashCache, cache_file, data_sha256, file_sha256
from .formats.metadata import RECIPE_KEY, RECIPE_VERSION
from .formats.safetensors_io import read_header

KNOWN_VERSIONS = tuple(range(1, RECIPE_VERSION + 1))
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


def identical(a: Path, b: Path) -> tuple[bool, bool, list[str]]:
    """(whole files identical, tensor data identical, metadata keys that differ): each file read once."""
    ha, hb = read_header(a), read_header(b)
    data = ha.entries == hb.entries and file_sha256(a, ha.data_start) == file_sha256(b, hb.data_start)
    differ = sorted(k for k in set(ha.metadata) | set(hb.metadata) if ha.metadata.get(k) != hb.metadata.get(k))
    return data and _header_bytes(a, ha.data_start) == _header_bytes(b, hb.data_start), data, differ


def _header_bytes(path: Path, size: int) -> bytes:
    with open(path, "rb") as f:
        return f.read(size)


@dataclass
class ReplayResult:
    """A replayed job: what it was, the files it used, and how the new output compares with the original."""

    kind: str  # merge, bake, resize, extract
    path: Path  # where the new file was written (removed again when ``kept`` is false)
    kept: bool
    inputs: list[Path]  # the files the recipe's hashes were found in
    original: Path | None = None  # the output whose recipe this was (None: a recipe file)
    byte_identical: bool | None = None
    data_identical: bool | None = None
    metadata_differs: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    report: object = None  # the job's own report

    def summary(self) -> str:
        if self.original is None:
            return f"replayed the {self.kind} recipe: wrote {display_path(self.path)}"
        name = display_path(self.original)
        if self.byte_identical:
            return f"replayed the {self.kind} of {name}: the new file is byte-identical"
        if self.data_identical:
            return (f"replayed the {self.kind} of {name}: the tensors are byte-identical; metadata differs in "
                    f"{', '.join(self.metadata_differs)}")
        return f"replayed the {self.kind} of {name}: the tensors differ (see the notes)"

    def as_dict(self) -> dict:
        return {"kind": self.kind, "out": str(self.path) if self.kept else None, "original": str(self.original)
                if self.original else None, "inputs": [str(p) for p in self.inputs],
                "byte_identical": self.byte_identical, "data_identical": self.data_identical,
                "metadata_differs": self.metadata_differs, "notes": self.notes, "summary": self.summary()}


def recipe_kind(recipe: dict) -> str:
    kind = recipe.get("type", "merge")  # version 1 merges had no type
    if kind not in ("merge", "bake", "resize", "extract"):
        raise LoraMergeError(f"unknown recipe type '{kind}' (this tool replays merge, bake, resize and extract)")
    return kind


def replay(source: str | os.PathLike, *, lora_dirs: Sequence[str | os.PathLike] = (),
           ckpt_dirs: Sequence[str | os.PathLike] = (), out: str | os.PathLike | None = None, overwrite: bool = False,
           device: str = "cpu", progress=None) -> ReplayResult:
    """Run the job ``source``'s recipe describes again: inputs found by their hash (the file of the
    recorded name first, then any file in the folders), the same options, strengths, block weights
    and modelspec date. Without ``out`` the new file is written under the original's name in a
    temporary folder beside it, compared, and removed (a check); with ``out`` it is kept.
    """
    source = Path(source)
    recipe = read_recipe(source)
    kind = recipe_kind(recipe)
    original = source if source.suffix.lower() == ".safetensors" else None
    if original is None and out is None:
        raise LoraMergeError("a recipe file has no original to compare with: give --out for the new file", source)
    folders = _distinct([*lora_dirs, source.parent])  # the output's own folder is searched last
    ckpt_folders = _distinct([*ckpt_dirs, source.parent])
    date = read_header(original).metadata.get("modelspec.date") if original else None
    scratch = None
    if out is None:
        scratch = Path(tempfile.mkdtemp(prefix=".lora-merger-replay-", dir=source.parent))
        target = scratch / source.name  # the same name: the file's title and name-derived keys match
    else:
        target = Path(out)
    try:
        run = {"merge": _replay_merge, "bake": _replay_bake, "resize": _replay_resize, "extract": _replay_extract}[kind]
        result = run(recipe, folders, ckpt_folders, target, overwrite, device, date, progress)
        result.original = original
        if original is not None:
            result.byte_identical, result.data_identical, result.metadata_differs = identical(original, target)
            if not result.data_identical and kind in ("merge", "resize", "extract"):
                result.notes.append(_lora_difference(original, target))
        result.kept = scratch is None
        return result
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)


def _distinct(folders: Sequence[str | os.PathLike]) -> list[Path]:
    seen: dict[Path, Path] = {}
    for folder in folders:
        seen.setdefault(Path(folder).resolve(), Path(folder))
    return list(seen.values())


def _entries_found(recipe: dict, finder: Finder, what: str = "input LoRA") -> tuple[list[Path], list[str]]:
    paths, notes = [], []
    for entry in recipe["inputs"]:
        path = finder.find(entry["file"], entry.get("hash", ""), what)
        if path.name != entry["file"]:
            notes.append(f"{what} {entry['file']} found as {display_path(path)} (the same hash)")
        paths.append(path)
    return paths, notes


def _dtype(recipe: dict):
    from .formats.writer import parse_dtype

    return parse_dtype(recipe.get("dtype", "fp16"))


def _merge_inputs(recipe: dict, paths: Sequence[Path]):
    from .formats.reader import read_lora
    from .ops.merge import MergeInput

    inputs = []
    for entry, path in zip(recipe["inputs"], paths, strict=True):
        lora = read_lora(path, lazy=True)
        ratio, lbw = block_ratio(entry, lora.arch)
        inputs.append(MergeInput(lora, unet=float(entry.get("unet", 1.0)), te=entry.get("te"), block_ratio=ratio,
                                 recipe=lbw))
    return inputs


def _replay_merge(recipe, folders, ckpt_folders, target, overwrite, device, date, progress) -> ReplayResult:
    from .jobs import merge_to_file
    from .ops.merge import MergeOptions
    from .ops.methods import MethodSpec

    paths, notes = _entries_found(recipe, Finder(folders))
    options = MergeOptions(mode=recipe.get("mode", "svd"), rank=recipe.get("rank"), threshold=recipe.get("threshold"),
                           clamp=recipe.get("clamp"), device=device, dtype=_dtype(recipe),
                           method=MethodSpec.from_recipe(recipe))
    options.validate()
    mode = recipe.get("metadata", "new" if recipe.get("recipe_version", 1) == 1 else "merge")  # v1 kept nothing
    job = merge_to_file(_merge_inputs(recipe, paths), options, target, overwrite=overwrite, progress=progress,
                        metadata_mode=mode, date=date)
    return ReplayResult("merge", job.path, True, paths, notes=notes, report=job.report)


def _replay_bake(recipe, folders, ckpt_folders, target, overwrite, device, date, progress) -> ReplayResult:
    from .jobs import bake_to_file

    wanted = recipe.get("checkpoint") or {}
    checkpoint = Finder(ckpt_folders, whole=True).find(wanted.get("file", ""), wanted.get("sha256", ""), "checkpoint")
    paths, notes = _entries_found(recipe, Finder(folders))
    dtype = None if recipe.get("dtype") == "keep" else _dtype(recipe)
    job = bake_to_file(checkpoint, _merge_inputs(recipe, paths), target, dtype=dtype, device=device,
                       overwrite=overwrite, progress=progress, semantics=recipe.get("semantics", "a1111"),
                       source=recipe.get("source"), allow_unmatched=True)
    return ReplayResult("bake", job.path, True, [checkpoint, *paths], notes=notes, report=job.report)


def _replay_resize(recipe, folders, ckpt_folders, target, overwrite, device, date, progress) -> ReplayResult:
    from .jobs_resize import resize_to_file
    from .ops.policies import RankPolicy

    paths, notes = _entries_found(recipe, Finder(folders), "source LoRA")
    rule = recipe.get("rank_policy")
    if rule is None and recipe.get("size_mib") is None:
        raise LoraMergeError("this resize recipe predates recorded rank policies (tool 0.1): it cannot be replayed")
    policy = RankPolicy(rule["kind"], rule["value"], rule.get("cap")) if rule else None
    job = resize_to_file(paths[0], target, policy, size_mib=None if policy else recipe["size_mib"],
                         cap=recipe.get("max_rank"), device=device, dtype=_dtype(recipe), overwrite=overwrite,
                         progress=progress, metadata_mode=recipe.get("metadata", "merge"), date=date)
    return ReplayResult("resize", job.path, True, paths, notes=notes, report=job.report)


def _replay_extract(recipe, folders, ckpt_folders, target, overwrite, device, date, progress) -> ReplayResult:
    from .bake.extract import ExtractOptions
    from .jobs_extract import extract_to_file

    finder = Finder(ckpt_folders, whole=True)
    base = finder.find(recipe["base"]["file"], recipe["base"]["sha256"], "base checkpoint")
    tuned = finder.find(recipe["tuned"]["file"], recipe["tuned"]["sha256"], "tuned checkpoint")
    options = ExtractOptions(rank=recipe["rank"], conv_rank=recipe.get("conv_rank"), threshold=recipe.get("threshold"),
                             sv_ratio=recipe.get("sv_ratio"), min_diff=recipe.get("min_diff", 0.0),
                             text_encoder=recipe.get("text_encoder", True), device=device, dtype=_dtype(recipe))
    job = extract_to_file(base, tuned, target, options, overwrite=overwrite, progress=progress, date=date)
    return ReplayResult("extract", job.path, True, [base, tuned], report=job.report)


def _lora_difference(original: Path, new: Path) -> str:
    """How far the new LoRA is from the original, per module, in factor space (never dense)."""
    from .formats.reader import read_lora
    from .ops.verify import verify_modules

    old, fresh = read_lora(original, lazy=True).modules, read_lora(new, lazy=True).modules
    checked = verify_modules({n: [(m, 1.0)] for n, m in old.items()}, fresh, {}, next(iter(fresh.values())).dtype)
    if checked.missing or checked.unexpected:
        return (f"the modules differ: {len(checked.missing)} only in the original, {len(checked.unexpected)} "
                "only in the new file")
    name, error, _ = checked.worst(1)[0]
    return (f"largest relative difference between the two files' modules: {error:.3g} ({name}); "
            f"{len(checked.failed)} of {len(checked.errors)} modules beyond the output dtype's rounding")

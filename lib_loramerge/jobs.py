"""Whole jobs shared by the CLI and the UI: read inputs, merge, write the result with a recipe."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from . import __version__
from .bake.stream import BakeReport, bake
from .blocks.presets import PresetBook, load_presets
from .blocks.prompt import find_lora, parse_prompt
from .blocks.weights import parse_block_weights
from .checks import check_output_name
from .errors import LoraMergeError, display_path
from .formats.atomic import copy_file, remove_stale_temp_files
from .formats.hashing import BackgroundHashes, legacy_model_hash
from .formats.metadata import RECIPE_KEY, RECIPE_VERSION, check_mode, for_output
from .formats.reader import read_lora
from .formats.safetensors_io import check_writable_target, read_header
from .formats.writer import save_lora
from .info import short_dtype
from .model import LoraModel
from .ops.merge import MergeInput, MergeOptions, MergeReport, MergeResult, merge_loras
from .ops.verify import Verification, verify_modules

__all__ = ["RECIPE_KEY", "RECIPE_VERSION"]

Progress = Callable[[int, int, str], None]


def input_hashes(loras: Sequence[LoraModel], started: BackgroundHashes | None = None) -> BackgroundHashes:
    """Start hashing the inputs' files (the hash A1111 shows) beside the job; never trusts a stored hash.
    ``started``: hashes begun earlier (the CLI starts them while torch is imported), used when they are
    of these very files."""
    return BackgroundHashes.reuse(started, [lora.path for lora in loras])


def input_entries(inputs: Sequence[MergeInput], hashes: BackgroundHashes, placeholder: bool = False
                  ) -> tuple[list[dict], list[str]]:
    """The recipe's description of each input (file, hash, strengths, block weights), and notes to report.

    A stored ``sshs_model_hash`` that is not the hash of the data means the file was changed
    after it was saved: said in a note, and the computed hash is the one recorded.
    ``placeholder``: zeros of the hashes' length, without waiting for them (a header's first draft).
    """
    entries, notes = [], []
    for i, inp in enumerate(inputs):
        if placeholder:
            path = inp.lora.path
            entries.append({"file": display_path(path.name) if path else inp.lora.name,
                            "hash": "0" * 64 if path is not None and path.is_file() else "",
                            "unet": inp.unet, "te": inp.te_strength, **inp.recipe})
            continue
        digest = hashes.result(i)
        stored = inp.lora.metadata.get("sshs_model_hash")
        if stored and digest and stored != digest:
            notes.append(f"{inp.lora.name}: its stored sshs_model_hash is not the hash of its data (the file was changed "
                         "after saving); the recipe records the real one")
        name = display_path(inp.lora.path.name) if inp.lora.path else inp.lora.name
        entries.append({"file": name, "hash": digest, "unet": inp.unet, "te": inp.te_strength, **inp.recipe})
    return entries, notes


def check_output(out: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse a bad output path before any work is done."""
    out = Path(out)
    if out.suffix.lower() != ".safetensors":
        raise LoraMergeError("output must be a .safetensors file", out)
    check_output_name(out.name)
    check_writable_target(out, overwrite)
    return out


def start_output(out: str | os.PathLike, overwrite: bool, notes: list[str]) -> Path:
    """At a job's start: check the output, and clear the temp files killed jobs left beside it (noted)."""
    out = check_output(out, overwrite)
    removed = remove_stale_temp_files(out.parent)
    if removed:
        size = sum(n for _, n in removed) / 2**20
        notes.append(f"removed {len(removed)} temp file{'s' if len(removed) > 1 else ''} ({size:.0f} MiB) left in "
                     f"{display_path(out.parent)} by jobs that were killed")
    return out


@dataclass
class MergeJob:
    path: Path
    report: MergeReport
    metadata: dict[str, str]
    arch: str


def merge_recipe(inputs: Sequence[MergeInput], options: MergeOptions, arch: str, entries: list[dict],
                 metadata_mode: str = "merge") -> dict:
    return {
        "tool": "sd-webui-lora-merger", "version": __version__, "recipe_version": RECIPE_VERSION, "type": "merge",
        "arch": arch, "mode": options.mode, "rank": options.rank, "threshold": options.threshold,
        "clamp": options.clamp, "dtype": short_dtype(options.dtype), "metadata": metadata_mode, "inputs": entries,
        **(options.method.recipe() if options.method is not None else {}),
    }


def merge_to_file(inputs: Sequence[MergeInput], options: MergeOptions, out: str | os.PathLike, *,
                  overwrite: bool = False, progress: Progress | None = None, notes: Sequence[str] = (),
                  metadata_mode: str = "merge", verify: bool = False, date: str | None = None,
                  hashes: BackgroundHashes | None = None) -> MergeJob:
    """Merge already-read inputs and write the result atomically (nothing is written on failure).

    ``metadata_mode``: what the output keeps of the inputs' metadata (see :mod:`.formats.metadata`);
    ``verify``: re-read the written file and compare every module with its target before it takes
    its name (a failure is an error, and nothing is written); ``date``: modelspec.date (a replay
    passes the original's); ``hashes``: the inputs' hashing, if already started.
    """
    notes = list(notes)
    check_mode(metadata_mode)
    out = start_output(out, overwrite, notes)
    hashes = input_hashes([i.lora for i in inputs], hashes)
    if verify and options.method is not None:  # ties/dare: keep each module's exact result to compare with
        options = dataclasses.replace(options, method=dataclasses.replace(options.method, keep_targets=True))
    result = merge_loras(inputs, options, progress)
    started = time.perf_counter()
    entries, hash_notes = input_entries(inputs, hashes)
    described = for_output([(i.lora.metadata, i.lora.name) for i in inputs], result.arch, metadata_mode, notes)
    result.report.notes[:0] = notes + hash_notes
    meta = dict(described.inherited)
    if not described.minimal:
        recipe = merge_recipe(inputs, options, result.arch, entries, metadata_mode)
        meta[RECIPE_KEY] = json.dumps(recipe, ensure_ascii=False, sort_keys=True)
    checker = MergeVerifier(inputs, options, result, out) if verify else None
    saved = save_lora(result.modules, out, dtype=options.dtype, arch=result.arch, metadata=meta, overwrite=overwrite,
                      facts=described.facts, date=date, minimal=described.minimal, before_publish=checker)
    result.report.timings.update(math=result.report.seconds, write=time.perf_counter() - started)
    if checker:
        result.report.verification = checker.result
        result.report.timings["verify"] = checker.seconds
    return MergeJob(path=saved.path, report=result.report, metadata=saved.metadata, arch=result.arch)


def verification_error(result: Verification, out: Path) -> LoraMergeError:
    return LoraMergeError(f"{result.summary()}; nothing was written", out)


class MergeVerifier:
    """Re-reads a merge's written (temp) file and compares each module with the exact weighted sum of
    the inputs' modules (concat: exact; svd: within √(1 − kept energy)). ``add`` and ``clamp`` are not
    the exact sum by design: their file is compared with the merge's own result instead. A linear
    merge method (slerp, karcher, perpendicular, norm) is compared with Σ cᵢ·ΔWᵢ for its computed
    coefficients; ties/dare with the method's own untruncated result."""

    ENERGY_SLACK = 1e-5  # the precision of a kept-energy fraction (float32 Gram matrices)

    def __init__(self, inputs: Sequence[MergeInput], options: MergeOptions, result: MergeResult, out: Path):
        self.inputs, self.options, self.merged, self.out = inputs, options, result, out
        self.result: Verification | None = None
        self.seconds = 0.0

    def targets(self) -> tuple[dict, dict[str, float]]:
        if self.options.mode == "add" or self.options.clamp is not None:
            return {m.name: [(m, 1.0)] for m in self.merged.modules}, {}
        method = self.merged.method
        if method is not None and method.targets:  # ties/dare: the method's exact (untruncated) result
            targets = {m.name: [(method.targets[m.name], 1.0)] for m in self.merged.modules}
        elif method is not None:  # a linear method: Σ cᵢ·ΔWᵢ with its coefficients
            targets = {m.name: [(i.lora.modules[m.name], c) for i, c in zip(self.inputs, method.coefficients[m.name],
                                                                           strict=True) if c != 0.0]
                       for m in self.merged.modules}
        else:
            targets = {m.name: [(i.lora.modules[m.name], i.strength(m.name)) for i in self.inputs
                                if m.name in i.lora.modules and i.strength(m.name) != 0.0]
                       for m in self.merged.modules}
        energy = self.merged.report.energy
        allowed = {n: (max(1.0 - e, 0.0) + self.ENERGY_SLACK) ** 0.5 for n, e in energy.items()}
        return targets, allowed

    def __call__(self, written: Path) -> None:
        started = time.perf_counter()
        targets, allowed = self.targets()
        self.result = verify_written(written, targets, allowed, self.options.dtype, self.out)
        self.seconds = time.perf_counter() - started
        if not self.result.ok:
            raise verification_error(self.result, self.out)


def verify_written(written: Path, targets: dict, allowed: dict[str, float], dtype: torch.dtype,
                   out: Path) -> Verification:
    """:func:`verify_modules` on the file just written (a temp file named for ``out`` in messages)."""
    try:
        modules = read_lora(written, lazy=True, container="safetensors").modules
        return verify_modules(targets, modules, allowed, dtype)
    except LoraMergeError as e:
        raise LoraMergeError(f"verification failed: the written file does not read back "
                             f"({e.module + ': ' if e.module else ''}{e.reason}); "
                             "nothing was written", out) from None


@dataclass
class LoraSpec:
    """One input as a user describes it: a file, strengths, optional block weights (LBW spec, x value)."""

    path: Path
    unet: float = 1.0
    te: float | None = None
    lbw: str | None = None
    x: float = 1.0


def specs_from_prompt(prompt: str, lora_dirs: Sequence[str | os.PathLike],
                      notes: list[str] | None = None) -> list[LoraSpec]:
    """``<lora:NAME:TE[:UNET][:lbw=…][:x=…]>`` tags → specs, names resolved as A1111 resolves them.

    Unreadable files skipped during the lookup are listed in ``notes``.
    """
    if not lora_dirs:
        raise LoraMergeError("a prompt needs a LoRA folder to find the files in (--lora-dir)")
    return [LoraSpec(find_lora(t.name, list(lora_dirs), notes), unet=t.unet, te=t.te, lbw=t.lbw, x=t.x)
            for t in parse_prompt(prompt)]


def prepare_inputs(specs: Sequence[LoraSpec], presets: PresetBook | None = None,
                   seed: int | None = None) -> tuple[list[MergeInput], list[str]]:
    """Read every input (lazily) and resolve its block weights; returns the inputs and notes to report.

    Random block-weight tokens of input i use seed ``seed + i`` (a fresh seed when None); the
    values actually used go into each input's recipe.
    """
    loras = read_inputs([s.path for s in specs])
    if presets is None and any(s.lbw for s in specs):
        presets = load_presets()
    notes = presets.warnings() if presets else []
    inputs = []
    for i, (spec, lora) in enumerate(zip(specs, loras, strict=True)):
        weights = None
        if spec.lbw:
            try:
                weights = parse_block_weights(spec.lbw, lora.arch, presets, x=spec.x,
                                              seed=None if seed is None else seed + i)
            except LoraMergeError as e:
                raise e.with_path(lora.path) from None
            shown = ",".join(f"{v:g}" for v in weights.values)
            seeded = f" (seed {weights.seed})" if weights.seed is not None else ""
            notes.append(f"{lora.name}: block weights {spec.lbw} = {shown}{seeded}")
        inputs.append(MergeInput(lora, unet=spec.unet, te=spec.te, block_ratio=weights.ratio if weights else None,
                                 recipe=weights.recipe() if weights else {}))
    return inputs, notes


@dataclass
class BakeJob:
    path: Path
    report: BakeReport
    metadata: dict[str, str]


def bake_to_file(checkpoint: str | os.PathLike, inputs: Sequence[MergeInput], out: str | os.PathLike, *,
                 dtype: torch.dtype | None = torch.float16, device: str = "cpu", overwrite: bool = False,
                 allow_unmatched: bool = False, progress: Progress | None = None,
                 notes: Sequence[str] = (), semantics: str = "a1111", source: str | None = None,
                 verify: bool = False, hashes: BackgroundHashes | None = None,
                 checkpoint_hash: BackgroundHashes | None = None) -> BakeJob:
    """Bake the inputs into ``checkpoint`` and write ``out`` atomically, with a recipe in its metadata.

    The checkpoint's own metadata is kept; ``sd_merge_recipe``/``sd_merge_models`` are written in the
    shape the WebUIs' checkpoint merger writes (its lineage shows in their metadata views); a config
    beside the checkpoint (``NAME.yaml``: v-prediction SD2 and the like) is copied to the output's name.
    ``semantics``: the WebUI whose DoRA rule the bake follows (recorded in the recipe); ``source``:
    where the recipe came from when not the command line (e.g. ``"live bake"``), recorded too;
    ``verify``: re-read and recompute every patched tensor before the file takes its name;
    ``hashes``, ``checkpoint_hash``: the LoRAs' and the checkpoint's hashing, if already started.
    """
    notes = list(notes)
    out = start_output(out, overwrite, notes)
    ckpt = Path(checkpoint)
    config = sidecar_config(ckpt, out, overwrite)
    hashes = input_hashes([i.lora for i in inputs], hashes)
    hash_notes: list[str] = []
    legacy = legacy_model_hash(ckpt)

    def recipe(checkpoint_sha256: str, final: bool = True) -> dict[str, str]:
        entries, found = input_entries(inputs, hashes, placeholder=not final)
        hash_notes[:] = found
        data = {
            "tool": "sd-webui-lora-merger", "version": __version__, "recipe_version": RECIPE_VERSION, "type": "bake",
            "checkpoint": {"file": display_path(ckpt.name), "sha256": checkpoint_sha256},
            "dtype": "keep" if dtype is None else short_dtype(dtype), "inputs": entries, "semantics": semantics,
            **({"source": source} if source else {}),
        }
        return {RECIPE_KEY: json.dumps(data, ensure_ascii=False, sort_keys=True),
                **webui_merge_metadata(ckpt, checkpoint_sha256, legacy, entries, dtype, out)}

    report, written = bake(ckpt, inputs, out, dtype=dtype, device=device, overwrite=overwrite,
                           allow_unmatched=allow_unmatched, progress=progress,
                           metadata=recipe("0" * 64, final=False), finalize=recipe, semantics=semantics, verify=verify,
                           checkpoint_hash=checkpoint_hash)
    report.notes[:0] = notes + hash_notes
    if config is not None:
        try:
            copy_file(config[0], config[1], overwrite)
            report.notes.append(f"copied the checkpoint's config {config[0].name} to {config[1].name}")
        except (OSError, LoraMergeError) as e:
            report.notes.append(f"the checkpoint was written, but its config {config[0].name} could not be copied to "
                                f"{config[1].name} ({getattr(e, 'strerror', None) or e}); copy it by hand")
    return BakeJob(path=out, report=report, metadata=written)


def sidecar_config(checkpoint: Path, out: Path, overwrite: bool) -> tuple[Path, Path] | None:
    """(config beside the checkpoint, where its copy goes) when there is one; refuses to replace a file."""
    source = checkpoint.with_suffix(".yaml")  # where A1111 looks: the checkpoint's name with .yaml
    if not source.is_file():
        return None
    target = out.with_suffix(".yaml")
    if target.exists() and not overwrite:
        raise LoraMergeError(f"the checkpoint's config {source.name} would be copied over this existing file; "
                             "choose another output name or --overwrite", target)
    return source, target


def webui_merge_metadata(checkpoint: Path, checkpoint_sha256: str, legacy_hash: str, entries: list[dict],
                         dtype: torch.dtype | None, out: Path) -> dict[str, str]:
    """``sd_merge_recipe`` and ``sd_merge_models`` as A1111's/Forge's checkpoint merger writes them
    (modules/extras.py): the primary model by sha256, and every model in the lineage with its name,
    legacy hash and own recipe — the checkpoint's earlier lineage kept."""
    own = read_header(checkpoint).metadata if checkpoint.suffix.lower() == ".safetensors" else {}
    merge_recipe = {
        "type": "sd-webui-lora-merger", "primary_model_hash": checkpoint_sha256, "secondary_model_hash": None,
        "tertiary_model_hash": None, "interp_method": "bake LoRA", "multiplier": None,
        "save_as_half": dtype == torch.float16, "custom_name": out.stem,
        "loras": [{"name": e["file"], "sha256": e["hash"], "unet": e["unet"], "te": e["te"]} for e in entries],
    }
    models = {checkpoint_sha256: {"name": checkpoint.name, "legacy_hash": legacy_hash,
                                  "sd_merge_recipe": _json_object(own.get("sd_merge_recipe"))}}
    earlier = _json_object(own.get("sd_merge_models"))
    if isinstance(earlier, dict):
        models.update({k: v for k, v in earlier.items() if k not in models})
    return {"sd_merge_recipe": json.dumps(merge_recipe, ensure_ascii=False),
            "sd_merge_models": json.dumps(models, ensure_ascii=False)}


def _json_object(raw: str | None) -> object:
    if not raw:
        return None
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def read_inputs(paths: Sequence[str | os.PathLike]) -> list[LoraModel]:
    """Read every input's layout first (factors lazily), so a bad file fails the job before any merging."""
    if not paths:
        raise LoraMergeError("no input LoRAs given")
    return [read_lora(p, lazy=True) for p in paths]

"""The tab inside AUTOMATIC1111 / Forge: the only code that imports WebUI modules.

Every WebUI import happens inside a function, when the WebUI is running: this module itself
imports cleanly anywhere (tests install a stand-in ``modules`` package). The names used exist with
the same meaning in A1111 1.10 and Forge (see the notes on each method where they differ).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from .blocks.presets import PresetBook, load_presets
from .errors import LoraMergeError
from .ui.host import Host, JobInterrupted

T = TypeVar("T")

TAB_TITLE = "LoRA Merge"
TAB_ID = "lora_merger"


def is_forge() -> bool:
    return importlib.util.find_spec("modules_forge") is not None


class WebUIHost(Host):
    name = "webui"

    def __init__(self) -> None:
        self._running = False  # Stop interrupts only our own job, never someone's image generation

    def lora_dirs(self) -> list[Path]:
        from modules import shared

        dirs = [shared.cmd_opts.lora_dir]
        # A1111 also lists LoRAs from the old LyCORIS folder; Forge declares the flag but never scans it
        if not is_forge():
            dirs.append(getattr(shared.cmd_opts, "lyco_dir_backcompat", None))
        return list(dict.fromkeys(Path(d) for d in dirs if d))

    def checkpoint_dir(self) -> Path | None:
        from modules import sd_models, shared

        # where the WebUI's own checkpoint merger saves: --ckpt-dir if given, else models/Stable-diffusion
        return Path(shared.cmd_opts.ckpt_dir or sd_models.model_path)

    def checkpoints(self) -> dict[str, Path]:
        from modules import sd_models

        # the WebUI's own labels (A1111: "name [hash]", Forge: "name"), as in its checkpoint dropdown
        found = {}
        for tile in sd_models.checkpoint_tiles():
            info = sd_models.get_closet_checkpoint_match(tile)
            if info is not None:
                found[tile] = Path(info.filename)
        return found

    def current_checkpoint(self) -> str | None:
        from modules import sd_models, shared

        # model_data.sd_model, not shared.sd_model: reading the latter loads a model when none is loaded
        loaded = getattr(getattr(sd_models.model_data, "sd_model", None), "sd_checkpoint_info", None)
        wanted = [getattr(loaded, "filename", None)]
        selected = sd_models.get_closet_checkpoint_match(getattr(shared.opts, "sd_model_checkpoint", None) or "")
        wanted.append(getattr(selected, "filename", None))
        by_file = {str(path): label for label, path in self.checkpoints().items()}
        for filename in wanted:
            if filename and str(Path(filename)) in by_file:
                return by_file[str(Path(filename))]
        return None

    def presets(self) -> PresetBook:
        from modules import paths_internal

        # extensions live in <data dir>/extensions, which is the WebUI folder unless --data-dir moves it
        return load_presets(webui_root=paths_internal.data_path)

    def device(self) -> str:
        from modules import devices

        return str(devices.device)

    def refresh_loras(self) -> None:
        try:
            import networks  # the built-in Lora extension's module (on sys.path only while it loads)
        except ImportError:  # that extension is disabled: nothing to refresh
            return
        networks.list_available_networks()

    def refresh_checkpoints(self) -> None:
        from modules import sd_models

        sd_models.list_models()

    def semantics(self) -> str:
        return "forge" if is_forge() else "a1111"

    def runs_flux(self) -> bool | None:
        return is_forge()  # A1111 has no Flux pipeline

    def lora_written(self, path: Path) -> list[str]:
        """Make the WebUI read a LoRA file that was (re)written, whatever it cached of its old bytes.

        A1111 reloads a network whose file's mtime grew (the writer guarantees that) but does not
        re-apply it to layers whose (name, strengths) did not change: those layers forget what
        they applied (their backups stay) and re-apply at the next generation. Forge caches LoRA
        files by name (``networks.load_lora_state_dict``, an lru_cache) and skips re-merging when
        the (file, strengths) list and each LoraLoader's patch list are unchanged: all three are
        reset. Both rescan the folder (new hash and metadata), and both would reuse the conditioning
        of an unchanged prompt computed with the old file's text-encoder layers: that cache is reset."""
        self.refresh_loras()
        _reset_cond_cache()
        try:
            import networks
        except ImportError:
            return []
        model = _loaded_sd_model()
        if is_forge():
            cached = getattr(networks, "load_lora_state_dict", None)
            if hasattr(cached, "cache_clear"):
                cached.cache_clear()
            if model is not None and hasattr(model, "forge_objects"):
                model.current_lora_hash = None
                for root in (model.forge_objects.unet.model, model.forge_objects.clip.patcher.model):
                    loader = getattr(root, "lora_loader", None)
                    if loader is not None:
                        loader.loaded_hash = None
        elif model is not None:
            for module in model.modules():
                if getattr(module, "network_current_names", ()) != ():
                    module.network_current_names = ()
        return []

    def checkpoint_written(self, path: Path) -> list[str]:
        self.refresh_checkpoints()
        model = _loaded_sd_model()
        loaded = self.loaded_checkpoint_file()
        if model is None or loaded is None or Path(loaded).resolve() != Path(path).resolve():
            return []
        if is_forge():  # Forge reloads at the next generation when its loading parameters' hash changes
            from modules import sd_models

            sd_models.model_data.forge_hash = None
            return [f"{path.name} is the loaded checkpoint: Forge loads the new file at the next generation"]
        return [f"{path.name} is the loaded checkpoint: A1111 keeps the old weights until it is reloaded "
                "(Settings → Actions → Reload checkpoint, or choose another checkpoint and back)"]

    # -- live bake -------------------------------------------------------------------------------
    supports_live_bake = True

    def live_model(self):
        model = _loaded_sd_model()
        if model is None:
            raise LoraMergeError("no model is loaded yet (generate once, or choose a checkpoint)")
        if _model_arch(model) not in ("sd1", "sd2", "sdxl"):
            raise LoraMergeError(f"the loaded model ({type(model).__name__}) is not SD1, SD2 or SDXL; "
                                 "bake into a checkpoint file instead")
        return _ForgeModel(model) if hasattr(model, "forge_objects") else _A1111Model(model)

    def live_bake(self):
        bake = _LIVE.get("bake")
        model = _loaded_sd_model()
        if bake is not None and (model is None or _model_identity(model) != bake.identity):
            _LIVE["bake"] = bake = None  # another model (or none) is loaded: the bake went with the old one
        return bake

    def set_live_bake(self, bake) -> None:
        _LIVE["bake"] = bake

    def loaded_checkpoint_file(self) -> Path | None:
        model = _loaded_sd_model()
        filename = getattr(getattr(model, "sd_checkpoint_info", None), "filename", None)
        return Path(filename) if filename else None

    def run_job(self, title: str, job: Callable[[], T], on_wait: Callable[[str], None] | None = None) -> T:
        """Run under the WebUI's GPU queue lock (never during an image generation), with ``shared.state``.

        ``wrap_gradio_gpu_call`` takes the lock, begins and ends ``shared.state`` (and resets its
        interrupt flag), frees GPU memory after; it turns exceptions into HTML for its own outputs,
        so the job's result or exception is carried out of it here. When a generation holds the
        lock, ``on_wait`` hears so first (the lock has no public "is it held" query: a
        non-blocking acquire, released at once, tells).
        """
        from modules import call_queue, shared

        if on_wait is not None and _lock_busy(call_queue.queue_lock):
            on_wait("waiting for the current generation to finish…")

        outcome: dict = {}

        def body() -> list:
            shared.state.job = title
            shared.state.textinfo = title
            self._running = True
            try:
                outcome["result"] = job()
            except BaseException as e:  # noqa: BLE001 (re-raised below, outside the WebUI's wrapper)
                outcome["error"] = e
            finally:
                self._running = False
            return [""]  # the wrapper appends its timing HTML to the last output

        call_queue.wrap_gradio_gpu_call(body, extra_outputs=[])()
        if "error" in outcome:
            raise outcome["error"]
        return outcome["result"]

    def job_progress(self, done: int, total: int, what: str) -> None:
        from modules import shared

        shared.state.job_count = total
        shared.state.job_no = done
        shared.state.textinfo = what
        if shared.state.interrupted:
            raise JobInterrupted()

    def interrupt(self) -> None:
        from modules import shared

        if self._running:
            shared.state.interrupt()


_LIVE: dict = {"bake": None}  # the live bake of this process's loaded model (a UI reload must not forget it)


def _lock_busy(lock) -> bool:
    if lock.acquire(blocking=False):
        lock.release()
        return False
    return True


def on_model_loaded(sd_model) -> None:
    """``script_callbacks.on_model_loaded``: a (re)loaded checkpoint has its own weights; the bake is gone."""
    _LIVE["bake"] = None


def generation_params(p) -> None:
    """Called by the always-on script for every generation: images made while a live bake is active say so."""
    bake = WebUIHost().live_bake()
    if bake is not None:
        p.extra_generation_params["LoRA bake"] = bake.label
        p.extra_generation_params["LoRA bake hash"] = bake.recipe_hash


def on_ui_tabs() -> list[tuple]:
    """The ``script_callbacks.on_ui_tabs`` callback: one tab, titled "LoRA Merge"."""
    from .ui import build_tab

    return [(build_tab(WebUIHost()), TAB_TITLE, TAB_ID)]


# ---- the loaded model: live bakes ------------------------------------------------------------------
#
# A1111 1.10 (extensions-builtin/Lora/networks.py): every Linear/Conv2d/MultiheadAttention layer that
# ran a forward pass while a prompt LoRA was loaded keeps ``network_weights_backup`` (a CPU copy of
# its weight without LoRAs) and ``network_current_names``; its live weight is backup + prompt deltas.
# Under fp8 storage with "cache FP16 weight", ``fp16_weight`` (CPU, fp16) is what LoRAs compute from.
# So the base of a layer is fp16_weight, else the backup, else the live weight. A bake restores the
# layer from its backup, writes base + ΔW into it (and into fp16_weight), then resets the layer's
# cache (``network_reset_cached_weight``): the next generation backs up the baked weight and stacks
# the prompt LoRAs on it, and removing them returns to the bake.
#
# Forge (backend/patcher/lora.py LoraLoader, one per nn.Module, shared by every patcher clone): a
# key some prompt LoRA patches keeps its un-patched value in ``lora_loader.backup[key]`` and the
# live parameter is a merged copy; any other key is its own base. A bake writes the base (the
# backup entry, else the live parameter, inside torch.inference_mode: Forge's are inference
# tensors) and invalidates the loader's applied-state hash and the model's LoRA hash, so the next
# generation re-merges the prompt LoRAs on the baked base (refresh restores the backups first).

_UNET = "model.diffusion_model."
_FORGE_TE_PREFIXES = {  # Forge's text encoders (HF layout) → the LDM prefixes the key map knows
    "sd1": {"clip_l.transformer.": "cond_stage_model.transformer."},
    "sd2": {"clip_h.transformer.": "cond_stage_model.transformer."},
    "sdxl": {"clip_l.transformer.": "conditioner.embedders.0.transformer.",
             "clip_g.transformer.": "conditioner.embedders.1.transformer."},
}


def _loaded_sd_model():
    """The model object the WebUI has loaded, or None (never triggers a load)."""
    from modules import sd_models

    model = getattr(sd_models.model_data, "sd_model", None)
    if model is None or not hasattr(model, "sd_checkpoint_info"):
        return None  # Forge's FakeInitialModel before the first generation has no checkpoint either
    return model


def _model_arch(model) -> str:
    for flag, arch in (("is_sdxl", "sdxl"), ("is_sd2", "sd2"), ("is_sd1", "sd1")):
        if getattr(model, flag, False):
            return arch
    kind = type(model).__name__  # Forge's engines
    return {"StableDiffusionXL": "sdxl", "StableDiffusion2": "sd2", "StableDiffusion": "sd1"}.get(kind, "other")


def _model_identity(model) -> tuple:
    info = getattr(model, "sd_checkpoint_info", None)
    return id(model), getattr(info, "filename", None)


def _reset_cond_cache() -> None:
    """Both WebUIs reuse the last prompt's conditioning when the prompt is the same; after the text
    encoder's weights change it must be computed again."""
    from modules import processing

    cls = processing.StableDiffusionProcessing
    for name in ("cached_c", "cached_uc"):
        current = getattr(cls, name, None)
        if isinstance(current, list):
            setattr(cls, name, [None] * len(current))


class _A1111Weight:
    """One weight of an A1111 layer (a MultiheadAttention holds two: in_proj_weight, out_proj.weight)."""

    def __init__(self, model: _A1111Model, layer, part: int | None):
        self.model, self.layer, self.part = model, layer, part  # part: 0/1 of an MHA, else None

    def _param(self):
        if self.part is None:
            return self.layer.weight
        return self.layer.in_proj_weight if self.part == 0 else self.layer.out_proj.weight

    def _backup(self):
        backup = getattr(self.layer, "network_weights_backup", None)
        if backup is None or id(self.layer) in self.model.restored:
            return None
        return backup if self.part is None else backup[self.part]

    def base(self):
        fp16 = getattr(self.layer, "fp16_weight", None) if self.part is None else None
        if fp16 is not None:
            return fp16
        backup = self._backup()
        return self._param() if backup is None else backup

    def snapshot(self) -> tuple:
        backup = self._backup()
        live = self._param() if backup is None else backup
        fp16 = getattr(self.layer, "fp16_weight", None) if self.part is None else None
        return live.detach().to("cpu", copy=True), None if fp16 is None else fp16.detach().to("cpu", copy=True)

    def snapshot_bytes(self, snapshot: tuple) -> int:
        return sum(t.numel() * t.element_size() for t in snapshot if t is not None)

    def _prepare(self) -> None:
        """Take the prompt LoRAs' deltas out of the whole layer, once, before its first write."""
        if id(self.layer) in self.model.restored:
            return
        if getattr(self.layer, "network_weights_backup", None) is not None:
            self.model.networks_call("network_restore_weights_from_backup", self.layer)
        self.model.restored.add(id(self.layer))
        self.model.touched[id(self.layer)] = self.layer

    def write(self, value) -> None:
        self._prepare()
        param = self._param()
        param.copy_(value.to(param.dtype))
        fp16 = getattr(self.layer, "fp16_weight", None) if self.part is None else None
        if fp16 is not None:
            fp16.copy_(value.to(fp16.dtype))

    def restore(self, snapshot: tuple) -> None:
        self._prepare()
        live, fp16 = snapshot
        self._param().copy_(live)
        if fp16 is not None:
            self.layer.fp16_weight.copy_(fp16)


class _A1111Model:
    """A1111's loaded LatentDiffusion, its weights named as in an LDM checkpoint (hijack wrappers left out)."""

    semantics = "a1111"

    def __init__(self, sd_model):
        import torch

        self.sd_model = sd_model
        self.name = Path(getattr(sd_model.sd_checkpoint_info, "filename", "") or "model").name
        self.arch = _model_arch(sd_model)
        self.restored: set[int] = set()
        self.touched: dict[int, object] = {}
        self._weights: dict[str, _A1111Weight] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        skip = set()
        for name, module in sd_model.named_modules():
            key = ".".join(p for p in name.split(".") if p != "wrapped")
            if not key.startswith((_UNET, "cond_stage_model.", "conditioner.")) or name in skip:
                continue
            if isinstance(module, torch.nn.MultiheadAttention):
                skip.add(name + ".out_proj")  # its out_proj is the MHA's, backed up with it
                for part, suffix in ((0, ".in_proj_weight"), (1, ".out_proj.weight")):
                    self._add(key + suffix, _A1111Weight(self, module, part))
            elif isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
                self._add(key + ".weight", _A1111Weight(self, module, None))

    def _add(self, key: str, weight: _A1111Weight) -> None:
        self._weights[key] = weight
        self._shapes[key] = tuple(weight._param().shape)

    def identity(self) -> tuple:
        return _model_identity(self.sd_model)

    def weights(self) -> dict:
        return self._weights

    def shapes(self) -> dict:
        return self._shapes

    def non_float(self) -> set:
        return {k for k, w in self._weights.items() if not w._param().is_floating_point()}

    def networks_call(self, function: str, layer) -> None:
        try:
            import networks  # the built-in Lora extension
        except ImportError:  # disabled: no prompt LoRAs, nothing to keep in step
            return
        getattr(networks, function)(layer)

    def commit(self, keys: list[str], text_encoder: bool) -> None:
        for layer in self.touched.values():  # the next forward backs up the new weight, then adds prompt LoRAs
            self.networks_call("network_reset_cached_weight", layer)
        self.touched.clear()
        self.restored.clear()
        if text_encoder:
            _reset_cond_cache()


class _ForgeWeight:
    def __init__(self, root, name: str, loader):
        self.root, self.name, self.loader = root, name, loader

    def _live(self):
        obj = self.root
        for part in self.name.split("."):
            obj = getattr(obj, part)
        return obj

    def _target(self):
        backup = getattr(self.loader, "backup", {}) if self.loader is not None else {}
        return backup[self.name] if self.name in backup else self._live()

    def base(self):
        return self._target()

    def snapshot(self):
        return self._target().detach().to("cpu", copy=True)

    def snapshot_bytes(self, snapshot) -> int:
        return snapshot.numel() * snapshot.element_size()

    def write(self, value) -> None:
        import torch

        target = self._target()
        with torch.inference_mode():
            target.copy_(value.to(target.dtype))

    restore = write


class _ForgeModel:
    """Forge's loaded engine: the UNet patcher's and the text encoders' parameters, under LDM names."""

    semantics = "forge"

    def __init__(self, sd_model):
        self.sd_model = sd_model
        self.name = Path(getattr(sd_model.sd_checkpoint_info, "filename", "") or "model").name
        self.arch = _model_arch(sd_model)
        objects = sd_model.forge_objects
        self._loaders = []
        self._weights: dict[str, _ForgeWeight] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        te_prefixes = _FORGE_TE_PREFIXES.get(self.arch, {})
        for root, rename in ((objects.unet.model, {"diffusion_model.": _UNET}),
                             (objects.clip.patcher.model, te_prefixes)):
            loader = getattr(root, "lora_loader", None)
            self._loaders.append(loader)
            for name, param in root.named_parameters():
                prefix = next((p for p in rename if name.startswith(p)), None)
                if prefix is None or param.ndim < 2:
                    continue
                if getattr(param, "bnb_quantized", None) is not None or "gguf" in type(param).__name__.lower():
                    raise LoraMergeError("the loaded model is stored quantised (nf4/GGUF): a live bake would have to "
                                         "re-quantise it; bake into a checkpoint file instead")
                key = rename[prefix] + name[len(prefix):]
                self._weights[key] = _ForgeWeight(root, name, loader)
                self._shapes[key] = tuple(param.shape)

    def identity(self) -> tuple:
        return _model_identity(self.sd_model)

    def weights(self) -> dict:
        return self._weights

    def shapes(self) -> dict:
        return self._shapes

    def non_float(self) -> set:
        return {k for k, w in self._weights.items() if not w._live().is_floating_point()}

    def commit(self, keys: list[str], text_encoder: bool) -> None:
        for loader in self._loaders:  # re-merge the prompt LoRAs on the new bases at the next load
            if loader is not None:
                loader.loaded_hash = None
        self.sd_model.current_lora_hash = None
        if text_encoder:
            _reset_cond_cache()

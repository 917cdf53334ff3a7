"""Loaded models for the live-bake tests: torch modules with the real SD key layout, and stand-ins of how
A1111 1.10 and Forge apply prompt LoRAs to them.

The A1111 stand-in follows extensions-builtin/Lora/networks.py as documented in the project's notes:
per layer ``network_layer_name``, a lazily taken CPU backup of the weight (``network_weights_backup``,
same dtype) the first time a forward runs with any network loaded, ``network_current_names`` compared
with the wanted (name, te, unet, dyn) tuple, restore-from-backup then re-apply on a change, and
``network_reset_cached_weight``. The Forge stand-in follows backend/patcher/lora.py's LoraLoader: one per
nn.Module, ``backup`` of patched keys only (the very Parameter when it is on the offload device),
``refresh`` skipped while the patch identifiers are unchanged, restore by replacing Parameters, merge
in float32 into new Parameters made under inference mode. Both compute a prompt LoRA's update with
this project's modules (the math is tested elsewhere against the WebUIs' formulas).
"""

from __future__ import annotations

import types

import torch

from lib_loramerge import sdlayouts
from lib_loramerge.bake.keymap import CheckpointLayout
from lib_loramerge.formats.reader import read_lora
from lib_loramerge.model import is_text_encoder

CPU = torch.device("cpu")

def _child(parent: torch.nn.Module, name: str) -> torch.nn.Module:
    if not hasattr(parent, name):
        parent.add_module(name, torch.nn.Module())
    return getattr(parent, name)


def _place(root: torch.nn.Module, path: str, module: torch.nn.Module) -> None:
    *parents, last = path.split(".")
    node = root
    for part in parents:
        node = _child(node, part)
    node.add_module(last, module)


def build_model(arch: str, width_divisor: int, dtype: torch.dtype = torch.float16, seed: int = 0,
                wrapped: bool = True) -> torch.nn.Module:
    """An nn.Module whose weights have the LDM checkpoint's names and shapes (UNet and text encoders, no VAE).

    ``wrapped``: as A1111 hijacks it, the text encoders sit under a ``wrapped`` attribute. OpenCLIP
    attention blocks are real ``nn.MultiheadAttention`` modules (fused in_proj_weight).
    """
    gen = torch.Generator().manual_seed(seed)
    model = torch.nn.Module()
    tensors = dict(sdlayouts.checkpoint_tensors(arch, width_divisor))
    for key, shape in tensors.items():
        if len(shape) < 2 or sdlayouts.is_integer_tensor(key) or not key.endswith(("weight", "in_proj_weight")):
            continue
        if key.endswith(".out_proj.weight") and key[: -len(".out_proj.weight")] + ".in_proj_weight" in tensors:
            continue  # made with its MultiheadAttention
        path = key.rsplit(".", 1)[0]
        if key.endswith(".in_proj_weight"):
            layer = torch.nn.MultiheadAttention(shape[1], 1)
        elif len(shape) == 4:
            layer = torch.nn.Conv2d(shape[1], shape[0], tuple(shape[2:]), bias=False)
        else:
            layer = torch.nn.Linear(shape[1], shape[0], bias=False)
        if wrapped:
            path = _wrap(path, arch)
        _place(model, path, layer)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    model.to(dtype)
    for flag in ("is_sd1", "is_sd2", "is_sdxl"):
        setattr(model, flag, flag == f"is_{arch}")
    return model


def _wrap(path: str, arch: str) -> str:
    """Where A1111's hijack puts a text-encoder weight: under ``wrapped`` of its encoder."""
    for encoder in ("conditioner.embedders.0.", "conditioner.embedders.1.", "cond_stage_model."):
        if path.startswith(encoder):
            return encoder + "wrapped." + path[len(encoder):]
    return path


def ldm_key(name: str) -> str:
    return ".".join(p for p in name.split(".") if p != "wrapped")


def weights_by_key(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every weight of the model under its LDM key, in float32 on the CPU (copies)."""
    out = {}
    for name, p in model.named_parameters():
        if p.ndim >= 2:
            out[ldm_key(name)] = p.detach().float().clone()
    return out


# ---- A1111's Lora extension, as it behaves ------------------------------------------------------------

class A1111Networks:
    """The parts of extensions-builtin/Lora/networks.py a live bake meets (installed as module ``networks``)."""

    def __init__(self, model: torch.nn.Module, arch: str):
        self.model, self.arch = model, arch
        self.loaded_networks: list[types.SimpleNamespace] = []
        layout = CheckpointLayout({ldm_key(n) + "." + a: tuple(t.shape) for n, m in model.named_modules()
                                   for a, t in self._tensors(m)}, arch=arch)
        self.layout = layout
        for name, module in model.named_modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d, torch.nn.MultiheadAttention)):
                module.network_layer_name = ldm_key(name)

    @staticmethod
    def _tensors(module):
        if isinstance(module, torch.nn.MultiheadAttention):
            return [("in_proj_weight", module.in_proj_weight), ("out_proj.weight", module.out_proj.weight)]
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) and not getattr(module, "_in_mha", False):
            return [("weight", module.weight)]
        return []

    def as_module(self) -> types.ModuleType:
        mod = types.ModuleType("networks")
        for name in ("network_restore_weights_from_backup", "network_reset_cached_weight", "network_apply_weights",
                     "list_available_networks"):
            setattr(mod, name, getattr(self, name))
        mod.loaded_networks = self.loaded_networks
        return mod

    def list_available_networks(self):
        pass

    # -- prompt LoRAs -------------------------------------------------------------------------------
    def load_networks(self, paths: list, te: list[float], unet: list[float]) -> None:
        """What ``<lora:…>`` tags do before a generation: the wanted networks and their multipliers."""
        self.loaded_networks.clear()
        for path, t, u in zip(paths, te, unet, strict=True):
            lora = read_lora(path)
            by_layer = {}
            for name, module in lora.modules.items():
                target = self.layout.target(name)
                by_layer.setdefault(target.key, []).append((target, module, is_text_encoder(name)))
            self.loaded_networks.append(types.SimpleNamespace(name=lora.name, te_multiplier=t, unet_multiplier=u,
                                                               dyn_dim=None, by_key=by_layer))

    def forward(self) -> None:
        """A generation's forward pass: every named layer runs network_apply_weights."""
        for module in self.model.modules():
            if hasattr(module, "network_layer_name"):
                self.network_apply_weights(module)

    # -- networks.py behaviour ----------------------------------------------------------------------
    def network_apply_weights(self, layer) -> None:
        current = getattr(layer, "network_current_names", ())
        wanted = tuple((n.name, n.te_multiplier, n.unet_multiplier, n.dyn_dim) for n in self.loaded_networks)
        mha = isinstance(layer, torch.nn.MultiheadAttention)
        if getattr(layer, "network_weights_backup", None) is None and wanted != ():
            if current != ():
                raise RuntimeError("no backup weights found and current weights are not unchanged")
            live = (layer.in_proj_weight, layer.out_proj.weight) if mha else (layer.weight,)
            backup = tuple(w.detach().to("cpu", copy=True) for w in live)
            layer.network_weights_backup = backup if mha else backup[0]
        if current == wanted:
            return
        self.network_restore_weights_from_backup(layer)
        with torch.no_grad():
            for net in self.loaded_networks:
                for attr, param in self._tensors(layer):
                    key = layer.network_layer_name + "." + attr
                    for target, module, te in net.by_key.get(key, []):
                        strength = net.te_multiplier if te else net.unet_multiplier
                        region = param if target.rows is None else param[target.rows[0]:target.rows[1]]
                        delta = module.delta(torch.float32).reshape(region.shape) * strength
                        region.copy_((region.float() + delta).to(param.dtype))
        layer.network_current_names = wanted

    def network_restore_weights_from_backup(self, layer) -> None:
        backup = getattr(layer, "network_weights_backup", None)
        if backup is None:
            return
        with torch.no_grad():
            if isinstance(layer, torch.nn.MultiheadAttention):
                layer.in_proj_weight.copy_(backup[0])
                layer.out_proj.weight.copy_(backup[1])
            else:
                layer.weight.copy_(backup)

    def network_reset_cached_weight(self, layer) -> None:
        layer.network_current_names = ()
        layer.network_weights_backup = None
        layer.network_bias_backup = None


def a1111_sd_model(arch: str, width_divisor: int, filename: str, dtype: torch.dtype = torch.float16):
    model = build_model(arch, width_divisor, dtype)
    for mha in [m for m in model.modules() if isinstance(m, torch.nn.MultiheadAttention)]:
        mha.out_proj._in_mha = True
    model.sd_checkpoint_info = types.SimpleNamespace(filename=filename)
    return model


# ---- Forge's LoraLoader and patchers, as they behave ------------------------------------------------------

def _get(root, key):
    for part in key.split("."):
        root = getattr(root, part)
    return root


def _set(root, key, value):
    *parents, last = key.split(".")
    for part in parents:
        root = getattr(root, part)
    setattr(root, last, value)


class ForgeLoraLoader:
    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.backup: dict[str, torch.Tensor] = {}
        self.loaded_hash = str([])
        self.refreshes = 0

    @torch.inference_mode()
    def refresh(self, lora_patches: dict, offload_device=CPU, force_refresh: bool = False) -> None:
        hashes = str(list(lora_patches.keys()))
        if hashes == self.loaded_hash and not force_refresh:
            return
        self.refreshes += 1
        for key, w in self.backup.items():  # restore: the backup object becomes the parameter again
            _set(self.model, key, w if isinstance(w, torch.nn.Parameter) else torch.nn.Parameter(w, requires_grad=False))
        self.backup = {}
        merged: dict[str, list] = {}
        for patches in lora_patches.values():
            for key, entries in patches.items():
                merged.setdefault(key, []).extend(entries)
        for key, entries in merged.items():
            weight = _get(self.model, key)
            if key not in self.backup:
                self.backup[key] = weight.to(device=offload_device)  # the same object when already there
            w = weight.to(torch.float32, copy=True)
            for strength, delta in entries:
                w += strength * delta.reshape(w.shape)
            _set(self.model, key, torch.nn.Parameter(w.to(weight.dtype), requires_grad=False))
        self.loaded_hash = hashes


class ForgePatcher:
    def __init__(self, model: torch.nn.Module):
        self.model = model
        if not hasattr(model, "lora_loader"):
            model.lora_loader = ForgeLoraLoader(model)
        self.lora_patches: dict = {}
        self.offload_device = torch.device("cpu")

    def clone(self) -> ForgePatcher:
        n = ForgePatcher(self.model)
        n.lora_patches = dict(self.lora_patches)
        return n

    def add_patches(self, filename: str, patches: dict, strength: float) -> None:
        self.lora_patches[(filename, strength, 1.0, False)] = {k: [(strength, d) for d in v] for k, v in patches.items()}

    def refresh_loras(self) -> None:
        self.model.lora_loader.refresh(self.lora_patches, self.offload_device)


def forge_sd_model(width_divisor: int, filename: str, unet_dtype=torch.float32, te_dtype=torch.float16):
    """Forge's SD1 engine: forge_objects.unet (``diffusion_model.*``) and .clip (``clip_l.transformer.*``)."""
    with torch.inference_mode():  # Forge loads models under inference mode: its tensors are inference tensors
        full = build_model("sd1", width_divisor, torch.float32, wrapped=False)
        unet_root, clip_root = torch.nn.Module(), torch.nn.Module()
        unet_root.add_module("diffusion_model", full.model.diffusion_model)
        clip_l = torch.nn.Module()
        clip_l.add_module("transformer", full.cond_stage_model.transformer)
        clip_root.add_module("clip_l", clip_l)
        unet_root.to(unet_dtype)
        clip_root.to(te_dtype)
    engine = type("StableDiffusion", (), {})()
    unet, clip = ForgePatcher(unet_root), types.SimpleNamespace(patcher=ForgePatcher(clip_root))
    engine.forge_objects = types.SimpleNamespace(unet=unet, clip=clip)
    engine.forge_objects_original = types.SimpleNamespace(unet=unet, clip=types.SimpleNamespace(patcher=clip.patcher))
    engine.current_lora_hash = str([])
    engine.sd_checkpoint_info = types.SimpleNamespace(filename=filename)
    engine.loaded = {}  # patcher kind → the patcher whose patches the loader last refreshed with
    return engine


def forge_weights(engine) -> dict[str, torch.Tensor]:
    out = {}
    for prefix, root in (("model.", engine.forge_objects.unet.model),
                         ("cond_stage_model.", engine.forge_objects.clip.patcher.model)):
        for name, p in root.named_parameters():
            if p.ndim >= 2:
                key = name.replace("clip_l.transformer.", "transformer.")
                out[prefix + key] = p.detach().float().clone()
    return out


def forge_generate(engine, paths: list, te: list[float], unet: list[float]) -> None:
    """A generation's LoRA steps in Forge: networks.load_networks, then each patcher's model load (refresh)."""
    targets = str([[str(p), u, t] for p, u, t in zip(paths, unet, te, strict=True)])
    if engine.current_lora_hash != targets:
        engine.current_lora_hash = targets
        unet_p = engine.forge_objects_original.unet.clone()
        clip_p = engine.forge_objects_original.clip.patcher.clone()
        for path, t, u in zip(paths, te, unet, strict=True):
            lora = read_lora(path)
            unet_patches, clip_patches = {}, {}
            for name, module in lora.modules.items():
                if is_text_encoder(name):
                    key = "clip_l.transformer.text_model." + _te_path(name) + ".weight"
                    clip_patches[key] = [module.delta(torch.float32)]
                else:
                    from lib_loramerge import naming

                    path_ldm = naming.ldm_unet_path(name, sdxl=False)
                    key = _forge_unet_key(unet_p.model, path_ldm)
                    unet_patches[key] = [module.delta(torch.float32)]
            unet_p.add_patches(str(path), unet_patches, u)
            clip_p.add_patches(str(path), clip_patches, t)
        engine.forge_objects = types.SimpleNamespace(unet=unet_p, clip=types.SimpleNamespace(patcher=clip_p))
    for kind, patcher in (("unet", engine.forge_objects.unet), ("clip", engine.forge_objects.clip.patcher)):
        if engine.loaded.get(kind) is not patcher:  # load_models_gpu: a new patcher object is loaded and refreshed
            engine.loaded[kind] = patcher
            patcher.refresh_loras()


def _te_path(kohya: str) -> str:
    rest = kohya[len("lora_te_text_model_"):]
    layer, rest = rest.split("_layers_", 1)[1].split("_", 1)
    return f"encoder.layers.{layer}." + rest.replace("self_attn_", "self_attn.").replace("mlp_", "mlp.")


def _forge_unet_key(root, ldm_path_underscored: str) -> str:
    index = {n.replace(".", "_"): n for n, p in root.named_parameters()}
    return index["diffusion_model_" + ldm_path_underscored + "_weight"]

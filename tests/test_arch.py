"""Architecture from names and shapes; metadata only breaks ties and is overruled with a warning."""

import pytest

from lib_loramerge import sdlayouts
from lib_loramerge.arch import detect_arch


def shapes(arch, scope="attention", only=None, te=True, diffusers_names=None):
    mods = sdlayouts.lora_modules(arch, scope, text_encoder=te, diffusers_names=diffusers_names)
    return {n: s for n, s in mods.items() if only is None or only in n}


@pytest.mark.parametrize("arch", sdlayouts.ARCHES)
def test_full_layouts(arch):
    info = detect_arch(shapes(arch, "locon"), {})
    assert info.arch == arch and info.source == "shapes" and info.notes == []


@pytest.mark.parametrize("arch", sdlayouts.ARCHES)
def test_cross_attention_alone_decides(arch):
    assert detect_arch(shapes(arch, only="attn2_to_k", te=False), {}).arch == arch


@pytest.mark.parametrize("arch", sdlayouts.ARCHES)
def test_text_encoder_alone_decides(arch):
    te_only = {n: s for n, s in shapes(arch).items() if n.startswith("lora_te")}
    assert detect_arch(te_only, {}).arch == arch


def test_sdxl_with_diffusers_unet_names():
    assert detect_arch(shapes("sdxl", "locon", diffusers_names=True), {}).arch == "sdxl"


def test_shapes_win_over_wrong_metadata_with_a_warning():
    info = detect_arch(shapes("sd1"), {"ss_base_model_version": "sdxl_base_v1-0"})
    assert info.arch == "sd1"
    assert any("metadata says SDXL" in n and "using SD1" in n for n in info.notes)
    info = detect_arch(shapes("sdxl"), {"ss_v2": "True"})
    assert info.arch == "sdxl" and "SD2" in info.notes[0]


def test_metadata_breaks_a_tie_and_is_used_when_shapes_say_nothing():
    attn1 = shapes("sd1", only="attn1", te=False)  # SD1 and SD2 have the same attn1 shapes
    assert detect_arch(attn1, {"ss_v2": "True"}).arch == "sd2"
    assert detect_arch(attn1, {"modelspec.architecture": "stable-diffusion-v1/lora"}).arch == "sd1"
    guess = detect_arch(attn1, {})
    assert guess.arch == "sd1" and "SD1 or SD2" in guess.notes[0]
    assert detect_arch({"lora_unet_foo": (4, 4)}, {"ss_base_model_version": "sd_v2"}).arch == "sd2"


def test_non_sd_transformers_are_unknown_and_say_so():
    info = detect_arch({"lora_transformer_joint_blocks_0_x_block_attn_qkv": (4608, 1536)}, {})
    assert info.arch == "unknown" and "SD3" in info.notes[0]
    # Flux metadata without Flux layers says nothing about the layers: unknown, naming the key
    info = detect_arch({"lora_foo": (4, 4)}, {"ss_base_model_version": "flux1"})
    assert info.arch == "unknown" and "flux1" in info.notes[0]


def test_conflicting_shapes_are_unknown():
    mixed = {**shapes("sd1", only="attn2_to_k", te=False), **shapes("sdxl", only="attn2_to_v", te=False)}
    info = detect_arch(mixed, {})
    assert info.arch == "unknown" and "conflicting" in info.notes[0]

"""The reference layouts and the naming conversions agree with known facts about SD1/SD2/SDXL."""

import pytest

from lib_loramerge import naming, sdlayouts
from lib_loramerge.model import kind_of


def count(arch, scope, te=True):
    return len(sdlayouts.lora_modules(arch, scope, text_encoder=te))


def test_module_counts_match_kohyas_logs():
    # kohya prints "create LoRA for U-Net: 192 modules" (SD1/SD2) and 722 (SDXL); TE 72, SDXL TE1+TE2 264
    assert count("sd1", "attention", te=False) == 192
    assert count("sd2", "attention", te=False) == 192
    assert count("sdxl", "attention", te=False) == 722
    assert count("sd1", "attention") - 192 == 72
    assert count("sd2", "attention") - 192 == 23 * 6
    assert count("sdxl", "attention") - 722 == 72 + 192


def test_sd1_proj_in_is_a_1x1_conv_and_sd2_sdxl_linear():
    sd1 = sdlayouts.lora_modules("sd1", "attention")
    assert sd1["lora_unet_down_blocks_0_attentions_0_proj_in"] == (320, 320, 1, 1)
    sd2 = sdlayouts.lora_modules("sd2", "attention")
    assert sd2["lora_unet_down_blocks_0_attentions_0_proj_in"] == (320, 320)
    xl = sdlayouts.lora_modules("sdxl", "attention")
    assert xl["lora_unet_input_blocks_4_1_proj_in"] == (640, 640)
    assert xl["lora_unet_middle_block_1_transformer_blocks_9_attn2_to_k"] == (1280, 2048)
    assert xl["lora_te2_text_model_encoder_layers_31_mlp_fc1"] == (5120, 1280)


def test_locon_adds_resnets_and_samplers_with_3x3_kernels():
    sd1 = sdlayouts.lora_modules("sd1", "locon")
    assert sd1["lora_unet_down_blocks_2_resnets_1_conv1"] == (1280, 1280, 3, 3)
    assert sd1["lora_unet_down_blocks_1_resnets_0_conv_shortcut"] == (640, 320, 1, 1)
    assert sd1["lora_unet_up_blocks_0_upsamplers_0_conv"] == (1280, 1280, 3, 3)
    assert sd1["lora_unet_down_blocks_0_downsamplers_0_conv"] == (320, 320, 3, 3)
    xl = sdlayouts.lora_modules("sdxl", "locon")
    assert xl["lora_unet_output_blocks_2_2_conv"] == (1280, 1280, 3, 3)
    assert xl["lora_unet_input_blocks_3_0_op"] == (320, 320, 3, 3)
    assert "lora_unet_conv_in" not in sd1 and "lora_unet_conv_in" in sdlayouts.lora_modules("sd1", "all")


@pytest.mark.parametrize("arch", sdlayouts.ARCHES)
def test_naming_round_trip(arch):
    sdxl = arch == "sdxl"
    for key, shape in sdlayouts.unet_tensors(arch):
        if not key.endswith(".weight") or len(shape) < 2:
            continue
        ldm = key[: -len(".weight")].replace(".", "_")
        diffusers = naming.ldm_to_diffusers(ldm, sdxl)
        assert diffusers is not None, ldm
        assert naming.diffusers_to_ldm(diffusers, sdxl) == ldm


def test_naming_matches_a1111_table():
    # examples from A1111's converter and the LDM checkpoint layout
    cases = {
        "down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q": "input_blocks_4_1_transformer_blocks_0_attn1_to_q",
        "down_blocks_2_resnets_1_conv1": "input_blocks_8_0_in_layers_2",
        "mid_block_resnets_1_conv1": "middle_block_2_in_layers_2",
        "mid_block_attentions_0_proj_out": "middle_block_1_proj_out",
        "down_blocks_0_downsamplers_0_conv": "input_blocks_3_0_op",
        "up_blocks_0_upsamplers_0_conv": "output_blocks_2_1_conv",
        "up_blocks_1_upsamplers_0_conv": "output_blocks_5_2_conv",
        "up_blocks_3_attentions_2_proj_in": "output_blocks_11_1_proj_in",
        "time_embedding_linear_2": "time_embed_2",
        "conv_out": "out_2",
    }
    for diffusers, ldm in cases.items():
        assert naming.diffusers_to_ldm(diffusers, sdxl=False) == ldm
    # SDXL's first up block has attention, so its upsampler is at index 2 (A1111's table says 1)
    assert naming.diffusers_to_ldm("up_blocks_0_upsamplers_0_conv", sdxl=True) == "output_blocks_2_2_conv"


def test_kinds():
    assert kind_of((320, 768)) == "linear"
    assert kind_of((320, 320, 1, 1)) == "conv1x1"
    assert kind_of((320, 320, 3, 3)) == "conv"

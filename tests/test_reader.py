"""Reading every supported key format into kohya-named modules; refusing the rest by name."""

import pytest
import torch
from safetensors.torch import save_file
from synth import (
    attnproc_state_dict,
    diffusers_state_dict,
    kohya_state_dict,
    make_modules,
    peft_state_dict,
    write_kohya,
)

from lib_loramerge import sdlayouts
from lib_loramerge.errors import LoraMergeError
from lib_loramerge.formats.reader import read_lora
from lib_loramerge.model import LoraModule


@pytest.mark.parametrize("arch", sdlayouts.ARCHES)
def test_kohya_locon_round_trip_names_kinds_values(tmp_path, arch):
    modules = make_modules(arch, scope="locon", rank=2, alpha=1.0)
    path = write_kohya(tmp_path / f"{arch}.safetensors", modules)
    lora = read_lora(path)
    assert lora.format == "kohya"
    assert lora.arch == arch
    assert sorted(lora.modules) == sorted(m.name for m in modules)
    expected = sdlayouts.lora_modules(arch, "locon")
    for m in lora.modules.values():
        assert m.weight_shape == expected[m.name]
        assert m.alpha == 1.0 and m.rank == 2 and m.scale == 0.5
    src = {m.name: m for m in modules}
    name = next(n for n in lora.modules if lora.modules[n].kind == "conv")
    assert torch.equal(lora.modules[name].down, src[name].down)


def test_sd1_kinds_include_1x1_conv_proj_and_3x3_locon(tmp_path):
    lora = read_lora(write_kohya(tmp_path / "a.safetensors", make_modules("sd1", scope="locon")))
    kinds = {m.kind for m in lora.modules.values()}
    assert kinds == {"linear", "conv1x1", "conv"}
    assert lora.modules["lora_unet_down_blocks_0_attentions_0_proj_in"].kind == "conv1x1"
    assert lora.modules["lora_unet_down_blocks_0_resnets_0_conv1"].kind == "conv"
    assert lora.modules["lora_unet_down_blocks_0_resnets_0_conv1"].weight_shape == (320, 320, 3, 3)


def test_missing_alpha_means_scale_one_and_is_reported(tmp_path):
    modules = make_modules("sd1", scope="attention", alpha=None, only="attn1_to_q")
    lora = read_lora(write_kohya(tmp_path / "a.safetensors", modules))
    assert all(m.alpha is None and m.scale == 1.0 for m in lora.modules.values())
    assert any("no alpha" in n and "scale 1" in n for n in lora.notes)


def test_peft_keys_become_kohya_names_with_te1_te2_on_sdxl(tmp_path):
    modules = make_modules("sdxl", scope="attention", only="attn2_to_k|self_attn_q_proj", diffusers_names=True)
    path = tmp_path / "peft.safetensors"
    save_file(peft_state_dict(modules, prefix="base_model.model."), str(path))
    lora = read_lora(path)
    assert lora.format == "peft" and lora.arch == "sdxl"
    names = set(lora.modules)
    # diffusers paths for the SDXL UNet become kohya's SGM paths
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k" in names
    assert "lora_unet_output_blocks_0_1_transformer_blocks_9_attn2_to_k" in names
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj" in names
    assert "lora_te2_text_model_encoder_layers_31_self_attn_q_proj" in names
    assert not any("down_blocks" in n for n in names)
    assert names == set(sdlayouts.lora_modules("sdxl", "attention")) & names
    assert any("renamed from diffusers paths" in n for n in lora.notes)


def test_peft_named_adapter_and_values(tmp_path):
    modules = make_modules("sd1", scope="attention", only="attn1_to_v")
    path = tmp_path / "peft.safetensors"
    save_file(peft_state_dict(modules, adapter="default"), str(path))
    lora = read_lora(path)
    assert lora.format == "peft:default"
    for m in modules:
        got = lora.modules[m.name]
        assert torch.equal(got.up, m.up) and torch.equal(got.down, m.down)  # lora_B = up, lora_A = down


@pytest.mark.parametrize("linear_layer", [False, True])
def test_diffusers_lora_down_up_keys(tmp_path, linear_layer):
    modules = make_modules("sd1", scope="attention", only="to_out_0|self_attn_k_proj")
    path = tmp_path / "d.safetensors"
    save_file(diffusers_state_dict(modules, linear_layer=linear_layer), str(path))
    lora = read_lora(path)
    assert lora.format == "diffusers" and lora.arch == "sd1"
    assert set(lora.modules) == {m.name for m in modules}


def test_attention_processor_keys(tmp_path):
    modules = make_modules("sd1", scope="attention", text_encoder=False, only=r"attn\d_to_")
    path = tmp_path / "p.safetensors"
    save_file(attnproc_state_dict(modules), str(path))
    lora = read_lora(path)
    assert lora.format == "diffusers-attnprocs"
    assert set(lora.modules) == {m.name for m in modules}
    assert len(lora.modules) == 16 * 8


def test_tucker_mid_is_accepted_and_folds_exactly(tmp_path):
    g = torch.Generator().manual_seed(3)
    up, mid = torch.randn(8, 3, 1, 1, generator=g), torch.randn(3, 3, 3, 3, generator=g)
    down = torch.randn(3, 5, 1, 1, generator=g)
    m = LoraModule("lora_unet_down_blocks_0_resnets_0_conv1", up, down, alpha=1.5, mid=mid)
    lora = read_lora(write_kohya(tmp_path / "t.safetensors", [m]))
    got = lora.modules[m.name]
    assert got.weight_shape == (8, 5, 3, 3) and got.kind == "conv"
    dense = torch.einsum("nmkl,in,mj->ijkl", mid, up.flatten(1), down.flatten(1)) * 0.5
    torch.testing.assert_close(got.delta(), dense)


def test_extras_are_kept_aside_and_reported(tmp_path):
    modules = make_modules("sd1", scope="attention", only="attn1_to_q")
    sd = kohya_state_dict(modules)
    sd["<s1>"] = torch.zeros(768)
    sd["bundle_emb.mychar.string_to_param.*"] = torch.zeros(2, 768)
    path = tmp_path / "e.safetensors"
    save_file(sd, str(path))
    lora = read_lora(path)
    assert set(lora.extras) == {"<s1>", "bundle_emb.mychar.string_to_param.*"}
    assert len(lora.modules) == len(modules)
    assert any("not LoRA factors" in n and "<s1>" in n for n in lora.notes)


UNSUPPORTED = {
    "LyCORIS IA3": {"lora_unet_x.weight": (4,), "lora_unet_x.on_input": ()},
    "LyCORIS full": {"lora_unet_x.diff": (4, 4)},
    "LyCORIS GLoRA": {"lora_unet_x.a1.weight": (2, 4), "lora_unet_x.a2.weight": (4, 2)},
    "OFT/BOFT": {"lora_unet_x.oft_blocks": (2, 2, 2)},
    "LyCORIS norm": {"lora_unet_x.w_norm": (4,), "lora_unet_x.b_norm": (4,)},
    "cloneofsimo": {"unet:0:up": (4, 1), "unet:0:down": (1, 4), "<s1>": (768,)},
    # LoHa, LoKr and DoRA are read in kohya naming only; under dotted diffusers paths they are refused by name
    "LyCORIS LoHa": {"unet.down_blocks.0.x.hada_w1_a": (4, 2), "unet.down_blocks.0.x.hada_w1_b": (2, 4)},
    "LyCORIS LoKr": {"unet.down_blocks.0.x.lokr_w1": (2, 2), "unet.down_blocks.0.x.lokr_w2": (4, 4)},
    "DoRA": {"unet.down_blocks.0.x.lora.up.weight": (4, 2), "unet.down_blocks.0.x.lora.down.weight": (2, 4),
             "unet.down_blocks.0.x.dora_scale": (1, 4)},
}


@pytest.mark.parametrize("fmt", list(UNSUPPORTED))
def test_recognised_but_unsupported_formats_are_refused_by_name(tmp_path, fmt):
    path = tmp_path / "u.safetensors"
    save_file({k: torch.ones(s) for k, s in UNSUPPORTED[fmt].items()}, str(path))
    with pytest.raises(LoraMergeError) as e:
        read_lora(path)
    assert fmt in str(e.value)
    assert str(path) in str(e.value)
    if fmt in ("LyCORIS LoHa", "LyCORIS LoKr", "DoRA"):
        assert "kohya naming only" in str(e.value)


def test_checkpoint_is_not_a_lora(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3),
               "cond_stage_model.transformer.text_model.final_layer_norm.weight": torch.zeros(4)}, str(path))
    with pytest.raises(LoraMergeError, match="model checkpoint"):
        read_lora(path)


def test_embedding_is_not_a_lora(tmp_path):
    path = tmp_path / "emb.safetensors"
    save_file({"emb_params": torch.zeros(2, 768)}, str(path))
    with pytest.raises(LoraMergeError, match="textual-inversion embedding"):
        read_lora(path)


def test_half_pair_names_the_module(tmp_path):
    path = tmp_path / "h.safetensors"
    save_file({"lora_unet_a.lora_up.weight": torch.zeros(4, 2)}, str(path))
    with pytest.raises(LoraMergeError, match="lora_unet_a: has up but no down factor"):
        read_lora(path)


def test_pickle_read_with_weights_only(tmp_path):
    modules = make_modules("sd1", scope="attention", only="attn1_to_q")
    path = tmp_path / "a.pt"
    torch.save(kohya_state_dict(modules), path)
    lora = read_lora(path)
    assert len(lora.modules) == len(modules) and lora.arch == "sd1"


def test_unsafe_pickle_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"lora_unet_a.lora_up.weight": torch.zeros(2, 2), "obj": LoraModule}, path)
    with pytest.raises(LoraMergeError, match="unsafe"):
        read_lora(path)


def test_bare_tensor_list_pickle_is_refused(tmp_path):
    path = tmp_path / "list.pt"
    torch.save([torch.zeros(4, 1), torch.zeros(1, 4)], path)
    with pytest.raises(LoraMergeError, match="bare pickled list of 2 tensors"):
        read_lora(path)

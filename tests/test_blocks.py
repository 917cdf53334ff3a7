"""Block weights as LBW applies them: layouts, module → block (no off-by-one), presets, prompt tags."""

import json
import math

import pytest
import torch
from safetensors import safe_open
from synth import assert_same_delta, make_modules, write_kohya

from lib_loramerge import sdlayouts
from lib_loramerge.blocks.layouts import IDS_26, check_length, expand
from lib_loramerge.blocks.mapping import block_of
from lib_loramerge.blocks.presets import SHIPPED_PRESETS, PresetBook, load_presets, parse_presets
from lib_loramerge.blocks.prompt import find_lora, parse_prompt
from lib_loramerge.blocks.report import block_energy, block_norms
from lib_loramerge.blocks.weights import parse_block_weights
from lib_loramerge.cli import main
from lib_loramerge.errors import LoraMergeError
from lib_loramerge.formats.reader import read_lora
from lib_loramerge.jobs import RECIPE_KEY, LoraSpec, merge_to_file, prepare_inputs
from lib_loramerge.model import LoraModel
from lib_loramerge.ops.merge import MergeInput, MergeOptions, merge_loras

F32 = torch.float32


def test_17_and_12_layouts_expand_with_zeros_exactly_as_lbw():
    full17 = expand([1.0] * 17)
    zero17 = {b for b, v in full17.items() if v == 0}
    assert zero17 == {"IN00", "IN03", "IN06", "IN09", "IN10", "IN11", "OUT00", "OUT01", "OUT02"}
    full12 = expand([1.0] * 12)
    named12 = {b for b, v in full12.items() if v == 1}
    assert named12 == {"BASE", "IN04", "IN05", "IN07", "IN08", "M00", "OUT00", "OUT01", "OUT02", "OUT03", "OUT04", "OUT05"}
    assert expand(list(range(26))) == dict(zip(IDS_26, range(26), strict=True))
    twenty = expand([float(i) for i in range(20)])
    assert twenty["M00"] == 10 and twenty["OUT08"] == 19 and twenty["IN08"] == 9 and twenty["OUT09"] == 0


def ldm_block(ldm_key: str) -> str | None:
    """The block of an LDM key, read straight off its path (independent of the naming code)."""
    parts = ldm_key.split(".")
    if parts[0] == "input_blocks":
        return f"IN{int(parts[1]):02d}"
    if parts[0] == "output_blocks":
        return f"OUT{int(parts[1]):02d}"
    if parts[0] == "middle_block":
        return "M00"
    return None


@pytest.mark.parametrize("arch,diffusers_names", [("sd1", None), ("sd2", None), ("sdxl", None), ("sdxl", True)])
def test_every_module_lands_in_its_ldm_block(arch, diffusers_names):
    checked = 0
    for key, shape in sdlayouts.unet_tensors(arch):
        if not key.endswith(".weight") or len(shape) < 2:
            continue
        path = key[: -len(".weight")]
        name = sdlayouts.kohya_unet_name(arch, path, diffusers_names)
        assert block_of(name, arch) == ldm_block(path), (name, path)
        checked += 1
    assert checked > 190
    for te in sdlayouts.TEXT_ENCODERS[arch]:
        for name, _ in sdlayouts.text_encoder_lora_modules(te):
            assert block_of(name, arch) == "BASE"


def test_no_off_by_one_in_sd1_kohya_names():
    cases = {
        "lora_unet_conv_in": "IN00",
        "lora_unet_down_blocks_0_attentions_0_proj_in": "IN01",
        "lora_unet_down_blocks_0_resnets_1_conv1": "IN02",
        "lora_unet_down_blocks_0_downsamplers_0_conv": "IN03",
        "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q": "IN04",
        "lora_unet_down_blocks_3_resnets_1_conv2": "IN11",
        "lora_unet_mid_block_resnets_1_conv1": "M00",
        "lora_unet_up_blocks_0_resnets_0_conv1": "OUT00",
        "lora_unet_up_blocks_0_upsamplers_0_conv": "OUT02",
        "lora_unet_up_blocks_1_attentions_0_proj_out": "OUT03",
        "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_ff_net_2": "OUT11",
        "lora_unet_time_embedding_linear_1": None,
        "lora_unet_conv_out": None,
        "lora_te_text_model_encoder_layers_11_mlp_fc2": "BASE",
    }
    for name, block in cases.items():
        assert block_of(name, "sd1") == block, name
    assert block_of("lora_te2_text_model_encoder_layers_3_self_attn_q_proj", "sdxl") == "BASE"
    assert block_of("lora_unet_input_blocks_4_1_transformer_blocks_1_attn2_to_k", "sdxl") == "IN04"
    assert block_of("lora_unet_label_emb_0_0", "sdxl") is None


def test_layout_for_the_other_model_and_bad_counts_are_errors():
    check_length(17, "sd1")
    check_length(20, "sdxl")
    with pytest.raises(LoraMergeError, match="12 block weights for an SD1 LoRA.*17 or 26.*SDXL layout"):
        check_length(12, "sd1")
    with pytest.raises(LoraMergeError, match="17 block weights for an SDXL LoRA.*12 or 20"):
        check_length(17, "sdxl")
    with pytest.raises(LoraMergeError, match="Flux"):
        check_length(61, "sdxl")
    with pytest.raises(LoraMergeError, match="13 block weights"):
        parse_block_weights(",".join(["1"] * 13), "sd1", PresetBook())
    with pytest.raises(LoraMergeError, match="known SD1/SD2/SDXL"):
        check_length(17, "unknown")


def test_shipped_presets_are_lbws_defaults():
    book = load_presets()
    assert book.get("OUTALL") == "1,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1".split(",")
    assert book.get("INALL") == "1,1,1,1,1,1,1,0,0,0,0,0,0,0,0,0,0".split(",")
    assert book.get("ALL0.5") == ["0.5"] * 17 and book.get("NONE") == ["0"] * 17
    assert len(book.get("FLUXALL")) == 61
    assert set(book.names()) == {"NONE", "ALL", "INS", "IND", "INALL", "MIDD", "OUTD", "OUTS", "OUTALL", "ALL0.5",
                                 "FLUXALL"}
    assert book.warnings() == [] and book.files[0].source == str(SHIPPED_PRESETS)


def test_preset_parsing_reports_what_lbw_skips_silently():
    text = "\n".join([
        "GOOD:" + ",".join(["1"] * 17),
        "# a comment line",
        "NOCOLON 1,1,1",
        "SHORT:1,1,1",
        "HASH:1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1 # trailing",
        "GOOD:" + ",".join(["0"] * 12),
        "  XL : " + ", ".join(["0.5"] * 20),
        "",
    ])
    parsed = parse_presets(text, "mine.txt")
    assert parsed.presets["GOOD"] == ["0"] * 12  # the later line wins, as in LBW
    assert parsed.presets["XL"] == ["0.5"] * 20
    assert [n for n, _, _ in parsed.skipped] == [2, 3, 4, 5]
    assert parsed.overridden == ["GOOD"]
    book = PresetBook()
    book.add(parsed)
    warnings = book.warnings()
    assert any("mine.txt:4: skipped (3 values" in w for w in warnings)
    assert any("'GOOD' defined more than once" in w for w in warnings)


def test_user_presets_override_ours(tmp_path):
    webui = tmp_path / "webui"
    lbw_file = webui / "extensions" / "sd-webui-lora-block-weight" / "scripts" / "lbwpresets.txt"
    lbw_file.parent.mkdir(parents=True)
    lbw_file.write_text("OUTALL:" + ",".join(["0.25"] * 17) + "\nMINE:" + ",".join(["2"] * 17) + "\n")
    extra = tmp_path / "extra.txt"
    extra.write_text("MINE:" + ",".join(["3"] * 17) + "\n")
    book = load_presets([extra], webui_root=webui)
    assert book.get("OUTALL") == ["0.25"] * 17
    assert book.get("MINE") == ["3"] * 17
    assert book.get("INALL")[1] == "1"  # ours, untouched


def test_unknown_preset_lists_valid_names():
    with pytest.raises(LoraMergeError) as e:
        parse_block_weights("OUTAL", "sd1", load_presets())
    msg = str(e.value)
    assert "unknown block-weight preset 'OUTAL'" in msg and "OUTALL" in msg and "FLUXALL" not in msg


def test_tokens_random_reproducible_and_inherited():
    book = PresetBook()
    spec = ",".join(["R", "U", "X", "X+0.5", "X-.25", "2"] + ["0"] * 11)
    a = parse_block_weights(spec, "sd1", book, x=0.8, seed=7)
    b = parse_block_weights(spec, "sd1", book, x=0.8, seed=7)
    assert a.values == b.values and a.seed == 7
    assert 0 <= a.values[0] < 1 and -0.5 <= a.values[1] <= 1.5
    assert a.values[0] == round(a.values[0], 3) and a.values[1] == round(a.values[1], 3)
    assert a.values[2:6] == [0.8, pytest.approx(1.3), pytest.approx(0.55), 2.0]
    fresh = parse_block_weights(spec, "sd1", book)
    assert fresh.seed is not None and parse_block_weights(spec, "sd1", book, x=0.8, seed=fresh.seed).values[:2] == \
        fresh.values[:2]
    assert parse_block_weights(",".join(["1"] * 17), "sd1", book).seed is None
    with pytest.raises(LoraMergeError, match="bad block weight 'Q'"):
        parse_block_weights(",".join(["Q"] * 17), "sd1", book)


def lora(modules, arch, name="x"):
    from pathlib import Path
    return LoraModel(modules={m.name: m for m in modules}, arch=arch, path=Path(f"{name}.safetensors"))


def dense(m):
    return m.scale * m.up.double().reshape(m.up.shape[0], -1) @ m.down.double().reshape(m.down.shape[0], -1)


@pytest.mark.parametrize("arch,diffusers_names,n", [("sd1", None, 17), ("sd1", None, 26), ("sd2", None, 17),
                                                     ("sdxl", None, 12), ("sdxl", None, 20), ("sdxl", True, 20)])
def test_merged_delta_follows_lbws_rule(arch, diffusers_names, n):
    only = "transformer_blocks_0_attn1_to_q|layers_0_self_attn_q|conv_in|time_emb"  # every block, cheap layers
    mods = make_modules(arch, scope="all", rank=2, alpha=1.0, only=only, diffusers_names=diffusers_names)
    values = [round(0.1 * (i + 1) - 0.7, 3) for i in range(n)]  # distinct per block, some negative, none zero
    weights = parse_block_weights(",".join(map(str, values)), arch, PresetBook())
    src = lora(mods, arch)
    unet, te = 0.9, -0.6
    result = merge_loras([MergeInput(src, unet=unet, te=te, block_ratio=weights.ratio)],
                         MergeOptions(mode="concat", dtype=F32))
    out = {m.name: m for m in result.modules}
    ids = {12: ["BASE", "IN04", "IN05", "IN07", "IN08", "M00"] + [f"OUT{i:02d}" for i in range(6)],
           17: ["BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "M00"] + [f"OUT{i:02d}" for i in range(3, 12)],
           20: ["BASE"] + [f"IN{i:02d}" for i in range(9)] + ["M00"] + [f"OUT{i:02d}" for i in range(9)],
           26: IDS_26}[n]
    given = dict(zip(ids, values, strict=True))
    kept = dropped = 0
    for m in mods:
        block = block_of(m.name, arch)
        ratio = 1.0 if block is None else given.get(block, 0.0)
        strength = (te if block == "BASE" else unet) * ratio
        if strength == 0:
            assert m.name not in out, m.name  # a zero-filled ID drops the module
            dropped += 1
            continue
        assert_same_delta(dense(out[m.name]), strength * dense(m), label=m.name)
        kept += 1
    assert kept > 5
    if n in (12, 17):
        assert dropped > 0


def test_17_values_keep_in01_and_drop_in02_when_asked():
    # the seed tool deleted IN01 modules and gave IN02 the IN01 value; we must not
    mods = make_modules("sd1", scope="attention", only="down_blocks_0_attentions_[01]_proj_in")
    src = lora(mods, "sd1")
    weights = parse_block_weights("1,0.5,0,1,1,1,1,1,1,1,1,1,1,1,1,1,1", "sd1", PresetBook())
    result = merge_loras([MergeInput(src, block_ratio=weights.ratio)], MergeOptions(mode="concat", dtype=F32))
    out = {m.name: m for m in result.modules}
    assert set(out) == {"lora_unet_down_blocks_0_attentions_0_proj_in"}
    torch.testing.assert_close(dense(out["lora_unet_down_blocks_0_attentions_0_proj_in"]), 0.5 * dense(mods[0]))


def test_block_norms_equal_dense_norms():
    mods = make_modules("sd1", scope="locon", rank=3, alpha=1.5, only="down_blocks_1|mid_block_attentions|layers_2_|conv_out")
    report = block_norms(lora(mods, "sd1"))
    expected = {}
    for m in mods:
        block = block_of(m.name, "sd1")
        if block:
            expected[block] = expected.get(block, 0.0) + float(dense(m).norm() ** 2)
    for block in report.layout:
        assert report.norms[block] == pytest.approx(math.sqrt(expected.get(block, 0.0)), rel=1e-6), block
    assert report.touched == ["BASE", "IN04", "IN05", "IN06", "M00"]
    assert report.no_block == ["lora_unet_conv_out"] or report.no_block == []


def test_svd_energy_pooled_per_block_weighs_modules_by_their_exact_energy():
    small = "down_blocks_1_attentions_0_transformer_blocks_0_attn1|mid_block_attentions_0_transformer_blocks_0_attn2_to_k"
    a = make_modules("sd1", rank=3, alpha=1.5, seed=3, only=f"{small}|layers_2_self_attn")
    b = make_modules("sd1", rank=2, alpha=2.0, seed=4, only="down_blocks_1_attentions_0_transformer_blocks_0_attn1|layers_2_self")
    inputs = [MergeInput(lora(a, "sd1"), unet=0.9, te=0.4), MergeInput(lora(b, "sd1"), unet=-0.7)]
    report = merge_loras(inputs, MergeOptions(mode="svd", rank=2, dtype=F32)).report
    kept, total = {}, {}
    for name in report.energy:
        want = sum(i.strength(name) * dense(i.lora.modules[name]) for i in inputs if name in i.lora.modules)
        s = torch.linalg.svdvals(want)
        assert report.target_energy[name] == pytest.approx(float((s ** 2).sum()), rel=1e-5), name
        block = block_of(name, "sd1")
        kept[block] = kept.get(block, 0.0) + float((s[:2] ** 2).sum())
        total[block] = total.get(block, 0.0) + float((s ** 2).sum())
    pooled = block_energy(report.energy, report.target_energy, "sd1")
    assert {b for b, v in pooled.retained.items() if v is not None} == {"BASE", "IN04", "M00"}
    for block in kept:
        assert pooled.retained[block] == pytest.approx(kept[block] / total[block], rel=1e-5), block
        assert 0 < pooled.retained[block] < 1  # rank 2 of a rank-5 sum loses something
    assert pooled.modules["IN04"] == sum(block_of(n, "sd1") == "IN04" for n in report.energy)
    assert block_energy(report.energy, report.target_energy, "unknown") is None


def test_prompt_tags_parse_like_a1111():
    tags = parse_prompt("a photo, <lora:one:0.8> <lora:two:0.5:0.3:lbw=OUTALL:x=0.7> "
                        "<lora:three:te=0.2:unet=1.5:w=INALL> <lyco:four> <hypernet:x:1>")
    assert [(t.name, t.te, t.unet, t.lbw, t.x) for t in tags] == [
        ("one", 0.8, 0.8, None, 1.0), ("two", 0.5, 0.3, "OUTALL", 0.7), ("three", 0.2, 1.5, "INALL", 1.0),
        ("four", 1.0, 1.0, None, 1.0)]
    for bad, why in (("<lora:a:1:start=5>", "during sampling"), ("<lora:a:1:OUTALL>", "lbw=NAME"),
                     ("<lora:a:1:lbwe=ATTN>", "unsupported option 'lbwe='"), ("no tags", "no <lora")):
        with pytest.raises(LoraMergeError, match=why):
            parse_prompt(bad)


def test_names_resolve_by_file_name_or_alias(tmp_path):
    mods = make_modules("sd1", scope="attention", only="attn1_to_q")
    (tmp_path / "sub").mkdir()
    write_kohya(tmp_path / "sub" / "plain.safetensors", mods)
    write_kohya(tmp_path / "long_file_name_v3.safetensors", mods, metadata={"ss_output_name": "mychar"})
    assert find_lora("plain", [tmp_path]).name == "plain.safetensors"
    assert find_lora("sub/plain", [tmp_path]).name == "plain.safetensors"
    assert find_lora("mychar", [tmp_path]).name == "long_file_name_v3.safetensors"
    with pytest.raises(LoraMergeError, match="no LoRA named 'nobody'"):
        find_lora("nobody", [tmp_path])
    write_kohya(tmp_path / "plain.safetensors", mods)
    with pytest.raises(LoraMergeError, match="ambiguous"):
        find_lora("plain", [tmp_path])


def test_random_block_weights_are_recorded_in_the_recipe(tmp_path):
    a = write_kohya(tmp_path / "a.safetensors", make_modules("sd1", scope="attention", only="attn1_to_q"))
    spec = ",".join(["R"] * 17)
    inputs, notes = prepare_inputs([LoraSpec(a, lbw=spec)], seed=11)
    job = merge_to_file(inputs, MergeOptions(mode="concat", dtype=F32), tmp_path / "m.safetensors")
    with safe_open(job.path, "pt") as f:
        recipe = json.loads(f.metadata()[RECIPE_KEY])
    used = recipe["inputs"][0]
    assert used["lbw"] == spec and used["lbw_seed"] == 11 and len(used["lbw_values"]) == 17
    again, _ = prepare_inputs([LoraSpec(a, lbw=spec)], seed=11)
    assert again[0].recipe["lbw_values"] == used["lbw_values"]
    assert any("block weights" in n and "seed 11" in n for n in notes)


def test_cli_lbws_and_prompt_give_the_same_file(tmp_path, capsys):
    mods = make_modules("sd1", scope="attention", rank=2, only="(down|up)_blocks_1_attentions_0_.*attn1|layers_0_self")
    write_kohya(tmp_path / "a.safetensors", mods)
    write_kohya(tmp_path / "b.safetensors", make_modules("sd1", scope="attention", seed=3, only="up_blocks_2.*attn2"))
    out1, out2 = tmp_path / "o1.safetensors", tmp_path / "o2.safetensors"
    assert main(["merge", "--models", str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors"),
                 "--ratios", "0.8", "0.5", "--te-ratios", "0.8", "0.3", "--lbws", "OUTALL", "-", "--mode", "concat",
                 "--dtype", "fp32", "--out", str(out1)]) == 0
    assert main(["merge", "--prompt", "<lora:a:0.8:lbw=OUTALL> <lora:b:0.3:0.5>", "--lora-dir", str(tmp_path),
                 "--mode", "concat", "--dtype", "fp32", "--out", str(out2)]) == 0
    capsys.readouterr()
    m1, m2 = read_lora(out1), read_lora(out2)
    assert set(m1.modules) == set(m2.modules)
    assert not any(n.startswith("lora_unet_down_blocks_1") for n in m1.modules)  # IN04/IN05 are 0 in OUTALL
    for name in m1.modules:
        assert_same_delta(m1.modules[name].delta(), m2.modules[name].delta(), label=name)
    code = main(["merge", "--models", str(tmp_path / "a.safetensors"), "--lbws", "1,1,1,1,1,1,1,1,1,1,1,1",
                 "--out", str(tmp_path / "o3.safetensors")])
    err = capsys.readouterr().err
    assert code == 2 and "12 block weights for an SD1 LoRA" in err and "a.safetensors" in err

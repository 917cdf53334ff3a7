"""Metadata that survives a merge, recipes that replay, batches with sweeps, and --verify (issue 14), end to end
through the command line on real files."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from synth import make_modules, write_kohya

from lib_loramerge.cli import main
from lib_loramerge.formats import safetensors_io
from lib_loramerge.synthetic import write_random_checkpoint

# Two trained LoRAs as kohya's sd-scripts label them (the keys users and sites read).
META_A = {"ss_base_model_version": "sd_v1", "ss_v2": "False", "ss_network_dim": "4", "ss_network_alpha": "1.0",
          "ss_output_name": "charA", "ss_tag_frequency": json.dumps({"10_charA": {"charA": 10, "red hair": 5}}),
          "modelspec.trigger_phrase": "charA, red hair", "ss_learning_rate": "0.0001", "ss_seed": "42",
          "ss_resolution": "(512, 512)"}
META_B = {"ss_base_model_version": "sd_v1", "ss_v2": "False", "ss_network_dim": "4", "ss_network_alpha": "1.0",
          "ss_output_name": "styleB", "ss_tag_frequency": json.dumps({"5_style": {"red hair": 3, "sketch": 7}}),
          "modelspec.trigger_phrase": "sketch", "ss_learning_rate": "0.0001", "ss_seed": "7",
          "ss_resolution": "(512, 512)"}
SOME_MODULES = "attn2|te_text_model_encoder_layers_0_"  # full-width SD1 modules, a few of them: small files


@pytest.fixture
def loras(tmp_path):
    a = write_kohya(tmp_path / "charA.safetensors", make_modules("sd1", rank=4, seed=1, only=SOME_MODULES),
                    metadata=META_A)
    b = write_kohya(tmp_path / "styleB.safetensors", make_modules("sd1", rank=4, seed=2, only=SOME_MODULES),
                    metadata=META_B)
    return a, b


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), "pt") as f:
        return f.metadata() or {}


def data_sha256(path: Path) -> str:
    """sha256 of the tensor data after the header: what kohya's sshs_model_hash covers."""
    raw = path.read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])
    return hashlib.sha256(raw[8 + header_len:]).hexdigest()


# What the WebUIs' Lora pages do with a file's metadata (facts from their sources, not their code):
# A1111 1.10 extensions-builtin/Lora/network.py NetworkOnDisk: alias = ss_output_name (else the file name);
# version: ss_base_model_version starting "sdxl_" → SDXL, ss_v2 == "True" → SD2, any metadata → SD1.
# Forge sd_forge_lora/network.py: modelspec.implementation of BFL's flux → Flux; modelspec.architecture
# "stable-diffusion-xl-v1-base/lora" → SDXL, "stable-diffusion-v1/lora" → SD1; otherwise Unknown.
def a1111_files_as(meta: dict[str, str]) -> str:
    if str(meta.get("ss_base_model_version", "")).startswith("sdxl_"):
        return "SDXL"
    if str(meta.get("ss_v2", "")) == "True":
        return "SD2"
    return "SD1" if meta else "Unknown"


def forge_files_as(meta: dict[str, str]) -> str:
    if meta.get("modelspec.implementation") == "https://github.com/black-forest-labs/flux":
        return "Flux"
    return {"stable-diffusion-xl-v1-base/lora": "SDXL",
            "stable-diffusion-v1/lora": "SD1"}.get(meta.get("modelspec.architecture", ""), "Unknown")


def test_a_merge_keeps_tags_and_trigger_words_and_is_filed_right_by_both_webuis(tmp_path, loras, capsys):
    out = tmp_path / "mix.safetensors"
    code, _, err = run(capsys, "merge", "--models", *loras, "--ratios", "1", "0.5", "--rank", "6", "--out", out,
                       "--device", "cpu")
    assert code == 0, err
    meta = metadata(out)
    assert json.loads(meta["ss_tag_frequency"]) == {"10_charA": {"charA": 10, "red hair": 5},
                                                    "5_style": {"red hair": 3, "sketch": 7}}
    assert meta["modelspec.trigger_phrase"] == "charA, red hair, sketch"
    assert meta["ss_output_name"] == "mix" and meta["modelspec.title"] == "mix"
    assert meta["ss_learning_rate"] == "0.0001"  # both inputs agree: kept
    assert "ss_seed" not in meta  # they disagree: no value would be true of the merge
    # what the file is, not what the inputs were: rank 6, alpha = rank (scale 1)
    assert meta["ss_network_dim"] == "6" and float(meta["ss_network_alpha"]) == 6.0
    assert meta["ss_network_module"] == "networks.lora"
    with safe_open(str(out), "pt") as f:
        ups = [k for k in f.keys() if k.endswith("lora_up.weight")]  # noqa: SIM118 (safe_open is not iterable)
        assert {f.get_slice(k).get_shape()[1] for k in ups} == {6}
    digest = data_sha256(out)
    assert meta["sshs_model_hash"] == digest and meta["modelspec.hash_sha256"] == "0x" + digest
    # Sai modelspec 1.0.1
    assert meta["modelspec.sai_model_spec"] == "1.0.1"
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert meta["modelspec.implementation"] == "diffusers"
    assert meta["modelspec.merged_from"] == "charA, styleB"
    assert meta["modelspec.resolution"] == "512x512" and meta["modelspec.prediction_type"] == "epsilon"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d", meta["modelspec.date"])
    assert a1111_files_as(meta) == "SD1" and forge_files_as(meta) == "SD1"


def test_an_sdxl_merge_is_filed_as_sdxl_by_both_webuis(tmp_path, capsys):
    parts = [write_kohya(tmp_path / f"x{i}.safetensors", make_modules("sdxl", rank=2, seed=i, only="attn2_to_k"))
             for i in range(2)]
    out = tmp_path / "xl.safetensors"
    code, _, err = run(capsys, "merge", "--models", *parts, "--out", out, "--device", "cpu")
    assert code == 0, err
    meta = metadata(out)
    assert meta["ss_base_model_version"].startswith("sdxl_") and meta["modelspec.resolution"] == "1024x1024"
    assert a1111_files_as(meta) == "SDXL" and forge_files_as(meta) == "SDXL"


@pytest.mark.parametrize("mode", ["first", "new", "none"])
def test_metadata_modes(tmp_path, loras, capsys, mode):
    out = tmp_path / f"{mode}.safetensors"
    code, _, err = run(capsys, "merge", "--models", *loras, "--out", out, "--metadata", mode, "--device", "cpu")
    assert code == 0, err
    meta = metadata(out)
    assert meta["ss_network_dim"] == "4" and meta["sshs_model_hash"] == data_sha256(out)  # always ours, always right
    assert a1111_files_as(meta) == "SD1" and forge_files_as(meta) == "SD1"
    if mode == "first":
        assert meta["modelspec.trigger_phrase"] == "charA, red hair" and meta["ss_seed"] == "42"
        assert json.loads(meta["ss_tag_frequency"]) == {"10_charA": {"charA": 10, "red hair": 5}}
    else:
        assert "ss_tag_frequency" not in meta and "modelspec.trigger_phrase" not in meta and "ss_seed" not in meta
    assert ("lora_merger_recipe" in meta) == (mode != "none")
    assert ("modelspec.merged_from" in meta) == (mode != "none")


def test_replay_is_byte_identical_and_finds_a_moved_renamed_input_by_its_hash(tmp_path, loras, capsys):
    out = tmp_path / "mix.safetensors"
    code, _, err = run(capsys, "merge", "--models", *loras, "--ratios", "0.7", "0.4", "--te-ratios", "1", "0",
                       "--lbws", "1,0,0,0,0,1,1,1,1,1,1,1,0,0,0,0,0", "1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1",
                       "--rank", "5", "--out", out, "--device", "cpu")
    assert code == 0, err
    elsewhere = tmp_path / "library"
    elsewhere.mkdir()
    shutil.move(loras[1], elsewhere / "renamed.safetensors")
    before = sorted(p.name for p in tmp_path.iterdir())
    code, stdout, err = run(capsys, "replay", out, "--lora-dir", elsewhere)
    assert code == 0, err
    assert "byte-identical" in stdout and "renamed.safetensors" in stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # the check's scratch copy is gone

    again = tmp_path / "again.safetensors"
    code, stdout, err = run(capsys, "replay", out, "--lora-dir", elsewhere, "--out", again)
    assert code == 0, err
    assert load_file(str(again)).keys() == load_file(str(out)).keys()
    assert all(torch.equal(t, load_file(str(out))[k]) for k, t in load_file(str(again)).items())
    assert "tensors are byte-identical" in stdout


def test_replay_refuses_a_changed_input_and_a_missing_one(tmp_path, loras, capsys):
    out = tmp_path / "mix.safetensors"
    assert run(capsys, "merge", "--models", *loras, "--out", out, "--device", "cpu")[0] == 0
    write_kohya(loras[0], make_modules("sd1", rank=4, seed=99, only=SOME_MODULES), metadata=META_A)  # retrained
    code, stdout, err = run(capsys, "replay", out)
    assert code == 2 and "charA.safetensors" in err and "changed since the recipe was made" in err
    assert "Traceback" not in err
    loras[0].unlink()
    code, _, err = run(capsys, "replay", out)
    assert code == 2 and "charA.safetensors" in err and "is not in" in err


def test_a_recipe_from_a_newer_tool_is_refused_and_a_version_1_recipe_replays(tmp_path, loras, capsys):
    out = tmp_path / "mix.safetensors"
    assert run(capsys, "merge", "--models", *loras, "--metadata", "new", "--out", out, "--device", "cpu")[0] == 0
    tensors, meta = load_file(str(out)), metadata(out)
    recipe = json.loads(meta["lora_merger_recipe"])

    newer = tmp_path / "newer.safetensors"
    save_file(tensors, str(newer), metadata={**meta, "lora_merger_recipe": json.dumps({**recipe, "recipe_version": 99})})
    code, _, err = run(capsys, "replay", newer)
    assert code == 2 and "99" in err and "Traceback" not in err

    # the first tool versions wrote no recipe_version and no metadata mode (they wrote only their own keys)
    old = {k: v for k, v in recipe.items() if k not in ("recipe_version", "metadata")}
    v1 = tmp_path / "v1.safetensors"
    save_file(tensors, str(v1), metadata={**meta, "lora_merger_recipe": json.dumps(old)})
    code, stdout, err = run(capsys, "replay", v1)
    assert code == 0, err
    assert "the tensors are byte-identical; metadata differs in lora_merger_recipe" in stdout


@pytest.fixture
def checkpoint(tmp_path):
    ckpt = write_random_checkpoint(tmp_path / "base.safetensors", "sd1", width_divisor=8,
                                   metadata={"modelspec.title": "base model", "note": "kept"})
    (tmp_path / "base.yaml").write_text("model:\n  params:\n    parameterization: v\n")
    lora = write_kohya(tmp_path / "narrow.safetensors", make_modules("sd1", rank=4, seed=5, width_divisor=8))
    return ckpt, lora


def test_a_bake_records_its_lineage_copies_the_config_and_replays(tmp_path, checkpoint, capsys):
    ckpt, lora = checkpoint
    out = tmp_path / "baked.safetensors"
    code, stdout, err = run(capsys, "bake", "--checkpoint", ckpt, "--models", lora, "--ratios", "0.8", "--out", out,
                            "--device", "cpu")
    assert code == 0, err
    meta = metadata(out)
    assert meta["note"] == "kept" and meta["modelspec.title"] == "base model"  # the checkpoint's own metadata
    whole = hashlib.sha256(ckpt.read_bytes()).hexdigest()
    legacy = hashlib.sha256(ckpt.read_bytes()[0x100000:0x110000]).hexdigest()[:8]  # A1111's model_hash
    recipe = json.loads(meta["sd_merge_recipe"])
    assert recipe["primary_model_hash"] == whole and recipe["custom_name"] == "baked"
    assert recipe["loras"][0]["name"] == "narrow.safetensors"
    models = json.loads(meta["sd_merge_models"])
    assert models == {whole: {"name": "base.safetensors", "legacy_hash": legacy, "sd_merge_recipe": None}}
    assert (tmp_path / "baked.yaml").read_text() == (tmp_path / "base.yaml").read_text()
    assert "baked.yaml" in stdout

    code, stdout, err = run(capsys, "replay", out)
    assert code == 0, err
    assert "byte-identical" in stdout


def test_a_bake_does_not_replace_an_existing_config_without_overwrite(tmp_path, checkpoint, capsys):
    ckpt, lora = checkpoint
    (tmp_path / "baked.yaml").write_text("mine\n")
    out = tmp_path / "baked.safetensors"
    code, _, err = run(capsys, "bake", "--checkpoint", ckpt, "--models", lora, "--out", out, "--device", "cpu")
    assert code == 2 and "baked.yaml" in err
    assert not out.exists() and (tmp_path / "baked.yaml").read_text() == "mine\n"


def test_a_batch_runs_a_five_value_sweep_past_a_failing_job(tmp_path, loras, capsys):
    a, b = loras
    batch = tmp_path / "jobs.toml"
    batch.write_text(f"""
[defaults]
rank = 4
device = "cpu"

[[jobs]]
command = "merge"
models = ["{a.name}", "{b.name}"]
ratios = [1.0, "{{s}}"]
out = "sweep/mix-{{s}}.safetensors"
sweep = {{ s = [0.0, 0.25, 0.5, 0.75, 1.0] }}

[[jobs]]
command = "merge"
models = ["{a.name}", "gone.safetensors"]
out = "broken/never.safetensors"

[[jobs]]
command = "resize"
lora = "{a.name}"
rank = 2
out = "small.safetensors"
""")
    code, stdout, err = run(capsys, "batch", batch)
    assert code == 2
    written = sorted(p.name for p in (tmp_path / "sweep").iterdir())
    assert written == [f"mix-{s}.safetensors" for s in ("0.0", "0.25", "0.5", "0.75", "1.0")]
    for s in (0.0, 0.25, 0.5, 0.75, 1.0):
        recipe = json.loads(metadata(tmp_path / "sweep" / f"mix-{s}.safetensors")["lora_merger_recipe"])
        assert [i["unet"] for i in recipe["inputs"]] == [1.0, s]
    assert (tmp_path / "small.safetensors").exists()  # the job after the failure ran
    assert not (tmp_path / "broken").exists()  # the failed job left nothing, not even its folder
    assert "6 of 7 jobs done, 1 failed" in stdout
    summary = [line for line in stdout.splitlines() if "FAILED" in line]
    assert len(summary) == 1 and "gone.safetensors" in summary[0]
    leftovers = [p.name for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]
    assert leftovers == []


def test_dry_run_lists_the_expanded_commands_and_writes_nothing(tmp_path, loras, capsys):
    batch = tmp_path / "jobs.json"
    batch.write_text(json.dumps({"jobs": [{"command": "merge", "models": [loras[0].name, loras[1].name],
                                           "ratios": ["{a}", "{b}"], "out": "m-{a}-{b}.safetensors",
                                           "sweep": {"a": [1, 2], "b": [0.5, 1]}}]}))
    code, stdout, _ = run(capsys, "batch", batch, "--dry-run")
    assert code == 0
    lines = stdout.strip().splitlines()
    assert len(lines) == 4 and "--ratios 2 0.5" in stdout and "m-2-0.5.safetensors" in stdout
    assert not list(tmp_path.glob("m-*"))


# --verify: a written file that is not what the job computed is an error, and nothing is published.
def _zero_first_tensor(path: Path, pick) -> str:
    """Overwrite the bytes of the first tensor whose name ``pick`` accepts with zeros; returns its name."""
    with open(path, "r+b") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
        name = sorted(k for k in header if k != "__metadata__" and pick(k))[0]
        start, end = header[name]["data_offsets"]
        f.seek(8 + header_len + start)
        f.write(b"\0" * (end - start))
    return name


@pytest.fixture
def corrupt_before_publish(monkeypatch):
    """Make the writer damage one tensor in the temp file just before the job's check sees it."""
    from lib_loramerge.bake import stream
    from lib_loramerge.formats import writer

    damaged: list[str] = []

    def install(pick):
        real = safetensors_io.write_safetensors

        def damaging(*args, before_publish=None, **kwargs):
            def check(tmp):
                damaged.append(_zero_first_tensor(Path(tmp), pick))
                if before_publish is not None:
                    before_publish(tmp)
            return real(*args, before_publish=check, **kwargs)

        monkeypatch.setattr(writer, "write_safetensors", damaging)
        monkeypatch.setattr(stream, "write_safetensors", damaging)
        return damaged
    return install


def test_verify_catches_a_corrupted_merge(tmp_path, loras, capsys, corrupt_before_publish):
    damaged = corrupt_before_publish(lambda k: k.endswith("lora_up.weight"))
    out = tmp_path / "mix.safetensors"
    code, _, err = run(capsys, "merge", "--models", *loras, "--out", out, "--verify", "--device", "cpu")
    module = damaged[0].removesuffix(".lora_up.weight")
    assert code == 2 and module in err and "Traceback" not in err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_without_verify_the_same_damage_goes_unnoticed(tmp_path, loras, capsys, corrupt_before_publish):
    # the control: the damage is real and only --verify looks for it
    corrupt_before_publish(lambda k: k.endswith("lora_up.weight"))
    out = tmp_path / "mix.safetensors"
    assert run(capsys, "merge", "--models", *loras, "--out", out, "--device", "cpu")[0] == 0
    assert out.exists()


def test_verify_catches_a_corrupted_resize(tmp_path, loras, capsys, corrupt_before_publish):
    damaged = corrupt_before_publish(lambda k: k.endswith("lora_down.weight"))
    out = tmp_path / "small.safetensors"
    code, _, err = run(capsys, "resize", loras[0], "--rank", "2", "--out", out, "--verify", "--device", "cpu")
    assert code == 2 and damaged[0].removesuffix(".lora_down.weight") in err
    assert not out.exists()


def test_verify_catches_a_corrupted_bake(tmp_path, checkpoint, capsys, corrupt_before_publish):
    ckpt, lora = checkpoint
    damaged = corrupt_before_publish(lambda k: "attn2.to_k.weight" in k and k.startswith("model.diffusion_model"))
    out = tmp_path / "baked.safetensors"
    code, _, err = run(capsys, "bake", "--checkpoint", ckpt, "--models", lora, "--out", out, "--verify",
                       "--device", "cpu")
    assert code == 2 and damaged[0] in err
    assert not out.exists() and not (tmp_path / "baked.yaml").exists()


def test_verify_passes_on_good_outputs_and_says_so(tmp_path, loras, checkpoint, capsys):
    out = tmp_path / "mix.safetensors"
    code, stdout, err = run(capsys, "merge", "--models", *loras, "--mode", "concat", "--out", out, "--verify",
                            "--device", "cpu")
    assert code == 0, err
    assert re.search(r"verified: \d+ modules re-read from the file, all within their bounds", stdout)
    ckpt, lora = checkpoint
    code, stdout, err = run(capsys, "bake", "--checkpoint", ckpt, "--models", lora, "--out", tmp_path / "b.safetensors",
                            "--verify", "--device", "cpu")
    assert code == 0, err
    assert re.search(r"verified: \d+ patched tensors re-read from the file", stdout)


def test_replay_from_a_saved_recipe_file(tmp_path, loras, capsys):
    out = tmp_path / "mix.safetensors"
    assert run(capsys, "merge", "--models", *loras, "--ratios", "1", "0.3", "--out", out, "--device", "cpu")[0] == 0
    recipe = tmp_path / "recipe.json"
    recipe.write_text(metadata(out)["lora_merger_recipe"])
    code, _, err = run(capsys, "replay", recipe)
    assert code == 2 and "--out" in err  # nothing to compare with: the new file must go somewhere
    again = tmp_path / "again.safetensors"
    code, stdout, err = run(capsys, "replay", recipe, "--out", again)
    assert code == 0, err
    assert stdout.count("wrote") == 1
    assert all(torch.equal(t, load_file(str(out))[k]) for k, t in load_file(str(again)).items())


def test_batch_refuses_sweeps_and_jobs_that_would_write_one_file_twice(tmp_path, loras, capsys):
    a, b = (p.name for p in loras)
    batch = tmp_path / "jobs.json"
    batch.write_text(json.dumps({"jobs": [
        {"command": "merge", "models": [a, b], "ratios": [1, "{s}"], "out": "same.safetensors",
         "sweep": {"s": [0.5, 1]}},
        {"command": "merge", "models": [a, b], "out": "one.safetensors"},
        {"command": "merge", "models": [b, a], "out": "one.safetensors"},
        {"command": "merge", "models": [a, b], "ranks": 4, "out": "typo.safetensors"},
    ]}))
    code, stdout, _ = run(capsys, "batch", batch, "--dry-run")
    assert code == 0
    assert "'out' must contain {s}" in stdout
    assert "writes" in stdout and "as job 2 does" in stdout
    assert "'ranks' is no option of merge" in stdout
    code, stdout, _ = run(capsys, "batch", batch)
    assert code == 2 and "1 of 4 jobs done, 3 failed" in stdout
    assert sorted(p.name for p in tmp_path.glob("*.safetensors") if p.name not in (a, b)) == ["one.safetensors"]

"""The tab's actions called directly: real files, refused names, errors as one-line messages."""

from __future__ import annotations

import json

import pytest
import torch
from uikit import checkpoint_folder, lora_folder

from lib_loramerge.blocks.presets import load_presets
from lib_loramerge.blocks.weights import parse_block_weights
from lib_loramerge.formats.reader import read_lora
from lib_loramerge.formats.safetensors_io import read_header
from lib_loramerge.jobs import RECIPE_KEY
from lib_loramerge.ui import handlers
from lib_loramerge.ui.handlers import BakeRequest, LoraRow, MergeRequest
from lib_loramerge.ui.host import StandaloneHost


@pytest.fixture
def host(tmp_path):
    return StandaloneHost([lora_folder(tmp_path)], tmp_path / "ckpt")


def two_rows(**second) -> list[LoraRow]:
    return [LoraRow("style_a.safetensors", unet=0.8, te=0.6), LoraRow("character_b.safetensors", **second),
            LoraRow(None), LoraRow(None)]


def dense(module) -> torch.Tensor:
    return module.delta().double().reshape(module.up.shape[0], -1)


def test_merge_writes_the_file_the_rows_describe(host):
    rows = two_rows(unet=-0.5, te=0.3, weights="MIDD")
    outcome = handlers.merge(host, MergeRequest(rows, "combined", mode="concat", dtype="fp32"))
    out = host.lora_output_dir() / "combined.safetensors"
    assert outcome.ok, outcome.message
    assert outcome.path == out and out.is_file()
    assert outcome.message.startswith(f"wrote {out}") and "concat of 2 LoRAs" in outcome.message
    assert outcome.chart is None  # the energy chart is svd's
    recipe = json.loads(read_header(out).metadata[RECIPE_KEY])
    assert [(i["unet"], i["te"], i.get("lbw")) for i in recipe["inputs"]] == [(0.8, 0.6, None), (-0.5, 0.3, "MIDD")]
    # concat is exact: every module is the strengths' sum of the inputs, block weights included
    a, b = (read_lora(host.lora_output_dir() / f) for f in ("style_a.safetensors", "character_b.safetensors"))
    midd = parse_block_weights("MIDD", "sd1", load_presets())
    merged = read_lora(out)
    for name, module in merged.modules.items():
        te = name.startswith("lora_te")
        want = sum(s * dense(lora.modules[name]) for lora, s in
                   ((a, 0.6 if te else 0.8), (b, (0.3 if te else -0.5) * midd.ratio(name))) if name in lora.modules)
        torch.testing.assert_close(dense(module), want, rtol=2e-3, atol=2e-5)


def test_svd_merge_reports_energy_kept_per_block(host):
    outcome = handlers.merge(host, MergeRequest(two_rows(), "low_rank.safetensors", mode="svd", rank=2))
    assert outcome.ok, outcome.message
    blocks = dict(outcome.chart)
    assert set(blocks) == {"BASE", "IN04", "M00", "OUT07"}  # the blocks SMALL's modules sit in
    assert all(0 < v <= 1 for v in blocks.values()) and min(blocks.values()) < 1  # rank 2 of 8 loses some
    assert {m.rank for m in read_lora(outcome.path).modules.values()} == {2}


@pytest.mark.parametrize("name", ["../escape", "sub/dir", "sub\\dir", "/abs/path", "..", ".", "", "   ", "C:evil",
                                  ".hidden", "a|b", "bad\x00name"])
def test_bad_output_names_are_refused_and_nothing_is_written(host, tmp_path, name):
    before = sorted(p for p in tmp_path.rglob("*"))
    outcome = handlers.merge(host, MergeRequest(two_rows(), name))
    assert not outcome.ok and outcome.message.startswith("error: ")
    assert ("bare file name" in outcome.message) or ("give an output file name" in outcome.message)
    assert sorted(p for p in tmp_path.rglob("*")) == before


def test_suffix_added_and_existing_file_kept_unless_overwrite(host):
    first = handlers.merge(host, MergeRequest(two_rows(), "again"))
    assert first.ok and first.path.name == "again.safetensors"
    stamp = first.path.stat().st_mtime_ns
    second = handlers.merge(host, MergeRequest(two_rows(), "again.safetensors"))
    assert not second.ok and "output file exists" in second.message and first.path.stat().st_mtime_ns == stamp
    third = handlers.merge(host, MergeRequest(two_rows(), "again", overwrite=True))
    assert third.ok, third.message


@pytest.mark.parametrize("rows,expected", [
    ([LoraRow(None), LoraRow(None)], "error: choose at least one LoRA"),
    ([LoraRow("gone.safetensors")], "error: LoRA 'gone.safetensors' is not in the LoRA folders any more"),
    ([LoraRow("style_a.safetensors", weights="NOSUCHPRESET")], "unknown block-weight preset 'NOSUCHPRESET'"),
    ([LoraRow("style_a.safetensors", weights="1,0,1")], "3 block weights for an SD1 LoRA"),
    ([LoraRow("style_a.safetensors", unet=None)], "give both strengths"),
])
def test_user_errors_are_one_line_messages(host, rows, expected):
    outcome = handlers.merge(host, MergeRequest(rows, "out"))
    assert not outcome.ok and expected in outcome.message and "\n" not in outcome.message
    assert not (host.lora_output_dir() / "out.safetensors").exists()


def test_bad_settings_are_messages(host):
    for request, expected in [(MergeRequest(two_rows(), "o", mode="add", threshold=0.5), "apply to svd mode only"),
                              (MergeRequest(two_rows(), "o", dtype="fp8"), "unknown dtype 'fp8'"),
                              (MergeRequest(two_rows(), "o", device="tpu"), "unknown device 'tpu'")]:
        outcome = handlers.merge(host, request)
        assert not outcome.ok and expected in outcome.message, outcome.message


def test_unexpected_failures_are_one_line_internal_errors(host, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("boom\nwith a second line")

    monkeypatch.setattr(handlers, "merge_to_file", broken)
    outcome = handlers.merge(host, MergeRequest(two_rows(), "out"))
    assert not outcome.ok
    assert outcome.message == "internal error (RuntimeError: boom with a second line); please report it"


def test_stop_interrupts_the_job_and_nothing_is_written(host):
    seen = []

    def ui_progress(done, total, what):
        seen.append(done)
        if done == 2:
            host.interrupt()  # the Stop button, pressed while the job runs

    outcome = handlers.merge(host, MergeRequest(two_rows(), "stopped"), ui_progress)
    assert not outcome.ok and outcome.message == "error: interrupted; nothing was written"
    assert seen == [1, 2]  # the next progress step stopped it
    assert not (host.lora_output_dir() / "stopped.safetensors").exists()
    assert list(host.lora_output_dir().glob("*.tmp*")) == []
    # the flag does not outlive the job: the next merge runs
    assert handlers.merge(host, MergeRequest(two_rows(), "after")).ok


def test_rows_from_prompt_use_the_dropdown_labels(host, tmp_path):
    sub = host.lora_output_dir() / "styles"
    sub.mkdir()
    (host.lora_output_dir() / "detail_c.safetensors").rename(sub / "detail_c.safetensors")
    rows = handlers.rows_from_prompt(host, "a photo <lora:style_a:0.7> <lora:detail_c:0.4:0.9:lbw=OUTALL>", 8)
    assert rows == [LoraRow("style_a.safetensors", unet=0.7, te=0.7, weights="none"),
                    LoraRow("styles/detail_c.safetensors", unet=0.9, te=0.4, weights="OUTALL")]
    for prompt, expected in [("no tags here", "holds no <lora:NAME:…> tags"),
                             ("<lora:nobody:1>", "no LoRA named 'nobody'"),
                             ("<lora:style_a:1:x=0.5>", "x= is not supported"),
                             ("<lora:style_a:1:start=3>", "cannot be baked")]:
        with pytest.raises(Exception, match=expected.replace("?", r"\?")):
            handlers.rows_from_prompt(host, prompt, 8)
    with pytest.raises(Exception, match="names 3 LoRAs; the tab has 2 rows"):
        handlers.rows_from_prompt(host, "<lora:style_a:1> <lora:character_b:1> <lora:detail_c:1>", 2)


def test_inspect_gives_the_table_and_the_block_norms(host):
    outcome = handlers.inspect(host, "style_a.safetensors")
    assert outcome.ok, outcome.message
    table = dict(outcome.table)
    assert table["architecture"] == "SD1" and table["format"] == "kohya (LoRA)" and table["ranks"] == "4 ×8"
    assert table["alpha"] == "2.0" and table["dtype"] == "fp16"
    assert table["· ss_base_model_version"] == "sd_v1"
    norms = dict(outcome.chart)
    assert len(norms) == 26 and norms["IN00"] == 0 and norms["IN04"] > 0 and norms["BASE"] > 0
    assert not handlers.inspect(host, None).ok
    missing = handlers.inspect(host, "gone.safetensors")
    assert not missing.ok and "not in the LoRA folders" in missing.message


def test_inspect_of_a_broken_file_is_a_message(host):
    (host.lora_output_dir() / "broken.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{not json")
    outcome = handlers.inspect(host, "broken.safetensors")
    assert not outcome.ok and outcome.message.startswith("error: ") and "broken.safetensors" in outcome.message


def test_file_labels_are_relative_paths_and_unique_across_folders(tmp_path):
    first = lora_folder(tmp_path / "one", ("same",))
    second = lora_folder(tmp_path / "two", ("same", "other"))
    (second / "notes.txt").write_text("not a LoRA")
    host = StandaloneHost([first, second])
    assert host.loras() == {"Lora/same.safetensors": second / "same.safetensors",
                            "other.safetensors": second / "other.safetensors",
                            "same.safetensors": first / "same.safetensors"}


# -- bake ----------------------------------------------------------------------------------------------------

@pytest.fixture
def bake_host(tmp_path):
    checkpoints = checkpoint_folder(tmp_path)
    return StandaloneHost([tmp_path / "Lora"], checkpoints)


def test_bake_writes_checkpoint_plus_the_rows_delta(bake_host):
    from safetensors.torch import load_file

    from lib_loramerge.bake.keymap import CheckpointLayout

    # (narrow LoRAs have no recognisable SD version, so no block weights here: the merge tests cover those)
    rows = [LoraRow("narrow_a.safetensors", unet=0.7, te=0.4), LoraRow("narrow_b.safetensors", unet=-1.0, te=1.0)]
    request = BakeRequest("base_sd1.safetensors", rows, "baked", dtype="fp32")
    outcome = handlers.bake(bake_host, request)
    out = bake_host.checkpoint_dir() / "baked.safetensors"
    assert outcome.ok, outcome.message
    assert outcome.path == out and out.is_file() and outcome.message.startswith(f"wrote {out} (SD1 checkpoint")
    assert "baked.safetensors" in bake_host.checkpoints()
    base = load_file(str(bake_host.checkpoint_dir() / "base_sd1.safetensors"))
    baked = load_file(str(out))
    layout = CheckpointLayout({k: tuple(v.shape) for k, v in base.items()})
    a, b = (read_lora(bake_host.lora_dirs()[0] / f) for f in ("narrow_a.safetensors", "narrow_b.safetensors"))
    changed = 0
    for name in a.modules:
        target = layout.target(name)
        strength_a, strength_b = (0.4, 1.0) if name.startswith("lora_te") else (0.7, -1.0)
        delta = strength_a * a.modules[name].delta().float() + strength_b * b.modules[name].delta().float()
        got = baked[target.key].float() - base[target.key].float()
        if target.rows is not None:
            got = got[target.rows[0]:target.rows[1]]
        torch.testing.assert_close(got.reshape(delta.shape), delta, rtol=1e-3, atol=1e-5)
        changed += 1
    assert changed == len(a.modules) == 8
    recipe = json.loads(read_header(out).metadata[RECIPE_KEY])
    assert recipe["type"] == "bake" and [i["unet"] for i in recipe["inputs"]] == [0.7, -1.0]


def test_bake_refusals_are_messages(bake_host, tmp_path):
    lora_folder(tmp_path, ("style_a",))  # full-width SD1: its layers are not the narrow checkpoint's
    rows = [LoraRow("narrow_a.safetensors")]
    for request, expected in [
        (BakeRequest(None, rows, "x"), "choose a checkpoint"),
        (BakeRequest("nope.safetensors", rows, "x"), "checkpoint 'nope.safetensors' is not in the list"),
        (BakeRequest("base_sd1.safetensors", rows, "../x"), "must be a bare file name"),
        (BakeRequest("base_sd1.safetensors", rows, "base_sd1", overwrite=True), "would replace the checkpoint"),
        (BakeRequest("base_sd1.safetensors", rows, "base_sd1"), "would replace the checkpoint"),
        (BakeRequest("base_sd1.safetensors", [LoraRow("style_a.safetensors")], "x"), "no matching layer"),
        (BakeRequest("base_sd1.safetensors", rows, "x", dtype="fp8"), "unknown dtype"),
    ]:
        outcome = handlers.bake(bake_host, request)
        assert not outcome.ok and expected in outcome.message and "\n" not in outcome.message, outcome.message
    assert sorted(p.name for p in bake_host.checkpoint_dir().iterdir()) == ["base_sd1.safetensors"]
    no_folder = StandaloneHost([tmp_path / "Lora"])
    outcome = handlers.bake(no_folder, BakeRequest("base_sd1.safetensors", rows, "x"))
    assert not outcome.ok and "needs a checkpoint folder" in outcome.message


def test_bake_keep_dtype_and_stop(bake_host):
    from safetensors import safe_open

    rows = [LoraRow("narrow_a.safetensors")]
    kept = handlers.bake(bake_host, BakeRequest("base_sd1.safetensors", rows, "kept", dtype="keep"))
    assert kept.ok, kept.message
    with safe_open(str(kept.path), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16", "I64"}  # noqa: SIM118 (not a dict)

    def stop_at_five(done, total, what):
        if done == 5:
            bake_host.interrupt()

    stopped = handlers.bake(bake_host, BakeRequest("base_sd1.safetensors", rows, "stopped"), stop_at_five)
    assert not stopped.ok and stopped.message == "error: interrupted; nothing was written"
    assert not (bake_host.checkpoint_dir() / "stopped.safetensors").exists()
    assert list(bake_host.checkpoint_dir().glob("*.tmp*")) == []


def test_merge_metadata_mode_and_verify_from_the_tab(host):
    outcome = handlers.merge(host, MergeRequest(two_rows(), "checked", mode="svd", rank=2, metadata="none",
                                                verify=True))
    assert outcome.ok, outcome.message
    assert "verified:" in outcome.message and "all within their bounds" in outcome.message
    meta = read_header(host.lora_output_dir() / "checked.safetensors").metadata
    assert RECIPE_KEY not in meta and meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    bad = handlers.merge(host, MergeRequest(two_rows(), "nope", metadata="everything"))
    assert not bad.ok and "metadata mode" in bad.message
    assert not (host.lora_output_dir() / "nope.safetensors").exists()


def test_bake_verify_from_the_tab(bake_host):
    rows = [LoraRow("narrow_a.safetensors", unet=0.7, te=0.4)]
    outcome = handlers.bake(bake_host, BakeRequest("base_sd1.safetensors", rows, "verified", verify=True))
    assert outcome.ok, outcome.message
    assert "patched tensors re-read from the file" in outcome.message

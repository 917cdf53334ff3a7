"""The Extract and Resize panels' actions called directly: real files, one-line messages, Stop."""

from __future__ import annotations

import pytest
import torch
from uikit import checkpoint_folder, lora_folder

from lib_loramerge.formats.reader import read_lora
from lib_loramerge.jobs import bake_to_file
from lib_loramerge.ops.merge import MergeInput
from lib_loramerge.ui import handlers_extract
from lib_loramerge.ui.handlers_extract import ExtractRequest, ResizeRequest
from lib_loramerge.ui.host import StandaloneHost


@pytest.fixture
def host(tmp_path):
    checkpoints = checkpoint_folder(tmp_path)
    lora_folder(tmp_path, ("style_a",))
    narrow = read_lora(tmp_path / "Lora" / "narrow_a.safetensors")
    bake_to_file(checkpoints / "base_sd1.safetensors", [MergeInput(narrow)], checkpoints / "tuned_sd1.safetensors",
                 dtype=torch.float32)
    return StandaloneHost([tmp_path / "Lora"], checkpoints)


def request(**changes) -> ExtractRequest:
    return ExtractRequest(**{"base": "base_sd1.safetensors", "tuned": "tuned_sd1.safetensors", "output": "extracted",
                             "rank": 4, "dtype": "fp32", **changes})


def test_extract_writes_the_lora_the_checkpoints_differ_by(host):
    outcome = handlers_extract.extract(host, request())
    out = host.lora_output_dir() / "extracted.safetensors"
    assert outcome.ok, outcome.message
    assert outcome.path == out and outcome.message.startswith(f"wrote {out} (SD1 LoRA: tuned_sd1.safetensors − base_sd1")
    assert "error over the optimal rank-k error" in outcome.message
    assert "modules: 8 written, 256 skipped (256 identical in both checkpoints)" in outcome.message
    assert "skipped lora_" not in outcome.message  # identical layers are counted, not listed
    assert "extracted.safetensors" in host.loras()  # listed at once
    narrow = read_lora(host.lora_output_dir() / "narrow_a.safetensors")
    got = read_lora(out)
    assert set(got.modules) == set(narrow.modules)
    for name, module in narrow.modules.items():
        want = module.delta().double().reshape(module.out_features, -1)
        have = got.modules[name].delta().double().reshape(want.shape)
        assert float((have - want).norm()) <= 1e-3 * float(want.norm()), name  # narrow_a is stored in fp16
    blocks = dict(outcome.chart)
    assert set(blocks) == {"BASE", "IN04", "M00", "OUT07"} and all(v > 0.999 for v in blocks.values())


@pytest.mark.parametrize("changes,expected", [
    ({"base": None}, "choose the base checkpoint"),
    ({"tuned": "gone.safetensors"}, "checkpoint 'gone.safetensors' is not in the list any more"),
    ({"output": "../x"}, "must be a bare file name"),
    ({"conv_rank": 2.5}, "conv rank must be a whole number"),
    ({"threshold": 1.5}, r"threshold must be in (0, 1]"),
    ({"device": "tpu"}, "unknown device 'tpu'"),
    ({"dtype": "fp8"}, "unknown dtype 'fp8'"),
    ({"tuned": "base_sd1.safetensors"}, "base and tuned are the same file"),
])
def test_extract_refusals_are_one_line_messages(host, changes, expected):
    outcome = handlers_extract.extract(host, request(**changes))
    assert not outcome.ok and outcome.message.startswith("error: ") and expected in outcome.message
    assert "\n" not in outcome.message
    assert not (host.lora_output_dir() / "extracted.safetensors").exists()


def test_extract_needs_a_checkpoint_folder_and_stops_on_request(host, tmp_path):
    no_folder = StandaloneHost([tmp_path / "Lora"])
    outcome = handlers_extract.extract(no_folder, request())
    assert not outcome.ok and "start the ui with --ckpt-dir" in outcome.message

    def stop_at_three(done, total, what):
        if done == 3:
            host.interrupt()  # the Stop button

    stopped = handlers_extract.extract(host, request(output="stopped"), stop_at_three)
    assert not stopped.ok and stopped.message == "error: interrupted; nothing was written"
    assert not (host.lora_output_dir() / "stopped.safetensors").exists()
    assert not [p for p in host.lora_output_dir().iterdir() if p.name.startswith(".")]
    assert handlers_extract.extract(host, request(output="after")).ok  # the flag does not outlive the job


def test_resize_by_policy_and_by_size(host):
    by_rank = handlers_extract.resize(host, ResizeRequest("style_a.safetensors", "style_r2", "rank", 2))
    assert by_rank.ok, by_rank.message
    assert {m.rank for m in read_lora(by_rank.path).modules.values()} == {2}
    assert by_rank.message.startswith(f"wrote {by_rank.path} (SD1, resized style_a: rank 2;")
    assert dict(by_rank.chart).keys() == {"BASE", "IN04", "M00", "OUT07"}
    assert {m.dtype for m in read_lora(by_rank.path).modules.values()} == {torch.float16}  # the source's
    ratio = handlers_extract.resize(host, ResizeRequest("style_a.safetensors", "style_ratio", "sv_ratio", 1.0,
                                                        dtype="fp32"))
    assert ratio.ok and {m.rank for m in read_lora(ratio.path).modules.values()} == {1}
    sized = handlers_extract.resize(host, ResizeRequest("style_a.safetensors", "style_small", "size_mib", 0.1))
    assert sized.ok, sized.message
    assert sized.path.stat().st_size <= 0.1 * 2**20 and "of 0.10 MiB asked" in sized.message
    assert {"style_r2.safetensors", "style_small.safetensors"} <= set(host.loras())


@pytest.mark.parametrize("req,expected", [
    (ResizeRequest(None, "x"), "choose a LoRA to resize"),
    (ResizeRequest("gone.safetensors", "x", "rank", 2), "is not in the LoRA folders any more"),
    (ResizeRequest("style_a.safetensors", "x", "knee", 2), "unknown policy 'knee'"),
    (ResizeRequest("style_a.safetensors", "x", "threshold", None), "give a value for threshold"),
    (ResizeRequest("style_a.safetensors", "x", "threshold", 2.0), r"threshold must be in (0, 1]"),
    (ResizeRequest("style_a.safetensors", "x", "rank", 2.5), "rank must be a whole number"),
    (ResizeRequest("style_a.safetensors", "x", "rank", 2, max_rank=3), "goes with a dynamic policy only"),
    (ResizeRequest("style_a.safetensors", "style_a", "rank", 2, overwrite=True), "would replace the LoRA"),
    (ResizeRequest("style_a.safetensors", "x", "size_mib", 0.001), "even rank 1 for every module"),
])
def test_resize_refusals_are_one_line_messages(host, req, expected):
    outcome = handlers_extract.resize(host, req)
    assert not outcome.ok and expected in outcome.message and "\n" not in outcome.message, outcome.message
    assert not (host.lora_output_dir() / "x.safetensors").exists()


def test_resize_stops_on_request(host):
    def stop_at_two(done, total, what):
        if done == 2:
            host.interrupt()

    outcome = handlers_extract.resize(host, ResizeRequest("style_a.safetensors", "halt", "rank", 2), stop_at_two)
    assert not outcome.ok and outcome.message == "error: interrupted; nothing was written"
    assert not (host.lora_output_dir() / "halt.safetensors").exists()

"""The merge panel's method settings through the tab's handlers: real files, recipes, one-line messages."""

from __future__ import annotations

import json

import pytest
from uikit import lora_folder

from lib_loramerge.formats.safetensors_io import read_header
from lib_loramerge.jobs import RECIPE_KEY
from lib_loramerge.ui import handlers
from lib_loramerge.ui.handlers import LoraRow, MergeRequest
from lib_loramerge.ui.host import StandaloneHost


@pytest.fixture
def host(tmp_path):
    return StandaloneHost([lora_folder(tmp_path)], tmp_path / "ckpt")


def rows(n=2):
    return [LoraRow(f, unet=0.8) for f in ("style_a.safetensors", "character_b.safetensors", "detail_c.safetensors")[:n]]


@pytest.mark.parametrize("request_, recorded", [
    (dict(method="slerp", t=0.25), {"t": 0.25}),
    (dict(method="ties", density=0.3), {"density": 0.3}),
    (dict(method="ties", density=0), {"density": 0.2}),  # 0: the method's default
    (dict(method="perpendicular", t=0.25), {}),  # the slider's value is ignored by the other methods
])
def test_merge_panel_methods_are_recorded(host, request_, recorded):
    outcome = handlers.merge(host, MergeRequest(rows(), "m", rank=2, **request_))
    assert outcome.ok, outcome.message
    recipe = json.loads(read_header(outcome.path).metadata[RECIPE_KEY])
    assert recipe["method"] == request_["method"] and recipe["method_options"] == recorded
    assert "method: " in outcome.message


def test_merge_panel_sum_records_no_method(host):
    outcome = handlers.merge(host, MergeRequest(rows(), "plain", rank=2, method="sum"))
    assert outcome.ok and "method" not in json.loads(read_header(outcome.path).metadata[RECIPE_KEY])


@pytest.mark.parametrize("request_, message", [
    (dict(method="slerp"), "exactly two LoRAs, got 3"),
    (dict(method="ties", mode="concat"), "(--mode svd)"),
    (dict(method="dare", density=1.5), "density must be in (0, 1]"),
    (dict(method="bogus"), "unknown method"),
])
def test_merge_panel_bad_method_settings_are_one_line(host, request_, message):
    outcome = handlers.merge(host, MergeRequest(rows(3), "bad", **request_))
    assert not outcome.ok and message in outcome.message and "\n" not in outcome.message
    assert not (host.lora_output_dir() / "bad.safetensors").exists()


def test_compare_two_loras_in_the_tab(host):
    from lib_loramerge.ui.handlers_methods import analyze

    outcome = analyze(host, ["style_a.safetensors", "character_b.safetensors"])
    assert outcome.ok, outcome.message
    assert "style_a and character_b: cosine" in outcome.message
    assert outcome.chart and all(-1 <= v <= 1 for _, v in outcome.chart)
    assert "cos 1·2" in outcome.table[0][1]
    refused = analyze(host, ["style_a.safetensors"])
    assert not refused.ok and "two or more" in refused.message

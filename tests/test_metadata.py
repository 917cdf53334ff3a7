"""Metadata users and sites keep: inherited by mode, combined where it adds up, ours always right."""

from __future__ import annotations

import json

import pytest

from lib_loramerge.errors import LoraMergeError
from lib_loramerge.formats.metadata import inherited, merged_from

A = {"ss_tag_frequency": json.dumps({"10_style": {"red hair": 3, "smile": 1}}),
     "modelspec.trigger_phrase": "stylez, red hair", "ss_learning_rate": "0.0001", "ss_num_epochs": "10",
     "ss_network_dim": "16", "sshs_model_hash": "aa", "ss_output_name": "style", "modelspec.title": "Style",
     "ss_sd_model_name": "v1-5-pruned.safetensors"}
B = {"ss_tag_frequency": json.dumps({"10_style": {"smile": 2}, "5_other": {"hat": 4}}),
     "modelspec.trigger_phrase": "red hair, subjx", "ss_learning_rate": "0.0002", "ss_num_epochs": "10",
     "ss_network_dim": "8", "ss_output_name": "subject", "ss_sd_model_name": "v1-5-pruned.safetensors"}


def test_merge_mode_sums_tags_unions_triggers_and_keeps_only_what_all_agree_on():
    got = inherited([A, B], "merge")
    assert json.loads(got["ss_tag_frequency"]) == {"10_style": {"red hair": 3, "smile": 3}, "5_other": {"hat": 4}}
    assert got["modelspec.trigger_phrase"] == "stylez, red hair, subjx"
    assert got["ss_num_epochs"] == "10" and got["ss_sd_model_name"] == "v1-5-pruned.safetensors"
    assert "ss_learning_rate" not in got  # the inputs disagree: no value would be true of the output
    for own in ("ss_network_dim", "sshs_model_hash", "ss_output_name", "modelspec.title"):
        assert own not in got  # the output's own values are written by the writer


def test_first_new_none():
    first = inherited([A, B], "first")
    assert first["ss_learning_rate"] == "0.0001" and "ss_network_dim" not in first
    assert inherited([A, B], "new") == {} and inherited([A, B], "none") == {}
    with pytest.raises(LoraMergeError, match="unknown metadata mode"):
        inherited([A], "all")


def test_a_broken_tag_frequency_is_left_out_and_said():
    notes: list[str] = []
    got = inherited([{"ss_tag_frequency": "{not json"}, B], "merge", notes)
    assert json.loads(got["ss_tag_frequency"]) == json.loads(B["ss_tag_frequency"])
    assert notes and "input 1: ss_tag_frequency" in notes[0]


def test_merged_from_names_every_input():
    assert merged_from(["Style", "Sub, ject"]) == "Style, Sub  ject"
